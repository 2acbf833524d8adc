"""Backend resolution, host/device array handling and the dtype policy shared by every op.

Nothing here imports ``numba.cuda`` at module import time: a machine without a GPU or a CUDA
toolkit can ``import numba_kernels``; asking for ``backend="cuda"`` there raises at call time.
"""
import os

import ml_dtypes
import numpy as np

BACKENDS = ("auto", "cpu", "cuda", "reference")
ENV_BACKEND = "NUMBA_KERNELS_BACKEND"

bfloat16 = np.dtype(ml_dtypes.bfloat16)
#: dtypes every op accepts for floating-point tensors
FLOAT_DTYPES = (np.dtype(np.float16), bfloat16, np.dtype(np.float32), np.dtype(np.float64))


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run on this machine."""


_DEVICE_TYPE_NAMES = ("DeviceNDArray", "MappedNDArray", "FakeCUDAArray")


def is_device_array(x):
    """True for numba device arrays (the simulator's too) and any object exposing
    ``__cuda_array_interface__`` (cupy, torch, ...)."""
    if x is None or isinstance(x, np.ndarray):
        return False
    if type(x).__name__ in _DEVICE_TYPE_NAMES:  # numba's own: skip building the interface dict (~5 us)
        return True
    return hasattr(x, "__cuda_array_interface__")


def cuda_available():
    """True when a CUDA GPU (or the CUDA simulator) can run kernels."""
    try:
        from numba import cuda
    except Exception:  # pragma: no cover - numba-cuda missing
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # pragma: no cover - driver problems
        return False


def resolve_backend(backend, *arrays):
    """Resolve ``backend`` ("auto" | "cpu" | "cuda" | "reference" | None) for these inputs.

    ``None`` means: the ``NUMBA_KERNELS_BACKEND`` environment variable, else "auto".
    "auto" is "cuda" when any array is a device array, else "cpu".
    """
    if backend is None:
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cuda" if any(is_device_array(a) for a in arrays) else "cpu"
    if backend == "cuda" and not cuda_available():
        raise BackendUnavailableError(
            "backend='cuda' was requested but no CUDA GPU is available "
            "(install numba-cuda[cu13] and an NVIDIA driver, or set NUMBA_ENABLE_CUDASIM=1 for the simulator)"
        )
    return backend


def any_on_device(*arrays):
    return any(is_device_array(a) for a in arrays)


def to_host(x, dtype=None):
    """A NumPy view/copy of ``x`` (device arrays are copied to the host; None stays None).

    ``dtype``: the dtype the result must have; raw uint16 bits (how bfloat16 lives on the device)
    are reinterpreted as bfloat16.
    """
    if x is None:
        return x
    if is_device_array(x):
        from numba import cuda

        x = to_device(x).copy_to_host()
    x = np.asarray(x)
    if dtype is not None and x.dtype != dtype and x.dtype == np.uint16 and np.dtype(dtype).itemsize == 2:
        x = x.view(dtype)
    return x


def to_device(x, stream=0):
    """A numba device array for ``x`` (no copy when it already lives on the device)."""
    if x is None:
        return None
    from numba import cuda

    if is_device_array(x):
        return x if type(x).__name__ in ("DeviceNDArray", "FakeCUDAArray") else cuda.as_cuda_array(x)
    return cuda.to_device(np.ascontiguousarray(x), stream=stream)


def array_dtype(x):
    """The NumPy dtype of a host or device array."""
    if isinstance(x, np.ndarray):
        return x.dtype
    if is_device_array(x):
        if hasattr(x, "dtype"):
            try:
                return np.dtype(x.dtype)
            except TypeError:
                pass
        return np.dtype(x.__cuda_array_interface__["typestr"])
    return np.asarray(x).dtype


def check_float(name, x, ndim=None, dtypes=FLOAT_DTYPES):
    """Validate a floating-point tensor argument; return its dtype."""
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if not (isinstance(x, np.ndarray) or is_device_array(x)):
        raise TypeError(f"{name} must be a numpy or CUDA device array, got {type(x).__name__}")
    dt = array_dtype(x)
    if dt not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {dt}")
    if ndim is not None and len(x.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return dt


def compute_dtype(dt):
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return np.dtype(np.float64) if np.dtype(dt) == np.float64 else np.dtype(np.float32)


def as_compute(x):
    """Host array in its compute dtype (float16/bfloat16 widened to float32), C-contiguous."""
    return np.ascontiguousarray(x, dtype=compute_dtype(x.dtype))


def check_int_vector(name, x, length=None):
    """Validate a 1-D integer host/device array (e.g. cu_seqlens); return it as int32 host copy."""
    h = to_host(x)
    if h is None or not isinstance(h, np.ndarray) or h.ndim != 1:
        raise ValueError(f"{name} must be a 1-D integer array, got {None if h is None else getattr(h, 'shape', h)}")
    if not np.issubdtype(h.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype (int32), got {h.dtype}")
    if length is not None and h.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {h.shape[0]}")
    return h.astype(np.int32)
