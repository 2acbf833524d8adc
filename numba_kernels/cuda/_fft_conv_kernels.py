"""FFT-conv CUDA kernels around the cuFFT transforms (built by cached factories keyed by element kind);
the host side and the data flow are in ``numba_kernels.cuda.fft_conv``.

Spectra live in cuFFT's in-place padded layout: a real buffer (R, H, 2F), F = N // 2 + 1, where entry f of
a row is the complex value (buf[..., 2f], buf[..., 2f + 1]). Every kernel is one thread per element with
grid (ceil(n / NT), H, B); absent optional inputs are empty arrays (shape[0] == 0).
"""
import functools

from numba import cuda, float32, float64

from numba_kernels.cuda._attn_common import jit_kernel
from numba_kernels.cuda._conv1d_kernels import _converters

#: threads per block (any multiple of 32 on the GPU; small under the simulator)
NT_GPU, NT_SIM = 256, 16


@functools.lru_cache(maxsize=None)
def make_pad_kernel(kind, NT):
    """buf[b, h, j] = x[b, h, j] * g[b, h, j] for j < Lx, 0 for Lx <= j < 2F (x, g in the element kind)."""
    cin, _, ft = _converters(kind)
    ZERO = ft(0.0)

    def kernel(x, g, buf):
        j = cuda.blockIdx.x * NT + cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        if j < buf.shape[2]:
            v = ZERO
            if j < x.shape[2]:
                v = cin(x[b, h, j])
                if g.shape[0] > 0:
                    v *= cin(g[b, h, j])
            buf[b, h, j] = v

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_cmul_kernel(double, NT):
    """X[b, h, f] *= K[0, h, f] (conj(K) when conj != 0), complex values interleaved, in place."""

    def kernel(X, K, conj):
        f = cuda.blockIdx.x * NT + cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        if 2 * f + 1 < X.shape[2]:
            xr = X[b, h, 2 * f]
            xi = X[b, h, 2 * f + 1]
            kr = K[0, h, 2 * f]
            ki = K[0, h, 2 * f + 1]
            if conj != 0:
                ki = -ki
            X[b, h, 2 * f] = xr * kr - xi * ki
            X[b, h, 2 * f + 1] = xr * ki + xi * kr

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_conj_sum_kernel(double, NT):
    """S[0, h, f] = sum_b G[b, h, f] * conj(V[b, h, f]) (the filter gradient's spectrum)."""
    ZERO = float64(0.0) if double else float32(0.0)

    def kernel(G, V, S):
        f = cuda.blockIdx.x * NT + cuda.threadIdx.x
        h = cuda.blockIdx.y
        if 2 * f + 1 < G.shape[2]:
            sr = ZERO
            si = ZERO
            for b in range(G.shape[0]):
                gr = G[b, h, 2 * f]
                gi = G[b, h, 2 * f + 1]
                vr = V[b, h, 2 * f]
                vi = V[b, h, 2 * f + 1]
                sr += gr * vr + gi * vi
                si += gi * vr - gr * vi
            S[0, h, 2 * f] = sr
            S[0, h, 2 * f + 1] = si

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_crop_kernel(kind, NT):
    """value = full[b', h, (t + off) % N] * scale + bias[h] * sx[b, h, t] * sg[b, h, t] (t < L, when bias is
    given; b' = 0 when full has one row); out1 = value * g1, out2 = value * g2 (empty gate = 1, empty out =
    not written). full (B | 1, H, 2F) compute dtype; sx, sg, g1, g2, out1, out2 in the element kind."""
    cin, cout, ft = _converters(kind)

    def kernel(full, scale, off, N, sx, sg, bias, L, g1, g2, out1, out2):
        t = cuda.blockIdx.x * NT + cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        Lout = out1.shape[2] if out1.shape[0] > 0 else out2.shape[2]
        if t < Lout:
            j = t + off
            if j >= N:
                j -= N
            fb = b if full.shape[0] > 1 else 0
            val = full[fb, h, j] * scale
            if bias.shape[0] > 0 and t < L:
                s = bias[h] * cin(sx[b, h, t])
                if sg.shape[0] > 0:
                    s *= cin(sg[b, h, t])
                val += s
            if out1.shape[0] > 0:
                o = val
                if g1.shape[0] > 0:
                    o *= cin(g1[b, h, t])
                out1[b, h, t] = cout(o)
            if out2.shape[0] > 0:
                o = val
                if g2.shape[0] > 0:
                    o *= cin(g2[b, h, t])
                out2[b, h, t] = cout(o)

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_dbias_kernel(kind, NT):
    """dbias[h] = sum_b sum_{t < L} (dout * postgate)[b, h, t] * (u * pregate)[b, h, t]; one block per h,
    a shared-memory tree reduction (NT a power of two)."""
    cin, _, ft = _converters(kind)

    def kernel(dout, post, u, pre, dbias):
        tid = cuda.threadIdx.x
        h = cuda.blockIdx.x
        B, L = u.shape[0], u.shape[2]
        acc = ft(0.0)
        for i in range(tid, B * L, NT):
            b = i // L
            t = i - b * L
            g = cin(dout[b, h, t])
            if post.shape[0] > 0:
                g *= cin(post[b, h, t])
            v = cin(u[b, h, t])
            if pre.shape[0] > 0:
                v *= cin(pre[b, h, t])
            acc += g * v
        red = cuda.shared.array(NT, ft)
        red[tid] = acc
        cuda.syncthreads()
        s = NT // 2
        while s > 0:
            if tid < s:
                red[tid] += red[tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            dbias[h] = red[0]

    return jit_kernel(kernel)


# ---- overlap-add: blocks of M samples, block FFT size P, buffer (B, H * nb, 2F) with row h * nb + j ----------
@functools.lru_cache(maxsize=None)
def make_pad_blocks_kernel(kind, NT):
    """buf[b, h * nb + j, i] = (x * g)[b, h, j * M + i] for i < M (and j * M + i < Lx), else 0, i < 2F;
    one thread per i, looping over the nb blocks."""
    cin, _, ft = _converters(kind)
    ZERO = ft(0.0)

    def kernel(x, g, M, nb, buf):
        i = cuda.blockIdx.x * NT + cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        Lx = x.shape[2]
        if i < buf.shape[2]:
            for j in range(nb):
                t = j * M + i
                v = ZERO
                if i < M and t < Lx:
                    v = cin(x[b, h, t])
                    if g.shape[0] > 0:
                        v *= cin(g[b, h, t])
                buf[b, h * nb + j, i] = v

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_cmul_blocks_kernel(double, NT):
    """X[b, h * nb + j, f] *= K[0, h, f] for every block j, complex values interleaved, in place."""

    def kernel(X, K, nb):
        f = cuda.blockIdx.x * NT + cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        if 2 * f + 1 < X.shape[2]:
            kr = K[0, h, 2 * f]
            ki = K[0, h, 2 * f + 1]
            for j in range(nb):
                r = h * nb + j
                xr = X[b, r, 2 * f]
                xi = X[b, r, 2 * f + 1]
                X[b, r, 2 * f] = xr * kr - xi * ki
                X[b, r, 2 * f + 1] = xr * ki + xi * kr

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_ola_crop_kernel(kind, NT):
    """Overlap-add + crop: with p = t + off, j = p // M, i = p % M:
    full[p] = Y[b, h * nb + j, i] (j < nb) + Y[b, h * nb + j - 1, i + M] (j > 0, i + M < P; P - M <= M), then
    out[b, h, t] = (full * scale + bias[h] * sx * sg (t < L)) * g1 (empty = absent)."""
    cin, cout, ft = _converters(kind)

    def kernel(Y, scale, off, M, P, nb, sx, sg, bias, L, g1, out):
        t = cuda.blockIdx.x * NT + cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        if t < out.shape[2]:
            p = t + off
            j = p // M
            i = p - j * M
            val = ft(0.0)
            if j < nb:
                val = Y[b, h * nb + j, i]
            if j > 0 and i + M < P:
                val += Y[b, h * nb + j - 1, i + M]
            val *= scale
            if bias.shape[0] > 0 and t < L:
                s = bias[h] * cin(sx[b, h, t])
                if sg.shape[0] > 0:
                    s *= cin(sg[b, h, t])
                val += s
            if g1.shape[0] > 0:
                val *= cin(g1[b, h, t])
            out[b, h, t] = cout(val)

    return jit_kernel(kernel)
