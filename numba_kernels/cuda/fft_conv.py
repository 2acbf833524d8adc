"""Long convolution on CUDA: cuFFT (ctypes, ``numba_kernels.cuda.cufft``) for the transforms, numba kernels
(``_fft_conv_kernels``) for everything pointwise.

Forward, one spectrum buffer buf (B, H, 2F) in cuFFT's in-place padded layout (F = N // 2 + 1):
  pad: buf = [u * pregate, 0...]  ->  R2C in place  ->  buf *= K (k's cached spectrum (1, H, 2F))
  ->  C2R in place  ->  crop: y[t] = buf[(t + start) % N] / N + bias * u * pregate (t < L), * postgate.
Backward (buffers vbuf, gbuf of that shape, plus S (1, H, 2F)):
  vbuf = R2C(pad(u * pregate)), gbuf = R2C(pad(dout * postgate));
  S = sum_b gbuf * conj(vbuf) -> C2R -> crop at -start -> dk;
  [postgate] vbuf *= K -> C2R -> crop at start (skip from u, pregate) -> dpostgate = ypre * dout;
  gbuf *= conj(K) -> C2R -> crop at -start (+ bias * dout * postgate) -> du = dv * pregate, dpregate = dv * u;
  dbias: one block per h reduces (dout * postgate) * (u * pregate).
Overlap-add (forward, ``method="overlap_add"``, or auto for very long inputs, see ``use_overlap_add``): buf
(B, H * nb, 2F_P) holds nb blocks of M samples per row (pad_blocks, pregate fused) -> one batched R2C of size P
over B * H * nb rows -> every block *= K_P -> C2R -> ola_crop adds each block's tail to the next block's head
while cropping (scale, bias, postgate fused).
The forward's spectrum buffer is reused between calls of the same shape (one per thread, dropped by
``clear_fft_conv_cache``): every launch and transform runs on the default stream, in order.
Large single-FFT forwards (``USE_LTO``, ``LTO_MIN_N``) put everything pointwise inside cuFFT (``_fft_conv_lto``): R2C with a
load callback (pad, pregate, cast) and C2R with load (filter multiply) and store (crop, bias, postgate, cast)
callbacks, compiled from Python to LTO-IR; any plan failure falls back to the kernels above.
The transforms go through :func:`fft_inplace`; under the CUDA simulator it runs numpy.fft on a host copy
(same layout, same unnormalized inverse), so every numba kernel here is tested in CI.
"""
import collections
import os
import sys
import threading

import numpy as np
from numba import cuda

from numba_kernels import _dispatch as dsp
from numba_kernels.cuda import _fft_conv_fused as fz
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _launch as fl
from numba_kernels.cuda import _pool
from numba_kernels.cuda._pool import _device_key, out_array
from numba_kernels.cuda._conv1d_kernels import ELEM, kind_of
from numba_kernels.cuda._fft_conv_kernels import (NT_GPU, NT_SIM, make_cmul_blocks_kernel, make_cmul_kernel,
                                                  make_conj_sum_kernel, make_crop_kernel, make_dbias_kernel,
                                                  make_ola_crop_kernel, make_pad_blocks_kernel, make_pad_kernel)

