"""A ctypes binding to cuFFT: batched in-place real transforms along the last axis, plans cached.

The library comes from ``cuda.pathfinder.load_nvidia_dynamic_lib("cufft")`` (the ``nvidia-cufft`` wheel of the
``cuda`` extra, or the CUDA toolkit); it is loaded on first use, never at import. Pointers are raw device
addresses (``arr.__cuda_array_interface__["data"][0]``); every call reports its cuFFT status by name.

In-place layout (cuFFT's padded real layout): each of ``rows`` rows holds 2F = 2 (N // 2 + 1) reals; R2C reads
the first N and writes F interleaved complex values; C2R does the reverse, unnormalized (scale by 1 / N).
"""
import ctypes
import threading

STATUS = {0: "CUFFT_SUCCESS", 1: "CUFFT_INVALID_PLAN", 2: "CUFFT_ALLOC_FAILED", 3: "CUFFT_INVALID_TYPE",
          4: "CUFFT_INVALID_VALUE", 5: "CUFFT_INTERNAL_ERROR", 6: "CUFFT_EXEC_FAILED", 7: "CUFFT_SETUP_FAILED",
          8: "CUFFT_INVALID_SIZE", 9: "CUFFT_UNALIGNED_DATA", 10: "CUFFT_INCOMPLETE_PARAMETER_LIST",
          11: "CUFFT_INVALID_DEVICE", 12: "CUFFT_PARSE_ERROR", 13: "CUFFT_NO_WORKSPACE",
          14: "CUFFT_NOT_IMPLEMENTED", 15: "CUFFT_LICENSE_ERROR", 16: "CUFFT_NOT_SUPPORTED",
          17: "CUFFT_MISSING_DEPENDENCY", 18: "CUFFT_NVRTC_FAILURE", 19: "CUFFT_NVJITLINK_FAILURE",
          20: "CUFFT_NVSHMEM_FAILURE"}
R2C, C2R, D2Z, Z2D = 0x2A, 0x2C, 0x6A, 0x6C
#: rows per plan: keep every plan's element count inside 32-bit ints (cufftPlanMany's parameters)
MAX_ELEMS = 2 ** 31 - 1
#: cufftXtCallbackType: load complex / double complex / real / double real, then the same four for stores
CB_LD_COMPLEX, CB_LD_COMPLEX_DOUBLE, CB_LD_REAL, CB_LD_REAL_DOUBLE = 0, 1, 2, 3
CB_ST_COMPLEX, CB_ST_COMPLEX_DOUBLE, CB_ST_REAL, CB_ST_REAL_DOUBLE = 4, 5, 6, 7

_lib = None
_plans = {}
_keep = {}
_lock = threading.Lock()


class CufftError(RuntimeError):
    """A cuFFT call returned a status other than CUFFT_SUCCESS."""

    def __init__(self, func, status):
        self.status = status
        self.name = STATUS.get(status, f"unknown cuFFT status {status}")
        super().__init__(f"{func} failed: {self.name} ({status})")


def _check(func, status):
    if status != 0:
        raise CufftError(func, status)


def lib():
    """The loaded libcufft (ctypes.CDLL) with argument types set."""
    global _lib
    if _lib is not None:
        return _lib
    from cuda.pathfinder import load_nvidia_dynamic_lib

    try:
        dl = load_nvidia_dynamic_lib("cufft")
    except Exception as e:  # DynamicLibNotFoundError and friends
        raise RuntimeError(f"cuFFT not found ({e}); install it with pip install 'numba_kernels[cuda]' "
                           "(nvidia-cufft) or a CUDA toolkit") from e
    L = ctypes.CDLL(dl.abs_path) if dl.abs_path else ctypes.CDLL("libcufft.so", handle=dl._handle_uint)
    ip, i, h, p = ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int, ctypes.c_void_p
    L.cufftPlanMany.argtypes = [ip, i, ip, ip, i, i, ip, i, i, i, i]
    L.cufftSetStream.argtypes = [h, p]
    for name in ("cufftExecR2C", "cufftExecC2R", "cufftExecD2Z", "cufftExecZ2D"):
        getattr(L, name).argtypes = [h, p, p]
    L.cufftDestroy.argtypes = [h]
    L.cufftGetVersion.argtypes = [ip]
    L.cufftCreate.argtypes = [ip]
    lp, ll = ctypes.POINTER(ctypes.c_longlong), ctypes.c_longlong
    L.cufftMakePlanMany64.argtypes = [h, i, lp, lp, ll, ll, lp, ll, ll, i, ll, ctypes.POINTER(ctypes.c_size_t)]
    L.cufftMakePlanMany.argtypes = [h, i, ip, ip, i, i, ip, i, i, i, i, ctypes.POINTER(ctypes.c_size_t)]
    for name in ("cufftPlanMany", "cufftSetStream", "cufftExecR2C", "cufftExecC2R", "cufftExecD2Z",
                 "cufftExecZ2D", "cufftDestroy", "cufftGetVersion", "cufftCreate", "cufftMakePlanMany64", "cufftMakePlanMany"):
        getattr(L, name).restype = ctypes.c_int
    _lib = L
    return L


