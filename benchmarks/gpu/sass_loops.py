"""Static SASS of a CUDA kernel's loops, without a GPU: numba's PTX of one kernel, ``ptxas -arch=sm_90``
(registers, spills) and ``nvdisasm`` (the pip wheel ``nvidia-cuda-nvdisasm`` carries it), then every backward
branch's loop with its instruction count by opcode. An issue-bound kernel (the decode kernel, BENCHMARKS.md) is
sped up by cutting these counts; static counts include both sides of every branch, so read the listing for the
path a tile takes.

``python benchmarks/gpu/sass_loops.py MODULE NAME [FIRST LAST]``: kernel NAME of ``MODULE.ptx_signatures()``
(e.g. ``numba_kernels.cuda.flash_attention tc_bf16_D128``);
``python benchmarks/gpu/sass_loops.py --decode NAME NW STAGES BC PF QREG TPF REG LEAN [FIRST LAST]``: a decode
tensor-core configuration (NAME a ``decode_attention.ptx_signatures`` name, e.g.
``decode_tc_bf16_split_nomerge_D128``). FIRST LAST print that instruction range. Env: PTXAS, NVDISASM (default:
found on PATH)."""
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def kernel_of(module, name):
    """(python function, signature) of kernel ``name`` in ``module.ptx_signatures`` (head dim from the name)."""
    import importlib

    mod = importlib.import_module(module)
    D = int(name.rsplit("_D", 1)[1])
    return {n: (f, s) for n, f, s in mod.ptx_signatures((D,))}[name]


def decode_kernel_of(name, cfg):
    """(python function, signature) of the decode tensor-core kernel ``name`` in configuration ``cfg``."""
    from numba_kernels.cuda._decode_kernels import make_decode_tc

    nw, stages, bc, pf, qreg, tpf, reg, lean = cfg
    D = int(name.rsplit("_D", 1)[1])
    kern = make_decode_tc(nw, D, "bf16" in name, "cap" in name, "alibi" in name, "split" in name, stages,
                          "nomerge" not in name, bc, bool(pf), bool(qreg), bool(tpf), bool(reg), lean)[0]
    return kern.py_func, kernel_of("numba_kernels.cuda.decode_attention", name)[1]


def sass_of(fn, sig):
    from numba import cuda

    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    ptx = re.sub(r"\.version \d+\.\d+", ".version 8.5", ptx)  # the local ptxas may be older than numba's NVVM
    with tempfile.TemporaryDirectory() as d:
        src, cub = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        open(src, "w").write(ptx)
        r = subprocess.run([os.environ.get("PTXAS", shutil.which("ptxas") or "ptxas"), "-arch=sm_90", "-v", src,
                            "-o", cub], capture_output=True, text=True, check=True)
        info = [ln.strip() for ln in r.stderr.splitlines() if "registers" in ln or "spill" in ln]
        txt = subprocess.run([os.environ.get("NVDISASM", shutil.which("nvdisasm") or "nvdisasm"), "-c", cub],
                             capture_output=True, text=True, check=True).stdout
    return info, txt


def loops(txt):
    """(instructions, [(first, last) of each backward branch's range])."""
    ins, labels = [], {}
    for ln in txt.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", ln)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(.*?);", ln)
        if m:
            ins.append(m.group(1).strip())
    out = []
    for i, s in enumerate(ins):
        m = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", s)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            out.append((labels[m.group(1)], i))
    return ins, out


def main():
    if sys.argv[1] == "--decode":
        fn, sig = decode_kernel_of(sys.argv[2], tuple(int(x) for x in sys.argv[3:11]))
        rng = sys.argv[11:13]
    else:
        fn, sig = kernel_of(sys.argv[1], sys.argv[2])
        rng = sys.argv[3:5]
    info, txt = sass_of(fn, sig)
    print("\n".join(info))
    ins, lps = loops(txt)
    print(f"{len(ins)} SASS instructions")
    for a, b in lps:
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in ins[a:b + 1])
        print(f"loop {a}-{b}: {b - a + 1} instructions", dict(ops.most_common(16)))
    if len(rng) == 2:
        for i in range(int(rng[0]), int(rng[1]) + 1):
            print(i, ins[i])


if __name__ == "__main__":
    main()
