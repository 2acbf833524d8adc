"""Static SASS of the tensor-core decode kernel's loops, without a GPU: numba's PTX of one configuration,
``ptxas -arch=sm_90`` (registers, spills) and ``nvdisasm`` (the pip wheel ``nvidia-cuda-nvdisasm`` carries it),
then every backward branch's loop with its instruction count by opcode. The decode kernel is issue-bound
(BENCHMARKS.md), so instructions per tile are the figure to cut.

``python benchmarks/gpu/sass_decode_loop.py NAME NW STAGES BC PF QREG TPF REG LEAN [FIRST LAST]``
NAME is a ``decode_attention.ptx_signatures`` name (e.g. ``decode_tc_bf16_split_nomerge_D128``); FIRST LAST
print that instruction range. Env: PTXAS, NVDISASM (default: found on PATH)."""
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def sass_of(name, cfg):
    from numba import cuda

    from numba_kernels.cuda import decode_attention as cda
    from numba_kernels.cuda._decode_kernels import make_decode_tc

    nw, stages, bc, pf, qreg, tpf, reg, lean = cfg
    sigs = {n: s for n, f, s in cda.ptx_signatures((int(name.rsplit("_D", 1)[1]),))}
    kern = make_decode_tc(nw, int(name.rsplit("_D", 1)[1]), "bf16" in name, "cap" in name, "alibi" in name,
                          "split" in name, stages, "nomerge" not in name, bc, bool(pf), bool(qreg), bool(tpf),
                          bool(reg), lean)[0]
    ptx, _ = cuda.compile_ptx(kern.py_func, sigs[name], cc=(9, 0))
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
    name, cfg = sys.argv[1], tuple(int(x) for x in sys.argv[2:10])
    info, txt = sass_of(name, cfg)
    print("\n".join(info))
    ins, lps = loops(txt)
    print(f"{len(ins)} SASS instructions")
    for a, b in lps:
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in ins[a:b + 1])
        print(f"loop {a}-{b}: {b - a + 1} instructions", dict(ops.most_common(16)))
    if len(sys.argv) > 11:
        for i in range(int(sys.argv[10]), int(sys.argv[11]) + 1):
            print(i, ins[i])


if __name__ == "__main__":
    main()
