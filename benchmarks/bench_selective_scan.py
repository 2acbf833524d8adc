"""CPU selective_scan benchmark: float32 B2 Dm768 N16 L2048 (B / C (B, N, L), z, D, delta_bias, softplus),
forward and backward. Validates against the float64 reference (on a slice) first, warms up (JIT compile
excluded) and reports the min of repeats (interleaved, with the load average; the machine is shared) next to
  * the NumPy reference loop: mamba's ``selective_scan_ref`` recipe (a Python loop over L, each step
    vectorized over batch, channels and states), float32, same run;
  * a same-run NumPy copy (GB/s read + write) as the memory floor: the op must read u, delta, z, B, C and
    write y (the backward reads dout too and writes du, ddelta, dz, dB, dC).
Prints a table last.

With --ab REV the CPU backward of git revision REV (its ``cpu/selective_scan.py``, loaded from ``git show``) is
timed interleaved with the current one in the same process (and its gradients compared).

Usage: python benchmarks/bench_selective_scan.py [--quick] [--ab REV]"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numba_kernels as nk  # noqa: E402

try:  # an uninstalled checkout: map reference/ to numba_kernels.reference as the install does
    import numba_kernels.reference  # noqa: F401
except ImportError:
    import reference as _ref
    import reference.selective_scan  # noqa: F401
    sys.modules["numba_kernels.reference"] = _ref
    sys.modules["numba_kernels.reference.selective_scan"] = _ref.selective_scan
from numba_kernels.reference.selective_scan import selective_scan_backward_ref, selective_scan_ref  # noqa: E402

QUICK = "--quick" in sys.argv
AB = sys.argv[sys.argv.index("--ab") + 1] if "--ab" in sys.argv else None


def timeit(fn, reps):
    return interleaved([fn], reps)[0]


def interleaved(fns, reps):
    """min over reps of each fn, the fns called in turn each repeat (after one warm-up call each)."""
    for fn in fns:
        fn()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t)
    return [float(min(t)) for t in ts]


def old_module(rev):
    """cpu/selective_scan.py of git revision rev, imported from a temporary copy."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:numba_kernels/cpu/selective_scan.py"], check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "old_selective_scan.py")
    with open(path, "w") as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location("old_selective_scan", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def with_kernel(name, kernel, fn):
    """fn run with numba_kernels.cpu.selective_scan.<name> swapped for kernel."""
    import numba_kernels.cpu.selective_scan as css

    cur = getattr(css, name)

    def run():
        setattr(css, name, kernel)
        try:
            return fn()
        finally:
            setattr(css, name, cur)
    return run


def numpy_loop(u, delta, A, B, C, D, z, delta_bias):
    """mamba's selective_scan_ref recipe in NumPy float32: loop over L, vectorized over (batch, channel, state)."""
    dt = delta + delta_bias[None, :, None]
    dt = np.where(dt > 20, dt, np.log1p(np.exp(np.minimum(dt, 20))))
    Bt, Dm, L = u.shape
    h = np.zeros((Bt, Dm, A.shape[1]), np.float32)
    y = np.empty_like(u)
    for t in range(L):
        d = dt[:, :, t, None]  # (B, Dm, 1)
        h = np.exp(d * A) * h + (d * u[:, :, t, None]) * B[:, None, :, t]
        y[:, :, t] = np.einsum("bdn,bn->bd", h, C[:, :, t])
    y = y + D[None, :, None] * u
    return y * z / (1 + np.exp(-z))


def main():
    rng = np.random.default_rng(0)
    Bt, Dm, N, L = (2, 768, 16, 2048) if not QUICK else (2, 256, 16, 1024)
    f = np.float32
    kw = dict(u=rng.standard_normal((Bt, Dm, L)).astype(f), delta=(0.5 * rng.standard_normal((Bt, Dm, L))).astype(f),
              A=-np.exp(0.5 * rng.standard_normal((Dm, N))).astype(f), B=rng.standard_normal((Bt, N, L)).astype(f),
              C=rng.standard_normal((Bt, N, L)).astype(f), D=rng.standard_normal(Dm).astype(f),
              z=rng.standard_normal((Bt, Dm, L)).astype(f), delta_bias=(0.5 * rng.standard_normal(Dm)).astype(f))
    dout = rng.standard_normal((Bt, Dm, L)).astype(f)
    # validate on a slice (the float64 references are Python loops)
    sl = {k: (v[:1, :8, :256] if k in ("u", "delta", "z") else v[:8] if k in ("A", "D", "delta_bias") else
              v[:1, :, :256]) for k, v in kw.items()}
    sl = {k: np.ascontiguousarray(v) for k, v in sl.items()}
    y = nk.selective_scan(**sl, delta_softplus=True, backend="cpu")
    yr = selective_scan_ref(**sl, delta_softplus=True)
    e = float(np.abs(y - yr).max() / max(1.0, np.abs(yr).max()))
    assert e < 2e-5, f"forward error vs reference {e:.1e}"
    g = nk.selective_scan_backward(np.ascontiguousarray(dout[:1, :8, :256]), **sl, delta_softplus=True, backend="cpu")
    gr = selective_scan_backward_ref(np.ascontiguousarray(dout[:1, :8, :256]), **sl, delta_softplus=True)
    eb = max(float(np.abs(a - b).max() / max(1.0, np.abs(b).max())) for a, b in zip(g, gr) if a is not None)
    assert eb < 2e-5, f"backward error vs reference {eb:.1e}"
    yl = numpy_loop(**sl)
    assert np.abs(yl - yr).max() / max(1.0, np.abs(yr).max()) < 1e-4

    big = np.ones(2 ** 26, np.float32)  # 256 MiB
    dst = np.empty_like(big)
    t_copy = timeit(lambda: np.copyto(dst, big), 5)
    copy_bw = 2 * big.nbytes / t_copy / 1e9
    isz = 4
    nb_fwd = 4 * Bt * Dm * L * isz + 2 * Bt * N * L * isz
    nb_bwd = 8 * Bt * Dm * L * isz + 4 * Bt * N * L * isz
    reps = 3 if QUICK else 7
    load0 = os.getloadavg()
    fwd = lambda: nk.selective_scan(**kw, delta_softplus=True, backend="cpu")  # noqa: E731
    bwd = lambda: nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="cpu")  # noqa: E731
    ab = []
    if AB:
        mod = old_module(AB)
        bwd_old = with_kernel("scan_bwd_cpu", mod.scan_bwd_cpu, bwd)
        fwd_old = with_kernel("scan_fwd_cpu", mod.scan_fwd_cpu, fwd)
        g_old, g_new = bwd_old(), bwd()
        dmax = max(float(np.abs(a - b).max() / max(1.0, np.abs(a).max())) for a, b in zip(g_old, g_new)
                   if a is not None)
        g_again = bwd()
        same = all(np.array_equal(a, b) for a, b in zip(g_new, g_again) if a is not None)
        yd = float(np.abs(fwd_old() - fwd()).max() / np.abs(fwd()).max())
        t_fwd, t_bwd, t_old, t_fold = interleaved([fwd, bwd, bwd_old, fwd_old], reps)
        ab = [(f"backward of {AB} (same run, interleaved) {t_old * 1e3:8.1f} ms -> now {t_old / t_bwd:.2f}x faster "
               f"(max rel diff of the gradients {dmax:.1e}; current backward bitwise equal run to run: {same})"),
              (f"forward  of {AB} (same run, interleaved) {t_fold * 1e3:8.1f} ms -> now {t_fold / t_fwd:.2f}x faster "
               f"(max rel diff {yd:.1e}); old backward / old forward {t_old / t_fold:.1f}x")]
    else:
        t_fwd, t_bwd = interleaved([fwd, bwd], reps)
    load1 = os.getloadavg()
    t_np = timeit(lambda: numpy_loop(**kw), 1 if not QUICK else 2)
    yo = nk.selective_scan(**kw, delta_softplus=True, backend="cpu")
    diff = float(np.abs(yo - numpy_loop(**kw)).max() / np.abs(yo).max())
    import numba

    rows = [f"cpu_count {os.cpu_count()}, numba threads {numba.get_num_threads()}, float32 B{Bt} Dm{Dm} N{N} L{L}, "
            f"B/C (B, N, L), z, D, delta_bias, softplus; errors vs float64 reference: fwd {e:.1e}, bwd {eb:.1e}",
            f"numpy copy (256 MiB): {copy_bw:.1f} GB/s (read + write)",
            f"forward  ours {t_fwd * 1e3:8.1f} ms  {nb_fwd / t_fwd / 1e9:6.2f} GB/s ({100 * nb_fwd / t_fwd / 1e9 / copy_bw:4.1f}% "
            f"of copy)  {Bt * Dm * L * N / t_fwd / 1e9:.2f} G state-updates/s",
            f"forward  numpy loop {t_np * 1e3:8.1f} ms -> ours {t_np / t_fwd:.1f}x faster (max rel diff {diff:.1e})",
            f"backward ours {t_bwd * 1e3:8.1f} ms  {nb_bwd / t_bwd / 1e9:6.2f} GB/s ({100 * nb_bwd / t_bwd / 1e9 / copy_bw:4.1f}% "
            f"of copy); {t_bwd / t_fwd:.1f}x the forward"] + ab + [
            f"min of {reps} repeats; load average (1, 5, 15 min) before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
            f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"]
    print("\n==== summary ====")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
