"""FlashAttention-2 forward on tensor cores (float16 / bfloat16 in, fp32 accumulate).

Block = NW warps; warp w owns MT m-tiles of 16 query rows (MT = 1 or 2). With MT = 2 every K / V
fragment read from shared memory feeds twice the mma (shared-memory bandwidth limits MT = 1). The
per-m-tile stages are inline device functions called once per m-tile (not a loop), so that all
fragment indices are compile-time constants and the accumulators stay in registers.
Per key tile of BC keys:

  S = Q K^T   mma.sync m16n8k16, A = Q by ldmatrix, B = K by ldmatrix (K rows are B's columns)
  softmax     online, in log2 units, on the S accumulators in registers (4 lanes share a row)
  O += P V    A = P packed straight from the S accumulators (their layout is the A layout),
              B = V by ldmatrix.trans (V stays row-major in shared memory)

Q, K, V tiles travel global -> shared by 16-byte cp.async (zero-filled out of range); K/V are
double-buffered so the next tile streams in while this one computes. Shared rows are padded by 16 bytes
so the 8 rows of an ldmatrix phase land on distinct banks. Inputs are uint32 words holding two halves.
"""
import functools
import math

from numba import cuda, float32, uint32

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._attn_common import (F32_LN2, F32_LOG2E, F32_NEG_INF, F32_ZERO, LAZY_LOG2, dev,
                                             jit_kernel, key_range, lane_ids, make_online_softmax, make_row_loader,
                                             make_tc_helpers, row_key, seq_bounds)
from numba_kernels.cuda._intrinsics import shfl_xor


