"""On the GPU machine: correctness of the CUDA fft_conv path (real cuFFT through the ctypes binding) against
the float64 direct reference and scipy.signal.fftconvolve, every mode and option, forward and backward; the
cuFFT error names and plan cache; then float32 B64 H768 causal timing (Lk = L, FlashFFTConv's setting) next
to a torch.fft implementation of the same conv and a same-run device copy. Prints a table last.

Also overlap-add (``method="overlap_add"``) against the reference, and timings at L 256 and 1M, in float16, and
for a long input with a short filter (auto overlap-add vs the single FFT vs torch.fft).

``--sim``: correctness only, tiny shapes, under the CUDA simulator (numpy FFT fallback; no GPU needed).
``--quick``: a smaller correctness sweep (float32 / float16, two sizes) to fit a short device slot."""
import os
import sys
import time

SIM = "--sim" in sys.argv
QUICK = "--quick" in sys.argv
PROBE = "--probe" in sys.argv  # LTO plan probe, LTO checks and a short timing table only
BENCH = "--bench" in sys.argv  # the timing table only (FFT_BENCH_MAXL=n: only lengths <= n)
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


def fc_size(L, Lk, mode):
    """The FFT size fft_conv picks (scipy.fft.next_fast_len of the linear-conv length)."""
    import scipy.fft

    return scipy.fft.next_fast_len(L + (min(Lk, L) if mode == "causal" else Lk) - 1, real=True)


def pool_checks():
    """The output cache (``cuda.fft_conv.out_array``) never hands out memory something still references: a live
    result, a slice of one, a torch tensor over one; and reuses it once all are gone."""
    import torch
    from numba import cuda

    from numba_kernels.cuda import _pool as cpool

    def ptr(a):
        return a.__cuda_array_interface__["data"][0]

    def ok(name, cond):
        print(f"{'ok ' if cond else 'FAIL'} output cache: {name}", flush=True)
        if not cond:
            fails.append(f"pool: {name}")

    B, H, L = 4, 16, 256
    u1 = rng.standard_normal((B, H, L)).astype(np.float32)
    u2 = rng.standard_normal((B, H, L)).astype(np.float32)
    k = (rng.standard_normal((H, L)) / np.sqrt(L)).astype(np.float32)
    ud1, ud2, kd = cuda.to_device(u1), cuda.to_device(u2), cuda.to_device(k)
    ref1 = fft_conv_ref(u1.astype(np.float64), k.astype(np.float64))
    nk.clear_fft_conv_cache()
    saved = cpool.OUT_POOL
    cpool.OUT_POOL = 4
    try:
        y1 = nk.fft_conv(ud1, kd, backend="cuda")
        p1 = ptr(y1)
        y2 = nk.fft_conv(ud2, kd, backend="cuda")
        ok("two live results get two buffers", ptr(y2) != p1)
        ok("the first result is intact after the second call", err(y1.copy_to_host(), ref1) < 1e-5)
        del y2
        view = y1[1:]
        del y1
        y3 = nk.fft_conv(ud2, kd, backend="cuda")
        ok("a live slice keeps its buffer out of reuse", ptr(y3) != p1 and err(view.copy_to_host(), ref1[1:]) < 1e-5)
        del view, y3
        y4 = nk.fft_conv(ud1, kd, backend="cuda")
        ok("a buffer nothing references is reused", ptr(y4) == p1 and err(y4.copy_to_host(), ref1) < 1e-5)
        t = torch.as_tensor(y4, device="cuda")
        del y4
        y5 = nk.fft_conv(ud2, kd, backend="cuda")
        ok("a torch tensor over a result keeps it out of reuse",
           ptr(y5) != p1 and err(t.cpu().numpy(), ref1) < 1e-5)
        del t, y5
        cpool.OUT_POOL_BYTES, saved_b = B * H * L * 4 * 2, cpool.OUT_POOL_BYTES
        try:
            ys = [nk.fft_conv(ud1, kd, backend="cuda") for _ in range(4)]
            held = sum(m.nbytes for e in cpool._local.outs.values() for m, _, _ in e)
            ok("the byte cap bounds the cache", held <= cpool.OUT_POOL_BYTES and all(
                err(y.copy_to_host(), ref1) < 1e-5 for y in ys) and len({ptr(y) for y in ys}) == 4)
        finally:
            cpool.OUT_POOL_BYTES = saved_b
    finally:
        cpool.OUT_POOL = saved
        nk.clear_fft_conv_cache()


