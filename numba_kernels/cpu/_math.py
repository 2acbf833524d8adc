"""Small njit helpers shared by CPU kernels (vectorizable exp2 and max, bit casts, an atomic)."""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from numba_kernels._jit import njit

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@intrinsic
def _i32_as_f32(typingctx, x):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _maxnum(typingctx, a, b):
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        lty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [lty], ir.FunctionType(lty, [lty, lty]))
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return a(a, b), codegen


def fmax_fast(a, b):  # pragma: no cover - replaced by the overload below inside njit code
    return max(a, b)


@overload(fmax_fast, inline="always")
def _fmax_fast_ol(a, b):
    """max(a, b) for two floats of one type, as ``llvm.maxnum`` with nnan/nsz flags.

    Numba's ``max`` (and ``a if a > b else b``) lowers to compare + select without fast-math
    flags, which LLVM will not turn into a vector max reduction; this one vectorizes. -inf is
    exact; a NaN input gives either operand (callers only use it where a NaN poisons the
    result anyway).
    """
    if isinstance(a, types.Float) and a == b:
        return lambda a, b: _maxnum(a, b)
    return None


@intrinsic
def _atomic_add(typingctx, arr, i, val):
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [idx])
        inc = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, inc, "monotonic")

    return types.int64(arr, i, val), codegen


def atomic_fetch_add(arr, i, val):  # pragma: no cover - replaced by the overload below inside njit code
    old = arr[i]
    arr[i] += val
    return old


@overload(atomic_fetch_add, inline="always")
def _atomic_fetch_add_ol(arr, i, val):
    """``old = arr[i]; arr[i] += val; return old`` as one atomic step (1-D int64 array).

    Lets the threads of a prange loop share a work counter (dynamic scheduling: numba's omp
    layer splits a prange statically, whatever ``parallel_chunksize`` says).
    """
    if isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1:
        return lambda arr, i, val: _atomic_add(arr, i, val)
    return None


def exp2_fast(x):  # pragma: no cover - replaced by the overload below inside njit code
    return np.exp2(x)


@overload(exp2_fast, inline="always", fastmath=True)
def _exp2_fast_ol(x):
    """2**x. float32: a branch-free degree-6 polynomial (rel. err ~2e-7) that LLVM vectorizes;
    arguments below -127 give 0 (attention only ever calls it with x <= 0). float64: np.exp2."""
    if x == types.float32:
        def impl(x):
            x = max(x, np.float32(-127.0))
            n = np.floor(x + np.float32(0.5))
            f = x - n  # in [-0.5, 0.5]
            p = np.float32(1.5403530393381606e-04)
            p = p * f + np.float32(1.3333558146428443e-03)
            p = p * f + np.float32(9.618129107628477e-03)
            p = p * f + np.float32(5.550410866482158e-02)
            p = p * f + np.float32(2.402265069591007e-01)
            p = p * f + np.float32(6.931471805599453e-01)
            p = p * f + np.float32(1.0)
            return p * _i32_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))
        return impl
    return lambda x: np.exp2(x)


@njit
def exp2_array(x):
    """Elementwise exp2_fast on a 1-D array (for tests)."""
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = exp2_fast(x[i])
    return out


@intrinsic
def _prefetch(typingctx, arr, i):
    if not (isinstance(arr, types.Array) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [idx]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data cache
        return context.get_dummy_value()

    return types.void(arr, i), codegen


def prefetch(arr, i):  # pragma: no cover - replaced by the overload below inside njit code
    pass


@overload(prefetch, inline="always")
def _prefetch_ol(arr, i):
    """A software prefetch (``llvm.prefetch``, read) of the cache line holding the i-th element of a
    C-contiguous array's flat data; no bounds check and no effect on results (the hardware ignores
    prefetches of unmapped addresses, but callers keep i in range anyway)."""
    if isinstance(arr, types.Array) and isinstance(i, types.Integer):
        return lambda arr, i: _prefetch(arr, i)
    return None
