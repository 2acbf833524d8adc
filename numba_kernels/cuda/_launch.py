"""A light launch path for compiled numba.cuda kernels: cached CUfunction + cached parameter packing +
``cuLaunchKernel`` through ctypes, instead of numba's per-call argument typing, conversion and launch.

API (small on purpose)::

    from numba_kernels.cuda import _launch
    _launch.launch(kernel, grid, block, smem, args)          # like kernel[grid, block, 0, smem](*args)
    _launch.blocks_per_sm(kernel, block, smem, args)         # resident blocks per SM (occupancy)
    _launch.ENABLED = False                                  # switch the fast path off (tests, debugging)

``kernel`` is a ``numba.cuda.jit`` dispatcher; args are numba device arrays (anything else numba would copy
or convert first, e.g. a host ndarray) and Python / NumPy scalars of integer, float or bool type.

How: the first launch of a (kernel, argument types, smem) goes through numba (compiling it, raising the dynamic
shared-memory limit above 48 KB); it then records the overload's kernel handle and a ``struct`` format that
packs numba's flattened kernel ABI (an array is meminfo, parent, size, itemsize, data, shape..., strides...;
every parameter gets an 8-byte slot), and checks that format against numba's own ``_prepare_args`` output on
these arguments. Later launches only pack the values into a preallocated buffer (one ``struct.pack_into``)
and call ``cuLaunchKernel`` on the default stream, the stream numba uses by default, so ordering with numba
launches and copies is unchanged. Anything unexpected (the simulator, no driver library, an argument kind
the packer does not know, a packing mismatch) takes numba's normal launch, permanently for that key.
The environment variable ``NUMBA_KERNELS_FAST_LAUNCH=0`` switches the fast path off.
"""
import ctypes
import os
import struct

from numba_kernels.cuda import _intrinsics as intr

#: fast path on/off (read at every launch)
ENABLED = os.environ.get("NUMBA_KERNELS_FAST_LAUNCH", "1") != "0"

_cu = None          # ctypes cuLaunchKernel, or False when unavailable
_cache = {}         # key -> _Fast instance, or None (= use numba's launch)
_occ = {}
_MISSING = object()
_SLOT = 8
_INT_CODES = {(8, True): "b7x", (8, False): "B7x", (16, True): "h6x", (16, False): "H6x", (32, True): "i4x",
              (32, False): "I4x", (64, True): "q", (64, False): "Q"}


def _driver():
    global _cu
    if _cu is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuLaunchKernel
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
            _cu = fn
        except (OSError, AttributeError):
            _cu = False
    return _cu


_ARRAY_TYPES = set()  # numba device-array classes seen so far (their instances take the cached path)


def _info(a):
    """(type key, flattened ABI values (0, 0, size, itemsize, data pointer, shape..., strides...)) of a numba
    device array, cached on the array (shape, strides, layout and pointer of a numba device array never change)."""
    d = a.__dict__.get("_nk_launch")
    if d is None:
        f = a.flags
        d = ((type(a), a.dtype, a.ndim, f["C_CONTIGUOUS"], f["F_CONTIGUOUS"]),
             (0, 0, a.size, a.dtype.itemsize, a.device_ctypes_pointer.value or 0) + tuple(a.shape) + tuple(a.strides))
        a.__dict__["_nk_launch"] = d
    return d


def _is_numba_array(a):
    t = type(a)
    if t in _ARRAY_TYPES:
        return True
    if getattr(t, "__cuda_memory__", False) and hasattr(a, "__dict__") and hasattr(a, "gpu_data"):
        _ARRAY_TYPES.add(t)
        return True
    return False


def _key_values(kernel, smem, args):
    """(cache key, flattened parameter values) of a launch: one pass over the arguments."""
    key = [id(kernel), smem]
    vals = []
    for a in args:
        if type(a) in _ARRAY_TYPES or _is_numba_array(a):
            d = a.__dict__.get("_nk_launch") or _info(a)
            key.append(d[0])
            vals.extend(d[1])
        else:
            key.append(type(a))
            vals.append(a)
    return tuple(key), vals


