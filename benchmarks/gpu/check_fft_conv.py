"""On the GPU machine: correctness of the CUDA fft_conv path (real cuFFT through the ctypes binding) against
the float64 direct reference and scipy.signal.fftconvolve, every mode and option, forward and backward; the
cuFFT error names and plan cache; then float32 B64 H768 causal timing (Lk = L, FlashFFTConv's setting) next
to a torch.fft implementation of the same conv and a same-run device copy. Prints a table last.

``--sim``: correctness only, tiny shapes, under the CUDA simulator (numpy FFT fallback; no GPU needed)."""
import os
import sys
import time

SIM = "--sim" in sys.argv
if SIM:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Checks, import_library  # noqa: E402

nk = import_library()
from scipy.signal import fftconvolve  # noqa: E402

from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.reference.fft_conv import fft_conv_backward_ref, fft_conv_ref  # noqa: E402

rng = np.random.default_rng(int(time.time()))
CHECKS = Checks(width=40)
err, report, fails = CHECKS.err, CHECKS.report, CHECKS.fails


def correctness():
    B, H = (1, 2) if SIM else (2, 8)
    sizes = [(7, 3), (5, 9)] if SIM else [(1, 3), (97, 300), (1009, 97), (1024, 1024)]
    dts = (np.float32, bfloat16) if SIM else (np.float32, np.float64, np.float16, bfloat16)
    for dt in dts:
        for L, Lk in sizes:
            for mode in ("causal", "same", "full"):
                Lout = L + Lk - 1 if mode == "full" else L
                u = rng.standard_normal((B, H, L)).astype(dt)
                pdt = np.float64 if dt == np.float64 else np.float32  # dk / dbias come back in k's / bias's dtype
                k = (rng.standard_normal((H, Lk)) / np.sqrt(Lk)).astype(pdt)
                opt = dict(bias=rng.standard_normal(H).astype(pdt),
                           pregate=rng.standard_normal((B, H, L)).astype(dt),
                           postgate=rng.standard_normal((B, H, Lout)).astype(dt))
                for name, kw in (("plain", {}), ("bias+gates", opt)):
                    t = time.perf_counter()
                    y = nk.fft_conv(u, k, mode=mode, backend="cuda", **kw)
                    tc = time.perf_counter() - t
                    e = err(y, fft_conv_ref(u, k, mode, **kw))
                    if name == "plain":
                        sc = fftconvolve(u.astype(np.float64), k[None].astype(np.float64),
                                         mode="full" if mode == "causal" else mode, axes=-1)[..., :Lout]
                        e = max(e, err(y, sc))
                    report(f"fwd {mode} {name} L{L} Lk{Lk}", dt, e, f"({tc:.1f}s)")
                    dout = rng.standard_normal((B, H, Lout)).astype(dt)
                    g = nk.fft_conv_backward(dout, u, k, mode=mode, backend="cuda", **kw)
                    rg = fft_conv_backward_ref(dout, u, k, mode, **kw)
                    report(f"bwd {mode} {name} L{L} Lk{Lk}", dt,
                           max(err(a, r) for a, r in zip(g, rg) if r is not None))
    from numba import cuda

    u = rng.standard_normal((B, H, 33)).astype(np.float32)
    k = rng.standard_normal((H, 33)).astype(np.float32)
    kd = cuda.to_device(k)
    y1 = nk.fft_conv(cuda.to_device(u), kd)
    y2 = nk.fft_conv(cuda.to_device(u), kd)  # second call: cached filter spectrum
    ok = hasattr(y1, "copy_to_host") and np.array_equal(y1.copy_to_host(), y2.copy_to_host())
    print(f"{'ok ' if ok else 'BAD'} device in -> device out, cached filter gives identical results")
    if not ok:
        fails.append("device out / cache")
    if not SIM:
        from numba_kernels.cuda import cufft

        try:
            cufft.plan(0, 1, False, False)
            fails.append("cufft error")
            print("BAD cufftPlanMany(N=0) did not raise")
        except cufft.CufftError as ex:
            print(f"ok  cuFFT error names its status: {ex}")
        n = cufft.plan_count()
        nk.clear_fft_conv_cache()
        print(f"{'ok ' if n > 0 and cufft.plan_count() == 0 else 'BAD'} clear_fft_conv_cache destroyed {n} plans"
              f" (cuFFT version {cufft.version()})")


def bench():
    import torch
    from numba import cuda

    def tbench(fn, iters=10):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    x = torch.randn(2 ** 30 // 4, device="cuda")
    y = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 4 / tbench(lambda: y.copy_(x), 10) / 1e9
    del x, y
    rows = [f"device copy (torch, 1 GiB): {copy_bw:.0f} GB/s (read + write)",
            f"{'B':>3} {'H':>4} {'L':>6} {'N':>7} | {'ours ms':>8} {'GB/s':>6} {'%copy':>5} | {'torch ms':>8} "
            f"{'ours/torch':>10} | max rel diff"]
    print(rows[0], flush=True)
    B, H = 64, 768
    for L in (1024, 8192, 65536):
        for b in (B, B // 4):
            try:
                torch.cuda.empty_cache()
                ut = torch.randn(b, H, L, device="cuda")
                kt = torch.randn(H, L, device="cuda") / L ** 0.5
                ud, kd = cuda.as_cuda_array(ut), cuda.as_cuda_array(kt)
                N = 2 * L
                out = nk.fft_conv(ud, kd, backend="cuda")  # compile + plan + filter spectrum
                t_ours = tbench(lambda: nk.fft_conv(ud, kd, backend="cuda"))
                ours = torch.as_tensor(out, device="cuda")
                kf = torch.fft.rfft(kt, n=N)  # the peer caches k's transform too

                def peer():
                    return torch.fft.irfft(torch.fft.rfft(ut, n=N) * kf, n=N)[..., :L]

                t_peer = tbench(peer)
                ref = peer()
                diff = float((ours - ref).abs().max() / ref.abs().max())
                del ref, ours, out
                nbytes = 2 * b * H * L * 4
                gbs = nbytes / t_ours / 1e9
                rows.append(f"{b:>3} {H:>4} {L:>6} {N:>7} | {t_ours * 1e3:8.2f} {gbs:6.0f} {100 * gbs / copy_bw:5.1f} | "
                            f"{t_peer * 1e3:8.2f} {t_peer / t_ours:10.2f} | {diff:.1e}")
                print(rows[-1], flush=True)
                nk.clear_fft_conv_cache()
                del ut, kt, ud, kd, kf
                break
            except Exception as ex:  # out of memory (torch or numba): try a smaller batch
                print(f"B{b} L{L}: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                nk.clear_fft_conv_cache()
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    print(f"numba_kernels from {os.path.dirname(nk.__file__)}; simulator={SIM}", flush=True)
    correctness()
    rows = [] if SIM else bench()
    print("\n==== summary ====")
    for r in rows:
        print(r)
    print("correctness:", "all ok" if not fails else f"FAILED {fails}")
    sys.exit(1 if fails else 0)
