"""CPU fft_conv benchmark: float32, causal; B8 H256 with long filters (Lk = L, L 1k-64k), one short filter
(direct path) and L 64k with Lk 256-4k; B1 H16 at L 1M with Lk 256/4096 (overlap-add territory). Next to
scipy.signal.fftconvolve on the same batch in the same run (wall clock, and process CPU time: the ratio
of work, which load does not move much); also the other path forced (the single FFT where
the chooser took overlap-add, overlap-add where it took the single FFT) and, when pyfftw is installed, the
same call with fft_lib="pyfftw" next to fft_lib="scipy". Validates against the float64 reference
(on a slice) first, warms up (JIT compile excluded), reports the minimum of repeats. Prints a table last.

Usage: python benchmarks/bench_fft_conv.py [--quick] [--only=L[:Lk],...]  (--only: just those cases)"""
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numba_kernels as nk  # noqa: E402

try:  # an uninstalled checkout: map reference/ to numba_kernels.reference as the install does
    import numba_kernels.reference  # noqa: F401
except ImportError:
    import reference as _ref
    import reference.fft_conv  # noqa: F401
    sys.modules["numba_kernels.reference"] = _ref
    sys.modules["numba_kernels.reference.fft_conv"] = _ref.fft_conv
from scipy.signal import fftconvolve  # noqa: E402

from numba_kernels.cpu.fft_conv import fft_lib  # noqa: E402
from numba_kernels.reference.fft_conv import fft_conv_ref  # noqa: E402

QUICK = "--quick" in sys.argv


CPU_TIMES = {}


def timeit(fn, reps, key=None):
    """The fastest of ``reps`` timed calls after one warm-up: the machine is shared with other jobs, so the
    minimum (the least disturbed run) is the stable statistic; medians moved by +-50% between runs.
    With ``key``, the smallest process CPU time of the calls (all threads, seconds) goes to CPU_TIMES[key]:
    under load the wall-clock ratio mostly says how many cores each side got (scipy.signal.fftconvolve runs
    on one thread, ours on all), the CPU-time ratio says how much work each does."""
    fn()
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    if key is not None:
        CPU_TIMES[key] = float(np.min(cs))
    return float(np.min(ts))


def main():
    rng = np.random.default_rng(0)
    cases = [(8, 256, 1024, 1024), (8, 256, 4096, 4096), (8, 256, 16384, 16384), (8, 256, 65536, 65536),
             (8, 256, 16384, 32), (8, 256, 65536, 256), (8, 256, 65536, 4096),
             (1, 16, 1 << 20, 256), (1, 16, 1 << 20, 4096)]
    if QUICK:
        cases = cases[:2] + cases[4:5] + cases[7:8]
    only = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")]
    if only:
        want = [tuple(int(x) for x in w.split(":")) for w in only[0].split(",")]
        cases = [c for c in cases if any(c[2] == w[0] and (len(w) == 1 or c[3] == w[1]) for w in want)]
    try:
        import pyfftw  # noqa: F401
        have_fftw = True
    except ImportError:
        have_fftw = False
    rows = [f"cpu_count {os.cpu_count()}, load average {os.getloadavg()}, fft lib {fft_lib().name} "
            f"(pyfftw {'installed' if have_fftw else 'not installed'}), float32, causal",
            f"{'B':>2} {'H':>4} {'L':>8} {'Lk':>6} {'path':>11} | {'ours ms':>8} {'uncached':>8} | "
            f"{'other path':>16} | {'scipy ms':>9} | {'speedup':>7} {'(uncached)':>10} | {'pyfftw/scipy.fft':>16} | "
            f"{'max rel diff':>12} | {'cpu-s ours/scipy':>16} {'cpu ratio':>9}"]
    print(rows[0], flush=True)
    import scipy.fft

    from numba_kernels.cpu.fft_conv import choose
    for B, H, L, Lk in cases:
        path, P, _ = choose(L, Lk, L, scipy.fft.next_fast_len(L + Lk - 1, real=True))
        other = "fft" if path != "fft" else "overlap_add"
        u = rng.standard_normal((B, H, L)).astype(np.float32)
        k = (rng.standard_normal((H, Lk)) / np.sqrt(Lk)).astype(np.float32)
        ours = nk.fft_conv(u, k, backend="cpu")
        Lc = min(L, 16384)  # causal: the first Lc outputs need only the first Lc inputs
        ref = fft_conv_ref(u[:1, :4, :Lc], k[:4, :Lc])  # direct float64 on a slice
        e_ref = float(np.abs(ours[:1, :4, :Lc] - ref).max() / np.abs(ref).max())
        assert e_ref < 2e-5, f"L{L} Lk{Lk}: error vs reference {e_ref:.1e}"

        def peer():
            return fftconvolve(u, k[None], mode="full", axes=-1)[..., :L]

        reps = 3 if L >= 65536 else 5
        t_ours = timeit(lambda: nk.fft_conv(u, k, backend="cpu"), reps, "ours")
        t_other = float("nan")  # the other path only where the choice is close (long input, short filter)
        if 16 * Lk <= L:
            t_other = timeit(lambda: nk.fft_conv(u, k, backend="cpu", method=other), reps)
        fftw = "n/a"
        if have_fftw:
            t_w = timeit(lambda: nk.fft_conv(u, k, backend="cpu", fft_lib="pyfftw"), reps)
            t_s = timeit(lambda: nk.fft_conv(u, k, backend="cpu", fft_lib="scipy"), reps)
            fftw = f"{t_w * 1e3:.1f}/{t_s * 1e3:.1f}"

        def uncached():
            nk.clear_fft_conv_cache()
            return nk.fft_conv(u, k, backend="cpu")

        t_unc = timeit(uncached, reps)
        t_peer = timeit(peer, reps, "peer")
        ps = peer()
        diff = float(np.abs(ours - ps).max() / np.abs(ps).max())
        pname = path if path != "overlap_add" else f"ola P{P}"
        oname = f"{other[:3]} {t_other * 1e3:.1f}"
        rows.append(f"{B:>2} {H:>4} {L:>8} {Lk:>6} {pname:>11} | {t_ours * 1e3:8.1f} {t_unc * 1e3:8.1f} | "
                    f"{oname:>16} | {t_peer * 1e3:9.1f} | {t_peer / t_ours:6.2f}x {t_peer / t_unc:9.2f}x | {fftw:>16} | "
                    f"{diff:12.1e} | {CPU_TIMES['ours'] * 1e3:7.1f}/{CPU_TIMES['peer'] * 1e3:<8.1f} "
                    f"{CPU_TIMES['peer'] / CPU_TIMES['ours']:8.2f}x")
        print(rows[-1], flush=True)
        del u, k, ours, ps
    rows.append(f"load average at the end {os.getloadavg()}")
    print("\n==== summary ====")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
