"""Single-kernel FFT convolution for FFT sizes that fit in shared memory (FlashFFTConv's regime, N <= 16384).

One block convolves two rows of the same channel h at once: z = a + i b (a = u[b0, h] * pregate, b = u[b0 + 1, h]
* pregate, zero-padded to N) is transformed by a complex FFT of size N in shared memory, multiplied by the full
spectrum K of the real filter, and transformed back; because K is the spectrum of a real filter, the real part of
the result is conv(a, k) and the imaginary part conv(b, k). The crop, the bias (skip) term, the postgate and the
cast to the element type happen in the same kernel, so u is read once and y written once: no padded buffer, no
spectrum in global memory, no cuFFT call.

Transforms: the forward is a radix-2 decimation-in-frequency FFT (natural order in, bit-reversed order out), the
inverse a radix-2 decimation-in-time FFT with conjugate twiddles (bit-reversed in, natural out), so no
permutation pass is needed: the filter spectrum is stored in bit-reversed order (``make_expand_kernel``) with the
1 / N scale folded in. Twiddles W^m = exp(-2 pi i m / N), m < N / 2, come from a float64-computed table (global,
copied to shared memory once per block). fp32 arithmetic throughout (inputs float16 / bfloat16 / float32).

Shared memory: re[N], im[N], twiddles 2 x N / 2 floats = 12 N bytes (N 8192: 96 KB, dynamic).
"""
import functools

import numpy as np
from numba import cuda, float32, int32

from numba_kernels.cuda._attn_common import jit_kernel
from numba_kernels.cuda._conv1d_kernels import _converters


def smem_bytes(N):
    """Dynamic shared memory of the fused kernel for FFT size N."""
    return 12 * N