def correctness():
    B, H = (1, 2) if SIM else (2, 8)
    sizes = [(7, 3), (5, 9)] if SIM else [(1, 3), (97, 300), (1009, 97), (1024, 1024)]
    dts = (np.float32, bfloat16) if SIM else (np.float32, np.float64, np.float16, bfloat16)
    if QUICK:
        sizes, dts = sizes[-2:], (np.float32, np.float16)
    ola_sizes = [(13, 3)] if SIM else [(5003, 97), (20000, 301)]
    for dt in dts:
        for L, Lk in ola_sizes:
            for mode in ("causal", "same", "full"):
                Lout = L + Lk - 1 if mode == "full" else L
                u = rng.standard_normal((B, H, L)).astype(dt)
                pdt = np.float64 if dt == np.float64 else np.float32
                k = (rng.standard_normal((H, Lk)) / np.sqrt(Lk)).astype(pdt)
                opt = dict(bias=rng.standard_normal(H).astype(pdt), pregate=rng.standard_normal((B, H, L)).astype(dt),
                           postgate=rng.standard_normal((B, H, Lout)).astype(dt))
                y = nk.fft_conv(u, k, mode=mode, backend="cuda", method="overlap_add", **opt)
                report(f"fwd overlap-add {mode} bias+gates L{L} Lk{Lk}", dt, err(y, fft_conv_ref(u, k, mode, **opt)))
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
    from numba_kernels.cuda import fft_conv as cfc

    if not SIM:  # the in-place kernel path (fused kernel off) and the out-of-place one (N >= OOP_MIN_N)
        saved = cfc.FUSED_MAX_N, cfc.USE_LTO
        cfc.FUSED_MAX_N, cfc.USE_LTO = 0, False
        for dt in (np.float32, bfloat16):
            for L, Lk in ((1009, 97), (40000, 300), (30000, 30000)):
                for mode in ("causal", "same", "full"):
                    Lout = L + Lk - 1 if mode == "full" else L
                    u = rng.standard_normal((B, H, L)).astype(dt)
                    k = (rng.standard_normal((H, Lk)) / np.sqrt(Lk)).astype(np.float32)
                    opt = dict(bias=rng.standard_normal(H).astype(np.float32),
                               pregate=rng.standard_normal((B, H, L)).astype(dt),
                               postgate=rng.standard_normal((B, H, Lout)).astype(dt))
                    y = nk.fft_conv(u, k, mode=mode, backend="cuda", **opt)
                    f = lambda a: a.astype(np.float64)  # noqa: E731
                    v = f(u) * f(opt["pregate"])
                    sc = fftconvolve(v, f(k)[None], mode="full" if mode == "causal" else mode, axes=-1)[..., :Lout]
                    sc[..., :L] += f(opt["bias"])[None, :, None] * v[..., :Lout]
                    sc *= f(opt["postgate"])
                    N = fc_size(L, Lk, mode)
                    report(f"fwd kernels ({'out of place' if N >= cfc.OOP_MIN_N else 'in place'}, N {N}) {mode} "
                           f"bias+gates L{L} Lk{Lk}", dt, err(y, sc))
        cfc.FUSED_MAX_N, cfc.USE_LTO = saved
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


