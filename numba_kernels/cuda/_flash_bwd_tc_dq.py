"""FlashAttention-2 backward on tensor cores, the query-side kernels: the deterministic dQ pass (one block per
(query tile of 16 NW rows, head, sequence), warp w owns 16 rows: the forward's data path with dP and dS in place
of the softmax, S = Q K^T, dP = dO V^T, dQ += dS K) and the word kernels around the launches (D_i = rowsum(dO O),
the fp32 dQ buffer to packed halves). Helpers and the dK/dV kernel: ``_flash_bwd_tc``."""
import functools

from numba import cuda, float32, uint32, uint64

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._attn_common import (F32_LOG2E, F32_ZERO, dev, jit_kernel, key_range, lane_ids,
                                             make_row_loader, make_tc_helpers, row_key, seq_bounds)
from numba_kernels.cuda._flash_bwd_tc import (_lanes, _rel_bounds, _row_stats, _tile_hidden, _tile_needs_mask,
                                              make_grad_elem)


@functools.lru_cache(maxsize=None)
def make_dq_elementwise(BC, HAS_CAP, HAS_ALIBI, HAS_DROP):
    """elementwise(sacc, pacc, rel0, l2a, l2b, dia, dib, rka, rkb, j0, t, mask, lo, hi, slope, scale_log2, softcap,
    cap_in, thresh, inv_keep) of the dQ kernels: dS -> pacc over one warp's BC / 2 accumulators of S / dP (rows
    are query rows ra / rb, columns keys j0 + ...)."""
    S_LEN = BC // 2
    grad_elem = make_grad_elem(HAS_CAP, HAS_ALIBI, HAS_DROP)

    @dev
    def elementwise(sacc, pacc, rel0, l2a, l2b, dia, dib, rka, rkb, j0, t, mask, lo, hi, slope, scale_log2, softcap,
                    cap_in, thresh, inv_keep):
        """dS -> pacc (accumulator rows are query rows ra / rb, columns keys j0 + ...); rel0 = j0 + 2 t - ra - off
        as float32."""
        for y in range(S_LEN):
            top = (y & 2) == 0
            rel = rel0 + float32((y >> 2) * 8 + (y & 1) - (0 if top else 8))
            pd, ds = grad_elem(sacc[y], pacc[y], rel, j0 + (y >> 2) * 8 + 2 * t + (y & 1), l2a if top else l2b,
                               dia if top else dib, rka if top else rkb, mask, lo, hi, slope, scale_log2, softcap,
                               cap_in, thresh, inv_keep)
            pacc[y] = ds

    return elementwise


