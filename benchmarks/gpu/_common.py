"""Shared set-up of the GPU check scripts: import this checkout's numba_kernels whether or not it is
installed, and time device work with CUDA events (torch is the timer and a peer, never a dependency)."""
import importlib
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_MODULES = ("causal_conv1d", "fft_conv", "flash_attention", "flash_attention_backward", "selective_scan")


def import_library():
    """``numba_kernels`` from this checkout; an uninstalled tree gets ``reference/`` mapped to
    ``numba_kernels.reference`` as the install's package_dir does."""
    sys.path.insert(0, ROOT)
    import numba_kernels

    try:
        import numba_kernels.reference  # noqa: F401
    except ImportError:
        ref = importlib.import_module("reference")
        sys.modules["numba_kernels.reference"] = ref
        for name in REFERENCE_MODULES:
            sys.modules[f"numba_kernels.reference.{name}"] = importlib.import_module(f"reference.{name}")
    return numba_kernels


def tbench(fn, iters=20):
    """Median seconds of ``fn()`` between CUDA events, after one warm-up call."""
    import torch

    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return float(np.median(ts))
