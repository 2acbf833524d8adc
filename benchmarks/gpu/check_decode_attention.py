"""On the GPU machine: correctness of CUDA decode attention (flash_attention_with_kvcache: contiguous and
paged caches of several page sizes, append + rotary, splits, every option, all dtypes; attention_combine)
against the float64 reference, then bf16 decode bandwidth (GB/s of K/V read) next to a same-run device
copy and torch SDPA on the same decode shape. Prints a table last.

``python check_decode_attention.py [check] [bench] [--quick]``"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Checks, import_library, tbench  # noqa: E402

nk = import_library()
from numba import cuda  # noqa: E402

from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.reference.decode_attention import (attention_combine_ref,  # noqa: E402
                                                       flash_attention_with_kvcache_ref)

T0 = time.time()
rng = np.random.default_rng(int(time.time()))
CHECKS = Checks(width=60)
err, report, fails = CHECKS.err, CHECKS.report, CHECKS.fails


def dev(x):
    return cuda.to_device(x.view(np.uint16) if x.dtype == bfloat16 else x)


def host(x, dt):
    h = x.copy_to_host()
    return h.view(bfloat16) if dt == bfloat16 else h


def make_case(dt, B, Sq, H, Hk, D, page, snew, seqlens, paged):
    cap = int(max(seqlens)) + snew + 3
    q = rng.standard_normal((B, Sq, H, D)).astype(dt)
    if paged:
        mb = -(-cap // page)
        nb = B * mb + 3
        kc = rng.standard_normal((nb, page, Hk, D)).astype(dt)
        vc = rng.standard_normal((nb, page, Hk, D)).astype(dt)
        bt = rng.permutation(nb)[:B * mb].reshape(B, mb).astype(np.int32)
    else:
        kc = rng.standard_normal((B, cap, Hk, D)).astype(dt)
        vc = rng.standard_normal((B, cap, Hk, D)).astype(dt)
        bt = None
    k = rng.standard_normal((B, snew, Hk, D)).astype(dt) if snew else None
    v = rng.standard_normal((B, snew, Hk, D)).astype(dt) if snew else None
    return q, kc, vc, k, v, bt


def check_one(name, dt, B=3, Sq=1, H=8, Hk=2, D=128, page=16, snew=1, paged=True, seqlens=(37, 900, 301),
              num_splits=0, rotary=None, device_caches=True, **kw):
    seqlens = np.array(seqlens[:B], np.int32)
    q, kc, vc, k, v, bt = make_case(dt, B, Sq, H, Hk, D, page, snew, seqlens, paged)
    if rotary is not None:
        n = int(seqlens.max()) + snew + Sq + 2
        kw.update(rotary_cos=rng.standard_normal((n, rotary // 2)), rotary_sin=rng.standard_normal((n, rotary // 2)),
                  rotary_interleaved=kw.pop("interleaved", True))
    kc_ref, vc_ref = kc.copy(), vc.copy()
    ref, lse_ref = flash_attention_with_kvcache_ref(q, kc_ref, vc_ref, k, v, cache_seqlens=seqlens,
                                                    block_table=bt, return_lse=True, **kw)
    kd, vd = (dev(kc), dev(vc)) if device_caches else (kc, vc)
    out, lse = nk.flash_attention_with_kvcache(q, kd, vd, k, v, cache_seqlens=seqlens, block_table=bt,
                                               num_splits=num_splits, return_lse=True, backend="cuda", **kw)
    out = host(out, dt) if hasattr(out, "copy_to_host") else out
    lse = lse.copy_to_host() if hasattr(lse, "copy_to_host") else lse
    kh = host(kd, dt) if device_caches else kd
    fin = np.isfinite(lse_ref)
    le = float(np.abs(lse[fin] - lse_ref[fin]).max()) if fin.any() else 0.0
    if not np.array_equal(np.isfinite(lse), fin):
        le = np.inf
    report(name, dt, max(err(out, ref), err(kh, kc_ref.astype(np.float64))))
    report(name + " (LSE, float32)", np.float32 if dt == np.float64 else dt, le)


def correctness(quick, extra_only=False):
    """Every case against the float64 reference; ``extra_only``: only the cases --quick leaves out, plus the
    many-split path (more splits than the kernel merges itself: the merge kernel)."""
    dts = (bfloat16, np.float16, np.float32, np.float64)
    if extra_only:
        for dt in dts:
            check_one("paged16 split 12 (merge kernel)", dt, num_splits=12, seqlens=(37, 2900, 1301))
            check_one("contig auto splits B1 (merge kernel)", dt, B=1, paged=False, snew=0, seqlens=(9000,))
            check_one("D=40 paged 16", dt, D=40)
            check_one("D=59 (CUDA cores)", dt, D=59, paged=False)
            check_one("D=256 split 5", dt, D=256, num_splits=5)
            check_one("Sq > keys, causal: masked rows, empty cache", dt, Sq=5, snew=0, causal=True, seqlens=(2, 900, 0))
        return
    for dt in dts:
        check_one("paged16 append", dt)
        check_one("paged7 causal Sq=5 split3", dt, page=7, Sq=5, snew=5, causal=True, num_splits=3)
        check_one("paged1 window", dt, page=1, window_size=(50, 0), seqlens=(37, 200, 90))
        check_one("contig rotary interleaved", dt, paged=False, rotary=64, snew=2, Sq=2, causal=True)
        check_one("contig rotary neox host-caches", dt, paged=False, rotary=32, interleaved=False,
                  device_caches=False)
        check_one("paged256 softcap alibi D64", dt, page=256, D=64, softcap=5.0,
                  alibi_slopes=rng.random(8).astype(np.float32))
        check_one("leftpad causal MQA", dt, paged=False, Hk=1, causal=True,
                  cache_leftpad=np.array([3, 0, 100], np.int32))
        check_one("cache_batch_idx", dt, paged=False, snew=0, cache_batch_idx=np.array([2, 0, 1], np.int32))
        check_one("Sq=40 G=4 (10 m-tiles) causal", dt, Sq=40, snew=40, causal=True)
        if not quick:
            check_one("D=40 paged 16", dt, D=40)
            check_one("D=59 (CUDA cores)", dt, D=59, paged=False)
            check_one("D=256 split 5", dt, D=256, num_splits=5)
            check_one("Sq > keys, causal: masked rows, empty cache", dt, Sq=5, snew=0, causal=True, seqlens=(2, 900, 0))
    # PagedKVCache on the device: prefill, fork, decode steps through attend, vs the reference per sequence
    for dt in dts:
        cache = nk.PagedKVCache(64, 7, 2, 64, dtype=dt, device="cuda")
        a = cache.new_sequence()
        toks = {a: [rng.standard_normal((30, 2, 64)).astype(dt) for _ in range(2)]}
        cache.append(a, *toks[a])
        b = cache.fork(a)
        toks[b] = [x.copy() for x in toks[a]]
        worst = 0.0
        for step in range(3):
            q = rng.standard_normal((2, 1, 8, 64)).astype(dt)
            kn, vn = (rng.standard_normal((2, 1, 2, 64)).astype(dt) for _ in range(2))
            out = cache.attend(q, [a, b], kn, vn, causal=True)
            out = host(out, dt) if hasattr(out, "copy_to_host") else out
            for r, sid in enumerate((a, b)):
                toks[sid] = [np.concatenate([toks[sid][0], kn[r]]), np.concatenate([toks[sid][1], vn[r]])]
                ref = flash_attention_with_kvcache_ref(q[r:r + 1], toks[sid][0][None].copy(), toks[sid][1][None].copy(),
                                                       causal=True)
                worst = max(worst, err(out[r:r + 1], ref))
        report("PagedKVCache(cuda) fork + 3 decode steps", dt, worst)
    # attention_combine on the device
    S, B, Sq, H, D = 4, 2, 3, 4, 64
    o = rng.standard_normal((S, B, Sq, H, D)).astype(np.float32)
    lp = rng.standard_normal((S, B, H, Sq)).astype(np.float32)
    lp[1, 0, 0, 0] = -np.inf
    lp[:, 1, 1, 1] = -np.inf
    ref, lref = attention_combine_ref(o, np.transpose(lp, (0, 1, 3, 2)))
    out, lse = nk.attention_combine(cuda.to_device(o), cuda.to_device(lp), return_lse=True)
    report("attention_combine (device)", np.float32, err(out.copy_to_host(), ref))


def dtime(fn, n=20):
    """Device seconds per call of ``fn``: the GPU first runs a 50 ms sleep kernel while the host enqueues
    n calls, so host launch overhead is hidden and the events see only GPU execution (numba's deferred
    frees are held back so no call synchronizes)."""
    import torch

    fn()
    torch.cuda.synchronize()
    with cuda.defer_cleanup():
        torch.cuda._sleep(100_000_000)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3 / n


def _setup(B, S, layout, H=32, Hk=8, D=128):
    """bf16 decode case on the device: caches filled on the GPU, a block table, the plan and its metadata."""
    import torch

    from numba_kernels.decode_attention import _plan

    page = {"contig": S, "page16": 16, "page256": 256}[layout]
    mb = S // page
    nbk = B * mb
    k_t = torch.randn((nbk, page, Hk, D), device="cuda", dtype=torch.bfloat16)
    v_t = torch.randn((nbk, page, Hk, D), device="cuda", dtype=torch.bfloat16)
    kc = cuda.as_cuda_array(k_t.view(torch.int16)).view(np.uint16)
    vc = cuda.as_cuda_array(v_t.view(torch.int16)).view(np.uint16)
    bt = (np.arange(nbk).reshape(B, mb) if layout == "contig" else rng.permutation(nbk).reshape(B, mb)).astype(np.int32)
    q = rng.standard_normal((B, 1, H, D)).astype(bfloat16)
    seqlens = np.full(B, S, np.int32)
    plan = _plan(q, kc, vc, None, None, None, None, seqlens, None, None, bt, None, False, (-1, -1), 0.0, None, 0)
    qd = cuda.to_device(q.view(np.uint16))
    meta = tuple(cuda.to_device(a.astype(np.int32)) for a in (plan.table, plan.leftpad, plan.end))
    return dict(k_t=k_t, v_t=v_t, kc=kc, vc=vc, bt=bt, q=q, qd=qd, seqlens=seqlens, plan=plan, meta=meta)


def tiles_sweep():
    """Kernel time of the tensor-core decode kernel per (warps, stages), at two large shapes."""
    from numba_kernels.cuda.decode_attention import attend_cuda

    for B, S in ((8, 32768), (32, 8192), (1, 131072)):
        c = _setup(B, S, "page16")
        kv_bytes = 2 * B * S * 8 * 128 * 2
        line = []
        for tiles in ((4, 2), (4, 3), (4, 4), (2, 4), (2, 6), (8, 2)):
            t = dtime(lambda: attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16", tiles))
            line.append(f"{tiles}: {t * 1e6:7.1f} us {kv_bytes / t / 1e12:4.2f} TB/s")
        print(f"tiles B{B} S{S} page16 | " + " | ".join(line), flush=True)
        del c


def poison():
    """NaN/0xFF bytes into every pooled result buffer and split scratch of the CUDA decode path, so a variant
    that leaves an element unwritten cannot pass on an earlier variant's values."""
    from numba_kernels.cuda import decode_attention as cda

    arrs = [ent[0] for lst in cda._pool.values() for ent in lst]
    arrs += [a for k, a in cda._workspace.items() if k[0] != "counters"]
    for a in arrs:
        a.copy_to_device(np.frombuffer(b"\xff" * a.nbytes, dtype=a.dtype).reshape(a.shape))


