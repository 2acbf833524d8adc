"""FlashAttention forward on CUDA.

Two kernels, both over the packed layout q (Tq, H, D), k/v (Tk, Hk, D) with cu_seqlens (batched calls
are packed by the caller), grid (query blocks, heads, sequences), online softmax in log2 units:

* ``_make_tc`` (float16 / bfloat16): FlashAttention-2 on tensor cores. Each warp owns 16 query rows;
  S = Q K^T and O += P V are mma.sync m16n8k16 with fp32 accumulators; P stays in registers (the S
  accumulator layout is the A-operand layout of the next mma). Inputs travel as uint32 words (two
  halves each) so a word is a fragment register. Shared memory: Q tile, K tile, V tile transposed.
* ``_make_simt`` (float32 / float64): CUDA cores. Lane j of a warp scores key j of a 32-key tile,
  the warp reduces max / sum with shuffles, then each lane accumulates D / 32 output columns.
"""
import functools
import math

import numpy as np
from numba import cuda, float32, float64, uint32

from numba_kernels import _dispatch as dsp
from numba_kernels._dropout import build_hash, keep_threshold
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._intrinsics import ex2, shfl_xor, syncwarp

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
F32_NEG_INF = np.float32(-np.inf)
F32_ZERO = np.float32(0.0)
F32_LOG2E = np.float32(LOG2E)
F32_LN2 = np.float32(LN2)

_dev = (lambda f: f) if intr.SIM else (lambda f: cuda.jit(device=True, inline=True)(f))
row_key, col_hash = build_hash(_dev)


@_dev
def _key_range(i0, i1, Sq, Sk, left, right):
    """Visible key range [lo, hi) of query rows [i0, i1) of one sequence."""
    off = Sk - Sq
    lo = 0
    hi = Sk
    if left >= 0:
        lo = max(0, i0 + off - left)
    if right >= 0:
        hi = min(Sk, i1 - 1 + off + right + 1)
    return lo, hi


@_dev
def _visible(row, col, Sk, off, left, right):
    ok = col < Sk
    if left >= 0:
        ok = ok and col >= row + off - left
    if right >= 0:
        ok = ok and col <= row + off + right
    return ok


