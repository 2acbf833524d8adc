"""FlashAttention-2 backward on the CPU: njit, two deterministic parallel passes, never the S x S matrix.

Both passes recompute P tile by tile from the saved LSE (``P = 2 ** (logit * log2e - lse * log2e)``)
and use D_i = rowsum(dO * O), computed once up front by the caller.

1. dK / dV: one task per (sequence, key block of BLOCK_KV rows, k/v head). The task walks the query
   heads of its GQA group and the visible query rows in chunks of BLOCK_Q:
   S = Q K^T, P, dV += P~^T dO, dP = dO V^T, dS = P~ * dP - P * D_i (P~ = P with dropout applied),
   dK += dS^T Q, and this block's share of dQ, dS K, into its own slot (the passes run for as many k/v
   heads at a time as have room for their shares in ``DQ_SHARES_MAX_BYTES``). The group sum happens
   inside the task, so it needs no reduction.
2. dQ: one task per (sequence, query block of BLOCK_Q rows, query head): the sum of the visible key
   blocks' slots, in block order. Where even one k/v head's shares do not fit, it walks the visible key
   blocks instead and recomputes S, P, dP, dS as above, dQ += dS K (7 tile products per tile pair, not 5).

A tile that the mask cuts (the causal diagonal, a window edge) is done in strips of SUB_Q query rows, each
against only the key columns its rows can see, so about half of a diagonal tile's products are skipped
(5/8 of the tile computed at SUB_Q = 64, BLOCK 256, instead of all of it).

Every output element (and every dQ share) is written by exactly one task in a fixed order of additions,
so the gradients are bitwise reproducible whatever the thread count. The tile products go to BLAS (np.dot
on contiguous tiles; keep BLAS single-threaded, see ``_blas``). Tasks are pulled from an atomic counter,
heaviest first, in one parallel region (short calls) or on the calling thread plus helper threads, as in the
forward (``flash_attention.run_parallel``).

Layout: packed with cu_seqlens; the inputs head-major, q/dout (H, total_q, D), k/v (Hk, total_k, D), the
gradients in the caller's layout, dq (total_q, H, D), dk/dv (total_k, Hk, D).
"""
import numpy as np
from numba import prange

from numba_kernels import _masks
from numba_kernels._dropout import build_hash
from numba_kernels._jit import njit, njit_parallel
from numba_kernels.cpu._math import LOG2E, atomic_fetch_add, exp2_fast
from numba_kernels.cpu.flash_attention import _fill, _key_range, _row_span, run_parallel, scratch

BLOCK_KV = 256  # key rows per dK/dV task
BLOCK_Q = 256  # query rows per dQ task, and query chunk of a dK/dV task
SUB_Q = 64  # a tile cut by the mask (causal diagonal, window edge) is done in strips of this many query rows,
#             each against only the keys its rows can see (no products over the masked half)

row_key, col_hash = build_hash(lambda f: njit(f, inline="always"))

# indices into ``consts`` (scalars in the compute dtype, so no float32 loop is promoted to float64)
C_SCALE_LOG2, C_CAP, C_CAP_IN, C_LOG2E, C_INV_KEEP, C_ZERO, C_ONE, C_SCALE = range(8)


def make_consts(dtype, scale, softcap, dropout_p):
    """The ``consts`` array of the kernels, in the compute dtype (indices ``C_*``)."""
    cap_in = scale / softcap if softcap > 0 else 0.0
    return np.array([scale * LOG2E, softcap, cap_in, LOG2E, 1.0 / (1.0 - dropout_p), 0.0, 1.0, scale], dtype=dtype)


_query_range = njit(_masks.query_range, inline="always")


