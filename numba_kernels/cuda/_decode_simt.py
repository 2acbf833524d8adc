"""Decode attention CUDA kernels on CUDA cores, and the kernels around both decode kernels (cached factories);
the tensor-core kernel and the shared row/split helpers are in ``_decode_kernels``.

* ``make_decode_simt`` (float32/float64, and halves of any head dim): CUDA cores, lanes over the head dim,
  warps over keys, warp-shuffle dot products.
* ``make_combine`` merges split partials (the split-KV epilogue and ``attention_combine``).
* ``make_rotate`` applies rotary embeddings to q; ``make_append_kv`` appends the new k (rotated) and v to the
  caches in one launch (H200, 1 token: public call 167 us against 303 us with one launch per cache).
"""
import functools
import math

import numpy as np
from numba import cuda, float32, float64

from numba_kernels.cuda._attn_common import LN2, LOG2E, dev, jit_kernel, visible
from numba_kernels.cuda._conv1d_kernels import _converters
from numba_kernels.cuda._decode_kernels import packed_row, split_range
from numba_kernels.cuda._intrinsics import ex2, shfl_xor


@functools.lru_cache(maxsize=None)
def make_decode_simt(kind, NW, MR, DD, SPLIT):
    """CUDA-core decode kernel for element kind ``kind`` ("f16", "bf16", "f32", "f64"): NW warps over keys,
    MR packed rows per block, lanes over the head dim (DD = ceil(D / 32) values each).
    Returns (kernel, threads per block, dynamic shared bytes)."""
    cin, cout, ft = _converters(kind)
    NTH = 32 * NW
    ACC = MR * DD
    f64 = kind == "f64"
    DP = 32 * DD
    SMEM = (8 if f64 else 4) * NW * MR * (DP + 2)
    MI = 2 * NW * MR
    NEG_INF = ft(-np.inf)
    ZERO = ft(0.0)
    C_LOG2E = ft(LOG2E)
    C_LN2 = ft(LN2)

    @dev
    def exp2(x):
        if f64:
            return math.exp(x * C_LN2)
        return ex2(x)

    def kernel(q, kc, vc, table, start, end, o, lse, slopes, scale_log2, softcap, cap_in, left, right, nsplit):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        B, Sq, H, D = q.shape
        P = kc.shape[1]
        Hk = kc.shape[2]
        G = H // Hk
        M = G * Sq
        n_rt = (M + MR - 1) // MR
        rt = cuda.blockIdx.x % n_rt
        sp = cuda.blockIdx.x // n_rt
        st = start[b]
        Sk = end[b] - st
        off = Sk - Sq
        k0, k1 = split_range(Sq, Sk, left, right, sp, nsplit, NW)
        qr = cuda.local.array(ACC, ft)
        acc = cuda.local.array(ACC, ft)
        mrow = cuda.local.array(MR, ft)
        lrow = cuda.local.array(MR, ft)
        slr = cuda.local.array(MR, ft)
        kv = cuda.local.array(DD, ft)
        vv = cuda.local.array(DD, ft)
        for r in range(MR):
            R = rt * MR + r
            mrow[r] = NEG_INF
            lrow[r] = ZERO
            slr[r] = ZERO
            ok = R < M
            i, h = packed_row(R, Sq, hk, G)
            if ok and slopes.shape[0] > 0:
                slr[r] = slopes[b, h] * C_LOG2E
            for dd in range(DD):
                d = dd * 32 + lane
                acc[r * DD + dd] = ZERO
                qr[r * DD + dd] = cin(q[b, i, h, d]) if (ok and d < D) else ZERO
        for j in range(k0 + warp, k1, NW):
            p = st + j
            pg = p // P
            page = table[b, pg]
            slot = p - pg * P
            for dd in range(DD):
                d = dd * 32 + lane
                kv[dd] = cin(kc[page, slot, hk, d]) if d < D else ZERO
                vv[dd] = cin(vc[page, slot, hk, d]) if d < D else ZERO
            for r in range(MR):
                R = rt * MR + r
                i = R - (R // Sq) * Sq
                s = ZERO
                for dd in range(DD):
                    s += qr[r * DD + dd] * kv[dd]
                for sh in (16, 8, 4, 2, 1):
                    s += shfl_xor(s, sh)
                if softcap > 0:
                    s = softcap * math.tanh(s * cap_in) * C_LOG2E
                else:
                    s = s * scale_log2
                s -= slr[r] * ft(abs(i + off - j))
                if not visible(i, j, k1, off, left, right):
                    s = NEG_INF
                mn = max(mrow[r], s)
                if mn != NEG_INF:
                    alpha = exp2(mrow[r] - mn)
                    pr = exp2(s - mn)
                    lrow[r] = lrow[r] * alpha + pr
                    mrow[r] = mn
                    for dd in range(DD):
                        acc[r * DD + dd] = acc[r * DD + dd] * alpha + pr * vv[dd]
        cuda.syncthreads()
        ef = cuda.shared.array(0, ft)
        if lane == 0:
            for r in range(MR):
                ef[warp * MR + r] = mrow[r]
                ef[NW * MR + warp * MR + r] = lrow[r]
        for r in range(MR):
            for dd in range(DD):
                ef[MI + (warp * MR + r) * DP + dd * 32 + lane] = acc[r * DD + dd]
        cuda.syncthreads()
        for x in range(tid, MR * DP, NTH):
            r = x // DP
            c = x - r * DP
            R = rt * MR + r
            if R < M and c < D:
                i, h = packed_row(R, Sq, hk, G)
                mx = NEG_INF
                for w in range(NW):
                    mx = max(mx, ef[w * MR + r])
                mu = ZERO if mx == NEG_INF else mx
                tot = ZERO
                val = ZERO
                for w in range(NW):
                    e = exp2(ef[w * MR + r] - mu)
                    tot += e * ef[NW * MR + w * MR + r]
                    val += e * ef[MI + (w * MR + r) * DP + c]
                inv = ZERO if tot == ZERO else ft(1.0) / tot
                if SPLIT:
                    o[sp, b, i, h, c] = val * inv
                else:
                    o[b, i, h, c] = cout(val * inv)
                if c == 0:
                    lv = (mu + math.log2(tot)) * C_LN2 if tot > ZERO else NEG_INF
                    if SPLIT:
                        lse[sp, b, h, i] = lv
                    else:
                        lse[b, h, i] = lv

    return jit_kernel(kernel), NTH, SMEM


@functools.lru_cache(maxsize=None)
def make_combine(in_kind, out_kind, NTH):
    """Merge kernel over the grid (H, Sq, B): o_p (S, B, Sq, H, D), lse_p (S, B, H, Sq) -> out (B, Sq, H, D)
    in ``out_kind`` elements, lse (B, H, Sq). NTH threads (a multiple of 32). The split weights
    exp(lse_s - max) are computed once per block into shared memory (up to MAXS splits; more fall back to
    recomputing them) after warp-shuffle reductions of the max and the sum; each thread then reads its
    partials ``UNROLL`` splits at a time with unconditional loads (clamped indices), so that many are in
    flight at once (a load under ``if w != 0`` made every split a dependent memory round trip: 16.0 us for
    16 splits and 23.5 us for 33 under ncu on the H200, 2026-12-03). Splits are summed in order 0 .. S-1, as before."""
    cin, _, ft = _converters(in_kind)
    _, cout, _ = _converters(out_kind)
    ft = float64 if "f64" in (in_kind, out_kind) else float32
    NEG_INF = ft(-np.inf)
    ZERO = ft(0.0)
    MAXS = 256
    NWC = NTH // 32
    NWC2 = 2 * NWC
    UNROLL = 8
    assert NTH % 32 == 0

    def kernel(o_p, lse_p, out, lse):
        h = cuda.blockIdx.x
        i = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        S = o_p.shape[0]
        D = o_p.shape[4]
        wts = cuda.shared.array(MAXS, ft)
        red = cuda.shared.array(NWC2, ft)
        mx = NEG_INF
        for s in range(tid, S, NTH):
            mx = max(mx, ft(lse_p[s, b, h, i]))
        for k in (16, 8, 4, 2, 1):
            mx = max(mx, shfl_xor(mx, k))
        if lane == 0:
            red[warp] = mx
        cuda.syncthreads()
        mx = NEG_INF
        for x in range(NWC):
            mx = max(mx, red[x])
        mu = ZERO if mx == NEG_INF else mx
        tot = ZERO
        for s in range(tid, S, NTH):
            wv = math.exp(ft(lse_p[s, b, h, i]) - mu)
            if s < MAXS:
                wts[s] = wv
            tot += wv
        for k in (16, 8, 4, 2, 1):
            tot += shfl_xor(tot, k)
        if lane == 0:
            red[NWC + warp] = tot
        cuda.syncthreads()
        tot = ZERO
        for x in range(NWC):
            tot += red[NWC + x]
        inv = ZERO if tot == ZERO else ft(1.0) / tot
        xs = cuda.local.array(UNROLL, ft)
        for d in range(tid, D, NTH):
            val = ZERO
            for s0 in range(0, S, UNROLL):
                for j in range(UNROLL):
                    xs[j] = ft(cin(o_p[min(s0 + j, S - 1), b, i, h, d]))
                for j in range(UNROLL):
                    s = s0 + j
                    if s < S:
                        if S <= MAXS:
                            wv = wts[s]
                        else:
                            lv = ft(lse_p[s, b, h, i])
                            wv = ZERO if lv == NEG_INF else math.exp(lv - mu)
                        if wv != ZERO:
                            val += wv * xs[j]
            out[b, i, h, d] = cout(val * inv)
        if tid == 0:
            lse[b, h, i] = mu + math.log(tot) if tot > ZERO else NEG_INF

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_rotary_elem(kind):
    """rot(src, b, t, x, d, pos, cos, sin, interleaved): element d of row src[b, t, x, :] after the rotary embedding
    at position ``pos`` (interleaved pairs or NeoX halves; dims past 2 * cos.shape[1] unrotated), in the compute
    dtype."""
    cin, _, ft = _converters(kind)

    @dev
    def rot(src, b, t, x, d, pos, cos, sin, interleaved):
        half = cos.shape[1]
        val = cin(src[b, t, x, d])
        if d < 2 * half:
            if interleaved:
                j = d >> 1
                partner = cin(src[b, t, x, d ^ 1])
                sgn = ft(-1.0) if (d & 1) == 0 else ft(1.0)
            else:
                j = d if d < half else d - half
                partner = cin(src[b, t, x, d + half]) if d < half else cin(src[b, t, x, d - half])
                sgn = ft(-1.0) if d < half else ft(1.0)
            val = val * ft(cos[pos, j]) + sgn * partner * ft(sin[pos, j])
        return val

    return rot


@functools.lru_cache(maxsize=None)
def make_append_kv(kind, ROTATE, NTH):
    """Append the new tokens of k (rotated when ROTATE) and v into their caches at position ``pos0[b] + t`` through
    ``table``, in one launch: grid (Hk, Snew, B), k_new / v_new (B, Snew, Hk, D), caches (pages, page, Hk, D).
    cos/sin (seqlen_ro, rotary_dim / 2) in the compute dtype (any array when not ROTATE)."""
    cin, cout, _ = _converters(kind)
    rot = make_rotary_elem(kind)

    def kernel(k_new, k_cache, v_new, v_cache, table, pos0, cos, sin, interleaved):
        x = cuda.blockIdx.x
        t = cuda.blockIdx.y
        b = cuda.blockIdx.z
        p = pos0[b] + t
        P = k_cache.shape[1]
        pg = p // P
        page = table[b, pg]
        slot = p - pg * P
        for d in range(cuda.threadIdx.x, k_new.shape[3], NTH):
            if ROTATE:
                k_cache[page, slot, x, d] = cout(rot(k_new, b, t, x, d, p, cos, sin, interleaved))
            else:
                k_cache[page, slot, x, d] = k_new[b, t, x, d]
            v_cache[page, slot, x, d] = v_new[b, t, x, d]

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_rotate(kind, NTH):
    """Rotary embedding of query rows src[b, t, x, :] at position ``pos0[b] + t * step`` written to
    ``dst[b, t, x, :]``. Grid (X, S, B). cos/sin (seqlen_ro, rotary_dim / 2) float32."""
    _, cout, _ = _converters(kind)
    rot = make_rotary_elem(kind)

    def kernel(src, dst, pos0, step, cos, sin, interleaved):
        x = cuda.blockIdx.x
        t = cuda.blockIdx.y
        b = cuda.blockIdx.z
        pos = pos0[b] + t * step
        for d in range(cuda.threadIdx.x, src.shape[3], NTH):
            dst[b, t, x, d] = cout(rot(src, b, t, x, d, pos, cos, sin, interleaved))

    return jit_kernel(kernel)
