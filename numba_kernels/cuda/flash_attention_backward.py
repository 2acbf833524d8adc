"""FlashAttention-2 backward on CUDA: host side (tile choice, dtype handling, launches).

Everything works on the packed layout dout/q/out (Tq, H, D), k/v (Tk, Hk, D) with cu_seqlens and the
forward's LSE addressed as ``lse[cu_q[b] * lse_a + h * lse_c + i]`` (batched (B, H, Sq): (H, Sq);
varlen (H, Tq): (1, Tq)). Steps:

1. D_i = rowsum(dO * O) (``row_dot``).
2. dK / dV: one block per (key tile, k/v head, sequence), the GQA group summed inside the block.
   Without ``deterministic`` the same kernel adds dS K into a zeroed fp32 (fp64) dQ buffer with atomics
   (CUDA cores always; tensor cores where ``TC_BWD_TILES`` says so: the H100 sweep preferred step 3 at D128).
3. ``deterministic=True``: dQ in a separate pass, one block per (query tile, head, sequence): bitwise
   reproducible, at the price of recomputing S and dP once more (7 tile products instead of 5; on the H100,
   bf16: from equal speed to 20% slower than the atomics).

float32 / float64 run on CUDA cores (``_flash_bwd_simt``); float16 / bfloat16 run on tensor cores up to head dim
128 (Hopper: warpgroup MMA, ``_flash_bwd_wgmma``, dK / dV and dQ by reductions in one kernel, or the dQ pass when
deterministic; elsewhere mma.sync, ``_flash_bwd_tc``) and are widened to float32 for the CUDA-core kernels above
that.
"""
import numpy as np
from numba import cuda

from numba_kernels import _dispatch as dsp
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _launch as fl
from numba_kernels.cuda import _wgmma as wg
from numba_kernels.cuda._flash_bwd_simt import make_row_dot, make_simt_bwd_kernels
from numba_kernels.cuda._flash_bwd_tc import make_tc_bwd_kernel
from numba_kernels.cuda._flash_bwd_tc_dq import make_tc_dq_kernel, make_word_kernels
from numba_kernels.cuda._flash_bwd_wgmma import make_wgmma_bwd_kernel, make_wgmma_dq_kernel
from numba_kernels.cuda._pool import out_array
from numba_kernels.cuda.flash_attention import _as_words, _cached, _from_words, _scalars