@njit(inline="always")
def _probs(s, g, lse2, i0, j0, off, left, right, consts, slope, cidx, fbuf):
    """Raw scores s (m, n) of rows [i0, i0 + m) x keys [j0, j0 + n) -> P in place (0 where masked).

    lse2 (m,): the rows' LSE in log2 units (+inf for a fully masked row); g (m, n): with softcap,
    receives the softcap derivative 1 - tanh^2 on the visible entries.
    """
    m, n = s.shape
    zero = consts[C_ZERO]
    one = consts[C_ONE]
    softcap = consts[C_CAP]
    has_alibi = cidx.shape[0] > 0
    prescale = softcap > 0 or has_alibi
    sc = one if prescale else consts[C_SCALE_LOG2]
    for r in range(m):
        i = i0 + r
        c0, c1 = _row_span(i, off, left, right, j0, n)
        row = s[r]
        if c1 <= c0:
            _fill(row, zero)
            continue
        x = row[c0:c1]
        if softcap > 0:
            gr = g[r, c0:c1]
            for c in range(x.shape[0]):
                t = np.tanh(x[c] * consts[C_CAP_IN])
                gr[c] = one - t * t
                x[c] = softcap * t * consts[C_LOG2E]
        elif prescale:
            for c in range(x.shape[0]):
                x[c] = x[c] * consts[C_SCALE_LOG2]
        if has_alibi:
            fbuf[0] = i + off - j0 - c0
            base = fbuf[0]  # distance to key j0 + c0 + c is |base - c|
            for c in range(x.shape[0]):
                x[c] -= slope * abs(base - cidx[c])
        l2 = lse2[r]
        for c in range(x.shape[0]):
            x[c] = exp2_fast(x[c] * sc - l2)
        _fill(row[:c0], zero)
        _fill(row[c1:], zero)


@njit(inline="always")
def _dropped(p, pd, b, h, i0, j0, seed, thresh, inv_keep, zero):
    """pd = P with the forward's dropout applied (kept / (1 - p), dropped 0); same shapes (m, n)."""
    m, n = p.shape
    for r in range(m):
        rk = row_key(seed, b, h, i0 + r)
        pr = p[r]
        dr = pd[r]
        for c in range(n):
            if col_hash(rk, j0 + c) >= thresh:
                dr[c] = pr[c] * inv_keep
            else:
                dr[c] = zero


@njit(inline="always")
def _dscores(p, dp, pd, g, di, has_drop, has_cap):
    """dp (m, n) = dO V^T -> dS in place: P~ * dp - P * D_i (P * (dp - D_i) without dropout), times
    the softcap derivative g when softcap is on. di (m,)."""
    m = p.shape[0]
    for r in range(m):
        d = di[r]
        pr = p[r]
        dr = dp[r]
        if has_drop:
            pdr = pd[r]
            for c in range(dr.shape[0]):
                dr[c] = pdr[c] * dr[c] - pr[c] * d
        else:
            for c in range(dr.shape[0]):
                dr[c] = pr[c] * (dr[c] - d)
        if has_cap:
            gr = g[r]
            for c in range(dr.shape[0]):
                dr[c] *= gr[c]


@njit(inline="always")
def _strip(i0, m, j0, n, Sq, Sk, left, right):
    """Rows per strip for tile [i0, i0 + m) x keys [j0, j0 + n): m when every row sees every key, else SUB_Q."""
    lo_last = _key_range(i0 + m - 1, i0 + m, Sq, Sk, left, right)[0]
    hi_first = _key_range(i0, i0 + 1, Sq, Sk, left, right)[1]
    return m if lo_last <= j0 and hi_first >= j0 + n else SUB_Q


@njit(inline="always")
def _cols(a, mm, j0, n, Sq, Sk, left, right):
    """Key columns [c_lo, c_hi) of block [j0, j0 + n) seen by any of rows [a, a + mm)."""
    lo, hi = _key_range(a, a + mm, Sq, Sk, left, right)
    return max(lo, j0) - j0, min(hi, j0 + n) - j0


@njit(inline="always")
def _add(acc, tmp):
    for r in range(acc.shape[0]):
        a = acc[r]
        t = tmp[r]
        for d in range(a.shape[0]):
            a[d] += t[d]


