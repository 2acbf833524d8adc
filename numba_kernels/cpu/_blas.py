"""Keep BLAS single-threaded while njit prange loops call it (avoids oversubscription).

``np.dot`` inside njit code calls the BLAS behind ``scipy.linalg.cython_blas`` (scipy's own
OpenBLAS, a different library from NumPy's). threadpoolctl only sees libraries that are loaded when
the controller is built, so that module is imported first: otherwise the limit misses the very BLAS
the kernels use, and every task's gemm spawns BLAS threads on top of the prange threads.

OpenBLAS >= 0.3.27 keeps a per-thread thread count: a limit set from a thread other than the main one
(threadpoolctl calls ``openblas_set_num_threads``) does not reach that thread's own calls, which then ran
two-threaded gemms (oversubscribed, and other bits than the same call from the main thread). So the block also
sets the calling thread's own count (``openblas_set_num_threads_local``), and the task runner's helper threads,
which only run kernel tasks, are pinned to one BLAS thread when they start (``pin_thread``).
"""
import contextlib
import ctypes
import threading

_controller = None
_setters = None
_lock = threading.Lock()
_active = 0  # blocks running now (all threads)
_limiter = None  # the process-wide limit, set and restored from the main thread
_tl = threading.local()  # .orig: this thread's own counts before its first unrestored block


def _get_controller():
    global _controller
    if _controller is None:
        import scipy.linalg.cython_blas  # noqa: F401  (load numba's BLAS before scanning)
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def _local_setters():
    """``openblas_set_num_threads_local`` of every loaded OpenBLAS that has it (OpenBLAS >= 0.3.27)."""
    global _setters
    if _setters is None:
        fns = []
        for info in _get_controller().info():
            if info.get("internal_api") != "openblas":
                continue
            try:
                fn = ctypes.CDLL(info["filepath"]).openblas_set_num_threads_local
            except (OSError, AttributeError):
                continue
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_int]
            fns.append(fn)
        _setters = fns
    return _setters


def pin_thread():
    """Make this thread's OpenBLAS calls single-threaded for good (threads that only run kernel tasks)."""
    for fn in _local_setters():
        fn(1)


@contextlib.contextmanager
def single_threaded_blas():
    """Limit BLAS to one thread for the duration of the block: this thread's own OpenBLAS count, and (from the
    main thread) the process-wide count of every loaded BLAS, which numba's parallel-region threads follow.

    Counts are only restored when no block is running on any thread (restoring one while another thread's call
    ran changed that call's gemms). A thread whose block ended while another was running restores its own count
    when a later block of its own ends alone; the process-wide count can only be changed from the main thread,
    so it is restored when a main-thread block ends alone. Until then that thread's BLAS stays single-threaded."""
    global _active, _limiter
    setters = _local_setters()
    main = threading.current_thread() is threading.main_thread()
    with _lock:
        if main and _limiter is None:
            _limiter = _get_controller().limit(limits=1)
        _active += 1
        prev = [fn(1) for fn in setters]
        if getattr(_tl, "orig", None) is None:
            _tl.orig = prev
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                for fn, p in zip(setters, _tl.orig):
                    fn(p)
                _tl.orig = None
                if main and _limiter is not None:
                    _limiter.restore_original_limits()
                    _limiter = None
