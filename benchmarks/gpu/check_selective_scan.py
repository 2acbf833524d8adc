"""On the GPU machine: correctness of the CUDA selective_scan forward, selective_scan_backward and
selective_state_update (every option, B / C form and dtype) against the float64 reference on small shapes,
then forward-scan bandwidth next to a same-run device copy and the SFU (exp) floor, a tile sweep, and the
backward's time. Prints a table last.

``--sim``: correctness only, tiny shapes, under the CUDA simulator (no GPU needed).
``--quick``: fewer correctness cases (dtypes x B / C forms), for a short device session."""
import os
import sys
import time

SIM = "--sim" in sys.argv
if SIM:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Checks, import_library, tbench  # noqa: E402

nk = import_library()
from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.reference.selective_scan import selective_scan_backward_ref, selective_scan_ref  # noqa: E402

QUICK = "--quick" in sys.argv

rng = np.random.default_rng(int(time.time()))
CHECKS = Checks(width=40)
err, report, fails = CHECKS.err, CHECKS.report, CHECKS.fails


def bc(form, dt, B, Dm, N, L, G):
    if form == "const":
        return rng.standard_normal((Dm, N)).astype(np.float32)
    if form == "BNL":
        return rng.standard_normal((B, N, L)).astype(dt)
    return rng.standard_normal((B, G, N, L)).astype(dt)


def inputs(dt, B, Dm, L, N, G, bform, cform):
    return dict(u=rng.standard_normal((B, Dm, L)).astype(dt), delta=(0.5 * rng.standard_normal((B, Dm, L))).astype(dt),
                A=-np.exp(0.5 * rng.standard_normal((Dm, N))).astype(np.float32),
                B=bc(bform, dt, B, Dm, N, L, G), C=bc(cform, dt, B, Dm, N, L, G),
                D=rng.standard_normal(Dm).astype(np.float32), z=rng.standard_normal((B, Dm, L)).astype(dt),
                delta_bias=(0.5 * rng.standard_normal(Dm)).astype(np.float32),
                initial_state=rng.standard_normal((B, Dm, N)).astype(np.float32),
                seq_idx=np.sort(rng.integers(0, 3, size=(B, L)), axis=1).astype(np.int32))


def backward_checks(shape=None, cases=None):
    """selective_scan_backward on the GPU against the float64 reference: every gradient, all options on (with
    dlast_state), each dtype; B / C forms (time-varying grouped and BNL, time-invariant) and options off."""
    B, Dm, L, N, G = shape or ((1, 6, 7, 3, 2) if SIM else (2, 64, 150, 16, 2))
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinit")
    if cases is None:
        cases = [(dt, "grouped", "BNL", "all") for dt in ((np.float32, bfloat16) if SIM else
                                                            (np.float32, np.float16, bfloat16, np.float64))]
        cases += [(np.float32, "const", "grouped", "all"), (np.float32, "BNL", "const", "plain")]
    for dt, bform, cform, opt in cases:
        kw = inputs(dt, B, Dm, L, N, G, bform, cform)
        if dt == np.float64:  # parameters in float64 too, so every gradient is judged at float64
            kw = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in kw.items()}
        if opt == "plain":
            for name in ("D", "z", "delta_bias", "initial_state", "seq_idx"):
                kw[name] = None
            kw["delta"] = np.abs(kw["delta"])
        dout = rng.standard_normal(kw["u"].shape).astype(dt)
        dlast = rng.standard_normal((B, Dm, N)).astype(np.float32) if opt == "all" else None
        t = time.perf_counter()
        got = nk.selective_scan_backward(dout, **kw, delta_softplus=opt == "all", dlast_state=dlast, backend="cuda")
        tc = time.perf_counter() - t
        ref = selective_scan_backward_ref(dout, **kw, delta_softplus=opt == "all", dlast_state=dlast)
        worst, e = "", 0.0
        for n, g, r in zip(names, got, ref):
            if (g is None) != (r is None):
                worst, e = f"{n} missing", np.inf
            elif g is not None and err(g, r) > e:
                worst, e = n, err(g, r)
        report(f"backward {opt} B:{bform} C:{cform} (B{B} Dm{Dm} L{L} N{N} G{G})", dt, e,
               f"(worst {worst}; {tc:.1f}s incl. compile)")


