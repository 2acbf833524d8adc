"""FlashAttention forward on the CPU: njit, parallel over (query head, query block).

Each task owns one block of BQ query rows of one head of one sequence and walks the visible key
blocks with an online softmax (running max m, running sum l, rescaled accumulator), so memory is
O(BQ * (BK + D)) per task and the S x S matrix never exists. The two tile products go to BLAS
(np.dot on contiguous tiles); everything in between is a vectorizable loop in log2 units.

Layout here is head-major and packed: q (H, total_q, D), k/v (Hk, total_k, D) with cu_seqlens,
so batched and varlen calls share one kernel.
"""
import numpy as np
from numba import prange

from numba_kernels._dropout import build_hash
from numba_kernels._jit import njit, njit_parallel
from numba_kernels.cpu._math import LN2, LOG2E, exp2_fast

BLOCK_Q = 128
BLOCK_K = 256

row_key, col_hash = build_hash(lambda f: njit(f, inline="always"))


@njit(inline="always")
def _key_range(i0, i1, Sq, Sk, left, right):
    """Visible key range [lo, hi) for query rows [i0, i1) of one sequence."""
    off = Sk - Sq
    lo = 0
    hi = Sk
    if left >= 0:
        lo = max(0, i0 + off - left)
    if right >= 0:
        hi = min(Sk, i1 - 1 + off + right + 1)
    return lo, hi


# indices into the ``consts`` array: scalars carried in the compute dtype so that no float32
# loop is promoted to float64 by a Python float constant
C_SCALE_LOG2, C_CAP, C_CAP_IN, C_LOG2E, C_INV_KEEP, C_NEG_INF, C_ZERO = range(7)


def make_consts(dtype, scale, softcap, dropout_p):
    cap_in = scale / softcap if softcap > 0 else 0.0
    return np.array([scale * LOG2E, softcap, cap_in, LOG2E, 1.0 / (1.0 - dropout_p), -np.inf, 0.0],
                    dtype=dtype)


@njit_parallel
def flash_fwd_cpu(q, k, v, cu_q, cu_k, blk_seq, blk_row, out, lse, lse_a, lse_c, consts, left, right, slopes,
                  dropout_p, seed, thresh, block_k):
    """q (H, Tq, D), k/v (Hk, Tk, D) contiguous; out (H, Tq, D); lse flat float32, row i of sequence b
    and head h at ``cu_q[b] * lse_a + h * lse_c + i``.

    blk_seq/blk_row (nblk,) list the query blocks (sequence, first row); consts from make_consts;
    slopes (B, H) in the compute dtype, or shape (0, 0) for no ALiBi; seed and thresh uint64 (dropout);
    left/right the window (-1 unbounded, causal already folded into right = 0).
    """
    H, _, D = q.shape
    Hk = k.shape[0]
    group = H // Hk
    nblk = blk_seq.shape[0]
    has_alibi = slopes.shape[0] > 0
    softcap = consts[C_CAP]
    for t in prange(nblk * H):
        blk = t // H
        h = t - blk * H
        hk = h // group
        b = blk_seq[blk]
        i0 = blk_row[blk]
        qs = cu_q[b]
        ks = cu_k[b]
        Sq = cu_q[b + 1] - qs
        Sk = cu_k[b + 1] - ks
        m = min(BLOCK_Q, Sq - i0)
        qt = q[h, qs + i0: qs + i0 + m]  # (m, D)
        acc = np.zeros((m, D), dtype=q.dtype)
        tmp = np.empty((m, D), dtype=q.dtype)
        sbuf = np.empty(m * block_k, dtype=q.dtype)
        fbuf = np.empty(1, dtype=q.dtype)  # int -> compute-dtype conversions
        mrow = np.full(m, consts[C_NEG_INF])
        lrow = np.zeros(m, dtype=q.dtype)
        lo, hi = _key_range(i0, i0 + m, Sq, Sk, left, right)
        lo = (lo // block_k) * block_k
        off = Sk - Sq
        slope = consts[C_ZERO]
        if has_alibi:
            slope = slopes[b, h] * consts[C_LOG2E]
        for j0 in range(lo, hi, block_k):
            n = min(block_k, hi - j0)
            kt = k[hk, ks + j0: ks + j0 + n]  # (n, D)
            vt = v[hk, ks + j0: ks + j0 + n]
            s = sbuf[: m * n].reshape((m, n))
            np.dot(qt, kt.T, s)  # (m, n) raw scores q . k
            for r in range(m):
                i = i0 + r
                # visible columns of this row inside the block: [c0, c1)
                c0 = 0
                c1 = n
                if left >= 0:
                    c0 = min(n, max(0, i + off - left - j0))
                if right >= 0:
                    c1 = max(0, min(n, i + off + right + 1 - j0))
                row = s[r]
                if c1 <= c0:  # the whole row is masked in this block: it adds nothing
                    for c in range(n):
                        row[c] = consts[C_ZERO]
                    continue
                if softcap > 0:
                    for c in range(c0, c1):
                        row[c] = softcap * np.tanh(row[c] * consts[C_CAP_IN]) * consts[C_LOG2E]
                else:
                    for c in range(c0, c1):
                        row[c] = row[c] * consts[C_SCALE_LOG2]
                if has_alibi:
                    fbuf[0] = i + off - j0  # distance to column c is |fbuf[0] - c|
                    base = fbuf[0]
                    for c in range(c0, c1):
                        fbuf[0] = c
                        row[c] -= slope * abs(base - fbuf[0])
                mx = consts[C_NEG_INF]
                for c in range(c0, c1):
                    mx = max(mx, row[c])
                m_new = max(mrow[r], mx)
                alpha = exp2_fast(mrow[r] - m_new)
                ssum = consts[C_ZERO]
                for c in range(c0, c1):
                    p = exp2_fast(row[c] - m_new)
                    row[c] = p
                    ssum += p
                for c in range(c0):
                    row[c] = consts[C_ZERO]
                for c in range(c1, n):
                    row[c] = consts[C_ZERO]
                lrow[r] = lrow[r] * alpha + ssum
                mrow[r] = m_new
                if dropout_p > 0:
                    rk = row_key(seed, b, h, i)
                    for c in range(c0, c1):
                        if col_hash(rk, j0 + c) >= thresh:
                            row[c] *= consts[C_INV_KEEP]
                        else:
                            row[c] = consts[C_ZERO]
                a = acc[r]
                for d in range(D):
                    a[d] *= alpha
            np.dot(s, vt, tmp)
            acc += tmp
        lse0 = qs * lse_a + h * lse_c + i0
        for r in range(m):
            lr = lrow[r]
            if lr > 0:
                inv = 1.0 / lr
                lse[lse0 + r] = (mrow[r] + np.log2(lr)) * LN2
                for d in range(D):
                    out[h, qs + i0 + r, d] = acc[r, d] * inv
            else:
                lse[lse0 + r] = -np.inf
                for d in range(D):
                    out[h, qs + i0 + r, d] = 0.0


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
