"""Decode attention on the CPU: njit tasks (sequence, key split) pulled from an atomic counter by this thread
and helper threads (``_tasks``).

A task owns all H * Sq query rows of one sequence and a range of its keys, and reads each cache
position's K (and V) rows for all Hk heads at once: Hk * D contiguous values, so the task streams
through memory (a task per k/v head would stride by Hk * D and defeat the hardware prefetcher), and
each K/V value is read once and used G * Sq times (the query heads of its GQA group, every query token).
Rows are read straight from the cache through the page table (a contiguous cache is a paged one with one
page per cache row); float16/bfloat16 caches arrive as uint16 bits and are widened one position at a time
through a lookup table. Per key tile: scores by vectorized dot products (accumulated in the compute
dtype; four positions x four query rows of a GQA group per pass, so 8 loads feed 16 FMAs), an online softmax
in log2 units (one simple loop per step), then O += P V for four rows x four value positions per pass (each V
row is loaded once per four rows, each accumulator row once per four positions). Software prefetch runs
PREFETCH positions ahead in reading order (this tile's K, its V, the next tile's K) through the page table
(page and slot of the tile's positions and of the ones prefetched past it are looked up once per tile),
one hint per cache line, issued after each k/v head's work in a four-position step: spread over the compute,
the hints overlap the DRAM reads with it (one position's 64 hints in a burst stalled the loads behind them;
one thread read 11-14 GB/s from DRAM that way, 19-21 GB/s spread). Decode rows are few, so plain loops
beat BLAS calls here.
Each task writes a partial output and LSE for its key split; the calling thread merges the splits
(:func:`_merge_splits`; :func:`combine_cpu` is the public ``attention_combine``'s merge).
"""
import time

import numpy as np
from numba import prange, types
from numba.extending import overload

from numba_kernels import _masks
from numba_kernels._jit import njit, njit_parallel
from numba_kernels.cpu._math import LN2, LOG2E, atomic_fetch_add, exp2_fast, fmax_fast, prefetch
from numba_kernels.cpu._tasks import run_tasks

BLOCK_K = 64
#: software prefetch distance, in cache positions (each Hk * D values of K or V) ahead of the one in use
PREFETCH = 4

_key_range = njit(_masks.key_range, inline="always")
_row_span = njit(_masks.row_span, inline="always")

#: float32 value of every uint16 bit pattern, per half type (built once, 256 KB each)
LUT = {
    "float16": np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32),
    "bfloat16": (np.arange(65536, dtype=np.uint32) << 16).view(np.float32),
}
NO_LUT = np.zeros(0, dtype=np.float32)
#: the empty ``slopes`` argument (no ALiBi), per compute dtype
NO_SLOPES = {np.dtype(np.float32): np.zeros((0, 0), np.float32), np.dtype(np.float64): np.zeros((0, 0), np.float64)}


def cache_rows(cache, page, slot, buf, lut):  # pragma: no cover - replaced by the overload inside njit code
    return cache[page, slot]


@overload(cache_rows, inline="always")
def _cache_rows_ol(cache, page, slot, buf, lut):
    """Rows ``cache[page, slot, :, :]`` (Hk, D) in the compute dtype: a view for float32/float64 caches;
    uint16 caches (float16/bfloat16 bits) are widened into ``buf`` (Hk, D) through ``lut``, and ``buf`` is returned."""
    if isinstance(cache.dtype, types.Integer):
        def widen(cache, page, slot, buf, lut):
            for h in range(buf.shape[0]):
                for d in range(buf.shape[1]):
                    buf[h, d] = lut[cache[page, slot, h, d]]
            return buf
        return widen
    return lambda cache, page, slot, buf, lut: cache[page, slot]


@njit(inline="always")
def prefetch_head(kc, vc, kbase, vbase, hk):
    """Prefetch the D values of k/v head hk of the positions whose flat bases are in kbase / vbase (-1: none):
    one hint per cache line. Called after each head's work in a four-position step, so the hints are spread
    over the step's compute (a burst of a whole position's hints stalled the loads behind them, and hints
    issued before a head's loads slowed them: 17 -> 21 GB/s on one thread from L3)."""
    D = kc.shape[3]
    step = 64 // kc.itemsize
    for e in range(kbase.shape[0]):
        if kbase[e] >= 0:
            for x in range(0, D, step):
                prefetch(kc, kbase[e] + hk * D + x)
        if vbase[e] >= 0:
            for x in range(0, D, step):
                prefetch(vc, vbase[e] + hk * D + x)


_consts = {}


