"""One CUDA selective-scan backward call (bf16 B8 Dm1536 N16, z, B / C (B, 1, N, L), delta_bias + softplus, D) after
a warm-up call, for ncu: ``ncu -k regex:kernel --launch-skip K python benchmarks/gpu/profile_scan_bwd.py``.
Env: PROF_L (2048). GPU only."""
import os
import sys

import numpy as np
import torch
from numba import cuda

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_library  # noqa: E402

nk = import_library()
from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.cuda import selective_scan_backward as csb  # noqa: E402

B, Dm, N, L = 8, 1536, 16, int(os.environ.get("PROF_L", "2048"))


def dv(t):
    return cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16)


u, delta, z, dout = (torch.randn(B, Dm, L, device="cuda", dtype=torch.bfloat16) for _ in range(4))
Bt, Ct = (torch.randn(B, 1, N, L, device="cuda", dtype=torch.bfloat16) for _ in range(2))
A = cuda.as_cuda_array(-torch.rand(Dm, N, device="cuda") - 0.5)
D = cuda.as_cuda_array(torch.randn(Dm, device="cuda"))
db = cuda.as_cuda_array(torch.randn(Dm, device="cuda") * 0.5)
for _ in range(2):
    csb.scan_bwd_cuda(dv(dout), dv(u), dv(delta), A, dv(Bt), dv(Ct), D, dv(z), db, None, None, None, True, 1, 1,
                      bfloat16)
    cuda.synchronize()
print("done")
