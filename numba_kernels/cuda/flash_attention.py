"""FlashAttention forward on CUDA: host side (tile choice, dtype handling, launch).

Both kernels work on the packed layout q (Tq, H, D), k/v (Tk, Hk, D) with cu_seqlens (batched calls are
packed by the caller) over the grid (query blocks, heads, sequences):
* float16 / bfloat16: tensor cores, ``_flash_fwd_tc.make_tc_kernel`` (FlashAttention-2 data path);
* float32 / float64: CUDA cores, ``_flash_fwd_simt.make_simt_kernel``.
"""
import functools

import numpy as np
from numba import cuda

from numba_kernels import _dispatch as dsp
from numba_kernels._dropout import keep_threshold
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _launch as fl
from numba_kernels.cuda._attn_common import LOG2E
from numba_kernels.cuda._flash_fwd_simt import make_simt_kernel
from numba_kernels.cuda._flash_fwd_tc import make_tc_kernel
from numba_kernels.cuda._pool import _device_key, out_array

# ---- tile choices ---------------------------------------------------------------------------------
#: (warps, m-tiles of 16 query rows per warp, keys per tile) by padded head dim, the best measured on
#: the H200 (benchmarks/results/); tiny tiles for the simulator
TC_TILES = {64: (4, 2, 64), 128: (4, 2, 64), 256: (4, 1, 64)}
TC_TILES_SIM = (1, 2, 16)
#: tensor-core forward loads its tiles through ``make_row_loader`` (the backward's fixed-column loader: ~160 copy
#: instructions per thread and tile at D 128 instead of ~750). H200 bf16 (2026-12-03,
#: benchmarks/results/gpu_h200_2026-12-03c_flash_fwd_bench_*.txt): D128 0.65-0.72x -> 0.77-0.87x SDPA, S4096 tile
#: sweep sums 447 -> 531 TFLOP/s (D128), 409 -> 488 (D64)
TC_ROWLOAD = True
#: tensor-core forward with the lazy rescale of the online softmax (the decode kernel's LEAN bit 4). Off: on top of
#: TC_ROWLOAD no faster on the H200 (same run: S4096 sweep sums 531 / 481 TFLOP/s at D128 / D64 vs 531 / 488
#: without), correct (fwd_check) but further from SDPA's output (rel 3e-3 vs 1.1e-3)
TC_LAZY = False
#: tensor-core forward masks its masked tiles with per-row 32-bit column bounds (``make_tc_kernel(ROWBOUNDS=True)``:
#: the masked region of a tile's softmax 1.4-2.1x fewer SASS instructions, local ptxas); off: no faster on the H200
#: (2026-12-04, gpu_h200_2026-12-04_fwd_bench_rowbounds.txt: D64 causal S16k 263.5 vs 268.9 TFLOP/s, others +-4%)
TC_ROWBOUNDS = False
SIMT_TILES = {"gpu": (4, 4), "sim": (1, 2)}