def make_consts(dtype, scale, softcap):
    """The ``consts`` argument of :func:`decode_cpu`, in the compute dtype (cached: one array per value set,
    never written)."""
    key = (np.dtype(dtype), float(scale), float(softcap))
    c = _consts.get(key)
    if c is None:
        c = np.array([scale * LOG2E, softcap, scale / softcap if softcap > 0 else 0.0, LOG2E, -np.inf, 0.0],
                     dtype=dtype)
        if len(_consts) < 256:
            _consts[key] = c
    return c


@njit
def _split_task(q, kc, vc, lut, table, start, end, nsplit, out_p, lse_p, consts, left, right, slopes, w):
    """Task w of :func:`decode_cpu`: sequence w // nsplit, key split w % nsplit."""
    B, Sq, H, D = q.shape
    page = kc.shape[1]
    Hk = kc.shape[2]
    HD = Hk * D
    G = H // Hk
    M = G * Sq  # rows per k/v head; row r is query token r % Sq of head r // Sq, k/v head r // M
    R = H * Sq
    has_alibi = slopes.shape[0] > 0
    scale_log2, softcap, cap_in, log2e, neg_inf, zero = consts[0], consts[1], consts[2], consts[3], consts[4], consts[5]
    sp = w % nsplit
    b = w // nsplit
    Sk = end[b] - start[b]
    off = Sk - Sq
    lo, hi = _key_range(0, Sq, Sq, Sk, left, right)
    chunk = -(-max(hi - lo, 0) // nsplit)
    chunk = -(-chunk // BLOCK_K) * BLOCK_K
    k0 = lo + sp * chunk
    k1 = min(hi, k0 + chunk)
    qt = np.empty((R, D), dtype=q.dtype)
    sl = np.zeros(R, dtype=q.dtype)
    for r in range(R):
        qt[r] = q[b, r % Sq, r // Sq]
        if has_alibi:
            sl[r] = slopes[b, r // Sq] * log2e
    acc = np.zeros((R, D), dtype=q.dtype)
    mrow = np.full(R, neg_inf, dtype=q.dtype)
    lrow = np.zeros(R, dtype=q.dtype)
    s = np.empty((R, BLOCK_K), dtype=q.dtype)
    pages = np.empty(BLOCK_K + PREFETCH + 4, dtype=np.int64)  # the tile's positions and the ones prefetched past it
    slots = np.empty(BLOCK_K + PREFETCH + 4, dtype=np.int64)
    buf = np.empty((4, Hk, D), dtype=q.dtype)  # widened half-precision rows, one per position in flight
    dist = np.empty(1, dtype=q.dtype)
    pfk = np.empty(4, dtype=np.int64)  # flat bases of the K / V positions to prefetch (-1: none)
    pfv = np.empty(4, dtype=np.int64)
    for j0 in range(k0, k1, BLOCK_K):
        n = min(BLOCK_K, k1 - j0)
        pos0 = start[b] + j0
        pend = start[b] + k1
        nl = min(n + PREFETCH + 4, pend - pos0)
        for c in range(nl):
            p = pos0 + c
            pages[c] = table[b, p // page]
            slots[c] = p % page
        c = 0
        while c + 4 <= n:  # four positions x four rows of a group per pass: 8 loads per 16 FMAs
            for e in range(4):  # the position PREFETCH ahead in reading order: this tile's K, then its V
                t = c + e + PREFETCH
                pfk[e] = (pages[t] * page + slots[t]) * HD if t < n else -1
                pfv[e] = (pages[t - n] * page + slots[t - n]) * HD if n <= t < 2 * n else -1
            k0r = cache_rows(kc, pages[c], slots[c], buf[0], lut)  # (Hk, D)
            k1r = cache_rows(kc, pages[c + 1], slots[c + 1], buf[1], lut)
            k2r = cache_rows(kc, pages[c + 2], slots[c + 2], buf[2], lut)
            k3r = cache_rows(kc, pages[c + 3], slots[c + 3], buf[3], lut)
            for hk in range(Hk):
                r, r_end = hk * M, (hk + 1) * M
                while r + 4 <= r_end:
                    x0 = x1 = x2 = x3 = y0 = y1 = y2 = y3 = zero
                    u0 = u1 = u2 = u3 = w0 = w1 = w2 = w3 = zero
                    for d in range(D):
                        ka, kb, kc_, kd = k0r[hk, d], k1r[hk, d], k2r[hk, d], k3r[hk, d]
                        q0, q1, q2, q3 = qt[r, d], qt[r + 1, d], qt[r + 2, d], qt[r + 3, d]
                        x0 += q0 * ka
                        x1 += q1 * ka
                        x2 += q2 * ka
                        x3 += q3 * ka
                        y0 += q0 * kb
                        y1 += q1 * kb
                        y2 += q2 * kb
                        y3 += q3 * kb
                        u0 += q0 * kc_
                        u1 += q1 * kc_
                        u2 += q2 * kc_
                        u3 += q3 * kc_
                        w0 += q0 * kd
                        w1 += q1 * kd
                        w2 += q2 * kd
                        w3 += q3 * kd
                    s[r, c], s[r + 1, c], s[r + 2, c], s[r + 3, c] = x0, x1, x2, x3
                    s[r, c + 1], s[r + 1, c + 1], s[r + 2, c + 1], s[r + 3, c + 1] = y0, y1, y2, y3
                    s[r, c + 2], s[r + 1, c + 2], s[r + 2, c + 2], s[r + 3, c + 2] = u0, u1, u2, u3
                    s[r, c + 3], s[r + 1, c + 3], s[r + 2, c + 3], s[r + 3, c + 3] = w0, w1, w2, w3
                    r += 4
                while r < r_end:
                    x = y = u = w = zero
                    for d in range(D):
                        x += qt[r, d] * k0r[hk, d]
                        y += qt[r, d] * k1r[hk, d]
                        u += qt[r, d] * k2r[hk, d]
                        w += qt[r, d] * k3r[hk, d]
                    s[r, c], s[r, c + 1], s[r, c + 2], s[r, c + 3] = x, y, u, w
                    r += 1
                prefetch_head(kc, vc, pfk, pfv, hk)
            c += 4
        while c < n:
            krows = cache_rows(kc, pages[c], slots[c], buf[0], lut)  # (Hk, D)
            for hk in range(Hk):
                for r in range(hk * M, (hk + 1) * M):
                    x = zero
                    for d in range(D):
                        x += qt[r, d] * krows[hk, d]
                    s[r, c] = x
            c += 1
        for r in range(R):
            i = r % Sq
            c0, c1 = _row_span(i, off, left, right, j0, n)
            # one simple loop per step, so that each one vectorizes
            if softcap > 0:
                for c in range(n):
                    s[r, c] = softcap * np.tanh(s[r, c] * cap_in) * log2e
            else:
                for c in range(n):
                    s[r, c] *= scale_log2
            if has_alibi:
                for c in range(n):
                    dist[0] = abs(i + off - j0 - c)
                    s[r, c] -= sl[r] * dist[0]
            for c in range(c0):
                s[r, c] = neg_inf
            for c in range(max(c0, c1), n):
                s[r, c] = neg_inf
            mx = neg_inf
            for c in range(n):
                mx = fmax_fast(mx, s[r, c])
            m_new = fmax_fast(mrow[r], mx)
            mu = zero if m_new == neg_inf else m_new
            alpha = exp2_fast(mrow[r] - mu)
            tot = zero
            for c in range(n):
                e = exp2_fast(s[r, c] - mu) if s[r, c] != neg_inf else zero
                s[r, c] = e
                tot += e
            lrow[r] = lrow[r] * alpha + tot
            mrow[r] = m_new
            for d in range(D):
                acc[r, d] *= alpha
        c = 0
        while c + 4 <= n:  # four positions per pass: each accumulator row is loaded and stored once per 4
            for e in range(4):  # the position PREFETCH ahead in reading order: this tile's V, then the next K
                t = c + e + PREFETCH
                pfv[e] = (pages[t] * page + slots[t]) * HD if t < n else -1
                pfk[e] = (pages[t] * page + slots[t]) * HD if n <= t < nl else -1
            v0 = cache_rows(vc, pages[c], slots[c], buf[0], lut)  # (Hk, D)
            v1 = cache_rows(vc, pages[c + 1], slots[c + 1], buf[1], lut)
            v2 = cache_rows(vc, pages[c + 2], slots[c + 2], buf[2], lut)
            v3 = cache_rows(vc, pages[c + 3], slots[c + 3], buf[3], lut)
            for hk in range(Hk):
                r, r_end = hk * M, (hk + 1) * M
                while r + 4 <= r_end:  # four rows x four positions: each V row is loaded once per four rows
                    a0, a1, a2, a3 = s[r, c], s[r, c + 1], s[r, c + 2], s[r, c + 3]
                    b0, b1, b2, b3 = s[r + 1, c], s[r + 1, c + 1], s[r + 1, c + 2], s[r + 1, c + 3]
                    e0, e1, e2, e3 = s[r + 2, c], s[r + 2, c + 1], s[r + 2, c + 2], s[r + 2, c + 3]
                    f0, f1, f2, f3 = s[r + 3, c], s[r + 3, c + 1], s[r + 3, c + 2], s[r + 3, c + 3]
                    for d in range(D):
                        x0, x1, x2, x3 = v0[hk, d], v1[hk, d], v2[hk, d], v3[hk, d]
                        acc[r, d] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                        acc[r + 1, d] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
                        acc[r + 2, d] += e0 * x0 + e1 * x1 + e2 * x2 + e3 * x3
                        acc[r + 3, d] += f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3
                    r += 4
                while r < r_end:
                    p0, p1, p2, p3 = s[r, c], s[r, c + 1], s[r, c + 2], s[r, c + 3]
                    for d in range(D):
                        acc[r, d] += p0 * v0[hk, d] + p1 * v1[hk, d] + p2 * v2[hk, d] + p3 * v3[hk, d]
                    r += 1
                prefetch_head(kc, vc, pfk, pfv, hk)
            c += 4
        while c < n:
            vrows = cache_rows(vc, pages[c], slots[c], buf[0], lut)  # (Hk, D)
            for hk in range(Hk):
                for r in range(hk * M, (hk + 1) * M):
                    pr = s[r, c]
                    if pr != zero:
                        for d in range(D):
                            acc[r, d] += pr * vrows[hk, d]
            c += 1
    for r in range(R):
        i = r % Sq
        h = r // Sq
        inv = zero if lrow[r] == zero else 1 / lrow[r]
        for d in range(D):
            out_p[sp, b, i, h, d] = acc[r, d] * inv
        if lrow[r] > zero:
            lse_p[sp, b, h, i] = (mrow[r] + np.log2(lrow[r])) * LN2
        else:
            lse_p[sp, b, h, i] = -np.inf


@njit
def _drain(counter, ntask, q, kc, vc, lut, table, start, end, nsplit, out_p, lse_p, consts, left, right, slopes):
    """Run tasks from the shared counter until none is left (``_tasks.run_tasks``)."""
    t = atomic_fetch_add(counter, 0, 1)
    while t < ntask:
        _split_task(q, kc, vc, lut, table, start, end, nsplit, out_p, lse_p, consts, left, right, slopes, t)
        atomic_fetch_add(counter, 1, 1)
        t = atomic_fetch_add(counter, 0, 1)


@njit(inline="always")
def _merge_row(op, lp, o):
    """Merge one row's S partials op (S, D), lp (S,) natural-log LSEs into o (D,); return the merged LSE.
    float64 weights; splits with LSE -inf carry no weight; a row where every split is -inf is 0 with LSE -inf."""
    S, D = op.shape
    m = -np.inf
    for s in range(S):
        m = max(m, lp[s])
    for d in range(D):
        o[d] = 0
    if m == -np.inf:
        return -np.inf
    tot = 0.0
    for s in range(S):
        if lp[s] == -np.inf:
            continue
        wgt = np.exp(np.float64(lp[s]) - m)
        tot += wgt
        for d in range(D):
            o[d] += wgt * op[s, d]
    inv = 1.0 / tot
    for d in range(D):
        o[d] *= inv
    return m + np.log(tot)


@njit
def _merge_splits(out_p, lse_p, out, lse):
    """Merge the nsplit partials out_p (nsplit, B, Sq, H, D), lse_p (nsplit, B, H, Sq) (natural log) into
    out (B, Sq, H, D), lse (B, H, Sq) (:func:`_merge_row`, as :func:`combine_cpu`). Serial: decode merges are a
    few thousand values, and a second parallel region would wait for a descheduled thread again."""
    _, B, Sq, H, _ = out_p.shape
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                lse[b, h, i] = _merge_row(out_p[:, b, i, h], lse_p[:, b, h, i], out[b, i, h])


@njit_parallel
def _decode_parallel(q, kc, vc, lut, table, start, end, nsplit, out_p, lse_p, consts, left, right, slopes, out, lse):
    """The same tasks in one parallel region (OpenMP threads, pulled from a counter), then the split merge
    on this thread."""
    ntask = q.shape[0] * nsplit
    counter = np.zeros(2, dtype=np.int64)
    for _ in prange(ntask):
        _drain(counter, ntask, q, kc, vc, lut, table, start, end, nsplit, out_p, lse_p, consts, left, right, slopes)
    if nsplit > 1:
        _merge_splits(out_p, lse_p, out, lse)


#: calls reading fewer K/V bytes than this (about 2 ms on one core) use the parallel region: its threads are
#: usually still spinning from the previous call, while a helper thread has to be woken (about 0.5 ms);
#: longer calls use ``run_tasks``, which never waits for a thread another process keeps off its core
PARALLEL_REGION_MAX_BYTES = 16 << 20
#: a parallel-region call slower than REGION_STALL_S + its K/V bytes / REGION_STALL_RATE waited for a thread
#: that another process kept off its core (its barrier waits a scheduler slice: B 1 / 1k took 12-16 ms
#: instead of 0.2-0.3 ms while another job kept one of 2 cores busy); the calls of the next
#: REGION_BACKOFF_S seconds then use ``run_tasks`` (0.5 ms there), after which the region is tried again
REGION_STALL_S = 2e-3
REGION_STALL_RATE = 2e9
REGION_BACKOFF_S = 1.0
_region_backoff_until = [0.0]  # time.monotonic() before which short calls use run_tasks


def decode_cpu(q, kc, vc, lut, table, start, end, nsplit, out_p, lse_p, consts, left, right, slopes, out, lse,
               nthreads=None):
    """Split-KV decode attention.

    q (B, Sq, H, D) compute dtype; kc/vc (num_pages, page, Hk, D), compute dtype or uint16 bits with ``lut``;
    table (B, max_pages) integer: logical position p of sequence b is row ``p % page`` of page
    ``table[b, p // page]``; the keys of sequence b are positions [start[b], end[b]).
    out_p (nsplit, B, Sq, H, D) and lse_p (nsplit, B, H, Sq), compute dtype, receive each split's
    normalized output and natural-log LSE (-inf and 0 for a split that sees no key); with nsplit > 1 the
    splits are merged into out (B, Sq, H, D) and lse (B, H, Sq) (with nsplit 1, pass out_p[0] and lse_p[0]).
    consts = [softmax_scale * log2(e), softcap, scale / softcap, log2(e), -inf, 0] in the compute dtype
    (:func:`make_consts`; softcap > 0 turns on ``softcap * tanh(s * scale / softcap)``);
    slopes (B, H) ALiBi slopes in the compute dtype, or an empty array.
    The (sequence, split) tasks run on this thread and helper threads (``_tasks.run_tasks``: a short call
    does not wait for a thread that another process keeps off its core); nthreads defaults to
    ``numba.get_num_threads()``. Calls under PARALLEL_REGION_MAX_BYTES use one OpenMP region instead, unless
    one stalled in the last REGION_BACKOFF_S seconds.
    """
    import numba

    args = (q, kc, vc, lut, table, start, end, nsplit, out_p, lse_p, consts, left, right, slopes)
    kv_bytes = 2 * int(np.sum(end - start)) * kc.shape[2] * kc.shape[3] * kc.itemsize
    if nthreads is None and kv_bytes < PARALLEL_REGION_MAX_BYTES and time.monotonic() >= _region_backoff_until[0]:
        nsig = len(_decode_parallel.overloads)
        t0 = time.perf_counter()
        _decode_parallel(*args, out, lse)
        slow = time.perf_counter() - t0 > REGION_STALL_S + kv_bytes / REGION_STALL_RATE
        if slow and len(_decode_parallel.overloads) == nsig:  # (a call that compiled or loaded a kernel is slow)
            _region_backoff_until[0] = time.monotonic() + REGION_BACKOFF_S
    else:
        run_tasks(_drain, q.shape[0] * nsplit, args, nthreads or numba.get_num_threads())
        if nsplit > 1:
            _merge_splits(out_p, lse_p, out, lse)


def _combine(out_p, lse_p, out, lse):
    """Merge S partial results: out_p (S, N, D), lse_p (S, N) natural-log -> out (N, D), lse (N,) (lse_p's dtype)
    (:func:`_merge_row`)."""
    for x in prange(out_p.shape[1]):
        lse[x] = _merge_row(out_p[:, x], lse_p[:, x], out[x])


_combine_serial = njit(_combine)
_combine_parallel = njit_parallel(_combine, cache=False)  # one on-disk cache entry per function: the serial one
#: below this many partial values (S * N * D) the merge runs on one thread (no parallel-region wake-up)
COMBINE_SERIAL_MAX = 1 << 20


def combine_cpu(out_p, lse_p, out, lse):
    """Merge S partial results: out_p (S, N, D), lse_p (S, N) natural-log -> out (N, D), lse (N,) (lse_p's dtype).
    Splits with LSE -inf carry no weight; if every split is -inf the row is 0 with LSE -inf."""
    (_combine_serial if out_p.size <= COMBINE_SERIAL_MAX else _combine_parallel)(out_p, lse_p, out, lse)
