"""FlashAttention forward on the CPU: njit, parallel over (query head, query block).

Each task owns one block of BQ query rows of one head of one sequence and walks the visible key
blocks with an online softmax (running max m, running sum l, rescaled accumulator), so memory is
O(BQ * (BK + D)) per task and the S x S matrix never exists. The two tile products go to BLAS
(np.dot on contiguous tiles, single-threaded: see ``_blas``); everything in between is two
vectorized passes per row in log2 units (max; exp2 + sum), which costs ~15% on top of the BLAS time.
Large tiles matter: D = 64 is a short inner dimension, and the BLAS rate falls off below ~256 x 512.
See benchmarks/bench_cpu_tuning_notes.md for what was measured.

Layout here is packed, with cu_seqlens, so batched and varlen calls share one kernel: the inputs head-major
(q (H, total_q, D), k/v (Hk, total_k, D): contiguous tiles for BLAS), the output in the caller's layout
(total_q, H, D), each row written where it belongs (no copy back).
"""
import functools
import threading

import numba
import numpy as np
from numba import prange

from numba_kernels import _masks
from numba_kernels._dropout import build_hash
from numba_kernels._jit import FASTMATH_ORDERED
from numba_kernels._jit import njit as _njit
from numba_kernels._jit import njit_parallel as _njit_parallel
from numba_kernels.cpu._math import LN2, LOG2E, atomic_fetch_add, exp2_fast, fmax_fast
from numba_kernels.cpu._tasks import run_tasks

njit = functools.partial(_njit, fastmath=FASTMATH_ORDERED)
njit_parallel = functools.partial(_njit_parallel, fastmath=FASTMATH_ORDERED)

BLOCK_Q = 256
BLOCK_K = 512
ROW_GROUP = 64  # row group of the keys a mask edge cuts (the causal diagonal, a window edge)

row_key, col_hash = build_hash(lambda f: njit(f, inline="always"))


_key_range = njit(_masks.key_range, inline="always")
_row_span = njit(_masks.row_span, inline="always")


# indices into the ``consts`` array: scalars carried in the compute dtype so that no float32
# loop is promoted to float64 by a Python float constant
C_SCALE_LOG2, C_CAP, C_CAP_IN, C_LOG2E, C_INV_KEEP, C_NEG_INF, C_ZERO, C_ONE = range(8)


def make_consts(dtype, scale, softcap, dropout_p):
    """The ``consts`` array of :func:`flash_fwd_cpu`, in the compute dtype (indices ``C_*``)."""
    cap_in = scale / softcap if softcap > 0 else 0.0
    return np.array([scale * LOG2E, softcap, cap_in, LOG2E, 1.0 / (1.0 - dropout_p), -np.inf, 0.0, 1.0],
                    dtype=dtype)


# The row helpers take slices and loop from 0: with ``range(c0, c1)`` numba's negative-index
# wraparound makes the address non-affine and LLVM gives up vectorizing.
#: lanes of the fixed-order reductions below: 16 independent chains that LLVM's SLP vectorizer turns into
#: vector adds / maxes without reassociating anything (the kernels are compiled without ``reassoc``, so a
#: kernel's bits do not depend on how LLVM inlined it: see ``_jit.FASTMATH_ORDERED``)
LANES = 16


@njit(inline="always")
def _row_max(x, init, lanes):
    """max(init, max(x)): LANES running maxima over strided columns (in the scratch ``lanes``), then combined
    in a fixed order."""
    n = x.shape[0]
    lanes[:] = init
    nf = n - n % LANES
    for c0 in range(0, nf, LANES):
        for j in range(LANES):
            lanes[j] = fmax_fast(lanes[j], x[c0 + j])
    mx = init
    for j in range(LANES):
        mx = fmax_fast(mx, lanes[j])
    for c in range(nf, n):
        mx = fmax_fast(mx, x[c])
    return mx


