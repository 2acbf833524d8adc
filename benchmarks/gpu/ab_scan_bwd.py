"""A/B of the CUDA selective-scan backward kernels: the walk kernel (ALGO "walk": one lane group per channel) against
the time kernel (ALGO "time": threads along time, warp scans) at several (NI steps per lane, CB channels per block)
settings, bf16 B8 Dm1536 N16, z, B / C (B, 1, N, L), delta_bias + softplus, D; gradients compared with the walk
kernel's; the time of one ``scan_bwd_cuda`` call between CUDA events (median of 5, queued allocations included);
the forward (``scan_fwd_cuda``-level call of the public op on the same tensors) in the same run. GPU only.

    python benchmarks/gpu/ab_scan_bwd.py            # AB_L=2048,8192  AB_TIME=8:32,4:32,8:16,4:16
"""
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


def main():
    print(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M"), flush=True)
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    tc = tbench(lambda: y.copy_(x))
    copy_bw = 2 * x.numel() / tc
    del x, y
    print(f"device copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    B, Dm, N = 8, 1536, 16
    A = cuda.as_cuda_array(-torch.rand(Dm, N, device="cuda") - 0.5)
    D = cuda.as_cuda_array(torch.randn(Dm, device="cuda"))
    dbias = cuda.as_cuda_array(torch.randn(Dm, device="cuda") * 0.5)
    ni0, cb0 = dict(new.TIME_NI), dict(new.TIME_CB)

    def devarr(t):
        return cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16)

    for L in [int(x) for x in os.environ.get("AB_L", "2048,8192").split(",")]:
        u, delta, z, Bt, Ct = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in
                               ((B, Dm, L), (B, Dm, L), (B, Dm, L), (B, 1, N, L), (B, 1, N, L)))
        dout = torch.randn_like(u)
        args = [devarr(t) for t in (dout, u, delta)]
        Bd, Cd, zd = (devarr(t) for t in (Bt, Ct, z))
        nb = 7 * B * Dm * L * 2 + 4 * B * N * L * 2

        def run():
            return new.scan_bwd_cuda(*args, A, Bd, Cd, D, zd, dbias, None, None, None, True, 1, 1, bfloat16)

        def host(g):
            if g is None:
                return None
            a = g.copy_to_host()
            return a.view(bfloat16).astype(np.float32) if a.dtype == np.uint16 else a.astype(np.float32)

        try:  # the forward on the same inputs (float32 torch copies through the public call would differ)
            from numba_kernels.cuda.selective_scan import scan_fwd_cuda
            uf = [devarr(t) for t in (u, delta)]
            tf = tbench(lambda: scan_fwd_cuda(uf[0], uf[1], A, Bd, Cd, D, zd, dbias, None, None, True, False,
                                              bfloat16), 5)
            print(f"L{L} forward: {tf * 1e3:.3f} ms", flush=True)
        except Exception as ex:
            tf = float("nan")
            print(f"L{L} forward not timed: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
        new.ALGO = "walk"
        ref = [host(g) for g in run()]
        t_old = tbench(run, 5)
        print(f"L{L} walk kernel: {t_old * 1e3:.3f} ms ({nb / t_old / 1e9:.0f} GB/s) = {t_old / tf:.1f}x forward",
              flush=True)
        new.ALGO = "time"
        names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddb", "dinit")
        rows = [tuple(int(v) for v in r.split(":")) for r in os.environ.get("AB_TIME", "8:32,4:32,8:16,4:16").split(",")]
        for ni, cb in rows:
            new.TIME_NI["gpu"], new.TIME_CB["gpu"] = ni, cb
            try:
                got = run()
                cuda.synchronize()
                t = tbench(run, 5)
                es = []
                for n, g, r in zip(names, got, ref):
                    if r is not None:
                        gh = host(g)
                        es.append(f"{n} {float(np.abs(gh - r).max() / max(1e-30, np.abs(r).max())):.1e}")
                print(f"L{L} time NI{ni} CB{cb}: {t * 1e3:.3f} ms ({nb / t / 1e9:.0f} GB/s, "
                      f"{100 * nb / t / copy_bw:.1f}% of copy) = {t_old / t:.1f}x walk, {t / tf:.1f}x forward"
                      f" | rel diff vs walk: " + ", ".join(es), flush=True)
            except Exception as ex:
                print(f"L{L} time NI{ni} CB{cb}: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
        new.TIME_NI.update(ni0)
        new.TIME_CB.update(cb0)


if __name__ == "__main__":
    main()
