"""On the GPU machine (H100 / H200): the Hopper wgmma dK/dV kernel of the flash_attention backward.

    python benchmarks/gpu/check_bwd_wgmma.py probe           # two small cases (the first run settled the reading
                                                            # of the transposed operands' descriptor offsets)
    python benchmarks/gpu/check_bwd_wgmma.py check           # the quick correctness set of
                                                            # check_flash_attention_backward.py on the wgmma kernel
    python benchmarks/gpu/check_bwd_wgmma.py bench           # wgmma configurations next to the mma.sync kernel
                                                            # and torch SDPA's flash backward, same run
    python benchmarks/gpu/check_bwd_wgmma.py dqpass          # the wgmma deterministic dQ pass: checks, timings
    python benchmarks/gpu/check_bwd_wgmma.py profile         # per-kernel device time of one call

Each step is its own process: a faulting kernel takes the CUDA context with it.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_flash_attention_backward as cb  # noqa: E402
from _common import tbench  # noqa: E402

import numpy as np  # noqa: E402

from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.cuda import _wgmma as wg  # noqa: E402
from numba_kernels.cuda import flash_attention_backward as cfb  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
DEFAULT = {64: (1, 64), 128: (1, 64)}


SHIPPED = dict(cfb.TC_BWD_WGMMA)


def _use(cfg, dq=None):
    """Only the head dims in cfg on the wgmma kernel (an empty cfg: the mma.sync kernels everywhere); dq: dQ from
    the wgmma kernel (TC_BWD_WGMMA_DQ; default: the WG_DQ environment variable)."""
    cfb.TC_BWD_WGMMA.clear()
    cfb.TC_BWD_WGMMA.update(cfg)
    cfb.TC_BWD_WGMMA_DQ = bool(os.environ.get("WG_DQ")) if dq is None else dq


def probe():
    from numba import cuda

    print("device", cuda.get_current_device().name, "cc", cuda.get_current_device().compute_capability,
          "wgmma available:", wg.available(), flush=True)
    _use(DEFAULT)
    n0 = len(cb.chk.fails)
    cb.check("wgmma plain", bfloat16, 2, 97, 113, 4, 2, 64)
    cb.check("wgmma causal GQA D128", bfloat16, 1, 200, 200, 4, 2, 128, causal=True)
    print("probe:", "PASS" if len(cb.chk.fails) == n0 else "FAIL", flush=True)


def check():
    cfg = dict(DEFAULT)
    if os.environ.get("WG_CHECK_2WG"):
        cfg[128] = (2, 64)
    _use(cfg)
    cb.correctness(quick=True)
    cb.check("wgmma f16 plain D128", np.float16, 1, 97, 113, 4, 2, 128)
    cb.check("wgmma D40 (padded to 48)", bfloat16, 1, 97, 113, 4, 2, 40, causal=True)
    _use({128: (2, 64)})
    cb.check("wgmma 2 warpgroups causal D128", bfloat16, 1, 300, 300, 4, 2, 128, causal=True)
    cb.check("wgmma 2 warpgroups window+softcap+alibi+dropout D128", bfloat16, 1, 300, 300, 4, 2, 128,
             window_size=(70, 9), softcap=5.0, alibi_slopes=cb.rng.random(4).astype(np.float32), dropout_p=0.2,
             seed=5)
    print("FAILURES:", cb.chk.fails if cb.chk.fails else "none", flush=True)


def _cases(lens, H=16):
    """For D 64 / 128, S in lens (B = 16384 / S), causal or not: (D, S, B, causal, case, FLOPs, SDPA output,
    inputs, output gradient, SDPA backward seconds), torch SDPA's flash backward timed in this run."""
    import torch

    for D in (64, 128):
        for S in lens:
            B = 16384 // S
            for causal in (False, True):
                c = cb._torch_case(B, S, H, D, causal)
                fl = 2.5 * 4 * B * H * S * S * D / (2 if causal else 1)
                o, ins, g = cb._sdpa_grads(c, causal)
                t_sdpa = tbench(lambda: torch.autograd.grad(o, ins, g, retain_graph=True), 7)
                yield D, S, B, causal, c, fl, o, ins, g, t_sdpa
                del c, o, ins, g