def correctness():
    B, Dm, L, N, G = (1, 6, 7, 3, 2) if SIM else (2, 96, 300, 16, 2)
    forms = [("grouped", "BNL"), ("const", "grouped")] if SIM else [("BNL", "BNL"), ("grouped", "grouped"),
                                                                      ("const", "const"), ("const", "grouped")]
    for dt in (np.float32, np.float16, bfloat16) + (() if SIM else (np.float64,)):
        for bform, cform in forms:
            if QUICK and dt != np.float32 and (bform, cform) == ("const", "const"):
                continue
            kw = inputs(dt, B, Dm, L, N, G, bform, cform)
            for opt in ("plain", "all"):
                k = dict(kw)
                if opt == "plain":  # no softplus: keep delta > 0 (as mamba's tests do) so the state decays
                    for name in ("D", "z", "delta_bias", "initial_state", "seq_idx"):
                        k[name] = None
                    k["delta"] = np.abs(k["delta"])
                t = time.perf_counter()
                y, last = nk.selective_scan(**k, delta_softplus=opt == "all", return_last_state=True, backend="cuda")
                tc = time.perf_counter() - t
                yr, lr = selective_scan_ref(**k, delta_softplus=opt == "all", return_last_state=True)
                report(f"scan {opt} B:{bform} C:{cform}", dt, max(err(y, yr), err(last, lr)),
                       f"({tc:.1f}s incl. compile)")
        # decode steps == the scan (multi-head layout, fp32 state pool with state_batch_indices)
        H = G * 3
        P = Dm // H
        kw = inputs(dt, B, H * P, min(L, 8), N, G, "grouped", "grouped")
        y, last = nk.selective_scan(**dict(kw, seq_idx=None), delta_softplus=True, return_last_state=True,
                                    backend="cuda")
        pool = np.zeros((B + 2, H, P, N), np.float64 if dt == np.float64 else np.float32)
        sbi = (np.arange(B, dtype=np.int32) * 2 + 1)[::-1].copy()
        pool[sbi] = kw["initial_state"].reshape(B, H, P, N)
        steps = []
        for t in range(kw["u"].shape[2]):
            def tok(a):
                return np.ascontiguousarray(a[:, :, t]).reshape(B, H, P)
            steps.append(nk.selective_state_update(
                pool, tok(kw["u"]), tok(kw["delta"]), kw["A"].reshape(H, P, N),
                np.ascontiguousarray(kw["B"][..., t]), np.ascontiguousarray(kw["C"][..., t]), kw["D"].reshape(H, P),
                tok(kw["z"]), kw["delta_bias"].reshape(H, P), True, sbi, backend="cuda").reshape(B, H * P))
        e = err(np.stack(steps, axis=2), y.astype(np.float64))
        e = max(e, err(pool[sbi].reshape(B, H * P, N), last))
        report(f"update x{len(steps)} == scan (H{H} P{P} G{G})", dt, e)
    backward_checks()
    from numba import cuda
    kw = inputs(np.float32, B, Dm, L, N, G, "BNL", "BNL")
    y = nk.selective_scan(**{k: cuda.to_device(v) for k, v in kw.items()})
    ok = hasattr(y, "copy_to_host")
    print(f"{'ok ' if ok else 'BAD'} device in -> device out ({type(y).__name__})")
    if not ok:
        fails.append("device out")


