"""Hopper warpgroup MMA (``wgmma.mma_async``, sm_90a) from numba, and the loader for kernels that use it.

numba compiles for ``sm_90`` and the wgmma instructions exist only for the arch-specific ``sm_90a``, so such a
kernel does not go through ``cuda.jit``'s own loading: ``cuda.compile_ptx`` gives the PTX, ``.target sm_90``
becomes ``sm_90a``, the driver loads it (``cuModuleLoadData``, JIT for the current device) and launches take the
packed-parameter path of ``_launch`` (numba's flattened argument ABI). ``Sm90aKernel`` wraps this; it works on a
device of compute capability 9.0 only (``available()``).

Operands live in shared memory in the no-swizzle canonical layout: 8 x 8 core matrices of 128 contiguous bytes
(row r of a core matrix at byte 16 r). A tile of R rows and C 16-bit columns (K-major: the reduction index
along a row) is stored with core matrix (r // 8, c // 8) at byte ((r // 8) * (C // 8) + c // 8) * 128, so a
cp.async chunk c (16 bytes) of the tile is simply word 4 c when chunks are numbered row-in-group fastest, then
column chunk, then row group (``make_tile_loader``). The descriptor's leading byte offset (LBO) is the step
between core matrices along K, the stride byte offset (SBO) the step along M / N (measured on the H200,
benchmarks/gpu/probe_wgmma_run.py: K-major A and B, LBO 128, SBO 256 for a 16-column tile); a transposed
(MN-major) B operand takes the same tile, its core-matrix rows then run along K.

Accumulator fragments: thread (warp w of the warpgroup, lane = 4 g + t) holds, for n-block j (8 columns),
acc[4 j + 0..3] = D[16 w + g, 8 j + 2 t + 0..1], D[16 w + g + 8, 8 j + 2 t + 0..1]: per warp the mma.sync m16n8
layout, so ``pack_a`` of the accumulators is the register A operand of the next product.

Under the simulator the wgmma helpers gather the 128 threads of the warpgroup (``group_exchange``), read the
operand tiles from the shared array through the same layout (start word, LBO, SBO) and compute in NumPy.
"""
import ctypes
import re

import numpy as np

from numba_kernels.cuda import _intrinsics as intr

SIM = intr.SIM