def bench():
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = 2 * 8192 ** 3 / tbench(lambda: a @ a, 10) / 1e12
    rows = [f"peak bf16 matmul (torch 8192^3) {mm:.0f} TFLOP/s"]
    print(rows[0], flush=True)
    H = 16
    variants = {64: [None, (1, 64), (1, 32)], 128: [None, (1, 64), (2, 64), (1, 32)]}
    if os.environ.get("WG_VARIANTS"):  # e.g. "64:2x64,2x32d;128:2x32": mma.sync first, then these (d: dQ fused)
        variants = {int(d): [None] + [tuple(int(x) for x in c.rstrip("d").split("x")) + (("d",) if c[-1] == "d" else ())
                                      for c in cs.split(",")]
                    for d, cs in (part.split(":") for part in os.environ["WG_VARIANTS"].split(";"))}
    lens = [int(x) for x in os.environ.get("BWD_BENCH_S", "1024,4096,16384").split(",")]
    for D, S, B, causal, c, fl, o, ins, g, t_sdpa in _cases(lens, H):
        ref = torch.autograd.grad(o, ins, g)
        parts = []
        for v in variants[D]:
            _use({D: v[:2]} if v else {}, bool(v) and len(v) > 2)
            t = tbench(lambda: cb._ours(c, S, D, causal), 7)
            es = cb._err_vs(cb._ours(c, S, D, causal), ref, (B, S, H, D))
            parts.append(f"{'mma.sync' if v is None else 'wgmma' + str(v)} {fl / t / 1e12:6.1f} "
                         f"({t_sdpa / t:4.2f}x, err {max(es):.1e})")
        r = (f"bwd D{D:3d} S{S:5d} B{B:2d} H{H} causal={int(causal)}  sdpa-flash {fl / t_sdpa / 1e12:6.1f} "
             f"TFLOP/s | " + " | ".join(parts))
        print(r, flush=True)
        rows.append(r)
        del ref
    _use(SHIPPED)
    with open(os.path.join(OUT, "bench_bwd_wgmma.txt"), "w") as f:
        f.write("\n".join(rows) + "\n")


def dqpass(check_only=False):
    """The deterministic dQ pass on warpgroup MMA (TC_BWD_WGMMA_DQPASS): checks (deterministic cases, twice equal),
    then the whole deterministic backward with the mma.sync dQ pass and wgmma candidates, same run."""
    cand = [(2, 64), (1, 64), (1, 128), (2, 32)]
    cfb.TC_BWD_WGMMA_DQPASS.update({64: cand[0], 128: cand[0]})
    combo = dict(softcap=5.0, alibi_slopes=cb.rng.random(4).astype(np.float32), dropout_p=0.2, seed=123)
    cb.check("dq pass causal D64", bfloat16, 2, 97, 113, 4, 2, 64, deterministic=True, causal=True)
    cb.check("dq pass window+softcap+alibi+dropout D64", bfloat16, 2, 97, 113, 4, 2, 64, deterministic=True,
             window_size=(17, 5), **combo)
    cb.check("dq pass causal Sq>Sk D128", bfloat16, 1, 130, 61, 4, 1, 128, deterministic=True, causal=True)
    cb.check("dq pass long causal GQA D128", bfloat16, 1, 1025, 1025, 8, 2, 128, deterministic=True, causal=True)
    cb.check("dq pass f16 plain D128", np.float16, 1, 97, 113, 4, 2, 128, deterministic=True)
    cb.check("dq pass D40", bfloat16, 1, 97, 113, 4, 2, 40, deterministic=True)
    print("FAILURES:", cb.chk.fails if cb.chk.fails else "none", flush=True)
    if check_only or cb.chk.fails:
        return
    for D, S, B, causal, c, fl, o, ins, g, t_sdpa in _cases((1024, 4096, 16384)):
        parts = []
        for v in [None] + cand:
            cfb.TC_BWD_WGMMA_DQPASS.clear()
            if v:
                cfb.TC_BWD_WGMMA_DQPASS[D] = v
            t = tbench(lambda: cb._ours(c, S, D, causal, True), 7)
            parts.append(f"{'mma.sync' if v is None else 'wgmma' + str(v)} {fl / t / 1e12:6.1f}")
        print(f"det bwd D{D:3d} S{S:5d} causal={int(causal)} sdpa {fl / t_sdpa / 1e12:6.1f} | " + " | ".join(parts),
              flush=True)
    cfb.TC_BWD_WGMMA_DQPASS.clear()


def profile():
    """Per-kernel device time of one backward call (torch profiler / CUPTI sees numba's and the driver's launches):
    D128 S4096 B4 H16, mma.sync and wgmma (2, 64), causal and not."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    for causal in (False, True):
        c = cb._torch_case(4, 4096, 16, 128, causal)
        for v in (None, (2, 64)):
            _use({128: v} if v else {})
            for _ in range(2):
                cb._ours(c, 4096, 128, causal)
            torch.cuda.synchronize()
            with tprof(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    cb._ours(c, 4096, 128, causal)
                torch.cuda.synchronize()
            tot = {}
            for e in p.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    name = e.name.split("(")[0][-60:]
                    tot[name] = tot.get(name, 0.0) + e.device_time / 5
            print(f"causal={int(causal)} {'mma.sync' if v is None else 'wgmma' + str(v)}: " +
                  "; ".join(f"{k} {t:.0f} us" for k, t in sorted(tot.items(), key=lambda x: -x[1])), flush=True)
    _use(SHIPPED)


if __name__ == "__main__":
    t0 = time.time()
    step = sys.argv[1] if len(sys.argv) > 1 else "probe"
    if step == "probe":
        probe()
    elif step == "check":
        check()
    elif step == "bench":
        bench()
    elif step == "profile":
        profile()
    elif step == "dqpass":
        dqpass()
    print(f"[{step} done at {time.time() - t0:.0f} s]", flush=True)