_local = threading.local()
#: single-FFT forward through cuFFT LTO callbacks (two cuFFT calls, ``_fft_conv_lto``) when cuFFT can link
#: them, else the pad / multiply / crop kernels around plain transforms. ``"auto"`` (the default; environment
#: NUMBA_KERNELS_FFT_LTO unset) takes the callbacks from FFT size ``LTO_MIN_N`` up, ``True`` (=1) always,
#: ``False`` (=0) never. Measured on the H200, 2026-12-01 (benchmarks/results/gpu_h200_2026-12-01_fft_conv_lto_probe2.txt,
#: float32 causal Lk = L): callbacks 2.11 / 11.99 ms vs kernels 1.43 / 10.48 ms at N 2048 / 16384 (callbacks slower),
#: 45.7 vs 47.1 ms at N 131072 and 29.6 vs 47.7 ms at N 2^21 (callbacks faster); every LTO check passed.
_LTO_ENV = os.environ.get("NUMBA_KERNELS_FFT_LTO", "auto")
USE_LTO = True if _LTO_ENV == "1" else False if _LTO_ENV == "0" else "auto"
#: smallest single-FFT size that takes the LTO callbacks under ``USE_LTO = "auto"``: at N 2^17 the kernel path
#: with out-of-place transforms beat them (36.5 vs 44.9 ms, B16 H768 L64k), at 2^21 the callbacks won (30.5 vs
#: 37.8 ms, B1 H768 L1M) (benchmarks/results/gpu_h200_2026-12-01b_fft_conv.txt); sizes between are not measured
LTO_MIN_N = 1 << 19
#: single-FFT forwards with a power-of-two FFT size up to this go through one fused shared-memory kernel
#: (``_fft_conv_fused``: load, FFT, filter multiply, inverse FFT, crop in one pass; float16 / bfloat16 / float32);
#: 0 turns it off (environment NUMBA_KERNELS_FFT_FUSED_MAX_N). H200, 2026-12-02, B64 H768 causal Lk = L float32,
#: one call (benchmarks/results/gpu_h200_2026-12-02_fft_conv_bench_fused8192.txt): N 4096 fused 1.984 ms vs the
#: cuFFT kernel path 2.422 ms (torch.fft 2.514); N 8192 fused 5.234 vs 5.096 (slower: so off above 4096)
FUSED_MAX_N = int(os.environ.get("NUMBA_KERNELS_FFT_FUSED_MAX_N", str(1 << 12)))
#: the kernel path's single FFTs out of place (padded real rows and spectra in two buffers: twice the memory,
#: 1.3-1.6x faster transforms at N >= 2^17 on the H200) from this FFT size up; in place below
OOP_MIN_N = int(os.environ.get("NUMBA_KERNELS_FFT_OOP_MIN_N", str(1 << 15)))
#: auto overlap-add on CUDA only past this single-FFT size (cuFFT needs several global-memory passes there)
OLA_MIN_N = 1 << 20


def scratch(shape, ft, slot="buf"):
    """A device buffer of this shape and dtype, reused between calls (one per thread and slot, the latest shape
    only)."""
    key = (tuple(int(s) for s in shape), np.dtype(ft).str, _device_key())
    cur = getattr(_local, slot, None)
    if cur is None or cur[0] != key:
        setattr(_local, slot, None)  # drop the old buffer before allocating the new one
        cur = (key, cuda.device_array(key[0], dtype=ft))
        setattr(_local, slot, cur)
    return cur[1]


def clear_scratch():
    _local.buf = None
    _local.real = None
    _pool.clear_outputs()
    _TWD.clear()
    lto = sys.modules.get("numba_kernels.cuda._fft_conv_lto")
    if lto is not None:
        lto.clear()


def use_overlap_add(L, Lke, N):
    """(P, M) when auto should take overlap-add on CUDA: the CPU cost model's choice, and only for single
    FFTs longer than OLA_MIN_N (not measured on the GPU yet: a conservative rule)."""
    if N <= OLA_MIN_N:
        return None
    from numba_kernels.cpu.fft_conv import ola_sizes

    return ola_sizes(L, Lke, N)
from numba_kernels.cuda.causal_conv1d import _compute, _elem, _empty


def _none(ndim, dt):
    """An empty device array standing for an absent option (``_empty``'s cache: empty arrays are never written)."""
    return _empty((0,) * ndim, np.dtype(dt))


def _nt():
    return NT_SIM if intr.SIM else NT_GPU


def fft_inplace(buf, N, inverse, stream=0):
    """Batched real FFT of every row of ``buf`` (R, H, 2F), in place: R2C of the first N reals, or the
    unnormalized C2R. cuFFT on the GPU; numpy.fft on a host copy under the simulator."""
    if intr.SIM:
        h = buf.copy_to_host()
        if inverse:
            h[..., :N] = np.fft.irfft(h[..., 0::2] + 1j * h[..., 1::2], n=N, axis=-1) * N
        else:
            c = np.fft.rfft(h[..., :N], axis=-1)
            h[..., 0::2], h[..., 1::2] = c.real, c.imag
        buf.copy_to_device(h)
        return
    from numba_kernels.cuda import cufft

    rows = buf.shape[0] * buf.shape[1]
    cufft.exec_inplace(buf.__cuda_array_interface__["data"][0], N, rows, inverse,
                       np.dtype(buf.dtype) == np.float64, stream, _device_key())


