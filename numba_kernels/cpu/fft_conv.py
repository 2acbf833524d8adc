"""Long convolution on the CPU: FFT (scipy.fft or pyFFTW, multithreaded) plus njit-parallel pointwise
kernels, and a direct njit path for short filters.

FFT path, forward (per row (b, h), N the FFT size): y = crop(irfft(rfft(u * pregate, N) * K, N)) + bias * v,
* postgate, with K = rfft(k, N) cached by the caller; run on the row-chunked pipeline of ``fft_conv_rows``
(each thread pads, transforms, multiplies, inverts and crops a few rows in buffers that stay in its cache).
Backward: G = rfft(dout * postgate, N); dk = crop(irfft(sum_b G conj(V)), -start); dv = crop(irfft(G conj(K)),
-start) + bias * g; du = dv * pregate, dpregate = dv * u (the crop writes both); dpostgate = dout * ypre
(one more forward irfft, only with a postgate). Correlations come out of circular FFTs at offset -start
mod N; N >= L + Lk - 1 (Lk -> min(Lk, L) for "causal") guarantees no wrap-around.

Direct path: forward in one fused pass over L1-sized output tiles (``direct_fwd``); the backward runs the crop
kernel on a directly computed convolution / correlation (one vectorizable pass per tap).

Overlap-add path (forward, L >> Lk): v is cut into nb blocks of M samples, each transformed at a small size
P >= M + Lk - 1 and multiplied by K = rfft(k, P); the crop adds each block's tail (P - M <= M values) onto the
next block's head (the same pipeline, nb blocks per row). Chosen by ``choose``: nb P (log2 P + c) against
N (log2 N + c) of one full-length transform, with a penalty for full-length rows that fall out of the cache.
The backward pass always uses the full-length FFT (or the direct path).
Arrays arrive in the compute dtype (float32 / float64); absent optional inputs are empty arrays.
"""
import os

import numpy as np
from numba import prange

from numba_kernels._dispatch import BackendUnavailableError
from numba_kernels._jit import njit_parallel
from numba_kernels.cpu.fft_conv_rows import fwd_rows

FFT_LIBS = ("auto", "scipy", "pyfftw")
ENV_FFT_LIB = "NUMBA_KERNELS_FFT_LIB"
#: direct path only for filters this short (after the causal truncation to min(Lk, L))
DIRECT_MAX_LK = 64
#: direct when Lout * Lk <= DIRECT_FACTOR * N * log2(N) (taps per output vs FFT work per output). 6 since the
#: fused direct forward (2026-12-01, B8 H256 float32, min CPU ms, load 2.4): L1k Lk32 direct 11 vs FFT 23,
#: L1k Lk64 20 vs 44 (both took the FFT at 3), L4k Lk64 82 vs 84 (now direct; overlap-add 68 would be best)
DIRECT_FACTOR = 6.0
#: the same for the backward, whose direct path (correlation, filter gradient, crop passes) is not fused: kept
#: at the earlier calibration
DIRECT_FACTOR_BWD = 3.0


#: overlap-add block FFT sizes tried: next_fast_len(c * Lk_eff) for these c (c >= 2 keeps P - M <= M)
OLA_FACTORS = (2, 4, 8, 16, 32, 64)
#: cost per point and transform of size n: log2(n) + POINTWISE_UNITS (the memory-bound passes dominate)
POINTWISE_UNITS = 12.0
#: full-length rows longer than CACHE_ROW points leave the caches: their cost is CACHE_PENALTY x
CACHE_ROW = 1 << 18
CACHE_PENALTY = 1.5
#: overlap-add must be this much cheaper than the single FFT to be chosen (its extra cut pass, chunk loop)
OLA_MARGIN = 0.85


def _units(n, big=False):
    return n * (np.log2(n) + POINTWISE_UNITS) * (CACHE_PENALTY if big and n > CACHE_ROW else 1.0)


