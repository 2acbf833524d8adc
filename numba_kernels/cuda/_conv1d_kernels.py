"""Causal depthwise conv1d CUDA kernels (built by cached factories keyed by element kind, W and tiles);
the host side and the design notes are in ``numba_kernels.cuda.causal_conv1d``.

bfloat16 travels as uint16 bits: widened with ``float32 bits = u16 << 16`` and narrowed with
round-to-nearest-even on the bits, through a bitcast intrinsic (a NumPy view under the simulator).
"""
import functools
import math

import numpy as np
from numba import cuda, float32, float64, int32, int64, uint16

from numba_kernels import _dispatch as dsp
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._attn_common import dev, jit_kernel

if not intr.SIM:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def bits_to_f32(typingctx, u):
        """float32 with the bits of the integer ``u`` (truncated to 32 bits)."""
        def codegen(context, builder, signature, args):
            v = context.cast(builder, args[0], signature.args[0], types.uint32)
            return builder.bitcast(v, ir.FloatType())

        return types.float32(u), codegen

    @intrinsic
    def f32_to_bits(typingctx, f):
        """The bits of float32 ``f`` as uint32."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen
else:
    def bits_to_f32(u):
        return np.array([int(u) & 0xFFFFFFFF], np.uint32).view(np.float32)[0]

    def f32_to_bits(f):
        return int(np.array([f], np.float32).view(np.uint32)[0])


@dev
def _bf16_in(u):
    return bits_to_f32(int64(u) << 16)


@dev
def _bf16_out(v):
    u = int64(f32_to_bits(float32(v)))
    if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN stays a (quiet) NaN
        r = (u >> 16) | 0x40
    else:
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return uint16(r & 0xFFFF)


@dev
def _f32_in(v):
    return float32(v)


@dev
def _f64_in(v):
    return float64(v)


@dev
def _same(v):
    return v


def kind_of(dt):
    dt = np.dtype(dt)
    return {np.dtype(np.float16): "f16", dsp.bfloat16: "bf16", np.dtype(np.float32): "f32"}.get(dt, "f64")


ELEM = {"f16": np.float16, "bf16": np.uint16, "f32": np.float32, "f64": np.float64}


def _converters(kind):
    """(element -> compute, compute -> element, compute float type) for an element kind."""
    if kind == "bf16":
        return _bf16_in, _bf16_out, float32
    if kind == "f64":
        return _f64_in, _same, float64
    return _f32_in, _same, float32


@functools.lru_cache(maxsize=None)
def make_fwd_kernel(kind, W, TL, NT):
    cin, cout, ft = _converters(kind)
    TLW = TL + W - 1
    ZERO, ONE = ft(0.0), ft(1.0)

    def kernel(x, weight, bias, init, seq, silu, out):
        tid = cuda.threadIdx.x
        t0 = cuda.blockIdx.x * TL
        d = cuda.blockIdx.y
        b = cuda.blockIdx.z
        L = x.shape[2]
        has_seq = seq.shape[0] > 0
        xs = cuda.shared.array(TLW, ft)
        ids = cuda.shared.array(TLW, int32)
        for j in range(tid, TLW, NT):
            p = t0 + j - (W - 1)
            v = ZERO
            if p >= 0 and p < L:
                v = cin(x[b, d, p])
            elif p < 0 and init.shape[0] > 0:
                v = cin(init[b, d, W - 1 + p])
            xs[j] = v
            if has_seq:
                ids[j] = seq[b, min(max(p, 0), L - 1)]
        cuda.syncthreads()
        bd = ZERO
        if bias.shape[0] > 0:
            bd = bias[d]
        for i in range(tid, TL, NT):
            t = t0 + i
            if t < L:
                acc = bd
                if has_seq:
                    me = ids[i + W - 1]
                    for w in range(W):
                        if ids[i + w] == me:
                            acc += weight[d, w] * xs[i + w]
                else:
                    for w in range(W):
                        acc += weight[d, w] * xs[i + w]
                if silu:
                    acc = acc / (ONE + math.exp(-acc))
                out[b, d, t] = cout(acc)

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_final_kernel(kind, W):
    """final[b, d, k] = xpad[b, d, L + k] (masked by seq ids); one thread per element."""
    cin, cout, ft = _converters(kind)

    def kernel(x, init, seq, final):
        r = cuda.grid(1)
        B, D, L = x.shape
        if r >= B * D * (W - 1):
            return
        k = r % (W - 1)
        d = (r // (W - 1)) % D
        b = r // ((W - 1) * D)
        p = L + k - (W - 1)
        v = ft(0.0)
        if p >= 0:
            v = cin(x[b, d, p])
        elif init.shape[0] > 0:
            v = cin(init[b, d, W - 1 + p])
        if seq.shape[0] > 0 and seq[b, max(p, 0)] != seq[b, L - 1]:
            v = ft(0.0)
        final[b, d, k] = cout(v)

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_update_kernel(kind, W, NT):
    cin, cout, ft = _converters(kind)
    ZERO, ONE = ft(0.0), ft(1.0)

    def kernel(x, state, weight, bias, cache, silu, out):
        r = cuda.blockIdx.x * NT + cuda.threadIdx.x
        B, D, Ln = x.shape
        if r >= B * D:
            return
        b = r // D
        d = r - b * D
        S = state.shape[2]
        xw = cuda.local.array(W, ft)
        c = 0
        if cache.shape[0] > 0:
            c = cache[b]
            for k in range(W - 1):
                xw[k] = cin(state[b, d, (c - (W - 1) + k) % S])
            for i in range(Ln):
                state[b, d, (c + i) % S] = x[b, d, i]
        else:
            for k in range(W - 1):
                xw[k] = cin(state[b, d, S - (W - 1) + k])
            for s in range(S):  # state <- last S of [state, x]; reads run ahead of writes
                j = Ln + s
                if j < S:
                    state[b, d, s] = state[b, d, j]
                else:
                    state[b, d, s] = x[b, d, j - S]
        bd = ZERO
        if bias.shape[0] > 0:
            bd = bias[d]
        for i in range(Ln):
            xw[W - 1] = cin(x[b, d, i])
            acc = bd
            for w in range(W):
                acc += weight[d, w] * xw[w]
            if silu:
                acc = acc / (ONE + math.exp(-acc))
            out[b, d, i] = cout(acc)
            for w in range(W - 1):
                xw[w] = xw[w + 1]

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_bwd_kernel(kind, W, TL, NT):
    cin, cout, ft = _converters(kind)
    TX = TL + 2 * (W - 1)  # inputs of positions [t0 - (W-1), t0 + TL + W - 1)
    TG = TL + W - 1  # g of outputs [t0, t0 + TL + W - 1)
    ZERO, ONE = ft(0.0), ft(1.0)

    def kernel(dout, x, weight, bias, init, dfinal, seq, silu, dx, part, dinit):
        tid = cuda.threadIdx.x
        tile = cuda.blockIdx.x
        t0 = tile * TL
        d = cuda.blockIdx.y
        b = cuda.blockIdx.z
        L = x.shape[2]
        has_seq = seq.shape[0] > 0
        xs = cuda.shared.array(TX, ft)
        ids = cuda.shared.array(TX, int32)
        gs = cuda.shared.array(TG, ft)
        red = cuda.shared.array(NT, ft)
        for j in range(tid, TX, NT):
            p = t0 + j - (W - 1)
            v = ZERO
            if p >= 0 and p < L:
                v = cin(x[b, d, p])
            elif p < 0 and init.shape[0] > 0:
                v = cin(init[b, d, W - 1 + p])
            xs[j] = v
            ids[j] = 0
            if has_seq:
                ids[j] = seq[b, min(max(p, 0), L - 1)]
        cuda.syncthreads()
        bd = ZERO
        if bias.shape[0] > 0:
            bd = bias[d]
        for i in range(tid, TG, NT):  # g[t] = dout[t] * act'(pre[t]); xs[i + W - 1] is position t
            t = t0 + i
            g = ZERO
            if t < L:
                g = cin(dout[b, d, t])
                if silu:
                    pre = bd
                    for w in range(W):
                        if ids[i + w] == ids[i + W - 1]:
                            pre += weight[d, w] * xs[i + w]
                    s = ONE / (ONE + math.exp(-pre))
                    g = g * s * (ONE + pre * (ONE - s))
            gs[i] = g
        cuda.syncthreads()
        lastid = seq[b, L - 1] if has_seq else 0
        for i in range(tid, TL, NT):  # dx[p] = sum_w g[p + W-1-w] w[w] (same ids) (+ dfinal)
            p = t0 + i
            if p < L:
                me = ids[i + W - 1]
                acc = ZERO
                for w in range(W):
                    if ids[i + 2 * (W - 1) - w] == me:
                        acc += gs[i + W - 1 - w] * weight[d, w]
                k = p - L + W - 1
                if k >= 0 and dfinal.shape[0] > 0 and me == lastid:
                    acc += cin(dfinal[b, d, k])
                dx[b, d, p] = cout(acc)
        if tile == 0 and dinit.shape[0] > 0:
            for k in range(tid, W - 1, NT):  # xpad index k < W - 1: position k - (W - 1) < 0
                me = ids[k]
                acc = ZERO
                for w in range(min(k + 1, W)):
                    t = k - w
                    if t < L and ids[t + W - 1] == me:
                        acc += gs[t] * weight[d, w]
                kf = k - L
                if kf >= 0 and dfinal.shape[0] > 0 and me == lastid:
                    acc += cin(dfinal[b, d, kf])
                dinit[b, d, k] = cout(acc)
        for w in range(W + 1):  # dweight partials (w < W) and dbias (w == W) of this tile
            acc = ZERO
            for i in range(tid, TL, NT):
                if w == W:
                    acc += gs[i]
                elif ids[i + w] == ids[i + W - 1]:
                    acc += gs[i] * xs[i + w]
            red[tid] = acc
            cuda.syncthreads()
            h = NT // 2
            while h > 0:
                if tid < h:
                    red[tid] += red[tid + h]
                cuda.syncthreads()
                h //= 2
            if tid == 0:
                part[b, tile, d, w] = red[0]
            cuda.syncthreads()

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_sum_kernel(f64):
    ft = float64 if f64 else float32

    def kernel(part, dwb):
        """dwb[d, w] = sum over (b, tile) of part[b, tile, d, w]."""
        r = cuda.grid(1)
        B, NTL, D, W1 = part.shape
        if r >= D * W1:
            return
        d = r // W1
        w = r - d * W1
        acc = ft(0.0)
        for b in range(B):
            for tl in range(NTL):
                acc += part[b, tl, d, w]
        dwb[d, w] = acc

    return jit_kernel(kernel)
