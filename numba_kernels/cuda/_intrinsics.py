"""The one module that knows CUDA-specific tricks: inline PTX (mma.sync, cvt, ex2), warp shuffles,
and the driver call for > 48 KB of dynamic shared memory.

Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) every helper has a pure-Python fallback with the
same per-lane contract, so the same kernel source is tested in CI:
  * warp-collective helpers (shuffles, mma) gather the 32 lanes of a warp at a threading.Barrier,
    compute the warp's result in NumPy and hand each lane its part;
  * conversions and ex2 use NumPy.
"""
import threading

import numpy as np
from numba import config

SIM = bool(config.ENABLE_CUDASIM)
FULL_MASK = 0xFFFFFFFF

if not SIM:
    from llvmlite import ir
    from numba import cuda, types
    from numba.cuda.extending import intrinsic

    _f32 = ir.FloatType()
    _i32 = ir.IntType(32)

    def _asm(builder, ret_type, text, constraints, args):
        fnty = ir.FunctionType(ret_type, [a.type for a in args])
        return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=False), args)

    def _make_mma(kind):
        text = (f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
                "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")

        @intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(types.float32, 4)(types.uint32, types.uint32, types.uint32, types.uint32,
                                                   types.uint32, types.uint32,
                                                   types.float32, types.float32, types.float32, types.float32)

            def codegen(context, builder, signature, args):
                ret = ir.LiteralStructType([_f32] * 4)
                res = _asm(builder, ret, text, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", list(args))
                vals = [builder.extract_value(res, i) for i in range(4)]
                return context.make_tuple(builder, signature.return_type, vals)

            return sig, codegen

        return mma

    mma_f16 = _make_mma("f16")
    mma_bf16 = _make_mma("bf16")

    def _make_pack(kind):
        # cvt.rn.{f16x2,bf16x2}.f32 d, a, b puts a in the upper half and b in the lower half
        text = f"cvt.rn.{kind}.f32 $0, $2, $1;"

        @intrinsic
        def pack(typingctx, lo, hi):
            sig = types.uint32(types.float32, types.float32)

            def codegen(context, builder, signature, args):
                return _asm(builder, _i32, text, "=r,f,f", list(args))

            return sig, codegen

        return pack

    pack_f16x2 = _make_pack("f16x2")
    pack_bf16x2 = _make_pack("bf16x2")

    def _make_unpack(text):
        @intrinsic
        def unpack(typingctx, w):
            sig = types.UniTuple(types.float32, 2)(types.uint32)

            def codegen(context, builder, signature, args):
                res = _asm(builder, ir.LiteralStructType([_f32] * 2), text, "=f,=f,r", list(args))
                vals = [builder.extract_value(res, i) for i in range(2)]
                return context.make_tuple(builder, signature.return_type, vals)

            return sig, codegen

        return unpack

    # (low half, high half) of a word of two float16 / bfloat16 values, as float32
    unpack_f16x2 = _make_unpack("{.reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h;}")
    unpack_bf16x2 = _make_unpack("{.reg .b32 t; shl.b32 t, $2, 16; mov.b32 $0, t; "
                                 "and.b32 t, $2, 0xffff0000; mov.b32 $1, t;}")

    @intrinsic
    def ex2(typingctx, x):
        """2**x with the SFU (ex2.approx.ftz.f32): 2 ulp, ex2(-inf) = 0."""
        sig = types.float32(types.float32)

        def codegen(context, builder, signature, args):
            return _asm(builder, _f32, "ex2.approx.ftz.f32 $0, $1;", "=f,f", list(args))

        return sig, codegen

    def _data_ptr(context, builder, arrty, arr, idx, idxty):
        """Pointer to element ``idx`` of a C-contiguous array, with no negative-index wraparound."""
        ary = context.make_array(arrty)(context, builder, arr)
        i = context.cast(builder, idx, idxty, types.intp)
        return builder.gep(ary.data, [i])

    def _shared_addr(context, builder, arrty, arr, idx, idxty):
        """32-bit shared-window address of element ``idx`` of a shared array: one cvta of the array's base
        (identical in every call, so the compiler computes it once) plus 32-bit offset arithmetic."""
        ary = context.make_array(arrty)(context, builder, arr)
        gen = builder.ptrtoint(ary.data, ir.IntType(64))
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        cvta = ir.InlineAsm(fnty, "cvta.to.shared.u64 $0, $1;", "=l,l", side_effect=False)
        base = builder.trunc(builder.call(cvta, [gen], attrs=("readnone", "nounwind")), _i32)
        i = builder.trunc(context.cast(builder, idx, idxty, types.int64), _i32)
        itemsize = context.get_abi_sizeof(context.get_data_type(arrty.dtype))
        return builder.add(base, builder.mul(i, ir.Constant(_i32, itemsize)))

    @intrinsic
    def ld(typingctx, arr, idx):
        """arr[idx] for a C-contiguous array and a non-negative idx: no wraparound code."""
        sig = arr.dtype(arr, idx)

        def codegen(context, builder, signature, args):
            return builder.load(_data_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1]))

        return sig, codegen

    def _make_ldmatrix(trans, ordered=False):
        """ldmatrix.x4 (``.trans`` if trans). ``ordered``: a side-effecting asm that LLVM keeps in program order
        with barriers and cp.async waits; the plain one is a pure function of its address to LLVM, which may
        hoist a loop-invariant one above the wait for its data (seen in the backward on the H200)."""
        text = ("ldmatrix.sync.aligned.m8n8.x4" + (".trans" if trans else "") +
                ".shared.b16 {$0,$1,$2,$3}, [$4];")

        @intrinsic
        def ldsm(typingctx, arr, idx):
            sig = types.UniTuple(types.uint32, 4)(arr, idx)

            def codegen(context, builder, signature, args):
                addr = _shared_addr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
                ret = ir.LiteralStructType([_i32] * 4)
                fnty = ir.FunctionType(ret, [_i32])
                res = builder.call(ir.InlineAsm(fnty, text, "=r,=r,=r,=r,r", side_effect=ordered), [addr])
                vals = [builder.extract_value(res, i) for i in range(4)]
                return context.make_tuple(builder, signature.return_type, vals)

            return sig, codegen

        return ldsm

    ldsm_x4 = _make_ldmatrix(False)
    ldsm_x4_t = _make_ldmatrix(True)
    ldsm_x4_o = _make_ldmatrix(False, ordered=True)
    ldsm_x4_t_o = _make_ldmatrix(True, ordered=True)

    @intrinsic
    def cp_async16(typingctx, dst, dst_idx, src, src_idx, nbytes):
        """Copy 16 bytes src[src_idx:] -> shared dst[dst_idx:] asynchronously; bytes past ``nbytes`` (0 or 16)
        are zero-filled and not read."""
        sig = types.void(dst, dst_idx, src, src_idx, nbytes)

        def codegen(context, builder, signature, args):
            dst_addr = _shared_addr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
            sptr = _data_ptr(context, builder, signature.args[2], args[2], args[3], signature.args[3])
            n = context.cast(builder, args[4], signature.args[4], types.int32)
            fnty = ir.FunctionType(ir.VoidType(), [_i32, ir.IntType(64), _i32])
            asm = ir.InlineAsm(fnty, "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r", side_effect=True)
            builder.call(asm, [dst_addr, builder.ptrtoint(sptr, ir.IntType(64)), n])
            return context.get_dummy_value()

        return sig, codegen

    def _make_void_asm(text):
        @intrinsic
        def fn(typingctx):
            sig = types.void()

            def codegen(context, builder, signature, args):
                fnty = ir.FunctionType(ir.VoidType(), [])
                builder.call(ir.InlineAsm(fnty, text, "~{memory}", side_effect=True), [])
                return context.get_dummy_value()

            return sig, codegen

        return fn

    cp_async_commit = _make_void_asm("cp.async.commit_group;")
    cp_async_wait0 = _make_void_asm("cp.async.wait_group 0;")
    cp_async_wait1 = _make_void_asm("cp.async.wait_group 1;")

    @intrinsic
    def red_add_v2_f32(typingctx, arr, idx, a, b):
        """arr[idx] += a, arr[idx + 1] += b as one vector reduction (red.global.add.v2.f32, sm_90) on a
        C-contiguous float32 global array; idx (flat element index) must be even."""
        sig = types.void(arr, idx, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            ptr = _data_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64), _f32, _f32])
            asm = ir.InlineAsm(fnty, "red.global.add.v2.f32 [$0], {$1, $2};", "l,f,f,~{memory}", side_effect=True)
            builder.call(asm, [builder.ptrtoint(ptr, ir.IntType(64)), args[2], args[3]])
            return context.get_dummy_value()

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def shfl_xor(val, lanemask):
        return cuda.shfl_xor_sync(FULL_MASK, val, lanemask)

    @cuda.jit(device=True, inline=True)
    def shfl_idx(val, src):
        """``val`` of lane ``src`` (every lane of the warp takes part)."""
        return cuda.shfl_sync(FULL_MASK, val, src)

    @cuda.jit(device=True, inline=True)
    def syncwarp():
        cuda.syncwarp(FULL_MASK)

    @cuda.jit(device=True, inline=True)
    def vote_any(pred):
        """Whether ``pred`` holds in some lane of the warp (all lanes take part)."""
        return cuda.any_sync(FULL_MASK, pred)

