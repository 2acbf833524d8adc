"""SFU approximations used by the selective-scan kernels (inline PTX; NumPy fallbacks under the simulator):
``lg2`` (lg2.approx.ftz.f32) and ``rcp`` (rcp.approx.ftz.f32). ``ex2`` lives in ``_intrinsics``.
Kept apart from ``_intrinsics`` only because that module belongs to the attention kernels; merge when convenient.
"""
import numpy as np

from numba_kernels.cuda import _intrinsics as intr

if not intr.SIM:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def _unary(text):
        @intrinsic
        def fn(typingctx, x):
            sig = types.float32(types.float32)

            def codegen(context, builder, signature, args):
                fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()])
                return builder.call(ir.InlineAsm(fnty, text, "=f,f", side_effect=False), list(args))

            return sig, codegen

        return fn

    lg2 = _unary("lg2.approx.ftz.f32 $0, $1;")
    rcp = _unary("rcp.approx.ftz.f32 $0, $1;")
else:
    def lg2(x):
        return np.float32(np.log2(np.float32(x)))

    def rcp(x):
        return np.float32(np.float32(1.0) / np.float32(x))