def lto_probe():
    """Which cuFFT plan calls work here: a plain plan through cufftCreate + cufftMakePlanMany64, then the R2C
    plan with only the LTO load callback under each naming / plan-API strategy."""
    from numba import cuda

    from numba_kernels.cuda import _fft_conv_lto as lto
    from numba_kernels.cuda import cufft

    info = cuda.device_array(8, np.uint64)
    ptr = info.__cuda_array_interface__["data"][0]
    for api64 in (True, False):
        try:
            cufft.callback_plan(("probe-plain",), 1024, 16, False, False, (), ptr, api64)
            print(f"probe: plain plan, {'64' if api64 else '32'}-bit API: ok", flush=True)
        except Exception as e:
            print(f"probe: plain plan, {'64' if api64 else '32'}-bit API: {e}", flush=True)
    for style, api64 in lto.STRATEGIES:
        good = 0
        for which in (0, 1, 2):
            fwd, inv = lto.ltoir("f32", 1024, 512, 512, 0, 8, False, False, False, (9, 0), style)
            cb = (fwd + inv)[which]
            try:
                cufft.callback_plan(("probe", which, style), 1024, 16, which > 0, False, (cb,), ptr, api64)
                res, good = "ok", good + 1
            except Exception as e:
                res = str(e)
            print(f"probe: {cb[0]} ({style}) alone, {'64' if api64 else '32'}-bit API: {res}", flush=True)
        if good == 3:
            break
    nk.clear_fft_conv_cache()


