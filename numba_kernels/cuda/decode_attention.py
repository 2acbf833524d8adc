"""Decode attention on CUDA: host side (append + rotary, kernel and split choice, launch, split merge).

Kernels and the design notes are in ``_decode_kernels``. float16/bfloat16 with a head dim that is a
multiple of 8 run on tensor cores; everything else on CUDA cores. Host cost per call is kept small: kernels
launch through ``_launch`` (cached cuLaunchKernel), metadata goes up through pinned asynchronous uploads
(one device buffer per role), results come from a pool of buffers the caller has released.
"""
import functools
import sys

import numpy as np
from numba import cuda

from numba_kernels import _dispatch as dsp
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _launch as fl
from numba_kernels.cuda._conv1d_kernels import ELEM, kind_of
from numba_kernels.cuda._decode_kernels import MAX_SPLITS, direct_dp, make_decode_direct, make_decode_tc
from numba_kernels.cuda._decode_simt import make_append_kv, make_combine, make_decode_simt, make_rotate
from numba_kernels.cuda._attn_common import LOG2E
from numba_kernels.cuda.flash_attention import _cached

#: tensor-core kernel (warps, shared-memory stages per warp, keys per warp tile, L2 prefetch hint, Q in
#: registers, page lookups one iteration early, K/V through registers instead of cp.async, LEAN bits) on the GPU /
#: in the simulator; CUDA-core kernel (warps, max packed rows per block). K/V through registers with all LEAN bits
#: (per-lane copy offsets, unmasked interior tiles, lazy rescale): H200 bf16 D128 (2026-12-03,
#: benchmarks/results/gpu_h200_2026-12-03b_decode_lean_variants.txt) B32 / 8k 268 -> 250 us, B1 / 128k (33 splits)
#: 148 -> 136 us, B8 / 32k (4 splits) 274 -> 257 us against the cp.async kernel without LEAN, correct against
#: float64 (the LEAN bits alone on the cp.async kernel: 2-3%; through registers without them: B32 / 8k 305 us);
#: early page lookups on top (..._decode_tpf_variants.txt): B32 / 8k 256 -> 248 us, B8 / 32k page 16 264 -> 260.
TC_TILES = {"gpu": (4, 2, 16, False, False, True, True, 7), "sim": (2, 2, 16, False, False, True, True, 7)}
#: the configuration for padded head dims above 128, where one K/V tile in registers (8 * 16 * DP / 256 words per
#: lane) would spill (D 256 through registers: 255 registers, ~800 bytes of spills); None = TC_TILES
TC_TILES_WIDE = {"gpu": (4, 3, 16, False, False, True, False, 7), "sim": None}
#: the configuration for small jobs (padded head dim <= 128 and at most SMALL_JOB_KEYS keys over all row groups:
#: batch x k/v heads x 16-row tiles x longest cache): 32-key tiles through cp.async, one resident block per SM, so
#: at most 16 splits at Hk 8. H200 bf16 D128 (2026-12-03, device time, same runs; benchmarks/results/
#: gpu_h200_2026-12-03c_decode_small_variants.txt, ..._bc32_mid.txt, ..._bc32_large.txt): B1 / 4k 16.7 -> 15.2
#: us, B1 / 16k page 16 34.0 -> 31.5, B2 / 8k 31.7 -> 29.9, B4 / 4k 31.7 -> 29.5, B1 / 1k 13.4 both; slower on
#: large jobs, which keep TC_TILES: B1 / 128k 137.6 vs 146.5, B8 / 32k 254.5 vs 272, B32 / 8k 244.0 vs 265.8.
#: None = TC_TILES everywhere
TC_TILES_SMALL = {"gpu": (4, 2, 32, False, False, True, False, 7), "sim": None}
#: measured small at 2^17 (the four above) and large from 2^20; the boundary between is not measured
SMALL_JOB_KEYS = 1 << 18
#: (warps, PIPE, register cap) of the direct-operand tensor-core kernel (``_decode_kernels.make_decode_direct``:
#: K/V loaded straight into mma fragments, no shared-memory stage) when it is the default for head dims 64 / 128;
#: None = the staged kernel everywhere. Off: slower than the staged kernel on the H200 (bf16 D128, 2026-12-02/03,
#: benchmarks/results/gpu_h200_2026-12-03_decode_direct_variants.txt: 2.9-3.0 vs 3.9-4.1 TB/s at B8 / 32k and
#: B32 / 8k; 212 registers, 2 blocks of 4 warps per SM, one tile of loads in flight per warp). Reachable as
#: ``attend_cuda(..., tc_tiles=("direct", warps, PIPE, cap))``.
DIRECT_TILES = {"gpu": None, "sim": None}
SIMT_TILES = {"gpu": (4, 8), "sim": (2, 2)}
#: keys a split must at least get before the key range is split further. 64: H200 bf16 B1 / 1k (2026-12-03,
#: benchmarks/results/gpu_h200_2026-12-03_decode_small_probe_after.txt) 4 splits 18.2 us, 8 15.7, 16 13.7; at 4k,
#: 16 splits 18.5 us vs 33 19.5; larger caches are bounded by the resident block slots instead
MIN_SPLIT_KEYS = 64
#: tensor-core kernel, caches of at most SHORT_CACHE_KEYS keys: at most SHORT_CACHE_SPLITS splits. H200 bf16 B1
#: Hk 8 (2026-12-03, gpu_h200_2026-12-03b_decode_small_probe_reg.txt / _wholetiles.txt): 4k cache 16 splits
#: 17.1 / 16.8 us against 19.1 / 19.1 with the 33 of a full wave (merging 33 partials costs more than the extra
#: blocks gain); 1k: 16 splits is also the best (13.5 us); 16k: 16 splits 35.5 / 34.6 vs 33 34.6 / 34.0, so longer
#: caches keep the full wave
SHORT_CACHE_KEYS = 4096
SHORT_CACHE_SPLITS = 16
#: the tensor-core kernel merges up to this many splits itself (last block per row group); more go to the
#: merge kernel (H100: B8 4 splits fused 393 us vs 398 two launches; B1 33 splits fused 58 us vs 51)
FUSED_MERGE_MAX = 8
#: resident blocks per SM of the tensor-core kernel when the driver cannot tell (simulator)
TC_BLOCKS_PER_SM = 2


