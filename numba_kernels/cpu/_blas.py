"""Keep BLAS single-threaded while njit prange loops call it (avoids oversubscription)."""
import contextlib

_controller = None


def _get_controller():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def single_threaded_blas():
    """Limit every loaded BLAS to one thread for the duration of the block."""
    with _get_controller().limit(limits=1, user_api="blas"):
        yield
