"""First run of Hopper ``wgmma`` from numba (GPU; the PTX part also runs without one): one warpgroup computes
D (64 x 8, fp32) = A (64 x 16, bf16) B^T (B 8 x 16, bf16) with ``wgmma.mma_async.m64n8k16`` from shared-memory
descriptors, and the result is compared with numpy. ``--ptx-only`` (no GPU): the PTX assembles for sm_90a (with the
local ptxas; plain sm_90 rejects it) and shows HGMMA.

numba compiles for sm_90 and the wgmma instructions need sm_90a, so the kernel does not go through
``cuda.jit``'s own loading: ``cuda.compile_ptx`` gives the PTX, ``.target sm_90`` becomes ``sm_90a``, and the
driver loads it (``cuModuleLoadData``, JIT for the current device), the launch packs numba's flattened argument ABI
(``_launch.param_format``) for ``cuLaunchKernel``. Operands sit in the no-swizzle canonical layout: 8 x 8 core
matrices of 128 contiguous bytes (row r at 16 r), for A the two core matrices of one 8-row group next to each
other (K direction) and the groups after each other (M direction). Which descriptor field (leading / stride byte
offset) means which direction is the thing this probe settles: it runs every assignment and prints which one
matches.

``python benchmarks/gpu/probe_wgmma_run.py [--ptx-only]``"""
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from llvmlite import ir
from numba import cuda, float32, types, uint16, uint64
from numba.core.extending import intrinsic

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def _void(text):
    @intrinsic
    def fn(typingctx):
        def codegen(context, builder, sig, args):
            builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", side_effect=True), [])
            return context.get_dummy_value()

        return types.void(), codegen

    return fn


wg_fence = _void("wgmma.fence.sync.aligned;")
wg_commit = _void("wgmma.commit_group.sync.aligned;")
wg_wait0 = _void("wgmma.wait_group.sync.aligned 0;")
proxy_fence = _void("fence.proxy.async.shared::cta;")  # st.shared results visible to the async (wgmma) proxy


@intrinsic
def smem_base(typingctx, arr):
    """32-bit shared-window address of a shared array's first element."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        gen = builder.ptrtoint(ary.data, ir.IntType(64))
        cvta = ir.InlineAsm(ir.FunctionType(ir.IntType(64), [ir.IntType(64)]), "cvta.to.shared.u64 $0, $1;", "=l,l",
                            side_effect=False)
        return builder.trunc(builder.call(cvta, [gen]), ir.IntType(32))

    return types.uint32(arr), codegen


@intrinsic
def wgmma_m64n8k16_bf16(typingctx, desc_a, desc_b, c0, c1, c2, c3):
    """(d0..d3) = A B + (c0..c3): D 64 x 8 f32 over the warpgroup (this thread's 4 values), A and B by descriptor."""
    f4 = (types.float32,) * 4
    sig = types.UniTuple(types.float32, 4)(types.uint64, types.uint64, *f4)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [ir.IntType(64), ir.IntType(64)] + [f32] * 4)
        asm = "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {$0, $1, $2, $3}, $4, $5, 1, 1, 1, 0, 0;"
        r = builder.call(ir.InlineAsm(fnty, asm, "=f,=f,=f,=f,l,l,0,1,2,3", side_effect=True), list(args))
        return context.make_tuple(builder, signature.return_type, [builder.extract_value(r, i) for i in range(4)])

    return sig, codegen