else:
    import ml_dtypes

    _warps = {}
    _warps_lock = threading.Lock()

    class _Group:
        def __init__(self, size):
            self.barrier = threading.Barrier(size, timeout=120)
            self.slots = [None] * size
            self.result = None

    def group_exchange(value, combine, size=32):
        """Collect one value per thread of this thread's group of ``size`` consecutive threadIdx.x (a warp, or a
        warpgroup of 128), let the group's first thread run ``combine(list_of_size)`` -> list_of_size, return ours."""
        tid = threading.current_thread().threadIdx
        lane, gid = tid.x % size, (size, tid.x // size, tid.y, tid.z)
        with _warps_lock:
            w = _warps.setdefault(gid, _Group(size))
        w.slots[lane] = value
        w.barrier.wait()
        if lane == 0:
            w.result = combine(list(w.slots))
        w.barrier.wait()
        res = w.result[lane]
        w.barrier.wait()  # nobody reuses the slots before every thread has read its result
        return res

    def _warp_exchange(value, combine):
        """``group_exchange`` over the 32 lanes of a warp."""
        return group_exchange(value, combine, 32)

    def shfl_xor(val, lanemask):
        return _warp_exchange(val, lambda vals: [vals[i ^ lanemask] for i in range(32)])

    def shfl_idx(val, src):
        return _warp_exchange((val, src), lambda reqs: [reqs[reqs[i][1]][0] for i in range(32)])

    def syncwarp():
        _warp_exchange(None, lambda vals: vals)

    def vote_any(pred):
        return _warp_exchange(bool(pred), lambda vals: [any(vals)] * 32)

    def ld(arr, idx):
        return arr[idx]

    def _ldsm_warp(trans, reqs):
        """reqs[lane] = (arr, idx): lane 8m+r gives the start (in uint32 words) of row r of matrix m."""
        out = [[0, 0, 0, 0] for _ in range(32)]
        for m in range(4):
            rows = [[int(reqs[8 * m + r][0][reqs[8 * m + r][1] + w]) for w in range(4)] for r in range(8)]
            half = [[(rows[r][c // 2] >> (16 * (c % 2))) & 0xFFFF for c in range(8)] for r in range(8)]
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                if trans:
                    out[lane][m] = np.uint32(half[2 * t][g] | (half[2 * t + 1][g] << 16))
                else:
                    out[lane][m] = np.uint32(rows[g][t])
        return [tuple(o) for o in out]

    def ldsm_x4(arr, idx):
        return _warp_exchange((arr, idx), lambda reqs: _ldsm_warp(False, reqs))

    def ldsm_x4_t(arr, idx):
        return _warp_exchange((arr, idx), lambda reqs: _ldsm_warp(True, reqs))

    ldsm_x4_o = ldsm_x4
    ldsm_x4_t_o = ldsm_x4_t

    def cp_async16(dst, dst_idx, src, src_idx, nbytes):
        for w in range(4):
            val = 0
            if nbytes:
                val = src[np.unravel_index(src_idx + w, src.shape)]
            dst[dst_idx + w] = val

    _red_lock = threading.Lock()

    def red_add_v2_f32(arr, idx, a, b):
        with _red_lock:
            for i, x in ((idx, a), (idx + 1, b)):
                j = np.unravel_index(i, arr.shape)
                arr[j] = arr[j] + np.float32(x)

    def cp_async_commit():
        pass

    def cp_async_wait0():
        pass

    def cp_async_wait1():
        pass

    def _halves(words, kind):
        w = np.asarray(words, dtype=np.uint32)
        lo, hi = (w & 0xFFFF).astype(np.uint16), (w >> 16).astype(np.uint16)
        if kind == "f16":
            return lo.view(np.float16).astype(np.float32), hi.view(np.float16).astype(np.float32)
        return lo.view(ml_dtypes.bfloat16).astype(np.float32), hi.view(ml_dtypes.bfloat16).astype(np.float32)

    def _mma_warp(kind, frags):
        """frags[lane] = (a0..a3, b0, b1, c0..c3) -> per-lane (d0..d3) of D = A @ B + C (m16n8k16)."""
        A = np.zeros((16, 16), np.float32)
        Bm = np.zeros((16, 8), np.float32)
        C = np.zeros((16, 8), np.float32)
        for lane, f in enumerate(frags):
            g, t = lane >> 2, lane & 3
            a_lo, a_hi = _halves(f[0:4], kind)
            for r, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                A[row, col], A[row, col + 1] = a_lo[r], a_hi[r]
            b_lo, b_hi = _halves(f[4:6], kind)
            for r, krow in enumerate((2 * t, 2 * t + 8)):
                Bm[krow, g], Bm[krow + 1, g] = b_lo[r], b_hi[r]
            C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = f[6:10]
        Dm = (A.astype(np.float64) @ Bm.astype(np.float64) + C).astype(np.float32)
        out = []
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            out.append((Dm[g, 2 * t], Dm[g, 2 * t + 1], Dm[g + 8, 2 * t], Dm[g + 8, 2 * t + 1]))
        return out

    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _warp_exchange((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), lambda fr: _mma_warp("f16", fr))

    def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _warp_exchange((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), lambda fr: _mma_warp("bf16", fr))

    def _pack(lo, hi, dtype):
        bits = np.array([lo, hi], dtype=np.float32).astype(dtype).view(np.uint16).astype(np.uint32)
        return np.uint32(bits[0] | (bits[1] << 16))

    def pack_f16x2(lo, hi):
        return _pack(lo, hi, np.float16)

    def pack_bf16x2(lo, hi):
        return _pack(lo, hi, ml_dtypes.bfloat16)

    def ex2(x):
        return np.float32(np.exp2(np.float32(x)))

    def unpack_f16x2(w):
        lo, hi = _halves([w], "f16")
        return np.float32(lo[0]), np.float32(hi[0])

    def unpack_bf16x2(w):
        lo, hi = _halves([w], "bf16")
        return np.float32(lo[0]), np.float32(hi[0])


def set_dynamic_shared(kernel, nbytes):
    """Allow ``kernel`` (a compiled numba.cuda kernel overload) to use ``nbytes`` of dynamic shared memory."""
    if SIM or nbytes <= 48 * 1024:
        return
    from numba.cuda.cudadrv.driver import binding, driver

    cufunc = kernel._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)


def launch(kernel, grid, block, smem, args, stream=0):
    """Launch ``kernel[grid, block, stream, smem](*args)``, raising the dynamic shared memory limit first
    when ``smem`` exceeds the default 48 KB."""
    if not SIM and smem > 48 * 1024:
        argtypes = tuple(kernel.typeof_pyval(a) for a in args)
        set_dynamic_shared(kernel.compile(argtypes), smem)
    kernel[grid, block, stream, smem](*args)