@functools.lru_cache(maxsize=None)
def make_tc_dq_kernel(NW, BC, DP, bf16, HAS_CAP, HAS_ALIBI, HAS_DROP, WSKIP=True, QREG=False):
    """Deterministic dQ kernel: NW warps x 16 query rows, BC keys per tile (K / V double-buffered); QREG: the
    warp's Q and dO fragments (the A operands of S and dP, the same for every key tile) are read from shared memory
    once into registers (8 DP / 16 words per lane) instead of once per key tile.
    Returns (kernel, query rows per block, threads, dynamic shared bytes)."""
    BRQ = 16 * NW
    STR = DP // 2 + 4
    CH, KS_D, NB2, NO2 = DP // 8, DP // 16, BC // 16, DP // 16
    S_LEN, O_LEN = BC // 2, DP // 2
    QF_LEN = 4 * KS_D if QREG else 1
    NTH = 32 * NW
    KT = BC * STR
    KV_OFF = 2 * BRQ * STR        # Q at 0, dO at BRQ STR; stage s: K at KV_OFF + 2 s KT, V right after it
    SMEM = 4 * (KV_OFF + 4 * KT)
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2
    ldsm, ldsm_t = intr.ldsm_x4_o, intr.ldsm_x4_t_o  # kept after the waits
    mma_acc, _, pack_a = make_tc_helpers(bf16, STR, CH, NTH)
    load_q = make_row_loader(BRQ, STR, CH, NTH)
    load_k = make_row_loader(BC, STR, CH, NTH)
    elementwise = make_dq_elementwise(BC, HAS_CAP, HAS_ALIBI, HAS_DROP)

    def kernel(q, k, v, dout, lse, di, dq, cu_q, cu_k, slopes, scale_log2, softcap, cap_in, scale,
               left, right, lse_a, lse_c, seed, thresh, inv_keep):
        tid = cuda.threadIdx.x
        warp, lane, g, t = lane_ids(tid)
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        qs, Sq, ks, Sk = seq_bounds(cu_q, cu_k, b)
        qb = (Sq + BRQ - 1) // BRQ - 1 - cuda.blockIdx.x  # last (heaviest when causal) blocks first
        if qb < 0:
            return
        i0 = qb * BRQ
        hk = h // (q.shape[1] // k.shape[1])
        off = Sk - Sq
        smem = cuda.shared.array(0, uint32)
        lo, hi = key_range(i0, i0 + BRQ, Sq, Sk, left, right)
        lo = (lo // BC) * BC
        load_q(smem, 0, q, qs + i0, Sq - i0, h, tid)
        load_q(smem, BRQ * STR, dout, qs + i0, Sq - i0, h, tid)
        if QREG:  # Q / dO in a group of their own: waited for before the key loop
            intr.cp_async_commit()
        if lo < hi:
            load_k(smem, KV_OFF, k, ks + lo, Sk - lo, hk, tid)
            load_k(smem, KV_OFF + KT, v, ks + lo, Sk - lo, hk, tid)
        intr.cp_async_commit()
        a_lane, b_lane, t_lane = _lanes(lane, STR)
        a_lane += warp * 16 * STR
        rw0 = i0 + warp * 16
        ra = rw0 + g
        rb = ra + 8
        l2a, dia = _row_stats(lse, di, qs, ra, Sq, h, lse_a, lse_c)
        l2b, dib = _row_stats(lse, di, qs, rb, Sq, h, lse_a, lse_c)
        rka = row_key(seed, b, h, ra) if HAS_DROP else uint64(0)
        rkb = row_key(seed, b, h, rb) if HAS_DROP else uint64(0)
        slope = F32_ZERO
        if HAS_ALIBI:
            slope = float32(slopes[b, h]) * F32_LOG2E
        qacc = cuda.local.array(O_LEN, float32)
        for x in range(O_LEN):
            qacc[x] = F32_ZERO
        sacc = cuda.local.array(S_LEN, float32)
        pacc = cuda.local.array(S_LEN, float32)
        qf = cuda.local.array(QF_LEN, uint32)
        df = cuda.local.array(QF_LEN, uint32)
        if QREG:
            intr.cp_async_wait1()
            cuda.syncthreads()
            for kk in range(KS_D):
                a0, a1, a2, a3 = ldsm(smem, a_lane + kk * 8)
                qf[4 * kk] = a0
                qf[4 * kk + 1] = a1
                qf[4 * kk + 2] = a2
                qf[4 * kk + 3] = a3
                c0, c1, c2, c3 = ldsm(smem, BRQ * STR + a_lane + kk * 8)
                df[4 * kk] = c0
                df[4 * kk + 1] = c1
                df[4 * kk + 2] = c2
                df[4 * kk + 3] = c3
        stage = 0
        flo, fhi = _rel_bounds(left, right)
        wrows = rw0 < Sq  # rows past the end (the whole warp) only wait and sync
        for j0 in range(lo, hi, BC):
            kv0 = KV_OFF + stage * 2 * KT
            if j0 + BC < hi:  # prefetch the next K / V tile into the other stage
                nxt = KV_OFF + (1 - stage) * 2 * KT
                load_k(smem, nxt, k, ks + j0 + BC, Sk - j0 - BC, hk, tid)
                load_k(smem, nxt + KT, v, ks + j0 + BC, Sk - j0 - BC, hk, tid)
                intr.cp_async_commit()
                intr.cp_async_wait1()
            else:
                intr.cp_async_wait0()
            cuda.syncthreads()
            run = wrows
            if WSKIP:  # this warp's 16 rows see no key of the tile: dS = 0
                run = run and not _tile_hidden(rw0, rw0 + 16, j0, j0 + BC, off, left, right)
            if run:
                # ---- S = Q_w K^T, dP = dO_w V^T
                for x in range(S_LEN):
                    sacc[x] = F32_ZERO
                    pacc[x] = F32_ZERO
                for kk in range(KS_D):
                    if QREG:
                        a0, a1, a2, a3 = qf[4 * kk], qf[4 * kk + 1], qf[4 * kk + 2], qf[4 * kk + 3]
                        c0, c1, c2, c3 = df[4 * kk], df[4 * kk + 1], df[4 * kk + 2], df[4 * kk + 3]
                    else:
                        a0, a1, a2, a3 = ldsm(smem, a_lane + kk * 8)
                        c0, c1, c2, c3 = ldsm(smem, BRQ * STR + a_lane + kk * 8)
                    for np2 in range(NB2):
                        b0, b1, b2, b3 = ldsm(smem, kv0 + b_lane + np2 * 16 * STR + kk * 8)
                        mma_acc(sacc, np2 * 8, a0, a1, a2, a3, b0, b1)
                        mma_acc(sacc, np2 * 8 + 4, a0, a1, a2, a3, b2, b3)
                        e0, e1, e2, e3 = ldsm(smem, kv0 + KT + b_lane + np2 * 16 * STR + kk * 8)
                        mma_acc(pacc, np2 * 8, c0, c1, c2, c3, e0, e1)
                        mma_acc(pacc, np2 * 8 + 4, c0, c1, c2, c3, e2, e3)
                rel0 = float32(j0 + 2 * t - ra - off)
                if _tile_needs_mask(rw0, rw0 + 16, j0, j0 + BC, off, left, right):
                    elementwise(sacc, pacc, rel0, l2a, l2b, dia, dib, rka, rkb, j0, t, True, flo, fhi, slope,
                                scale_log2, softcap, cap_in, thresh, inv_keep)
                else:
                    elementwise(sacc, pacc, rel0, l2a, l2b, dia, dib, rka, rkb, j0, t, False, flo, fhi, slope,
                                scale_log2, softcap, cap_in, thresh, inv_keep)
                # ---- dQ += dS K
                for kk in range(NB2):
                    s0 = 8 * kk
                    c0, c1, c2, c3 = pack_a(pacc, s0)
                    for np2 in range(NO2):
                        b0, b1, b2, b3 = ldsm_t(smem, kv0 + t_lane + kk * 16 * STR + np2 * 8)
                        mma_acc(qacc, np2 * 8, c0, c1, c2, c3, b0, b1)
                        mma_acc(qacc, np2 * 8 + 4, c0, c1, c2, c3, b2, b3)
            stage = 1 - stage
            cuda.syncthreads()
        intr.cp_async_wait0()
        DW = dq.shape[2]
        for nt in range(2 * NO2):
            w = nt * 4 + t
            if w < DW:
                if ra < Sq:
                    dq[qs + ra, h, w] = pack(qacc[nt * 4] * scale, qacc[nt * 4 + 1] * scale)
                if rb < Sq:
                    dq[qs + rb, h, w] = pack(qacc[nt * 4 + 2] * scale, qacc[nt * 4 + 3] * scale)

    return jit_kernel(kernel), BRQ, NTH, SMEM


@functools.lru_cache(maxsize=None)
def make_word_kernels(bf16):
    """(row_dot, dq_pack): D_i = rowsum(dO * O) on word arrays (T, H, W) -> di (H, T) fp32; and the fp32 dQ
    buffer (T, H, 2W) times scale -> packed words (T, H, W)."""
    unpack = intr.unpack_bf16x2 if bf16 else intr.unpack_f16x2
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2

    def row_dot(dout, out, di):
        x = cuda.grid(1)
        T, H, W = dout.shape
        if x < T * H:
            t = x // H
            h = x - t * H
            acc = F32_ZERO
            for w in range(W):
                a0, a1 = unpack(dout[t, h, w])
                b0, b1 = unpack(out[t, h, w])
                acc += a0 * b0 + a1 * b1
            di[h, t] = acc

    def dq_pack(acc, dq, scale):
        x = cuda.grid(1)
        T, H, W = dq.shape
        if x < T * H * W:
            t = x // (H * W)
            r = x - t * H * W
            h = r // W
            w = r - h * W
            dq[t, h, w] = pack(acc[t, h, 2 * w] * scale, acc[t, h, 2 * w + 1] * scale)

    return jit_kernel(row_dot), jit_kernel(dq_pack)