@njit
def _dkdv_task(q, k, v, do, lse2, di, cu_q, cu_k, b, hk, group, j0, dk, dv, dqp, hq0, consts, left, right, slopes,
               dropout_p, seed, thresh):
    """dK, dV of keys [j0, j0 + BLOCK_KV) of k/v head hk of sequence b (sum over the group's query heads).

    With dqp of shape (nkb, Hc, Tq, D) (nkb > 0; Hc query heads from hq0 on), also writes this key block's
    share of dQ (dS K, unscaled) to ``dqp[j0 // BLOCK_KV, h - hq0, rows]`` for every query row the block is
    visible from."""
    D = q.shape[2]
    dt = q.dtype
    qs = cu_q[b]
    ks = cu_k[b]
    Sq = cu_q[b + 1] - qs
    Sk = cu_k[b + 1] - ks
    off = Sk - Sq
    n = min(BLOCK_KV, Sk - j0)
    has_drop = dropout_p > 0
    has_cap = consts[C_CAP] > 0
    has_alibi = slopes.shape[0] > 0
    kt = k[hk, ks + j0: ks + j0 + n]  # (n, D)
    vt = v[hk, ks + j0: ks + j0 + n]
    acc_k = np.zeros((n, D), dtype=dt)
    acc_v = np.zeros((n, D), dtype=dt)
    tmp = np.empty((n, D), dtype=dt)
    sbuf = np.empty(BLOCK_Q * n, dtype=dt)
    dpbuf = np.empty(BLOCK_Q * n, dtype=dt)
    pdbuf = np.empty(BLOCK_Q * n if has_drop else 0, dtype=dt)
    gbuf = np.zeros(BLOCK_Q * n if has_cap else 0, dtype=dt)
    fbuf = np.empty(1, dtype=dt)
    cidx = np.arange(BLOCK_KV).astype(dt) if has_alibi else np.empty(0, dtype=dt)
    slope = consts[C_ZERO]
    ilo, ihi = _query_range(j0, j0 + n, Sq, Sk, left, right)
    fuse = dqp.shape[0] > 0
    jb = j0 // BLOCK_KV
    for h in range(hk * group, (hk + 1) * group):
        if has_alibi:
            slope = slopes[b, h] * consts[C_LOG2E]
        for i0 in range(ilo, ihi, BLOCK_Q):
            m = min(BLOCK_Q, ihi - i0)
            step = _strip(i0, m, j0, n, Sq, Sk, left, right)
            for a in range(i0, i0 + m, step):
                mm = min(step, i0 + m - a)
                c_lo, c_hi = _cols(a, mm, j0, n, Sq, Sk, left, right)
                if c_hi <= c_lo:
                    continue
                nn = c_hi - c_lo
                ks_, vs_ = kt[c_lo:c_hi], vt[c_lo:c_hi]  # (nn, D)
                qt = q[h, qs + a: qs + a + mm]  # (mm, D)
                dot = do[h, qs + a: qs + a + mm]
                s = sbuf[: mm * nn].reshape((mm, nn))
                dp = dpbuf[: mm * nn].reshape((mm, nn))
                pd = pdbuf[: mm * nn].reshape((mm, nn)) if has_drop else pdbuf.reshape((0, 0))
                g = gbuf[: mm * nn].reshape((mm, nn)) if has_cap else gbuf.reshape((0, 0))
                t = tmp[:nn]
                np.dot(qt, ks_.T, s)
                _probs(s, g, lse2[h, qs + a: qs + a + mm], a, j0 + c_lo, off, left, right, consts, slope, cidx,
                       fbuf)
                if has_drop:
                    _dropped(s, pd, b, h, a, j0 + c_lo, seed, thresh, consts[C_INV_KEEP], consts[C_ZERO])
                    np.dot(pd.T, dot, t)
                else:
                    np.dot(s.T, dot, t)
                _add(acc_v[c_lo:c_hi], t)
                np.dot(dot, vs_.T, dp)
                _dscores(s, dp, pd, g, di[h, qs + a: qs + a + mm], has_drop, has_cap)
                np.dot(dp.T, qt, t)
                _add(acc_k[c_lo:c_hi], t)
                if fuse:  # this block's dQ rows: one writer each, summed over blocks in a fixed order later
                    np.dot(dp, ks_, dqp[jb, h - hq0, qs + a: qs + a + mm])
    scale = consts[C_SCALE]
    for r in range(n):
        ok = dk[ks + j0 + r, hk]
        ov = dv[ks + j0 + r, hk]
        for d in range(D):
            ok[d] = acc_k[r, d] * scale
            ov[d] = acc_v[r, d]