def version():
    v = ctypes.c_int()
    _check("cufftGetVersion", lib().cufftGetVersion(ctypes.byref(v)))
    return v.value


def plan(N, rows, inverse, double, device=0, dense=False):
    """A cached batched 1-D plan: ``rows`` transforms of size N; real rows 2 (N // 2 + 1) apart (the in-place
    padded layout) or, with ``dense``, N apart (out of place: real and complex rows in separate buffers)."""
    key = (int(N), int(rows), bool(inverse), bool(double), int(device)) + (("dense",) if dense else ())
    with _lock:
        if key in _plans:
            return _plans[key]
        F = N // 2 + 1
        R = N if dense else 2 * F
        arr = ctypes.c_int * 1
        real, cplx = arr(R), arr(F)
        kind = (Z2D if double else C2R) if inverse else (D2Z if double else R2C)
        inem, idist, onem, odist = (cplx, F, real, R) if inverse else (real, R, cplx, F)
        h = ctypes.c_int()
        _check("cufftPlanMany", lib().cufftPlanMany(ctypes.byref(h), 1, arr(N), inem, 1, idist, onem, 1, odist,
                                                     kind, int(rows)))
        _plans[key] = h.value
        return h.value


def exec_inplace(ptr, N, rows, inverse, double, stream=0, device=0):
    """Transform ``rows`` rows of 2 (N // 2 + 1) reals at device address ``ptr`` in place, on ``stream``
    (a raw CUstream handle, 0 = the legacy default stream). Splits into chunks of rows that fit 32-bit plans."""
    _exec(ptr, ptr, N, rows, inverse, double, stream, device, False)


def exec_dense(real_ptr, cplx_ptr, N, rows, inverse, double, stream=0, device=0):
    """Out-of-place transform of ``rows`` rows: R2C from dense real rows (N apart) at ``real_ptr`` to complex rows
    (N // 2 + 1 apart) at ``cplx_ptr``, or C2R back (the complex input is overwritten). On the H200 (2026-12-01)
    1.3-1.6x faster than in place at N >= 2^17 (benchmarks/results/gpu_h200_2026-12-01b_fft_parts_probe.txt)."""
    _exec(real_ptr, cplx_ptr, N, rows, inverse, double, stream, device, True)


