"""Shared set-up of the GPU check scripts: import this checkout's numba_kernels whether or not it is
installed, and time device work with CUDA events (torch is the timer and a peer, never a dependency)."""
import importlib
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_MODULES = ("causal_conv1d", "decode_attention", "fft_conv", "flash_attention", "flash_attention_backward", "selective_scan")


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



class Checks:
    """Correctness bookkeeping of a check script: errors against the reference, judged by a dtype table."""

    def __init__(self, width=40):
        from ml_dtypes import bfloat16

        self.tol = {np.dtype(np.float16): 4e-3, np.dtype(bfloat16): 3e-2, np.dtype(np.float32): 2e-5,
                    np.dtype(np.float64): 1e-10}
        self.width = width
        self.fails = []

    @staticmethod
    def err(a, ref):
        """max |a - ref| / max(1, max |ref|) (0 for empty arrays)."""
        a = np.asarray(a, dtype=np.float64)
        return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max()))) if ref.size else 0.0

    def report(self, name, dt, e, extra=""):
        ok = e < self.tol[np.dtype(dt)]
        print(f"{'ok ' if ok else 'BAD'} {name:{self.width}s} {np.dtype(dt).name:8s} err {e:.2e} {extra}", flush=True)
        if not ok:
            self.fails.append(f"{name} {np.dtype(dt).name}")
