"""Where the time of small decode calls goes (bf16 decode, Sq 1, H 32, Hk 8, D 128, contiguous caches): device
time per call (back-to-back calls, host hidden behind a sleep kernel, as ``check_decode_attention.dtime``) for
several split counts next to torch SDPA's, plus the floor of one empty numba launch. With ``ONCE=1`` each shape
runs our call and SDPA's three times and nothing else (for ncu's per-kernel durations). GPU only.

``python probe_decode_small.py``"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_decode_attention as cda  # noqa: E402
from numba import cuda  # noqa: E402

from numba_kernels.cuda import _launch as fl  # noqa: E402
from numba_kernels.cuda import decode_attention as dec  # noqa: E402
from numba_kernels.cuda.decode_attention import attend_cuda, choose_splits, tc_blocks_per_sm  # noqa: E402

SHAPES = [(1, 1024), (1, 4096), (1, 16384), (1, 131072), (8, 4096), (64, 1024)]
#: ONCE runs: PROBE_SHAPES="BxS:splits,..." (splits 0 = automatic), e.g. "1x1024:1,32x8192:0"
ONCE_SHAPES = [tuple(int(v) for v in x.replace(":", "x").split("x")) for x in
               os.environ.get("PROBE_SHAPES", "").split(",") if x]
SPLITS = {1024: (1, 2, 4, 8, 16, 32), 4096: (1, 4, 8, 16, 33, 64), 16384: (8, 16, 33, 48, 66, 99, 132), 131072: (16, 33, 66, 132)}


@cuda.jit
def _empty(x):
    if cuda.grid(1) == 0 and x[0] == 12345.0:
        x[0] = 0.0


def main():
    import torch
    import torch.nn.functional as F

    once = bool(os.environ.get("ONCE"))
    if not once:
        x = cuda.device_array(1, np.float32)
        print(f"empty numba launch (1 block): {cda.dtime(lambda: fl.launch(_empty, 1, 32, 0, (x,)), 50) * 1e6:.1f} us",
              flush=True)
        print(f"empty numba launch (264 blocks x 128): "
              f"{cda.dtime(lambda: fl.launch(_empty, 264, 128, 0, (x,)), 50) * 1e6:.1f} us", flush=True)
        z = torch.zeros(1, device="cuda")
        print(f"torch z.add_(1): {cda.dtime(lambda: z.add_(1), 50) * 1e6:.1f} us", flush=True)
    for B, S, *fixed in (ONCE_SHAPES if once and ONCE_SHAPES else [x + (0,) for x in SHAPES]):
        c = cda._setup(B, S, "contig")
        cfg = dec.tc_config(128, job_keys=B * 8 * S)  # the configuration attend_cuda picks (Hk 8, one row tile)
        bps = tc_blocks_per_sm(cfg[0], 128, True, False, False, *cfg[1:])
        c["plan"].num_splits = fixed[0]
        H, Hk, D = 32, 8, 128
        kt = c["k_t"].view(B, S, Hk, D).transpose(1, 2).contiguous()
        vt = c["v_t"].view(B, S, Hk, D).transpose(1, 2).contiguous()
        qt = torch.as_tensor(c["q"].view(np.int16), device="cuda").view(torch.bfloat16).transpose(1, 2).contiguous()
        call = lambda: attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16")  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)  # noqa: E731
        auto = choose_splits(c["plan"], 1, bps, short_cap=True)
        if once:
            for _ in range(3):
                call()
                sdpa()
            torch.cuda.synchronize()
            print(f"B{B} S{S} splits {fixed[0] or auto}: ran 3x ours + 3x sdpa", flush=True)
            continue
        kv = 2 * B * S * Hk * D * 2
        ts = cda.dtime(sdpa)
        line = [f"sdpa {ts * 1e6:.1f}"]
        for ns in sorted(set(SPLITS.get(S, (1, 2, 4, 8)) + (auto,))):
            if B * Hk * ns > 8 * 132 or (ns > 1 and ns * 16 > S):
                continue
            c["plan"].num_splits = ns
            t = cda.dtime(call)
            cell = f"{ns}{'*' if ns == auto else ''}: {t * 1e6:.1f}"
            if ns > dec.FUSED_MERGE_MAX:  # the same split count merged in-kernel instead of by the merge kernel
                old, dec.FUSED_MERGE_MAX = dec.FUSED_MERGE_MAX, 256
                cell += f" (fused {cda.dtime(call) * 1e6:.1f})"
                dec.FUSED_MERGE_MAX = old
            line.append(cell)
        print(f"B{B:3d} S{S:6d} ({kv / 1e6:.0f} MB K/V) device us | " + " | ".join(line), flush=True)
        del c, kt, vt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
