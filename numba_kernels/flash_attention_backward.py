"""FlashAttention backward: ``flash_attention_backward`` and ``flash_attention_varlen_backward``.

Plain functions taking the upstream gradient and the forward's saved ``out`` and ``lse``, returning
(dq, dk, dv). Batched calls are packed into the varlen form so one kernel serves both.
"""

import numpy as np

from numba_kernels import _dispatch as dsp
from numba_kernels._dropout import keep_threshold, normalize_seed
from numba_kernels.flash_attention import _check_cu_seqlens, _check_options, _check_qkv

def _check_like_q(name, x, q, dt):
    dsp.check_float(name, x, len(q.shape))
    if tuple(x.shape) != tuple(q.shape):
        raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
    if dsp.array_dtype(x) != dt:
        raise TypeError(f"{name} must have the same dtype as q ({dt}), got {dsp.array_dtype(x)}")


def _check_lse(lse, shape):
    dsp.check_float("lse", lse, None, dtypes=(np.dtype(np.float32), np.dtype(np.float64)))
    if tuple(lse.shape) != shape:
        raise ValueError(f"lse must have shape {shape} (the forward's LSE), got {tuple(lse.shape)}")


def _check_backward(dout, q, k, v, out, ndim, dropout_p, seed, deterministic, backend):
    """Shared checks; returns (dtype, seed as int, backend name)."""
    dt = _check_qkv(q, k, v, ndim)
    _check_like_q("dout", dout, q, dt)
    _check_like_q("out", out, q, dt)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if float(dropout_p) > 0 and seed is None:
        raise ValueError("seed is required when dropout_p > 0: pass the seed the forward used (or returned), "
                         "so the backward regenerates the same dropout mask")
    seed = normalize_seed(seed if seed is not None else 0)
    return dt, seed, dsp.resolve_backend(backend, dout, q, k, v, out)


def _run_bwd(dout, q, k, v, out, lse, cu_q, cu_k, dt, backend, scale, left, right, softcap, dropout_p, slopes, seed):
    """Packed backward on the host. dout/q/out (Tq, H, D), k/v (Tk, Hk, D), lse (H, Tq) ->
    dq (Tq, H, D), dk/dv (Tk, Hk, D) in dt."""
    dout, q, k, v, out, lse = (dsp.to_host(x) for x in (dout, q, k, v, out, lse))
    if backend == "reference":
        from numba_kernels.reference.flash_attention_backward import flash_attention_varlen_backward_ref

        grads = flash_attention_varlen_backward_ref(
            dout, q, k, v, out, lse, cu_q, cu_k, causal=False, softmax_scale=scale, window_size=(left, right),
            softcap=softcap, alibi_slopes=slopes, dropout_p=dropout_p, seed=seed)
        return tuple(g.astype(dt) for g in grads)
    from numba_kernels.cpu import flash_attention as cpu_fwd, flash_attention_backward as cpu
    from numba_kernels.cpu._blas import single_threaded_blas
    from numba_kernels.cpu._math import LOG2E

    cdt = dsp.compute_dtype(dt)
    (Tq, H, D), (Tk, Hk) = q.shape, k.shape[:2]
    # head-major packed tiles (H, T, D) in the compute dtype (fp16/bf16 widen here), in a reused scratch buffer
    qh, kh, vh, doh = cpu_fwd.pack_heads((q, k, v, dout), cdt)
    # D_i = rowsum(dO * O), (H, Tq); no copies when dout/out already are contiguous in the compute dtype
    di = np.ascontiguousarray(np.einsum("thd,thd->ht", np.ascontiguousarray(dout, dtype=cdt),
                                        np.ascontiguousarray(out, dtype=cdt)))
    lse = np.asarray(lse, dtype=np.float64)
    lse2 = np.ascontiguousarray(np.where(np.isfinite(lse), lse * LOG2E, np.inf), dtype=cdt)  # (H, Tq); +inf: P = 0
    # gradients in the caller's layout (T, H, D): the kernels write them row by row, no copy back
    dq = np.zeros((Tq, H, D), dtype=cdt)
    dk = np.zeros((Tk, Hk, D), dtype=cdt)
    dv = np.zeros((Tk, Hk, D), dtype=cdt)
    plan = cpu.plan_blocks(cu_q, cu_k, left, right)
    consts = cpu.make_consts(cdt, scale, softcap, dropout_p)
    sl = np.zeros((0, 0), dtype=cdt) if slopes is None else slopes.astype(cdt)
    with single_threaded_blas():
        cpu.flash_bwd_cpu(qh, kh, vh, doh, lse2, di, cu_q.astype(np.int64), cu_k.astype(np.int64), *plan, dq, dk, dv,
                          consts, left, right, sl, dropout_p, np.uint64(seed), keep_threshold(dropout_p))
    return tuple(g.astype(dt, copy=False) for g in (dq, dk, dv))