#: (warps, query rows per tile) of the CUDA-core backward; tiny tiles for the simulator
SIMT_BWD_TILES = {"gpu": (4, 16), "sim": (1, 4)}
#: tensor cores, by padded head dim: ((warps = key tile / 16, query rows per tile) of the dK/dV kernel,
#: (warps = query tile / 16, keys per tile) of the dQ kernel, dQ by atomics when deterministic=False) -- the
#: fastest of a sweep on the H100 (benchmarks/results/gpu_h100_2026-11-22_flash_backward_sweep.txt): at D128 the
#: separate dQ pass beat the atomics; tiny tiles for the simulator
TC_BWD_TILES = {64: ((8, 64), (4, 32), True), 128: ((4, 32), (4, 32), False)}
TC_BWD_TILES_SIM = ((2, 16), (1, 16), True)
#: the same for short key ranges (max_sk <= TC_BWD_SHORT_SK), by padded head dim and masked (causal / window):
#: 4-warp key tiles fill the H200 better there (benchmarks/results/gpu_h200_2026-12-01_flash_backward_sweep1k.txt,
#: D64 S1024: 114 vs 84 TFLOP/s non-causal with atomics; causal 85 with the dQ pass vs 77 for the long config)
TC_BWD_TILES_SHORT = {64: {False: ((4, 64), (4, 32), True), True: ((4, 64), (4, 32), False)}}
TC_BWD_SHORT_SK = 1024
#: kernel options of the tensor-core kernels (``make_tc_bwd_kernel`` / ``make_tc_dq_kernel`` keywords: WSKIP,
#: VRED); empty = their defaults. For sweeps.
TC_BWD_OPTS = {}
#: the deterministic dQ kernel keeps its warp's Q / dO fragments in registers (``make_tc_dq_kernel(QREG=True)``,
#: padded head dims <= 128). Off: H200 bf16 D128 (2026-12-03, benchmarks/results/gpu_h200_2026-12-03c_flash_bwd_bench
#: _qreg.txt against ..._bwd_bench.txt) +2-4% at S >= 4096 but -3% to -20% at S <= 2048 (246 instead of 168
#: registers: 2 blocks per SM instead of 3)
TC_BWD_DQ_QREG = False
TC_BWD_MAX_D = 128
#: Hopper (compute capability 9.0): dK / dV on warpgroup MMA (``_flash_bwd_wgmma``), by padded head dim (the
#: smallest key >= it): (warpgroups, query rows per tile); None: the mma.sync kernels. H200 bf16 H16, whole backward
#: (2026-12-04, benchmarks/results/gpu_h200_2026-12-04_bwd_wgmma_bench_dq.txt), S 1k / 4k / 16k with dQ from the
#: same kernel: D128 161 / 226 / 247 TFLOP/s (causal 134 / 198 / 251) against mma.sync 144 / 182 / 185 (127 / 166 /
#: 183); D64 139 / 197 / 225 (101 / 172 / 221) against 133 / 177 / 197 (104 / 153 / 194)
TC_BWD_WGMMA = {64: (2, 64), 128: (2, 64)}
#: the simulator's wgmma tiles (tests set them; None: the simulator runs the mma.sync kernels)
TC_BWD_WGMMA_SIM = None
#: dQ from the wgmma kernel too (fp32 reductions, ``make_wgmma_bwd_kernel(HAS_DQ=True)``, 64 query rows per tile)
#: when deterministic=False; deterministic=True keeps the separate dQ pass (same run, D128: 192 / 204 TFLOP/s at S
#: 4k / 16k against 226 / 247 fused)
TC_BWD_WGMMA_DQ = True
#: the deterministic dQ pass on warpgroup MMA (``make_wgmma_dq_kernel``), by padded head dim (the smallest key >=
#: it): (warpgroups = query tile / 64, keys per tile); empty: the mma.sync dQ pass. Off until timed on a GPU
#: (simulator- and PTX-tested); the simulator uses TC_BWD_WGMMA_DQPASS_SIM where tests set it
TC_BWD_WGMMA_DQPASS = {}
TC_BWD_WGMMA_DQPASS_SIM = None
#: the wgmma kernel overlaps its products with the elementwise work (``make_wgmma_bwd_kernel(PIPE=True)``; without
#: softcap and dropout); off until timed on a GPU (simulator- and PTX-tested)
TC_BWD_WGMMA_PIPE = False