@njit
def _dq_task(q, k, v, do, lse2, di, cu_q, cu_k, b, h, hk, i0, dq, consts, left, right, slopes,
             dropout_p, seed, thresh):
    """dQ of query rows [i0, i0 + BLOCK_Q) of head h (k/v head hk) of sequence b."""
    D = q.shape[2]
    dt = q.dtype
    qs = cu_q[b]
    ks = cu_k[b]
    Sq = cu_q[b + 1] - qs
    Sk = cu_k[b + 1] - ks
    off = Sk - Sq
    m = min(BLOCK_Q, Sq - i0)
    has_drop = dropout_p > 0
    has_cap = consts[C_CAP] > 0
    has_alibi = slopes.shape[0] > 0
    qt = q[h, qs + i0: qs + i0 + m]  # (m, D)
    dot = do[h, qs + i0: qs + i0 + m]
    lr = lse2[h, qs + i0: qs + i0 + m]
    dr = di[h, qs + i0: qs + i0 + m]
    acc = np.zeros((m, D), dtype=dt)
    tmp = np.empty((m, D), dtype=dt)
    sbuf = np.empty(m * BLOCK_KV, dtype=dt)
    dpbuf = np.empty(m * BLOCK_KV, dtype=dt)
    pdbuf = np.empty(m * BLOCK_KV if has_drop else 0, dtype=dt)
    gbuf = np.zeros(m * BLOCK_KV if has_cap else 0, dtype=dt)
    fbuf = np.empty(1, dtype=dt)
    cidx = np.arange(BLOCK_KV).astype(dt) if has_alibi else np.empty(0, dtype=dt)
    slope = slopes[b, h] * consts[C_LOG2E] if has_alibi else consts[C_ZERO]
    lo, hi = _key_range(i0, i0 + m, Sq, Sk, left, right)
    for j0 in range(lo, hi, BLOCK_KV):
        n = min(BLOCK_KV, hi - j0)
        step = _strip(i0, m, j0, n, Sq, Sk, left, right)
        for a in range(0, m, step):  # strip rows [i0 + a, i0 + a + mm)
            mm = min(step, m - a)
            c_lo, c_hi = _cols(i0 + a, mm, j0, n, Sq, Sk, left, right)
            if c_hi <= c_lo:
                continue
            nn = c_hi - c_lo
            kt = k[hk, ks + j0 + c_lo: ks + j0 + c_hi]  # (nn, D)
            vt = v[hk, ks + j0 + c_lo: ks + j0 + c_hi]
            s = sbuf[: mm * nn].reshape((mm, nn))
            dp = dpbuf[: mm * nn].reshape((mm, nn))
            pd = pdbuf[: mm * nn].reshape((mm, nn)) if has_drop else pdbuf.reshape((0, 0))
            g = gbuf[: mm * nn].reshape((mm, nn)) if has_cap else gbuf.reshape((0, 0))
            qa, da, t = qt[a: a + mm], dot[a: a + mm], tmp[a: a + mm]
            np.dot(qa, kt.T, s)
            _probs(s, g, lr[a: a + mm], i0 + a, j0 + c_lo, off, left, right, consts, slope, cidx, fbuf)
            if has_drop:
                _dropped(s, pd, b, h, i0 + a, j0 + c_lo, seed, thresh, consts[C_INV_KEEP], consts[C_ZERO])
            np.dot(da, vt.T, dp)
            _dscores(s, dp, pd, g, dr[a: a + mm], has_drop, has_cap)
            np.dot(dp, kt, t)
            _add(acc[a: a + mm], t)
    scale = consts[C_SCALE]
    for r in range(m):
        o = dq[qs + i0 + r, h]
        for d in range(D):
            o[d] = acc[r, d] * scale


