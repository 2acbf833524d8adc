"""One decode attention launch (bf16 B8 S32k contiguous, H32 Hk8 D128) after a warm-up, for ncu, with the
tensor-core configuration in PROF_CFG (a Python tuple, as attend_cuda's tc_tiles; default the direct kernel);
SASS of that kernel into $OUT when PROF_SASS is set. GPU only."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_decode_attention as cda  # noqa: E402
from numba import cuda  # noqa: E402

from numba_kernels.cuda.decode_attention import attend_cuda  # noqa: E402

cfg = eval(os.environ.get("PROF_CFG", "('direct', 4, 1, 0)"))
c = cda._setup(8, 32768, "contig")
for _ in range(2):
    attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16", cfg)
cuda.synchronize()
if os.environ.get("PROF_SASS") and cfg[0] == "direct":
    from numba_kernels.cuda.decode_attention import _tc_signature
    from numba_kernels.cuda._decode_kernels import make_decode_direct

    k = make_decode_direct(cfg[1], 128, True, False, False, True, True, True, cfg[2], cfg[3])[0]
    sass = cuda.jit(_tc_signature(True))(k.py_func).inspect_sass()
    sass = list(sass.values())[0] if isinstance(sass, dict) else sass
    open(os.path.join(os.environ["OUT"], "direct.sass"), "w").write(sass)
    print("sass lines", len(sass.splitlines()))
