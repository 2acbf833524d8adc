"""Kernel time vs host time of the CUDA fft_conv at short lengths (issue 6, L 256 / 1k): the fused kernel alone
(queued launches into a preallocated output), the public call one at a time and queued, its host enqueue time,
the output allocation, a cProfile of the host path, and torch.fft / a copy in the same run. GPU only.

    python benchmarks/gpu/probe_fft_host.py
    OLD_FFT_FUSED=/path/to/old/_fft_conv_fused.py python ...   # also time that module's kernel (A/B)
    PROBE_L=2048,4096 NUMBA_KERNELS_FFT_FUSED_MAX_N=8192 python ...   # other lengths, the fused kernel past 2048
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
from numba_kernels.cuda import _pool as cpool


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


def old_module():
    path = os.environ.get("OLD_FFT_FUSED")
    if not path:
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("old_fft_conv_fused", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def driver_calls(fn, n=50):
    """{driver function name: (calls per fn call, us per fn call)} over n calls of fn."""
    from numba.cuda.cudadrv import driver as drv

    d = drv.driver
    stats = {}

    def wrap(name, f):
        def g(*a):
            t0 = time.perf_counter()
            try:
                return f(*a)
            finally:
                c, t = stats.get(name, (0, 0.0))
                stats[name] = (c + 1, t + time.perf_counter() - t0)
        return g

    names = [k for k, v in list(d.__dict__.items()) if k.startswith("cu") and callable(v)]
    saved = {k: d.__dict__[k] for k in names}
    for k in names:
        d.__dict__[k] = wrap(k, saved[k])
    try:
        torch.cuda.synchronize()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    finally:
        for k in names:
            d.__dict__[k] = saved[k]
    return {k: (c / n, t / n * 1e6) for k, (c, t) in sorted(stats.items(), key=lambda x: -x[1][1])}


def host_pieces(B, H, Lx, u, k, n=200):
    """us per call of the public call's host steps, each timed alone in a loop (device arrays in)."""
    from numba_kernels import _dispatch as dsp

    fcm = sys.modules["numba_kernels.fft_conv"]  # the module (the package exports the function)

    ud, kd = cuda.as_cuda_array(u), cuda.as_cuda_array(k)
    res = {}

    def t(name, f):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        res[name] = (time.perf_counter() - t0) / n * 1e6

    t("_check", lambda: fcm._check(ud, kd, "causal", None, None, None, None))
    t("resolve_backend", lambda: dsp.resolve_backend("cuda", ud, kd, None, None, None))
    t("any_on_device", lambda: dsp.any_on_device(ud, kd, None, None, None))
    from numba_kernels.cuda.causal_conv1d import _elem
    t("_elem(u)", lambda: _elem(ud, "f32", 3))
    t("_device_key", cfc._device_key)
    t("cached_filter(hit)", lambda: fcm.cached_filter(kd, Lx, 2 * Lx, np.float32, "cuda:0:fused", lambda: None))
    t("out_array", lambda: cfc.out_array((B, H, Lx), np.float32))
    t("as_cuda_array", lambda: cuda.as_cuda_array(u))
    return "  ".join(f"{k} {v:.1f}" for k, v in res.items())


def main():
    print(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M"), flush=True)
    old = old_module()
    cases = [(64, 768, 256, torch.float32), (64, 768, 512, torch.float32),
                            (64, 768, 1024, torch.float32),
                            (64, 768, 256, torch.float16), (64, 768, 1024, torch.float16)]
    if os.environ.get("PROBE_L"):  # e.g. PROBE_L=2048,4096 (float32, B 64 H 768)
        cases = [(64, 768, int(x), torch.float32) for x in os.environ["PROBE_L"].split(",")]
    for B, H, Lx, dtype in cases:
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
        saved_pool = cpool.OUT_POOL
        cpool.OUT_POOL = 0  # "call": a fresh output per call (the 2026-12-01 default)
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
        ker = fz.make_fused_kernel(kind, LOGN, nt, fz.RMAX, (False, False, False))  # the plain call's kernel
        args = (ud, e3, e3, biasd, Kp, tw, out, np.int64(0))
        launch = lambda: fl.launch(ker, (-(-B // 2), H), nt, fz.smem_bytes(N), args)
        q_kern = queued(launch)
        q_old = None
        if old is not None:
            oker = old.make_fused_kernel(kind, LOGN, old.threads(N), old.RMAX)
            oout = cuda.device_array((B, H, Lx), dtype=y.dtype)
            olaunch = lambda: fl.launch(oker, (-(-B // 2), H), old.threads(N), old.smem_bytes(N),
                                        (ud, e3, e3, biasd, Kp, tw, oout, np.int64(0)))
            olaunch()
            cuda.synchronize()
            oerr = float(np.abs(oout.copy_to_host().astype(np.float64) - y.copy_to_host()).max())
            q_old = queued(olaunch)
            q_kern = queued(launch)  # again, after the old one (interleaved)
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
        cpool.OUT_POOL = 4
        t_pool = tbench(call)
        q_pool = queued(call)
        cpool.OUT_POOL = saved_pool
        gb = 2 * u.numel() * u.element_size() / 1e9
        print(f"B{B} H{H} L{Lx} N{N} {str(dtype)[6:]}: peer {t_peer * 1e3:.3f} ms (queued {q_peer[0] * 1e3:.3f}, "
              f"host {q_peer[1] * 1e3:.3f}) | copy fp32 {t_copy * 1e3:.3f} ms | call {t_call * 1e3:.3f} ms "
              f"(queued {q_call[0] * 1e3:.3f}, host {q_call[1] * 1e3:.3f}) err {err:.1e} | kernel alone "
              f"{q_kern[0] * 1e3:.3f} ms = {gb / q_kern[0]:.0f} GB/s (launch host {q_kern[1] * 1e6:.0f} us) | "
              f"alloc+free {t_alloc * 1e6:.0f} us | output cache (OUT_POOL 4): call {t_pool * 1e3:.3f} ms (queued "
              f"{q_pool[0] * 1e3:.3f}, host {q_pool[1] * 1e3:.3f})", flush=True)
        if q_old is not None:
            print(f"  A/B kernel alone: new {q_kern[0] * 1e3:.3f} ms vs old {q_old[0] * 1e3:.3f} ms "
                  f"(old / new {q_old[0] / q_kern[0]:.2f}x; max |old - new| {oerr:.1e})", flush=True)
        print("  host pieces (us):", host_pieces(B, H, Lx, u, k), flush=True)
        print("  driver calls per public call (count, us):",
              {kk: (round(c, 2), round(us_, 1)) for kk, (c, us_) in driver_calls(call).items()}, flush=True)
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