def micro_floors(copy_bw):
    """Measured ceilings: ex2 (SFU) and FFMA rates from register-only numba kernels, and the device's numbers."""
    from numba import cuda, float32

    from numba_kernels.cuda import _intrinsics as intr

    @cuda.jit
    def ex2_rate(out, n):
        x0 = float32(cuda.threadIdx.x) * float32(-1e-6)
        a0, a1, a2, a3, a4, a5, a6, a7 = x0, x0 - 1, x0 - 2, x0 - 3, x0 - 4, x0 - 5, x0 - 6, x0 - 7
        for _ in range(n):
            a0 = intr.ex2(a0) - 1.5
            a1 = intr.ex2(a1) - 1.5
            a2 = intr.ex2(a2) - 1.5
            a3 = intr.ex2(a3) - 1.5
            a4 = intr.ex2(a4) - 1.5
            a5 = intr.ex2(a5) - 1.5
            a6 = intr.ex2(a6) - 1.5
            a7 = intr.ex2(a7) - 1.5
        out[cuda.grid(1)] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7

    @cuda.jit
    def fma_rate(out, n):
        x = float32(cuda.threadIdx.x) * float32(1e-6)
        a0, a1, a2, a3, a4, a5, a6, a7 = x, x + 1, x + 2, x + 3, x + 4, x + 5, x + 6, x + 7
        m = float32(0.999)
        for _ in range(n):
            a0 = a0 * m + x
            a1 = a1 * m + x
            a2 = a2 * m + x
            a3 = a3 * m + x
            a4 = a4 * m + x
            a5 = a5 * m + x
            a6 = a6 * m + x
            a7 = a7 * m + x
        out[cuda.grid(1)] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7

    dev = cuda.get_current_device()
    sms = dev.MULTIPROCESSOR_COUNT
    nb, nt, n = sms * 8, 256, 4096
    out = cuda.device_array(nb * nt, np.float32)
    t_ex2 = tbench(lambda: ex2_rate[nb, nt](out, n), 5)
    t_fma = tbench(lambda: fma_rate[nb, nt](out, n), 5)
    ex2 = nb * nt * n * 8 / t_ex2  # plus one FADD each (FMA pipe, not the SFU)
    fma = nb * nt * n * 8 / t_fma
    return ex2, fma


def gpu_time(fn, n=10):
    """Seconds per call of fn with the host's launch cost hidden: the GPU sleeps while the n calls are queued."""
    import torch

    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(4e7))  # ~20 ms at 2 GHz: longer than queueing n calls
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3 / n


def host_time(fn, n=20):
    """Host seconds per call (no synchronization inside the loop)."""
    import torch

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return dt


