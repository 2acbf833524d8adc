"""FlashAttention-2 backward on CUDA cores (float32 / float64; half precision is widened by the host).

Tiles of 32 keys (lane j of every warp owns key j) and BR query rows (RW = BR / NW rows per warp).
``scores`` recomputes, for one (query tile, key tile) pair, P~ = P with the forward's dropout and the
logit gradient dS = P * (dP~ - D_i) (times the softcap derivative) into shared memory; the kernels
around it only do the sums:

* ``dkdv``: one block per (key tile, k/v head, sequence), walking the query heads of the GQA group and
  the query tiles that see the keys: dV += P~^T dO, dK += dS^T Q in registers (the group sum needs no
  reduction); with ``do_dq`` it also adds dS K into an fp32/fp64 dQ buffer with atomics (fast,
  run-to-run nondeterministic in the last bits).
* ``dq``: one block per (query tile, head, sequence) walking the visible key tiles, dQ += dS K in
  registers: the deterministic dQ pass (``deterministic=True``).
* ``row_dot``: D_i = rowsum(dO * O), the preprocess.
"""
import functools
import math

import numpy as np
from numba import cuda, float32, float64

from numba_kernels.cuda._attn_common import (LN2, LOG2E, col_hash, dev, jit_kernel, key_range, query_range, row_key,
                                             seq_bounds, visible)
from numba_kernels.cuda._flash_fwd_simt import load_kv_tile
from numba_kernels.cuda._intrinsics import ex2