@njit(inline="always")
def _row_exp2(x, sc, m, zero, lanes):
    """x = 2 ** (x * sc - m) in place, returning its sum: the exps in one vectorized pass, the sum over
    LANES strided partial sums added in a fixed order (the same bits however LLVM inlines this)."""
    n = x.shape[0]
    for c in range(n):
        x[c] = exp2_fast(x[c] * sc - m)
    lanes[:] = zero
    nf = n - n % LANES
    for c0 in range(0, nf, LANES):
        for j in range(LANES):
            lanes[j] += x[c0 + j]
    ssum = zero
    for j in range(LANES):
        ssum += lanes[j]
    for c in range(nf, n):
        ssum += x[c]
    return ssum


@njit(inline="always")
def _fill(x, val):
    for c in range(x.shape[0]):
        x[c] = val


@njit(inline="always")
def _attend_keys(qt, kt, vt, s, tmp, acc, mrow, lrow, alpha, fbuf, cidx, lanes, b, h, i0, j0, off, left, right,
                 consts, sc, prescale, slope, dropout_p, seed, thresh):
    """Rows [i0, i0 + m) of one task against keys [j0, j0 + n): online-softmax update of acc, mrow,
    lrow (all (m, ...) views); s (m, n), tmp (m, D), alpha, fbuf, cidx, lanes (LANES) scratch."""
    m, n = s.shape
    D = acc.shape[1]
    zero = consts[C_ZERO]
    one = consts[C_ONE]
    softcap = consts[C_CAP]
    has_alibi = cidx.shape[0] > 0
    np.dot(qt, kt.T, s)  # (m, n) raw scores q . k
    for r in range(m):
        i = i0 + r
        c0, c1 = _row_span(i, off, left, right, j0, n)  # visible columns of this row inside the block
        row = s[r]
        if c1 <= c0:  # the whole row is masked in this block: it adds nothing
            _fill(row, zero)
            alpha[r] = one
            continue
        x = row[c0:c1]
        if softcap > 0:
            for c in range(x.shape[0]):
                x[c] = softcap * np.tanh(x[c] * consts[C_CAP_IN]) * consts[C_LOG2E]
        elif prescale:
            for c in range(x.shape[0]):
                x[c] = x[c] * consts[C_SCALE_LOG2]
        if has_alibi:
            fbuf[0] = i + off - j0 - c0
            base = fbuf[0]  # distance to column c0 + c is |base - c|
            for c in range(x.shape[0]):
                x[c] -= slope * abs(base - cidx[c])
        m_old = mrow[r]
        m_new = fmax_fast(m_old, _row_max(x, consts[C_NEG_INF], lanes) * sc)
        alpha[r] = exp2_fast(m_old - m_new)
        lrow[r] = lrow[r] * alpha[r] + _row_exp2(x, sc, m_new, zero, lanes)
        mrow[r] = m_new
        _fill(row[:c0], zero)
        _fill(row[c1:], zero)
        if dropout_p > 0:
            rk = row_key(seed, b, h, i)
            for c in range(x.shape[0]):
                if col_hash(rk, j0 + c0 + c) >= thresh:
                    x[c] *= consts[C_INV_KEEP]
                else:
                    x[c] = zero
    np.dot(s, vt, tmp)
    for r in range(m):
        a = alpha[r]
        for d in range(D):
            acc[r, d] = acc[r, d] * a + tmp[r, d]