def tc_config(D):
    """(warps, m-tiles per warp, keys per tile, padded head dim) for head dim D."""
    DP = max(16, -(-D // 16) * 16)
    if intr.SIM:
        return TC_TILES_SIM + (DP,)
    key = min(d for d in TC_TILES if d >= DP) if DP <= max(TC_TILES) else max(TC_TILES)
    return TC_TILES[key] + (DP,)


def _pad_multiple(D):
    """Head dims the tensor-core kernel takes as they are: rows of whole 16-byte chunks."""
    return -(-D // 8) * 8


def simt_config(D):
    nw, rw = SIMT_TILES["sim" if intr.SIM else "gpu"]
    return nw, rw, -(-D // 32)


@functools.lru_cache(maxsize=64)
def _const_device(data, dtype, shape, _dev):
    """Small read-only device arrays (cu_seqlens, slopes, block tables) cached by content and device: no copy
    per call."""
    return cuda.to_device(np.frombuffer(data, dtype=dtype).reshape(shape))


def _cached(x):
    x = np.ascontiguousarray(x)
    return _const_device(x.tobytes(), x.dtype.str, x.shape, _device_key())


def _as_words(x, D):
    """Device uint32 view (T, H, Dp/2) of a float16/bfloat16 (T, H, D) host or device array, the head dim
    zero-padded to Dp = a multiple of 8 (whole 16-byte chunks) when it is not one already."""
    pad = _pad_multiple(D) - D
    if dsp.is_device_array(x):
        x = dsp.to_device(x)
        if pad:
            x = cuda.to_device(np.pad(x.copy_to_host().view(np.uint16), ((0, 0), (0, 0), (0, pad))))
        return x.view(np.uint16).view(np.uint32)
    h = np.ascontiguousarray(x).view(np.uint16)
    if pad:
        h = np.pad(h, ((0, 0), (0, 0), (0, pad)))
    return cuda.to_device(np.ascontiguousarray(h).view(np.uint32))


def _scalars(ft, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed):
    cap_in = scale / softcap if softcap > 0 else 0.0
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 0.0
    return (ft(scale * LOG2E), ft(softcap), ft(cap_in), np.int32(left), np.int32(right), np.int64(lse_a),
            np.int64(lse_c), np.uint64(seed), keep_threshold(dropout_p), ft(inv_keep))


def flash_fwd_cuda_words(qw, kw, vw, cu_q, cu_k, max_sq, bf16, scale, left, right, softcap=0.0, dropout_p=0.0,
                         slopes=None, seed=0, lse_a=None, lse_c=None, D=None, out=None, lse=None):
    """Tensor-core forward on device words: qw (Tq, H, W), kw/vw (Tk, Hk, W) uint32 device arrays holding two
    float16/bfloat16 values per word (W = ceil(D/2)). Returns (out words (Tq, H, W) uint32, lse (H*Tq,) f32),
    written into ``out`` / ``lse`` when given."""
    Tq, H, W = qw.shape
    D = 2 * W if D is None else D
    lse_a, lse_c = (1, Tq) if lse_a is None else (lse_a, lse_c)
    nw, mt, bc, DP = tc_config(D)
    kern, BR, NTH, SMEM = make_tc_kernel(nw, mt, bc, DP, bool(bf16), softcap > 0, slopes is not None, dropout_p > 0,
                                         TC_ROWLOAD, TC_LAZY, TC_ROWBOUNDS)
    out = out_array((Tq, H, W), np.uint32) if out is None else out
    lse = out_array(H * Tq, np.float32) if lse is None else lse
    sl = np.zeros((0, 0), np.float32) if slopes is None else np.asarray(slopes, np.float32)
    grid = (max(1, -(-max_sq // BR)), H, len(cu_q) - 1)
    args = (qw, kw, vw, out, lse, _cached(np.asarray(cu_q, np.int32)), _cached(np.asarray(cu_k, np.int32)),
            _cached(sl)) + _scalars(np.float32, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed)
    fl.launch(kern, grid, NTH, SMEM, args)
    return out, lse


def flash_fwd_cuda(q, k, v, cu_q, cu_k, max_sq, dt, scale, left, right, softcap, dropout_p, slopes, seed,
                   lse_a, lse_c):
    """Packed forward on the GPU; returns device arrays out (Tq, H, D) and lse (H*Tq,) float32.
    float16 / bfloat16 run on tensor cores (bfloat16 output comes back as its uint16 bits),
    float32 / float64 on CUDA cores."""
    Tq, H, D = q.shape
    if dt in (np.dtype(np.float16), dsp.bfloat16):
        ow, lse = flash_fwd_cuda_words(_as_words(q, D), _as_words(k, D), _as_words(v, D), cu_q, cu_k, max_sq,
                                       dt == dsp.bfloat16, scale, left, right, softcap, dropout_p, slopes, seed,
                                       lse_a, lse_c, D)
        return _from_words(ow, D, dt), lse
    ft = np.float64 if dt == np.float64 else np.float32
    nw, rw, dd = simt_config(D)
    kern, BR, NTH, SMEM = make_simt_kernel(nw, rw, dd, dt == np.float64)
    qa, ka, va = (dsp.to_device(x) for x in (q, k, v))
    out = out_array((Tq, H, D), dt)
    lse = out_array(H * Tq, np.float32)
    sl = np.zeros((0, 0), dtype=ft) if slopes is None else np.ascontiguousarray(slopes, dtype=ft)
    grid = (max(1, -(-max_sq // BR)), H, len(cu_q) - 1)
    args = (qa, ka, va, out, lse, _cached(np.asarray(cu_q, np.int32)), _cached(np.asarray(cu_k, np.int32)),
            _cached(sl)) + _scalars(ft, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed)
    fl.launch(kern, grid, NTH, SMEM, args)
    return out, lse


def _from_words(w, D, dt):
    """Device words (T, H, W) of packed halves -> device array (T, H, D) of dt (see ``_words_to_dtype``)."""
    out = w.view(np.uint16)
    if out.shape[2] != D:
        out = cuda.to_device(np.ascontiguousarray(out.copy_to_host()[..., :D]))
    return _words_to_dtype(out, dt)


def _words_to_dtype(u16, dt):
    """Device array of raw uint16 halves -> device array of dtype ``dt``. float16 is a free view;
    bfloat16 stays as its uint16 bits, which numba device arrays can carry (``_dispatch.to_host``
    restores the dtype on the way back to the host)."""
    if dt == np.float16:
        return u16.view(np.float16)
    return u16


def ptx_signatures(head_dims=(64, 128, 256)):
    """(name, python function, numba signature) of every real kernel configuration, for PTX checks."""
    from numba import types

    def sig(elem, ft):
        arr3 = types.Array(elem, 3, "C")
        i32 = types.Array(types.int32, 1, "C")
        return (arr3, arr3, arr3, arr3, types.Array(types.float32, 1, "C"), i32, i32, types.Array(ft, 2, "C"),
                ft, ft, ft, types.int32, types.int32, types.int64, types.int64, types.uint64, types.uint64, ft)

    out = []
    for D in head_dims:
        nw, mt, bc, DP = tc_config(D)
        for bf16, flags in ((False, (False, False, False)), (True, (False, False, False)), (True, (True, True, True))):
            kern = make_tc_kernel(nw, mt, bc, DP, bf16, *flags, TC_ROWLOAD, TC_LAZY, TC_ROWBOUNDS)[0]
            name = f"tc_{'bf16' if bf16 else 'f16'}{'_cap_alibi_drop' if flags[0] else ''}_D{D}"
            out.append((name, kern.py_func, sig(types.uint32, types.float32)))
        nw, rw, dd = simt_config(D)
        for f64 in (False, True):
            ft = types.float64 if f64 else types.float32
            out.append((f"simt_{'f64' if f64 else 'f32'}_D{D}", make_simt_kernel(nw, rw, dd, f64)[0].py_func,
                        sig(ft, ft)))
    return out
