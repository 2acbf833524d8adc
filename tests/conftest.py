"""Shared fixtures: fresh random draws, the dtype tolerance table, marker gating."""
import os
import sys

import numpy as np
import pytest

try:
    import numba_kernels.reference  # noqa: F401
except ImportError:  # an uninstalled checkout on PYTHONPATH (the GPU machine): map reference/ as the install does
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu"))
    from _common import import_library

    import_library()

from numba_kernels._dispatch import bfloat16  # noqa: E402

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIM:
    # the simulator runs a block's threads as Python threads that hand over at barriers; a shorter GIL switch
    # interval (default 5 ms) cuts the waiting: the tensor-core backward simulator tests took 24.2 / 29.6 s
    # instead of 41.0 / 49.5 s in two interleaved pairs (2026-12-01, shared 2-core machine)
    sys.setswitchinterval(5e-4)

#: max |kernel - float64 reference| / max(1, |reference|) allowed per input dtype
TOL = {
    np.dtype(np.float64): 1e-10,
    np.dtype(np.float32): 2e-5,
    np.dtype(np.float16): 4e-3,
    bfloat16: 3e-2,
}

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), bfloat16]


def dtype_id(dt):
    return np.dtype(dt).name


@pytest.fixture
def rng(request):
    """A generator seeded from the test id and the clock: fresh draws, reproducible from the log."""
    seed = (abs(hash(request.node.nodeid)) + int.from_bytes(os.urandom(4), "little")) % 2**32
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def max_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    return float(np.max(np.abs(out - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def pytest_collection_modifyitems(config, items):
    from numba_kernels._dispatch import cuda_available

    real_gpu = (not SIM) and cuda_available()
    for item in items:
        if "sim" in item.keywords and not SIM:
            item.add_marker(pytest.mark.skip(reason="simulator test: run with NUMBA_ENABLE_CUDASIM=1"))
        if "ptx" in item.keywords and SIM:
            item.add_marker(pytest.mark.skip(reason="PTX compilation needs the real numba-cuda target"))
        if "gpu" in item.keywords and not real_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a real CUDA GPU"))