def param_format(argtypes):
    """(struct.Struct over 8-byte slots, per-argument kinds: 0 = array, 1 = scalar) of numba's flattened kernel
    parameters for a tuple of numba types; NotImplementedError for a type the packer does not know."""
    from numba.cuda import types

    codes, kinds = [], []
    for ty in argtypes:
        if isinstance(ty, types.Array):
            codes.append("qq" + "q" * (3 + 2 * ty.ndim))  # meminfo, parent, size, itemsize, data, shape, strides
            kinds.append(0)
        elif isinstance(ty, types.Boolean):
            codes.append("?7x")
            kinds.append(1)
        elif isinstance(ty, types.Integer):
            codes.append(_INT_CODES[(ty.bitwidth, ty.signed)])
            kinds.append(1)
        elif ty == types.float32:
            codes.append("f4x")
            kinds.append(1)
        elif ty == types.float64:
            codes.append("d")
            kinds.append(1)
        else:
            raise NotImplementedError(ty)
    return struct.Struct("<" + "".join(codes)), tuple(kinds)


class _Fast:
    """Packed launcher of one kernel handle (a CUfunction, or a CUkernel cast to one) for numba argument types:
    ``struct`` format over 8-byte slots, a pointer array. Needs ``_driver()`` to have found cuLaunchKernel."""

    def __init__(self, func, argtypes):
        self.fmt, self.kinds = param_format(argtypes)
        n = self.fmt.size // _SLOT
        self.buf = ctypes.create_string_buffer(max(self.fmt.size, _SLOT))
        base = ctypes.addressof(self.buf)
        self.ptrs = (ctypes.c_void_p * max(n, 1))(*[base + _SLOT * i for i in range(n)])
        self.ptrs_addr = ctypes.addressof(self.ptrs)
        self.func = int(func)

    def values(self, args):
        return _key_values(None, 0, args)[1]

    def matches_numba(self, overload, argtypes, args):
        """Our packed bytes equal the values numba's own argument preparation produces for ``args``."""
        ka = []
        for ty, a in zip(argtypes, args):
            overload._prepare_args(ty, a, 0, [], ka)
        ka = [0 if getattr(x, "value", x) is None else getattr(x, "value", x) for x in ka]
        try:
            return self.fmt.pack(*ka) == self.fmt.pack(*self.values(args))
        except struct.error:
            return False

    def __call__(self, grid, block, smem, vals):
        self.fmt.pack_into(self.buf, 0, *vals)
        gx, gy, gz = grid
        bx, by, bz = block
        rc = _cu(self.func, gx, gy, gz, bx, by, bz, smem, None, self.ptrs_addr, None)
        if rc:
            raise RuntimeError(f"cuLaunchKernel failed with CUresult {rc}")


def _dims(x):
    if isinstance(x, int):
        return (x, 1, 1)
    x = tuple(int(v) for v in x)
    return x + (1,) * (3 - len(x))


def _numba_launch(kernel, grid, block, smem, args):
    if not intr.SIM and smem > 48 * 1024:
        intr.launch(kernel, grid, block, smem, args)
    else:
        kernel[grid, block, 0, smem](*args)


def launch(kernel, grid, block, smem, args):
    """Launch ``kernel[grid, block, 0, smem](*args)`` on the default stream, raising the dynamic shared-memory
    limit when smem > 48 KB; through the cached cuLaunchKernel path after the first launch of a signature.

    Parameters
    ----------
    kernel : numba.cuda dispatcher
    grid, block : int or tuple of up to 3 ints
    smem : int
        Dynamic shared memory bytes per block.
    args : tuple
        Kernel arguments (numba device arrays and scalars take the fast path).
    """
    if intr.SIM or not ENABLED:
        _numba_launch(kernel, grid, block, smem, args)
        return
    key, vals = _key_values(kernel, smem, args)
    fast = _cache.get(key, _MISSING)
    if fast is not _MISSING and fast is not None:
        fast(grid if type(grid) is tuple and len(grid) == 3 else _dims(grid),
             block if type(block) is tuple and len(block) == 3 else _dims(block), smem, vals)
        return
    _numba_launch(kernel, grid, block, smem, args)
    if fast is _MISSING:
        _cache[key] = _build(kernel, args)


def _build(kernel, args):
    if not _driver():
        return None
    try:
        argtypes = tuple(kernel.typeof_pyval(a) for a in args)
        overload = kernel.overloads[argtypes]
        fast = _Fast(overload._codelibrary.get_cufunc().handle, argtypes)  # a CUkernel, cast to CUfunction
        return fast if fast.matches_numba(overload, argtypes, args) else None
    except Exception:  # an ABI or API this packer does not know: keep numba's launch for this key
        return None


