"""FlashAttention-2 backward on tensor cores (float16 / bfloat16 in, fp32 accumulate), mma.sync m16n8k16.

``dkdv`` (one block per (key tile of BC = 16 NW keys, k/v head, sequence); warp w owns keys 16w..16w+15):
the block keeps its K / V tile in shared memory and dK / dV in registers while it walks the query heads
of the GQA group and their query tiles of BR rows (Q, dO double-buffered by cp.async). Per query tile:

  S^T = K_w Q^T, dP^T = V_w dO^T   A = K / V rows by ldmatrix, B = Q / dO rows by ldmatrix
  P~, dS                            elementwise on the accumulators (``grad_elem``; rows = keys here)
  dV += P~^T dO, dK += dS^T Q       A packed straight from the accumulators, B by ldmatrix.trans
  dQ += dS K (HAS_DQ)               dS^T through shared memory, A by ldmatrix.trans of it, B = K by
                                    ldmatrix.trans; added to an fp32 buffer with (vector) fp32 reductions

``dq`` (deterministic dQ) and the word kernels: ``_flash_bwd_tc_dq``.

Per-tile overhead is kept off the tensor-core loop (an H100 SASS count of the first version had ~3,000
instructions per 160 mma per warp and tile, most of them 64-bit index arithmetic): tiles are walked with
running indices instead of divisions, cp.async copies have a trip count fixed at compile time, tiles that
need no mask take an unmasked elementwise path, and (``WSKIP``) a warp whose 16 keys (query rows) the
causal / window mask hides from the whole tile skips its products.
"""
import functools
import math

import numpy as np
from numba import cuda, float32, uint32, uint64

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._attn_common import (F32_LOG2E, F32_ONE, F32_ZERO, col_hash, dev, jit_kernel, lane_ids,
                                             make_row_loader, make_tc_helpers, query_range, row_key, seq_bounds)
from numba_kernels.cuda._intrinsics import ex2

F32_INF = float32(np.inf)


@functools.lru_cache(maxsize=None)
def make_grad_elem(HAS_CAP, HAS_ALIBI, HAS_DROP):
    """(P~, dS) of one (query row, key col) element from s = q.k and dp = dO.v (fp32). ``rel`` = col - row - off
    as float32 (exact below 2^24 tokens a sequence): the key is visible iff lo <= rel <= hi (checked when ``mask``),
    and the ALiBi bias is slope |rel|."""

    @dev
    def grad_elem(s, dp, rel, col, l2, di, rk, mask, lo, hi, slope, scale_log2, softcap, cap_in, thresh, inv_keep):
        g = F32_ONE
        if HAS_CAP:
            th = math.tanh(s * cap_in)
            g = F32_ONE - th * th
            x = softcap * th * F32_LOG2E
        else:
            x = s * scale_log2
        if HAS_ALIBI:
            x -= slope * abs(rel)
        p = ex2(x - l2)  # l2 = +inf (row past the end or fully masked): p = 0
        if mask:
            if rel < lo or rel > hi:
                p = F32_ZERO
        pd = p
        if HAS_DROP:
            if col_hash(rk, col) >= thresh:
                pd = p * inv_keep
                dp = dp * inv_keep
            else:
                pd = F32_ZERO
                dp = F32_ZERO
        return pd, p * (dp - di) * g

    return grad_elem


@dev
def _rel_bounds(left, right):
    """(lo, hi) of the visible col - row - off as float32 (+-inf when unbounded)."""
    lo = -F32_INF
    hi = F32_INF
    if left >= 0:
        lo = float32(-left)
    if right >= 0:
        hi = float32(right)
    return lo, hi


@dev
def _tile_needs_mask(i0, i1, j0, j1, off, left, right):
    """Whether some query row of [i0, i1) does not see some key of [j0, j1) (window / causal)."""
    m = False
    if right >= 0:
        m = j1 - 1 > i0 + off + right
    if left >= 0:
        m = m or j0 < i1 - 1 + off - left
    return m


