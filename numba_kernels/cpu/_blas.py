"""Keep BLAS single-threaded while njit prange loops call it (avoids oversubscription).

``np.dot`` inside njit code calls the BLAS behind ``scipy.linalg.cython_blas`` (scipy's own
OpenBLAS, a different library from NumPy's). threadpoolctl only sees libraries that are loaded when
the controller is built, so that module is imported first: otherwise the limit misses the very BLAS
the kernels use, and every task's gemm spawns BLAS threads on top of the prange threads.
"""
import contextlib

_controller = None


def _get_controller():
    global _controller
    if _controller is None:
        import scipy.linalg.cython_blas  # noqa: F401  (load numba's BLAS before scanning)
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


@contextlib.contextmanager
def single_threaded_blas():
    """Limit every loaded BLAS (NumPy's and scipy's) to one thread for the duration of the block."""
    with _get_controller().limit(limits=1):
        yield