@functools.lru_cache(maxsize=None)
def _make_tc(NW, BC, DP, bf16, HAS_CAP, HAS_ALIBI, HAS_DROP):
    """Tensor-core kernel: NW warps x 16 rows, BC keys per tile, head dim padded to DP (multiple of 16).

    Data path (FlashAttention-2): Q, K, V tiles are copied global -> shared with 16-byte cp.async
    (zero-filled out of range), K/V double-buffered so the next tile loads while this one computes;
    fragments come from shared memory by ldmatrix (ldmatrix.trans for V, stored row-major).
    Shared rows are padded by 16 bytes so the 8 rows of an ldmatrix phase hit distinct banks.
    """
    BR = 16 * NW
    STR = DP // 2 + 4                    # shared row stride in uint32 words (Q, K and V rows)
    NT_S, KS_D, KS_P, NT_O = BC // 8, DP // 16, BC // 16, DP // 8
    O_LEN, S_LEN = NT_O * 4, NT_S * 4    # accumulator registers per thread (constants for local.array)
    NTH = 32 * NW
    CH = DP // 8                         # 16-byte chunks per padded row
    Q_OFF = 0
    KV_OFF = BR * STR                    # stage s: K at KV_OFF + s * 2 * TILE, V right after it
    TILE = BC * STR
    SMEM = 4 * (KV_OFF + 4 * TILE)
    mma = intr.mma_bf16 if bf16 else intr.mma_f16
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2
    ld, ldsm, ldsm_t, cp16 = intr.ld, intr.ldsm_x4, intr.ldsm_x4_t, intr.cp_async16

    @_dev
    def load_rows(smem, dst0, src, row0, nrows, nrows_valid, head, tid):
        """cp.async an nrows x DP tile of src[row0 + r, head, :] into smem rows at dst0, zero-filled."""
        W = src.shape[2]
        HS = src.shape[1]
        for c in range(tid, nrows * CH, NTH):
            r = c // CH
            ch = c - r * CH
            ok = r < nrows_valid and ch * 4 < W
            src_idx = ((row0 + r) * HS + head) * W + ch * 4 if ok else 0
            cp16(smem, dst0 + r * STR + ch * 4, src, src_idx, 16 if ok else 0)

    def kernel(q, k, v, o, lse, cu_q, cu_k, slopes, scale_log2, softcap, cap_in, left, right,
               lse_a, lse_c, seed, thresh, inv_keep):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane >> 2
        t = lane & 3
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        qs = cu_q[b]
        Sq = cu_q[b + 1] - qs
        ks = cu_k[b]
        Sk = cu_k[b + 1] - ks
        qb = (Sq + BR - 1) // BR - 1 - cuda.blockIdx.x  # last (heaviest when causal) blocks first
        if qb < 0:
            return
        i0 = qb * BR
        hk = h // (q.shape[1] // k.shape[1])
        DW0 = q.shape[2]
        off = Sk - Sq
        smem = cuda.shared.array(0, uint32)
        lo, hi = _key_range(i0, i0 + BR, Sq, Sk, left, right)
        lo = (lo // BC) * BC
        load_rows(smem, Q_OFF, q, qs + i0, BR, Sq - i0, h, tid)
        if lo < hi:
            load_rows(smem, KV_OFF, k, ks + lo, BC, Sk - lo, hk, tid)
            load_rows(smem, KV_OFF + TILE, v, ks + lo, BC, Sk - lo, hk, tid)
        intr.cp_async_commit()
        # per-lane ldmatrix row starts (words): matrix m = lane // 8 supplies row lane % 8
        mrow = lane & 7
        q_lane = Q_OFF + (warp * 16 + mrow + 8 * ((lane >> 3) & 1)) * STR + 4 * (lane >> 4)
        k_lane = (mrow + 8 * (lane >> 4)) * STR + 4 * ((lane >> 3) & 1)
        v_lane = TILE + (mrow + 8 * ((lane >> 3) & 1)) * STR + 4 * (lane >> 4)
        ra = i0 + warp * 16 + g  # this thread's two rows (local to the sequence)
        rb = ra + 8
        m_a = F32_NEG_INF
        m_b = F32_NEG_INF
        l_a = F32_ZERO
        l_b = F32_ZERO
        slope = F32_ZERO
        if HAS_ALIBI:
            slope = slopes[b, h] * F32_LOG2E
        rk_a = row_key(seed, b, h, ra)
        rk_b = row_key(seed, b, h, rb)
        oacc = cuda.local.array(O_LEN, float32)
        for x in range(O_LEN):
            oacc[x] = F32_ZERO
        sacc = cuda.local.array(S_LEN, float32)
        stage = 0
        for j0 in range(lo, hi, BC):
            kv0 = KV_OFF + stage * 2 * TILE
            if j0 + BC < hi:  # prefetch the next K/V tile into the other stage
                nxt = KV_OFF + (1 - stage) * 2 * TILE
                load_rows(smem, nxt, k, ks + j0 + BC, BC, Sk - j0 - BC, hk, tid)
                load_rows(smem, nxt + TILE, v, ks + j0 + BC, BC, Sk - j0 - BC, hk, tid)
                intr.cp_async_commit()
                intr.cp_async_wait1()
            else:
                intr.cp_async_wait0()
            cuda.syncthreads()
            # ---- S = Q K^T (16 x BC per warp)
            for x in range(S_LEN):
                sacc[x] = F32_ZERO
            for kk in range(KS_D):
                a0, a1, a2, a3 = ldsm(smem, q_lane + kk * 8)
                for np2 in range(NT_S // 2):
                    b0, b1, b2, b3 = ldsm(smem, kv0 + k_lane + np2 * 16 * STR + kk * 8)
                    x = np2 * 8
                    d0, d1, d2, d3 = mma(a0, a1, a2, a3, b0, b1, sacc[x], sacc[x + 1], sacc[x + 2], sacc[x + 3])
                    sacc[x] = d0
                    sacc[x + 1] = d1
                    sacc[x + 2] = d2
                    sacc[x + 3] = d3
                    d0, d1, d2, d3 = mma(a0, a1, a2, a3, b2, b3, sacc[x + 4], sacc[x + 5], sacc[x + 6], sacc[x + 7])
                    sacc[x + 4] = d0
                    sacc[x + 5] = d1
                    sacc[x + 6] = d2
                    sacc[x + 7] = d3
            # ---- logits in log2 units, masks
            need_mask = j0 + BC > Sk
            if left >= 0:
                need_mask = need_mask or j0 < i0 + BR - 1 + off - left
            if right >= 0:
                need_mask = need_mask or j0 + BC - 1 > i0 + off + right
            mx_a = F32_NEG_INF
            mx_b = F32_NEG_INF
            for x in range(S_LEN):
                s = sacc[x]
                if HAS_CAP:
                    s = softcap * math.tanh(s * cap_in) * F32_LOG2E
                else:
                    s = s * scale_log2
                col = j0 + (x >> 2) * 8 + 2 * t + (x & 1)
                row = ra if (x & 2) == 0 else rb
                if HAS_ALIBI:
                    s -= slope * float32(abs(row + off - col))
                if need_mask:
                    if not _visible(row, col, Sk, off, left, right):
                        s = F32_NEG_INF
                sacc[x] = s
                if (x & 2) == 0:
                    mx_a = max(mx_a, s)
                else:
                    mx_b = max(mx_b, s)
            mx_a = max(mx_a, shfl_xor(mx_a, 1))
            mx_a = max(mx_a, shfl_xor(mx_a, 2))
            mx_b = max(mx_b, shfl_xor(mx_b, 1))
            mx_b = max(mx_b, shfl_xor(mx_b, 2))
            mn_a = max(m_a, mx_a)
            mn_b = max(m_b, mx_b)
            mu_a = F32_ZERO if mn_a == F32_NEG_INF else mn_a
            mu_b = F32_ZERO if mn_b == F32_NEG_INF else mn_b
            alpha_a = ex2(m_a - mu_a)
            alpha_b = ex2(m_b - mu_b)
            m_a = mn_a
            m_b = mn_b
            sum_a = F32_ZERO
            sum_b = F32_ZERO
            for x in range(S_LEN):
                if (x & 2) == 0:
                    p = ex2(sacc[x] - mu_a)
                    sum_a += p
                else:
                    p = ex2(sacc[x] - mu_b)
                    sum_b += p
                if HAS_DROP:  # dropout: P is dropped after the row sum, as in the math
                    col = j0 + (x >> 2) * 8 + 2 * t + (x & 1)
                    rk = rk_a if (x & 2) == 0 else rk_b
                    p = p * inv_keep if col_hash(rk, col) >= thresh else F32_ZERO
                sacc[x] = p
            l_a = l_a * alpha_a + sum_a
            l_b = l_b * alpha_b + sum_b
            for nt in range(NT_O):
                oacc[nt * 4] *= alpha_a
                oacc[nt * 4 + 1] *= alpha_a
                oacc[nt * 4 + 2] *= alpha_b
                oacc[nt * 4 + 3] *= alpha_b
            # ---- O += P V, P straight from the S accumulators, V fragments by ldmatrix.trans
            for kk in range(KS_P):
                s0 = 8 * kk
                a0 = pack(sacc[s0], sacc[s0 + 1])
                a1 = pack(sacc[s0 + 2], sacc[s0 + 3])
                a2 = pack(sacc[s0 + 4], sacc[s0 + 5])
                a3 = pack(sacc[s0 + 6], sacc[s0 + 7])
                for np2 in range(NT_O // 2):
                    b0, b1, b2, b3 = ldsm_t(smem, kv0 + v_lane + kk * 16 * STR + np2 * 8)
                    x = np2 * 8
                    d0, d1, d2, d3 = mma(a0, a1, a2, a3, b0, b1, oacc[x], oacc[x + 1], oacc[x + 2], oacc[x + 3])
                    oacc[x] = d0
                    oacc[x + 1] = d1
                    oacc[x + 2] = d2
                    oacc[x + 3] = d3
                    d0, d1, d2, d3 = mma(a0, a1, a2, a3, b2, b3, oacc[x + 4], oacc[x + 5], oacc[x + 6], oacc[x + 7])
                    oacc[x + 4] = d0
                    oacc[x + 5] = d1
                    oacc[x + 6] = d2
                    oacc[x + 7] = d3
            stage = 1 - stage
            cuda.syncthreads()  # every warp is done with this stage before it is refilled
        intr.cp_async_wait0()
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
                    o[qs + ra, h, w] = pack(oacc[nt * 4] * inv_a, oacc[nt * 4 + 1] * inv_a)
                if rb < Sq:
                    o[qs + rb, h, w] = pack(oacc[nt * 4 + 2] * inv_b, oacc[nt * 4 + 3] * inv_b)
        if t == 0:
            base = qs * lse_a + h * lse_c
            if ra < Sq:
                mu = F32_ZERO if m_a == F32_NEG_INF else m_a
                lse[base + ra] = (mu + math.log2(l_a)) * F32_LN2 if l_a > F32_ZERO else F32_NEG_INF
            if rb < Sq:
                mu = F32_ZERO if m_b == F32_NEG_INF else m_b
                lse[base + rb] = (mu + math.log2(l_b)) * F32_LN2 if l_b > F32_ZERO else F32_NEG_INF

    return _jit_kernel(kernel), BR, NTH, SMEM


@functools.lru_cache(maxsize=None)
def _make_simt(NW, RW, DD, f64):
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
        qs = cu_q[b]
        Sq = cu_q[b + 1] - qs
        ks = cu_k[b]
        Sk = cu_k[b + 1] - ks
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
        lo, hi = _key_range(i0, i0 + BR, Sq, Sk, left, right)
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
            for idx in range(tid, 32 * DP, NTH):
                r = idx // DP
                d = idx - r * DP
                kv = ZERO
                vv = ZERO
                if j0 + r < Sk and d < D:
                    kv = k[ks + j0 + r, hk, d]
                    vv = v[ks + j0 + r, hk, d]
                Ks[r * KSTR + d] = kv
                Vs[idx] = vv
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
                if not _visible(row, col, Sk, off, left, right):
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

    return _jit_kernel(kernel), BR, NTH, SMEM


def _jit_kernel(fn):
    if intr.SIM:
        return cuda.jit(fn)
    return cuda.jit(fn, fastmath=False, lineinfo=False)


# ---- tile choices ---------------------------------------------------------------------------------
#: tensor-core tiles for real GPUs and for the simulator (tiny, so CI can afford them)
TC_TILES = {"gpu": (8, 64), "sim": (1, 16)}
#: per head dim, measured on the H200 (benchmarks/results): 4 warps x 128 keys wins at D <= 64
TC_TILES_SMALL_D = (4, 128)
SIMT_TILES = {"gpu": (4, 4), "sim": (1, 2)}


def tc_config(D):
    nw, bc = TC_TILES["sim" if intr.SIM else "gpu"]
    if not intr.SIM and D <= 64:
        nw, bc = TC_TILES_SMALL_D
    DP = max(16, -(-D // 16) * 16)
    return nw, bc, DP


def _pad_multiple(D):
    """Head dims the tensor-core kernel takes as they are: rows of whole 16-byte chunks."""
    return -(-D // 8) * 8


def simt_config(D):
    nw, rw = SIMT_TILES["sim" if intr.SIM else "gpu"]
    return nw, rw, -(-D // 32)


@functools.lru_cache(maxsize=64)
def _const_device(data, dtype, shape):
    """Small read-only device arrays (cu_seqlens, slopes) cached by content: no copy per call."""
    return cuda.to_device(np.frombuffer(data, dtype=dtype).reshape(shape))


def _cached(x):
    x = np.ascontiguousarray(x)
    return _const_device(x.tobytes(), x.dtype.str, x.shape)


def _as_words(x, D):
    """Device uint32 view (T, H, Dp/2) of a float16/bfloat16 (T, H, D) host or device array, the head dim
    zero-padded to Dp = a multiple of 8 (whole 16-byte chunks) when it is not one already."""
    pad = _pad_multiple(D) - D
    if dsp.is_device_array(x):
        x = dsp.to_device(x)
        if pad:
            x = cuda.to_device(np.pad(x.copy_to_host().view(np.uint16), ((0, 0), (0, 0), (0, pad))))
        return x.view(np.uint16).view(np.uint32)
    h = np.ascontiguousarray(x).view(np.uint16)
    if pad:
        h = np.pad(h, ((0, 0), (0, 0), (0, pad)))
    return cuda.to_device(np.ascontiguousarray(h).view(np.uint32))


def _scalars(ft, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed):
    cap_in = scale / softcap if softcap > 0 else 0.0
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 0.0
    return (ft(scale * LOG2E), ft(softcap), ft(cap_in), np.int32(left), np.int32(right), np.int64(lse_a),
            np.int64(lse_c), np.uint64(seed), keep_threshold(dropout_p), ft(inv_keep))


def flash_fwd_cuda_words(qw, kw, vw, cu_q, cu_k, max_sq, bf16, scale, left, right, softcap=0.0, dropout_p=0.0,
                         slopes=None, seed=0, lse_a=None, lse_c=None, D=None, out=None, lse=None):
    """Tensor-core forward on device words: qw (Tq, H, W), kw/vw (Tk, Hk, W) uint32 device arrays holding two
    float16/bfloat16 values per word (W = ceil(D/2)). Returns (out words (Tq, H, W) uint32, lse (H*Tq,) f32),
    written into ``out`` / ``lse`` when given."""
    Tq, H, W = qw.shape
    D = 2 * W if D is None else D
    lse_a, lse_c = (1, Tq) if lse_a is None else (lse_a, lse_c)
    nw, bc, DP = tc_config(D)
    kern, BR, NTH, SMEM = _make_tc(nw, bc, DP, bool(bf16), softcap > 0, slopes is not None, dropout_p > 0)
    out = cuda.device_array((Tq, H, W), dtype=np.uint32) if out is None else out
    lse = cuda.device_array(H * Tq, dtype=np.float32) if lse is None else lse
    sl = np.zeros((0, 0), np.float32) if slopes is None else np.asarray(slopes, np.float32)
    grid = (max(1, -(-max_sq // BR)), H, len(cu_q) - 1)
    args = (qw, kw, vw, out, lse, _cached(np.asarray(cu_q, np.int32)), _cached(np.asarray(cu_k, np.int32)),
            _cached(sl)) + _scalars(np.float32, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed)
    intr.launch(kern, grid, NTH, SMEM, args)
    return out, lse


def flash_fwd_cuda(q, k, v, cu_q, cu_k, max_sq, dt, scale, left, right, softcap, dropout_p, slopes, seed,
                   lse_a, lse_c):
    """Packed forward on the GPU; returns device arrays out (Tq, H, D) and lse (H*Tq,) float32.
    float16 / bfloat16 run on tensor cores (bfloat16 output comes back as its uint16 bits),
    float32 / float64 on CUDA cores."""
    Tq, H, D = q.shape
    if dt in (np.dtype(np.float16), dsp.bfloat16):
        ow, lse = flash_fwd_cuda_words(_as_words(q, D), _as_words(k, D), _as_words(v, D), cu_q, cu_k, max_sq,
                                       dt == dsp.bfloat16, scale, left, right, softcap, dropout_p, slopes, seed,
                                       lse_a, lse_c, D)
        out = ow.view(np.uint16)
        if out.shape[2] != D:
            out = cuda.to_device(np.ascontiguousarray(out.copy_to_host()[..., :D]))
        return _words_to_dtype(out, dt), lse
    ft = np.float64 if dt == np.float64 else np.float32
    nw, rw, dd = simt_config(D)
    kern, BR, NTH, SMEM = _make_simt(nw, rw, dd, dt == np.float64)
    qa, ka, va = (dsp.to_device(x) for x in (q, k, v))
    out = cuda.device_array((Tq, H, D), dtype=dt)
    lse = cuda.device_array(H * Tq, dtype=np.float32)
    sl = np.zeros((0, 0), dtype=ft) if slopes is None else np.ascontiguousarray(slopes, dtype=ft)
    grid = (max(1, -(-max_sq // BR)), H, len(cu_q) - 1)
    args = (qa, ka, va, out, lse, _cached(np.asarray(cu_q, np.int32)), _cached(np.asarray(cu_k, np.int32)),
            _cached(sl)) + _scalars(ft, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed)
    intr.launch(kern, grid, NTH, SMEM, args)
    return out, lse


def _words_to_dtype(u16, dt):
    """Device array of raw uint16 halves -> device array of dtype ``dt``. float16 is a free view;
    bfloat16 stays as its uint16 bits, which numba device arrays can carry (``_dispatch.to_host``
    restores the dtype on the way back to the host)."""
    if dt == np.float16:
        return u16.view(np.float16)
    return u16


def ptx_signatures(head_dims=(64, 128, 256)):
    """(name, python function, numba signature) of every real kernel configuration, for PTX checks."""
    from numba import types

    def sig(elem, ft):
        arr3 = types.Array(elem, 3, "C")
        i32 = types.Array(types.int32, 1, "C")
        return (arr3, arr3, arr3, arr3, types.Array(types.float32, 1, "C"), i32, i32, types.Array(ft, 2, "C"),
                ft, ft, ft, types.int32, types.int32, types.int64, types.int64, types.uint64, types.uint64, ft)

    out = []
    for D in head_dims:
        nw, bc, DP = tc_config(D)
        for bf16, flags in ((False, (False, False, False)), (True, (False, False, False)), (True, (True, True, True))):
            kern = _make_tc(nw, bc, DP, bf16, *flags)[0]
            name = f"tc_{'bf16' if bf16 else 'f16'}{'_cap_alibi_drop' if flags[0] else ''}_D{D}"
            out.append((name, kern.py_func, sig(types.uint32, types.float32)))
        nw, rw, dd = simt_config(D)
        for f64 in (False, True):
            ft = types.float64 if f64 else types.float32
            out.append((f"simt_{'f64' if f64 else 'f32'}_D{D}", _make_simt(nw, rw, dd, f64)[0].py_func, sig(ft, ft)))
    return out