@dev
def _tile_hidden(i0, i1, j0, j1, off, left, right):
    """Whether no query row of [i0, i1) sees any key of [j0, j1) (window / causal)."""
    m = False
    if right >= 0:
        m = j0 > i1 - 1 + off + right
    if left >= 0:
        m = m or j1 - 1 < i0 + off - left
    return m


@dev
def _row_stats(lse, di, qs, row, Sq, h, lse_a, lse_c):
    """(LSE in log2 units, D_i) of query row ``row``; (+inf, 0) past the end or for a fully masked row."""
    l2 = F32_INF
    d = F32_ZERO
    if row < Sq:
        x = lse[qs * lse_a + h * lse_c + row]
        if x > -F32_INF:
            l2 = x * F32_LOG2E
        d = di[h, qs + row]
    return l2, d


def _lanes(lane, STR):
    """Per-lane ldmatrix word offsets: A operand (16 rows of the warp), B operand, B operand transposed."""
    mrow = lane & 7
    a_lane = (mrow + 8 * ((lane >> 3) & 1)) * STR + 4 * (lane >> 4)
    b_lane = (mrow + 8 * (lane >> 4)) * STR + 4 * ((lane >> 3) & 1)
    return a_lane, b_lane, a_lane


_lanes = dev(_lanes)


@functools.lru_cache(maxsize=None)
def make_tile_loader(load_q, BR, QT, HAS_DROP):
    """load_tile(smem, base, lse_s, di_s, rk_s, st, q, dout, lse, di, qs, i0, Sq, b, h, lse_a, lse_c, seed, tid):
    query tile [i0, i0 + BR) of head h into stage st: Q at word ``base``, dO at base + QT (``load_q``, cp.async,
    one commit group); LSE (log2 units), D_i and the dropout row keys into lse_s / di_s / rk_s[st * BR ...]."""

    @dev
    def load_tile(smem, base, lse_s, di_s, rk_s, st, q, dout, lse, di, qs, i0, Sq, b, h, lse_a, lse_c, seed, tid):
        load_q(smem, base, q, qs + i0, Sq - i0, h, tid)
        load_q(smem, base + QT, dout, qs + i0, Sq - i0, h, tid)
        intr.cp_async_commit()
        if tid < BR:
            l2, d = _row_stats(lse, di, qs, i0 + tid, Sq, h, lse_a, lse_c)
            lse_s[st * BR + tid] = l2
            di_s[st * BR + tid] = d
            if HAS_DROP:
                rk_s[st * BR + tid] = uint32(row_key(seed, b, h, i0 + tid))

    return load_tile


@functools.lru_cache(maxsize=None)
def make_elementwise(BR, HAS_CAP, HAS_ALIBI, HAS_DROP, P_ONLY=False):
    """elementwise(sacc, pacc, lse_s, di_s, rk_s, sb, rel0, ka, kb, t, mask, lo, hi, slope, scale_log2, softcap,
    cap_in, thresh, inv_keep): P~ -> sacc, dS -> pacc over one warp's BR / 2 accumulators of S^T / dP^T (mma
    fragment rows are keys ka / kb, columns query rows i0 + cl of the tile whose row stats start at sb); rel0 =
    ka - i0 - 2 t - off as float32. P_ONLY (no softcap, no dropout: then P~ = P): only P -> sacc, pacc not read or
    written (dS = P (dP - D_i) follows once dP is there)."""
    assert not (P_ONLY and (HAS_CAP or HAS_DROP))
    S_LEN = BR // 2
    grad_elem = make_grad_elem(HAS_CAP, HAS_ALIBI, HAS_DROP)

    @dev
    def elementwise(sacc, pacc, lse_s, di_s, rk_s, sb, rel0, ka, kb, t, mask, lo, hi, slope, scale_log2, softcap,
                    cap_in, thresh, inv_keep):
        for y in range(S_LEN):
            cl = (y >> 2) * 8 + 2 * t + (y & 1)
            top = (y & 2) == 0
            rk = uint64(rk_s[sb + cl]) if HAS_DROP else uint64(0)
            rel = rel0 + float32((0 if top else 8) - (y >> 2) * 8 - (y & 1))
            if P_ONLY:
                pd, _ = grad_elem(sacc[y], F32_ZERO, rel, ka if top else kb, lse_s[sb + cl], F32_ZERO, rk, mask, lo,
                                  hi, slope, scale_log2, softcap, cap_in, thresh, inv_keep)
                sacc[y] = pd
            else:
                pd, ds = grad_elem(sacc[y], pacc[y], rel, ka if top else kb, lse_s[sb + cl], di_s[sb + cl], rk, mask,
                                   lo, hi, slope, scale_log2, softcap, cap_in, thresh, inv_keep)
                sacc[y] = pd
                pacc[y] = ds

    return elementwise


