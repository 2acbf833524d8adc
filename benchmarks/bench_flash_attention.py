"""CPU benchmark of flash_attention (float32 forward): validate, warm up, time the median of repeats,
report GFLOP/s next to np.matmul float32 measured in the same run, and next to naive NumPy attention.

    python benchmarks/bench_flash_attention.py [--lengths 512 1024 2048 4096] [--repeats 3]

The GPU benchmark (bf16, next to torch SDPA) is benchmarks/gpu/check_flash_attention.py.
"""
import argparse
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numba_kernels as nk  # noqa: E402
from numba_kernels._demo import _median_time as median_time, _naive_attention  # noqa: E402
from numba_kernels.reference import flash_attention_ref  # noqa: E402


def matmul_rate(n=2048, repeats=5):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return 2 * n ** 3 / median_time(lambda: a @ a, repeats) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng()
    H, D = args.heads, args.head_dim

    # validate first
    q, k, v = (rng.standard_normal((1, 300, H, D)).astype(np.float32) for _ in range(3))
    for causal in (False, True):
        err = np.abs(nk.flash_attention(q, k, v, causal=causal, backend="cpu")
                     - flash_attention_ref(q, k, v, causal=causal)).max()
        assert err < 1e-4, f"validation failed: max abs err {err}"

    mm = matmul_rate()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"np.matmul float32 2048^3: {mm:.1f} GFLOP/s")
    head = f"{'S':>6} {'causal':>6} {'ours ms':>9} {'GFLOP/s':>8} {'of matmul':>9} {'naive ms':>9} {'speedup':>8}"
    print(head)
    print("-" * len(head))
    for S in args.lengths:
        for causal in (False, True):
            q, k, v = (rng.standard_normal((1, S, H, D)).astype(np.float32) for _ in range(3))
            flops = 4 * H * S * S * D / (2 if causal else 1)
            t = median_time(lambda: nk.flash_attention(q, k, v, causal=causal, backend="cpu"), args.repeats)
            tn = median_time(lambda: _naive_attention(q, k, v, causal), 1)
            g = flops / t / 1e9
            print(f"{S:>6} {int(causal):>6} {t * 1e3:>9.1f} {g:>8.1f} {g / mm:>9.2f} {tn * 1e3:>9.1f} {tn / t:>7.1f}x",
                  flush=True)
    mm2 = matmul_rate()
    print(f"np.matmul float32 again at the end: {mm2:.1f} GFLOP/s (spread of the floor)")


if __name__ == "__main__":
    main()