def ola_sizes(L, Lk_eff, N, force=False):
    """(P, M) of the cheapest overlap-add block FFT, or None when the single length-N FFT is cheaper (with
    ``force``: the cheapest block FFT regardless, or None when no block size fits).
    Calibrated on the 2-core AVX-512 box, float32, scipy.fft (min of 3, machine shared): at L 1M, B1 H16,
    Lk 256: single FFT 300 ms, blocks of P 2048 149 ms; Lk 4096: 259 vs 183 ms (P 32768); at L 262144 Lk 1024
    both 40 ms; at L <= 64k, B8 H256, the single FFT is as fast or faster (every pass is memory-bound, so the
    per-point cost barely depends on the size until a row falls out of the cache)."""
    import scipy.fft

    best, best_cost = None, (np.inf if force else OLA_MARGIN * _units(N, True))
    for c in OLA_FACTORS:
        P = scipy.fft.next_fast_len(c * Lk_eff, real=True)
        M = P - Lk_eff + 1
        if M < max(Lk_eff - 1, 1) or M >= L:
            continue
        cost = -(-L // M) * _units(P)
        if cost < best_cost:
            best, best_cost = (P, M), cost
    return best


def choose(L, Lk_eff, Lout, N, forced=False, method="auto", backward=False):
    """("direct" | "fft" | "overlap_add", FFT size, block length M): the cost models below, or ``method``.
    A user-given fft_size (``forced``) means the single FFT of that size; ``backward`` uses the backward's
    direct-path cost (DIRECT_FACTOR_BWD)."""
    if method == "direct":
        return "direct", N, 0
    if method == "fft" or forced:
        return "fft", N, 0
    ola = ola_sizes(L, Lk_eff, N, force=method == "overlap_add")
    if method == "overlap_add":
        if ola is None:  # forced, and no block shorter than L: one block of the smallest size
            import scipy.fft

            P = scipy.fft.next_fast_len(2 * Lk_eff, real=True)
            ola = (P, P - Lk_eff + 1)
        return "overlap_add", ola[0], ola[1]
    if use_direct(L, Lk_eff, Lout, N, DIRECT_FACTOR_BWD if backward else DIRECT_FACTOR):
        return "direct", N, 0
    if ola is not None:
        return "overlap_add", ola[0], ola[1]
    return "fft", N, 0


def use_direct(L, Lk_eff, Lout, N, factor):
    """The cost model: direct costs Lout * Lk_eff taps per row, the FFT path about N log2 N "units" per row
    (two transforms, k's cached, plus the pointwise passes). Measured on the 2-core EPYC (float32, B8 H256, one
    core's worth under load): about 0.15 ns CPU per direct tap (fused forward) and 0.8-1.9 ns per FFT unit (more at
    small N), so ``factor`` = DIRECT_FACTOR = 6 for the forward (e.g. Lk <= 64 up to L = 16k). Direct also needs
    ``Lk_eff <= DIRECT_MAX_LK``."""
    return Lk_eff <= DIRECT_MAX_LK and Lout * Lk_eff <= factor * N * max(1.0, np.log2(N))


class _Lib:
    """rfft / irfft along the last axis on all cores."""

    def __init__(self, name, mod):
        self.name, self.mod, self.workers = name, mod, os.cpu_count() or 1

    def rfft(self, a, n):
        return self.mod.rfft(a, n=n, axis=-1, workers=self.workers)

    def irfft(self, a, n):
        return self.mod.irfft(a, n=n, axis=-1, workers=self.workers, overwrite_x=True)  # a is a temporary


def fft_lib(name=None):
    """The FFT library: ``name`` or ``$NUMBA_KERNELS_FFT_LIB`` or "auto" (pyFFTW when importable, else
    scipy.fft). Asking for "pyfftw" without it installed raises BackendUnavailableError."""
    name = name or os.environ.get(ENV_FFT_LIB, "auto") or "auto"
    if name not in FFT_LIBS:
        raise ValueError(f"fft_lib must be one of {FFT_LIBS}, got {name!r}")
    if name in ("auto", "pyfftw"):
        try:
            import pyfftw
            import pyfftw.interfaces.scipy_fft as pfft

            pyfftw.interfaces.cache.enable()  # keeps plans (and FFTW wisdom) between calls
            return _Lib("pyfftw", pfft)
        except ImportError:
            if name == "pyfftw":
                raise BackendUnavailableError("fft_lib='pyfftw' was requested but pyfftw is not installed "
                                              "(pip install 'numba_kernels[fftw]')") from None
    import scipy.fft

    return _Lib("scipy", scipy.fft)


@njit_parallel
def mul(x, g):
    """x (B, H, L) * g (B, H, L) | (0, 0, 0) -> new (B, H, L) (a copy of x when g is empty)."""
    B, H, L = x.shape
    out = np.empty_like(x)
    for r in prange(B * H):
        b, h = r // H, r % H
        if g.shape[0] > 0:
            for t in range(L):
                out[b, h, t] = x[b, h, t] * g[b, h, t]
        else:
            for t in range(L):
                out[b, h, t] = x[b, h, t]
    return out


@njit_parallel
def cmul(X, K, conj):
    """X (B, H, F) *= K (H, F) (or conj(K)), in place."""
    B, H, F = X.shape
    for r in prange(B * H):
        b, h = r // H, r % H
        if conj:
            for f in range(F):
                X[b, h, f] *= np.conj(K[h, f])
        else:
            for f in range(F):
                X[b, h, f] *= K[h, f]


@njit_parallel
def cmul_conj_sum(G, V):
    """sum_b G[b] * conj(V[b]) -> (1, H, F)."""
    B, H, F = G.shape
    out = np.zeros((1, H, F), dtype=G.dtype)
    for h in prange(H):
        for b in range(B):
            for f in range(F):
                out[0, h, f] += G[b, h, f] * np.conj(V[b, h, f])
    return out


@njit_parallel
def crop(full, off, sx, sg, bias, L, g1, g2, out1, out2):
    """value[b, h, t] = full[b, h, (t + off) % N] + (bias[h] * sx * sg)[b, h, t] for t < L (skip term, when
    bias is non-empty; sg may be empty = 1); out1 = value * g1, out2 = value * g2 (empty gate = 1; empty
    out = not written). full (B, H, N); sx/sg/g1/g2 (B, H, *); out1/out2 (B, H, Lout)."""
    N = full.shape[2]
    nb = full.shape[0]
    B, H, Lout = (out1.shape if out1.shape[0] > 0 else out2.shape)
    for r in prange(B * H):
        b, h = r // H, r % H
        fb = b if nb > 1 else 0
        for t in range(Lout):
            j = t + off
            if j >= N:
                j -= N
            val = full[fb, h, j]
            if bias.shape[0] > 0 and t < L:
                s = sx[b, h, t] * bias[h]
                if sg.shape[0] > 0:
                    s *= sg[b, h, t]
                val += s
            if out1.shape[0] > 0:
                out1[b, h, t] = val * g1[b, h, t] if g1.shape[0] > 0 else val
            if out2.shape[0] > 0:
                out2[b, h, t] = val * g2[b, h, t] if g2.shape[0] > 0 else val


@njit_parallel
def direct_conv(v, k, start, Lout):
    """out[b, h, t] = sum_s k[h, s] * v[b, h, t + start - s] (0 <= t + start - s < L) -> (B, H, Lout)."""
    B, H, L = v.shape
    Lk = k.shape[1]
    out = np.zeros((B, H, Lout), dtype=v.dtype)
    for r in prange(B * H):
        b, h = r // H, r % H
        o = out[b, h]
        x = v[b, h]
        for s in range(Lk):
            ks = k[h, s]
            t0, t1 = max(0, s - start), min(Lout, L + s - start)
            if t1 > t0:  # slices with non-negative indices: the tap loop vectorizes
                os_, xs = o[t0:t1], x[t0 + start - s:t1 + start - s]
                for i in range(t1 - t0):
                    os_[i] += ks * xs[i]
    return out


#: output tile of the fused direct forward (float32: 4 KB, so the tile and its input window stay in L1)
DIRECT_TILE = 1024


@njit_parallel
def direct_fwd(u, pre, k, bias, post, start, out):
    """The whole direct forward in one pass: out[b, h, t] = (sum_s k[h, s] v[t + start - s] + bias[h] v[t]
    (t < L)) * post[b, h, t], v = u * pre (empty pre / bias / post: absent). Each row is done in tiles of
    DIRECT_TILE outputs: the taps accumulate into the tile while it sits in L1, then bias and postgate are
    applied and the tile is final (no full-size intermediate, no second pass). The taps add up in the same
    order as in ``direct_conv``."""
    B, H, L = u.shape
    Lk = k.shape[1]
    Lout = out.shape[2]
    TB = DIRECT_TILE
    for r in prange(B * H):
        b, h = r // H, r % H
        if pre.shape[0] > 0:
            x = np.empty(L, dtype=u.dtype)
            for i in range(L):
                x[i] = u[b, h, i] * pre[b, h, i]
        else:
            x = u[b, h]
        o = out[b, h]
        for t0 in range(0, Lout, TB):
            t1 = min(Lout, t0 + TB)
            for i in range(t0, t1):
                o[i] = 0.0
            for s in range(Lk):
                ks = k[h, s]
                lo, hi = max(t0, s - start), min(t1, L + s - start)
                if hi > lo:  # slices with non-negative indices: the tap loop vectorizes
                    os_, xs = o[lo:hi], x[lo + start - s:hi + start - s]
                    for i in range(hi - lo):
                        os_[i] += ks * xs[i]
            if bias.shape[0] > 0:
                bh = bias[h]
                for i in range(t0, min(t1, L)):
                    o[i] += bh * x[i]
            if post.shape[0] > 0:
                for i in range(t0, t1):
                    o[i] *= post[b, h, i]


@njit_parallel
def direct_corr(g, k, start, L):
    """dv[b, h, t] = sum_s k[h, s] * g[b, h, t + s - start] (0 <= t + s - start < Lout) -> (B, H, L)."""
    B, H, Lout = g.shape
    Lk = k.shape[1]
    out = np.zeros((B, H, L), dtype=g.dtype)
    for r in prange(B * H):
        b, h = r // H, r % H
        o = out[b, h]
        x = g[b, h]
        for s in range(Lk):
            ks = k[h, s]
            t0, t1 = max(0, start - s), min(L, Lout + start - s)
            if t1 > t0:
                os_, xs = o[t0:t1], x[t0 + s - start:t1 + s - start]
                for i in range(t1 - t0):
                    os_[i] += ks * xs[i]
    return out


@njit_parallel
def direct_dk(g, v, start, Lk):
    """dk[h, s] = sum_b sum_t g[b, h, t + s - start] * v[b, h, t] -> (H, Lk)."""
    B, H, Lout = g.shape
    L = v.shape[2]
    out = np.zeros((H, Lk), dtype=g.dtype)
    for h in prange(H):
        for s in range(Lk):
            t0, t1 = max(0, start - s), min(L, Lout + start - s)
            acc = 0.0
            for b in range(B):
                if t1 > t0:
                    gs, vs = g[b, h, t0 + s - start:t1 + s - start], v[b, h, t0:t1]
                    for i in range(t1 - t0):
                        acc += gs[i] * vs[i]
            out[h, s] = acc
    return out


@njit_parallel
def row_dot(g, v, L):
    """dbias[h] = sum_b sum_{t < L} g[b, h, t] * v[b, h, t] -> (H,)."""
    B, H, _ = g.shape
    out = np.zeros(H, dtype=g.dtype)
    for h in prange(H):
        acc = 0.0
        for b in range(B):
            for t in range(L):
                acc += g[b, h, t] * v[b, h, t]
        out[h] = acc
    return out


def fwd_cpu(u, k, bias, pre, post, start, Lout, N, method, lib, kf, M=0):
    """y (B, H, Lout) in the compute dtype. ``kf()`` returns k's cached transform (H, N // 2 + 1); for
    "overlap_add" N is the block FFT size P and M the block length. The FFT methods run on the row-chunked
    pipeline of ``fft_conv_rows`` (single FFT: one block of M = N samples)."""
    B, H, L = u.shape
    if method == "overlap_add":
        return fwd_rows(u, pre, bias, post, kf(), start, Lout, N, M, -(-L // M), lib.name)
    if method == "fft":
        return fwd_rows(u, pre, bias, post, kf(), start, Lout, N, N, 1, lib.name)
    out = np.empty((B, H, Lout), dtype=u.dtype)
    direct_fwd(u, pre, k, bias, post, start, out)
    return out


def bwd_cpu(dout, u, k, bias, pre, post, start, N, direct, lib, kf):
    """(du, dk, dbias | None, dpregate | None, dpostgate | None) in the compute dtype."""
    B, H, L = u.shape
    Lk, Lout = k.shape[1], dout.shape[2]
    e3 = np.zeros((0, 0, 0), u.dtype)
    v = mul(u, pre) if pre.shape[0] else u
    g = mul(dout, post) if post.shape[0] else dout
    dpost = np.empty((B, H, Lout), u.dtype) if post.shape[0] else e3
    du = np.empty((B, H, L), u.dtype)
    dpre = np.empty((B, H, L), u.dtype) if pre.shape[0] else e3
    if direct:
        dk = direct_dk(g, v, start, Lk)
        if post.shape[0]:
            crop(direct_conv(v, k, start, Lout), 0, u, pre, bias, L, e3, dout, e3, dpost)
        cfull, off = direct_corr(g, k, start, L), 0
    else:
        back = (N - start) % N
        V, G = lib.rfft(v, N), lib.rfft(g, N)
        dkfull = lib.irfft(cmul_conj_sum(G, V), N)  # (1, H, N)
        dk3 = np.empty((1, H, Lk), u.dtype)
        crop(dkfull, back, e3, e3, bias[:0], 0, e3, e3, dk3, e3)
        dk = dk3[0]
        if post.shape[0]:
            cmul(V, kf(), False)
            crop(lib.irfft(V, N), start, u, pre, bias, L, e3, dout, e3, dpost)
        del V
        cmul(G, kf(), True)
        cfull, off = lib.irfft(G, N), back
    crop(cfull, off, dout, post, bias, L, pre, u, du, dpre)
    dbias = row_dot(g, v, L) if bias.shape[0] else None
    return du, dk, dbias, (dpre if pre.shape[0] else None), (dpost if post.shape[0] else None)