@njit
def _attend_block(q, k, v, cu_q, cu_k, b, h, hk, i0, out, lse, lse_a, lse_c, consts, left, right, slopes,
                  dropout_p, seed, thresh, block_k):
    """One task: query rows [i0, i0 + BLOCK_Q) of head h (k/v head hk) of sequence b.

    Per key block: S = Q K^T (BLAS), then per row one max pass and one fused exp2 + sum pass
    (the softmax scale rides in the exp2's FMA), then acc = alpha * acc + P V (BLAS + one pass).
    """
    D = q.shape[2]
    has_alibi = slopes.shape[0] > 0
    softcap = consts[C_CAP]
    zero = consts[C_ZERO]
    one = consts[C_ONE]
    # the scale rides in the exp2 FMA, and the row max is taken on the raw q.k (valid for a positive
    # scale); softcap, ALiBi or a negative scale take one extra pass to log2 units first
    prescale = softcap > 0 or has_alibi or consts[C_SCALE_LOG2] < zero
    sc = one if prescale else consts[C_SCALE_LOG2]
    qs = cu_q[b]
    ks = cu_k[b]
    Sq = cu_q[b + 1] - qs
    Sk = cu_k[b + 1] - ks
    m = min(BLOCK_Q, Sq - i0)
    qt = q[h, qs + i0: qs + i0 + m]  # (m, D)
    acc = np.zeros((m, D), dtype=q.dtype)
    tmp = np.empty((m, D), dtype=q.dtype)
    sbuf = np.empty(m * block_k, dtype=q.dtype)
    mrow = np.full(m, consts[C_NEG_INF])
    lrow = np.zeros(m, dtype=q.dtype)
    alpha = np.empty(m, dtype=q.dtype)
    fbuf = np.empty(1, dtype=q.dtype)  # int -> compute-dtype conversions
    lanes = np.empty(LANES, dtype=q.dtype)  # the fixed-order reductions' partials
    lo, hi = _key_range(i0, i0 + m, Sq, Sk, left, right)
    off = Sk - Sq
    slope = zero
    cidx = np.empty(0, dtype=q.dtype)
    if has_alibi:
        slope = slopes[b, h] * consts[C_LOG2E]
        cidx = np.arange(block_k).astype(q.dtype)  # column offsets in the compute dtype
    # keys [a_lo, a_hi) are seen by every row of the task: full-height tiles. The keys left and right of
    # them (the causal diagonal, the edges of a window) go in groups of ROW_GROUP rows, each against only
    # the keys its rows can see: less masked work, and the full part keeps the large BLAS calls
    a_lo = _key_range(i0 + m - 1, i0 + m, Sq, Sk, left, right)[0]
    a_hi = _key_range(i0, i0 + 1, Sq, Sk, left, right)[1]
    if a_hi - a_lo < ROW_GROUP and (a_lo > lo or a_hi < hi):  # a narrow full part between edges: all edge
        a_lo = hi
        a_hi = hi
    for seg in range(3):  # [lo, a_lo) edge, [a_lo, a_hi) full, [a_hi, hi) edge, in key order
        s0 = lo if seg == 0 else (a_lo if seg == 1 else a_hi)
        s1 = a_lo if seg == 0 else (a_hi if seg == 1 else hi)
        step = m if seg == 1 else ROW_GROUP
        for j0 in range(s0, s1, block_k):
            n = min(block_k, s1 - j0)
            for r0 in range(0, m, step):
                mg = min(step, m - r0)
                ga, gb = _key_range(i0 + r0, i0 + r0 + mg, Sq, Sk, left, right)
                jb = max(ga, j0)  # this group's key columns: [jb, jb + nb)
                nb = min(gb, j0 + n) - jb
                if nb <= 0:  # every row of the group is masked in this block: acc, m, l stay as they are
                    continue
                _attend_keys(qt[r0: r0 + mg], k[hk, ks + jb: ks + jb + nb], v[hk, ks + jb: ks + jb + nb],
                             sbuf[: mg * nb].reshape((mg, nb)), tmp[:mg], acc[r0: r0 + mg], mrow[r0: r0 + mg],
                             lrow[r0: r0 + mg], alpha, fbuf, cidx, lanes, b, h, i0 + r0, jb, off, left, right,
                             consts, sc, prescale, slope, dropout_p, seed, thresh)
    lse0 = qs * lse_a + h * lse_c + i0
    for r in range(m):
        lr = lrow[r]
        o = out[qs + i0 + r, h]
        if lr > 0:
            inv = one / lr
            lse[lse0 + r] = (mrow[r] + np.log2(lr)) * LN2
            for d in range(D):
                o[d] = acc[r, d] * inv
        else:
            lse[lse0 + r] = -np.inf
            _fill(o, zero)


@njit
def _fwd_drain(counter, ntask, q, k, v, cu_q, cu_k, blk_seq, blk_row, out, lse, lse_a, lse_c, consts, left, right,
               slopes, dropout_p, seed, thresh, block_k):
    """Run (query block, head) tasks from the shared counter until none is left (``_tasks.run_tasks``):
    task t is block t // H, head t % H, in the order of blk_seq/blk_row (heaviest first)."""
    H = q.shape[0]
    group = H // k.shape[0]
    t = atomic_fetch_add(counter, 0, 1)
    while t < ntask:
        blk = t // H
        h = t - blk * H
        _attend_block(q, k, v, cu_q, cu_k, blk_seq[blk], h, h // group, blk_row[blk], out, lse, lse_a, lse_c,
                      consts, left, right, slopes, dropout_p, seed, thresh, block_k)
        atomic_fetch_add(counter, 1, 1)
        t = atomic_fetch_add(counter, 0, 1)