@functools.lru_cache(maxsize=None)
def make_simt_bwd_kernels(NW, BR, DD, f64):
    """(dkdv kernel, dq kernel, threads per block, dynamic shared bytes) for NW warps, BR query rows per tile
    (a multiple of NW) and head dim padded to 32 * DD."""
    RW = BR // NW
    DP = 32 * DD
    KSTR = DP + 1                   # K / V rows at an odd stride: lane j reads row j conflict-free
    NTH = 32 * NW
    CPT = DP // NW                  # dK / dV columns per thread (column warp + NW c of key lane)
    QPT = BR * DP // NTH            # dQ elements per thread in the dq kernel
    ACC2 = 2 * CPT
    ft = float64 if f64 else float32
    Q_OFF = 0
    DO_OFF = BR * DP
    K_OFF = 2 * BR * DP
    V_OFF = K_OFF + 32 * KSTR
    P_OFF = V_OFF + 32 * KSTR
    DS_OFF = P_OFF + BR * 32
    L_OFF = DS_OFF + BR * 32
    DI_OFF = L_OFF + BR
    SMEM = (8 if f64 else 4) * (DI_OFF + BR)
    ZERO = ft(0.0)
    ONE = ft(1.0)
    INF = ft(np.inf)
    C_LOG2E = ft(LOG2E)
    C_LN2 = ft(LN2)

    @dev
    def load_rows(smem, lse, di, q, dout, qs, i0, Sq, h, lse_a, lse_c, tid):
        """Q and dO rows [i0, i0 + BR) of head h into shared (zero-filled), their LSE in log2 units
        (+inf for rows past the end or fully masked: P = 0 there) and D_i."""
        D = q.shape[2]
        for idx in range(tid, BR * DP, NTH):
            r = idx // DP
            d = idx - r * DP
            a = ZERO
            g = ZERO
            if i0 + r < Sq and d < D:
                a = q[qs + i0 + r, h, d]
                g = dout[qs + i0 + r, h, d]
            smem[Q_OFF + idx] = a
            smem[DO_OFF + idx] = g
        for r in range(tid, BR, NTH):
            l2 = INF
            dd = ZERO
            if i0 + r < Sq:
                x = ft(lse[qs * lse_a + h * lse_c + i0 + r])
                if x > -INF:
                    l2 = x * C_LOG2E
                dd = di[h, qs + i0 + r]
            smem[L_OFF + r] = l2
            smem[DI_OFF + r] = dd

    @dev
    def scores(smem, warp, lane, D, b, h, i0, j0, Sk, off, left, right, slope, scale_log2, softcap, cap_in,
               seed, thresh, inv_keep):
        """P~ and dS of the RW rows of this warp x key j0 + lane into shared."""
        col = j0 + lane
        for r in range(RW):
            rl = warp * RW + r
            row = i0 + rl
            s = ZERO
            dp = ZERO
            for d in range(D):
                s += smem[Q_OFF + rl * DP + d] * smem[K_OFF + lane * KSTR + d]
                dp += smem[DO_OFF + rl * DP + d] * smem[V_OFF + lane * KSTR + d]
            g = ONE
            if softcap > 0:
                th = math.tanh(s * cap_in)
                g = ONE - th * th
                x = softcap * th * C_LOG2E
            else:
                x = s * scale_log2
            x -= slope * ft(abs(row + off - col))
            if f64:
                p = math.exp((x - smem[L_OFF + rl]) * C_LN2)
            else:
                p = ex2(x - smem[L_OFF + rl])
            if not visible(row, col, Sk, off, left, right):
                p = ZERO
            pd = p
            if inv_keep > 0:
                if col_hash(row_key(seed, b, h, row), col) >= thresh:
                    pd = p * inv_keep
                    dp = dp * inv_keep
                else:
                    pd = ZERO
                    dp = ZERO
            smem[P_OFF + rl * 32 + lane] = pd
            smem[DS_OFF + rl * 32 + lane] = p * (dp - smem[DI_OFF + rl]) * g

    def dkdv(q, k, v, dout, lse, di, dq_acc, dk, dv, cu_q, cu_k, slopes, scale_log2, softcap, cap_in, scale,
             left, right, lse_a, lse_c, seed, thresh, inv_keep, do_dq):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        qs, Sq, ks, Sk = seq_bounds(cu_q, cu_k, b)
        j0 = cuda.blockIdx.x * 32
        if j0 >= Sk:
            return
        G = q.shape[1] // k.shape[1]
        D = q.shape[2]
        off = Sk - Sq
        smem = cuda.shared.array(0, ft)
        load_kv_tile(smem, K_OFF, V_OFF, KSTR, KSTR, DP, NTH, k, v, ks, j0, Sk, hk, tid, ZERO)
        acc = cuda.local.array(ACC2, ft)
        for c in range(ACC2):
            acc[c] = ZERO
        qlo, qhi = query_range(j0, j0 + 32, Sq, Sk, left, right)
        for h in range(hk * G, hk * G + G):
            slope = ZERO
            if slopes.shape[0] > 0:
                slope = slopes[b, h] * C_LOG2E
            for i0 in range(qlo, qhi, BR):
                cuda.syncthreads()
                load_rows(smem, lse, di, q, dout, qs, i0, Sq, h, lse_a, lse_c, tid)
                cuda.syncthreads()
                scores(smem, warp, lane, D, b, h, i0, j0, Sk, off, left, right, slope, scale_log2, softcap, cap_in,
                       seed, thresh, inv_keep)
                cuda.syncthreads()
                for i in range(BR):
                    pd = smem[P_OFF + i * 32 + lane]
                    ds = smem[DS_OFF + i * 32 + lane]
                    for c in range(CPT):
                        d = warp + NW * c
                        acc[c] += pd * smem[DO_OFF + i * DP + d]
                        acc[CPT + c] += ds * smem[Q_OFF + i * DP + d]
                if do_dq:
                    for idx in range(tid, BR * DP, NTH):
                        rl = idx // DP
                        d = idx - rl * DP
                        if i0 + rl < Sq and d < D:
                            x = ZERO
                            for j in range(32):
                                x += smem[DS_OFF + rl * 32 + j] * smem[K_OFF + j * KSTR + d]
                            cuda.atomic.add(dq_acc, (qs + i0 + rl, h, d), x * scale)
        if j0 + lane < Sk:
            for c in range(CPT):
                d = warp + NW * c
                if d < D:
                    dv[ks + j0 + lane, hk, d] = acc[c]
                    dk[ks + j0 + lane, hk, d] = acc[CPT + c] * scale

    def dq_pass(q, k, v, dout, lse, di, dq, cu_q, cu_k, slopes, scale_log2, softcap, cap_in, scale,
                left, right, lse_a, lse_c, seed, thresh, inv_keep):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        qs, Sq, ks, Sk = seq_bounds(cu_q, cu_k, b)
        i0 = cuda.blockIdx.x * BR
        if i0 >= Sq:
            return
        hk = h // (q.shape[1] // k.shape[1])
        D = q.shape[2]
        off = Sk - Sq
        smem = cuda.shared.array(0, ft)
        slope = ZERO
        if slopes.shape[0] > 0:
            slope = slopes[b, h] * C_LOG2E
        load_rows(smem, lse, di, q, dout, qs, i0, Sq, h, lse_a, lse_c, tid)
        acc = cuda.local.array(QPT, ft)
        for x in range(QPT):
            acc[x] = ZERO
        lo, hi = key_range(i0, i0 + BR, Sq, Sk, left, right)
        for j0 in range((lo // 32) * 32, hi, 32):
            cuda.syncthreads()
            load_kv_tile(smem, K_OFF, V_OFF, KSTR, KSTR, DP, NTH, k, v, ks, j0, Sk, hk, tid, ZERO)
            cuda.syncthreads()
            scores(smem, warp, lane, D, b, h, i0, j0, Sk, off, left, right, slope, scale_log2, softcap, cap_in,
                   seed, thresh, inv_keep)
            cuda.syncthreads()
            for x in range(QPT):
                idx = tid + NTH * x
                rl = idx // DP
                d = idx - rl * DP
                a = acc[x]
                for j in range(32):
                    a += smem[DS_OFF + rl * 32 + j] * smem[K_OFF + j * KSTR + d]
                acc[x] = a
        for x in range(QPT):
            idx = tid + NTH * x
            rl = idx // DP
            d = idx - rl * DP
            if i0 + rl < Sq and d < D:
                dq[qs + i0 + rl, h, d] = acc[x] * scale

    return jit_kernel(dkdv), jit_kernel(dq_pass), NTH, SMEM


@functools.lru_cache(maxsize=None)
def make_row_dot(f64):
    """D_i = rowsum(dO * O): di[h, t] for dout/out (T, H, D), one thread per (t, h)."""
    ft = float64 if f64 else float32

    def row_dot(dout, out, di):
        x = cuda.grid(1)
        T, H, D = dout.shape
        if x < T * H:
            t = x // H
            h = x - t * H
            acc = ft(0.0)
            for d in range(D):
                acc += ft(dout[t, h, d]) * ft(out[t, h, d])
            di[h, t] = acc

    return jit_kernel(row_dot)