def sweep():
    """``--sweep``: poly-exp / gate variants (bf16 B8 Dm1536 N16 L8192 z), each checked on a small shape, timed
    twice in interleaved rounds; then the host cost of a bare launch."""
    import torch
    from numba import cuda

    from numba_kernels.cuda import _scan_fwd_kernel as fk
    from numba_kernels.cuda import selective_scan as css

    B, Dm, N, L = 8, 1536, 16, 8192
    x = torch.randn(2 ** 30 // 4, device="cuda")
    yy = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 4 / tbench(lambda: yy.copy_(x), 10) / 1e9
    del x, yy
    rows = [f"device copy (torch, 1 GiB): {copy_bw:.0f} GB/s"]

    def dv(t):
        return cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16)

    A = cuda.as_cuda_array(-torch.rand(Dm, N, device="cuda") - 0.5)
    D = cuda.as_cuda_array(torch.randn(Dm, device="cuda"))
    dbias = cuda.as_cuda_array(torch.randn(Dm, device="cuda") * 0.5)
    ud, dd, zd, yd = (dv(torch.randn(B, Dm, L, device="cuda", dtype=torch.bfloat16)) for _ in range(4))
    Bd, Cd = (dv(torch.randn(B, 1, N, L, device="cuda", dtype=torch.bfloat16)) for _ in range(2))
    nb = 4 * B * Dm * L * 2 + 2 * B * N * L * 2
    variants = [dict(pm=0), dict(pm=8), dict(pm=4), dict(pm=2), dict(pm=4, fg=True), dict(pm=1)]
    res = {str(v): [] for v in variants}
    for rnd in range(2):
        for kw in variants:
            if rnd == 0:
                k = inputs(bfloat16, 2, 96, 301, N, 2, "grouped", "const")
                d_ = {kk: (cuda.to_device(v.view(np.uint16)) if v.dtype == bfloat16 else cuda.to_device(v))
                      for kk, v in k.items()}
                y, last = css.scan_fwd_cuda(d_["u"], d_["delta"], d_["A"], d_["B"], d_["C"], d_["D"], d_["z"],
                                            d_["delta_bias"], d_["initial_state"], d_["seq_idx"], True, True,
                                            bfloat16, **kw)
                yr, lr = selective_scan_ref(**k, delta_softplus=True, return_last_state=True)
                report(f"variant {kw} all options", bfloat16,
                       max(err(y.copy_to_host().view(bfloat16), yr), err(last.copy_to_host(), lr)))
            res[str(kw)].append(gpu_time(lambda: css.scan_fwd_cuda(ud, dd, A, Bd, Cd, D, zd, dbias, None, None, True,
                                                                   False, bfloat16, out=yd, **kw)))
    for kw in variants:
        t = res[str(kw)]
        rows.append(f"sweep bf16 L{L} z {str(kw):22s}: GPU {t[0] * 1e6:7.1f} / {t[1] * 1e6:7.1f} us = "
                    f"{nb / min(t) / 1e9:5.0f} GB/s ({100 * nb / min(t) / 1e9 / copy_bw:3.0f}% of copy)")
    NC, Q, TL = fk.config(N, "bf16")
    kern = fk.make_kernel("bf16", N, NC, Q, TL, True, True, False, css.FWD_PM.get("bf16", 0), css.FWD_FG)
    _, smem = fk.layout("bf16", N, NC, Q, TL, True, True, False)
    blk = css.blocks_dev(Dm, 1, 1, NC)
    e0 = css._none((0, 0, 0), np.float32)
    args = (ud, dd, zd, yd, Bd, Cd, A, css._none((0, 0), np.float32), css._none((0, 0), np.float32), D, dbias, e0,
            css._none((0, 0), np.int32), e0, blk, np.int32(1), np.int64(Dm), np.int64(L), np.int64(L), np.int64(1),
            np.int64(1))
    css.fl.launch(kern, (blk.shape[0], B), NC * Q, smem, args)
    compiled = next(iter(kern.overloads.values()))

    def empty_k(u, delta, z, y, bv, cv, A_, bc, cc, Dv, db, init, seq, last, blk_, sp, Dm_, L_, Lp, GB, GC):
        pass

    ek = cuda.jit(empty_k)
    st = cuda.default_stream()
    for name, fn in (("kernel[grid, block](*args) (dispatcher)", lambda: kern[(blk.shape[0], B), NC * Q, 0, smem](*args)),
                     ("compiled.launch(args) (no dispatch)",
                      lambda: compiled.launch(args, (blk.shape[0], B, 1), (NC * Q, 1, 1), st, smem)),
                     ("empty kernel, same 21 args", lambda: ek[(blk.shape[0], B), NC * Q, 0, 0](*args))):
        try:
            rows.append(f"fixed cost: {name:42s} host {host_time(fn) * 1e6:7.1f} us/call")
        except Exception as exc:
            rows.append(f"fixed cost: {name}: FAILED {type(exc).__name__}: {exc}")
    return rows