def _run_cuda(dout, q, k, v, out, lse, cu_q, cu_k, dt, scale, left, right, softcap, dropout_p, slopes, seed, lse_a,
              lse_c, deterministic):
    """Packed backward on the GPU (host or device arrays in, device arrays out); lse flat in the layout
    ``lse[cu_q[b] * lse_a + h * lse_c + i]``."""
    from numba_kernels.cuda.flash_attention_backward import flash_bwd_cuda

    max_sq = int(np.diff(cu_q).max(initial=0))
    max_sk = int(np.diff(cu_k).max(initial=0))
    return flash_bwd_cuda(dout, q, k, v, out, lse, cu_q, cu_k, max_sq, max_sk, dt, scale, left, right, softcap,
                          dropout_p, slopes, seed, lse_a, lse_c, bool(deterministic))


def _where_inputs(grads, dt, on_device):
    if on_device:
        return tuple(dsp.to_device(g) for g in grads)
    return tuple(dsp.to_host(g, dt) for g in grads)


def flash_attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None, deterministic=False,
                             backend=None):
    """Gradients of :func:`flash_attention` (FlashAttention-2 backward; flash-attn's ``_flash_attn_backward``).

    Parameters
    ----------
    dout : ndarray, shape (B, Sq, H, D)
        Upstream gradient of the attention output, q's dtype.
    q : ndarray, shape (B, Sq, H, D)
    k, v : ndarray, shape (B, Sk, Hk, D)
        The forward's inputs (Hk divides H).
    out : ndarray, shape (B, Sq, H, D)
        The forward's output, q's dtype.
    lse : ndarray, shape (B, H, Sq), float32 or float64
        The forward's log-sum-exp (``return_lse=True``); P is recomputed from it tile by tile.
    causal, softmax_scale, window_size, softcap, alibi_slopes, dropout_p
        Exactly as given to the forward.
    seed : int
        Required when ``dropout_p > 0``: the seed the forward used (or returned); the same dropout
        mask is regenerated from it, never stored.
    deterministic : bool
        CUDA: True computes dQ in a separate pass (bitwise identical run to run; up to ~20% slower);
        False (default) adds dQ with fp32 atomics where that is faster (run-to-run differences in the
        last bits; fp16/bf16 at head dim 128 use the separate pass anyway). The CPU backward is always
        deterministic: dQ is accumulated in a separate pass.
    backend : {"auto", "cpu", "cuda", "reference"}, optional
        As in the forward.

    Returns
    -------
    dq : ndarray, shape (B, Sq, H, D)
    dk, dv : ndarray, shape (B, Sk, Hk, D)
        In q's dtype (accumulated in float32, float64 for float64 inputs). dk and dv of a k/v head are
        summed over the query heads of its group (GQA/MQA). Rows that see no key get zero gradients.
    """
    dt, seed, be = _check_backward(dout, q, k, v, out, 4, dropout_p, seed, deterministic, backend)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if k.shape[0] != B:
        raise ValueError(f"k must have batch size {B} like q, got shape {tuple(k.shape)}")
    _check_lse(lse, (B, H, Sq))
    scale, left, right, softcap, dropout_p, slopes = _check_options(
        D, H, B, softmax_scale, window_size, softcap, alibi_slopes, dropout_p, causal)
    cu_q = np.arange(B + 1, dtype=np.int32) * Sq
    cu_k = np.arange(B + 1, dtype=np.int32) * Sk
    on_device = dsp.any_on_device(dout, q, k, v, out)
    if be == "cuda":  # (B, S, H, D) -> packed (B*S, H, D), free; lse (B, H, Sq) read in place
        packed = [(dsp.to_device(x) if dsp.is_device_array(x) else np.ascontiguousarray(x)).reshape(
            (B * x.shape[1],) + tuple(x.shape[2:])) for x in (dout, q, k, v, out)]
        lse_f = dsp.to_device(lse).reshape(B * H * Sq) if dsp.is_device_array(lse) else np.ravel(lse)
        dq, dk, dv = _run_cuda(*packed, lse_f, cu_q, cu_k, dt, scale, left, right, softcap, dropout_p, slopes, seed,
                               H, Sq, deterministic)
        grads = (dq.reshape((B, Sq, H, D)), dk.reshape(tuple(k.shape)), dv.reshape(tuple(v.shape)))
        return _where_inputs(grads, dt, on_device)
    # (B, S, H, D) -> packed (B*S, H, D); lse (B, H, Sq) -> (H, B*Sq)
    packed = [np.reshape(dsp.to_host(x), (B * x.shape[1],) + tuple(x.shape[2:])) for x in (dout, q, k, v, out)]
    lse_p = np.transpose(dsp.to_host(lse), (1, 0, 2)).reshape(H, B * Sq)
    dq, dk, dv = _run_bwd(*packed, lse_p, cu_q, cu_k, dt, be, scale, left, right, softcap, dropout_p, slopes, seed)
    grads = (dq.reshape((B, Sq, H, D)), dk.reshape(tuple(k.shape)), dv.reshape(tuple(v.shape)))
    return _where_inputs(grads, dt, dsp.any_on_device(dout, q, k, v, out))


