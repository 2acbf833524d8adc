"""One place for the njit / cuda.jit options used by every kernel."""
import functools

import numba

#: fastmath flags that keep inf/nan semantics (attention masks rely on -inf)
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})
#: the same without ``reassoc``: LLVM may not reorder float sums, so the bits of a kernel do not depend on
#: where LLVM inlined it (with reassoc, a process that compiles the kernels got other bits than one that
#: loaded them from numba's cache)
FASTMATH_ORDERED = FASTMATH - {"reassoc"}


def njit(fn=None, *, parallel=False, cache=True, fastmath=FASTMATH, inline="never", error_model="python"):
    """``numba.njit`` with the project's defaults (cached, nogil, inf-safe fastmath). ``error_model="numpy"``
    drops the zero check of every float division (an early exit that stops LLVM vectorizing the loop)."""
    if fn is None:
        return functools.partial(njit, parallel=parallel, cache=cache, fastmath=fastmath, inline=inline,
                                 error_model=error_model)
    return numba.njit(fn, parallel=parallel, cache=cache, fastmath=set(fastmath), nogil=True, inline=inline,
                      error_model=error_model)


def njit_parallel(fn=None, **kw):
    """``njit(parallel=True)``: prange loops run on all cores."""
    return njit(fn, parallel=True, **kw)
