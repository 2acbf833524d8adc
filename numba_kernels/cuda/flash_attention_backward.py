"""FlashAttention-2 backward on CUDA: host side (tile choice, dtype handling, launches).

Everything works on the packed layout dout/q/out (Tq, H, D), k/v (Tk, Hk, D) with cu_seqlens and the
forward's LSE addressed as ``lse[cu_q[b] * lse_a + h * lse_c + i]`` (batched (B, H, Sq): (H, Sq);
varlen (H, Tq): (1, Tq)). Steps:

1. D_i = rowsum(dO * O) (``row_dot``).
2. dK / dV: one block per (key tile, k/v head, sequence), the GQA group summed inside the block.
   Without ``deterministic`` the same kernel adds dS K into a zeroed fp32 (fp64) dQ buffer with atomics.
3. ``deterministic=True``: dQ in a separate pass, one block per (query tile, head, sequence): bitwise
   reproducible, at the price of recomputing S and dP once more (about +40% work).

float32 / float64 run on CUDA cores (``_flash_bwd_simt``); float16 / bfloat16 run on tensor cores
(``_flash_bwd_tc``) up to head dim 128 and are widened to float32 for the CUDA-core kernels above that.
"""
import numpy as np
from numba import cuda

from numba_kernels import _dispatch as dsp
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._flash_bwd_simt import make_row_dot, make_simt_bwd_kernels
from numba_kernels.cuda.flash_attention import _cached, _scalars

#: (warps, query rows per tile) of the CUDA-core backward; tiny tiles for the simulator
SIMT_BWD_TILES = {"gpu": (4, 16), "sim": (1, 4)}


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
    x = cuda.device_array(shape, dtype=dtype)
    _fill_kernel()[max(1, -(-x.size // 256)), 256](x.reshape(x.size), 0)
    return x


_FILL = {}


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
    di = cuda.device_array((H, T), dtype=ft)
    make_row_dot(ft == np.float64)[max(1, -(-(T * H) // 128)), 128](dout, out, di)
    return di


def flash_bwd_simt(dout, q, k, v, out, lse, cu_q, cu_k, max_sq, max_sk, ft, scale, left, right, softcap, dropout_p,
                   slopes, seed, lse_a, lse_c, deterministic):
    """CUDA-core backward on device arrays in ft (float32 / float64); lse flat. Returns (dq, dk, dv) in ft."""
    Tq, H, D = q.shape
    nw, br, dd = simt_bwd_config(D)
    dkdv, dqk, NTH, SMEM = make_simt_bwd_kernels(nw, br, dd, ft == np.float64)
    di = row_dot(dout, out, ft)
    dk = cuda.device_array(k.shape, dtype=ft)
    dv = cuda.device_array(v.shape, dtype=ft)
    B = len(cu_q) - 1
    tail = _args(ft, cu_q, cu_k, slopes, scale, softcap, dropout_p, left, right, lse_a, lse_c, seed)
    if deterministic:
        dq = cuda.device_array(q.shape, dtype=ft)
        intr.launch(dkdv, (max(1, -(-max_sk // 32)), k.shape[1], B), NTH, SMEM,
                    (q, k, v, dout, lse, di, dq, dk, dv) + tail + (False,))
        intr.launch(dqk, (max(1, -(-max_sq // br)), H, B), NTH, SMEM, (q, k, v, dout, lse, di, dq) + tail)
    else:
        dq = _zeros(q.shape, ft)
        intr.launch(dkdv, (max(1, -(-max_sk // 32)), k.shape[1], B), NTH, SMEM,
                    (q, k, v, dout, lse, di, dq, dk, dv) + tail + (True,))
    return dq, dk, dv


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
    # float16 / bfloat16 on the CUDA-core kernels: widen on the host, narrow the gradients back
    arrs = [cuda.to_device(dsp.to_host(x, dt).astype(np.float32)) for x in (dout, q, k, v, out)]
    lse_d = cuda.to_device(np.ravel(dsp.to_host(lse)).astype(np.float32))
    grads = flash_bwd_simt(*arrs, lse_d, cu_q, cu_k, max_sq, max_sk, np.float32, scale, left, right, softcap,
                           dropout_p, slopes, seed, lse_a, lse_c, deterministic)
    return tuple(cuda.to_device(g.copy_to_host().astype(dt).view(np.uint16)) if dt == dsp.bfloat16
                 else cuda.to_device(g.copy_to_host().astype(dt)) for g in grads)