def torch_ref(c, B, S, H=32, Hk=8, D=128):
    """float64 decode attention of case c (its q, caches and block table) on the device with torch."""
    import torch

    bt = torch.as_tensor(c["bt"], device="cuda").long()
    k = c["k_t"][bt].reshape(B, S, Hk, D).double()
    v = c["v_t"][bt].reshape(B, S, Hk, D).double()
    q = torch.as_tensor(c["q"].astype(np.float64), device="cuda").reshape(B, Hk, H // Hk, D)
    s = torch.einsum("bhgd,bshd->bhgs", q, k) / np.sqrt(D)
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhgs,bshd->bhgd", p, v)
    del k, v
    return o.reshape(B, 1, H, D).cpu().numpy()


#: staged kernel: (warps, stages, keys per tile, L2 prefetch, Q in registers, early page lookups, K/V through
#: registers, LEAN bits); direct-operand kernel: ("direct", warps, PIPE, register cap). VARIANTS=a,b,... picks
#: by index.
VARIANTS = [(4, 3, 16, False, False, True, False, 0), (4, 3, 16, False, False, True, False, 7),
            (4, 2, 16, False, False, False, True, 0), (4, 2, 16, False, False, False, True, 7),
            (4, 3, 16, False, False, True, False, 1), (4, 3, 16, False, False, True, False, 3),
            (4, 2, 32, False, False, True, False, 7), (4, 3, 16, False, True, True, False, 7),
            ("direct", 4, 1, 0), ("direct", 8, 1, 0), (4, 2, 16, False, False, True, True, 7),
            (2, 2, 16, False, False, True, True, 7), (8, 2, 16, False, False, True, True, 7)]
if os.environ.get("VARIANTS"):
    VARIANTS = [VARIANTS[int(i)] for i in os.environ["VARIANTS"].split(",")]


def variants_sweep(deadline):
    """Each tensor-core configuration (warps, stages, keys per tile, L2 prefetch, Q in registers) with its own
    occupancy-aware automatic split count: error against a float64 torch reference (poisoned outputs first)
    and device time, at a few bf16 shapes (paged 16)."""
    import torch

    from numba_kernels.cuda.decode_attention import attend_cuda, choose_splits, direct_blocks_per_sm, tc_blocks_per_sm

    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    tc = dtime(lambda: y.copy_(x))
    print(f"device copy: {2 * x.numel() / tc / 1e12:.2f} TB/s (read + write of 1 GiB)", flush=True)
    del x, y
    shapes = ((8, 32768, "contig"), (32, 8192, "contig"), (8, 32768, "page16"), (32, 8192, "page256"),
              (1, 131072, "contig"), (1, 16384, "page16"))
    if os.environ.get("VSHAPES"):  # e.g. VSHAPES=1x1024:contig,1x4096:page16
        shapes = tuple((int(x.split("x")[0]), int(x.split("x")[1].split(":")[0]), x.split(":")[1])
                       for x in os.environ["VSHAPES"].split(","))
    for B, S, layout in shapes:
        c = _setup(B, S, layout)
        ref = torch_ref(c, B, S)
        kv_bytes = 2 * B * S * 8 * 128 * 2
        for cfg in VARIANTS * 2:  # twice, interleaved: the second round shows the run-to-run spread
            if time.time() - T0 > deadline:
                print(f"variants: deadline, skipping B{B} S{S} {cfg}", flush=True)
                continue
            t1 = time.time()
            poison()
            out, _ = attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16", cfg)
            e = err(host(out, bfloat16), ref)
            report(f"variant {cfg} B{B} S{S} {layout}", bfloat16, e)
            t = dtime(lambda: attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16", cfg))
            if cfg[0] == "direct":
                bps = direct_blocks_per_sm(cfg[1], 128, True, False, False, True, cfg[2], cfg[3])
            else:
                bps = tc_blocks_per_sm(cfg[0], 128, True, False, False, *cfg[1:])
            ns = choose_splits(c["plan"], 1, bps, short_cap=cfg[0] != "direct")
            print(f"variant B{B:3d} S{S:7d} {layout:7s} {str(cfg):40s} blocks/SM {bps} splits {ns:3d} {t * 1e6:8.1f} us "
                  f"{kv_bytes / t / 1e12:5.2f} TB/s  (setup+compile {time.time() - t1:5.1f} s)", flush=True)
        del c


def splits_sweep():
    """Device time per num_splits at a few shapes (what the automatic choice is tuned on)."""
    from numba_kernels.cuda.decode_attention import attend_cuda, choose_splits

    for B, S in ((1, 16384), (1, 131072), (8, 4096)):
        c = _setup(B, S, "page16")
        kv_bytes = 2 * B * S * 8 * 128 * 2
        auto = choose_splits(c["plan"], 1, 2)
        line = []
        for ns in (4, 8, 16, 24, 33, 48, 64):
            if ns * 256 > S and ns > 1:
                continue
            c["plan"].num_splits = ns
            t = dtime(lambda: attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16"))
            line.append(f"{ns}: {t * 1e6:.1f} us {kv_bytes / t / 1e12:.2f}")
        print(f"splits B{B} S{S} (auto {auto}) | " + " | ".join(line), flush=True)
        del c


def layout_probe():
    """Same decode work, cache stored seq-major (B, S, Hk, D) (the flash-attn layout) vs head-major: each
    (sequence, k/v head) as its own batch row (B*Hk, S, 1, D) with its G query heads, which is SDPA's layout."""
    import torch

    from numba_kernels.cuda.decode_attention import attend_cuda
    from numba_kernels.decode_attention import _plan

    for B, S in ((8, 32768), (32, 8192), (1, 131072)):
        c = _setup(B, S, "contig")
        kv_bytes = 2 * B * S * 8 * 128 * 2
        t_seq = dtime(lambda: attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16"))
        kh = c["k_t"].view(B, S, 8, 128).transpose(1, 2).contiguous().view(B * 8, S, 1, 128)
        vh = c["v_t"].view(B, S, 8, 128).transpose(1, 2).contiguous().view(B * 8, S, 1, 128)
        kc = cuda.as_cuda_array(kh.view(torch.int16)).view(np.uint16)
        vc = cuda.as_cuda_array(vh.view(torch.int16)).view(np.uint16)
        q = np.ascontiguousarray(c["q"].reshape(B, 1, 8, 4, 128).transpose(0, 2, 1, 3, 4).reshape(B * 8, 1, 4, 128))
        bt = np.arange(B * 8, dtype=np.int32)[:, None]
        sl = np.full(B * 8, S, np.int32)
        plan = _plan(q, kc, vc, None, None, None, None, sl, None, None, bt, None, False, (-1, -1), 0.0, None, 0)
        qd = cuda.to_device(q.view(np.uint16))
        meta = tuple(cuda.to_device(a.astype(np.int32)) for a in (plan.table, plan.leftpad, plan.end))
        t_head = dtime(lambda: attend_cuda(plan, qd, kc, vc, *meta, "bf16"))
        print(f"layout B{B} S{S}: seq-major {t_seq * 1e6:.1f} us {kv_bytes / t_seq / 1e12:.2f} TB/s | head-major "
              f"{t_head * 1e6:.1f} us {kv_bytes / t_head / 1e12:.2f} TB/s", flush=True)
        del c, kh, vh, kc, vc


def profile_call():
    import cProfile
    import pstats

    from numba_kernels.cuda.decode_attention import attend_cuda

    for B, S, layout in ((1, 4096, "page16"), (1, 16384, "contig")):
        c = _setup(B, S, layout)
        kw = dict(block_table=c["bt"], cache_seqlens=c["seqlens"])
        for fn, label in ((lambda: attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16"),  # noqa: B023
                           "attend_cuda"),
                          (lambda: nk.flash_attention_with_kvcache(c["qd"], c["kc"], c["vc"], **kw),  # noqa: B023
                           "public call")):
            fn()
            cuda.synchronize()
            t1 = tbench(fn, iters=20)
            pr = cProfile.Profile()
            t = time.perf_counter()
            pr.enable()
            for _ in range(50):
                fn()
            pr.disable()
            cuda.synchronize()
            print(f"--- B{B} S{S} {layout} {label}: {(time.perf_counter() - t) / 50 * 1e6:.1f} us per call (host, "
                  f"incl. sync at end; profiled) | one call between events {t1 * 1e6:.1f} us")
            pstats.Stats(pr).sort_stats("tottime").print_stats(14)


def bench(quick):
    import torch
    import torch.nn.functional as F

    from numba_kernels.cuda.decode_attention import attend_cuda

    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    tc = dtime(lambda: y.copy_(x))
    copy_bw = 2 * x.numel() / tc
    print(f"device copy: {copy_bw / 1e12:.2f} TB/s (read + write of 1 GiB)", flush=True)
    del x, y
    H, Hk, D = 32, 8, 128
    rows = []
    shapes = [(1, 1024), (1, 16384), (1, 131072), (8, 4096), (8, 32768), (8, 131072), (32, 8192), (64, 1024),
              (64, 16384)]
    if quick:
        shapes = [(1, 16384), (8, 32768), (32, 8192)]
    elif "--rest" in sys.argv:  # the shapes --quick leaves out
        shapes = [x for x in shapes if x not in ((1, 16384), (8, 32768), (32, 8192))]
    deadline = float(os.environ.get("DEADLINE", "1e9"))
    for B, S in shapes:
        for layout in ("contig", "page16", "page256"):
            if time.time() - T0 > deadline:
                print(f"bench: deadline, skipping B{B} S{S} {layout}", flush=True)
                continue
            c = _setup(B, S, layout, H, Hk, D)
            kw = dict(block_table=c["bt"], cache_seqlens=c["seqlens"])
            t_kernel = dtime(lambda: attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16"))
            t_call = tbench(lambda: nk.flash_attention_with_kvcache(c["qd"], c["kc"], c["vc"], **kw), iters=10)
            kv_bytes = 2 * B * S * Hk * D * 2
            t_sdpa = t_sdpa_call = float("nan")
            if layout == "contig":
                kt = c["k_t"].view(B, S, Hk, D).transpose(1, 2).contiguous()  # SDPA's own layout (B, Hk, S, D)
                vt = c["v_t"].view(B, S, Hk, D).transpose(1, 2).contiguous()
                qt = torch.as_tensor(c["q"].view(np.int16), device="cuda").view(torch.bfloat16).transpose(1, 2)
                qt = qt.contiguous()
                try:
                    t_sdpa = dtime(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
                    t_sdpa_call = tbench(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
                except Exception as ex:  # pragma: no cover - peer missing a path
                    print("sdpa failed:", ex)
                del kt, vt
            row = (B, S, layout, t_kernel, t_call, kv_bytes / t_kernel, kv_bytes / t_kernel / copy_bw, t_sdpa,
                   kv_bytes / t_sdpa if t_sdpa == t_sdpa else float("nan"), t_sdpa_call)
            rows.append(row)
            print(f"B{B:3d} S{S:7d} {layout:8s} device {t_kernel * 1e6:8.1f} us  call {t_call * 1e6:8.1f} us  "
                  f"{row[5] / 1e12:5.2f} TB/s ({row[6]:4.0%} of copy)  sdpa device {t_sdpa * 1e6:8.1f} us "
                  f"({row[8] / 1e12:5.2f} TB/s) call {t_sdpa_call * 1e6:8.1f} us ratio {t_sdpa / t_kernel:4.2f}x",
                  flush=True)
            del c
            torch.cuda.empty_cache()
    print("\n| B | cache | layout | ours device us | ours K/V TB/s | of copy | SDPA device us | SDPA TB/s "
          "| SDPA / ours (device) | ours public call us | SDPA call us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B, S, layout, tk, tcall, bw, frac, ts, sbw, tsc in rows:
        print(f"| {B} | {S} | {layout} | {tk * 1e6:.1f} | {bw / 1e12:.2f} | {frac:.0%} | {ts * 1e6:.1f} | "
              f"{sbw / 1e12:.2f} | {ts / tk:.2f}x | {tcall * 1e6:.1f} | {tsc * 1e6:.1f} |")


if __name__ == "__main__":
    args = sys.argv[1:] or ["check", "bench"]
    if "profile" in args:
        profile_call()
    if "tiles" in args:
        tiles_sweep()
    if "splits" in args:
        splits_sweep()
    if "layout" in args:
        layout_probe()
    quick = "--quick" in args
    print(cuda.get_current_device().name, time.strftime("%Y-%m-%d %H:%M"), flush=True)
    if "check" in args or "extra" in args:
        correctness(quick, "extra" in args)
        print(f"correctness: {len(fails)} failures {fails} ({time.time() - T0:.0f} s since start)", flush=True)
    if "variants" in args:
        variants_sweep(float(os.environ.get("VDEADLINE", "1e9")))
        print(f"variants: {len(fails)} failures so far {fails} ({time.time() - T0:.0f} s since start)", flush=True)
    if "bench" in args:
        bench(quick)