def _mode():
    return "sim" if intr.SIM else "gpu"


def tc_config(DP, mode=None, job_keys=None):
    """The tensor-core kernel configuration (8 fields, see TC_TILES) for padded head dim DP; ``job_keys`` (batch x
    k/v heads x 16-row tiles x longest cache) picks TC_TILES_SMALL up to SMALL_JOB_KEYS."""
    mode = mode or _mode()
    if DP > 128:
        return TC_TILES_WIDE.get(mode) or TC_TILES[mode]
    if job_keys is not None and job_keys <= SMALL_JOB_KEYS and TC_TILES_SMALL.get(mode):
        return TC_TILES_SMALL[mode]
    return TC_TILES[mode]


def _num_sms():
    if intr.SIM:
        return 1
    return _sm_count(fl.context_key())


@functools.lru_cache(maxsize=None)
def _sm_count(ctx):
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


_workspace = {}


def _counters(n):
    """Zeroed int32 split counters, at least n, kept per device (every kernel resets the ones it used)."""
    key = ("counters", fl.context_key())
    buf = _workspace.get(key)
    if buf is None or buf.shape[0] < n:
        buf = _workspace[key] = cuda.to_device(np.zeros(max(n, 4096), np.int32))
    return buf


def _scratch(shape, dtype):
    """Split partials, reused across calls (one per shape/dtype and device; every launch is on the default
    stream, so a later call cannot overwrite them before the merge that reads them has run)."""
    key = (tuple(shape), np.dtype(dtype).str, fl.context_key())
    buf = _workspace.get(key)
    if buf is None:
        if len(_workspace) > 32:
            for k in [k for k in _workspace if k[0] != "counters"]:
                del _workspace[k]
        buf = _workspace[key] = cuda.device_array(shape, dtype=dtype)
    return buf