@functools.lru_cache(maxsize=None)
def make_tc_bwd_kernel(NW, BR, DP, bf16, HAS_CAP, HAS_ALIBI, HAS_DROP, HAS_DQ, WSKIP=True, VRED=True):
    """dK/dV kernel (and dQ by fp32 reductions when HAS_DQ; VRED: two columns per reduction): NW warps
    (BC = 16 NW keys), BR query rows per tile, head dim padded to DP. Returns (kernel, keys per block, threads,
    dynamic shared bytes)."""
    BC = 16 * NW
    MQ = BR // 16
    assert NW % MQ == 0 and DP % (16 * (NW // MQ)) == 0
    CS = NW // MQ                 # dQ: warp w does m-tile w % MQ, column slice w // MQ of CS
    STR = DP // 2 + 4
    DSTR = BR // 2 + 4
    CH, KS_D, NB2, NO2 = DP // 8, DP // 16, BR // 16, DP // 16
    S_LEN, O_LEN = BR // 2, DP // 2
    NQ2 = NO2 // CS
    Q_LEN = 8 * NQ2
    NTH = 32 * NW
    QT = BR * STR
    V_OFF = BC * STR
    Q_OFF = 2 * BC * STR          # stage s: Q at Q_OFF + 2 s QT, dO right after it
    DS_OFF = Q_OFF + 4 * QT
    SMEM = 4 * (DS_OFF + (BC * DSTR if HAS_DQ else 0))
    LS2 = 2 * BR
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2
    ldsm, ldsm_t = intr.ldsm_x4_o, intr.ldsm_x4_t_o  # kept after the waits
    red2 = intr.red_add_v2_f32
    mma_acc, _, pack_a = make_tc_helpers(bf16, STR, CH, NTH)
    load_q = make_row_loader(BR, STR, CH, NTH)
    load_k = make_row_loader(BC, STR, CH, NTH)
    load_tile = make_tile_loader(load_q, BR, QT, HAS_DROP)
    elementwise = make_elementwise(BR, HAS_CAP, HAS_ALIBI, HAS_DROP)

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
        H = q.shape[1]
        off = Sk - Sq
        smem = cuda.shared.array(0, uint32)
        lse_s = cuda.shared.array(LS2, float32)
        di_s = cuda.shared.array(LS2, float32)
        rk_s = cuda.shared.array(LS2, uint32)
        qlo, qhi = query_range(j0, j0 + BC, Sq, Sk, left, right)
        nqt = (qhi - qlo + BR - 1) // BR if qhi > qlo else 0
        total = G * nqt
        load_k(smem, 0, k, ks + j0, Sk - j0, hk, tid)
        load_k(smem, V_OFF, v, ks + j0, Sk - j0, hk, tid)
        # with dQ by reductions, neighbouring key tiles start at different query tiles (less contention on dQ rows)
        r0 = cuda.blockIdx.x % nqt if HAS_DQ and nqt > 0 else 0
        if total > 0:
            load_tile(smem, Q_OFF, lse_s, di_s, rk_s, 0, q, dout, lse, di, qs, qlo + r0 * BR, Sq, b, hk * G, lse_a,
                      lse_c, seed, tid)
        else:
            intr.cp_async_commit()
        a_lane, b_lane, t_lane = _lanes(lane, STR)
        a_lane += warp * 16 * STR
        kw0 = j0 + warp * 16
        ka = kw0 + g
        kb = ka + 8
        mq = warp % MQ
        cs = warp // MQ
        ds_lane = DS_OFF + ((lane & 7) + 8 * (lane >> 4)) * DSTR + mq * 8 + 4 * ((lane >> 3) & 1)
        ds_w = DS_OFF + (warp * 16 + g) * DSTR + t
        lo, hi = _rel_bounds(left, right)
        DQW = dq_acc.shape[2]
        dkacc = cuda.local.array(O_LEN, float32)
        dvacc = cuda.local.array(O_LEN, float32)
        for x in range(O_LEN):
            dkacc[x] = F32_ZERO
            dvacc[x] = F32_ZERO
        sacc = cuda.local.array(S_LEN, float32)
        pacc = cuda.local.array(S_LEN, float32)
        qacc = cuda.local.array(Q_LEN, float32)
        stage = 0
        ti = r0       # running (head, query tile) of this step: no divisions in the loop
        hh = 0
        for it in range(total):
            h = hk * G + hh
            i0 = qlo + ti * BR
            tn = ti + 1
            if tn == nqt:
                tn = 0
            hn = hh + 1 if tn == r0 else hh
            q0 = Q_OFF + stage * 2 * QT
            if it + 1 < total:  # prefetch the next query tile into the other stage
                load_tile(smem, Q_OFF + (1 - stage) * 2 * QT, lse_s, di_s, rk_s, 1 - stage, q, dout, lse, di, qs,
                          qlo + tn * BR, Sq, b, hk * G + hn, lse_a, lse_c, seed, tid)
                intr.cp_async_wait1()
            else:
                intr.cp_async_wait0()
            cuda.syncthreads()
            slope = F32_ZERO
            if HAS_ALIBI:
                slope = float32(slopes[b, h]) * F32_LOG2E
            skip = kw0 >= Sk
            if WSKIP:  # this warp's 16 keys are hidden from every row of the tile: P~ = dS = 0
                skip = skip or _tile_hidden(i0, i0 + BR, kw0, kw0 + 16, off, left, right)
            if skip:
                if HAS_DQ:
                    for kk in range(NB2):
                        w0 = ds_w + kk * 8
                        smem[w0] = uint32(0)
                        smem[w0 + 8 * DSTR] = uint32(0)
                        smem[w0 + 4] = uint32(0)
                        smem[w0 + 8 * DSTR + 4] = uint32(0)
            else:
                # ---- S^T = K_w Q^T, dP^T = V_w dO^T
                for x in range(S_LEN):
                    sacc[x] = F32_ZERO
                    pacc[x] = F32_ZERO
                for kk in range(KS_D):
                    a0, a1, a2, a3 = ldsm(smem, a_lane + kk * 8)
                    c0, c1, c2, c3 = ldsm(smem, V_OFF + a_lane + kk * 8)
                    for np2 in range(NB2):
                        b0, b1, b2, b3 = ldsm(smem, q0 + b_lane + np2 * 16 * STR + kk * 8)
                        mma_acc(sacc, np2 * 8, a0, a1, a2, a3, b0, b1)
                        mma_acc(sacc, np2 * 8 + 4, a0, a1, a2, a3, b2, b3)
                        e0, e1, e2, e3 = ldsm(smem, q0 + QT + b_lane + np2 * 16 * STR + kk * 8)
                        mma_acc(pacc, np2 * 8, c0, c1, c2, c3, e0, e1)
                        mma_acc(pacc, np2 * 8 + 4, c0, c1, c2, c3, e2, e3)
                sb = stage * BR
                rel0 = float32(ka - i0 - 2 * t - off)
                if _tile_needs_mask(i0, i0 + BR, kw0, kw0 + 16, off, left, right):
                    elementwise(sacc, pacc, lse_s, di_s, rk_s, sb, rel0, ka, kb, t, True, lo, hi, slope, scale_log2,
                                softcap, cap_in, thresh, inv_keep)
                else:
                    elementwise(sacc, pacc, lse_s, di_s, rk_s, sb, rel0, ka, kb, t, False, lo, hi, slope, scale_log2,
                                softcap, cap_in, thresh, inv_keep)
                # ---- dV += P~^T dO, dK += dS^T Q
                for kk in range(NB2):
                    s0 = 8 * kk
                    a0, a1, a2, a3 = pack_a(sacc, s0)
                    c0, c1, c2, c3 = pack_a(pacc, s0)
                    if HAS_DQ:  # dS^T (keys x query rows) to shared for the dQ product
                        w0 = ds_w + kk * 8
                        smem[w0] = c0
                        smem[w0 + 8 * DSTR] = c1
                        smem[w0 + 4] = c2
                        smem[w0 + 8 * DSTR + 4] = c3
                    for np2 in range(NO2):
                        b0, b1, b2, b3 = ldsm_t(smem, q0 + QT + t_lane + kk * 16 * STR + np2 * 8)
                        mma_acc(dvacc, np2 * 8, a0, a1, a2, a3, b0, b1)
                        mma_acc(dvacc, np2 * 8 + 4, a0, a1, a2, a3, b2, b3)
                        e0, e1, e2, e3 = ldsm_t(smem, q0 + t_lane + kk * 16 * STR + np2 * 8)
                        mma_acc(dkacc, np2 * 8, c0, c1, c2, c3, e0, e1)
                        mma_acc(dkacc, np2 * 8 + 4, c0, c1, c2, c3, e2, e3)
            if HAS_DQ:  # ---- dQ += dS K: m-tile mq, columns slice cs of this warp; fp32 reductions
                cuda.syncthreads()
                for x in range(Q_LEN):
                    qacc[x] = F32_ZERO
                for kk in range(NW):
                    a0, a1, a2, a3 = ldsm_t(smem, ds_lane + kk * 16 * DSTR)
                    for np2 in range(NQ2):
                        b0, b1, b2, b3 = ldsm_t(smem, t_lane + kk * 16 * STR + (cs * NQ2 + np2) * 8)
                        mma_acc(qacc, np2 * 8, a0, a1, a2, a3, b0, b1)
                        mma_acc(qacc, np2 * 8 + 4, a0, a1, a2, a3, b2, b3)
                ra = i0 + mq * 16 + g
                fa = ((qs + ra) * H + h) * DQW  # flat index of dq_acc[qs + ra, h, 0]; row ra + 8 is 8 H DQW on
                fb = fa + 8 * H * DQW
                for nt in range(2 * NQ2):
                    col = (cs * 2 * NQ2 + nt) * 8 + 2 * t
                    if col < DQW:
                        if VRED:
                            if ra < Sq:
                                red2(dq_acc, fa + col, qacc[nt * 4], qacc[nt * 4 + 1])
                            if ra + 8 < Sq:
                                red2(dq_acc, fb + col, qacc[nt * 4 + 2], qacc[nt * 4 + 3])
                        else:
                            if ra < Sq:
                                cuda.atomic.add(dq_acc, (qs + ra, h, col), qacc[nt * 4])
                                cuda.atomic.add(dq_acc, (qs + ra, h, col + 1), qacc[nt * 4 + 1])
                            if ra + 8 < Sq:
                                cuda.atomic.add(dq_acc, (qs + ra + 8, h, col), qacc[nt * 4 + 2])
                                cuda.atomic.add(dq_acc, (qs + ra + 8, h, col + 1), qacc[nt * 4 + 3])
            stage = 1 - stage
            ti = tn
            hh = hn
            cuda.syncthreads()  # every warp is done with this stage (and dS) before they are refilled
        intr.cp_async_wait0()
        DW = dk.shape[2]
        for nt in range(2 * NO2):
            w = nt * 4 + t
            if w < DW:
                if ka < Sk:
                    dv[ks + ka, hk, w] = pack(dvacc[nt * 4], dvacc[nt * 4 + 1])
                    dk[ks + ka, hk, w] = pack(dkacc[nt * 4] * scale, dkacc[nt * 4 + 1] * scale)
                if kb < Sk:
                    dv[ks + kb, hk, w] = pack(dvacc[nt * 4 + 2], dvacc[nt * 4 + 3])
                    dk[ks + kb, hk, w] = pack(dkacc[nt * 4 + 2] * scale, dkacc[nt * 4 + 3] * scale)

    return jit_kernel(kernel), BC, NTH, SMEM