@njit_parallel
def _fwd_parallel(q, k, v, cu_q, cu_k, blk_seq, blk_row, out, lse, lse_a, lse_c, consts, left, right, slopes,
                  dropout_p, seed, thresh, block_k):
    """The same tasks in one parallel region: the first prange iteration of each thread drains the queue."""
    ntask = blk_seq.shape[0] * q.shape[0]
    counter = np.zeros(2, dtype=np.int64)
    for _ in prange(ntask):
        _fwd_drain(counter, ntask, q, k, v, cu_q, cu_k, blk_seq, blk_row, out, lse, lse_a, lse_c, consts, left,
                   right, slopes, dropout_p, seed, thresh, block_k)


#: calls of fewer tile FLOPs than this (4 D H sum(Sq Sk), about 2 ms on one core) use the parallel region, whose
#: threads are usually still spinning from the previous call; longer ones use ``_tasks.run_tasks``, which never
#: waits for a thread that another process keeps off its core (S 512 H8 D64 at load 2.7: 24 ms in the region,
#: 10 ms with run_tasks; on an idle machine run_tasks costs 0-8% there: a helper thread has to be woken)
PARALLEL_REGION_MAX_FLOPS = 1 << 27


def run_parallel(drain, region, ntask, flops, args):
    """Run ``ntask`` tasks through the parallel-region kernel ``region(*args)`` (short calls, or one thread) or
    ``_tasks.run_tasks(drain, ntask, args)`` (longer calls, and every call from a thread other than the main
    one: the region's worker threads would run their gemms with the process-wide OpenBLAS thread count, which a
    limit set from such a thread does not change, see ``_blas``); ``flops`` sizes the call."""
    nthreads = numba.get_num_threads()
    short = flops < PARALLEL_REGION_MAX_FLOPS and threading.current_thread() is threading.main_thread()
    if short or nthreads == 1 or ntask < 2:
        region(*args)
    else:
        run_tasks(drain, ntask, args, nthreads)


#: scratch buffers of at most this many bytes are kept (per thread and slot) and reused by the next call: on the
#: 2-core benchmark VM fresh pages cost ~0.5-1 ms per MiB (first touch), more than the copies into them (S 512 H8
#: D64 backward: 4 MiB of packed q/k/v/dout, 2 MiB of dQ shares); larger ones are allocated per call, where the
#: O(S^2) work hides them. At most 2 slots ("pack", "dqp") per dtype and thread are kept
SCRATCH_KEEP_BYTES = 16 << 20

_scratch = threading.local()


def scratch(slot, n, dtype):
    """A 1-D array of ``n`` elements of ``dtype`` for temporaries of one call (contents undefined). Up to
    ``SCRATCH_KEEP_BYTES`` it is a view of this thread's buffer for ``slot`` (grown as needed, reused by the next
    call that asks for the slot on this thread), so two arrays that live at the same time need two slots and
    nothing handed to the caller may come from here."""
    dtype = np.dtype(dtype)
    if n * dtype.itemsize > SCRATCH_KEEP_BYTES:
        return np.empty(n, dtype=dtype)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get((slot, dtype))
    if buf is None or buf.shape[0] < n:
        buf = bufs[slot, dtype] = np.empty(n, dtype=dtype)
    return buf[:n]


@njit(inline="always")
def _pack_head(x, xh, h):
    for t in range(x.shape[0]):
        src = x[t, h]
        dst = xh[h, t]
        for d in range(src.shape[0]):
            dst[d] = src[d]