def kern(out, a, b, lbo_a, sbo_a, lbo_b, sbo_b):
    """out (64 * 8,) f32 row-major; a (64 * 16,) bf16 bits row-major (m, k); b (8 * 16,) bf16 bits (n, k)."""
    sm = cuda.shared.array(1216, uint16)  # A: 1024 elements (2048 bytes), then B: 128; 64 spare to align to 128 B
    tid = cuda.threadIdx.x
    base = smem_base(sm)
    pad = (128 - (base & 127)) & 127     # numba aligns a uint16 shared array to 2 bytes only
    base += pad
    o = pad // 2
    for x in range(tid, 1024, 128):
        m = x // 16
        k = x - m * 16
        sm[o + ((m // 8) * 2 + k // 8) * 64 + (m % 8) * 8 + k % 8] = a[x]
    n = tid // 16
    k = tid - n * 16
    sm[o + 1024 + (k // 8) * 64 + n * 8 + k % 8] = b[tid]
    proxy_fence()
    cuda.syncthreads()
    da = (uint64((base & 0x3FFFF) >> 4) | (uint64(lbo_a >> 4) << uint64(16)) | (uint64(sbo_a >> 4) << uint64(32)))
    db = (uint64(((base + 2048) & 0x3FFFF) >> 4) | (uint64(lbo_b >> 4) << uint64(16)) |
          (uint64(sbo_b >> 4) << uint64(32)))
    z = float32(0.0)
    wg_fence()
    d0, d1, d2, d3 = wgmma_m64n8k16_bf16(da, db, z, z, z, z)
    wg_commit()
    wg_wait0()
    warp = tid // 32
    lane = tid % 32
    row = warp * 16 + lane // 4
    col = 2 * (lane % 4)
    out[row * 8 + col] = d0
    out[row * 8 + col + 1] = d1
    out[(row + 8) * 8 + col] = d2
    out[(row + 8) * 8 + col + 1] = d3


SIG = (types.Array(types.float32, 1, "C"), types.Array(types.uint16, 1, "C"), types.Array(types.uint16, 1, "C"),
       types.int32, types.int32, types.int32, types.int32)


def sm90a_ptx():
    """(PTX retargeted to sm_90a, entry name, number of entry parameters)."""
    ptx, _ = cuda.compile_ptx(kern, SIG, cc=(9, 0))
    ptx = re.sub(r"\.target sm_90\b", ".target sm_90a", ptx)
    m = re.search(r"\.entry\s+(\S+)\s*\(([^)]*)\)", ptx)
    return ptx, m.group(1), m.group(2).count(".param")


def check_ptx():
    """Assemble the kernel with the local ptxas for sm_90 (rejected: wgmma needs the arch-specific target) and for
    sm_90a; list the warpgroup instructions of the sm_90a code (nvdisasm, NVDISASM env or PATH)."""
    ptx, name, nparam = sm90a_ptx()
    print(f"entry {name[:60]}... with {nparam} parameters")
    ptxas = os.environ.get("PTXAS", shutil.which("ptxas"))
    if not ptxas:
        print("no ptxas: assembly not checked")
        return
    ptx = re.sub(r"\.version \d+\.\d+", ".version 8.5", ptx)  # the local ptxas may be older than numba's NVVM
    with tempfile.TemporaryDirectory() as d:
        for arch in ("sm_90", "sm_90a"):
            src, cub = os.path.join(d, arch + ".ptx"), os.path.join(d, arch + ".cubin")
            open(src, "w").write(re.sub(r"\.target sm_90a\b", ".target " + arch, ptx))
            r = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", cub], capture_output=True, text=True)
            print(f"ptxas -arch={arch}: rc", r.returncode, " | ".join(ln.strip() for ln in r.stderr.splitlines()[-2:]))
            dis = os.environ.get("NVDISASM", shutil.which("nvdisasm"))
            if r.returncode == 0 and dis:
                txt = subprocess.run([dis, cub], capture_output=True, text=True).stdout
                print("  SASS:", [ln.split("*/")[-1].strip() for ln in txt.splitlines()
                                  if "GMMA" in ln or "WARPGROUP" in ln])


def run():
    from numba_kernels.cuda import _launch as fl

    ptx, name, nparam = sm90a_ptx()
    cuda.current_context()  # numba's context is current on this thread
    lib = ctypes.CDLL("libcuda.so.1")
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    buf = ctypes.create_string_buffer(ptx.encode())
    rc = lib.cuModuleLoadData(ctypes.byref(mod), buf)
    print("cuModuleLoadData rc", rc)
    if rc:
        return
    rc = lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode())
    print("cuModuleGetFunction rc", rc)
    fmt, _ = fl.param_format(SIG)
    assert fmt.size // 8 == nparam, (fmt.size // 8, nparam)
    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((64, 16)).astype(np.float32)
    b32 = rng.standard_normal((8, 16)).astype(np.float32)
    bits = (lambda x: (x.view(np.uint32) >> 16).astype(np.uint16))  # bf16 by truncation
    a16, b16 = bits(a32), bits(b32)
    ref = ((a16.astype(np.uint32) << 16).view(np.float32).astype(np.float64) @
           (b16.astype(np.uint32) << 16).view(np.float32).astype(np.float64).T)
    da, db = cuda.to_device(a16.reshape(-1)), cuda.to_device(b16.reshape(-1))
    for lbo_a, sbo_a in ((128, 256), (256, 128)):
        for lbo_b, sbo_b in ((128, 256), (256, 128)):
            out = cuda.to_device(np.full(512, np.nan, np.float32))
            vals = [v for x in (out, da, db) for v in fl._info(x)[1]] + [lbo_a, sbo_a, lbo_b, sbo_b]
            pbuf = ctypes.create_string_buffer(fmt.size)
            fmt.pack_into(pbuf, 0, *vals)
            ptrs = (ctypes.c_void_p * nparam)(*[ctypes.addressof(pbuf) + 8 * i for i in range(nparam)])
            rc = lib.cuLaunchKernel(fn, 1, 1, 1, 128, 1, 1, 0, None, ptrs, None)
            cuda.synchronize()
            got = out.copy_to_host().reshape(64, 8).astype(np.float64)
            err = float(np.nanmax(np.abs(got - ref)) / np.abs(ref).max()) if np.isfinite(got).any() else float("nan")
            print(f"A (LBO {lbo_a}, SBO {sbo_a}) B (LBO {lbo_b}, SBO {sbo_b}): launch rc {rc}, max rel err {err:.2e}"
                  f"{'  <- matches' if err < 1e-5 else ''}", flush=True)


if __name__ == "__main__":
    check_ptx()
    if "--ptx-only" not in sys.argv:
        run()
