"""Long convolution via FFT: ``fft_conv``, ``fft_conv_backward`` (FlashFFTConv layout, any L and Lk), and the
filter-transform cache (``clear_fft_conv_cache``)."""
import collections
import math
import numbers
import sys
import threading
import weakref

import numpy as np

from numba_kernels import _dispatch as dsp
from numba_kernels.causal_conv1d import _cast_back, _host_compute

MODES = ("causal", "same", "full")
METHODS = ("auto", "fft", "direct", "overlap_add")
#: filter transforms kept (least recently used dropped first)
CACHE_SIZE = 16
_cache = collections.OrderedDict()
_cache_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0}


def _checksum(k):
    """Cheap checksum of a host filter: float64 sum and a strided sample of at most 4096 values.
    Device filters are matched by identity (id + weakref) only."""
    if dsp.is_device_array(k):
        return None
    flat = np.asarray(k).reshape(-1)
    step = max(1, flat.size // 4096)
    return (float(np.sum(flat, dtype=np.float64)), flat[::step].tobytes())


def cached_filter(k, ntaps, N, cdt, device, compute):
    """The transform of k[:, :ntaps] for FFT size N, compute dtype ``cdt`` on ``device`` ("cpu" or
    "cuda:<id>"): ``compute()`` on a miss. A hit needs the same k object (id, alive) and the same checksum."""
    key = (id(k), tuple(k.shape), str(dsp.array_dtype(k)), int(ntaps), int(N), np.dtype(cdt).name, device)
    chk = _checksum(k)
    with _cache_lock:
        ent = _cache.get(key)
        if ent is not None and ent[0]() is k and ent[1] == chk:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return ent[2]
    val = compute()
    try:
        ref = weakref.ref(k)
    except TypeError:  # objects without weakrefs are never reused
        return val
    with _cache_lock:
        _stats["misses"] += 1
        _cache[key] = (ref, chk, val)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return val


def clear_fft_conv_cache():
    """Drop every cached filter transform, destroy every cached cuFFT plan, and free this thread's reused
    CUDA spectrum buffer."""
    with _cache_lock:
        _cache.clear()
        _stats["hits"] = _stats["misses"] = 0
    cufft = sys.modules.get("numba_kernels.cuda.cufft")
    if cufft is not None:
        cufft.clear_plans()
    cf = sys.modules.get("numba_kernels.cuda.fft_conv")
    if cf is not None:
        cf.clear_scratch()


def cache_info():
    """{"hits", "misses", "size"} of the filter-transform cache."""
    with _cache_lock:
        return dict(_stats, size=len(_cache))


def _out_len_start(mode, L, Lk):
    if mode == "causal":
        return L, 0
    if mode == "same":
        return L, (Lk - 1) // 2
    return L + Lk - 1, 0


def _check(u, k, mode, bias, pregate, postgate, fft_size, dout=None):
    """Validate; return (dtype, B, H, L, Lk, Lout, start, N, user_gave_fft_size)."""
    dt = dsp.check_float("u", u, 3)
    B, H, L = u.shape
    if L < 1:
        raise ValueError(f"u must have shape (B, H, L) with L >= 1, got {tuple(u.shape)}")
    dsp.check_float("k", k, 2)
    if k.shape[0] != H or k.shape[1] < 1:
        raise ValueError(f"k must have shape ({H}, Lk) with Lk >= 1 (H from u), got {tuple(k.shape)}")
    Lk = k.shape[1]
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    Lout, start = _out_len_start(mode, L, Lk)
    if bias is not None:
        dsp.check_float("bias", bias, 1)
        if tuple(bias.shape) != (H,):
            raise ValueError(f"bias must have shape ({H},), got {tuple(bias.shape)}")
    for name, a, shape in (("pregate", pregate, (B, H, L)), ("postgate", postgate, (B, H, Lout)),
                           ("dout", dout, (B, H, Lout))):
        if a is None:
            continue
        if dsp.check_float(name, a, 3) != dt:
            raise TypeError(f"{name} must have the same dtype as u ({dt}), got {dsp.array_dtype(a)}")
        if tuple(a.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
    need = L + (min(Lk, L) if mode == "causal" else Lk) - 1
    if fft_size is None:
        import scipy.fft

        return dt, B, H, L, Lk, Lout, start, scipy.fft.next_fast_len(need, real=True), False
    if isinstance(fft_size, bool) or not isinstance(fft_size, (numbers.Integral, numbers.Real)):
        raise TypeError(f"fft_size must be an integer, got {type(fft_size).__name__}")
    if not isinstance(fft_size, numbers.Integral):
        if not math.isfinite(fft_size) or fft_size != int(fft_size):
            raise ValueError(f"fft_size must be a finite integer, got {fft_size!r}")
    N = int(fft_size)
    if N < need:
        raise ValueError(f"fft_size must be >= {need} for mode={mode!r} with L={L}, Lk={Lk} "
                         f"(no circular wrap-around), got {N}")
    return dt, B, H, L, Lk, Lout, start, N, True


def _check_method(method, be):
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "direct" and be == "cuda":
        raise ValueError("method='direct' is CPU only (the CUDA backend has 'auto', 'fft' and 'overlap_add')")


def fft_conv(u, k, *, mode="causal", bias=None, pregate=None, postgate=None, fft_size=None, backend=None,
             fft_lib=None, method="auto"):
    """Long depthwise convolution of every (b, h) row of u with k[h], via FFT (FlashFFTConv layout).

    With v = u * pregate: ``full[t] = sum_s k[h, s] v[t - s]`` (``numpy.convolve(v, k[h], "full")``), and
      * "causal": ``y[t] = full[t]``, t < L (``y[t] = sum_{s <= t} k[s] v[t - s]``; k beyond L is unused);
      * "same": ``y[t] = full[t + (Lk - 1) // 2]``, t < L: scipy.signal.fftconvolve's "same" (output as long
        as u). numpy.convolve's "same" equals this when Lk <= L; for Lk > L numpy returns Lk values instead;
      * "full": ``y = full``, length L + Lk - 1.
    Then the skip term ``y[t] += bias[h] * v[t]`` for t < L (at the output's own index: after the pregate,
    before the postgate; FlashFFTConv's D * u) and ``y *= postgate``.

    FFT size: the smallest fast composite size (``scipy.fft.next_fast_len``) >= L + Lk - 1 (L + min(Lk, L) - 1
    for "causal"); any L and Lk. On the CPU, filters with min(Lk, L) <= 64 take a direct njit path when the
    cost model (``numba_kernels.cpu.fft_conv.use_direct``) says it is cheaper, and inputs much longer than the
    filter take overlap-add (blocks of a few x Lk transformed as one batched rfft; the block tails are added
    while cropping) when ``numba_kernels.cpu.fft_conv.choose`` says it is cheaper. Giving ``fft_size``
    forces the single FFT of that size.
    k's transform is cached (:func:`clear_fft_conv_cache`) for the same k object with the same checksum
    (host: float64 sum + strided sample; device: identity); after editing k in place, clear the cache.
    On CUDA the forward keeps its spectrum buffer (per thread, the latest shape) for the next call, and results
    come from a small output cache (like torch's caching allocator: a result's memory is reused only once no
    array, slice or ``__cuda_array_interface__`` consumer references it; at most 512 MiB per thread,
    ``NUMBA_KERNELS_OUT_POOL=0`` turns it off); the cache clear frees both. Overlap-add is chosen automatically on CUDA only past single FFTs of 2^20 points.

    Parameters
    ----------
    u : ndarray, shape (B, H, L)
        float16, bfloat16, float32 or float64 (half types computed in float32, returned in u's dtype).
    k : ndarray, shape (H, Lk)
        Any float dtype (converted to the compute dtype).
    mode : {"causal", "same", "full"}
    bias : ndarray, shape (H,), optional
    pregate : ndarray, shape (B, H, L), optional
        u's dtype.
    postgate : ndarray, shape (B, H, Lout), optional
        u's dtype; Lout = L ("causal", "same") or L + Lk - 1 ("full").
    fft_size : int, optional
        FFT length N >= the size above (ValueError otherwise).
    backend : {"auto", "cpu", "cuda", "reference"}, optional
    fft_lib : {"auto", "scipy", "pyfftw"}, optional
        CPU FFT library; default ``$NUMBA_KERNELS_FFT_LIB``, else "auto" (pyfftw when installed, else scipy).
    method : {"auto", "fft", "direct", "overlap_add"}, optional
        "auto" (the cost models), or force one path ("direct" is CPU only; ignored when fft_size is given).

    Returns
    -------
    y : ndarray, shape (B, H, Lout)
        u's dtype; a numba device array when inputs were device arrays.
    """
    dt, B, H, L, Lk, Lout, start, N, forced = _check(u, k, mode, bias, pregate, postgate, fft_size)
    arrays = (u, k, bias, pregate, postgate)
    be = dsp.resolve_backend(backend, *arrays)
    _check_method(method, be)
    on_dev = dsp.any_on_device(*arrays)
    cdt = dsp.compute_dtype(dt)
    Lke = min(Lk, L) if mode == "causal" else Lk  # causal taps beyond L never reach the output
    if be == "reference":
        from numba_kernels.reference.fft_conv import fft_conv_ref

        out = fft_conv_ref(*[dsp.to_host(a) for a in arrays[:2]], mode, *[dsp.to_host(a) for a in arrays[2:]])
    elif be == "cpu":
        from numba_kernels.cpu import fft_conv as cf

        lib = cf.fft_lib(fft_lib)
        kc = np.ascontiguousarray(_host_compute(k, cdt, 2)[:, :Lke])  # (H, Lke)
        meth, Nm, M = cf.choose(L, Lke, Lout, N, forced, method)
        out = cf.fwd_cpu(_host_compute(u, cdt, 3), kc, _host_compute(bias, cdt, 1), _host_compute(pregate, cdt, 3),
                         _host_compute(postgate, cdt, 3), start, Lout, Nm, meth, lib,
                         lambda: cached_filter(k, Lke, Nm, cdt, "cpu", lambda: lib.rfft(kc, Nm)), M)
    else:
        from numba_kernels.cuda.fft_conv import fwd_cuda

        out = fwd_cuda(u, k, bias, pregate, postgate, start, Lout, Lke, N, dt, method, forced)
    return _cast_back(out, dt, on_dev)


def fft_conv_backward(dout, u, k, *, mode="causal", bias=None, pregate=None, postgate=None, fft_size=None,
                      backend=None, fft_lib=None, method="auto"):
    """Gradients of :func:`fft_conv` (recomputes what it needs from the inputs).

    Parameters
    ----------
    dout : ndarray, shape (B, H, Lout)
        Upstream gradient of y; u's dtype.
    u, k, mode, bias, pregate, postgate, fft_size, backend, fft_lib, method
        As given to :func:`fft_conv` (the backward has no overlap-add path: "overlap_add" runs the single FFT).

    Returns
    -------
    du : ndarray, shape (B, H, L)
        u's dtype.
    dk : ndarray, shape (H, Lk)
        k's dtype (zero beyond L for "causal").
    dbias : ndarray, shape (H,) or None
        bias's dtype; None without bias.
    dpregate : ndarray, shape (B, H, L) or None
    dpostgate : ndarray, shape (B, H, Lout) or None
    """
    dt, B, H, L, Lk, Lout, start, N, forced = _check(u, k, mode, bias, pregate, postgate, fft_size, dout)
    arrays = (dout, u, k, bias, pregate, postgate)
    be = dsp.resolve_backend(backend, *arrays)
    _check_method(method, be)
    on_dev = dsp.any_on_device(*arrays)
    cdt = dsp.compute_dtype(dt)
    Lke = min(Lk, L) if mode == "causal" else Lk
    if be == "reference":
        from numba_kernels.reference.fft_conv import fft_conv_backward_ref

        h = [dsp.to_host(a) for a in arrays]
        du, dk, db, dpre, dpost = fft_conv_backward_ref(*h[:3], mode, *h[3:])
    elif be == "cpu":
        from numba_kernels.cpu import fft_conv as cf

        lib = cf.fft_lib(fft_lib)
        kc = np.ascontiguousarray(_host_compute(k, cdt, 2)[:, :Lke])  # (H, Lke): causal taps beyond L get zero gradient
        direct = cf.choose(L, Lke, Lout, N, forced, method, backward=True)[0] == "direct"
        du, dkc, db, dpre, dpost = cf.bwd_cpu(
            _host_compute(dout, cdt, 3), _host_compute(u, cdt, 3), kc, _host_compute(bias, cdt, 1),
            _host_compute(pregate, cdt, 3), _host_compute(postgate, cdt, 3), start, N, direct, lib,
            lambda: cached_filter(k, Lke, N, cdt, "cpu", lambda: lib.rfft(kc, N)))
        dk = np.zeros((H, Lk), cdt)
        dk[:, :Lke] = dkc
    else:
        from numba_kernels.cuda.fft_conv import bwd_cuda

        du, dk, db, dpre, dpost = bwd_cuda(dout, u, k, bias, pregate, postgate, start, Lke, N, dt)
    return (_cast_back(du, dt, on_dev), _cast_back(dk, dsp.array_dtype(k), on_dev),
            None if bias is None else _cast_back(db, dsp.array_dtype(bias), on_dev),
            None if pregate is None else _cast_back(dpre, dt, on_dev),
            None if postgate is None else _cast_back(dpost, dt, on_dev))
