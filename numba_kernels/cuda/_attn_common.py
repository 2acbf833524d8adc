"""Device helpers shared by the CUDA attention kernels: constants, masks, the dropout hash, jit options."""
import numpy as np
from numba import cuda

from numba_kernels import _masks
from numba_kernels._dropout import build_hash
from numba_kernels.cuda import _intrinsics as intr

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
F32_NEG_INF = np.float32(-np.inf)
F32_ZERO = np.float32(0.0)
F32_LOG2E = np.float32(LOG2E)
F32_LN2 = np.float32(LN2)

#: decorator for inlined device functions (plain Python under the simulator)
dev = (lambda f: f) if intr.SIM else (lambda f: cuda.jit(device=True, inline=True)(f))
row_key, col_hash = build_hash(dev)


def jit_kernel(fn):
    """cuda.jit with the project's kernel options (the simulator rejects most of them)."""
    return cuda.jit(fn) if intr.SIM else cuda.jit(fn, fastmath=False, lineinfo=False)


key_range = dev(_masks.key_range)
query_range = dev(_masks.query_range)
visible = dev(_masks.visible)


@dev
def seq_bounds(cu_q, cu_k, b):
    """(first query row, query length, first key row, key length) of sequence b."""
    qs = cu_q[b]
    ks = cu_k[b]
    return qs, cu_q[b + 1] - qs, ks, cu_k[b + 1] - ks