@functools.lru_cache(maxsize=None)
def make_tc_kernel(NW, MT, BC, DP, bf16, HAS_CAP, HAS_ALIBI, HAS_DROP, ROWLOAD=False, LAZY=False, ROWBOUNDS=False):
    """Kernel for NW warps x MT x 16 rows, BC keys per tile, head dim padded to DP (a multiple of 16).
    ROWLOAD: Q / K / V tiles through ``make_row_loader`` (each thread one fixed chunk column, a compile-time trip
    count: ~10 instructions per 16-byte copy instead of ~47 for the generic loop of 64-bit divisions; the
    backward's loader; the default, ``flash_attention.TC_ROWLOAD``); LAZY: the online softmax's lazy rescale
    (``make_online_softmax``: O and l rescaled only when a row's max passes the running max by more than 2^8, a
    warp vote; the decode kernel's LEAN bit 4; measured, not faster); ROWBOUNDS: tiles that need a mask compare
    each element's constant column offset with per-row bounds in 32 bits (``make_online_softmax``) instead of the
    64-bit ``visible`` per element: the masked scale-and-max region of one m-tile 383-595 -> 277 SASS
    instructions at D 64 (local ptxas; unmasked tiles already take a 64-instruction mask-free region, ptxas
    unswitches the run-time flag). Not yet timed.
    Returns (kernel, rows per block, threads per block, dynamic shared bytes)."""
    assert MT in (1, 2)
    BR = 16 * MT * NW
    STR = DP // 2 + 4                    # shared row stride in uint32 words (Q, K and V rows)
    NT_S, KS_D, KS_P, NT_O = BC // 8, DP // 16, BC // 16, DP // 8
    O_LEN, S_LEN = NT_O * 4, NT_S * 4    # accumulators per m-tile per thread
    OA, SA = MT * O_LEN, MT * S_LEN      # local.array sizes (compile-time constants)
    NTH = 32 * NW
    CH = DP // 8                         # 16-byte chunks per padded row
    KV_OFF = BR * STR                    # Q at 0; stage s: K at KV_OFF + 2 s TILE, V right after it
    TILE = BC * STR
    SMEM = 4 * (KV_OFF + 4 * TILE)
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2
    ldsm, ldsm_t = intr.ldsm_x4_o, intr.ldsm_x4_t_o  # kept after the cp.async waits
    mma_acc, _, pack_a = make_tc_helpers(bf16, STR, CH, NTH)
    load_q = make_row_loader(BR, STR, CH, NTH, not ROWLOAD)
    load_kv = make_row_loader(BC, STR, CH, NTH, not ROWLOAD)

    @dev
    def first_tiles(smem, q, k, v, qs, i0, Sq, ks, lo, hi, Sk, h, hk, tid):
        """cp.async of the block's Q rows and its first K / V tile (one commit group)."""
        load_q(smem, 0, q, qs + i0, Sq - i0, h, tid)
        if lo < hi:
            load_kv(smem, KV_OFF, k, ks + lo, Sk - lo, hk, tid)
            load_kv(smem, KV_OFF + TILE, v, ks + lo, Sk - lo, hk, tid)
        intr.cp_async_commit()

    @dev
    def next_tile(smem, nxt, k, v, row0, nvalid, hk, tid, more):
        """Start copying the next K / V tile (rows row0.., nvalid real) into nxt when ``more``; wait for the
        current one."""
        if more:
            load_kv(smem, nxt, k, row0, nvalid, hk, tid)
            load_kv(smem, nxt + TILE, v, row0, nvalid, hk, tid)
            intr.cp_async_commit()
            intr.cp_async_wait1()
        else:
            intr.cp_async_wait0()

    softmax_tile = make_online_softmax(S_LEN, NT_O, HAS_CAP, HAS_ALIBI, HAS_DROP, LAZY_LOG2 if LAZY else 0.0,
                                       ROWBOUNDS)

    @dev
    def write_rows(o, lse, oacc, ob, m_a, m_b, l_a, l_b, ra, rb, qs, Sq, h, t, DW0, lse_a, lse_c):
        """Normalize one m-tile's O accumulators and store O (packed halves) and the LSE of rows ra, rb."""
        l_a += shfl_xor(l_a, 1)
        l_a += shfl_xor(l_a, 2)
        l_b += shfl_xor(l_b, 1)
        l_b += shfl_xor(l_b, 2)
        inv_a = F32_ZERO if l_a == F32_ZERO else float32(1.0) / l_a
        inv_b = F32_ZERO if l_b == F32_ZERO else float32(1.0) / l_b
        for nt in range(NT_O):
            w = nt * 4 + t
            if w < DW0:
                if ra < Sq:
                    o[qs + ra, h, w] = pack(oacc[ob + nt * 4] * inv_a, oacc[ob + nt * 4 + 1] * inv_a)
                if rb < Sq:
                    o[qs + rb, h, w] = pack(oacc[ob + nt * 4 + 2] * inv_b, oacc[ob + nt * 4 + 3] * inv_b)
        if t == 0:
            base = qs * lse_a + h * lse_c
            if ra < Sq:
                mu = F32_ZERO if m_a == F32_NEG_INF else m_a
                lse[base + ra] = (mu + math.log2(l_a)) * F32_LN2 if l_a > F32_ZERO else F32_NEG_INF
            if rb < Sq:
                mu = F32_ZERO if m_b == F32_NEG_INF else m_b
                lse[base + rb] = (mu + math.log2(l_b)) * F32_LN2 if l_b > F32_ZERO else F32_NEG_INF

    def kernel(q, k, v, o, lse, cu_q, cu_k, slopes, scale_log2, softcap, cap_in, left, right,
               lse_a, lse_c, seed, thresh, inv_keep):
        tid = cuda.threadIdx.x
        warp, lane, g, t = lane_ids(tid)
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        qs, Sq, ks, Sk = seq_bounds(cu_q, cu_k, b)
        qb = (Sq + BR - 1) // BR - 1 - cuda.blockIdx.x  # last (heaviest when causal) blocks first
        if qb < 0:
            return
        i0 = qb * BR
        hk = h // (q.shape[1] // k.shape[1])
        DW0 = q.shape[2]
        off = Sk - Sq
        smem = cuda.shared.array(0, uint32)
        lo, hi = key_range(i0, i0 + BR, Sq, Sk, left, right)
        lo = (lo // BC) * BC
        first_tiles(smem, q, k, v, qs, i0, Sq, ks, lo, hi, Sk, h, hk, tid)
        # per-lane ldmatrix row starts (words): matrix m = lane // 8 supplies row lane % 8
        mrow = lane & 7
        q_lane = (warp * 16 * MT + mrow + 8 * ((lane >> 3) & 1)) * STR + 4 * (lane >> 4)
        k_lane = (mrow + 8 * (lane >> 4)) * STR + 4 * ((lane >> 3) & 1)
        v_lane = TILE + (mrow + 8 * ((lane >> 3) & 1)) * STR + 4 * (lane >> 4)
        # rows of this thread (local to the sequence): m-tile 0 -> ra0, rb0; m-tile 1 -> ra1, rb1
        ra0 = i0 + warp * 16 * MT + g
        rb0 = ra0 + 8
        ra1 = ra0 + 16
        rb1 = ra0 + 24
        m_a0 = F32_NEG_INF
        m_b0 = F32_NEG_INF
        l_a0 = F32_ZERO
        l_b0 = F32_ZERO
        m_a1 = F32_NEG_INF
        m_b1 = F32_NEG_INF
        l_a1 = F32_ZERO
        l_b1 = F32_ZERO
        slope = F32_ZERO
        if HAS_ALIBI:
            slope = slopes[b, h] * F32_LOG2E
        rk_a0 = row_key(seed, b, h, ra0)
        rk_b0 = row_key(seed, b, h, rb0)
        rk_a1 = row_key(seed, b, h, ra1)
        rk_b1 = row_key(seed, b, h, rb1)
        oacc = cuda.local.array(OA, float32)
        for x in range(OA):
            oacc[x] = F32_ZERO
        sacc = cuda.local.array(SA, float32)
        stage = 0
        for j0 in range(lo, hi, BC):
            kv0 = KV_OFF + stage * 2 * TILE
            # prefetch the next K/V tile into the other stage, wait for this one
            next_tile(smem, KV_OFF + (1 - stage) * 2 * TILE, k, v, ks + j0 + BC, Sk - j0 - BC, hk, tid, j0 + BC < hi)
            cuda.syncthreads()
            # ---- S = Q K^T: each K fragment feeds both m-tiles
            for x in range(SA):
                sacc[x] = F32_ZERO
            for kk in range(KS_D):
                a0, a1, a2, a3 = ldsm(smem, q_lane + kk * 8)
                if MT == 2:
                    c0, c1, c2, c3 = ldsm(smem, q_lane + 16 * STR + kk * 8)
                for np2 in range(NT_S // 2):
                    b0, b1, b2, b3 = ldsm(smem, kv0 + k_lane + np2 * 16 * STR + kk * 8)
                    mma_acc(sacc, np2 * 8, a0, a1, a2, a3, b0, b1)
                    mma_acc(sacc, np2 * 8 + 4, a0, a1, a2, a3, b2, b3)
                    if MT == 2:
                        mma_acc(sacc, S_LEN + np2 * 8, c0, c1, c2, c3, b0, b1)
                        mma_acc(sacc, S_LEN + np2 * 8 + 4, c0, c1, c2, c3, b2, b3)
            # ---- online softmax per m-tile
            need_mask = j0 + BC > Sk
            if left >= 0:
                need_mask = need_mask or j0 < i0 + BR - 1 + off - left
            if right >= 0:
                need_mask = need_mask or j0 + BC - 1 > i0 + off + right
            m_a0, m_b0, l_a0, l_b0 = softmax_tile(sacc, 0, oacc, 0, m_a0, m_b0, l_a0, l_b0, ra0, rb0, rk_a0, rk_b0,
                                                  j0, t, need_mask, Sk, off, left, right, slope, slope,
                                                  scale_log2, softcap, cap_in, thresh, inv_keep)
            if MT == 2:
                m_a1, m_b1, l_a1, l_b1 = softmax_tile(sacc, S_LEN, oacc, O_LEN, m_a1, m_b1, l_a1, l_b1, ra1, rb1,
                                                      rk_a1, rk_b1, j0, t, need_mask, Sk, off, left, right, slope,
                                                      slope, scale_log2, softcap, cap_in, thresh, inv_keep)
            # ---- O += P V: P straight from the S accumulators, each V fragment feeds both m-tiles
            for kk in range(KS_P):
                s0 = 8 * kk
                a0, a1, a2, a3 = pack_a(sacc, s0)
                if MT == 2:
                    c0, c1, c2, c3 = pack_a(sacc, S_LEN + s0)
                for np2 in range(NT_O // 2):
                    b0, b1, b2, b3 = ldsm_t(smem, kv0 + v_lane + kk * 16 * STR + np2 * 8)
                    mma_acc(oacc, np2 * 8, a0, a1, a2, a3, b0, b1)
                    mma_acc(oacc, np2 * 8 + 4, a0, a1, a2, a3, b2, b3)
                    if MT == 2:
                        mma_acc(oacc, O_LEN + np2 * 8, c0, c1, c2, c3, b0, b1)
                        mma_acc(oacc, O_LEN + np2 * 8 + 4, c0, c1, c2, c3, b2, b3)
            stage = 1 - stage
            cuda.syncthreads()  # every warp is done with this stage before it is refilled
        intr.cp_async_wait0()
        write_rows(o, lse, oacc, 0, m_a0, m_b0, l_a0, l_b0, ra0, rb0, qs, Sq, h, t, DW0, lse_a, lse_c)
        if MT == 2:
            write_rows(o, lse, oacc, O_LEN, m_a1, m_b1, l_a1, l_b1, ra1, rb1, qs, Sq, h, t, DW0, lse_a, lse_c)

    return jit_kernel(kernel), BR, NTH, SMEM
