"""On the GPU machine: correctness of every CUDA flash_attention path against the float64 reference,
then bf16 forward speed next to torch SDPA (flash backend) in the same run. Prints a table last."""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_library, tbench  # noqa: E402

nk = import_library()
from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.reference.flash_attention import flash_attention_ref, flash_attention_varlen_ref  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
rng = np.random.default_rng(int(time.time()))
TOL = {np.dtype(np.float16): 2e-2, bfloat16: 6e-2, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}
fails = []


def rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def check(name, dt, B, Sq, Sk, H, Hk, D, **kw):
    q = rng.standard_normal((B, Sq, H, D)).astype(dt)
    k = rng.standard_normal((B, Sk, Hk, D)).astype(dt)
    v = rng.standard_normal((B, Sk, Hk, D)).astype(dt)
    t = time.perf_counter()
    o, l = nk.flash_attention(q, k, v, return_lse=True, backend="cuda", **kw)
    dtc = time.perf_counter() - t
    ro, rl = flash_attention_ref(q, k, v, return_lse=True, **kw)
    e = rel(o, ro)
    fin = np.isfinite(rl)
    el = float(np.abs(l[fin] - rl[fin]).max()) if fin.any() else 0.0
    ok = (o.dtype == np.dtype(dt)) and np.isfinite(o.astype(np.float32)).all() and e < TOL[np.dtype(dt)] \
        and el < 1e-3 and np.array_equal(np.isfinite(l), fin)
    print(f"{'ok ' if ok else 'BAD'} {name:28s} {np.dtype(dt).name:8s} B{B} Sq{Sq} Sk{Sk} H{H}/{Hk} D{D} "
          f"rel_err {e:.2e} lse_err {el:.1e} ({dtc:.1f}s incl. compile)", flush=True)
    if not ok:
        fails.append(name)


def correctness():
    opts = {"plain": {}, "causal": dict(causal=True), "window": dict(window_size=(17, 5)),
            "softcap+alibi": dict(softcap=5.0, alibi_slopes=rng.random(4).astype(np.float32)),
            "dropout": dict(dropout_p=0.2, seed=123), "causal+window": dict(causal=True, window_size=(9, -1))}
    for dt in (np.float16, bfloat16, np.float32, np.float64):
        for D in ((40, 64, 80, 96, 128, 256) if dt in (np.float16, bfloat16) else (40, 128, 256)):
            check("plain", dt, 2, 97, 113, 4, 2, D)
        for name, kw in opts.items():
            check(name, dt, 2, 97, 113, 4, 2, 64, **kw)
        check("causal Sq>Sk (masked rows)", dt, 1, 130, 61, 4, 1, 64, causal=True)
        check("long causal GQA", dt, 1, 1025, 1025, 8, 2, 128, causal=True)
    # dropout mask identical to the CPU backend's
    q, k, v = (rng.standard_normal((1, 200, 2, 64)).astype(np.float32) for _ in range(3))
    a = nk.flash_attention(q, k, v, dropout_p=0.3, seed=99, backend="cuda")
    b = nk.flash_attention(q, k, v, dropout_p=0.3, seed=99, backend="cpu")
    ok = np.abs(a - b).max() < 1e-4
    print(f"{'ok ' if ok else 'BAD'} dropout mask cuda == cpu: max diff {np.abs(a - b).max():.1e}")
    if not ok:
        fails.append("dropout cuda==cpu")
    # varlen
    lens_q, lens_k = [5, 130, 1, 64], [7, 100, 33, 64]
    cq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    for dt in (np.float16, np.float32):
        q = rng.standard_normal((cq[-1], 4, 64)).astype(dt)
        k, v = (rng.standard_normal((ck[-1], 2, 64)).astype(dt) for _ in range(2))
        o, l = nk.flash_attention_varlen(q, k, v, cq, ck, causal=True, return_lse=True, backend="cuda")
        ro, rl = flash_attention_varlen_ref(q, k, v, cq, ck, causal=True, return_lse=True)
        e = rel(o, ro)
        ok = e < TOL[np.dtype(dt)] and np.array_equal(np.isfinite(l), np.isfinite(rl))
        print(f"{'ok ' if ok else 'BAD'} varlen causal {np.dtype(dt).name} rel_err {e:.2e}")
        if not ok:
            fails.append("varlen")
    # device arrays in -> device arrays out
    from numba import cuda
    q, k, v = (rng.standard_normal((2, 64, 4, 64)).astype(np.float16) for _ in range(3))
    dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
    o = nk.flash_attention(dq, dk, dv, causal=True)
    ok = hasattr(o, "copy_to_host") and rel(o.copy_to_host(), flash_attention_ref(q, k, v, causal=True)) < 2e-2
    print(f"{'ok ' if ok else 'BAD'} device in -> device out ({type(o).__name__})")
    try:
        qb = cuda.to_device(q.astype(bfloat16))
        print("numba device array of bfloat16:", qb.dtype)
    except Exception as ex:  # noqa: BLE001
        print("numba device array of bfloat16 fails:", type(ex).__name__, ex)


