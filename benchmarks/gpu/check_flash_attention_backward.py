"""On the GPU machine: correctness of the CUDA flash_attention backward (every option, all dtypes) against the
float64 reference backward, then bf16 backward speed next to torch SDPA's flash-backend backward in the same run
and the same-run bf16 matmul rate. Prints a table last.

    python benchmarks/gpu/check_flash_attention_backward.py [check] [bench]
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Checks, import_library, tbench  # noqa: E402

nk = import_library()
from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.reference.flash_attention import flash_attention_ref, flash_attention_varlen_ref  # noqa: E402
from numba_kernels.reference.flash_attention_backward import (flash_attention_backward_ref,  # noqa: E402
                                                              flash_attention_varlen_backward_ref)

OUT = os.environ.get("OUT", "/tmp")
rng = np.random.default_rng(int(time.time()))
chk = Checks(width=46)


def grads_err(got, ref):
    return max(chk.err(g, r) for g, r in zip(got, ref))


def check(name, dt, B, Sq, Sk, H, Hk, D, deterministic=False, **kw):
    q, do = (rng.standard_normal((B, Sq, H, D)) for _ in range(2))
    k, v = (rng.standard_normal((B, Sk, Hk, D)) for _ in range(2))
    out, lse = flash_attention_ref(q, k, v, return_lse=True, **kw)
    ref = flash_attention_backward_ref(do, q, k, v, out, lse, **kw)
    args = [x.astype(dt) for x in (do, q, k, v, out)]
    lse = lse.astype(np.float64 if dt == np.float64 else np.float32)
    t = time.perf_counter()
    got = nk.flash_attention_backward(*args, lse, backend="cuda", deterministic=deterministic, **kw)
    dtc = time.perf_counter() - t
    e = grads_err(got, ref)
    if not all(g.dtype == np.dtype(dt) and np.isfinite(g.astype(np.float64)).all() for g in got):
        e = np.inf
    extra = ""
    if deterministic:  # bitwise reproducible
        again = nk.flash_attention_backward(*args, lse, backend="cuda", deterministic=True, **kw)
        same = all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(got, again))
        extra = "twice-equal" if same else "NOT REPRODUCIBLE"
        e = e if same else np.inf
    chk.report(f"{name} B{B} Sq{Sq} Sk{Sk} H{H}/{Hk} D{D}{' det' if deterministic else ''}", dt, e,
               f"({dtc:.1f}s incl. compile) {extra}")


def correctness(quick=False):
    """Every option and dtype against the float64 reference; ``quick``: the tensor-core kernels in bf16 only."""
    combo = dict(softcap=5.0, alibi_slopes=rng.random(4).astype(np.float32), dropout_p=0.2, seed=123)
    for dt in (bfloat16,) if quick else (bfloat16, np.float16, np.float32, np.float64):
        half = dt in (bfloat16, np.float16)
        check("plain", dt, 2, 97, 113, 4, 2, 64)
        check("causal", dt, 2, 97, 113, 4, 2, 64, causal=True)
        check("softcap+alibi+dropout", dt, 2, 97, 113, 4, 2, 64, **combo)
        if dt in (bfloat16, np.float32):
            check("window", dt, 2, 97, 113, 4, 2, 64, window_size=(17, 5))
            check("causal+window", dt, 2, 97, 113, 4, 2, 64, causal=True, window_size=(9, -1))
            check("causal Sq>Sk (masked rows)", dt, 1, 130, 61, 4, 1, 64, causal=True)
            check("plain det", dt, 2, 97, 113, 4, 2, 64, deterministic=True)
        if half:
            check("plain D128", dt, 1, 97, 113, 4, 2, 128)
        if dt == bfloat16:
            if not quick:
                check("plain D40 (padded)", dt, 1, 97, 113, 4, 2, 40)
            check("long causal GQA D128 det", dt, 1, 1025, 1025, 8, 2, 128, causal=True, deterministic=True)
            check("long causal GQA D64", dt, 1, 1025, 1025, 8, 2, 64, causal=True)
            if not quick:
                check("plain D256 (CUDA-core fallback)", dt, 1, 65, 70, 2, 1, 256)
    # varlen, causal, with sequences that see no key
    cq = np.array([0, 5, 135, 136, 200], np.int32)
    ck = np.array([0, 7, 107, 140, 204], np.int32)
    for dt in (bfloat16,) if quick else (bfloat16, np.float32):
        q, do = (rng.standard_normal((200, 4, 64)) for _ in range(2))
        k, v = (rng.standard_normal((204, 2, 64)) for _ in range(2))
        out, lse = flash_attention_varlen_ref(q, k, v, cq, ck, causal=True, return_lse=True)
        ref = flash_attention_varlen_backward_ref(do, q, k, v, out, lse, cq, ck, causal=True)
        got = nk.flash_attention_varlen_backward(*(x.astype(dt) for x in (do, q, k, v, out)), lse.astype(np.float32),
                                                 cq, ck, causal=True, backend="cuda")
        chk.report("varlen causal", dt, grads_err(got, ref))


T0 = time.time()


def _torch_case(B, S, H, D, causal):
    """bf16 inputs as torch tensors and device words, SDPA's flash forward (out, LSE) as the saved values."""
    import torch
    from numba import cuda

    def words(t):
        w = cuda.as_cuda_array(t.contiguous().view(torch.int16).view(torch.int32).view(B * S, H, D // 2))
        return w.view(np.uint32) if w.dtype != np.uint32 else w

    qt, kt, vt, gt = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    res = torch.ops.aten._scaled_dot_product_flash_attention(qt.transpose(1, 2), kt.transpose(1, 2),
                                                             vt.transpose(1, 2), is_causal=causal)
    o, lse = res[0].transpose(1, 2).contiguous(), res[1].contiguous()
    assert tuple(lse.shape) == (B, H, S), lse.shape
    lse_d = cuda.as_cuda_array(lse.view(-1))
    cu = np.arange(B + 1, dtype=np.int32) * S
    return dict(t=(qt, kt, vt, gt), w=tuple(words(x) for x in (gt, qt, kt, vt, o)), lse=lse_d, cu=cu)


def _ours(c, S, D, causal, det=False):
    from numba_kernels.cuda import flash_attention_backward as cfb
    H = c["w"][1].shape[1]
    return cfb.flash_bwd_tc_words(*c["w"], c["lse"], c["cu"], c["cu"], S, S, True, D ** -0.5, -1, 0 if causal else -1,
                                  lse_a=H, lse_c=S, deterministic=det)


def _sdpa_grads(c, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt, gt = c["t"]
    qh, kh, vh = (t.transpose(1, 2).detach().requires_grad_(True) for t in (qt, kt, vt))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
    return o, (qh, kh, vh), gt.transpose(1, 2)


def _err_vs(res, ref, shape):
    es = []
    for w, r in zip(res, ref):
        x = w.copy_to_host().view(np.uint16).view(bfloat16).astype(np.float32).reshape(shape)
        r = r.transpose(1, 2).float().cpu().numpy()
        es.append(float(np.linalg.norm(x - r) / np.linalg.norm(r)))
    return es


#: candidates ((dK/dV warps, query rows), (dQ warps, keys), dQ by reductions, kernel options) per head dim
SWEEP = {64: [((8, 64), (4, 32), True, {}), ((8, 64), (4, 32), True, {"WSKIP": False}),
              ((8, 64), (4, 32), True, {"VRED": False}), ((8, 32), (4, 32), True, {}),
              ((8, 64), (4, 32), False, {})],
         128: [((4, 32), (4, 32), False, {}), ((4, 32), (4, 32), True, {}), ((8, 32), (4, 32), True, {})]}


#: short sequences (S1024): smaller key tiles, two blocks per SM
SWEEP_1K = {64: [((8, 64), (4, 32), True, {}), ((4, 64), (4, 32), True, {}), ((4, 32), (4, 32), True, {}),
                 ((4, 64), (4, 32), False, {})]}


#: the dQ pass's tiles at D128 (its dK/dV runs on the wgmma kernel on Hopper, so the first entry is not used there)
SWEEP_DQ128 = {128: [((4, 32), (4, 32), False, {}), ((4, 32), (4, 64), False, {}), ((4, 32), (8, 32), False, {}),
                     ((4, 32), (8, 64), False, {}), ((4, 32), (2, 64), False, {})]}


def sweep(limit_s, S=4096, table=None):
    """Each candidate at S (causal and not), gradients checked against SDPA's; the fastest per head dim."""
    import torch
    from numba_kernels.cuda import flash_attention_backward as cfb
    H, B = 16, 16384 // S
    best = {}
    short_sk, cfb.TC_BWD_SHORT_SK = cfb.TC_BWD_SHORT_SK, 0  # the candidates in TC_BWD_TILES apply at every S
    dims = os.environ.get("SWEEP_D")  # e.g. SWEEP_D=128: only those head dims
    for D, cands in (table or SWEEP).items():
        if dims and str(D) not in dims.split(","):
            continue
        data = [(causal, _torch_case(B, S, H, D, causal)) for causal in (False, True)]
        refs = []
        for causal, c in data:
            o, ins, g = _sdpa_grads(c, causal)
            refs.append(torch.autograd.grad(o, ins, g))
        score = {}
        for ci, (tiles, dqt, atomic, opts) in enumerate(cands):
            if ci > 0 and time.time() - T0 > limit_s:
                print(f"sweep D{D} {tiles} {atomic} {opts}: skipped (time)", flush=True)
                continue
            cfb.TC_BWD_TILES[D] = (tiles, dqt, atomic)
            cfb.TC_BWD_OPTS.clear()
            cfb.TC_BWD_OPTS.update(opts)
            tf, errs = [], []
            for (causal, c), ref in zip(data, refs):
                errs += _err_vs(_ours(c, S, D, causal), ref, (B, S, H, D))
                fl = 2.5 * 4 * B * H * S * S * D / (2 if causal else 1)
                tf.append(fl / tbench(lambda: _ours(c, S, D, causal), 5) / 1e12)
            ok = max(errs) < 1e-2
            score[ci] = sum(tf) / 2 if ok else 0.0
            print(f"sweep D{D} tiles={tiles} dq={dqt} dq_reduce={int(atomic)} opts={opts}: TFLOP/s non-causal "
                  f"{tf[0]:6.1f} causal {tf[1]:6.1f}  max rel err vs sdpa {max(errs):.1e} {'ok' if ok else 'BAD'}",
                  flush=True)
        best[D] = cands[max(score, key=score.get)]
        print(f"sweep D{D} best: {best[D]}", flush=True)
        del data, refs
    cfb.TC_BWD_OPTS.clear()
    cfb.TC_BWD_SHORT_SK = short_sk
    return best


def bench(best=None):
    import torch

    from numba_kernels.cuda import flash_attention_backward as cfb

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = 2 * 8192 ** 3 / tbench(lambda: a @ a, 10) / 1e12
    rows = [f"peak bf16 matmul (torch 8192^3) {mm:.0f} TFLOP/s"]
    print(rows[0], flush=True)
    H = 16
    dims = [int(x) for x in os.environ.get("BWD_BENCH_D", "64,128").split(",")]
    lens = [int(x) for x in os.environ.get("BWD_BENCH_S", "1024,2048,4096,8192,16384").split(",")]
    for D in dims:
        if best:
            cfb.TC_BWD_TILES[D] = best[D][:3]
            cfb.TC_BWD_OPTS.clear()
            cfb.TC_BWD_OPTS.update(best[D][3])
        rows.append(f"D{D}: (dK/dV tiles, dQ tiles, dQ by reductions) = {cfb.TC_BWD_TILES[D]} opts {cfb.TC_BWD_OPTS}; "
                    f"Hopper wgmma (warpgroups, rows) {cfb.TC_BWD_WGMMA.get(D)} dQ fused {cfb.TC_BWD_WGMMA_DQ}")
        for S in lens:
            B = 16384 // S
            for causal in (False, True):
                c = _torch_case(B, S, H, D, causal)
                fl = 2.5 * 4 * B * H * S * S * D / (2 if causal else 1)
                t_ours = tbench(lambda: _ours(c, S, D, causal), 7)
                # GPU throughput with the host's launch cost hidden: 4 calls queued back to back
                t_pipe = tbench(lambda: [_ours(c, S, D, causal) for _ in range(4)], 3) / 4
                t_det = tbench(lambda: _ours(c, S, D, causal, True), 5) if S == 4096 else None
                o, ins, g = _sdpa_grads(c, causal)
                t_sdpa = tbench(lambda: torch.autograd.grad(o, ins, g, retain_graph=True), 7)
                err = ""
                if S <= 2048:  # same gradients as SDPA's for this exact config
                    es = _err_vs(_ours(c, S, D, causal), torch.autograd.grad(o, ins, g), (B, S, H, D))
                    err = f" rel_err_vs_sdpa dq/dk/dv {es[0]:.1e}/{es[1]:.1e}/{es[2]:.1e}"
                det = f" det {fl / t_det / 1e12:6.1f}" if t_det else ""
                r = (f"bwd D{D:3d} S{S:5d} B{B:2d} H{H} causal={int(causal)}  ours {fl / t_ours / 1e12:6.1f} TFLOP/s "
                     f"({t_ours * 1e3:7.3f} ms; queued {fl / t_pipe / 1e12:6.1f})  sdpa-flash {fl / t_sdpa / 1e12:6.1f}"
                     f"  ratio {t_sdpa / t_ours:5.2f}  frac-of-matmul {fl / t_ours / 1e12 / mm:4.2f}{det}{err}")
                print(r, flush=True)
                rows.append(r)
                del c, o, ins, g
    print("\n".join(rows))
    with open(os.path.join(OUT, "bench_gpu_backward.txt"), "w") as f:
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    best = None
    for step in sys.argv[1:] or ["check", "bench"]:  # in the order given
        if step == "sweep_dq128":
            sweep(1e9, 4096, SWEEP_DQ128)
        elif step.startswith("sweep1k"):
            sweep(1e9, 1024, SWEEP_1K)
        elif step.startswith("sweep"):  # sweep[=seconds]: later candidates are skipped past that many seconds
            best = sweep(float(step.split("=")[1]) if "=" in step else 1e9)
        elif step.startswith("check"):  # check or check=quick
            correctness(quick=step.endswith("quick"))
            print("FAILURES:", chk.fails if chk.fails else "none", flush=True)
        elif step == "bench":
            bench(best)
        print(f"[{step} done at {time.time() - T0:.0f} s]", flush=True)
