"""Dump SASS of decode tc kernel configs (device machine)."""
import os, sys
sys.path.insert(0, os.getcwd())
from numba import cuda
from numba_kernels.cuda import decode_attention as cda
from numba_kernels.cuda._decode_kernels import make_decode_tc
sigs = {n: s for n, f, s in cda.ptx_signatures((128,))}
out = os.environ["OUT"]
for name, split, merge, reg, stages, tpf in (("decode_tc_bf16_split_D128", True, True, True, 2, False),
                                              ("decode_tc_bf16_split_D128", True, True, False, 3, True),
                                              ("decode_tc_bf16_split_nomerge_D128", True, False, True, 2, False),
                                              ("decode_tc_f16_D128", False, True, True, 2, False),
                                              ("decode_tc_f16_D128", False, True, False, 3, True)):
    bf = "bf16" in name
    k = make_decode_tc(4, 128, bf, False, False, split, stages, merge, 16, False, False, tpf, reg)[0]
    kk = cuda.jit(sigs[name])(k.py_func)
    sass = kk.inspect_sass()
    if isinstance(sass, dict):
        sass = list(sass.values())[0]
    fn = f"{out}/{name}_reg{int(reg)}.sass"
    open(fn, "w").write(sass)
    print(fn, len(sass.splitlines()), flush=True)
