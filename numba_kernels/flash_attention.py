"""FlashAttention forward: ``flash_attention`` and ``flash_attention_varlen`` (flash-attn 2 semantics)."""
import math

import numpy as np

from numba_kernels import _dispatch as dsp
from numba_kernels._dropout import keep_threshold, normalize_seed

MAX_HEAD_DIM = 256


def _check_window(window_size):
    try:
        left, right = window_size
        left, right = int(left), int(right)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    return left, right


def _check_options(D, H, B, softmax_scale, window_size, softcap, alibi_slopes, dropout_p, causal):
    """Validate the scalar options; return (scale, left, right, softcap, slopes (B, H) float64 | None)."""
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        scale = float(softmax_scale)
        if not math.isfinite(scale) or scale == 0:
            raise ValueError(f"softmax_scale must be a finite non-zero number, got {softmax_scale!r}")
    left, right = _check_window(window_size)
    if causal:
        right = 0  # flash-attn: causal == window (left, 0), bottom-right aligned
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap!r}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    slopes = None
    if alibi_slopes is not None:
        a = np.asarray(dsp.to_host(alibi_slopes))
        if a.dtype.kind != "f":
            raise TypeError(f"alibi_slopes must be float32 or float64, got {a.dtype}")
        if a.shape == (H,):
            a = np.broadcast_to(a, (B, H))
        elif a.shape != (B, H):
            raise ValueError(f"alibi_slopes must have shape ({H},) or ({B}, {H}), got {a.shape}")
        slopes = np.ascontiguousarray(a, dtype=np.float64)
    return scale, left, right, softcap, dropout_p, slopes


def _check_qkv(q, k, v, ndim):
    dt = dsp.check_float("q", q, ndim)
    for name, x in (("k", k), ("v", v)):
        if dsp.check_float(name, x, ndim) != dt:
            raise TypeError(f"{name} must have the same dtype as q ({dt}), got {dsp.array_dtype(x)}")
    qshape, kshape = tuple(q.shape), tuple(k.shape)
    if kshape != tuple(v.shape):
        raise ValueError(f"v must have the same shape as k {kshape}, got {tuple(v.shape)}")
    H, D = qshape[-2], qshape[-1]
    Hk = kshape[-2]
    if kshape[-1] != D:
        raise ValueError(f"k must have head dim {D} like q, got shape {tuple(k.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got q shape {tuple(q.shape)}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the k/v heads ({Hk})")
    return dt


def _check_cu_seqlens(name, cu, total, nseq=None):
    cu = dsp.check_int_vector(name, cu, None if nseq is None else nseq + 1)
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 entries (B + 1), got {cu.shape[0]}")
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]}")
    if np.any(np.diff(cu) < 0):
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
    if cu[-1] != total:
        raise ValueError(f"{name}[-1] must equal the packed length {total}, got {cu[-1]}")
    return cu


def _lse_coeffs(H, Tq, batched_sq):
    """LSE of row i of sequence b, head h, lives at flat index ``cu_q[b] * a + h * c + i``:
    (a, c) = (H, Sq) gives the batched (B, H, Sq) layout, (1, Tq) the varlen (H, Tq) layout."""
    return (H, batched_sq) if batched_sq is not None else (1, Tq)


def _run(q, k, v, cu_q, cu_k, max_sq, dt, backend, scale, left, right, softcap, dropout_p, slopes, seed,
         batched_sq=None):
    """Packed attention on any backend. q (Tq, H, D), k/v (Tk, Hk, D) -> out (Tq, H, D) in dt and the
    flat float32 LSE (H * Tq,) in the layout of :func:`_lse_coeffs`; host or device arrays."""
    if backend == "reference":
        from numba_kernels.reference.flash_attention import flash_attention_varlen_ref

        hq, hk, hv = (dsp.to_host(x) for x in (q, k, v))
        out, lse = flash_attention_varlen_ref(
            hq, hk, hv, cu_q, cu_k, causal=False, softmax_scale=scale, window_size=(left, right),
            softcap=softcap, alibi_slopes=slopes, dropout_p=dropout_p, seed=seed, return_lse=True)
        if batched_sq is not None:  # (H, B*Sq) -> (B, H, Sq)
            lse = lse.reshape(lse.shape[0], -1, batched_sq).transpose(1, 0, 2)
        return out.astype(dt), np.ascontiguousarray(lse, dtype=np.float32).ravel()
    if backend == "cpu":
        return _run_cpu(q, k, v, cu_q, cu_k, dt, scale, left, right, softcap, dropout_p, slopes, seed, batched_sq)
    from numba_kernels.cuda.flash_attention import flash_fwd_cuda

    lse_a, lse_c = _lse_coeffs(q.shape[1], q.shape[0], batched_sq)
    return flash_fwd_cuda(q, k, v, cu_q, cu_k, max_sq, dt, scale, left, right, softcap, dropout_p, slopes, seed,
                          lse_a, lse_c)


