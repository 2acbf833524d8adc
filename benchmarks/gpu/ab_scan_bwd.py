"""A/B of the CUDA selective-scan backward: a previous version of ``cuda/selective_scan_backward.py`` (path in
OLD_SCAN_BWD, e.g. from ``git show 0a70d98:numba_kernels/cuda/selective_scan_backward.py``: one lane per channel)
against the current one at several (Q, chunk budget) settings, bf16 B8 Dm1536 N16, z, B / C (B, 1, N, L),
delta_bias + softplus, D; gradients compared between the two; the time of one ``scan_bwd_cuda`` call between CUDA
events (median of 5, queued allocations included). GPU only.

    python benchmarks/gpu/ab_scan_bwd.py
"""
import importlib.util
import os
import sys
import time

import numpy as np
import torch
from numba import cuda

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_library, tbench  # noqa: E402

nk = import_library()
from numba_kernels.cuda import selective_scan_backward as new  # noqa: E402
from numba_kernels._dispatch import bfloat16  # noqa: E402

old = None
if os.environ.get("OLD_SCAN_BWD"):
    spec = importlib.util.spec_from_file_location("old_scan_bwd", os.environ["OLD_SCAN_BWD"])
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)


def main():
    print(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M"), flush=True)
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    tc = tbench(lambda: y.copy_(x))
    copy_bw = 2 * x.numel() / tc
    del x, y
    print(f"device copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    B, Dm, N = 8, 1536, 16
    cfg0, budget0, pf0 = new.CONFIG["gpu"], new.SMEM_BUDGET, getattr(new, "PREFETCH", True)
    A = cuda.as_cuda_array(-torch.rand(Dm, N, device="cuda") - 0.5)
    D = cuda.as_cuda_array(torch.randn(Dm, device="cuda"))
    dbias = cuda.as_cuda_array(torch.randn(Dm, device="cuda") * 0.5)

    def devarr(t):
        return cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16)

    for L in [int(x) for x in os.environ.get("AB_L", "2048,8192").split(",")]:
        u, delta, z, Bt, Ct = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in
                               ((B, Dm, L), (B, Dm, L), (B, Dm, L), (B, 1, N, L), (B, 1, N, L)))
        dout = torch.randn_like(u)
        args = [devarr(t) for t in (dout, u, delta)]
        Bd, Cd, zd = (devarr(t) for t in (Bt, Ct, z))
        nb = 7 * B * Dm * L * 2 + 4 * B * N * L * 2

        def run(mod):
            return mod.scan_bwd_cuda(*args, A, Bd, Cd, D, zd, dbias, None, None, None, True, 1, 1, bfloat16)

        def host(g):
            if g is None:
                return None
            a = g.copy_to_host()
            return a.view(bfloat16).astype(np.float32) if a.dtype == np.uint16 else a.astype(np.float32)

        t_old = tbench(lambda: run(old), 5) if old is not None and L <= 2048 else float("nan")
        ref = [host(g) for g in run(old)] if old is not None and L <= 2048 else None
        print(f"L{L} old kernel: {t_old * 1e3:.3f} ms ({nb / t_old / 1e9:.0f} GB/s)", flush=True)
        names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddb", "dinit")
        # K per budget (the partial-sum slots count): Q4 30 KB K4, 40 KB K8, 80 KB K16; Q8 56 KB K8, 100 KB K16;
        # Q2 40 KB K8, 64 KB K16; Q16 80 KB K8. pf: PREFETCH (the next chunk's global loads before this one's walk)
        rows = ((4, 40, True), (4, 40, False), (4, 80, True), (4, 30, True), (8, 56, True),
                (8, 100, True), (2, 40, True), (2, 64, True), (16, 80, True))
        if os.environ.get("AB_ROWS"):  # e.g. AB_ROWS=4:40:1,8:56:1 (Q:budget KB:prefetch)
            rows = [tuple(int(x) for x in r.split(":")) for r in os.environ["AB_ROWS"].split(",")]
            rows = [(q, b_, bool(p_)) for q, b_, p_ in rows]
        for q, budget, pf in rows:
            new.CONFIG["gpu"] = (32, q)
            new.SMEM_BUDGET = budget * 1024
            if hasattr(new, "PREFETCH"):
                new.PREFETCH = pf
            elif not pf:
                continue
            try:
                got = run(new)
                cuda.synchronize()
                t = tbench(lambda: run(new), 5)
                diff = ""
                if ref is not None:
                    es = []
                    for n, g, r in zip(names, got, ref):
                        if r is not None:
                            gh = host(g)
                            es.append(f"{n} {float(np.abs(gh - r).max() / max(1e-30, np.abs(r).max())):.1e}")
                    diff = " | rel diff vs old: " + ", ".join(es)
                K = new.chunk_len(N, False, 32, new.config(N)[1], True, True)
                tag = "" if pf else ", no prefetch"
                print(f"L{L} new Q{q} K{K} (budget {budget} KB{tag}): {t * 1e3:.3f} ms ({nb / t / 1e9:.0f} GB/s, "
                      f"{100 * nb / t / copy_bw:.1f}% of copy) = {t_old / t:.1f}x old{diff}", flush=True)
            except Exception as ex:
                print(f"L{L} new Q{q} budget {budget} pf {pf}: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
        new.CONFIG["gpu"] = cfg0
        new.SMEM_BUDGET = budget0
        if hasattr(new, "PREFETCH"):
            new.PREFETCH = pf0


if __name__ == "__main__":
    main()