@njit
def _pack_drain(counter, ntask, a, b, c, d, ah, bh, ch, dh):
    """Task t copies one head of a, b, c, d (in that order; (T, H, D) -> ah.. (H, T, D)) until none is left."""
    na, nb, nc = a.shape[1], b.shape[1], c.shape[1]
    t = atomic_fetch_add(counter, 0, 1)
    while t < ntask:
        if t < na:
            _pack_head(a, ah, t)
        elif t < na + nb:
            _pack_head(b, bh, t - na)
        elif t < na + nb + nc:
            _pack_head(c, ch, t - na - nb)
        else:
            _pack_head(d, dh, t - na - nb - nc)
        atomic_fetch_add(counter, 1, 1)
        t = atomic_fetch_add(counter, 0, 1)


#: packs of at least this many bytes are copied by the calling thread plus helper threads (``_tasks.run_tasks``)
PACK_PARALLEL_MIN_BYTES = 1 << 20


def pack_heads(xs, dtype):
    """Head-major copies (H, T, D) in ``dtype`` of the 2 to 4 host arrays ``xs`` (each (T, H, D)), from one scratch
    buffer (slot "pack"): valid until the next call that packs on this thread. One task per head (several
    threads) when they are large and already in ``dtype`` (float32/float64), else NumPy copies (these also widen
    float16/bfloat16)."""
    dtype = np.dtype(dtype)
    ws = scratch("pack", sum(x.size for x in xs), dtype)
    out, o = [], 0
    for x in xs:
        T, H, D = x.shape
        out.append(ws[o: o + x.size].reshape((H, T, D)))
        o += x.size
    nthreads = numba.get_num_threads()
    if ws.nbytes >= PACK_PARALLEL_MIN_BYTES and nthreads > 1 and all(x.dtype == dtype for x in xs):
        pad = 4 - len(xs)  # the unused slots repeat the first array; no task reaches them
        run_tasks(_pack_drain, sum(x.shape[1] for x in xs), tuple(xs) + (xs[0],) * pad + tuple(out) + (out[0],) * pad,
                  nthreads)
    else:
        for x, xh in zip(xs, out):
            np.copyto(xh, np.transpose(x, (1, 0, 2)), casting="unsafe")
    return out


def flash_fwd_cpu(q, k, v, cu_q, cu_k, blk_seq, blk_row, out, lse, lse_a, lse_c, consts, left, right, slopes,
                  dropout_p, seed, thresh, block_k):
    """q (H, Tq, D), k/v (Hk, Tk, D) contiguous (head-major); out (Tq, H, D) contiguous (the caller's layout,
    written row by row); lse flat float32, row i of sequence b and head h at ``cu_q[b] * lse_a + h * lse_c + i``.

    blk_seq/blk_row (nblk,) list the query blocks (sequence, first row); consts from make_consts;
    slopes (B, H) in the compute dtype, or shape (0, 0) for no ALiBi; seed and thresh uint64 (dropout);
    left/right the window (-1 unbounded, causal already folded into right = 0).

    Tasks (query block, head) differ in cost (causal, windows, varlen), so the threads pull them from a
    shared atomic counter in the order of blk_seq/blk_row (heaviest first), in one parallel region (short
    calls) or on this thread plus helper threads (:func:`run_parallel`). Each task writes only its own rows,
    so the result is the same bits whichever thread ran what.
    """
    H, _, D = q.shape
    flops = 4 * D * H * float(np.dot(np.diff(cu_q).astype(np.float64), np.diff(cu_k).astype(np.float64)))
    run_parallel(_fwd_drain, _fwd_parallel, blk_seq.shape[0] * H, flops,
                 (q, k, v, cu_q, cu_k, blk_seq, blk_row, out, lse, lse_a, lse_c, consts, left, right, slopes,
                  dropout_p, seed, thresh, block_k))


def plan_blocks(cu_q, causal_like):
    """Query blocks (sequence, first row) as two int64 arrays, heaviest first when causal."""
    seqs, rows = [], []
    for b in range(len(cu_q) - 1):
        Sq = int(cu_q[b + 1] - cu_q[b])
        for i0 in range(0, Sq, BLOCK_Q):
            seqs.append(b)
            rows.append(i0)
    seqs = np.asarray(seqs, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if causal_like and rows.size:
        order = np.argsort(-rows, kind="stable")
        seqs, rows = seqs[order], rows[order]
    return seqs, rows