def _sim_tile(smem, start, rows, cols, lbo, sbo, mn_major, kind):
    """(rows x cols) float64 operand (rows along M / N, cols along K) of a shared uint32 array ``smem`` from word
    ``start`` in the canonical layout: K-major element (r, c) at byte (r // 8) SBO + 16 (r % 8) + (c // 8) LBO +
    2 (c % 8); MN-major at byte (r // 8) SBO + 2 (r % 8) + (c // 8) LBO + 16 (c % 8)."""
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    if mn_major:
        byte = 4 * start + (r // 8) * sbo + 2 * (r % 8) + (c // 8) * lbo + 16 * (c % 8)
    else:
        byte = 4 * start + (r // 8) * sbo + 16 * (r % 8) + (c // 8) * lbo + 2 * (c % 8)
    words = np.asarray(smem, dtype=np.uint32)[byte // 4]
    halves = np.where((byte // 2) % 2 == 1, words >> 16, words & 0xFFFF).astype(np.uint16)
    if kind == "f16":
        return halves.view(np.float16).astype(np.float64)
    import ml_dtypes
    return halves.view(ml_dtypes.bfloat16).astype(np.float64)


def _frag_rc(tid):
    """(rows, cols) of the accumulator elements 0..3 of n-block 0 held by warpgroup thread ``tid``."""
    w, lane = tid // 32, tid % 32
    g, t = lane >> 2, lane & 3
    r0 = 16 * w + g
    return (r0, r0, r0 + 8, r0 + 8), (2 * t, 2 * t + 1, 2 * t, 2 * t + 1)


def make_wgmma(N, kind, A_REG, TRANS_B, A_LBO, A_SBO, B_LBO, B_SBO, TRANS_A=False, SCALE_D=True):
    """One ``wgmma.mma_async m64nNk16`` (fp32 accumulate) as a device function over the warpgroup:

    * ``A_REG=False``: ``mma(acc, x, smem, a_word, b_word)``, A (64 x 16) and B (N x 16) from the shared uint32
      array ``smem`` starting at word offsets a_word / b_word (16-byte aligned), both K-major;
    * ``A_REG=True``: ``mma(acc, x, smem, a0, a1, a2, a3, b_word)``, A from registers (this thread's 4 words of
      packed halves, the mma.sync A fragment of its warp's 16 rows).

    ``acc[x : x + N / 2]`` += A B^T (float32 local array; x constant after unrolling so it stays in registers).
    TRANS_B: B is stored MN-major (the tile of a K x N operand with N along its rows' 16-byte runs); TRANS_A the same
    for a shared-memory A (M along the 16-byte runs). A_LBO/A_SBO,
    B_LBO/B_SBO: descriptor byte offsets (module docstring). SCALE_D=False: acc = A B^T, the old values ignored (the
    first product of a batch without zeroing the accumulators: no register writes between the batch's wgmma, which
    ptxas would otherwise order with a wait on the previous batch). The caller brackets a batch of these with
    ``wg_fence()`` before and ``wg_commit(); wg_wait0()`` after."""
    NA = N // 2
    assert N % 8 == 0 and 8 <= N <= 256 and not (A_REG and TRANS_A)
    if SIM:
        def sim_mma(frags):
            f0 = frags[0]
            smem = f0[0]
            if A_REG:
                A = np.zeros((64, 16))
                for tid, f in enumerate(frags):
                    rows, cols = _frag_rc(tid)
                    for i, (rr, cc) in enumerate(((rows[0], cols[0]), (rows[2], cols[0]), (rows[0], cols[0] + 8),
                                                  (rows[2], cols[0] + 8))):
                        lo, hi = intr._halves([f[2 + i]], kind)
                        A[rr, cc], A[rr, cc + 1] = lo[0], hi[0]
                    b_word = f0[6]
            else:
                A = _sim_tile(smem, f0[2], 64, 16, A_LBO, A_SBO, TRANS_A, kind)
                b_word = f0[3]
            Bm = _sim_tile(smem, b_word, N, 16, B_LBO, B_SBO, TRANS_B, kind)
            Dm = A @ Bm.T
            out = []
            for tid, f in enumerate(frags):
                rows, cols = _frag_rc(tid)
                acc = np.asarray(f[1], dtype=np.float64).copy() if SCALE_D else np.zeros(NA)
                for j in range(N // 8):
                    for i in range(4):
                        acc[4 * j + i] += Dm[rows[i], 8 * j + cols[i]]
                out.append(acc.astype(np.float32))
            return out

        if A_REG:
            def mma(acc, x, smem, a0, a1, a2, a3, b_word):
                res = intr.group_exchange((smem, acc[x:x + NA].copy(), a0, a1, a2, a3, b_word), sim_mma, 128)
                acc[x:x + NA] = res
        else:
            def mma(acc, x, smem, a_word, b_word):
                res = intr.group_exchange((smem, acc[x:x + NA].copy(), a_word, b_word), sim_mma, 128)
                acc[x:x + NA] = res
        return mma

    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
    ty = "bf16" if kind == "bf16" else "f16"
    dregs = ", ".join(f"${i}" for i in range(NA))
    if A_REG:
        text = (f"wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{ty}.{ty} {{{dregs}}}, "
                f"{{${NA}, ${NA + 1}, ${NA + 2}, ${NA + 3}}}, ${NA + 4}, {int(SCALE_D)}, 1, 1, {int(TRANS_B)};")
        cons = ",".join(["=f"] * NA + ["r"] * 4 + ["l"] + [str(i) for i in range(NA)]) + ",~{memory}"
    else:
        text = (f"wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{ty}.{ty} {{{dregs}}}, ${NA}, ${NA + 1}, "
                f"{int(SCALE_D)}, 1, 1, {int(TRANS_A)}, {int(TRANS_B)};")
        cons = ",".join(["=f"] * NA + ["l", "l"] + [str(i) for i in range(NA)]) + ",~{memory}"

    def desc(context, builder, arrty, arr, idx, idxty, lbo, sbo):
        addr = intr._shared_addr(context, builder, arrty, arr, idx, idxty)
        start = builder.zext(builder.and_(builder.lshr(addr, ir.Constant(i32, 4)), ir.Constant(i32, 0x3FFF)), i64)
        return builder.or_(start, ir.Constant(i64, ((lbo >> 4) << 16) | ((sbo >> 4) << 32)))

    def body(context, builder, sig, args, operands):
        accty, xty = sig.args[0], sig.args[1]
        ary = context.make_array(accty)(context, builder, args[0])
        x = context.cast(builder, args[1], xty, types.intp)
        ptrs = [builder.gep(ary.data, [builder.add(x, ir.Constant(x.type, i))]) for i in range(NA)]
        accs = [builder.load(p) for p in ptrs]
        fnty = ir.FunctionType(ir.LiteralStructType([f32] * NA), [o.type for o in operands] + [f32] * NA)
        res = builder.call(ir.InlineAsm(fnty, text, cons, side_effect=True), operands + accs)
        for i, p in enumerate(ptrs):
            builder.store(builder.extract_value(res, i), p)
        return context.get_dummy_value()

    if A_REG:
        @intrinsic
        def mma(typingctx, acc, x, smem, a0, a1, a2, a3, b_word):
            sig = types.void(acc, x, smem, types.uint32, types.uint32, types.uint32, types.uint32, b_word)

            def codegen(context, builder, signature, args):
                a = [context.cast(builder, v, t, types.uint32) for v, t in zip(args[3:7], signature.args[3:7])]
                db = desc(context, builder, signature.args[2], args[2], args[7], signature.args[7], B_LBO, B_SBO)
                return body(context, builder, signature, args, a + [db])

            return sig, codegen
    else:
        @intrinsic
        def mma(typingctx, acc, x, smem, a_word, b_word):
            sig = types.void(acc, x, smem, a_word, b_word)

            def codegen(context, builder, signature, args):
                da = desc(context, builder, signature.args[2], args[2], args[3], signature.args[3], A_LBO, A_SBO)
                db = desc(context, builder, signature.args[2], args[2], args[4], signature.args[4], B_LBO, B_SBO)
                return body(context, builder, signature, args, [da, db])

            return sig, codegen
    return mma


if SIM:
    def wg_fence():
        pass

    def wg_commit():
        pass

    def wg_wait0():
        pass

    def wg_wait1():
        pass

    def proxy_fence():
        pass

    def align_pad(smem, nbytes):
        """Words to skip from the start of ``smem`` to an ``nbytes``-aligned shared address (0 in the simulator)."""
        return 0
else:
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic

    _void = intr._make_void_asm

    #: before a batch of wgmma whose accumulator or A registers other instructions wrote
    wg_fence = _void("wgmma.fence.sync.aligned;")
    wg_commit = _void("wgmma.commit_group.sync.aligned;")
    wg_wait0 = _void("wgmma.wait_group.sync.aligned 0;")
    #: all but the most recent commit group complete
    wg_wait1 = _void("wgmma.wait_group.sync.aligned 1;")
    #: generic-proxy shared-memory writes (st.shared, cp.async) made visible to the async proxy (wgmma operands)
    proxy_fence = _void("fence.proxy.async.shared::cta;")

    @_intrinsic
    def align_pad(typingctx, smem, nbytes):
        """Words to skip from the start of the shared uint32 array ``smem`` to an ``nbytes``-aligned address
        (nbytes a power of two; numba aligns a dynamic shared array to its element size only)."""
        sig = _types.int32(smem, nbytes)

        def codegen(context, builder, signature, args):
            i32 = _ir.IntType(32)
            addr = intr._shared_addr(context, builder, signature.args[0], args[0], _ir.Constant(i32, 0), _types.int32)
            n = context.cast(builder, args[1], signature.args[1], _types.int32)
            m = builder.sub(n, _ir.Constant(i32, 1))
            pad = builder.and_(builder.sub(n, builder.and_(addr, m)), m)
            return builder.lshr(pad, _ir.Constant(i32, 2))

        return sig, codegen


_CUDA = None


def _cuda_lib():
    """The driver library (module loading), or False; cuLaunchKernel goes through ``_launch``."""
    global _CUDA
    if _CUDA is None:
        from numba_kernels.cuda import _launch as fl

        try:
            _CUDA = ctypes.CDLL("libcuda.so.1") if fl._driver() else False
        except OSError:
            _CUDA = False
    return _CUDA


_AVAILABLE = {}


class Sm90aUnavailable(RuntimeError):
    """The driver could not load or configure an sm_90a kernel (for example a driver older than the PTX)."""


def available():
    """True on a real device of compute capability 9.0 with a driver library we can call (sm_90a code runs on 9.0
    only); False in the simulator."""
    if SIM:
        return False
    from numba_kernels.cuda import _launch as fl

    key = fl.context_key()
    ok = _AVAILABLE.get(key)
    if ok is None:
        from numba import cuda

        ok = _AVAILABLE[key] = bool(_cuda_lib()) and tuple(cuda.get_current_device().compute_capability) == (9, 0)
    return ok


def sm90a_ptx(py_func, argtypes):
    """(PTX for sm_90a, entry name) of a kernel function for a tuple of numba argument types."""
    from numba import cuda

    ptx, _ = cuda.compile_ptx(py_func, argtypes, cc=(9, 0))
    ptx = re.sub(r"\.target sm_90\b", ".target sm_90a", ptx)
    return ptx, re.search(r"\.entry\s+(\S+)\s*\(", ptx).group(1)


class Sm90aKernel:
    """A kernel function compiled for sm_90a and launched through the driver: ``launch(grid, block, smem, args)``
    like ``_launch.launch`` (numba device arrays and scalars; default stream). In the simulator the function
    runs through ``cuda.jit`` (the wgmma helpers have simulator versions)."""

    def __init__(self, py_func):
        from numba_kernels.cuda._attn_common import jit_kernel

        self.py_func = py_func
        self.dispatcher = jit_kernel(py_func)  # argument typing (and the simulator's launch)
        self._fns = {}

    def _function(self, key, args, smem):
        from numba_kernels.cuda import _launch as fl

        argtypes = tuple(self.dispatcher.typeof_pyval(a) for a in args)
        ptx, name = sm90a_ptx(self.py_func, argtypes)
        lib = _cuda_lib()
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        rc = lib.cuModuleLoadData(ctypes.byref(mod), ctypes.create_string_buffer(ptx.encode()))
        if rc == 0:
            rc = lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode())
        if rc == 0 and smem > 48 * 1024:
            rc = lib.cuFuncSetAttribute(fn, 8, ctypes.c_int(smem))  # MAX_DYNAMIC_SHARED_SIZE_BYTES
        if rc:
            raise Sm90aUnavailable(f"loading the sm_90a kernel failed with CUresult {rc}")
        fast = self._fns[key] = fl._Fast(fn.value, argtypes)
        fast.module = mod  # (the module is never unloaded; its handle stays with the function)
        return fast

    def _key(self, smem, args):
        """(cache key: argument types, smem, context; flattened parameter values) of a launch."""
        from numba_kernels.cuda import _launch as fl

        key, vals = fl._key_values(self, smem, args)
        return key + (fl.context_key(),), vals

    def ready(self, smem, args):
        """Compile and load the kernel for these arguments' types now; False (and ``available()`` False for this
        context from then on) when the driver cannot load it, so the caller takes another kernel. True in the
        simulator."""
        if SIM:
            return True
        key = self._key(smem, args)[0]
        if key in self._fns:
            return True
        try:
            self._function(key, args, smem)
        except Sm90aUnavailable:
            _AVAILABLE[key[-1]] = False
            return False
        return True

    def launch(self, grid, block, smem, args):
        from numba_kernels.cuda import _launch as fl

        if SIM:
            fl.launch(self.dispatcher, grid, block, smem, args)
            return
        key, vals = self._key(smem, args)
        fast = self._fns.get(key) or self._function(key, args, smem)
        fast(fl._dims(grid), fl._dims(block), smem, vals)