def flash_attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                                    max_seqlen_k=None, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                                    softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None, deterministic=False,
                                    backend=None):
    """Gradients of :func:`flash_attention_varlen` over packed variable-length sequences.

    Parameters
    ----------
    dout, q, out : ndarray, shape (total_q, H, D)
    k, v : ndarray, shape (total_k, Hk, D)
    lse : ndarray, shape (H, total_q), float32 or float64
        The forward's varlen LSE.
    cu_seqlens_q, cu_seqlens_k : ndarray, shape (B + 1,), int32
    max_seqlen_q, max_seqlen_k : int, optional
        Upper bounds of the sequence lengths (checked when given).
    causal, softmax_scale, window_size, softcap, alibi_slopes, dropout_p, seed, deterministic, backend
        As in :func:`flash_attention_backward`.

    Returns
    -------
    dq : ndarray, shape (total_q, H, D)
    dk, dv : ndarray, shape (total_k, Hk, D)
    """
    dt, seed, be = _check_backward(dout, q, k, v, out, 3, dropout_p, seed, deterministic, backend)
    Tq, H, D = q.shape
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, Tq)
    B = cu_q.shape[0] - 1
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], B)
    for name, given, lens in (("max_seqlen_q", max_seqlen_q, np.diff(cu_q)),
                              ("max_seqlen_k", max_seqlen_k, np.diff(cu_k))):
        if given is not None and int(given) < int(lens.max(initial=0)):
            raise ValueError(f"{name}={given} is smaller than the longest sequence ({int(lens.max())})")
    _check_lse(lse, (H, Tq))
    scale, left, right, softcap, dropout_p, slopes = _check_options(
        D, H, B, softmax_scale, window_size, softcap, alibi_slopes, dropout_p, causal)
    if be == "cuda":
        lse_f = dsp.to_device(lse).reshape(H * Tq) if dsp.is_device_array(lse) else np.ravel(lse)
        grads = _run_cuda(dout, q, k, v, out, lse_f, cu_q, cu_k, dt, scale, left, right, softcap, dropout_p, slopes,
                          seed, 1, Tq, deterministic)
    else:
        grads = _run_bwd(dout, q, k, v, out, lse, cu_q, cu_k, dt, be, scale, left, right, softcap, dropout_p, slopes,
                         seed)
    return _where_inputs(grads, dt, dsp.any_on_device(dout, q, k, v, out))