def bench():
    import torch
    from numba import cuda

    from numba_kernels.cuda import _scan_fwd_kernel as fk
    from numba_kernels.cuda import selective_scan as css

    x = torch.randn(2 ** 30 // 4, device="cuda")
    yy = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 4 / tbench(lambda: yy.copy_(x), 10) / 1e9
    del x, yy
    dev = cuda.get_current_device()
    sms = dev.MULTIPROCESSOR_COUNT
    clk = dev.CLOCK_RATE * 1e3
    ex2_rate, fma_rate = micro_floors(copy_bw)
    rows = [f"{dev.name.decode() if isinstance(dev.name, bytes) else dev.name}: {sms} SMs, {clk / 1e9:.2f} GHz; "
            f"device copy (torch, 1 GiB): {copy_bw:.0f} GB/s (read + write); measured ex2 {ex2_rate / 1e12:.2f} T/s "
            f"(16/clk/SM would be {sms * 16 * clk / 1e12:.2f}), FFMA {fma_rate / 1e12:.1f} T/s "
            f"(128/clk/SM would be {sms * 128 * clk / 1e12:.1f})"]
    print(rows[0], flush=True)
    B, Dm, N = 8, 1536, 16
    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}

    def devarr(t, name):  # torch tensor -> numba device array in the kernel element type (bf16: uint16 bits)
        return cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16) if name == "bf16" else cuda.as_cuda_array(t)

    A = cuda.as_cuda_array(-torch.rand(Dm, N, device="cuda") - 0.5)
    D = cuda.as_cuda_array(torch.randn(Dm, device="cuda"))
    dbias = cuda.as_cuda_array(torch.randn(Dm, device="cuda") * 0.5)

    def floors(name, L, with_z):
        isz = 2 if name == "bf16" else 4
        nb = (4 if with_z else 3) * B * Dm * L * isz + 2 * B * N * L * isz
        ex = B * Dm * L * N
        sfu_other = B * Dm * L * (4 if with_z else 2)  # softplus ex2 + lg2, silu ex2 + rcp per element
        return nb, nb / copy_bw / 1e9, ex / ex2_rate, (ex + sfu_other) / ex2_rate, 4 * ex / fma_rate

    def tensors(name, L):
        u, delta, z = (torch.randn(B, Dm, L, device="cuda", dtype=tdt[name]) for _ in range(3))
        Bt, Ct = (torch.randn(B, 1, N, L, device="cuda", dtype=tdt[name]) for _ in range(2))
        yt = torch.empty_like(u)
        return [devarr(t, name) for t in (u, delta, z, Bt, Ct, yt)]

    def fwd(ts, name, with_z, kw, v1=False):
        ud, dd, zd, Bd, Cd, yd = ts
        dt = bfloat16 if name == "bf16" else np.dtype(np.float32)
        f = css.scan_fwd_cuda_v1 if v1 else css.scan_fwd_cuda
        return lambda: f(ud, dd, A, Bd, Cd, D, zd if with_z else None, dbias, None, None, True, False, dt, out=yd, **kw)

    # ---- variants: correctness (small shape, all options, float64 reference) and bf16 L 8192 z time ----
    variants = [dict(pm=0), dict(), dict(fg=True), dict(pm=16), dict(pm=8, fg=True), dict(q=8), dict(tl=16)]
    L = 8192
    ts = tensors("bf16", L)
    nb, t_copy, t_exp, t_sfu, t_fma = floors("bf16", L, True)
    rows.append(f"floors bf16 B{B} Dm{Dm} N{N} L{L} z: bytes {nb / 1e9:.2f} GB -> {t_copy * 1e6:.0f} us at copy; "
                f"exps {t_exp * 1e6:.0f} us (+softplus/silu SFU ops: {t_sfu * 1e6:.0f} us); 4 FFMA/state "
                f"{t_fma * 1e6:.0f} us")
    print(rows[-1], flush=True)
    for kw in [None] + variants:
        label = "v1 (previous kernel)" if kw is None else ("default " if not kw else "") + str(kw)
        try:
            ok = ""
            if kw is not None:  # correctness of this variant: every option, grouped B / time-invariant C
                e = 0.0
                for dtc, Lc in ((bfloat16, 301), (np.float32, 304))[:1 if kw else 2]:  # padded / direct rows
                    k = inputs(dtc, 2, 96, Lc, N, 2, "grouped", "const")
                    dd_ = {kk: (cuda.to_device(v.view(np.uint16)) if v.dtype == bfloat16 else cuda.to_device(v))
                           for kk, v in k.items()}
                    y, last = css.scan_fwd_cuda(dd_["u"], dd_["delta"], dd_["A"], dd_["B"], dd_["C"], dd_["D"],
                                                dd_["z"], dd_["delta_bias"], dd_["initial_state"], dd_["seq_idx"],
                                                True, True, dtc, **kw)
                    yh = y.copy_to_host()
                    yh = yh.view(bfloat16) if dtc == bfloat16 else yh
                    yr, lr = selective_scan_ref(**k, delta_softplus=True, return_last_state=True)
                    ev = max(err(yh, yr), err(last.copy_to_host(), lr))
                    report(f"variant {kw} all options", dtc, ev)
                    e = max(e, ev)
                ok = f" [check err {e:.1e}]"
            t = gpu_time(fwd(ts, "bf16", True, kw or {}, v1=kw is None))
            rows.append(f"sweep bf16 L{L} z {label:34s}: GPU {t * 1e6:7.1f} us = {nb / t / 1e9:5.0f} GB/s "
                        f"({100 * t_copy / t:3.0f}% of copy, {100 * t_exp / t:3.0f}% of exp floor){ok}")
        except Exception as exc:
            rows.append(f"sweep {label}: FAILED {type(exc).__name__}: {exc}")
        print(rows[-1], flush=True)
    # ---- fixed cost per call: host time of the public call / scan_fwd_cuda / kernel launch / empty kernel ----
    try:
        ud, dd, zd, Bd, Cd, yd = ts
        kind, NC, Q, TL = "bf16", *fk.config(N, "bf16")
        kern = fk.make_kernel(kind, N, NC, Q, TL, True, True, False, css.FWD_PM.get(kind, 0), css.FWD_FG)
        _, smem = fk.layout(kind, N, NC, Q, TL, True, True, False)
        blk = css.blocks_dev(Dm, 1, 1, NC)
        e0 = css._none((0, 0, 0), np.float32)
        args = (ud, dd, zd, yd, Bd.reshape(B, 1, N, L), Cd.reshape(B, 1, N, L), A, css._none((0, 0), np.float32),
                css._none((0, 0), np.float32), D, dbias, e0, css._none((0, 0), np.int32), e0, blk, np.int32(1),
                np.int64(Dm), np.int64(L), np.int64(L), np.int64(1), np.int64(1))
        css.fl.launch(kern, (blk.shape[0], B), NC * Q, smem, args)
        compiled = next(iter(kern.overloads.values()))

        def empty_k(u, delta, z, y, bv, cv, A_, bc, cc, Dv, db, init, seq, last, blk_, sp, Dm_, L_, Lp, GB, GC):
            pass

        ek = cuda.jit(empty_k)
        uh, dh, zh, Bh, Ch = (cuda.as_cuda_array(torch.randn(*sh, device="cuda"))
                              for sh in ((B, Dm, 2048), (B, Dm, 2048), (B, Dm, 2048), (B, 1, N, 2048), (B, 1, N, 2048)))

        def public():  # fp32 device arrays in -> device out (the public call takes no uint16 bf16 views)
            return nk.selective_scan(uh, dh, A, Bh, Ch, D, zh, dbias, True)

        costs = [("public selective_scan (fp32 L2048 device)", public),
                 ("scan_fwd_cuda (out given)", fwd(ts, "bf16", True, {})),
                 ("kernel[grid, block](*args) (dispatcher)", lambda: kern[(blk.shape[0], B), NC * Q, 0, smem](*args)),
                 ("compiled.launch(args) (no dispatch)",
                  lambda: compiled.launch(args, (blk.shape[0], B, 1), (NC * Q, 1, 1), cuda.default_stream(), smem)),
                 ("empty kernel, same 21 args", lambda: ek[(blk.shape[0], B), NC * Q, 0, 0](*args))]
        for name, fn in costs:
            rows.append(f"fixed cost: {name:42s} host {host_time(fn) * 1e6:7.1f} us/call, GPU {gpu_time(fn) * 1e6:7.1f} us")
            print(rows[-1], flush=True)
    except Exception as exc:
        rows.append(f"fixed cost: FAILED {type(exc).__name__}: {exc}")
        print(rows[-1], flush=True)
    # ---- the shipped configuration at every size: GPU time (host hidden) and the call between events ----
    for name, Ls in (("bf16", (2048, 8192, 16384)), ("fp32", (2048, 8192))):
        for L in Ls:
            ts = tensors(name, L)
            for with_z in (True, False):
                try:
                    nb, t_copy, t_exp, t_sfu, _ = floors(name, L, with_z)
                    t = gpu_time(fwd(ts, name, with_z, {}))
                    tc = tbench(fwd(ts, name, with_z, {}))
                    rows.append(f"scan {name} B{B} Dm{Dm} N{N} L{L:5d} {'z' if with_z else 'no z':4s}: GPU {t * 1e6:7.1f} us "
                                f"{nb / t / 1e9:5.0f} GB/s ({100 * t_copy / t:3.0f}% of copy; exp floor "
                                f"{100 * t_exp / t:3.0f}%, SFU-ops floor {100 * t_sfu / t:3.0f}%); call {tc * 1e6:7.1f} us "
                                f"({100 * t_copy / tc:3.0f}% of copy)")
                except Exception as exc:
                    rows.append(f"scan {name} L{L} z={with_z}: FAILED {type(exc).__name__}: {exc}")
                print(rows[-1], flush=True)
            del ts
    cfg = fk.config(N, "bf16")
    k = fk.make_kernel("bf16", N, *cfg, True, True, False, css.FWD_PM.get("bf16", 0), css.FWD_FG)
    try:
        rows.append(f"     kernel bf16 (NC, Q, TL) {cfg}: regs/thread {list(k.get_regs_per_thread().values())}, "
                    f"local bytes/thread {list(k.get_local_mem_per_thread().values())}, "
                    f"smem {fk.layout('bf16', N, *cfg, True, True, False)[1]} B")
    except Exception as exc:
        rows.append(f"     no register info ({exc})")
    # backward (public call: includes the partial sums and allocations), bf16, z, grads of everything
    try:
        L = 2048
        u, delta, z, Bt, Ct = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in
                               ((B, Dm, L), (B, Dm, L), (B, Dm, L), (B, 1, N, L), (B, 1, N, L)))
        dout = torch.randn_like(u)
        from numba_kernels.cuda.selective_scan_backward import scan_bwd_cuda

        args = [devarr(t, "bf16") for t in (dout, u, delta)]
        Bd, Cd, zd = (devarr(t, "bf16") for t in (Bt, Ct, z))
        t = tbench(lambda: scan_bwd_cuda(*args, A, Bd, Cd, D, zd, dbias, None, None, None, True, 1, 1, bfloat16), 3)
        nb = 7 * B * Dm * L * 2 + 4 * B * N * L * 2
        rows.append(f"backward bf16 B{B} Dm{Dm} N{N} L{L} z: {t * 1e3:.2f} ms, {nb / t / 1e9:.0f} GB/s "
                    f"({100 * nb / t / 1e9 / copy_bw:.0f}% of copy; bytes = dout, u, delta, z, B, C in, "
                    f"du, ddelta, dz, dB, dC out)")
    except Exception as exc:
        rows.append(f"backward timing FAILED {type(exc).__name__}: {exc}")
    print(rows[-1], flush=True)
    try:  # mamba-ssm peer, if installed
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401

        rows.append("mamba-ssm: installed (not timed here)")
    except Exception as exc:
        rows.append(f"mamba-ssm: not available ({type(exc).__name__})")
    return rows


