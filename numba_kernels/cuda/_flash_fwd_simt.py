"""FlashAttention forward on CUDA cores (float32 / float64): lane j of a warp scores key j of a 32-key tile,
the warp reduces max and sum with shuffles, then each lane accumulates D / 32 output columns for the
warp's RW rows. K/V tiles sit in shared memory (K rows padded to an odd stride: conflict-free column reads).
"""
import functools
import math

import numpy as np
from numba import cuda, float32, float64

from numba_kernels.cuda._attn_common import (LN2, LOG2E, col_hash, dev, jit_kernel, key_range, row_key, seq_bounds,
                                             visible)
from numba_kernels.cuda._intrinsics import ex2, shfl_xor, syncwarp


@dev
def load_kv_tile(smem, k_off, v_off, kstr, vstr, dp, nth, k, v, ks, j0, Sk, hk, tid, zero):
    """Rows [j0, j0 + 32) of k / v head hk (dp columns, zero-filled past the ends) into shared memory at
    k_off / v_off with row strides kstr / vstr; nth threads share the copy."""
    D = k.shape[2]
    for idx in range(tid, 32 * dp, nth):
        r = idx // dp
        d = idx - r * dp
        kv = zero
        vv = zero
        if j0 + r < Sk and d < D:
            kv = k[ks + j0 + r, hk, d]
            vv = v[ks + j0 + r, hk, d]
        smem[k_off + r * kstr + d] = kv
        smem[v_off + r * vstr + d] = vv


@functools.lru_cache(maxsize=None)
def make_simt_kernel(NW, RW, DD, f64):
    """CUDA-core kernel: NW warps x RW rows, 32 keys per tile (one per lane), D padded to 32*DD."""
    BR = NW * RW
    DP = 32 * DD
    KSTR = DP + 1  # lane j reads row j of K: an odd stride keeps the 32 lanes on 32 banks
    NTH = 32 * NW
    ft = float64 if f64 else float32
    ACC_LEN = RW * DD
    itemsize = 8 if f64 else 4
    Q_OFF, K_OFF, V_OFF, P_OFF = 0, BR * DP, BR * DP + 32 * KSTR, BR * DP + 32 * KSTR + 32 * DP
    SMEM = itemsize * (P_OFF + NTH)
    NEG_INF = ft(-np.inf)
    ZERO = ft(0.0)
    C_LOG2E = ft(LOG2E)
    C_LN2 = ft(LN2)

    def kernel(q, k, v, o, lse, cu_q, cu_k, slopes, scale_log2, softcap, cap_in, left, right,
               lse_a, lse_c, seed, thresh, inv_keep):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        qs, Sq, ks, Sk = seq_bounds(cu_q, cu_k, b)
        qb = (Sq + BR - 1) // BR - 1 - cuda.blockIdx.x
        if qb < 0:
            return
        i0 = qb * BR
        H = q.shape[1]
        hk = h // (H // k.shape[1])
        D = q.shape[2]
        off = Sk - Sq
        smem = cuda.shared.array(0, ft)
        Qs = smem[Q_OFF:K_OFF]
        Ks = smem[K_OFF:V_OFF]
        Vs = smem[V_OFF:P_OFF]
        Ps = smem[P_OFF:]
        for idx in range(tid, BR * DP, NTH):
            r = idx // DP
            d = idx - r * DP
            val = ZERO
            if i0 + r < Sq and d < D:
                val = q[qs + i0 + r, h, d]
            Qs[idx] = val
        lo, hi = key_range(i0, i0 + BR, Sq, Sk, left, right)
        lo = (lo // 32) * 32
        slope = ZERO
        if slopes.shape[0] > 0:
            slope = slopes[b, h] * C_LOG2E
        mrow = cuda.local.array(RW, ft)
        lrow = cuda.local.array(RW, ft)
        acc = cuda.local.array(ACC_LEN, ft)
        for r in range(RW):
            mrow[r] = NEG_INF
            lrow[r] = ZERO
        for x in range(RW * DD):
            acc[x] = ZERO
        for j0 in range(lo, hi, 32):
            cuda.syncthreads()
            load_kv_tile(smem, K_OFF, V_OFF, KSTR, DP, DP, NTH, k, v, ks, j0, Sk, hk, tid, ZERO)
            cuda.syncthreads()
            col = j0 + lane
            for r in range(RW):
                rl = warp * RW + r
                row = i0 + rl
                s = ZERO
                for d in range(D):
                    s += Qs[rl * DP + d] * Ks[lane * KSTR + d]
                if softcap > 0:
                    s = softcap * math.tanh(s * cap_in) * C_LOG2E
                else:
                    s = s * scale_log2
                if slopes.shape[0] > 0:
                    s -= slope * ft(abs(row + off - col))
                if not visible(row, col, Sk, off, left, right):
                    s = NEG_INF
                mx = s
                for sh in (16, 8, 4, 2, 1):
                    mx = max(mx, shfl_xor(mx, sh))
                mn = max(mrow[r], mx)
                mu = ZERO if mn == NEG_INF else mn
                if f64:
                    p = math.exp((s - mu) * C_LN2)
                    alpha = math.exp((mrow[r] - mu) * C_LN2)
                else:
                    p = ex2(s - mu)
                    alpha = ex2(mrow[r] - mu)
                mrow[r] = mn
                lrow[r] = lrow[r] * alpha + p  # lane-partial sum, reduced at the end
                if inv_keep > 0:
                    p = p * inv_keep if col_hash(row_key(seed, b, h, row), col) >= thresh else ZERO
                Ps[tid] = p
                syncwarp()
                for dd in range(DD):
                    acc[r * DD + dd] *= alpha
                for jj in range(32):
                    pj = Ps[warp * 32 + jj]
                    for dd in range(DD):
                        acc[r * DD + dd] += pj * Vs[jj * DP + dd * 32 + lane]
                syncwarp()
        for r in range(RW):
            row = i0 + warp * RW + r
            lsum = lrow[r]
            for sh in (16, 8, 4, 2, 1):
                lsum += shfl_xor(lsum, sh)
            if row < Sq:
                inv = ZERO if lsum == ZERO else ft(1.0) / lsum
                for dd in range(DD):
                    d = dd * 32 + lane
                    if d < D:
                        o[qs + row, h, d] = acc[r * DD + dd] * inv
                if lane == 0:
                    mu = ZERO if mrow[r] == NEG_INF else mrow[r]
                    lse[qs * lse_a + h * lse_c + row] = (mu + math.log2(lsum)) * C_LN2 if lsum > ZERO else NEG_INF

    return jit_kernel(kernel), BR, NTH, SMEM
