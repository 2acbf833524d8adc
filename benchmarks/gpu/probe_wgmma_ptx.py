"""Feasibility check, CPU only: a numba kernel with Hopper ``wgmma`` inline PTX (fence, one m64n8k16 bf16
mma_async from two shared-memory descriptors, commit, wait) compiles to PTX with ``cuda.compile_ptx(cc=(9, 0))``;
with its ``.target sm_90`` rewritten to ``sm_90a`` the local ``ptxas`` (CUDA 13.0) assembles it to ``HGMMA`` (plain
sm_90 rejects it). Not yet run on a GPU: loading such PTX needs our own module load (driver JIT of the patched PTX,
or ``ptxas -arch=sm_90a`` + ``cuModuleLoadData``) and a launch through ``_launch``'s packed arguments, and the
descriptors here are placeholders (no data is laid out). Needs ptxas on PATH (nvdisasm optional, NVDISASM env).

``python benchmarks/gpu/probe_wgmma_ptx.py``"""
import os
import re
import shutil
import subprocess
import tempfile

from llvmlite import ir
from numba import cuda, float32, types
from numba.core.extending import intrinsic


def _void(text):
    @intrinsic
    def fn(typingctx):
        def codegen(context, builder, sig, args):
            builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", side_effect=True), [])
            return context.get_dummy_value()
        return types.void(), codegen

    return fn


fence = _void("wgmma.fence.sync.aligned;")
commit = _void("wgmma.commit_group.sync.aligned;")
wait0 = _void("wgmma.wait_group.sync.aligned 0;")


@intrinsic
def wgmma_m64n8k16(typingctx, desc_a, desc_b, c0, c1, c2, c3):
    """D(64x8 f32, 4 regs/thread) += A(64x16 bf16, smem desc) * B(16x8 bf16, smem desc)."""
    f4 = (types.float32,) * 4
    sig = types.UniTuple(types.float32, 4)(types.uint64, types.uint64, *f4)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        st = ir.LiteralStructType([f32] * 4)
        fnty = ir.FunctionType(st, [ir.IntType(64), ir.IntType(64), f32, f32, f32, f32])
        asm = "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {$0, $1, $2, $3}, $4, $5, 1, 1, 1, 0, 0;"
        r = builder.call(ir.InlineAsm(fnty, asm, "=f,=f,=f,=f,l,l,0,1,2,3", side_effect=True), list(args))
        return context.make_tuple(builder, signature.return_type, [builder.extract_value(r, i) for i in range(4)])

    return sig, codegen


def kern(out, da, db):
    tid = cuda.threadIdx.x
    c0 = c1 = c2 = c3 = float32(0)
    fence()
    c0, c1, c2, c3 = wgmma_m64n8k16(da[0], db[0], c0, c1, c2, c3)
    commit()
    wait0()
    out[tid * 4] = c0
    out[tid * 4 + 1] = c1
    out[tid * 4 + 2] = c2
    out[tid * 4 + 3] = c3


def main():
    sig = (types.Array(types.float32, 1, "C"), types.Array(types.uint64, 1, "C"), types.Array(types.uint64, 1, "C"))
    ptx, _ = cuda.compile_ptx(kern, sig, cc=(9, 0))
    print("numba PTX:", re.findall(r"\.target \S+", ptx), re.findall(r"\.version \S+", ptx))
    ptx = re.sub(r"\.version \d+\.\d+", ".version 8.5", ptx)  # the local ptxas may be older than numba's NVVM
    with tempfile.TemporaryDirectory() as d:
        for arch in ("sm_90", "sm_90a"):
            src, cub = os.path.join(d, arch + ".ptx"), os.path.join(d, arch + ".cubin")
            open(src, "w").write(re.sub(r"\.target sm_90\b", ".target " + arch, ptx))
            r = subprocess.run([os.environ.get("PTXAS", "ptxas"), f"-arch={arch}", "-v", src, "-o", cub],
                               capture_output=True, text=True)
            print(f"ptxas -arch={arch}: rc {r.returncode}", (r.stderr.strip().splitlines() or [""])[-1][:160])
            dis = os.environ.get("NVDISASM", shutil.which("nvdisasm"))
            if r.returncode == 0 and dis:
                txt = subprocess.run([dis, cub], capture_output=True, text=True).stdout
                print("  SASS:", [ln.split("*/")[-1].strip() for ln in txt.splitlines()
                                  if "GMMA" in ln or "WARPGROUP" in ln])


if __name__ == "__main__":
    main()
