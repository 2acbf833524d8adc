"""On the GPU machine: correctness of the CUDA selective_scan / selective_state_update paths (every option,
B / C form and dtype) against the float64 reference on small shapes, then forward-scan bandwidth next to a
same-run device copy. Prints a table last.

``--sim``: correctness only, tiny shapes, under the CUDA simulator (no GPU needed)."""
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
from numba_kernels.reference.selective_scan import selective_scan_ref, selective_state_update_ref  # noqa: E402

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


def correctness():
    B, Dm, L, N, G = (1, 6, 7, 3, 2) if SIM else (2, 96, 300, 16, 2)
    forms = [("grouped", "BNL"), ("const", "grouped")] if SIM else [("BNL", "BNL"), ("grouped", "grouped"),
                                                                      ("const", "const"), ("const", "grouped")]
    for dt in (np.float32, np.float16, bfloat16) + (() if SIM else (np.float64,)):
        for bform, cform in forms:
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
    del x, yy
    rows = [f"device copy (torch, 1 GiB): {copy_bw:.0f} GB/s (read + write)"]
    print(rows[0], flush=True)
    B, Dm, N = 8, 1536, 16
    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for name, dt in (("bf16", bfloat16), ("fp32", np.dtype(np.float32))):
        isz = np.dtype(dt).itemsize

        def dev(t):  # torch tensor -> numba device array in the kernel element type (bf16: uint16 bits)
            return cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16) if name == "bf16" else cuda.as_cuda_array(t)

        A = cuda.as_cuda_array(-torch.rand(Dm, N, device="cuda") - 0.5)
        D = cuda.as_cuda_array(torch.randn(Dm, device="cuda"))
        dbias = cuda.as_cuda_array(torch.randn(Dm, device="cuda") * 0.5)
        for L in (2048, 8192):
            u, delta, z, Bt, Ct = (torch.randn(*s, device="cuda", dtype=tdt[name]) for s in
                                   ((B, Dm, L), (B, Dm, L), (B, Dm, L), (B, 1, N, L), (B, 1, N, L)))
            yt = torch.empty_like(u)
            ud, dd, zd, Bd, Cd, yd = (dev(t) for t in (u, delta, z, Bt, Ct, yt))
            nbytes = 4 * B * Dm * L * isz + 2 * B * N * L * isz + 3 * Dm * N * 4
            for zname, zz in (("z", zd), ("no z", None)):
                nb = nbytes - (0 if zz is not None else B * Dm * L * isz)
                t = tbench(lambda: css.scan_fwd_cuda(ud, dd, A, Bd, Cd, D, zz, dbias, None, None, True, False, dt,
                                                     out=yd))
                rows.append(f"scan {name} B{B} Dm{Dm} N{N} L{L} {zname:4s}: {nb / t / 1e9:6.0f} GB/s "
                            f"({100 * nb / t / 1e9 / copy_bw:3.0f}% of copy) {t * 1e6:8.1f} us")
                print(rows[-1], flush=True)
            del u, delta, z, Bt, Ct, yt
        k = css.make_scan_kernel(css.kind_of(dt), N, *css.tiles(css.kind_of(dt)))
        try:
            rows.append(f"     scan kernel {name}: regs/thread {list(k.get_regs_per_thread().values())}, "
                        f"local bytes/thread {list(k.get_local_mem_per_thread().values())}")
        except Exception as exc:  # introspection API differs between numba-cuda versions
            rows.append(f"     scan kernel {name}: no register info ({exc})")
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
