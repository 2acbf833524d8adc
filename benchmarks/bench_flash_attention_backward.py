"""CPU benchmark of flash_attention_backward (float32): validate, warm up, time the median of repeats,
report GFLOP/s next to np.matmul float32 2048^3 measured in the same run.

FLOPs: forward = 4*B*H*Sq*Sk*D (halved when causal), backward = 2.5x forward (flash-attn's count).
The ratios use the larger of the two matmul figures (start and end of the run: the first is often low
while the machine is busy or warming up), so they err on the low side.

"kern ms" columns time the CPU kernels alone on inputs already in their head-major layout (what the public
functions do after packing q/k/v/dout; the outputs are written in the caller's (S, H, D) layout either way), so
the difference to "fwd ms" / "bwd ms" is the wrappers' cost.

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
from numba_kernels._dropout import keep_threshold  # noqa: E402
from numba_kernels.cpu import flash_attention as cpu_fwd, flash_attention_backward as cpu_bwd  # noqa: E402
from numba_kernels.cpu._blas import single_threaded_blas  # noqa: E402
from numba_kernels.cpu._math import LOG2E  # noqa: E402
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


def kernel_times(q, k, v, do, out, lse, causal, repeats):
    """Median seconds of the CPU forward and backward kernels alone (one sequence, float32, no options) on
    head-major copies of q, k, v, do (B=1, S, H, D), out and lse from the public forward."""
    S, H, D = q.shape[1:]
    qh, kh, vh, doh, oh = (np.ascontiguousarray(x[0].transpose(1, 0, 2)) for x in (q, k, v, do, out))  # (H, S, D)
    cu = np.array([0, S], dtype=np.int64)
    left, right = (-1, 0) if causal else (-1, -1)
    scale, none, seed, thresh = 1 / np.sqrt(D), np.zeros((0, 0), np.float32), np.uint64(0), keep_threshold(0.0)
    lse = np.asarray(lse, np.float64).reshape(H, S)
    lse2 = np.ascontiguousarray(np.where(np.isfinite(lse), lse * LOG2E, np.inf), dtype=np.float32)
    di = np.ascontiguousarray(np.einsum("htd,htd->ht", doh, oh))  # (H, S)
    fplan = cpu_fwd.plan_blocks(cu, causal)
    bplan = cpu_bwd.plan_blocks(cu, cu, left, right)

    def fwd():
        o, ls = np.empty_like(q[0]), np.empty(H * S, np.float32)  # out (S, H, D)
        cpu_fwd.flash_fwd_cpu(qh, kh, vh, cu, cu, *fplan, o, ls, 0, S, cpu_fwd.make_consts(np.float32, scale, 0, 0),
                              left, right, none, 0.0, seed, thresh, cpu_fwd.BLOCK_K)

    def bwd():
        dq, dk, dv = np.zeros_like(q[0]), np.zeros_like(k[0]), np.zeros_like(v[0])  # (S, H, D)
        cpu_bwd.flash_bwd_cpu(qh, kh, vh, doh, lse2, di, cu, cu, *bplan, dq, dk, dv,
                              cpu_bwd.make_consts(np.float32, scale, 0, 0), left, right, none, 0.0, seed, thresh)

    with single_threaded_blas():
        return median_time(fwd, repeats), median_time(bwd, repeats)


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
            kf, kb = kernel_times(q, k, v, do, out, lse, causal, repeats)
            rows.append((S, causal, tf * 1e3, tb * 1e3, fwd / tf / 1e9, 2.5 * fwd / tb / 1e9,
                         3.5 * fwd / (tf + tb) / 1e9, kf * 1e3, kb * 1e3, 3.5 * fwd / (kf + kb) / 1e9))
    return rows, mm, matmul_rate()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    rows, mm0, mm2 = bench(args.lengths, args.heads, args.head_dim, args.repeats)
    mm = max(mm0, mm2)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; B1 H{args.heads} "
          f"D{args.head_dim} float32; np.matmul float32 2048^3: {mm0:.1f} GFLOP/s (again at the end: {mm2:.1f}); "
          f"ratios against {mm:.1f}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    head = (f"{'S':>6} {'causal':>6} {'fwd ms':>8} {'bwd ms':>8} {'fwd GF/s':>9} {'bwd GF/s':>9} {'bwd/mm':>7} "
            f"{'f+b GF/s':>9} {'f+b/mm':>7} {'fwd kern ms':>12} {'bwd kern ms':>12} {'kern f+b/mm':>12}")
    print(head)
    print("-" * len(head))
    for S, causal, tf, tb, gf, gb, gfb, kf, kb, gk in rows:
        print(f"{S:>6} {int(causal):>6} {tf:>8.1f} {tb:>8.1f} {gf:>9.1f} {gb:>9.1f} {gb / mm:>7.2f} {gfb:>9.1f} "
              f"{gfb / mm:>7.2f} {kf:>12.1f} {kb:>12.1f} {gk / mm:>12.2f}")


if __name__ == "__main__":
    main()