def _run_cpu(q, k, v, cu_q, cu_k, dt, scale, left, right, softcap, dropout_p, slopes, seed, batched_sq):
    from numba_kernels.cpu import flash_attention as cpu
    from numba_kernels.cpu._blas import single_threaded_blas

    cdt = dsp.compute_dtype(dt)
    q, k, v = (dsp.to_host(x) for x in (q, k, v))
    Tq, H, D = q.shape
    qh, kh, vh = cpu.pack_heads((q, k, v), cdt)  # head-major (H, T, D) in the compute dtype, a reused scratch buffer
    out = np.empty((Tq, H, D), dtype=cdt)  # the caller's layout: the kernel writes it row by row, no copy back
    lse = np.empty(H * Tq, dtype=np.float32)
    lse_a, lse_c = _lse_coeffs(H, Tq, batched_sq)
    seqs, rows = cpu.plan_blocks(cu_q, left >= 0 or right >= 0)
    consts = cpu.make_consts(cdt, scale, softcap, dropout_p)
    sl = np.zeros((0, 0), dtype=cdt) if slopes is None else slopes.astype(cdt)
    with single_threaded_blas():
        cpu.flash_fwd_cpu(qh, kh, vh, cu_q.astype(np.int64), cu_k.astype(np.int64), seqs, rows, out, lse, lse_a,
                          lse_c, consts, left, right, sl, dropout_p, np.uint64(seed), keep_threshold(dropout_p),
                          cpu.BLOCK_K)
    return out.astype(dt, copy=False), lse