def lto_checks():
    """The LTO-callback forward directly: fresh inputs, a NaN-poisoned output with a guard tail that must stay
    NaN (cuFFT must only write through the store callback), every mode, gates + bias, four dtypes."""
    import importlib

    from numba import cuda

    from numba_kernels.cuda import _fft_conv_lto as lto
    from numba_kernels.cuda import cufft
    from numba_kernels.cuda import fft_conv as cfc

    fc = importlib.import_module("numba_kernels.fft_conv")
    from numba_kernels.cuda._conv1d_kernels import ELEM, kind_of

    v = cufft.version()
    print(f"cuFFT version {v}; JIT callback entry: {cufft.jit_callback_entry() is not None}", flush=True)
    B, H = 2, 8
    cases = [(np.float32, 1000, 97, "causal"), (np.float32, 1024, 1024, "same"), (np.float64, 300, 301, "full"),
             (np.float16, 4096, 4096, "causal"), (bfloat16, 777, 33, "full"), (np.float32, 65536, 65536, "causal")]
    for ci, (dt, L, Lk, mode) in enumerate(cases):
        for opts in ((True,) if PROBE and ci in (1, 3, 4) else (False,) if PROBE else (False, True)):
            Lout, start, N = fc._check(np.zeros((B, H, L), np.float32), np.zeros((H, Lk), np.float32), mode,
                                       None, None, None, None)[5:8]
            kind = kind_of(dt)
            pdt = np.float64 if dt == np.float64 else np.float32
            u = rng.standard_normal((B, H, L)).astype(dt)
            k = (rng.standard_normal((H, Lk)) / np.sqrt(Lk)).astype(pdt)
            kw = {}
            if opts:
                kw = dict(bias=rng.standard_normal(H).astype(pdt), pregate=rng.standard_normal((B, H, L)).astype(dt),
                          postgate=rng.standard_normal((B, H, Lout)).astype(dt))
            ft = np.float64 if kind == "f64" else np.float32
            el = lambda a: None if a is None else cuda.to_device(np.ascontiguousarray(a).view(ELEM[kind]))  # noqa
            K = cfc._filter_spectrum(k, Lk if mode != "causal" else min(Lk, L), N, ft)
            S = cfc.scratch((B, H, 2 * (N // 2 + 1)), ft)
            n, guard = B * H * Lout, 4096
            poison = np.full(n + guard, np.nan, ELEM[kind]) if kind != "bf16" else np.full(n + guard, 0x7FC0, np.uint16)
            flat = cuda.to_device(poison)
            out = flat[:n].reshape(B, H, Lout)
            t = time.perf_counter()
            ok = lto.forward(kind, el(u), K, S, lambda: out, el(kw.get("pregate")), el(kw.get("postgate")),
                             None if not opts else cuda.to_device(kw["bias"].astype(ft)), N, L, Lout, start)
            ok = ok is not None
            cuda.synchronize()
            tp = time.perf_counter() - t
            name = f"LTO fwd {mode} {'bias+gates' if opts else 'plain'} L{L} Lk{Lk} N{N}"
            if not ok:
                print(f"BAD {name}: callback plans failed: {list(lto.failed.values())[-1]}", flush=True)
                fails.append(name)
                return False
            h = flat.copy_to_host()
            y = h[:n].reshape(B, H, Lout)
            y = y.view(bfloat16) if kind == "bf16" else y
            tail = h[n:]
            tail_ok = bool(np.all(tail == 0x7FC0)) if kind == "bf16" else bool(np.all(np.isnan(tail)))
            e = err(y, fft_conv_ref(u, k, mode, **kw))
            report(name, dt, e if tail_ok else float("inf"), f"(first call {tp:.1f}s, guard {'ok' if tail_ok else 'WRITTEN'})")
    # the output pool must never hand out memory that a live result (or a view of it) still uses
    u1, u2, u3 = (rng.standard_normal((B, H, 512)).astype(np.float32) for _ in range(3))
    k = rng.standard_normal((H, 512)).astype(np.float32)
    y1 = nk.fft_conv(cuda.to_device(u1), k)
    y2 = nk.fft_conv(cuda.to_device(u2), k)
    v1 = y1[1]
    del y1
    y3 = nk.fft_conv(cuda.to_device(u3), k)
    del y3
    y4 = nk.fft_conv(cuda.to_device(u3), k)  # may reuse y3's memory, never y1's (v1 lives) or y2's
    e = max(err(v1.copy_to_host(), fft_conv_ref(u1, k)[1]), err(y2.copy_to_host(), fft_conv_ref(u2, k)),
            err(y4.copy_to_host(), fft_conv_ref(u3, k)))
    report("output pool: live results and views kept", np.float32, e)
    return True


def bench():
    import torch
    from numba import cuda

    def tbench(fn, n=None):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(n or iters):
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
            f"{'dtype':>7} {'B':>3} {'H':>4} {'L':>7} {'Lk':>7} {'path':>14} | {'ours ms':>8} {'GB/s':>6} {'%copy':>5} | "
            f"{'old ms':>8} | {'torch ms':>8} {'ratio':>6} | {'t32 ms':>8} {'ratio':>6} | {'single ms':>9} | "
            f"{'1st s':>5} | max rel diff vs torch"]
    print(rows[0], flush=True)
    tdt = {np.float32: torch.float32, np.float16: torch.float16}
    # (dtype, [(B, H) tried in order], L, Lk); Lk = L is FlashFFTConv's setting
    iters = 5 if PROBE else 10
    cases = [(np.float32, [(64, 768)], 256, 256), (np.float32, [(64, 768)], 512, 512),
             (np.float32, [(64, 768)], 1024, 1024), (np.float32, [(64, 768)], 2048, 2048),
             (np.float32, [(64, 768)], 4096, 4096), (np.float32, [(64, 768)], 8192, 8192),
             (np.float32, [(32, 768)], 16384, 16384), (np.float32, [(16, 768)], 32768, 32768),
             (np.float32, [(16, 768)], 65536, 65536), (np.float32, [(8, 768)], 1 << 17, 1 << 17),
             (np.float32, [(4, 768)], 1 << 18, 1 << 18), (np.float32, [(2, 768)], 1 << 19, 1 << 19),
             (np.float16, [(64, 768)], 256, 256),
             (np.float16, [(64, 768)], 1024, 1024), (np.float16, [(64, 768)], 8192, 8192),
             (np.float32, [(1, 768), (1, 256)], 1 << 20, 1 << 20), (np.float32, [(1, 768), (1, 256)], 1 << 20, 4096),
             (np.float16, [(1, 768), (1, 256)], 1 << 20, 1 << 20)]
    if PROBE:
        cases = cases[:7]
    if os.environ.get("FFT_BENCH_MAXL"):
        cases = [c for c in cases if c[2] <= int(os.environ["FFT_BENCH_MAXL"])]
    from numba_kernels.cuda import _fft_conv_lto as lto
    from numba_kernels.cuda import fft_conv as cfc
    from numba_kernels.cuda.fft_conv import use_overlap_add
    for dt, bhs, L, Lk in cases:
        for b, H in bhs:
            try:
                torch.cuda.empty_cache()
                ut = torch.randn(b, H, L, device="cuda").to(tdt[dt])
                kt = (torch.randn(H, Lk, device="cuda") / Lk ** 0.5).to(tdt[dt])
                ud, kd = cuda.as_cuda_array(ut), cuda.as_cuda_array(kt)
                N = 1 << (L + Lk - 2).bit_length()  # power of two >= L + Lk - 1 (torch half FFTs need one)
                ola = use_overlap_add(L, Lk, N)
                path = f"ola P{ola[0]}" if ola else "fft"
                cfc.USE_LTO, fused_max, cfc.FUSED_MAX_N = False, cfc.FUSED_MAX_N, 0  # "old": the kernel path
                nk.fft_conv(ud, kd, backend="cuda", fft_size=None if ola else N)
                t_old = tbench(lambda: nk.fft_conv(ud, kd, backend="cuda", fft_size=None if ola else N))
                cfc.USE_LTO, cfc.FUSED_MAX_N = "auto", fused_max  # "ours": the defaults
                fused = not ola and cfc.fused_size(N, True, "f32") > 0
                t0 = time.perf_counter()
                out = nk.fft_conv(ud, kd, backend="cuda", fft_size=None if ola else N)  # compile, plan, spectrum
                torch.cuda.synchronize()
                t_first = time.perf_counter() - t0
                t_ours = tbench(lambda: nk.fft_conv(ud, kd, backend="cuda", fft_size=None if ola else N))
                t_single = tbench(lambda: nk.fft_conv(ud, kd, backend="cuda", fft_size=N)) if ola else float("nan")
                ours = torch.as_tensor(out, device="cuda").float()
                del out
                kf = torch.fft.rfft(kt, n=N)  # the peer caches k's transform too

                def peer():
                    return torch.fft.irfft(torch.fft.rfft(ut, n=N) * kf, n=N)[..., :L]

                t_peer = tbench(peer)
                t_peer32 = float("nan")
                if dt == np.float16:  # torch's half FFT overflows at L >= 8192: the fair peer upcasts
                    kf32 = torch.fft.rfft(kt.float(), n=N)

                    def peer():
                        return torch.fft.irfft(torch.fft.rfft(ut.float(), n=N) * kf32, n=N)[..., :L].half()

                    t_peer32 = tbench(peer)
                ref = peer().float()
                diff = float((ours - ref).abs().max() / ref.abs().max())
                del ref, ours
                nbytes = 2 * b * H * L * np.dtype(dt).itemsize
                gbs = nbytes / t_ours / 1e9
                lto_on = not lto.failed and not fused and N >= cfc.LTO_MIN_N
                if lto.failed:
                    print("LTO failed:", list(lto.failed.values())[-1][:300], flush=True)
                rows.append(f"{np.dtype(dt).name:>7} {b:>3} {H:>4} {L:>7} {Lk:>7} {path + ('+lto' if lto_on and not ola else '') + ('-fused' if fused else ''):>14} | "
                            f"{t_ours * 1e3:8.3f} {gbs:6.0f} {100 * gbs / copy_bw:5.1f} | {t_old * 1e3:8.3f} | "
                            f"{t_peer * 1e3:8.3f} {t_peer / t_ours:6.2f} | {t_peer32 * 1e3:8.3f} {t_peer32 / t_ours:6.2f} | "
                            f"{t_single * 1e3:9.3f} | {t_first:5.2f} | {diff:.1e}")
                print(rows[-1], flush=True)
                nk.clear_fft_conv_cache()
                del ut, kt, ud, kd, kf
                break
            except Exception as ex:  # out of memory (torch or numba): try a smaller batch
                print(f"{np.dtype(dt).name} B{b} H{H} L{L}: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                nk.clear_fft_conv_cache()
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    print(f"numba_kernels from {os.path.dirname(nk.__file__)}; simulator={SIM}", flush=True)
    if BENCH:
        rows = bench()
    elif PROBE:  # short slot: the timing table (with its diff column) first, then the guarded LTO checks
        lto_probe()
        rows = bench()
        lto_checks()
    else:
        if not SIM:
            lto_checks()
            pool_checks()
        correctness()
        rows = [] if SIM else bench()
    print("\n==== summary ====")
    for r in rows:
        print(r)
    print("correctness:", "all ok" if not fails else f"FAILED {fails}")
    sys.exit(1 if fails else 0)
