"""CPU decode-attention benchmark: float32, Sq 1, H 32, Hk 8, D 128, B in {1, 8}, cache 1k-16k tokens,
contiguous and paged caches (page 16 and 256, pages scattered in a random order).

Decode is memory-bound: the figure of merit is the K/V bytes actually read (2 * B * Hk * seqlen * D * 4)
per second, next to a numpy copy measured in the same run (np.copyto of a 256 MB float32 array; its
bandwidth counts read + write, i.e. 2 x 256 MB per copy), re-measured before each (B, seqlen) so
that both figures see the same machine load. Validates each case against the float64
reference first, warms up (JIT compile excluded) and reports the median of repeats; the reference is
timed once per (B, seqlen) on the contiguous cache. The best run is printed too: on a shared machine a
parallel call waits for its slowest thread, and the median can catch a thread descheduled for a few ms.
Prints a table last.

Usage: python benchmarks/bench_decode_attention.py [--quick]"""
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numba  # noqa: E402

import numba_kernels as nk  # noqa: E402

try:  # an uninstalled checkout: map reference/ to numba_kernels.reference as the install does
    import numba_kernels.reference  # noqa: F401
except ImportError:
    import reference as _ref
    import reference.decode_attention  # noqa: F401
    sys.modules["numba_kernels.reference"] = _ref
    sys.modules["numba_kernels.reference.decode_attention"] = _ref.decode_attention
from numba_kernels.reference.decode_attention import flash_attention_with_kvcache_ref  # noqa: E402

QUICK = "--quick" in sys.argv
H, HK, D = 32, 8, 128


def times(fn, reps, warm=1):
    """(median, best) seconds of reps calls after warm calls."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(np.min(ts))


def median_time(fn, reps, warm=1):
    return times(fn, reps, warm)[0]


def copy_bandwidth(nbytes=256 << 20, reps=7):
    """Bytes/s of np.copyto on a float32 array of nbytes, counting read + write (2 x nbytes per copy)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    t = median_time(lambda: np.copyto(dst, src), reps, warm=2)
    return 2 * nbytes / t


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def paged(rng, kc, vc, page):
    """The same tokens in (num_blocks, page, Hk, D) caches, pages in a random order; + block_table."""
    B, S = kc.shape[:2]
    nb = -(-S // page)
    table = rng.permutation(B * nb).reshape(B, nb).astype(np.int32)
    kp = np.empty((B * nb, page, HK, D), dtype=kc.dtype)
    vp = np.empty_like(kp)
    pad = nb * page - S
    src_k = np.concatenate([kc, np.zeros((B, pad, HK, D), kc.dtype)], axis=1).reshape(B, nb, page, HK, D)
    src_v = np.concatenate([vc, np.zeros((B, pad, HK, D), vc.dtype)], axis=1).reshape(B, nb, page, HK, D)
    kp[table.reshape(-1)] = src_k.reshape(-1, page, HK, D)
    vp[table.reshape(-1)] = src_v.reshape(-1, page, HK, D)
    return kp, vp, table


def main():
    rng = np.random.default_rng(0)
    threads = numba.get_num_threads()
    bw_copy = copy_bandwidth()
    head = (f"{cpu_name()}, nproc {os.cpu_count()}, numba threads {threads}; float32 decode Sq 1, H {H}, Hk {HK}, "
            f"D {D}; copy bandwidth (np.copyto 256 MB, read+write counted) {bw_copy / 1e9:.1f} GB/s; "
            f"load average {os.getloadavg()[0]:.1f}")
    print(head, flush=True)
    cases = [(1, 1024), (1, 4096), (1, 16384), (8, 1024), (8, 4096), (8, 16384)]
    if QUICK:
        cases = [(1, 1024), (8, 4096)]
    rows = [head, f"{'B':>2} {'seqlen':>6} {'layout':>10} | {'ms':>8} {'best':>8} | {'KV GB/s':>8} {'best':>6} "
                  f"{'copy':>6} {'% copy':>7} {'best':>5} | "
                  f"{'ref ms':>8} {'speedup':>8} | {'max err':>8}"]
    for B, S in cases:
        q = rng.standard_normal((B, 1, H, D)).astype(np.float32)
        kc = rng.standard_normal((B, S, HK, D)).astype(np.float32)
        vc = rng.standard_normal((B, S, HK, D)).astype(np.float32)
        seqlens = np.full(B, S, dtype=np.int32)
        kv_bytes = 2 * B * HK * S * D * 4
        bw_copy = copy_bandwidth()
        t_ref = median_time(lambda: flash_attention_with_kvcache_ref(q, kc, vc, cache_seqlens=seqlens), 1, warm=0)
        ref = flash_attention_with_kvcache_ref(q, kc, vc, cache_seqlens=seqlens)
        reps = 15 if kv_bytes < (256 << 20) else 7
        for layout in ("contiguous", "paged16", "paged256"):
            kw = dict(cache_seqlens=seqlens, backend="cpu")
            k_, v_ = kc, vc
            if layout != "contiguous":
                k_, v_, kw["block_table"] = paged(rng, kc, vc, int(layout[5:]))
            out = nk.flash_attention_with_kvcache(q, k_, v_, **kw)
            err = float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max()))
            assert err < 2e-5, f"B{B} S{S} {layout}: error vs reference {err:.1e}"
            t, tb = times(lambda: nk.flash_attention_with_kvcache(q, k_, v_, **kw), reps, warm=2)
            bw, bwb = kv_bytes / t, kv_bytes / tb
            rows.append(f"{B:>2} {S:>6} {layout:>10} | {t * 1e3:8.3f} {tb * 1e3:8.3f} | {bw / 1e9:8.1f} {bwb / 1e9:6.1f} "
                        f"{bw_copy / 1e9:6.1f} "
                        f"{100 * bw / bw_copy:6.0f}% {100 * bwb / bw_copy:4.0f}% | "
                        f"{t_ref * 1e3:8.1f} {t_ref / t:7.0f}x | {err:8.1e}")
            print(rows[-1], flush=True)
    rows.append(f"load average (1/5/15 min) at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
                f"on {os.cpu_count()} cores (other jobs share this machine)")
    print("\n==== summary ====")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
