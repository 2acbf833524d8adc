"""Kernel time vs host time of the CUDA fft_conv at short lengths (issue 6, L 256 / 1k): the fused kernel alone
(queued launches into a preallocated output), the public call one at a time and queued, its host enqueue time,
the output allocation, a cProfile of the host path, and torch.fft / a copy in the same run. GPU only.

    python benchmarks/gpu/probe_fft_host.py
"""
import cProfile
import io
import os
import pstats
import sys
import time

import numpy as np
import torch
from numba import cuda

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_library, tbench

nk = import_library()
from numba_kernels.cuda import _fft_conv_fused as fz
from numba_kernels.cuda import _launch as fl
from numba_kernels.cuda import fft_conv as cfc


def queued(fn, n=20):
    """Median over 5 rounds of (device seconds per call of n queued calls between CUDA events, host seconds per
    enqueue)."""
    fn()
    torch.cuda.synchronize()
    dev, host = [], []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host.append((time.perf_counter() - t0) / n)
        e.record()
        torch.cuda.synchronize()
        dev.append(s.elapsed_time(e) / 1e3 / n)
    return float(np.median(dev)), float(np.median(host))


def main():
    print(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M"), flush=True)
    for B, H, Lx, dtype in [(64, 768, 256, torch.float32), (64, 768, 1024, torch.float32),
                            (64, 768, 256, torch.float16), (64, 768, 1024, torch.float16)]:
        N = 1 << (2 * Lx - 2).bit_length()
        u = torch.randn(B, H, Lx, device="cuda").to(dtype)
        k = (torch.randn(H, Lx, device="cuda") / Lx ** 0.5).to(dtype)
        uf, kf32 = u.float(), k.float()
        kf = torch.fft.rfft(kf32, n=N)
        if dtype == torch.float32:
            peer = lambda: torch.fft.irfft(torch.fft.rfft(u, n=N) * kf, n=N)[..., :Lx]
        else:
            peer = lambda: torch.fft.irfft(torch.fft.rfft(u.float(), n=N) * kf, n=N)[..., :Lx].to(dtype)  # noqa
        t_peer = tbench(peer)
        q_peer = queued(peer)
        t_copy = tbench(lambda: uf.clone())
        ud, kd = cuda.as_cuda_array(u), cuda.as_cuda_array(k)
        call = lambda: nk.fft_conv(ud, kd, backend="cuda")
        y = call()
        ref = torch.fft.irfft(torch.fft.rfft(uf, n=N) * kf, n=N)[..., :Lx]
        err = float((torch.as_tensor(y, device="cuda").float() - ref).abs().max() / ref.abs().max())
        saved_pool = cfc.OUT_POOL
        cfc.OUT_POOL = 0  # "call": a fresh output per call (the 2026-12-01 default)
        t_call = tbench(call)
        q_call = queued(call)
        # the fused kernel alone, preallocated output (the arguments _fwd_fused passes)
        kind = {torch.float32: "f32", torch.float16: "f16"}[dtype]
        out = cuda.device_array((B, H, Lx), dtype=y.dtype)
        LOGN = N.bit_length() - 1
        nt = fz.threads(N)
        Kp = [v[2] for kk, v in cfc_filters().items() if "fused" in str(kk)][-1]
        tw = cfc._TWD[(N, cfc._device_key())]
        e3 = cfc._none(3, cfc.ELEM[kind])
        biasd = cuda.device_array((0,), dtype=np.float32)
        ker = fz.make_fused_kernel(kind, LOGN, nt, fz.RMAX)
        args = (ud, e3, e3, biasd, Kp, tw, out, np.int64(0))
        launch = lambda: fl.launch(ker, (-(-B // 2), H), nt, fz.smem_bytes(N), args)
        q_kern = queued(launch)
        # output allocation alone (numba frees lazily: include a flush every 8)
        ctx = cuda.current_context()
        ts = []
        for i in range(16):
            t0 = time.perf_counter()
            a = cuda.device_array((B, H, Lx), dtype=y.dtype)
            del a
            if i % 8 == 7:
                ctx.deallocations.clear()
            ts.append(time.perf_counter() - t0)
        t_alloc = float(np.median(ts))
        cfc.OUT_POOL = 4
        t_pool = tbench(call)
        q_pool = queued(call)
        cfc.OUT_POOL = saved_pool
        gb = 2 * u.numel() * u.element_size() / 1e9
        print(f"B{B} H{H} L{Lx} N{N} {str(dtype)[6:]}: peer {t_peer * 1e3:.3f} ms (queued {q_peer[0] * 1e3:.3f}, "
              f"host {q_peer[1] * 1e3:.3f}) | copy fp32 {t_copy * 1e3:.3f} ms | call {t_call * 1e3:.3f} ms "
              f"(queued {q_call[0] * 1e3:.3f}, host {q_call[1] * 1e3:.3f}) err {err:.1e} | kernel alone "
              f"{q_kern[0] * 1e3:.3f} ms = {gb / q_kern[0]:.0f} GB/s (launch host {q_kern[1] * 1e6:.0f} us) | "
              f"alloc+free {t_alloc * 1e6:.0f} us | output cache (OUT_POOL 4): call {t_pool * 1e3:.3f} ms (queued "
              f"{q_pool[0] * 1e3:.3f}, host {q_pool[1] * 1e3:.3f})", flush=True)
        pr = cProfile.Profile()  # the shipped setting (output cache on)
        torch.cuda.synchronize()
        pr.enable()
        for _ in range(50):
            call()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        print("\n".join(s.getvalue().splitlines()[:40]), flush=True)
        nk.clear_fft_conv_cache()


def cfc_filters():
    return sys.modules["numba_kernels.fft_conv"]._cache


if __name__ == "__main__":
    main()