def _finish(out, lse, dt, on_device, return_lse, drawn_seed):
    """Results where the inputs lived (device in -> device out), plus the drawn seed if any."""
    if on_device:
        out, lse = dsp.to_device(out), dsp.to_device(lse)
    else:
        out, lse = dsp.to_host(out, dt), dsp.to_host(lse)
    res = (out, lse) if return_lse else (out,)
    if drawn_seed is not None:
        res = res + (drawn_seed,)
    return res[0] if len(res) == 1 else res


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, dropout_p=0.0, seed=None, return_lse=False, backend=None):
    """Exact attention, computed tile by tile (FlashAttention); flash-attn's ``flash_attn_func``.

    Parameters
    ----------
    q : ndarray, shape (B, Sq, H, D)
        Queries; float16, bfloat16 (``ml_dtypes``), float32 or float64; D <= 256, any value.
    k, v : ndarray, shape (B, Sk, Hk, D)
        Keys and values, same dtype as q. Hk must divide H (GQA / MQA): query head h reads
        key/value head ``h // (H // Hk)``.
    causal : bool
        Mask keys after the query, aligned bottom-right when Sq != Sk (flash-attn), i.e. the same
        as ``window_size=(left, 0)``.
    softmax_scale : float, optional
        Scale of q.k; default ``1 / sqrt(D)``.
    window_size : (int, int)
        (left, right) sliding window: row i sees keys j with
        ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; -1 means unbounded.
    softcap : float
        If > 0, logits become ``softcap * tanh(scale * q.k / softcap)`` (Gemma-2 style).
    alibi_slopes : ndarray, shape (H,) or (B, H), optional
        Adds ``-slope * |i + Sk - Sq - j|`` to the logits (after softcap).
    dropout_p : float
        Dropout on the attention probabilities, in [0, 1). The mask is a counter hash of
        (seed, batch, head, row, col): every backend drops the same elements for the same seed,
        and the backward regenerates it. Kept probabilities are scaled by ``1 / (1 - dropout_p)``.
    seed : int, optional
        Dropout seed. With ``dropout_p > 0`` and ``seed=None`` a seed is drawn from the OS and
        returned as the last element of the result tuple, so the call can be reproduced.
    return_lse : bool
        Also return the log-sum-exp of the logits, shape (B, H, Sq), float32
        (natural log; ``-inf`` for a fully masked row).
    backend : {"auto", "cpu", "cuda", "reference"}, optional
        Default: the ``NUMBA_KERNELS_BACKEND`` environment variable, else "auto" (cuda when an
        input is a device array, else cpu).

    Returns
    -------
    out : ndarray, shape (B, Sq, H, D)
        In q's dtype; a numba device array when the inputs were device arrays. A fully masked
        row gives 0 (never NaN). bfloat16 on the GPU: numba device arrays cannot hold bfloat16,
        so pass bfloat16 as NumPy arrays (results come back as bfloat16 NumPy arrays); a device
        computation that produces bfloat16 returns the raw bits as a uint16 device array.
    lse : ndarray, shape (B, H, Sq), float32
        Only with ``return_lse=True``.
    seed : int
        Only when dropout drew the seed (``dropout_p > 0`` and ``seed=None``).
    """
    dt = _check_qkv(q, k, v, 4)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if k.shape[0] != B:
        raise ValueError(f"k must have batch size {B} like q, got shape {tuple(k.shape)}")
    scale, left, right, softcap, dropout_p, slopes = _check_options(
        D, H, B, softmax_scale, window_size, softcap, alibi_slopes, dropout_p, causal)
    drawn = normalize_seed(None) if (dropout_p > 0 and seed is None) else None
    seed = drawn if drawn is not None else normalize_seed(seed if seed is not None else 0)
    be = dsp.resolve_backend(backend, q, k, v)
    if dsp.any_on_device(q, k, v):
        q, k, v = (dsp.to_device(x) for x in (q, k, v))
    cu_q = np.arange(B + 1, dtype=np.int32) * Sq
    cu_k = np.arange(B + 1, dtype=np.int32) * Sk
    # (B, S, H, D) -> packed (B*S, H, D): a free reshape of contiguous arrays
    qp, kp, vp = (x.reshape((B * x.shape[1],) + tuple(x.shape[2:])) for x in (q, k, v))
    out, lse = _run(qp, kp, vp, cu_q, cu_k, Sq, dt, be, scale, left, right, softcap, dropout_p, slopes, seed,
                    batched_sq=Sq)
    return _finish(out.reshape((B, Sq, H, D)), lse.reshape((B, H, Sq)), dt, dsp.any_on_device(q, k, v),
                   return_lse, drawn)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                           causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, dropout_p=0.0, seed=None, return_lse=False, backend=None):
    """Attention over packed variable-length sequences; flash-attn's ``flash_attn_varlen_func``.

    Parameters
    ----------
    q : ndarray, shape (total_q, H, D)
        Queries of all sequences concatenated; sequence b owns rows
        ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
    k, v : ndarray, shape (total_k, Hk, D)
    cu_seqlens_q, cu_seqlens_k : ndarray, shape (B + 1,), int32
        Cumulative sequence lengths: start at 0, non-decreasing, end at total_q / total_k.
    max_seqlen_q, max_seqlen_k : int, optional
        Upper bounds of the sequence lengths (computed when None; checked when given).
    causal, softmax_scale, window_size, softcap, alibi_slopes, dropout_p, seed, backend
        As in :func:`flash_attention`; masks, ALiBi distances and dropout coordinates are per
        sequence (rows and columns counted from each sequence's start, batch index = b).

    Returns
    -------
    out : ndarray, shape (total_q, H, D)
    lse : ndarray, shape (H, total_q), float32
        Only with ``return_lse=True`` (flash-attn's varlen LSE layout).
    seed : int
        Only when dropout drew the seed.
    """
    dt = _check_qkv(q, k, v, 3)
    Tq, H, D = q.shape
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, Tq)
    B = cu_q.shape[0] - 1
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], B)
    lens_q, lens_k = np.diff(cu_q), np.diff(cu_k)
    for name, given, lens in (("max_seqlen_q", max_seqlen_q, lens_q), ("max_seqlen_k", max_seqlen_k, lens_k)):
        if given is not None and int(given) < int(lens.max(initial=0)):
            raise ValueError(f"{name}={given} is smaller than the longest sequence ({int(lens.max())})")
    scale, left, right, softcap, dropout_p, slopes = _check_options(
        D, H, B, softmax_scale, window_size, softcap, alibi_slopes, dropout_p, causal)
    drawn = normalize_seed(None) if (dropout_p > 0 and seed is None) else None
    seed = drawn if drawn is not None else normalize_seed(seed if seed is not None else 0)
    be = dsp.resolve_backend(backend, q, k, v)
    out, lse = _run(q, k, v, cu_q, cu_k, int(lens_q.max(initial=0)), dt, be, scale, left, right, softcap,
                    dropout_p, slopes, seed)
    return _finish(out, lse.reshape((H, Tq)), dt, dsp.any_on_device(q, k, v), return_lse, drawn)
