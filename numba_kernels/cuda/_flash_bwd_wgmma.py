"""FlashAttention-2 backward on Hopper warpgroup MMA (``wgmma``, sm_90a; float16 / bfloat16, fp32 accumulate).

``make_wgmma_bwd_kernel`` has the arguments of ``_flash_bwd_tc.make_tc_bwd_kernel``: one block per (key tile of
BC = 64 NWG keys, k/v head, sequence), warpgroup w owning keys 64 w .. 64 w + 63, K / V in shared memory, dK / dV
in registers, the query heads of the GQA group and their query tiles of BR rows walked with Q / dO
double-buffered by cp.async. Per query tile and warpgroup:

  S^T = K_w Q^T, dP^T = V_w dO^T   wgmma m64nBRk16, A and B from shared memory (K-major)
  P~, dS                            ``make_elementwise`` on the accumulators (the mma.sync fragment layout)
  dV += P~^T dO, dK += dS^T Q       wgmma m64nDPk16, A from registers (packed accumulators), B = dO / Q
                                    from shared memory read transposed (MN-major)
  dQ += dS K (HAS_DQ)               dS^T to shared memory, wgmma m64n(DP/NWG)k16 with both operands read
                                    transposed, warpgroup w taking dQ columns w DP / NWG ..; fp32 reductions

PIPE overlaps the products with the elementwise work (two commit groups waited one at a time).
``make_wgmma_dq_kernel`` is the deterministic dQ pass on the same products (one block per query tile).

Against the mma.sync kernel, a warpgroup reads each Q / dO element of the tile from shared memory once per
product instead of once per warp (there, ldmatrix traffic was as large as the mma time: BENCHMARKS.md).
Shared tiles use the no-swizzle canonical layout of ``_wgmma`` (cp.async chunk c at word 4 c).
"""
import functools

from numba import cuda, float32, uint32, uint64

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _wgmma as wg
from numba_kernels.cuda._attn_common import (F32_LOG2E, F32_ZERO, dev, key_range, lane_ids, make_pack_a, query_range,
                                             row_key, seq_bounds)
from numba_kernels.cuda._flash_bwd_tc import (_rel_bounds, _row_stats, _tile_hidden, _tile_needs_mask, make_elementwise,
                                              make_tile_loader)
from numba_kernels.cuda._flash_bwd_tc_dq import make_dq_elementwise