def _exec(real_ptr, cplx_ptr, N, rows, inverse, double, stream, device, dense):
    F = N // 2 + 1
    item = 8 if double else 4
    R = N if dense else 2 * F
    step = max(1, min(rows, MAX_ELEMS // (2 * F)))
    L = lib()
    fn = ("cufftExecZ2D" if double else "cufftExecC2R") if inverse else ("cufftExecD2Z" if double else "cufftExecR2C")
    for r0 in range(0, rows, step):
        nb = min(step, rows - r0)
        h = plan(N, nb, inverse, double, device, dense=dense)
        _check("cufftSetStream", L.cufftSetStream(h, ctypes.c_void_p(int(stream) or None)))
        pr = ctypes.c_void_p(int(real_ptr) + r0 * R * item)
        pc = ctypes.c_void_p(int(cplx_ptr) + r0 * 2 * F * item)
        _check(fn, getattr(L, fn)(h, pc, pr) if inverse else getattr(L, fn)(h, pr, pc))


def jit_callback_entry():
    """cuFFT's cufftXtSetJITCallback taking the callback's symbol name (cuFFT 12: ``cufftXtSetJITCallback``;
    cuFFT 11.3-11.4: ``__cufftXtSetJITCallback_12_7``), or None when this cuFFT has no such entry."""
    L, v = lib(), version()
    from cuda.pathfinder import load_nvidia_dynamic_lib

    for dep in ("nvJitLink", "nvrtc"):  # cuFFT links the callbacks with these; load them where pip put them
        try:
            load_nvidia_dynamic_lib(dep)
        except Exception:  # the toolkit's copies on the loader path may still serve
            pass
    name = "cufftXtSetJITCallback" if v >= 12000 else "__cufftXtSetJITCallback_12_7" if v >= 11300 else None
    fn = getattr(L, name, None) if name else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.POINTER(ctypes.c_void_p)]
        fn.restype = ctypes.c_int
    return fn


def callback_plan(key, N, rows, inverse, double, callbacks, info_ptr, api64=True):
    """A cached batched 1-D out-of-place plan with LTO callbacks, keyed by ``key`` (any hashable naming the
    callbacks' configuration): real side dense (distance N), complex side dense (distance N // 2 + 1).
    ``callbacks``: (symbol name, LTO-IR bytes, CB_* type); each gets ``info_ptr`` (a device address) as
    its callerInfo. Raises CufftError (e.g. CUFFT_NOT_SUPPORTED, CUFFT_NVJITLINK_FAILURE) or RuntimeError
    when this cuFFT has no JIT callbacks."""
    key = ("cb", key, int(N), int(rows), bool(inverse), bool(double), bool(api64), int(info_ptr))
    with _lock:
        if key in _plans:
            return _plans[key]
        setcb = jit_callback_entry()
        if setcb is None:
            raise RuntimeError(f"cuFFT {version()} has no JIT (LTO) callbacks (needs cuFFT >= 11.3)")
        L = lib()
        h = ctypes.c_int()
        _check("cufftCreate", L.cufftCreate(ctypes.byref(h)))
        # cuFFT keeps the name, LTO-IR and callerInfo pointers and reads them when the plan is made (and
        # maybe later): they live as long as the plan, in _keep
        keep = [ctypes.c_void_p(int(info_ptr))]
        try:
            for name, ir, cbtype in callbacks:
                nb, irb = ctypes.create_string_buffer(name.encode()), ctypes.create_string_buffer(bytes(ir), len(ir))
                keep += [nb, irb]
                _check("cufftXtSetJITCallback", setcb(h.value, nb, irb, len(ir), cbtype, ctypes.byref(keep[0])))
            F = N // 2 + 1
            arr = (ctypes.c_longlong if api64 else ctypes.c_int) * 1
            real, cplx = arr(N), arr(F)
            kind = (Z2D if double else C2R) if inverse else (D2Z if double else R2C)
            inem, idist, onem, odist = (cplx, F, real, N) if inverse else (real, N, cplx, F)
            ws = ctypes.c_size_t()
            fn = "cufftMakePlanMany64" if api64 else "cufftMakePlanMany"
            _check(fn, getattr(L, fn)(h.value, 1, arr(N), inem, 1, idist, onem, 1, odist, kind, int(rows),
                                      ctypes.byref(ws)))
        except Exception:
            L.cufftDestroy(h.value)
            raise
        _plans[key] = h.value
        _keep[key] = keep
        return h.value


def exec_plan(h, inverse, double, src, dst, stream=0):
    """Run plan ``h`` (from :func:`callback_plan`) from device address ``src`` to ``dst`` on ``stream``."""
    L = lib()
    fn = ("cufftExecZ2D" if double else "cufftExecC2R") if inverse else ("cufftExecD2Z" if double else "cufftExecR2C")
    _check("cufftSetStream", L.cufftSetStream(h, ctypes.c_void_p(int(stream) or None)))
    _check(fn, getattr(L, fn)(h, ctypes.c_void_p(int(src)), ctypes.c_void_p(int(dst))))


def clear_plans():
    """Destroy every cached plan (called by ``numba_kernels.clear_fft_conv_cache``)."""
    with _lock:
        plans = list(_plans.values())
        _plans.clear()
        keep = list(_keep.values())
        _keep.clear()
    if plans and _lib is not None:
        for h in plans:
            _check("cufftDestroy", _lib.cufftDestroy(h))
    del keep


def plan_count():
    return len(_plans)