def _elems(x, kind):
    """A device array of the cache/query elements (bfloat16 as uint16 bits, float16 as float16)."""
    if getattr(type(x), "__cuda_memory__", False) and (kind != "bf16" or x.dtype == np.uint16):
        return x  # a numba device array of the element type: as it is
    if dsp.is_device_array(x):
        x = dsp.to_device(x)
        return x.view(np.uint16) if kind == "bf16" and np.dtype(x.dtype) != np.uint16 else x
    h = np.ascontiguousarray(x)
    return cuda.to_device(h.view(np.uint16) if kind == "bf16" else h)


def _u32(x):
    """x.view(np.uint32), cached on x (a numba device array's view never changes)."""
    d = getattr(x, "__dict__", None)
    if d is None or intr.SIM:
        return x.view(np.uint32)
    v = d.get("_nk_u32")
    if v is None:
        v = d["_nk_u32"] = x.view(np.uint32)
    return v


_uploads = fl.Uploader()


def _rotary_table(x, ft):
    """A rotary table on the device in the compute dtype ft: a C-contiguous device array of that dtype as it is
    (no copy, no host round trip); anything else through the host."""
    if dsp.is_device_array(x):
        d = dsp.to_device(x)
        if np.dtype(d.dtype) == np.dtype(ft) and d.is_c_contiguous():
            return d
    return cuda.to_device(np.ascontiguousarray(dsp.to_host(x), dtype=ft))


def _i32(x, role=None):
    """Small int32 metadata on the device. With a ``role``: one device buffer per role and shape, refreshed
    by an asynchronous upload from pinned memory when the values change (no host stall); without: cached by
    content (no upload when it did not change)."""
    x = np.asarray(x, dtype=np.int32)
    if role is None or intr.SIM:
        return _cached(x)
    return _uploads.put((role, fl.context_key()), x)


_pool = {}


def _fresh(shape, dtype, view=None):
    """A device array for a result handed to the caller (and, with ``view``, its view as that dtype, which is
    what the caller gets): reuses a pooled buffer of this shape and dtype once nothing outside the pool
    references it, its view or its memory any more (else allocates). Reuse is safe: every launch and copy here
    is on the default stream, so work that used the old contents has been ordered before.
    Returns the array, or (array, view) when ``view`` is given."""
    if intr.SIM:
        arr = cuda.device_array(shape, dtype=dtype)
        return arr if view is None else (arr, arr.view(view))
    key = (tuple(shape), np.dtype(dtype).str, None if view is None else np.dtype(view).str, fl.context_key())
    lst = _pool.setdefault(key, [])
    for arr, v, rc_arr, rc_v, rc_mem in lst:
        if (sys.getrefcount(arr) == rc_arr and (v is None or sys.getrefcount(v) == rc_v) and
                sys.getrefcount(arr.gpu_data) == rc_mem):
            return arr if view is None else (arr, v)
    arr = cuda.device_array(shape, dtype=dtype)
    v = None if view is None else arr.view(view)
    if len(lst) < 8:
        # baselines seen by the loop above: the pool's tuple + the loop's name + getrefcount's argument
        # (here: this name + the argument, + 1 for the tuple); the memory: the array's and the view's references
        rc_arr = sys.getrefcount(arr) + 1
        rc_v = -1 if v is None else sys.getrefcount(v) + 1
        rc_mem = sys.getrefcount(arr.gpu_data)
        lst.append((arr, v, rc_arr, rc_v, rc_mem))
    return arr if view is None else (arr, v)


def use_tensor_cores(dt, D):
    return dt in (np.dtype(np.float16), dsp.bfloat16) and D % 8 == 0


def simt_rows(M):
    nw, mr = SIMT_TILES[_mode()]
    r = 1
    while r < min(M, mr):
        r *= 2
    return nw, r