@functools.lru_cache(maxsize=None)
def make_canon_loader(NR, DP, NTH):
    """load(smem, dst0, src, row0, nvalid, head, tid): cp.async of the NR x DP tile src[row0 + r, head, :] (uint32
    words, two halves each) into the canonical layout at word dst0, zero-filled past ``nvalid`` rows and past
    the row's end. Chunk c (16 bytes: row 8 (c // (8 CH)) + c % 8, column chunk (c // 8) % CH) goes to word
    dst0 + 4 c: a warp writes whole 128-byte core matrices (no bank conflicts)."""
    CH = DP // 8
    NCH = NR * CH
    NPASS = -(-NCH // NTH)
    EVEN = NCH % NTH == 0
    cp16 = intr.cp_async16

    @dev
    def load(smem, dst0, src, row0, nvalid, head, tid):
        W = src.shape[2]
        HS = src.shape[1]
        for i in range(NPASS):
            c = tid + i * NTH
            if EVEN or c < NCH:
                rest = c >> 3
                ch = rest % CH
                r = (rest // CH) * 8 + (c & 7)
                ok = r < nvalid and ch * 4 < W
                cp16(smem, dst0 + 4 * c, src, ((row0 + r) * HS + head) * W + ch * 4 if ok else 0, 16 if ok else 0)

    return load


@functools.lru_cache(maxsize=None)
def make_wgmma_bwd_kernel(NWG, BR, DP, bf16, HAS_CAP, HAS_ALIBI, HAS_DROP, HAS_DQ=False, PIPE=False):
    """dK/dV kernel: NWG warpgroups (BC = 64 NWG keys), BR query rows per tile (a multiple of 16), head dim padded
    to DP (a multiple of 16). HAS_DQ (BR = 64): also dQ += dS K into the fp32
    buffer dq_acc by vector reductions, dS^T through shared memory (the canonical layout, read transposed as the
    A operand), warpgroup w taking dQ columns w DP / NWG .. of all BC keys. PIPE (without softcap and dropout;
    ignored with them): the products overlap the elementwise work: S^T and dP^T in two commit groups, P from S^T
    while dP^T runs, dV issued before dS is computed, dK after it. Returns (Sm90aKernel, keys per block, threads,
    dynamic shared bytes)."""
    BC = 64 * NWG
    NTH = 128 * NWG
    KS_D, NB2 = DP // 16, BR // 16
    AFR = 8 * NB2                  # words of the packed A fragments of one tile (P~ and dS)
    S_LEN, O_LEN = BR // 2, DP // 2
    ROWB = DP * 16                 # bytes between 8-row groups of a tile (SBO of the K-major operands)
    KT = BC * DP // 2              # words of the K (and V) tile
    QT = BR * DP // 2              # words of a Q (and dO) tile
    V_OFF = KT
    Q_OFF = 2 * KT                 # stage s: Q at Q_OFF + 2 s QT, dO right after it
    DS_OFF = Q_OFF + 4 * QT        # dS^T (BC keys x BR query rows) when HAS_DQ
    SMEM = 4 * (DS_OFF + (BC * BR // 2 if HAS_DQ else 0)) + 128  # + the alignment pad
    assert not HAS_DQ or (BR == 64 and DP % (8 * NWG) == 0)
    DQN = DP // NWG                # dQ columns per warpgroup
    QA = DQN // 2 if HAS_DQ else 1
    RG = BR * 4                    # words between 8-key row groups of the dS^T tile
    LS2 = 2 * BR
    kind = "bf16" if bf16 else "f16"
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2
    pack_a = make_pack_a(bf16)
    mma_s = wg.make_wgmma(BR, kind, False, False, 128, ROWB, 128, ROWB)
    mma_s0 = wg.make_wgmma(BR, kind, False, False, 128, ROWB, 128, ROWB, SCALE_D=False)  # the first k-step (PIPE)
    t_lbo, t_sbo = ROWB, 128       # MN-major B: LBO = K step (8 query rows), SBO = N step (8 columns); H200-checked
    mma_o = wg.make_wgmma(DP, kind, True, True, 0, 0, t_lbo, t_sbo)
    # dQ = dS K: A = dS^T tile read transposed (K step 8 keys = one row group, M step 8 query columns), B = K rows
    mma_q = wg.make_wgmma(DQN, kind, False, True, BR * 16, 128, t_lbo, t_sbo, TRANS_A=True)
    red2 = intr.red_add_v2_f32
    load_q = make_canon_loader(BR, DP, NTH)
    load_k = make_canon_loader(BC, DP, NTH)
    load_tile = make_tile_loader(load_q, BR, QT, HAS_DROP)
    elementwise = make_elementwise(BR, HAS_CAP, HAS_ALIBI, HAS_DROP)
    PIPE = PIPE and not (HAS_CAP or HAS_DROP)
    elem_p = make_elementwise(BR, False, HAS_ALIBI, False, True)

    @dev
    def elem_ds(sacc, pacc, di_s, sb, t):
        """dS = P (dP - D_i) -> pacc (P in sacc; masked entries have P = 0)."""
        for y in range(S_LEN):
            pacc[y] = sacc[y] * (pacc[y] - di_s[sb + (y >> 2) * 8 + 2 * t + (y & 1)])

    @dev
    def store_ds(smem, afr, ds_w):
        """This thread's dS^T words (packed in afr) into the shared dS^T tile."""
        for kk in range(NB2):
            w0 = ds_w + kk * 64
            smem[w0] = afr[8 * kk + 4]
            smem[w0 + RG] = afr[8 * kk + 5]
            smem[w0 + 32] = afr[8 * kk + 6]
            smem[w0 + RG + 32] = afr[8 * kk + 7]

    @dev
    def tile_pipe(smem, sacc, pacc, afr, dvacc, dkacc, lse_s, di_s, rk_s, ka_w, q0, ds_w, i0, ka, kb, kw0, t, stage,
                  off, left, right, lo, hi, slope, scale_log2, softcap, cap_in, thresh, inv_keep):
        """One query tile's products and elementwise work with the products overlapping it (PIPE)."""
        wg.wg_fence()
        mma_s0(sacc, 0, smem, ka_w, q0)  # (no zeroing: nothing writes the accumulators between the two batches)
        for kk in range(1, KS_D):
            mma_s(sacc, 0, smem, ka_w + kk * 64, q0 + kk * 64)
        wg.wg_commit()
        mma_s0(pacc, 0, smem, ka_w + V_OFF, q0 + QT)
        for kk in range(1, KS_D):
            mma_s(pacc, 0, smem, ka_w + V_OFF + kk * 64, q0 + QT + kk * 64)
        wg.wg_commit()
        sb = stage * BR
        rel0 = float32(ka - i0 - 2 * t - off)
        wg.wg_wait1()  # S^T is there, dP^T may still run
        if _tile_needs_mask(i0, i0 + BR, kw0, kw0 + 16, off, left, right):
            elem_p(sacc, pacc, lse_s, di_s, rk_s, sb, rel0, ka, kb, t, True, lo, hi, slope, scale_log2, softcap,
                   cap_in, thresh, inv_keep)
        else:
            elem_p(sacc, pacc, lse_s, di_s, rk_s, sb, rel0, ka, kb, t, False, lo, hi, slope, scale_log2, softcap,
                   cap_in, thresh, inv_keep)
        for kk in range(NB2):
            afr[8 * kk], afr[8 * kk + 1], afr[8 * kk + 2], afr[8 * kk + 3] = pack_a(sacc, 8 * kk)
        wg.wg_fence()
        for kk in range(NB2):  # dV += P^T dO while dS is computed
            mma_o(dvacc, 0, smem, afr[8 * kk], afr[8 * kk + 1], afr[8 * kk + 2], afr[8 * kk + 3], q0 + QT + kk * 8 * DP)
        wg.wg_commit()
        wg.wg_wait1()  # dP^T is there, dV may still run
        elem_ds(sacc, pacc, di_s, sb, t)
        for kk in range(NB2):
            afr[8 * kk + 4], afr[8 * kk + 5], afr[8 * kk + 6], afr[8 * kk + 7] = pack_a(pacc, 8 * kk)
        if HAS_DQ:
            store_ds(smem, afr, ds_w)
        wg.wg_fence()
        for kk in range(NB2):
            mma_o(dkacc, 0, smem, afr[8 * kk + 4], afr[8 * kk + 5], afr[8 * kk + 6], afr[8 * kk + 7], q0 + kk * 8 * DP)
        wg.wg_commit()
        wg.wg_wait0()

    def kernel(q, k, v, dout, lse, di, dq_acc, dk, dv, cu_q, cu_k, slopes, scale_log2, softcap, cap_in, scale,
               left, right, lse_a, lse_c, seed, thresh, inv_keep):
        tid = cuda.threadIdx.x
        warp, lane, g, t = lane_ids(tid)
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        qs, Sq, ks, Sk = seq_bounds(cu_q, cu_k, b)
        j0 = cuda.blockIdx.x * BC
        if j0 >= Sk:
            return
        G = q.shape[1] // k.shape[1]
        off = Sk - Sq
        smem = cuda.shared.array(0, uint32)
        lse_s = cuda.shared.array(LS2, float32)
        di_s = cuda.shared.array(LS2, float32)
        rk_s = cuda.shared.array(LS2, uint32)
        pad = wg.align_pad(smem, 128)
        qlo, qhi = query_range(j0, j0 + BC, Sq, Sk, left, right)
        nqt = (qhi - qlo + BR - 1) // BR if qhi > qlo else 0
        total = G * nqt
        load_k(smem, pad, k, ks + j0, Sk - j0, hk, tid)
        load_k(smem, pad + V_OFF, v, ks + j0, Sk - j0, hk, tid)
        if total > 0:
            load_tile(smem, pad + Q_OFF, lse_s, di_s, rk_s, 0, q, dout, lse, di, qs, qlo, Sq, b, hk * G, lse_a,
                      lse_c, seed, tid)
        else:
            intr.cp_async_commit()
        wgi = warp >> 2
        kg0 = j0 + wgi * 64           # this warpgroup's first key
        ka_w = pad + wgi * (KT // NWG)  # its K rows (V at + V_OFF)
        kw0 = j0 + warp * 16
        ka = kw0 + g
        kb = ka + 8
        lo, hi = _rel_bounds(left, right)
        dkacc = cuda.local.array(O_LEN, float32)
        dvacc = cuda.local.array(O_LEN, float32)
        for x in range(O_LEN):
            dkacc[x] = F32_ZERO
            dvacc[x] = F32_ZERO
        sacc = cuda.local.array(S_LEN, float32)
        pacc = cuda.local.array(S_LEN, float32)
        afr = cuda.local.array(AFR, uint32)
        qacc = cuda.local.array(QA, float32)
        ds_w = pad + DS_OFF + 2 * warp * RG + 4 * g + t  # this thread's dS^T words (rows ka / kb, columns 2 t ..)
        H = q.shape[1]
        DQW = dq_acc.shape[2]
        stage = 0
        ti = 0
        hh = 0
        for it in range(total):
            h = hk * G + hh
            i0 = qlo + ti * BR
            tn = ti + 1
            hn = hh
            if tn == nqt:
                tn = 0
                hn = hh + 1
            q0 = pad + Q_OFF + stage * 2 * QT
            if it + 1 < total:  # prefetch the next query tile into the other stage
                load_tile(smem, pad + Q_OFF + (1 - stage) * 2 * QT, lse_s, di_s, rk_s, 1 - stage, q, dout, lse, di,
                          qs, qlo + tn * BR, Sq, b, hk * G + hn, lse_a, lse_c, seed, tid)
                intr.cp_async_wait1()
            else:
                intr.cp_async_wait0()
            wg.proxy_fence()  # this thread's cp.async results, visible to the wgmma reads
            cuda.syncthreads()
            slope = F32_ZERO
            if HAS_ALIBI:
                slope = float32(slopes[b, h]) * F32_LOG2E
            # the warpgroup's 64 keys hidden from every row of the tile (uniform over the warpgroup): P~ = dS = 0
            if kg0 >= Sk or _tile_hidden(i0, i0 + BR, kg0, kg0 + 64, off, left, right):
                if HAS_DQ:
                    for kk in range(NB2):
                        w0 = ds_w + kk * 64
                        smem[w0] = uint32(0)
                        smem[w0 + RG] = uint32(0)
                        smem[w0 + 32] = uint32(0)
                        smem[w0 + RG + 32] = uint32(0)
            else:
                if PIPE:
                    tile_pipe(smem, sacc, pacc, afr, dvacc, dkacc, lse_s, di_s, rk_s, ka_w, q0, ds_w, i0, ka, kb, kw0,
                              t, stage, off, left, right, lo, hi, slope, scale_log2, softcap, cap_in, thresh,
                              inv_keep)
                else:
                    # ---- S^T = K_w Q^T, dP^T = V_w dO^T
                    for x in range(S_LEN):
                        sacc[x] = F32_ZERO
                        pacc[x] = F32_ZERO
                    wg.wg_fence()
                    for kk in range(KS_D):
                        mma_s(sacc, 0, smem, ka_w + kk * 64, q0 + kk * 64)
                        mma_s(pacc, 0, smem, ka_w + V_OFF + kk * 64, q0 + QT + kk * 64)
                    wg.wg_commit()
                    wg.wg_wait0()
                    sb = stage * BR
                    rel0 = float32(ka - i0 - 2 * t - off)
                    if _tile_needs_mask(i0, i0 + BR, kw0, kw0 + 16, off, left, right):
                        elementwise(sacc, pacc, lse_s, di_s, rk_s, sb, rel0, ka, kb, t, True, lo, hi, slope,
                                    scale_log2, softcap, cap_in, thresh, inv_keep)
                    else:
                        elementwise(sacc, pacc, lse_s, di_s, rk_s, sb, rel0, ka, kb, t, False, lo, hi, slope,
                                    scale_log2, softcap, cap_in, thresh, inv_keep)
                    # ---- dV += P~^T dO, dK += dS^T Q (16 query rows = two 8-row groups = 8 DP words per step)
                    # (all A fragments packed before the batch: no register writes between its wgmma)
                    for kk in range(NB2):
                        afr[8 * kk], afr[8 * kk + 1], afr[8 * kk + 2], afr[8 * kk + 3] = pack_a(sacc, 8 * kk)
                        afr[8 * kk + 4], afr[8 * kk + 5], afr[8 * kk + 6], afr[8 * kk + 7] = pack_a(pacc, 8 * kk)
                    if HAS_DQ:  # dS^T to shared: rows ka / kb, query columns 16 kk + 2 t (+ 8) (before the batch)
                        store_ds(smem, afr, ds_w)
                    wg.wg_fence()
                    for kk in range(NB2):
                        mma_o(dvacc, 0, smem, afr[8 * kk], afr[8 * kk + 1], afr[8 * kk + 2], afr[8 * kk + 3],
                              q0 + QT + kk * 8 * DP)
                        mma_o(dkacc, 0, smem, afr[8 * kk + 4], afr[8 * kk + 5], afr[8 * kk + 6], afr[8 * kk + 7],
                              q0 + kk * 8 * DP)
                    wg.wg_commit()
                    wg.wg_wait0()
            if HAS_DQ:  # ---- dQ[:, wgi DQN ...] += dS K over the block's BC keys; fp32 reductions
                wg.proxy_fence()
                cuda.syncthreads()
                for x in range(DQN // 2):
                    qacc[x] = F32_ZERO
                wg.wg_fence()
                for kk in range(BC // 16):
                    mma_q(qacc, 0, smem, pad + DS_OFF + kk * 8 * BR, pad + wgi * DQN * 4 + kk * 8 * DP)
                wg.wg_commit()
                wg.wg_wait0()
                qrow = i0 + 16 * (warp & 3) + g
                fa = ((qs + qrow) * H + h) * DQW  # flat index of dq_acc[qs + qrow, h, 0]; row + 8 is 8 H DQW on
                fb = fa + 8 * H * DQW
                for j in range(DQN // 8):
                    col = wgi * DQN + 8 * j + 2 * t
                    if col < DQW:
                        if qrow < Sq:
                            red2(dq_acc, fa + col, qacc[4 * j], qacc[4 * j + 1])
                        if qrow + 8 < Sq:
                            red2(dq_acc, fb + col, qacc[4 * j + 2], qacc[4 * j + 3])
            stage = 1 - stage
            ti = tn
            hh = hn
            cuda.syncthreads()  # every warpgroup is done with this stage before it is refilled
        intr.cp_async_wait0()
        DW = dk.shape[2]
        for nt in range(O_LEN // 4):
            w = nt * 4 + t
            if w < DW:
                if ka < Sk:
                    dv[ks + ka, hk, w] = pack(dvacc[nt * 4], dvacc[nt * 4 + 1])
                    dk[ks + ka, hk, w] = pack(dkacc[nt * 4] * scale, dkacc[nt * 4 + 1] * scale)
                if kb < Sk:
                    dv[ks + kb, hk, w] = pack(dvacc[nt * 4 + 2], dvacc[nt * 4 + 3])
                    dk[ks + kb, hk, w] = pack(dkacc[nt * 4 + 2] * scale, dkacc[nt * 4 + 3] * scale)

    return wg.Sm90aKernel(kernel), BC, NTH, SMEM



@functools.lru_cache(maxsize=None)
def make_wgmma_dq_kernel(NWG, BC, DP, bf16, HAS_CAP, HAS_ALIBI, HAS_DROP):
    """Deterministic dQ pass on warpgroup MMA (the ``_flash_bwd_tc_dq.make_tc_dq_kernel`` arguments): one block per
    (query tile of BRQ = 64 NWG rows, head, sequence), warpgroup w owning rows 64 w .., K / V tiles of BC keys
    double-buffered; per key tile S = Q_w K^T and dP = dO_w V^T (m64nBCk16, both operands from shared memory),
    dS elementwise, dQ += dS K (m64nDPk16, A from registers, K read transposed). Returns (Sm90aKernel, query rows
    per block, threads, dynamic shared bytes)."""
    BRQ = 64 * NWG
    NTH = 128 * NWG
    KS_D, NB2 = DP // 16, BC // 16
    AFQ = 4 * NB2                  # words of the packed dS fragments of one key tile
    S_LEN, O_LEN = BC // 2, DP // 2
    ROWB = DP * 16
    QT = BRQ * DP // 2             # words of the Q (and dO) tile
    KT = BC * DP // 2              # words of a K (and V) tile
    KV_OFF = 2 * QT                # stage s: K at KV_OFF + 2 s KT, V right after it
    SMEM = 4 * (KV_OFF + 4 * KT) + 128
    kind = "bf16" if bf16 else "f16"
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2
    pack_a = make_pack_a(bf16)
    mma_s = wg.make_wgmma(BC, kind, False, False, 128, ROWB, 128, ROWB)
    mma_s0 = wg.make_wgmma(BC, kind, False, False, 128, ROWB, 128, ROWB, SCALE_D=False)
    mma_o = wg.make_wgmma(DP, kind, True, True, 0, 0, ROWB, 128)
    load_q = make_canon_loader(BRQ, DP, NTH)
    load_k = make_canon_loader(BC, DP, NTH)
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
        pad = wg.align_pad(smem, 128)
        lo, hi = key_range(i0, i0 + BRQ, Sq, Sk, left, right)
        lo = (lo // BC) * BC
        load_q(smem, pad, q, qs + i0, Sq - i0, h, tid)
        load_q(smem, pad + QT, dout, qs + i0, Sq - i0, h, tid)
        if lo < hi:
            load_k(smem, pad + KV_OFF, k, ks + lo, Sk - lo, hk, tid)
            load_k(smem, pad + KV_OFF + KT, v, ks + lo, Sk - lo, hk, tid)
        intr.cp_async_commit()
        wgi = warp >> 2
        rg0 = i0 + wgi * 64            # this warpgroup's first query row
        qa_w = pad + wgi * (QT // NWG)  # its Q rows (dO at + QT)
        ra = i0 + warp * 16 + g
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
        afr = cuda.local.array(AFQ, uint32)
        stage = 0
        flo, fhi = _rel_bounds(left, right)
        rw0 = i0 + warp * 16
        for j0 in range(lo, hi, BC):
            kv0 = pad + KV_OFF + stage * 2 * KT
            if j0 + BC < hi:  # prefetch the next K / V tile into the other stage
                nxt = pad + KV_OFF + (1 - stage) * 2 * KT
                load_k(smem, nxt, k, ks + j0 + BC, Sk - j0 - BC, hk, tid)
                load_k(smem, nxt + KT, v, ks + j0 + BC, Sk - j0 - BC, hk, tid)
                intr.cp_async_commit()
                intr.cp_async_wait1()
            else:
                intr.cp_async_wait0()
            wg.proxy_fence()
            cuda.syncthreads()
            # the warpgroup's 64 rows past the end or hidden from the whole tile (uniform over it): dS = 0
            if not (rg0 >= Sq or _tile_hidden(rg0, rg0 + 64, j0, j0 + BC, off, left, right)):
                wg.wg_fence()  # (first k-step without accumulator input: no zeroing between the batch's wgmma)
                mma_s0(sacc, 0, smem, qa_w, kv0)
                mma_s0(pacc, 0, smem, qa_w + QT, kv0 + KT)
                for kk in range(1, KS_D):
                    mma_s(sacc, 0, smem, qa_w + kk * 64, kv0 + kk * 64)
                    mma_s(pacc, 0, smem, qa_w + QT + kk * 64, kv0 + KT + kk * 64)
                wg.wg_commit()
                wg.wg_wait0()
                rel0 = float32(j0 + 2 * t - ra - off)
                if _tile_needs_mask(rw0, rw0 + 16, j0, j0 + BC, off, left, right):
                    elementwise(sacc, pacc, rel0, l2a, l2b, dia, dib, rka, rkb, j0, t, True, flo, fhi, slope,
                                scale_log2, softcap, cap_in, thresh, inv_keep)
                else:
                    elementwise(sacc, pacc, rel0, l2a, l2b, dia, dib, rka, rkb, j0, t, False, flo, fhi, slope,
                                scale_log2, softcap, cap_in, thresh, inv_keep)
                # ---- dQ += dS K (16 keys = two 8-row groups of the K tile = 8 DP words per step)
                for kk in range(NB2):
                    afr[4 * kk], afr[4 * kk + 1], afr[4 * kk + 2], afr[4 * kk + 3] = pack_a(pacc, 8 * kk)
                wg.wg_fence()
                for kk in range(NB2):
                    mma_o(qacc, 0, smem, afr[4 * kk], afr[4 * kk + 1], afr[4 * kk + 2], afr[4 * kk + 3],
                          kv0 + kk * 8 * DP)
                wg.wg_commit()
                wg.wg_wait0()
            stage = 1 - stage
            cuda.syncthreads()
        intr.cp_async_wait0()
        DW = dq.shape[2]
        for nt in range(O_LEN // 4):
            w = nt * 4 + t
            if w < DW:
                if ra < Sq:
                    dq[qs + ra, h, w] = pack(qacc[nt * 4] * scale, qacc[nt * 4 + 1] * scale)
                if rb < Sq:
                    dq[qs + rb, h, w] = pack(qacc[nt * 4 + 2] * scale, qacc[nt * 4 + 3] * scale)

    return wg.Sm90aKernel(kernel), BRQ, NTH, SMEM