def tc_bwd_config(D, max_sk=None, masked=False):
    """((dkdv warps, query rows), (dq warps, keys), dq by atomics, padded head dim) for D <= TC_BWD_MAX_D;
    ``max_sk`` (longest key range) and ``masked`` (causal or window) pick TC_BWD_TILES_SHORT where it applies."""
    DP = max(16, -(-D // 16) * 16)
    dk = min(d for d in TC_BWD_TILES if d >= DP)
    if intr.SIM:
        (nw, br), dq, atomic = TC_BWD_TILES_SIM
    elif max_sk is not None and max_sk <= TC_BWD_SHORT_SK and dk in TC_BWD_TILES_SHORT:
        (nw, br), dq, atomic = TC_BWD_TILES_SHORT[dk][bool(masked)]
    else:
        (nw, br), dq, atomic = TC_BWD_TILES[dk]
    if DP % (16 * (nw * 16 // br)) != 0:  # the dQ product splits the head dim over nw * 16 / br warps
        br = 16 * nw
    return (nw, br), dq, atomic, DP


def _wgmma_entry(table, sim, DP):
    """The entry of a wgmma tile table for padded head dim DP (the smallest key >= DP), or None where it does not
    run (no entry, not a compute capability 9.0 device); ``sim`` in the simulator."""
    if intr.SIM:
        return sim
    keys = [d for d in table if d >= DP]
    return table[min(keys)] if keys and wg.available() else None


def wgmma_bwd_config(DP):
    """(warpgroups, query rows) of the wgmma dK/dV kernel for padded head dim DP, or None where it does not run."""
    return _wgmma_entry(TC_BWD_WGMMA, TC_BWD_WGMMA_SIM, DP)


def wgmma_dq_config(DP):
    """(warpgroups, keys per tile) of the wgmma dQ pass for padded head dim DP, or None."""
    return _wgmma_entry(TC_BWD_WGMMA_DQPASS, TC_BWD_WGMMA_DQPASS_SIM, DP)


def simt_bwd_config(D):
    nw, br = SIMT_BWD_TILES["sim" if intr.SIM else "gpu"]
    return nw, br, -(-D // 32)


def _args(ft, cu_q, cu_k, slopes, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed):
    """Trailing kernel arguments shared by the backward kernels (same order everywhere)."""
    s = _scalars(ft, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed)
    sl = np.zeros((0, 0), dtype=ft) if slopes is None else np.ascontiguousarray(slopes, dtype=ft)
    # (scale_log2, softcap, cap_in, scale, left, right, lse_a, lse_c, seed, thresh, inv_keep)
    return (_cached(np.asarray(cu_q, np.int32)), _cached(np.asarray(cu_k, np.int32)), _cached(sl),
            s[0], s[1], s[2], ft(scale)) + s[3:]


def _zeros(shape, dtype):
    x = out_array(shape, dtype)
    if intr.SIM:
        fl.launch(_fill_kernel(), max(1, -(-x.size // 256)), 256, 0, (x.reshape(x.size), 0))
    else:  # one driver call (on the default stream, ordered with the launches) instead of a kernel launch
        from numba.cuda.cudadrv.driver import device_memset
        device_memset(x, 0, x.size * x.dtype.itemsize)
    return x


_FILL = {}


def _dummy_acc():
    """The (unused) dQ buffer argument of a dK/dV-only launch, allocated once."""
    if "acc" not in _FILL:
        _FILL["acc"] = cuda.device_array((1, 1, 2), dtype=np.float32)
    return _FILL["acc"]


def _fill_kernel():
    if "k" not in _FILL:
        def fill(x, val):
            i = cuda.grid(1)
            if i < x.shape[0]:
                x[i] = val

        _FILL["k"] = cuda.jit(fill)
    return _FILL["k"]


def row_dot(dout, out, ft):
    """D (H, T) = rowsum(dout * out) in ft for device arrays (T, H, D)."""
    T, H, _ = dout.shape
    di = out_array((H, T), ft)
    fl.launch(make_row_dot(ft == np.float64), max(1, -(-(T * H) // 128)), 128, 0, (dout, out, di))
    return di


def flash_bwd_simt(dout, q, k, v, out, lse, cu_q, cu_k, max_sq, max_sk, ft, scale, left, right, softcap, dropout_p,
                   slopes, seed, lse_a, lse_c, deterministic):
    """CUDA-core backward on device arrays in ft (float32 / float64); lse flat. Returns (dq, dk, dv) in ft."""
    Tq, H, D = q.shape
    nw, br, dd = simt_bwd_config(D)
    dkdv, dqk, NTH, SMEM = make_simt_bwd_kernels(nw, br, dd, ft == np.float64)
    di = row_dot(dout, out, ft)
    dk = out_array(k.shape, ft)
    dv = out_array(v.shape, ft)
    B = len(cu_q) - 1
    tail = _args(ft, cu_q, cu_k, slopes, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed)
    if deterministic:
        dq = out_array(q.shape, ft)
        fl.launch(dkdv, (max(1, -(-max_sk // 32)), k.shape[1], B), NTH, SMEM,
                  (q, k, v, dout, lse, di, dq, dk, dv) + tail + (False,))
        fl.launch(dqk, (max(1, -(-max_sq // br)), H, B), NTH, SMEM, (q, k, v, dout, lse, di, dq) + tail)
    else:
        dq = _zeros(q.shape, ft)
        fl.launch(dkdv, (max(1, -(-max_sk // 32)), k.shape[1], B), NTH, SMEM,
                  (q, k, v, dout, lse, di, dq, dk, dv) + tail + (True,))
    return dq, dk, dv


def flash_bwd_tc_words(dow, qw, kw, vw, ow, lse, cu_q, cu_k, max_sq, max_sk, bf16, scale, left, right, softcap=0.0,
                      dropout_p=0.0, slopes=None, seed=0, lse_a=None, lse_c=None, deterministic=False, D=None):
    """Tensor-core backward on device words: dow/qw/ow (Tq, H, W), kw/vw (Tk, Hk, W) uint32 holding two
    float16/bfloat16 values each, lse flat float32 (default layout (H, Tq)). Returns words (dq, dk, dv)."""
    Tq, H, W = qw.shape
    D = 2 * W if D is None else D
    lse_a, lse_c = (1, Tq) if lse_a is None else (lse_a, lse_c)
    (nw, br), (nwq, bcq), atomic, DP = tc_bwd_config(D, max_sk, right >= 0 or left >= 0)
    flags = (softcap > 0, slopes is not None, dropout_p > 0)
    row_dot_w, dq_pack = make_word_kernels(bool(bf16))
    di = out_array((H, Tq), np.float32)
    fl.launch(row_dot_w, max(1, -(-(Tq * H) // 128)), 128, 0, (dow, ow, di))
    dkw = out_array(kw.shape, np.uint32)
    dvw = out_array(vw.shape, np.uint32)
    B = len(cu_q) - 1
    tail = _args(np.float32, cu_q, cu_k, slopes, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed)
    user_deterministic = deterministic
    deterministic = deterministic or not atomic
    opts = dict(TC_BWD_OPTS)
    dq_opts = {"QREG": TC_BWD_DQ_QREG and DP <= 128}
    for name in ("WSKIP", "QREG"):
        if name in opts:
            dq_opts[name] = opts[name]
    opts.pop("QREG", None)
    wcfg = wgmma_bwd_config(DP)
    if wcfg:  # dK / dV on warpgroup MMA, dQ by its own pass or (TC_BWD_WGMMA_DQ) by reductions from the same kernel
        fused = TC_BWD_WGMMA_DQ and not user_deterministic and wcfg[1] == 64
        kern, BC, NTH, SMEM = make_wgmma_bwd_kernel(*wcfg, DP, bool(bf16), *flags, fused, TC_BWD_WGMMA_PIPE)
        if kern.ready(SMEM, (qw, kw, vw, dow, lse, di, _dummy_acc(), dkw, dvw) + tail):
            deterministic = not fused
            run = kern.launch
        else:  # the driver cannot load sm_90a code: the mma.sync kernels
            wcfg = None
    if not wcfg:
        kern, BC, NTH, SMEM = make_tc_bwd_kernel(nw, br, DP, bool(bf16), *flags, not deterministic, **opts)

        def run(grid, block, smem, args):
            fl.launch(kern, grid, block, smem, args)
    grid = (max(1, -(-max_sk // BC)), kw.shape[1], B)
    if deterministic:
        run(grid, NTH, SMEM, (qw, kw, vw, dow, lse, di, _dummy_acc(), dkw, dvw) + tail)
        qcfg = wgmma_dq_config(DP)
        dqw = out_array(qw.shape, np.uint32)
        dq_args = (qw, kw, vw, dow, lse, di, dqw) + tail
        if qcfg:
            dqk, BRQ, NTHQ, SMEMQ = make_wgmma_dq_kernel(*qcfg, DP, bool(bf16), *flags)
            qcfg = dqk.ready(SMEMQ, dq_args)
        if qcfg:
            dqk.launch((max(1, -(-max_sq // BRQ)), H, B), NTHQ, SMEMQ, dq_args)
        else:
            dqk, BRQ, NTHQ, SMEMQ = make_tc_dq_kernel(nwq, bcq, DP, bool(bf16), *flags, **dq_opts)
            fl.launch(dqk, (max(1, -(-max_sq // BRQ)), H, B), NTHQ, SMEMQ, dq_args)
    else:
        acc = _zeros((Tq, H, 2 * W), np.float32)
        run(grid, NTH, SMEM, (qw, kw, vw, dow, lse, di, acc, dkw, dvw) + tail)
        dqw = out_array(qw.shape, np.uint32)
        fl.launch(dq_pack, max(1, -(-(Tq * H * W) // 256)), 256, 0, (acc, dqw, np.float32(scale)))
    return dqw, dkw, dvw


def flash_bwd_cuda(dout, q, k, v, out, lse, cu_q, cu_k, max_sq, max_sk, dt, scale, left, right, softcap, dropout_p,
                   slopes, seed, lse_a, lse_c, deterministic):
    """Packed backward on the GPU. dout/q/out (Tq, H, D), k/v (Tk, Hk, D) host or device arrays in dt, lse flat.
    Returns device arrays (dq, dk, dv) in dt (bfloat16 as its uint16 bits)."""
    half = dt in (np.dtype(np.float16), dsp.bfloat16)
    if not half:
        arrs = [dsp.to_device(x) for x in (dout, q, k, v, out)]
        lse_d = dsp.to_device(lse).reshape(-1) if dsp.is_device_array(lse) else cuda.to_device(np.ravel(lse))
        return flash_bwd_simt(*arrs, lse_d, cu_q, cu_k, max_sq, max_sk, np.dtype(dt).type, scale, left, right,
                              softcap, dropout_p, slopes, seed, lse_a, lse_c, deterministic)
    D = q.shape[2]
    if D <= TC_BWD_MAX_D:
        words = [_as_words(x, D) for x in (dout, q, k, v, out)]
        lse_d = dsp.to_device(lse).reshape(-1) if dsp.is_device_array(lse) else cuda.to_device(
            np.ravel(lse).astype(np.float32))
        grads = flash_bwd_tc_words(*words, lse_d, cu_q, cu_k, max_sq, max_sk, dt == dsp.bfloat16, scale, left, right,
                                   softcap, dropout_p, slopes, seed, lse_a, lse_c, deterministic, D)
        return tuple(_from_words(g, D, dt) for g in grads)
    # float16 / bfloat16 above TC_BWD_MAX_D on the CUDA-core kernels: widen on the host, narrow back
    arrs = [cuda.to_device(dsp.to_host(x, dt).astype(np.float32)) for x in (dout, q, k, v, out)]
    lse_d = cuda.to_device(np.ravel(dsp.to_host(lse)).astype(np.float32))
    grads = flash_bwd_simt(*arrs, lse_d, cu_q, cu_k, max_sq, max_sk, np.float32, scale, left, right, softcap,
                           dropout_p, slopes, seed, lse_a, lse_c, deterministic)
    return tuple(cuda.to_device(g.copy_to_host().astype(dt).view(np.uint16)) if dt == dsp.bfloat16
                 else cuda.to_device(g.copy_to_host().astype(dt)) for g in grads)


def ptx_signatures(head_dims=(64, 128)):
    """(name, python function, numba signature) of every real backward kernel configuration, for PTX checks."""
    from numba import types

    def sig(elem, ft, n_out):
        arr3 = types.Array(elem, 3, "C")
        f3 = types.Array(ft, 3, "C")
        i32 = types.Array(types.int32, 1, "C")
        ins = (arr3,) * 4 + (types.Array(ft, 1, "C"), types.Array(ft, 2, "C"))
        outs = ((f3, arr3, arr3) if n_out == 3 else (arr3,))
        return ins + outs + (i32, i32, types.Array(ft, 2, "C"), ft, ft, ft, ft, types.int32, types.int32,
                             types.int64, types.int64, types.uint64, types.uint64, ft)

    out = []
    for D in head_dims:
        (nw, br), (nwq, bcq), _, DP = tc_bwd_config(D)
        for bf16, flags in ((False, (False, False, False)), (True, (False, False, False)), (True, (True, True, True))):
            tag = f"{'bf16' if bf16 else 'f16'}{'_cap_alibi_drop' if flags[0] else ''}_D{D}"
            for has_dq in (True, False):
                kern = make_tc_bwd_kernel(nw, br, DP, bf16, *flags, has_dq)[0]
                out.append((f"tc_dkdv{'_dq' if has_dq else ''}_{tag}", kern.py_func,
                            sig(types.uint32, types.float32, 3)))
            qreg = TC_BWD_DQ_QREG and DP <= 128
            out.append((f"tc_dq_{tag}", make_tc_dq_kernel(nwq, bcq, DP, bf16, *flags, QREG=qreg)[0].py_func,
                        sig(types.uint32, types.float32, 1)))
            if bf16 and not flags[0] and DP <= 128 and not qreg:  # the option, while it is off
                out.append((f"tc_dq_qreg_{tag}", make_tc_dq_kernel(nwq, bcq, DP, bf16, *flags, QREG=True)[0].py_func,
                            sig(types.uint32, types.float32, 1)))
        if min(d for d in TC_BWD_TILES if d >= DP) in TC_BWD_TILES_SHORT:  # the short-range tiles, bf16
            (nw, br), _, _, _ = tc_bwd_config(D, 1, False)
            for has_dq in (True, False):
                kern = make_tc_bwd_kernel(nw, br, DP, True, False, False, False, has_dq)[0]
                out.append((f"tc_dkdv{'_dq' if has_dq else ''}_short_bf16_D{D}", kern.py_func,
                            sig(types.uint32, types.float32, 3)))
        nw, br, dd = simt_bwd_config(D)
        for f64 in (False, True):
            ft = types.float64 if f64 else types.float32
            dkdv, dqk = make_simt_bwd_kernels(nw, br, dd, f64)[:2]
            out.append((f"simt_dkdv_{'f64' if f64 else 'f32'}_D{D}", dkdv.py_func,
                        sig(ft, ft, 3) + (types.boolean,)))
            out.append((f"simt_dq_{'f64' if f64 else 'f32'}_D{D}", dqk.py_func, sig(ft, ft, 1)))
    return out