def is_fast(kernel, smem, args):
    """True when launches of (kernel, smem, argument types) take the cuLaunchKernel path (after a first one)."""
    return bool(_cache.get(_key_values(kernel, smem, args)[0]))


def blocks_per_sm(kernel, block, smem, args):
    """Resident blocks per SM of ``kernel`` with ``block`` threads and ``smem`` dynamic shared bytes for these
    arguments' types (compiles the overload if needed; cached). 1 in the simulator."""
    if intr.SIM:
        return 1
    return blocks_per_sm_sig(kernel, block, smem, tuple(kernel.typeof_pyval(a) for a in args))


def blocks_per_sm_sig(kernel, block, smem, argtypes):
    """``blocks_per_sm`` for a signature given as a tuple of numba types."""
    if intr.SIM:
        return 1
    key = (id(kernel), block, smem, tuple(argtypes))
    n = _occ.get(key)
    if n is None:
        from numba.cuda.cudadrv.devices import get_context

        ov = kernel.compile(tuple(argtypes))
        intr.set_dynamic_shared(ov, smem)
        cufunc = ov._codelibrary.get_cufunc()
        n = _occ[key] = max(1, int(get_context().get_active_blocks_per_multiprocessor(cufunc, block, smem)))
    return n


_memcpy = None


def _htod():
    global _memcpy
    if _memcpy is None:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuMemcpyHtoDAsync_v2
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _memcpy = fn
        except (OSError, AttributeError):
            _memcpy = False
    return _memcpy


class Uploader:
    """Small host -> device uploads without a host stall: the values go through a pinned staging ring and
    ``cuMemcpyHtoDAsync`` on the default stream (ordered after the launches already enqueued, so a kernel in
    flight still sees the old contents of a reused device buffer). When the ring wraps, the host waits once
    for the device (every ``nbytes`` of uploads), so a staging slot is never rewritten before its copy ran.

    ``put(key, host)`` returns a device array of host's shape and dtype holding host's values, one device
    buffer per key (and shape/dtype), re-uploaded only when the values changed.
    Simulator / no driver: falls back to a synchronous ``cuda.to_device``."""

    def __init__(self, nbytes=1 << 20):
        self.nbytes = nbytes
        self.ring = None
        self.pos = 0
        self.bufs = {}

    def put(self, key, host):
        import numpy as np
        from numba import cuda

        host = np.ascontiguousarray(host)
        k = (key, host.shape, host.dtype.str)
        ent = self.bufs.get(k)
        if ent is not None and np.array_equal(ent[1], host):
            return ent[0]
        if ent is None and len(self.bufs) > 512:
            self.bufs.clear()
        if intr.SIM or not ENABLED or not _htod() or host.nbytes > self.nbytes // 4:
            dev = cuda.to_device(host)
            self.bufs[k] = (dev, host.copy())
            return dev
        dev = ent[0] if ent is not None else cuda.device_array(host.shape, host.dtype)
        if self.ring is None:
            self.ring = cuda.pinned_array(self.nbytes, np.uint8)
            self.base = self.ring.ctypes.data
        n = host.nbytes
        start = (self.pos + 255) // 256 * 256
        if start + n > self.nbytes:
            cuda.synchronize()  # every copy from the previous lap has run
            start = 0
        if n:
            self.ring[start:start + n] = host.view(np.uint8).reshape(-1)
            rc = _memcpy(_info(dev)[1][4], self.base + start, n, None)  # the data pointer
            if rc:
                raise RuntimeError(f"cuMemcpyHtoDAsync failed with CUresult {rc}")
        self.pos = start + n
        self.bufs[k] = (dev, host.copy())
        return dev


_ctx_fn = None


def context_key():
    """An int naming the current CUDA context (cuCtxGetCurrent through ctypes, ~1 us; numba's
    ``cuda.get_current_device()`` costs several), for per-device caches; 0 in the simulator, and the
    device id through numba when the driver library cannot be called directly."""
    global _ctx_fn
    if intr.SIM:
        return 0
    if _ctx_fn is None:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            _ctx_fn = (fn, ctypes.c_void_p())
        except (OSError, AttributeError):
            _ctx_fn = False
    if _ctx_fn:
        fn, out = _ctx_fn
        if fn(ctypes.byref(out)) == 0 and out.value:
            return out.value
    from numba import cuda

    return -1 - cuda.get_current_device().id
