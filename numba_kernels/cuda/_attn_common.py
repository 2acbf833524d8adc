"""Device helpers shared by the CUDA attention kernels: constants, masks, the dropout hash, jit options."""
import numpy as np
from numba import cuda

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


@dev
def key_range(i0, i1, Sq, Sk, left, right):
    """Visible key range [lo, hi) of query rows [i0, i1) of one sequence (bottom-right aligned window)."""
    off = Sk - Sq
    lo = 0
    hi = Sk
    if left >= 0:
        lo = max(0, i0 + off - left)
    if right >= 0:
        hi = min(Sk, i1 - 1 + off + right + 1)
    return lo, hi


@dev
def visible(row, col, Sk, off, left, right):
    """Whether key ``col`` is visible from query ``row`` (both local to the sequence)."""
    ok = col < Sk
    if left >= 0:
        ok = ok and col >= row + off - left
    if right >= 0:
        ok = ok and col <= row + off + right
    return ok