def _grid(n, B, H):
    nt = _nt()
    return (-(-n // nt), H, B), nt


def _filter_spectrum(k, Lke, N, ft):
    """k[:, :Lke] padded to the spectrum layout and transformed: device (1, H, 2F), cached per k object."""
    from numba_kernels.fft_conv import cached_filter

    def compute():
        H, F = k.shape[0], N // 2 + 1
        host = np.zeros((1, H, 2 * F), ft)
        host[0, :, :Lke] = dsp.to_host(k, dsp.array_dtype(k))[:, :Lke].astype(ft)
        d = cuda.to_device(host)
        fft_inplace(d, N, False)
        return d

    return cached_filter(k, Lke, N, ft, f"cuda:{_device_key()}", compute)


def _kinds(dt):
    kind = kind_of(dt)
    ft = np.dtype(np.float64) if kind == "f64" else np.dtype(np.float32)
    return kind, ft, ("f64" if kind == "f64" else "f32")


def _spectrum(x, g, N, ft, kind):
    """R2C(pad(x * g)) as a device (B, H, 2F) buffer."""
    B, H, _ = x.shape
    buf = out_array((B, H, 2 * (N // 2 + 1)), ft)
    grid, nt = _grid(buf.shape[2], B, H)
    fl.launch(make_pad_kernel(kind, nt), grid, nt, 0, (x, g, buf))
    fft_inplace(buf, N, False)
    return buf


def _mul_inverse(buf, K, conj, N, double):
    """buf *= K (or conj K), then C2R in place."""
    B, H, W2 = buf.shape
    grid, nt = _grid(W2 // 2, B, H)
    fl.launch(make_cmul_kernel(double, nt), grid, nt, 0, (buf, K, np.int32(conj)))
    fft_inplace(buf, N, True)


def _crop(kind, full, N, off, sx, sg, bias, L, g1, g2, out1, out2):
    o = out1 if out1.shape[0] > 0 else out2
    B, H, Lout = o.shape
    grid, nt = _grid(Lout, B, H)
    ft = np.float64 if np.dtype(full.dtype) == np.float64 else np.float32
    args = (full, ft(1.0 / N), np.int64(off % N), np.int64(N), sx, sg, bias, np.int64(L), g1, g2, out1, out2)
    fl.launch(make_crop_kernel(kind, nt), grid, nt, 0, args)


def _fwd_ola(ud, pred, postd, biasd, K, start, Lout, P, M, kind, ft):
    B, H, L = ud.shape
    nb = -(-L // M)
    F2 = 2 * (P // 2 + 1)
    buf = scratch((B, H * nb, F2), ft)  # (B, H * nb, 2F): block j of row h at h * nb + j
    grid, nt = _grid(F2, B, H)
    fl.launch(make_pad_blocks_kernel(kind, nt), grid, nt, 0, (ud, pred, np.int64(M), np.int64(nb), buf))
    fft_inplace(buf, P, False)
    grid, nt = _grid(F2 // 2, B, H)
    fl.launch(make_cmul_blocks_kernel(kind == "f64", nt), grid, nt, 0, (buf, K, np.int64(nb)))
    fft_inplace(buf, P, True)
    out = out_array((B, H, Lout), ELEM[kind])
    grid, nt = _grid(Lout, B, H)
    args = (buf, ft.type(1.0 / P), np.int64(start), np.int64(M), np.int64(P), np.int64(nb), ud, pred, biasd,
            np.int64(L), postd, out)
    fl.launch(make_ola_crop_kernel(kind, nt), grid, nt, 0, args)
    return out


def fused_size(N, forced, kind):
    """FFT size of the fused kernel for a single-FFT forward of size N (the power of two >= N; an explicit
    ``fft_size`` only when it is one), or 0 when the fused kernel does not apply."""
    if kind == "f64" or FUSED_MAX_N <= 0:
        return 0
    n2 = 1 << max(1, (int(N) - 1).bit_length())
    if (forced and n2 != N) or n2 > FUSED_MAX_N:
        return 0
    return n2


_TWD = {}


def _fwd_fused(ud, k, pred, postd, biasd, Lke, N, start, Lout, kind, ft):
    from numba_kernels.fft_conv import cached_filter

    B, H, _ = ud.shape
    LOGN = N.bit_length() - 1
    dev = _device_key()

    def expand():
        Kh = _filter_spectrum(k, Lke, N, ft)
        Kp = out_array((H, 2 * N), np.float32)
        nt = _nt()
        fl.launch(fz.make_expand_kernel(LOGN, nt), (-(-N // nt), H), nt, 0, (Kh, Kp))
        return Kp

    Kp = cached_filter(k, Lke, N, ft, f"cuda:{dev}:fused", expand)
    tw = _TWD.get((N, dev))
    if tw is None:
        tw = _TWD[(N, dev)] = cuda.to_device(fz.twiddles(N))
    out = out_array((B, H, Lout), ELEM[kind])
    nt = fz.threads(N, intr.SIM)
    opts = (biasd.shape[0] > 0, pred.shape[0] > 0, postd.shape[0] > 0)  # absent options compiled out
    fl.launch(fz.make_fused_kernel(kind, LOGN, nt, fz.RMAX, opts), (-(-B // 2), H), nt, fz.smem_bytes(N),
              (ud, pred, postd, biasd, Kp, tw, out, np.int64(start % N)))
    return out


def fwd_cuda(u, k, bias, pre, post, start, Lout, Lke, N, dt, method="auto", forced=False):
    """Device y (B, H, Lout) in the element type of ``dt``; ``method`` "fft" | "overlap_add" | "auto"."""
    kind, ft, _ = _kinds(dt)
    B, H, L = u.shape
    ud, pred, postd = _elem(u, kind, 3), _elem(pre, kind, 3), _elem(post, kind, 3)
    biasd = _compute(bias, ft, 1)  # empty when absent
    e3 = _none(3, ELEM[kind])
    ola = None
    if not forced and method == "overlap_add":
        from numba_kernels.cpu.fft_conv import choose

        ola = choose(L, Lke, Lout, N, False, "overlap_add")[1:]
    elif not forced and method == "auto":
        ola = use_overlap_add(L, Lke, N)
    if ola is not None:
        P, M = ola
        return _fwd_ola(ud, pred, postd, biasd, _filter_spectrum(k, Lke, P, ft), start, Lout, P, M, kind, ft)
    Nf = fused_size(N, forced, kind)
    if Nf:
        return _fwd_fused(ud, k, pred, postd, biasd, Lke, Nf, start, Lout, kind, ft)
    K = _filter_spectrum(k, Lke, N, ft)
    buf = scratch((B, H, 2 * (N // 2 + 1)), ft)
    lto_on = USE_LTO is True or (USE_LTO == "auto" and N >= LTO_MIN_N)
    if lto_on and not intr.SIM and all(a.is_c_contiguous() for a in (ud, pred, postd, biasd)):
        from numba_kernels.cuda import _fft_conv_lto as lto

        opt = [None if a is None else d for a, d in ((pre, pred), (post, postd), (bias, biasd))]
        out = lto.forward(kind, ud, K, buf, lambda: out_array((B, H, Lout), ELEM[kind]), *opt, N, L, Lout, start)
        if out is not None:
            return out
    if N >= OOP_MIN_N and not intr.SIM:  # pad into dense real rows, R2C into buf, multiply, C2R back, crop
        from numba_kernels.cuda import cufft

        real = scratch((B, H, N), ft, "real")
        grid, nt = _grid(N, B, H)
        fl.launch(make_pad_kernel(kind, nt), grid, nt, 0, (ud, pred, real))
        rp, cp, dbl = real.__cuda_array_interface__["data"][0], buf.__cuda_array_interface__["data"][0], kind == "f64"
        cufft.exec_dense(rp, cp, N, B * H, False, dbl, 0, _device_key())
        grid, nt = _grid(buf.shape[2] // 2, B, H)
        fl.launch(make_cmul_kernel(dbl, nt), grid, nt, 0, (buf, K, np.int32(0)))
        cufft.exec_dense(rp, cp, N, B * H, True, dbl, 0, _device_key())
        buf = real
    else:
        grid, nt = _grid(buf.shape[2], B, H)
        fl.launch(make_pad_kernel(kind, nt), grid, nt, 0, (ud, pred, buf))
        fft_inplace(buf, N, False)
        _mul_inverse(buf, K, False, N, kind == "f64")
    out = out_array((B, H, Lout), ELEM[kind])
    _crop(kind, buf, N, start, ud, pred, biasd, L, postd, e3, out, e3)
    return out


def bwd_cuda(dout, u, k, bias, pre, post, start, Lke, N, dt):
    """Device (du, dk (H, Lk) host compute dtype, dbias | None, dpregate | None, dpostgate | None)."""
    kind, ft, ckind = _kinds(dt)
    B, H, L = u.shape
    Lk, Lout = k.shape[1], dout.shape[2]
    dbl = kind == "f64"
    ud, pred, postd, doutd = (_elem(a, kind, 3) for a in (u, pre, post, dout))
    biasd = _compute(bias, ft, 1)
    e3, c3 = _empty((0, 0, 0), ELEM[kind]), _empty((0, 0, 0), ft)
    K = _filter_spectrum(k, Lke, N, ft)
    vbuf = _spectrum(ud, pred, N, ft, kind)
    gbuf = _spectrum(doutd, postd, N, ft, kind)
    S = out_array((1, H, vbuf.shape[2]), ft)
    grid, nt = _grid(vbuf.shape[2] // 2, 1, H)
    fl.launch(make_conj_sum_kernel(dbl, nt), grid, nt, 0, (gbuf, vbuf, S))
    fft_inplace(S, N, True)
    dk3 = out_array((1, H, Lke), ft)
    _crop(ckind, S, N, -start, c3, c3, _empty((0,), ft), 0, c3, c3, dk3, c3)
    dk = np.zeros((H, Lk), ft)
    dk[:, :Lke] = dk3.copy_to_host()[0]  # (H, Lke) -> (H, Lk): causal taps beyond L get zero
    dpost = None
    if post is not None:
        dpost = out_array((B, H, Lout), ELEM[kind])
        _mul_inverse(vbuf, K, False, N, dbl)
        _crop(kind, vbuf, N, start, ud, pred, biasd, L, e3, doutd, e3, dpost)
    del vbuf
    _mul_inverse(gbuf, K, True, N, dbl)
    du = out_array((B, H, L), ELEM[kind])
    dpre = out_array((B, H, L), ELEM[kind]) if pre is not None else e3
    _crop(kind, gbuf, N, -start, doutd, postd, biasd, L, pred, ud, du, dpre)
    dbias = None
    if bias is not None:
        dbias = out_array(H, ft)
        fl.launch(make_dbias_kernel(kind, _nt()), H, _nt(), 0, (doutd, postd, ud, pred, dbias))
    return du, dk, dbias, (dpre if pre is not None else None), dpost


def ptx_signatures():
    """(name, python function, numba signature) of every real kernel configuration, for PTX checks."""
    from numba import types

    nt = NT_GPU
    out = []
    for kind in ("f32", "f64", "f16", "bf16"):
        et = {"f16": types.float16, "bf16": types.uint16, "f32": types.float32, "f64": types.float64}[kind]
        ft = types.float64 if kind == "f64" else types.float32
        a, f3, f1 = types.Array(et, 3, "C"), types.Array(ft, 3, "C"), types.Array(ft, 1, "C")
        i64 = types.int64
        out.append((f"pad_{kind}", make_pad_kernel(kind, nt).py_func, (a, a, f3)))
        out.append((f"crop_{kind}", make_crop_kernel(kind, nt).py_func,
                    (f3, ft, i64, i64, a, a, f1, i64, a, a, a, a)))
        out.append((f"dbias_{kind}", make_dbias_kernel(kind, nt).py_func, (a, a, a, a, f1)))
        out.append((f"pad_blocks_{kind}", make_pad_blocks_kernel(kind, nt).py_func, (a, a, i64, i64, f3)))
        out.append((f"ola_crop_{kind}", make_ola_crop_kernel(kind, nt).py_func,
                    (f3, ft, i64, i64, i64, i64, a, a, f1, i64, a, a)))
        if kind != "f64":
            logn = {"f32": 9, "bf16": 11, "f16": 10}[kind]  # one used size per kind (each compiles in 15-30 s)
            fsig = (a, a, a, f1, types.Array(types.float32, 2, "C"), f1, a, i64)
            out.append((f"fused_{kind}_N{1 << logn}", fz.make_fused_kernel(kind, logn, fz.threads(1 << logn),
                                                                             fz.RMAX).py_func, fsig))
            if kind == "f32":  # no options compiled in: the default call's kernel
                out.append(("fused_f32_N2048_plain", fz.make_fused_kernel("f32", 11, fz.threads(1 << 11), fz.RMAX,
                                                                         (False, False, False)).py_func, fsig))
        if kind in ("f32", "f64"):
            out.append((f"cmul_blocks_{kind}", make_cmul_blocks_kernel(kind == "f64", nt).py_func, (f3, f3, i64)))
            out.append((f"cmul_{kind}", make_cmul_kernel(kind == "f64", nt).py_func, (f3, f3, types.int32)))
            out.append((f"conj_sum_{kind}", make_conj_sum_kernel(kind == "f64", nt).py_func, (f3, f3, f3)))
    out.append(("fused_expand", fz.make_expand_kernel(9, nt).py_func,
                (types.Array(types.float32, 3, "C"), types.Array(types.float32, 2, "C"))))
    return out
