"""CPU fft_conv benchmark: float32 B8 H256, causal, long filters (Lk = L) and one short filter (direct path),
next to scipy.signal.fftconvolve on the same batch in the same run. Validates against the float64 reference
(on a slice) first, warms up (JIT compile excluded), reports the median of repeats. Prints a table last.

Usage: python benchmarks/bench_fft_conv.py [--quick]"""
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


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    rng = np.random.default_rng(0)
    B, H = 8, 256
    cases = [(1024, 1024), (4096, 4096), (16384, 16384), (65536, 65536), (16384, 32)]
    if QUICK:
        cases = cases[:2] + cases[-1:]
    rows = [f"cpu_count {os.cpu_count()}, fft lib {fft_lib().name}, float32 B{B} H{H}, causal",
            f"{'L':>6} {'Lk':>6} | {'ours ms':>8} {'uncached':>8} | {'scipy ms':>9} | {'speedup':>7} "
            f"{'(uncached)':>10} | {'max rel diff':>12}"]
    print(rows[0], flush=True)
    for L, Lk in cases:
        u = rng.standard_normal((B, H, L)).astype(np.float32)
        k = (rng.standard_normal((H, Lk)) / np.sqrt(Lk)).astype(np.float32)
        ours = nk.fft_conv(u, k, backend="cpu")
        ref = fft_conv_ref(u[:1, :4], k[:4])  # direct float64 on a slice
        e_ref = float(np.abs(ours[:1, :4] - ref).max() / np.abs(ref).max())
        assert e_ref < 2e-5, f"L{L} Lk{Lk}: error vs reference {e_ref:.1e}"

        def peer():
            return fftconvolve(u, k[None], mode="full", axes=-1)[..., :L]

        reps = 3 if L >= 65536 else 5
        t_ours = timeit(lambda: nk.fft_conv(u, k, backend="cpu"), reps)

        def uncached():
            nk.clear_fft_conv_cache()
            return nk.fft_conv(u, k, backend="cpu")

        t_unc = timeit(uncached, reps)
        t_peer = timeit(peer, reps)
        ps = peer()
        diff = float(np.abs(ours - ps).max() / np.abs(ps).max())
        rows.append(f"{L:>6} {Lk:>6} | {t_ours * 1e3:8.1f} {t_unc * 1e3:8.1f} | {t_peer * 1e3:9.1f} | "
                    f"{t_peer / t_ours:6.2f}x {t_peer / t_unc:9.2f}x | {diff:12.1e}")
        print(rows[-1], flush=True)
        del u, k, ours, ps
    print("\n==== summary ====")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
