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


def backward_checks():
    """selective_scan_backward on the GPU against the float64 reference: every gradient, all options on (with
    dlast_state), each dtype; B / C forms (time-varying grouped and BNL, time-invariant) and options off."""
    B, Dm, L, N, G = (1, 6, 7, 3, 2) if SIM else (2, 64, 150, 16, 2)
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinit")
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
        report(f"backward {opt} B:{bform} C:{cform}", dt, e, f"(worst {worst}; {tc:.1f}s incl. compile)")


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


def bench():
    import torch
    from numba import cuda

    from numba_kernels.cuda import selective_scan as css

    x = torch.randn(2 ** 30 // 4, device="cuda")
    yy = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 4 / tbench(lambda: yy.copy_(x), 10) / 1e9
    dev = cuda.get_current_device()
    sms = dev.MULTIPROCESSOR_COUNT
    clk = dev.CLOCK_RATE * 1e3  # Hz (boost clock reported by the driver)
    sfu = sms * 16 * clk  # ex2 per second: 16 per clock per SM (CUDA guide, cc 9.0)
    rows = [f"{dev.name.decode() if isinstance(dev.name, bytes) else dev.name}: {sms} SMs, {clk / 1e9:.2f} GHz; "
            f"device copy (torch, 1 GiB): {copy_bw:.0f} GB/s (read + write); SFU ex2 peak {sfu / 1e12:.2f} T/s"]
    print(rows[0], flush=True)
    B, Dm, N = 8, 1536, 16
    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}

    def devarr(t, name):  # torch tensor -> numba device array in the kernel element type (bf16: uint16 bits)
        return cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16) if name == "bf16" else cuda.as_cuda_array(t)

    A = cuda.as_cuda_array(-torch.rand(Dm, N, device="cuda") - 0.5)
    D = cuda.as_cuda_array(torch.randn(Dm, device="cuda"))
    dbias = cuda.as_cuda_array(torch.randn(Dm, device="cuda") * 0.5)
    Aconst = cuda.as_cuda_array(torch.randn(Dm, N, device="cuda"))

    def run(name, L, with_z, sweep=(None, None), const_bc=False, label=""):
        dt = bfloat16 if name == "bf16" else np.dtype(np.float32)
        isz = np.dtype(dt).itemsize
        u, delta, z = (torch.randn(B, Dm, L, device="cuda", dtype=tdt[name]) for _ in range(3))
        Bt, Ct = (torch.randn(B, 1, N, L, device="cuda", dtype=tdt[name]) for _ in range(2))
        yt = torch.empty_like(u)
        ud, dd, zd, Bd, Cd, yd = (devarr(t, name) for t in (u, delta, z, Bt, Ct, yt))
        if const_bc:
            Bd = Cd = Aconst
        nb = (4 if with_z else 3) * B * Dm * L * isz + (0 if const_bc else 2 * B * N * L * isz)
        q, tl = sweep
        t = tbench(lambda: css.scan_fwd_cuda(ud, dd, A, Bd, Cd, D, zd if with_z else None, dbias, None, None, True,
                                             False, dt, out=yd, q=q, tl=tl))
        NC, Q, TL, U = css.fwd_config(N, css.kind_of(dt), q, tl)
        exps = B * Dm * L * N / t
        rows.append(f"scan {name} B{B} Dm{Dm} N{N} L{L:5d} {'z' if with_z else 'no z':4s} Q{Q} TL{TL}"
                    f"{' B/C (Dm,N)' if const_bc else ''}{label}: {nb / t / 1e9:6.0f} GB/s "
                    f"({100 * nb / t / 1e9 / copy_bw:3.0f}% of copy) {t * 1e6:8.1f} us; "
                    f"exp {exps / 1e12:.2f} T/s = {100 * exps / sfu:3.0f}% of SFU peak")
        print(rows[-1], flush=True)
        return u, delta, z, Bt, Ct

    for name, Ls in (("bf16", (2048, 8192, 16384)), ("fp32", (2048, 8192))):
        for L in Ls:
            for with_z in (True, False):
                try:
                    run(name, L, with_z)
                except Exception as exc:  # keep timing the rest
                    rows.append(f"scan {name} L{L} z={with_z}: FAILED {type(exc).__name__}: {exc}")
                    print(rows[-1], flush=True)
    # sweep: lanes per channel Q and time tile TL (bf16, L 8192, z); time-invariant B / C
    for sw in ((1, 32), (2, 32), (8, 32), (4, 64), (2, 64)):
        try:
            run("bf16", 8192, True, sweep=sw, label=" [sweep]")
        except Exception as exc:
            rows.append(f"sweep {sw}: FAILED {type(exc).__name__}: {exc}")
    try:
        run("bf16", 8192, True, const_bc=True, label=" [no B/C tiles]")
    except Exception as exc:
        rows.append(f"const B/C: FAILED {type(exc).__name__}: {exc}")
    for qq in (1, 2, 4, 8):
        cfg = css.fwd_config(N, "bf16", qq)
        k = css.make_scan_kernel("bf16", N, *cfg, True, True, False)
        try:
            rows.append(f"     scan kernel bf16 (NC, Q, TL, U) {cfg}: regs/thread {list(k.get_regs_per_thread().values())},"
                        f" local bytes/thread {list(k.get_local_mem_per_thread().values())}")
        except Exception as exc:  # introspection API differs between numba-cuda versions
            rows.append(f"     scan kernel bf16 {cfg}: no register info ({exc})")
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
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        L = 8192
        u, delta, z, Bt, Ct = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in
                               ((B, Dm, L), (B, Dm, L), (B, Dm, L), (B, 1, N, L), (B, 1, N, L)))
        At = -torch.rand(Dm, N, device="cuda") - 0.5
        Dt, bt = torch.randn(Dm, device="cuda"), torch.randn(Dm, device="cuda")
        t = tbench(lambda: selective_scan_fn(u, delta, At, Bt, Ct, Dt, z, bt, True))
        rows.append(f"mamba-ssm selective_scan_fn bf16 L{L} z: {t * 1e6:.1f} us")
    except Exception as exc:
        rows.append(f"mamba-ssm: not available ({type(exc).__name__})")
    print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    print(f"numba_kernels from {os.path.dirname(nk.__file__)}; simulator={SIM}", flush=True)
    t0 = time.perf_counter()
    correctness()
    print(f"correctness took {time.perf_counter() - t0:.0f}s", flush=True)
    rows = [] if SIM else bench()
    print("\n==== summary ====")
    for r in rows:
        print(r)
    print("correctness:", "all ok" if not fails else f"FAILED {fails}")
    sys.exit(1 if fails else 0)