def bench():
    import torch
    import torch.nn.functional as F
    from numba import cuda
    from torch.nn.attention import SDPBackend, sdpa_kernel

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = 2 * 8192 ** 3 / tbench(lambda: a @ a, 10) / 1e12
    x = torch.randn(2 ** 30 // 4, device="cuda")
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / tbench(lambda: y.copy_(x), 10) / 1e12
    del a, x, y
    rows = [f"peak bf16 matmul (torch 8192^3) {mm:.0f} TFLOP/s; device copy {bw:.2f} TB/s"]
    print(rows[0], flush=True)
    from numba_kernels.cuda import flash_attention as cfa

    def time_tiles(D, S, causal):
        H, B = 2048 // D, 16384 // S
        qt, kt, vt = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qw, kw, vw = (cuda.as_cuda_array(t.view(torch.int32).view(B * S, H, D // 2)).view(np.uint32)
                      for t in (qt, kt, vt))
        cu = np.arange(B + 1, dtype=np.int32) * S
        ow = cuda.device_array(qw.shape, dtype=np.uint32)
        lw = cuda.device_array(H * B * S, dtype=np.float32)
        t = tbench(lambda: cfa.flash_fwd_cuda_words(qw, kw, vw, cu, cu, S, True, D ** -0.5, -1, 0 if causal else -1,
                                                    out=ow, lse=lw))
        return 4 * B * H * S * S * D / (2 if causal else 1) / t / 1e12

    variants = {64: [(4, 1, 128), (4, 2, 64), (8, 2, 64), (4, 2, 128)],
                128: [(8, 1, 64), (4, 2, 64), (4, 2, 32), (8, 2, 32)]}
    for D, cands in variants.items():
        score = {}
        for tiles in cands:
            cfa.TC_TILES[D] = tiles
            try:
                score[tiles] = time_tiles(D, 4096, False) + time_tiles(D, 4096, True)
                r = f"tile sweep D{D} (warps, m-tiles, keys)={tiles}: non-causal+causal S4096 sum {score[tiles]:.1f} TFLOP/s"
            except Exception as ex:  # noqa: BLE001
                r = f"tile sweep D{D} {tiles}: failed {type(ex).__name__}: {str(ex)[:200]}"
            print(r, flush=True)
            rows.append(r)
        cfa.TC_TILES[D] = max(score, key=score.get)
    for D in (64, 128):
        tiles = cfa.tc_config(D)
        H = 2048 // D
        for S in (1024, 2048, 4096, 8192, 16384):
            B = 16384 // S
            for causal in (False, True):
                qt, kt, vt = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                # ours: bf16 travels as uint32 words (two halves); same bytes as qt
                qw, kw, vw = (cuda.as_cuda_array(t.view(torch.int16).view(torch.int32).view(B * S, H, D // 2))
                              for t in (qt, kt, vt))
                qw, kw, vw = (w.view(np.uint32) if w.dtype != np.uint32 else w for w in (qw, kw, vw))
                cu = np.arange(B + 1, dtype=np.int32) * S
                right = 0 if causal else -1

                ow = cuda.device_array(qw.shape, dtype=np.uint32)
                lw = cuda.device_array(H * B * S, dtype=np.float32)

                def ours():
                    cfa.flash_fwd_cuda_words(qw, kw, vw, cu, cu, S, True, D ** -0.5, -1, right, out=ow, lse=lw)
                fl = 4 * B * H * S * S * D / (2 if causal else 1)
                t_ours = tbench(ours)
                qh, kh, vh = (t.transpose(1, 2) for t in (qt, kt, vt))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    t_sdpa = tbench(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal))
                # correctness of this exact config against SDPA
                ow.copy_to_device(np.full(ow.shape, 0x7FC07FC0, np.uint32))  # poison (bf16 NaN pairs)
                ours()
                ob = ow.copy_to_host().view(np.uint16).view(bfloat16).astype(np.float32).reshape(B, S, H, D)
                ref = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal).transpose(1, 2).float().cpu().numpy()
                err = float(np.linalg.norm(ob - ref) / np.linalg.norm(ref))
                r = (f"tiles(warps,keys,Dp)={tiles} D{D:3d} S{S:5d} B{B:2d} H{H:2d} causal={int(causal)}  ours {fl / t_ours / 1e12:6.1f} TFLOP/s "
                     f"({t_ours * 1e3:7.3f} ms)  sdpa-flash {fl / t_sdpa / 1e12:6.1f}  ratio {t_sdpa / t_ours:5.2f}  "
                     f"frac-of-matmul {fl / t_ours / 1e12 / mm:4.2f}  rel_err_vs_sdpa {err:.1e}")
                print(r, flush=True)
                rows.append(r)
                del qt, kt, vt
    # the public call end to end (validation, dispatch, allocation) with float16 device arrays
    qt, kt, vt = (torch.randn(4, 4096, 16, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    t_pub = tbench(lambda: nk.flash_attention(qt, kt, vt, causal=True))
    fl = 4 * 4 * 16 * 4096 * 4096 * 128 / 2
    rows.append(f"public nk.flash_attention, torch fp16 device tensors in, B4 S4096 H16 D128 causal: "
                f"{fl / t_pub / 1e12:.1f} TFLOP/s ({t_pub * 1e3:.3f} ms)")
    # fp32 CUDA-core kernel, one size
    qt, kt, vt = (torch.randn(4096, 16, 64, device="cuda", dtype=torch.float32) for _ in range(3))
    q32, k32, v32 = (cuda.as_cuda_array(t) for t in (qt, kt, vt))
    t32 = tbench(lambda: nk.flash_attention(q32.reshape(1, 4096, 16, 64), k32.reshape(1, 4096, 16, 64),
                                            v32.reshape(1, 4096, 16, 64)))
    fl = 4 * 16 * 4096 * 4096 * 64
    rows.append(f"fp32 simt D64 S4096 H16: {fl / t32 / 1e12:.1f} TFLOP/s ({t32 * 1e3:.2f} ms)")
    print("\n".join(rows))
    with open(os.path.join(OUT, "bench_gpu.txt"), "w") as f:
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    which = sys.argv[1:] or ["check", "bench"]
    if "check-mt2" in which:  # the same checks with two m-tiles per warp wherever the head dim allows
        from numba_kernels.cuda import flash_attention as cfa

        saved = dict(cfa.TC_TILES)
        cfa.TC_TILES.update({64: (4, 2, 64), 128: (4, 2, 32)})
        correctness()
        print("FAILURES (2 m-tiles):", fails if fails else "none", flush=True)
        cfa.TC_TILES.update(saved)
    if "check" in which:
        correctness()
        print("FAILURES:", fails if fails else "none", flush=True)
    if "bench" in which:
        bench()