def threads(N, sim=False):
    """Threads per block for FFT size N (one to a few butterflies per thread per stage)."""
    if sim:
        return max(1, min(N // 2, 8))
    return max(32, min(N // 2, 512))


_TW = {}


def twiddles(N):
    """Host float32 (N,) table: [2m] = cos(-2 pi m / N), [2m + 1] = sin(-2 pi m / N), m < N / 2 (computed in
    float64)."""
    t = _TW.get(N)
    if t is None:
        m = np.arange(N // 2, dtype=np.float64)
        ang = -2.0 * np.pi * m / N
        t = np.empty(N, np.float32)
        t[0::2], t[1::2] = np.cos(ang), np.sin(ang)
        _TW[N] = t
    return t


@functools.lru_cache(maxsize=None)
def make_expand_kernel(LOGN, NT):
    """Kp[h, 2p], Kp[h, 2p + 1] = K[f] / N with f = bitreverse(p) over LOGN bits, from the half spectrum
    Kh (1, H, 2F) of a real filter (K[f] = conj(Kh[N - f]) for f > N / 2). Grid (ceil(N / NT), H)."""
    N = 1 << LOGN
    HALF = N // 2
    INV = float32(1.0 / N)

    def kernel(Kh, Kp):
        p = cuda.blockIdx.x * NT + cuda.threadIdx.x
        h = cuda.blockIdx.y
        if p < N:
            f = 0
            x = p
            for _ in range(LOGN):
                f = (f << 1) | (x & 1)
                x >>= 1
            if f <= HALF:
                kr = Kh[0, h, 2 * f]
                ki = Kh[0, h, 2 * f + 1]
            else:
                kr = Kh[0, h, 2 * (N - f)]
                ki = -Kh[0, h, 2 * (N - f) + 1]
            Kp[h, 2 * p] = kr * INV
            Kp[h, 2 * p + 1] = ki * INV

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_fused_kernel(kind, LOGN, NT):
    """The fused conv for element kind ``kind`` ("f16" | "bf16" | "f32"), FFT size 2^LOGN, NT threads.

    kernel(u (B, H, L), pre (B, H, L) | empty, post (B, H, Lout) | empty, bias (H,) float32 | empty,
    Kp (H, 2N) float32 (``make_expand_kernel``), tw (N,) float32 (``twiddles``), out (B, H, Lout), start):
    out[b, h, t] = (conv(u * pre, k)[(t + start) mod N] + bias[h] u[b, h, t] pre[b, h, t] (t < L)) * post[b, h, t].
    Grid (ceil(B / 2), H); dynamic shared memory ``smem_bytes(N)``.
    """
    cin, cout, _ = _converters(kind)
    N = 1 << LOGN
    HALF = N // 2
    ZERO = float32(0.0)

    def kernel(u, pre, post, bias, Kp, tw, out, start):
        sm = cuda.shared.array(0, float32)
        tid = cuda.threadIdx.x
        h = cuda.blockIdx.y
        b0 = 2 * cuda.blockIdx.x
        B = u.shape[0]
        L = u.shape[2]
        Lout = out.shape[2]
        two = b0 + 1 < B
        # shared layout: re [0, N), im [N, 2N), twiddle re / im interleaved [2N, 3N)
        for m in range(tid, N, NT):
            sm[2 * N + m] = tw[m]
            a = ZERO
            c = ZERO
            if m < L:
                a = cin(u[b0, h, m])
                if two:
                    c = cin(u[b0 + 1, h, m])
                if pre.shape[0] > 0:
                    a *= cin(pre[b0, h, m])
                    if two:
                        c *= cin(pre[b0 + 1, h, m])
            sm[m] = a
            sm[N + m] = c
        cuda.syncthreads()
        # forward: decimation in frequency, spans HALF, HALF / 2, ..., 1
        lh = LOGN - 1
        while lh >= 0:
            hs = int32(1) << lh
            for p in range(tid, HALF, NT):
                j = p & (hs - 1)
                i0 = ((p >> lh) << (lh + 1)) + j
                i1 = i0 + hs
                w = 2 * N + 2 * (j << (LOGN - 1 - lh))
                wr = sm[w]
                wi = sm[w + 1]
                ar = sm[i0]
                ai = sm[N + i0]
                br = sm[i1]
                bi = sm[N + i1]
                sm[i0] = ar + br
                sm[N + i0] = ai + bi
                dr = ar - br
                di = ai - bi
                sm[i1] = dr * wr - di * wi
                sm[N + i1] = dr * wi + di * wr
            cuda.syncthreads()
            lh -= 1
        # pointwise: the bit-reversed spectrum times the bit-reversed filter spectrum (1 / N included)
        for m in range(tid, N, NT):
            kr = Kp[h, 2 * m]
            ki = Kp[h, 2 * m + 1]
            zr = sm[m]
            zi = sm[N + m]
            sm[m] = zr * kr - zi * ki
            sm[N + m] = zr * ki + zi * kr
        cuda.syncthreads()
        # inverse: decimation in time with conjugate twiddles, spans 1, 2, ..., HALF
        lh = 0
        while lh < LOGN:
            hs = int32(1) << lh
            for p in range(tid, HALF, NT):
                j = p & (hs - 1)
                i0 = ((p >> lh) << (lh + 1)) + j
                i1 = i0 + hs
                w = 2 * N + 2 * (j << (LOGN - 1 - lh))
                wr = sm[w]
                wi = -sm[w + 1]
                br = sm[i1]
                bi = sm[N + i1]
                tr = br * wr - bi * wi
                ti = br * wi + bi * wr
                ar = sm[i0]
                ai = sm[N + i0]
                sm[i0] = ar + tr
                sm[N + i0] = ai + ti
                sm[i1] = ar - tr
                sm[N + i1] = ai - ti
            cuda.syncthreads()
            lh += 1
        # crop (+ skip term, postgate, cast)
        hb = bias.shape[0] > 0
        for t in range(tid, Lout, NT):
            j = t + start
            if j >= N:
                j -= N
            ya = sm[j]
            yb = sm[N + j]
            if hb and t < L:
                sa = bias[h] * cin(u[b0, h, t])
                if pre.shape[0] > 0:
                    sa *= cin(pre[b0, h, t])
                ya += sa
                if two:
                    sb = bias[h] * cin(u[b0 + 1, h, t])
                    if pre.shape[0] > 0:
                        sb *= cin(pre[b0 + 1, h, t])
                    yb += sb
            if post.shape[0] > 0:
                ya *= cin(post[b0, h, t])
                if two:
                    yb *= cin(post[b0 + 1, h, t])
            out[b0, h, t] = cout(ya)
            if two:
                out[b0 + 1, h, t] = cout(yb)

    return jit_kernel(kernel)