def choose_splits(plan, blocks_per_split, blocks_per_sm=TC_BLOCKS_PER_SM, short_cap=False, longest=None):
    """num_splits; 0 = automatic: as many splits as fit the resident block slots in one wave
    (floor(slots / blocks), slots = resident blocks per SM x SMs), each split >= MIN_SPLIT_KEYS keys, and with
    ``short_cap`` (the tensor-core kernel) at most SHORT_CACHE_SPLITS when no sequence has more than
    SHORT_CACHE_KEYS keys. ``longest``: the longest key range, when the caller has it (else computed here).
    Measured on the H100 (benchmarks/results/decode_attention_gpu_h100_splits.txt): one full wave of long
    blocks beats both fewer splits and more waves of short ones, and a wave and a bit (B8, 5 splits) costs 25%."""
    if plan.num_splits:
        return plan.num_splits
    blocks = plan.B * plan.Hk * blocks_per_split
    slots = blocks_per_sm * _num_sms()
    if longest is None:
        longest = int((plan.end - plan.leftpad).max())
    cap = SHORT_CACHE_SPLITS if short_cap and longest <= SHORT_CACHE_KEYS else MAX_SPLITS
    return int(max(1, min(slots // blocks, longest // MIN_SPLIT_KEYS, cap)))


@functools.lru_cache(maxsize=None)
def tc_blocks_per_sm(nw, DP, bf16, cap, alibi, stages, bc, pf, qreg, tpf=False, reg=False, lean=0):
    """Resident blocks per SM of the split tensor-core kernel of this configuration (the driver's occupancy
    of its compiled code with its shared memory); TC_BLOCKS_PER_SM in the simulator."""
    if intr.SIM:
        return TC_BLOCKS_PER_SM
    from numba_kernels.cuda._launch import blocks_per_sm_sig

    kern, nth, smem = make_decode_tc(nw, DP, bf16, cap, alibi, True, stages, True, bc, pf, qreg, tpf, reg, lean)
    return blocks_per_sm_sig(kern, nth, smem, _tc_signature(True))


@functools.lru_cache(maxsize=None)
def direct_blocks_per_sm(nw, DP, bf16, cap, alibi, rows8, pipe=1, maxreg=0):
    """Resident blocks per SM of the split direct-operand kernel (TC_BLOCKS_PER_SM in the simulator)."""
    if intr.SIM:
        return TC_BLOCKS_PER_SM
    from numba_kernels.cuda._launch import blocks_per_sm_sig

    kern, nth, smem = make_decode_direct(nw, DP, bf16, cap, alibi, True, True, rows8, pipe, maxreg)
    return blocks_per_sm_sig(kern, nth, smem, _tc_signature(True))


def _tc_signature(split):
    from numba import types

    i32_1, i32_2, f32, u32 = (types.Array(types.int32, 1, "C"), types.Array(types.int32, 2, "C"), types.float32,
                              types.uint32)
    o = ((types.Array(f32, 5, "C"), types.Array(f32, 4, "C")) if split else
         (types.Array(u32, 4, "C"), types.Array(f32, 3, "C")))
    return ((types.Array(u32, 4, "C"),) * 3 + (i32_2, i32_1, i32_1) + o +
            (types.Array(f32, 2, "C"), f32, f32, f32, types.int32, types.int32, types.int32,
             types.Array(u32, 4, "C"), types.Array(f32, 3, "C"), i32_1))


def decode_cuda(plan, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved):
    """Append (through the page table, rotating k), rotate q, attend. Returns device arrays
    out (B, Sq, H, D) (bfloat16 as uint16 bits) and lse (B, H, Sq) float32."""
    from numba_kernels.decode_attention import append_host

    kind = kind_of(plan.dt)
    ft = np.float64 if kind == "f64" else np.float32
    table = _i32(plan.table, "table")
    dev_caches = bool(getattr(type(k_cache), "__cuda_memory__", False)) or dsp.is_device_array(k_cache)
    if not dev_caches:  # host caches: append there (in place), attend on uploaded copies
        append_host(plan, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved)
    kc, vc = _elems(k_cache, kind), _elems(v_cache, kind)
    cos = sin = None
    if plan.rotary:
        cos, sin = _rotary_table(rotary_cos, ft), _rotary_table(rotary_sin, ft)
    if plan.snew and dev_caches:
        kn, vn = _elems(k, kind), _elems(v, kind)
        pos0 = _i32(plan.seqlens, "seqlens")
        grid = (plan.Hk, plan.snew, plan.B)
        fl.launch(make_append_kv(kind, plan.rotary, 64), grid, 64, 0,  # k rotated (or copied), v copied
                  (kn, kc, vn, vc, table, pos0, cos if plan.rotary else kn, sin if plan.rotary else kn,
                   bool(rotary_interleaved) if plan.rotary else False))
    qd = _elems(q, kind)
    if plan.rotary:
        qr = cuda.device_array(qd.shape, dtype=qd.dtype)
        fl.launch(make_rotate(kind, 64), (plan.H, plan.Sq, plan.B), 64, 0,
                  (qd, qr, _i32(plan.seqlens, "seqlens"), 1 if plan.windowed else 0, cos, sin,
                   bool(rotary_interleaved)))
        qd = qr
    return attend_cuda(plan, qd, kc, vc, table, _i32(plan.leftpad, "leftpad"), _i32(plan.end, "end"), kind)


def attend_cuda(plan, qd, kc, vc, table, start, end, kind, tc_tiles=None):
    """The attention launch on prepared device arrays (q rotated, new tokens already in the caches);
    qd (B, Sq, H, D) and caches (pages, page, Hk, D) as element arrays (bfloat16 as uint16 bits)."""
    B, Sq, H, D = plan.B, plan.Sq, plan.H, plan.D
    M = (H // plan.Hk) * Sq
    ft = np.float64 if kind == "f64" else np.float32
    sl = _cached(np.zeros((0, 0), ft) if plan.slopes is None else np.asarray(plan.slopes, ft))
    cap_in = plan.scale / plan.softcap if plan.softcap > 0 else 0.0
    tc = use_tensor_cores(plan.dt, D)
    if tc:
        n_rt = -(-M // 16)
    else:
        nw, mr = simt_rows(M)
        n_rt = -(-M // mr)
    cap, alibi = plan.softcap > 0, plan.slopes is not None
    direct = False
    if tc:
        # tc_tiles: a staged-kernel configuration tuple, or ("direct", warps, PIPE, register cap)
        want = DIRECT_TILES[_mode()] if tc_tiles is None else (tuple(tc_tiles[1:]) if tc_tiles[0] == "direct" else None)
        DPD = direct_dp(D)
        rows = kc.shape[0] * kc.shape[1] * kc.shape[2]  # the direct kernel indexes cache rows in int32
        direct = bool(want) and DPD > 0 and rows < 2 ** 31
        if direct:
            (nw, pipe, maxreg), rows8 = want, M <= 8
            ns = choose_splits(plan, n_rt, direct_blocks_per_sm(nw, DPD, kind == "bf16", cap, alibi, rows8, pipe,
                                                                maxreg))
        else:
            DP = -(-D // 16) * 16
            longest = int((plan.end - plan.leftpad).max())
            job = plan.B * plan.Hk * n_rt * longest
            cfg = tuple(tc_config(DP, job_keys=job) if tc_tiles is None or tc_tiles[0] == "direct" else tc_tiles)
            cfg = cfg + (0,) * (8 - len(cfg))  # older 6/7-field configurations: the flags after them off
            nw, stages, bc, pf, qreg, tpf, reg, lean = cfg
            ns = choose_splits(plan, n_rt, tc_blocks_per_sm(nw, DP, kind == "bf16", cap, alibi, stages, bc, pf,
                                                            qreg, tpf, reg, lean), short_cap=True, longest=longest)
    else:
        ns = choose_splits(plan, n_rt)
    split = ns > 1
    fused = tc and split and ns <= FUSED_MERGE_MAX
    final = lse_final = final_view = None
    if fused or not split:
        if tc:
            final, final_view = _fresh((B, Sq, H, D // 2), np.uint32, np.float16 if kind == "f16" else np.uint16)
        else:
            final = final_view = _fresh((B, Sq, H, D), ELEM[kind])
        lse_final = _fresh((B, H, Sq), np.float32)
    if split:
        o = _scratch((ns, B, Sq, H, D), ft)
        lse = _scratch((ns, B, H, Sq), ft)
    else:
        o, lse = final, lse_final
    if tc and final is None:  # unused arguments of the unfused kernel
        final, lse_final = o, lse
    grid = (ns * n_rt, plan.Hk, B)
    args_tail = (o, lse, sl, ft(plan.scale * LOG2E), ft(plan.softcap), ft(cap_in), np.int32(plan.left),
                 np.int32(plan.right), np.int32(ns))
    if tc:
        if direct:
            kern, nth, smem = make_decode_direct(nw, DPD, kind == "bf16", cap, alibi, split, fused, rows8, pipe,
                                                 maxreg)
        else:
            kern, nth, smem = make_decode_tc(nw, DP, kind == "bf16", cap, alibi, split, stages, fused, bc, pf, qreg,
                                             tpf, reg, lean)
        args = ((_u32(qd), _u32(kc), _u32(vc), table, start, end) + args_tail +
                (final, lse_final, _counters(B * plan.Hk * n_rt)))
    else:
        kern, nth, smem = make_decode_simt(kind, nw, mr, -(-D // 32), split)
        args = (qd, kc, vc, table, start, end) + args_tail
    fl.launch(kern, grid, nth, smem, args)
    if split and not fused:  # else the tensor-core kernel merged its splits itself
        return combine_cuda(o, lse, np.dtype(ft), plan.dt)
    return final_view, lse_final


def combine_cuda(o_p, lse_p, in_dt, out_dt):
    """Device merge of o_p (S, B, Sq, H, D) with lse_p (S, B, H, Sq) -> out (B, Sq, H, D) in out_dt
    (bfloat16 as uint16 bits) and lse (B, H, Sq) float32, both device arrays."""
    in_kind, out_kind = kind_of(in_dt), kind_of(out_dt)
    o_p, lse_p = _elems(o_p, in_kind), dsp.to_device(lse_p)
    S, B, Sq, H, D = o_p.shape
    out = _fresh((B, Sq, H, D), ELEM[out_kind])
    lse = _fresh((B, H, Sq), np.float32)
    nth = 32 if intr.SIM else 128
    fl.launch(make_combine(in_kind, out_kind, nth), (H, Sq, B), nth, 0, (o_p, lse_p, out, lse))
    return out, lse


def ptx_signatures(head_dims=(64, 128, 256)):
    """(name, python function, numba signature) of every real decode kernel configuration, for PTX checks."""
    from numba import types

    i32_1, i32_2 = types.Array(types.int32, 1, "C"), types.Array(types.int32, 2, "C")

    def sig(q_el, c_el, o_el, o_nd, ft):
        return (types.Array(q_el, 4, "C"), types.Array(c_el, 4, "C"), types.Array(c_el, 4, "C"), i32_2, i32_1, i32_1,
                types.Array(o_el, o_nd, "C"), types.Array(ft if o_nd == 5 else types.float32, o_nd - 1, "C"),
                types.Array(ft, 2, "C"), ft, ft, ft, types.int32, types.int32, types.int32)

    out = []
    f32, f64, u32 = types.float32, types.float64, types.uint32
    for D in head_dims:
        DP = -(-D // 16) * 16
        small = TC_TILES_SMALL["gpu"] if DP <= 128 else None
        for bf16, cap, alibi, split, merge, job in (
                (False, False, False, False, True, None), (True, False, False, True, True, None),
                (True, False, False, True, False, None), (True, True, True, False, True, None)) + (
                ((True, False, False, True, True, 1), (True, False, False, True, False, 1)) if small else ()):
            nw, stages, bc, pf, qreg, tpf, reg, lean = tc_config(DP, "gpu", job)
            kern = make_decode_tc(nw, DP, bf16, cap, alibi, split, stages, merge, bc, pf, qreg, tpf, reg, lean)[0]
            o_el, o_nd = (f32, 5) if split else (u32, 4)
            out.append((f"decode_tc_{'bf16' if bf16 else 'f16'}{'_cap_alibi' if cap else ''}"
                        f"{'_split' if split else ''}{'' if merge else '_nomerge'}{'_small' if job else ''}_D{D}",
                        kern.py_func,
                        sig(u32, u32, o_el, o_nd, f32) + (types.Array(u32, 4, "C"), types.Array(f32, 3, "C"), i32_1)))
        nw, mr = SIMT_TILES["gpu"]
        for kind, el, ft in (("f32", f32, f32), ("f64", f64, f64), ("bf16", types.uint16, f32)):
            for split in (False, True):
                kern = make_decode_simt(kind, nw, mr, -(-D // 32), split)[0]
                o_el, o_nd = (ft, 5) if split else (el, 4)
                out.append((f"decode_simt_{kind}{'_split' if split else ''}_D{D}", kern.py_func,
                            sig(el, el, o_el, o_nd, ft)))
    return out
