"""CPU benchmark of flash_attention_backward (float32): validate, warm up, time the median of repeats,
report GFLOP/s next to np.matmul float32 2048^3 measured in the same run.

FLOPs: forward = 4*B*H*Sq*Sk*D (halved when causal), backward = 2.5x forward (flash-attn's count;
the deterministic CPU backward actually does 3.5x: S and dP are recomputed in the dQ pass).

    python benchmarks/bench_flash_attention_backward.py [--lengths 512 1024 2048 4096] [--repeats 3]
"""
import argparse
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numba_kernels as nk  # noqa: E402
from bench_flash_attention import matmul_rate, median_time  # noqa: E402
from numba_kernels.reference import flash_attention_backward_ref  # noqa: E402


def validate(rng, H, D):
    q, k, v, do = (rng.standard_normal((1, 300, H, D)).astype(np.float32) for _ in range(4))
    for causal in (False, True):
        out, lse = nk.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cpu")
        got = nk.flash_attention_backward(do, q, k, v, out, lse, causal=causal, backend="cpu")
        ref = flash_attention_backward_ref(do, q, k, v, out, lse, causal=causal)
        for g, r in zip(got, ref):
            err = np.abs(g - r).max() / max(1.0, np.abs(r).max())
            assert err < 1e-4, f"validation failed: rel err {err}"


def bench(lengths, H=8, D=64, repeats=3):
    """Rows (S, causal, fwd ms, bwd ms, fwd GFLOP/s, bwd GFLOP/s, fwd+bwd GFLOP/s) and the matmul rates."""
    rng = np.random.default_rng()
    validate(rng, H, D)
    mm = matmul_rate()
    rows = []
    for S in lengths:
        for causal in (False, True):
            q, k, v, do = (rng.standard_normal((1, S, H, D)).astype(np.float32) for _ in range(4))
            fwd = 4 * H * S * S * D / (2 if causal else 1)
            out, lse = nk.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cpu")
            tf = median_time(lambda: nk.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cpu"),
                             repeats)
            tb = median_time(lambda: nk.flash_attention_backward(do, q, k, v, out, lse, causal=causal, backend="cpu"),
                             repeats)
            rows.append((S, causal, tf * 1e3, tb * 1e3, fwd / tf / 1e9, 2.5 * fwd / tb / 1e9,
                         3.5 * fwd / (tf + tb) / 1e9))
    return rows, mm, matmul_rate()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    rows, mm, mm2 = bench(args.lengths, args.heads, args.head_dim, args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; B1 H{args.heads} "
          f"D{args.head_dim} float32; np.matmul float32 2048^3: {mm:.1f} GFLOP/s (again at the end: {mm2:.1f})")
    head = (f"{'S':>6} {'causal':>6} {'fwd ms':>8} {'bwd ms':>8} {'fwd GF/s':>9} {'bwd GF/s':>9} {'bwd/mm':>7} "
            f"{'f+b GF/s':>9} {'f+b/mm':>7}")
    print(head)
    print("-" * len(head))
    for S, causal, tf, tb, gf, gb, gfb in rows:
        print(f"{S:>6} {int(causal):>6} {tf:>8.1f} {tb:>8.1f} {gf:>9.1f} {gb:>9.1f} {gb / mm:>7.2f} {gfb:>9.1f} "
              f"{gfb / mm:>7.2f}")


if __name__ == "__main__":
    main()
