"""The fused shared-memory fft_conv kernel on the GPU: correctness against scipy.signal.fftconvolve (float64) for
every mode with bias and gates, odd batch (a block with one row), float32 / bfloat16 / float16 at both register-
pass shapes in use (N 512: passes 3+3+3, N 2048: 4+4+3); then B64 H768 causal Lk = L device times next to the
kernel path and torch.fft (CUDA events, median of 10).

    python benchmarks/gpu/check_fft_fused.py
"""
import os
import sys
import time

import numpy as np
import torch
from numba import cuda
from scipy.signal import fftconvolve

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Checks, import_library, tbench  # noqa: E402

nk = import_library()
from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.cuda import fft_conv as cfc  # noqa: E402

CHECKS = Checks(width=52)
rng = np.random.default_rng(7)


def ref(u, k, mode, bias, pre, post):
    f = lambda a: a.astype(np.float64)  # noqa: E731
    L, Lout = u.shape[2], post.shape[2]
    v = f(u) * f(pre)
    y = fftconvolve(v, f(k)[None], mode="full" if mode == "causal" else mode, axes=-1)[..., :Lout]
    y[..., :L] += f(bias)[None, :, None] * v[..., :Lout]
    return y * f(post)


def correctness():
    calls = []
    real = cfc._fwd_fused
    cfc._fwd_fused = lambda *a: calls.append(a[6]) or real(*a)
    dts, sizes = (np.float32, bfloat16, np.float16), ((300, 200), (1024, 1024))
    if os.environ.get("FUSED_CHECK_N4096"):  # a short slot: float32 at FFT size 4096 (compiles ~30 s)
        dts, sizes = (np.float32,), ((2000, 2000),)
    for dt in dts:
        for L, Lk in sizes:
            for mode in ("causal", "same", "full"):
                B, H = 3, 5
                Lout = L + Lk - 1 if mode == "full" else L
                u = rng.standard_normal((B, H, L)).astype(dt)
                k = (rng.standard_normal((H, Lk)) / np.sqrt(Lk)).astype(np.float32)
                bias = rng.standard_normal(H).astype(np.float32)
                pre = rng.standard_normal((B, H, L)).astype(dt)
                post = rng.standard_normal((B, H, Lout)).astype(dt)
                calls.clear()
                t = time.perf_counter()
                y = nk.fft_conv(u, k, mode=mode, bias=bias, pregate=pre, postgate=post, backend="cuda")
                tc = time.perf_counter() - t
                CHECKS.report(f"fused N{calls[0] if calls else 'NOT USED'} {mode} bias+gates L{L} Lk{Lk} B{B}", dt,
                              CHECKS.err(y, ref(u, k, mode, bias, pre, post)) if calls else 1.0, f"({tc:.1f}s)")
    cfc._fwd_fused = real


def bench():
    x = torch.randn(2 ** 28, device="cuda")
    y = torch.empty_like(x)
    copy = 2 * x.numel() * 4 / tbench(lambda: y.copy_(x)) / 1e9
    del x, y
    print(f"device copy {copy:.0f} GB/s", flush=True)
    for dt, L in ((torch.float32, 256), (torch.float32, 1024), (torch.float16, 1024)):
        B, H = 64, 768
        N = 1 << (2 * L - 2).bit_length()
        u = torch.randn(B, H, L, device="cuda").to(dt)
        k = (torch.randn(H, L, device="cuda") / L ** 0.5).to(dt)
        ud, kd = cuda.as_cuda_array(u), cuda.as_cuda_array(k)
        kf = torch.fft.rfft(k.float(), n=N)
        peer = lambda: torch.fft.irfft(torch.fft.rfft(u.float(), n=N) * kf, n=N)[..., :L].to(dt)  # noqa: E731
        t_peer = tbench(peer)
        saved = cfc.FUSED_MAX_N
        cfc.FUSED_MAX_N = 0
        t_kern = tbench(lambda: nk.fft_conv(ud, kd, backend="cuda", fft_size=N))
        cfc.FUSED_MAX_N = saved
        t = time.perf_counter()
        out = nk.fft_conv(ud, kd, backend="cuda")
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        t_f = tbench(lambda: nk.fft_conv(ud, kd, backend="cuda"))
        r = peer().float()
        e = float((torch.as_tensor(out, device="cuda").float() - r).abs().max() / r.abs().max())
        gb = 2 * u.numel() * u.element_size() / 1e9
        print(f"{str(dt):14s} B{B} H{H} L{L} N{N}: fused {t_f * 1e3:.3f} ms ({gb / t_f:.0f} GB/s, "
              f"{100 * gb / t_f / copy:.1f}% of copy) | kernel path {t_kern * 1e3:.3f} ms | torch.fft "
              f"(fp32) {t_peer * 1e3:.3f} ms | fused / torch {t_peer / t_f:.2f}x | first call {first:.1f} s | "
              f"max rel diff {e:.1e}", flush=True)
        nk.clear_fft_conv_cache()


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M"), flush=True)
    correctness()
    if not os.environ.get("FUSED_CHECK_N4096"):
        bench()
    print("correctness:", "all ok" if not CHECKS.fails else f"FAILED {CHECKS.fails}")