@njit
def _dq_sum_task(dqp, hq0, cu_q, cu_k, h, b, i0, dq, consts, left, right):
    """dQ of query rows [i0, i0 + BLOCK_Q) of head h of sequence b from the dK/dV pass's per-key-block shares
    dqp (nkb, Hc, Tq, D) of heads hq0.. : scale * (share of the first visible block + the next + ...), in
    block order."""
    D = dq.shape[2]
    qs = cu_q[b]
    Sq = cu_q[b + 1] - qs
    Sk = cu_k[b + 1] - cu_k[b]
    scale = consts[C_SCALE]
    for i in range(i0, min(i0 + BLOCK_Q, Sq)):
        lo, hi = _key_range(i, i + 1, Sq, Sk, left, right)
        if hi <= lo:  # a fully masked row: dq stays 0
            continue
        o = dq[qs + i, h]
        src = dqp[lo // BLOCK_KV, h - hq0, qs + i]
        for d in range(D):
            o[d] = src[d]
        for jb in range(lo // BLOCK_KV + 1, (hi - 1) // BLOCK_KV + 1):
            src = dqp[jb, h - hq0, qs + i]
            for d in range(D):
                o[d] += src[d]
        for d in range(D):
            o[d] *= scale


@njit
def _dkdv_drain(counter, ntask, q, k, v, do, lse2, di, cu_q, cu_k, kv_seq, kv_row, dk, dv, dqp, hk0, hk1, consts,
                left, right, slopes, dropout_p, seed, thresh):
    """Pass 1 for k/v heads [hk0, hk1): run (key block, k/v head) tasks from the shared counter until none is
    left; dqp (nkb, (hk1 - hk0) * group, Tq, D) receives those heads' dQ shares, or has shape (0, 1, 1, 1)."""
    group = q.shape[0] // k.shape[0]
    nhk = hk1 - hk0
    t = atomic_fetch_add(counter, 0, 1)
    while t < ntask:
        blk = t // nhk
        hk = hk0 + t - blk * nhk
        _dkdv_task(q, k, v, do, lse2, di, cu_q, cu_k, kv_seq[blk], hk, group, kv_row[blk], dk, dv, dqp, hk0 * group,
                   consts, left, right, slopes, dropout_p, seed, thresh)
        atomic_fetch_add(counter, 1, 1)
        t = atomic_fetch_add(counter, 0, 1)


@njit
def _dq_drain(counter, ntask, q, k, v, do, lse2, di, cu_q, cu_k, q_seq, q_row, dq, dqp, hk0, hk1, consts, left,
              right, slopes, dropout_p, seed, thresh):
    """Pass 2 for the query heads of k/v heads [hk0, hk1): (query block, head) tasks, summing the dQ shares
    (dqp.shape[0] > 0) or recomputing S and dP (:func:`_dq_task`)."""
    group = q.shape[0] // k.shape[0]
    nh = (hk1 - hk0) * group
    t = atomic_fetch_add(counter, 0, 1)
    while t < ntask:
        blk = t // nh
        h = hk0 * group + t - blk * nh
        if dqp.shape[0] > 0:
            _dq_sum_task(dqp, hk0 * group, cu_q, cu_k, h, q_seq[blk], q_row[blk], dq, consts, left, right)
        else:
            _dq_task(q, k, v, do, lse2, di, cu_q, cu_k, q_seq[blk], h, h // group, q_row[blk], dq, consts, left,
                     right, slopes, dropout_p, seed, thresh)
        atomic_fetch_add(counter, 1, 1)
        t = atomic_fetch_add(counter, 0, 1)


@njit_parallel
def _dkdv_parallel(q, k, v, do, lse2, di, cu_q, cu_k, kv_seq, kv_row, dk, dv, dqp, hk0, hk1, consts, left, right,
                   slopes, dropout_p, seed, thresh):
    """Pass 1 in one parallel region (the first prange iteration of each thread drains the queue)."""
    ntask = kv_seq.shape[0] * (hk1 - hk0)
    counter = np.zeros(2, dtype=np.int64)
    for _ in prange(ntask):
        _dkdv_drain(counter, ntask, q, k, v, do, lse2, di, cu_q, cu_k, kv_seq, kv_row, dk, dv, dqp, hk0, hk1,
                    consts, left, right, slopes, dropout_p, seed, thresh)


@njit_parallel
def _dq_parallel(q, k, v, do, lse2, di, cu_q, cu_k, q_seq, q_row, dq, dqp, hk0, hk1, consts, left, right, slopes,
                 dropout_p, seed, thresh):
    """Pass 2 in one parallel region."""
    ntask = q_seq.shape[0] * (hk1 - hk0) * (q.shape[0] // k.shape[0])
    counter = np.zeros(2, dtype=np.int64)
    for _ in prange(ntask):
        _dq_drain(counter, ntask, q, k, v, do, lse2, di, cu_q, cu_k, q_seq, q_row, dq, dqp, hk0, hk1, consts, left,
                  right, slopes, dropout_p, seed, thresh)


def _passes(q, k, v, do, lse2, di, cu_q, cu_k, kv_seq, kv_row, q_seq, q_row, dq, dk, dv, dqp, hk0, hk1, consts,
            left, right, slopes, dropout_p, seed, thresh, flops):
    """Both passes for k/v heads [hk0, hk1), each through ``run_parallel`` (sized by the call's ``flops``)."""
    group = q.shape[0] // k.shape[0]
    opts = (consts, left, right, slopes, dropout_p, seed, thresh)
    run_parallel(_dkdv_drain, _dkdv_parallel, kv_seq.shape[0] * (hk1 - hk0), flops,
                 (q, k, v, do, lse2, di, cu_q, cu_k, kv_seq, kv_row, dk, dv, dqp, hk0, hk1) + opts)
    run_parallel(_dq_drain, _dq_parallel, q_seq.shape[0] * (hk1 - hk0) * group, flops,
                 (q, k, v, do, lse2, di, cu_q, cu_k, q_seq, q_row, dq, dqp, hk0, hk1) + opts)


#: most bytes of dQ shares (nkb x heads x Tq x D, nkb = key blocks of the longest sequence) held at once: the
#: backward runs in groups of k/v heads whose shares fit; when even one k/v head's do not, dQ gets its own
#: pass (which recomputes S and dP: 7 tile products per tile pair instead of 5)
DQ_SHARES_MAX_BYTES = 64 << 20


def flash_bwd_cpu(q, k, v, do, lse2, di, cu_q, cu_k, kv_seq, kv_row, q_seq, q_row, dq, dk, dv, consts, left, right,
                  slopes, dropout_p, seed, thresh):
    """Both passes. q/do (H, Tq, D), k/v (Hk, Tk, D) contiguous in the compute dtype; lse2 (H, Tq): the
    LSE times log2(e) (+inf for fully masked rows); di (H, Tq) = rowsum(dO * O); dq (Tq, H, D),
    dk/dv (Tk, Hk, D) contiguous outputs in the caller's layout (zero-filled: rows no task visits stay 0).

    kv_seq/kv_row list the key blocks (sequence, first key), q_seq/q_row the query blocks (both from
    :func:`plan_blocks`, heaviest first); consts from :func:`make_consts`; slopes (B, H) in the compute
    dtype or (0, 0); seed, thresh uint64 (dropout); left/right the window with causal folded in.

    When one k/v head's dQ shares fit in ``DQ_SHARES_MAX_BYTES``, the dK/dV pass also writes each key
    block's dS K to its own slot and the second pass only sums the slots (in block order, so still bitwise
    reproducible), for as many k/v heads at a time as fit; otherwise the second pass recomputes S and dP
    per query block.
    """
    H, Tq, D = q.shape
    Hk = k.shape[0]
    group = H // Hk
    nkb = max((-(-int(s) // BLOCK_KV) for s in np.diff(cu_k)), default=0)
    flops = 10 * D * H * float(np.dot(np.diff(cu_q).astype(np.float64), np.diff(cu_k).astype(np.float64)))
    opts = (consts, left, right, slopes, dropout_p, seed, thresh, flops)
    per_kv_head = nkb * group * Tq * D * q.itemsize
    if nkb == 0 or per_kv_head > DQ_SHARES_MAX_BYTES:
        _passes(q, k, v, do, lse2, di, cu_q, cu_k, kv_seq, kv_row, q_seq, q_row, dq, dk, dv,
                np.empty((0, 1, 1, 1), dtype=q.dtype), 0, Hk, *opts)
        return
    ngroups = -(-Hk // min(Hk, DQ_SHARES_MAX_BYTES // per_kv_head))  # as few k/v head groups as fit,
    step = -(-Hk // ngroups)  # of near-equal size
    buf = scratch("dqp", nkb * step * group * Tq * D, q.dtype)  # every slot is written before it is read
    for hk0 in range(0, Hk, step):
        hk1 = min(Hk, hk0 + step)
        nh = (hk1 - hk0) * group
        dqp = buf[: nkb * nh * Tq * D].reshape((nkb, nh, Tq, D))  # contiguous for any group size
        _passes(q, k, v, do, lse2, di, cu_q, cu_k, kv_seq, kv_row, q_seq, q_row, dq, dk, dv, dqp, hk0, hk1, *opts)


def plan_blocks(cu_q, cu_k, left, right):
    """(kv_seq, kv_row, q_seq, q_row): the key blocks and query blocks as int64 arrays, each sorted by
    the number of visible partner rows (heaviest first)."""
    kv, qb = [], []
    for b in range(len(cu_q) - 1):
        Sq, Sk = int(cu_q[b + 1] - cu_q[b]), int(cu_k[b + 1] - cu_k[b])
        for j0 in range(0, Sk, BLOCK_KV):
            lo, hi = _query_range(j0, min(Sk, j0 + BLOCK_KV), Sq, Sk, left, right)
            kv.append((-max(0, hi - lo), b, j0))
        for i0 in range(0, Sq, BLOCK_Q):
            lo, hi = _key_range(i0, min(Sq, i0 + BLOCK_Q), Sq, Sk, left, right)
            qb.append((-max(0, hi - lo), b, i0))
    kv.sort()
    qb.sort()
    arr = [np.asarray([t[i] for t in lst], dtype=np.int64) for lst in (kv, qb) for i in (1, 2)]
    return tuple(arr)
