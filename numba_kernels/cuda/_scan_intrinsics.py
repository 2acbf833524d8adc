"""Device helpers of the selective-scan kernels (NumPy fallbacks under the simulator):

* SFU approximations: ``lg2`` (lg2.approx.ftz.f32), ``rcp`` (rcp.approx.ftz.f32), ``tanh_approx``
  (tanh.approx.f32, ~2^-11 relative error: only for 16-bit outputs); ``ex2`` lives in ``_intrinsics``;
* 16-byte access: ``ld4(arr, i)`` -> the 4 elements arr[i:i + 4] as a tuple (plain LLVM vector load, align 16:
  shared arrays become ld.shared.v4); ``st16(arr, i, w0, w1, w2, w3)``: the 16 bytes at &arr[i] (any element
  type) = four uint32 words; ``cp16(words, j, src, i, nbytes)``: cp.async of the 16 bytes at &src[i] (any
  element type) into shared uint32 words[j:j + 4], zero-filled when nbytes is 0 (the simulator copies bytes);
  all addresses 16-byte aligned;
* bit casts: ``f32_of(word)`` / ``bits_f32(x)`` (uint32 <-> float32), ``f64_of(lo, hi)`` / ``bits_f64(x)``,
  ``scale_bits(p, r)`` (p * 2**j where r = j + 1.5 * 2**23).
Kept apart from ``_intrinsics`` only because that module belongs to the attention kernels; merge when convenient.
"""
import numpy as np

from numba_kernels.cuda import _intrinsics as intr

if not intr.SIM:
    from llvmlite import ir
    from numba import cuda, types
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic

    from numba_kernels.cuda._intrinsics import _data_ptr

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
    tanh_approx = _unary("tanh.approx.f32 $0, $1;")

    def _vec_ptr(context, builder, arrty, arr, idx, idxty):
        ptr = _data_ptr(context, builder, arrty, arr, idx, idxty)
        vty = ir.VectorType(context.get_data_type(arrty.dtype), 4)
        return builder.bitcast(ptr, vty.as_pointer(ptr.type.addrspace))

    @intrinsic
    def ld4(typingctx, arr, idx):
        """(arr[idx], ..., arr[idx + 3]) with one 16-byte-aligned vector load."""
        sig = types.UniTuple(arr.dtype, 4)(arr, idx)

        def codegen(context, builder, signature, args):
            vp = _vec_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
            v = builder.load(vp, align=16)
            vals = [builder.extract_element(v, ir.Constant(ir.IntType(32), k)) for k in range(4)]
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    @intrinsic
    def st16(typingctx, arr, idx, a, b, c, d):
        """The 16 bytes at &arr[idx] (any element type) = the words (a, b, c, d), one aligned vector store."""
        sig = types.void(arr, idx, a, b, c, d)

        def codegen(context, builder, signature, args):
            ptr = _data_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
            i32 = ir.IntType(32)
            vp = builder.bitcast(ptr, ir.VectorType(i32, 4).as_pointer(ptr.type.addrspace))
            v = ir.Constant(ir.VectorType(i32, 4), ir.Undefined)
            for k in range(4):
                x = context.cast(builder, args[2 + k], signature.args[2 + k], types.uint32)
                v = builder.insert_element(v, x, ir.Constant(i32, k))
            builder.store(v, vp, align=16)
            return context.get_dummy_value()

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def cp16(dst, dst_idx, src, src_idx, nbytes):
        """cp.async of the 16 bytes at &src[src_idx] (any element type) into the uint32 shared words
        dst[dst_idx:dst_idx + 4]; zero-filled (src not read) when nbytes is 0."""
        intr.cp_async16(dst, dst_idx, src, src_idx, nbytes)

    @cuda.jit(device=True, inline=True)
    def f32_of(w):
        return libdevice.int_as_float(np.int32(w))

    @cuda.jit(device=True, inline=True)
    def bits_f32(x):
        return np.uint32(libdevice.float_as_int(x))

    @cuda.jit(device=True, inline=True)
    def scale_bits(p, r):
        """p * 2**j for r = j + 1.5 * 2**23 (an integer-valued float32): j added to p's exponent field."""
        return libdevice.int_as_float(libdevice.float_as_int(p) + (libdevice.float_as_int(r) << 23))

    @cuda.jit(device=True, inline=True)
    def f64_of(lo, hi):
        return libdevice.longlong_as_double(np.int64(lo) | (np.int64(hi) << 32))

    @cuda.jit(device=True, inline=True)
    def bits_f64(x):
        b = libdevice.double_as_longlong(x)
        return np.uint32(b & 0xFFFFFFFF), np.uint32((b >> 32) & 0xFFFFFFFF)
else:
    def lg2(x):
        return np.float32(np.log2(np.float32(x)))

    def rcp(x):
        return np.float32(np.float32(1.0) / np.float32(x))

    def tanh_approx(x):
        return np.float32(np.tanh(np.float32(x)))

    def _flat(a):
        """The NumPy data of a simulator kernel argument, flat."""
        while hasattr(a, "_item") or hasattr(a, "_ary"):
            a = a._item if hasattr(a, "_item") else a._ary
        return np.asarray(a).reshape(-1)

    def ld4(arr, idx):
        f = _flat(arr)  # a flat element index into any C-contiguous array, as on the device
        return f[idx], f[idx + 1], f[idx + 2], f[idx + 3]

    def st16(arr, idx, a, b, c, d):
        f = _flat(arr)
        f[idx:idx + 16 // f.itemsize].view(np.uint32)[:] = [a, b, c, d]

    def cp16(dst, dst_idx, src, src_idx, nbytes):
        f = _flat(src)
        w = f[src_idx:src_idx + 16 // f.itemsize].view(np.uint32) if nbytes else np.zeros(4, np.uint32)
        for k in range(4):
            dst[dst_idx + k] = w[k]

    def f32_of(w):
        return np.array([w], np.uint32).view(np.float32)[0]

    def bits_f32(x):
        return np.array([x], np.float32).view(np.uint32)[0]

    def scale_bits(p, r):
        w = (int(bits_f32(p)) + (int(bits_f32(r)) << 23)) & 0xFFFFFFFF
        return f32_of(w)

    def f64_of(lo, hi):
        return np.array([lo, hi], np.uint32).view(np.float64)[0]

    def bits_f64(x):
        w = np.array([x], np.float64).view(np.uint32)
        return w[0], w[1]