if __name__ == "__main__":
    print(f"numba_kernels from {os.path.dirname(nk.__file__)}; simulator={SIM}", flush=True)
    t0 = time.perf_counter()
    if "--bwd" in sys.argv:  # the backward's checks only, plus odd shapes (N 5: one lane per channel; 20-channel
        backward_checks()      # blocks; L 77: a partial chunk)
        backward_checks((2, 40, 77, 5, 2), [(np.float32, "grouped", "grouped", "all"), (bfloat16, "BNL", "BNL", "all")])
        backward_checks((1, 96, 1, 8, 3), [(np.float32, "grouped", "const", "all")])
        print("correctness:", "all ok" if not fails else f"FAILED {fails}")
        sys.exit(1 if fails else 0)
    if "--sweep" in sys.argv:
        rows = sweep()
        print("\n==== summary ====")
        for r in rows:
            print(r)
        print("correctness:", "all ok" if not fails else f"FAILED {fails}")
        sys.exit(1 if fails else 0)
    correctness()
    print(f"correctness took {time.perf_counter() - t0:.0f}s", flush=True)
    rows = [] if SIM else bench()
    print("\n==== summary ====")
    for r in rows:
        print(r)
    print("correctness:", "all ok" if not fails else f"FAILED {fails}")
    sys.exit(1 if fails else 0)
