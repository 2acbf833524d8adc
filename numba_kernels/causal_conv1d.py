"""Causal depthwise conv1d: ``causal_conv1d``, ``causal_conv1d_update``, ``causal_conv1d_backward``
(causal-conv1d's ``causal_conv1d_fn`` / ``causal_conv1d_update`` semantics, any width W >= 1)."""
import numpy as np

from numba_kernels import _dispatch as dsp

ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _check_weight_bias(weight, bias, D):
    dsp.check_float("weight", weight, 2)
    if weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape ({D}, W) with W >= 1, got {tuple(weight.shape)}")
    if bias is not None:
        dsp.check_float("bias", bias, 1)
        if tuple(bias.shape) != (D,):
            raise ValueError(f"bias must have shape ({D},), got {tuple(bias.shape)}")
    return weight.shape[1]


def _check_like(name, a, dt, shape):
    if a is None:
        return None
    if dsp.check_float(name, a, len(shape)) != dt:
        raise TypeError(f"{name} must have the same dtype as x ({dt}), got {dsp.array_dtype(a)}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
    return a


def _check_int(name, a, shape):
    """Integer (host or device) array of this shape; host arrays come back as int32 copies."""
    if a is None:
        return None
    if not (isinstance(a, np.ndarray) or dsp.is_device_array(a)):
        raise TypeError(f"{name} must be a numpy or CUDA device array, got {type(a).__name__}")
    if not np.issubdtype(dsp.array_dtype(a), np.integer):
        raise TypeError(f"{name} must have an integer dtype (int32), got {dsp.array_dtype(a)}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
    if dsp.is_device_array(a) and dsp.array_dtype(a) == np.int32:
        return a
    return dsp.to_host(a).astype(np.int32)


def _check_x(x):
    dt = dsp.check_float("x", x, 3)
    if x.shape[2] < 1:
        raise ValueError(f"x must have shape (B, D, L) with L >= 1, got {tuple(x.shape)}")
    return dt


def _host_compute(a, cdt, empty_ndim):
    """Host C-contiguous array in the compute dtype, or an empty placeholder for None."""
    if a is None:
        return np.zeros((0,) * empty_ndim, dtype=cdt)
    return np.ascontiguousarray(dsp.to_host(a), dtype=cdt)


def _cast_back(a, dt, on_device):
    """A result in dtype ``dt`` where the inputs lived (bfloat16 on the device travels as uint16 bits)."""
    if a is None:
        return None
    dev_dt = np.dtype(np.uint16) if dt == dsp.bfloat16 else np.dtype(dt)
    if on_device and dsp.is_device_array(a) and dsp.array_dtype(a) == dev_dt:
        return a
    h = dsp.to_host(a, dt).astype(dt, copy=False)
    return dsp.to_device(h.view(dev_dt)) if on_device else h


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False,
                  seq_idx=None, backend=None):
    """Causal depthwise 1-D convolution; causal-conv1d's ``causal_conv1d_fn`` for any width W >= 1.

    ``out[b, d, t] = act(bias[d] + sum_w weight[d, w] * xpad[b, d, t + w])``, where xpad is x left-padded
    along L with W - 1 zeros, or with ``initial_states`` when given. Accumulation in float32 (float64 for
    float64 x).

    Parameters
    ----------
    x : ndarray, shape (B, D, L)
        float16, bfloat16 (``ml_dtypes``), float32 or float64.
    weight : ndarray, shape (D, W)
        Any float dtype (converted to the compute dtype); any W >= 1.
    bias : ndarray, shape (D,), optional
    activation : {None, "silu", "swish"}
        "swish" is the same as "silu".
    initial_states : ndarray, shape (B, D, W - 1), optional
        The W - 1 inputs before x[..., 0]; same dtype as x.
    return_final_states : bool
        Also return the last W - 1 inputs of xpad (including initial states when L < W - 1).
    seq_idx : ndarray, shape (B, L), int32, optional
        Sequence id of every position (packed sequences). Output t sees input position p iff
        ``seq_idx[b, max(p, 0)] == seq_idx[b, t]``: the padding positions p < 0 carry the id of position 0.
        Unlike causal-conv1d, this combines with ``initial_states`` / ``return_final_states``: for the
        usual non-decreasing seq_idx, initial_states only reach the first segment, and final_states are
        the last W - 1 inputs of the last segment, zero where that segment (with the initial state, if it
        is also the first segment) is shorter than W - 1.
    backend : {"auto", "cpu", "cuda", "reference"}, optional
        Default: ``NUMBA_KERNELS_BACKEND``, else "auto" (cuda when an input is a device array).

    Returns
    -------
    out : ndarray, shape (B, D, L)
        In x's dtype; numba device array when inputs were device arrays.
    final_states : ndarray, shape (B, D, W - 1)
        Only with ``return_final_states=True``; x's dtype.
    """
    dt = _check_x(x)
    B, D, L = x.shape
    W = _check_weight_bias(weight, bias, D)
    silu = _check_activation(activation)
    _check_like("initial_states", initial_states, dt, (B, D, W - 1))
    seq = _check_int("seq_idx", seq_idx, (B, L))
    be = dsp.resolve_backend(backend, x, weight, bias, initial_states, seq_idx)
    on_dev = dsp.any_on_device(x, weight, bias, initial_states, seq_idx)
    cdt = dsp.compute_dtype(dt)
    if be == "reference":
        from numba_kernels.reference.causal_conv1d import causal_conv1d_ref

        h = [dsp.to_host(a) for a in (x, weight, bias, initial_states, seq)]
        out, final = causal_conv1d_ref(*h[:3], activation, h[3], True, h[4])
    elif be == "cpu":
        from numba_kernels.cpu.causal_conv1d import conv_fwd_cpu

        xc = _host_compute(x, cdt, 3)
        out = np.empty((B, D, L), dtype=cdt)
        final = np.empty((B, D, W - 1) if return_final_states else (0, 0, 0), dtype=cdt)
        conv_fwd_cpu(xc, _host_compute(weight, cdt, 2), _host_compute(bias, cdt, 1),
                     _host_compute(initial_states, cdt, 3), _host_compute(seq, np.int32, 2), silu, out, final)
    else:
        from numba_kernels.cuda.causal_conv1d import conv_fwd_cuda

        out, final = conv_fwd_cuda(x, weight, bias, initial_states, seq, silu, return_final_states, dt)
    out = _cast_back(out, dt, on_dev)
    if not return_final_states:
        return out
    return out, _cast_back(final, dt, on_dev)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, backend=None):
    """Decode step(s) of :func:`causal_conv1d`; causal-conv1d's ``causal_conv1d_update``.

    **Modifies ``conv_state`` in place** (the only argument any op in this module writes).

    Parameters
    ----------
    x : ndarray, shape (B, D) or (B, D, Lnew)
        The new token(s).
    conv_state : ndarray, shape (B, D, S), S >= W - 1
        Same dtype as x. Without ``cache_seqlens`` it holds the last S inputs (oldest first): the window of
        the first new token is its last W - 1 entries, and on return it holds the last S entries of
        ``[conv_state, x]``. A host array is updated in place even when the kernel runs on the GPU.
    weight : ndarray, shape (D, W)
    bias : ndarray, shape (D,), optional
    activation : {None, "silu", "swish"}
    cache_seqlens : ndarray, shape (B,), int32, optional
        Circular-buffer mode (S >= 1): the window of the first new token is
        ``conv_state[b, :, (c - (W - 1) + k) % S]`` for k < W - 1, c = cache_seqlens[b] >= 0, and token i is
        written to ``(c + i) % S`` (the last write wins when Lnew > S). cache_seqlens is not advanced.
    backend : {"auto", "cpu", "cuda", "reference"}, optional

    Returns
    -------
    out : ndarray, shape like x
        In x's dtype. Running :func:`causal_conv1d` over L tokens equals L calls of this op.
    """
    dt = dsp.check_float("x", x, None)
    if len(x.shape) not in (2, 3):
        raise ValueError(f"x must have shape (B, D) or (B, D, Lnew), got {tuple(x.shape)}")
    B, D = x.shape[:2]
    Ln = 1 if len(x.shape) == 2 else x.shape[2]
    W = _check_weight_bias(weight, bias, D)
    silu = _check_activation(activation)
    if dsp.check_float("conv_state", conv_state, 3) != dt:
        raise TypeError(f"conv_state must have the same dtype as x ({dt}), got {dsp.array_dtype(conv_state)}")
    S = conv_state.shape[2]
    if tuple(conv_state.shape[:2]) != (B, D) or S < W - 1:
        raise ValueError(f"conv_state must have shape ({B}, {D}, S) with S >= W - 1 = {W - 1}, "
                         f"got {tuple(conv_state.shape)}")
    seqlens = _check_int("cache_seqlens", cache_seqlens, (B,))
    if seqlens is not None:
        if S < 1:
            raise ValueError("conv_state must have S >= 1 entries along its last axis with cache_seqlens")
        if isinstance(seqlens, np.ndarray) and np.any(seqlens < 0):
            raise ValueError(f"cache_seqlens must be >= 0, got {seqlens.tolist()}")
    be = dsp.resolve_backend(backend, x, conv_state, weight, bias, cache_seqlens)
    on_dev = dsp.any_on_device(x, conv_state, weight, bias, cache_seqlens)
    cdt = dsp.compute_dtype(dt)
    x3 = x.reshape((B, D, Ln))  # (B, D) -> (B, D, 1)
    if be == "cuda":
        from numba_kernels.cuda.causal_conv1d import conv_update_cuda

        out = conv_update_cuda(x3, conv_state, weight, bias, seqlens, silu, dt)
    elif dsp.is_device_array(conv_state):
        raise ValueError(f"backend={be!r} cannot update a device conv_state in place; use backend='cuda'")
    else:
        xh = dsp.to_host(x3)
        state = np.asarray(conv_state)
        if be == "reference":
            from numba_kernels.reference.causal_conv1d import causal_conv1d_update_ref

            h = [dsp.to_host(a) for a in (weight, bias, seqlens)]
            out = causal_conv1d_update_ref(xh, state, h[0], h[1], activation, h[2])
        else:
            from numba_kernels.cpu.causal_conv1d import conv_update_cpu

            work = state if (state.dtype == cdt and state.flags.c_contiguous) else state.astype(cdt)
            out = np.empty((B, D, Ln), dtype=cdt)
            conv_update_cpu(np.ascontiguousarray(xh, dtype=cdt), work, _host_compute(weight, cdt, 2),
                            _host_compute(bias, cdt, 1), np.zeros(0, np.int64) if seqlens is None else
                            dsp.to_host(seqlens).astype(np.int64), silu, out)
            if work is not state:
                state[...] = work.astype(dt)  # exact: entries are inputs of this dtype
    out = _cast_back(out, dt, on_dev)
    return out.reshape(tuple(x.shape))


def causal_conv1d_backward(dout, x, weight, bias=None, activation=None, initial_states=None, dfinal_states=None,
                           seq_idx=None, backend=None):
    """Gradients of :func:`causal_conv1d` (recomputes the pre-activation; nothing saved but the inputs).

    Parameters
    ----------
    dout : ndarray, shape (B, D, L)
        Upstream gradient of out; same dtype as x.
    x, weight, bias, activation, initial_states, seq_idx
        As given to :func:`causal_conv1d`.
    dfinal_states : ndarray, shape (B, D, W - 1), optional
        Upstream gradient of final_states; same dtype as x.
    backend : {"auto", "cpu", "cuda", "reference"}, optional

    Returns
    -------
    dx : ndarray, shape (B, D, L)
        x's dtype.
    dweight : ndarray, shape (D, W)
        weight's dtype (accumulated in float32 / float64).
    dbias : ndarray, shape (D,) or None
        None when bias is None.
    dinitial_states : ndarray, shape (B, D, W - 1) or None
        None when initial_states is None.
    """
    dt = _check_x(x)
    B, D, L = x.shape
    W = _check_weight_bias(weight, bias, D)
    silu = _check_activation(activation)
    _check_like("dout", dout, dt, (B, D, L))
    _check_like("initial_states", initial_states, dt, (B, D, W - 1))
    _check_like("dfinal_states", dfinal_states, dt, (B, D, W - 1))
    seq = _check_int("seq_idx", seq_idx, (B, L))
    arrays = (dout, x, weight, bias, initial_states, dfinal_states, seq_idx)
    be = dsp.resolve_backend(backend, *arrays)
    on_dev = dsp.any_on_device(*arrays)
    cdt = dsp.compute_dtype(dt)
    if be == "reference":
        from numba_kernels.reference.causal_conv1d import causal_conv1d_backward_ref

        h = [dsp.to_host(a) for a in (dout, x, weight, bias, initial_states, dfinal_states, seq)]
        dx, dw, db, dinit = causal_conv1d_backward_ref(*h[:4], activation, *h[4:])
    elif be == "cpu":
        from numba_kernels.cpu.causal_conv1d import conv_bwd_cpu

        dx = np.empty((B, D, L), dtype=cdt)
        dwb = np.empty((B, D, W + 1), dtype=cdt)
        dinit = np.empty((B, D, W - 1) if initial_states is not None else (0, 0, 0), dtype=cdt)
        conv_bwd_cpu(_host_compute(dout, cdt, 3), _host_compute(x, cdt, 3), _host_compute(weight, cdt, 2),
                     _host_compute(bias, cdt, 1), _host_compute(initial_states, cdt, 3),
                     _host_compute(dfinal_states, cdt, 3), _host_compute(seq, np.int32, 2), silu, dx, dwb, dinit)
        dwb = dwb.sum(axis=0)  # (D, W + 1): per-batch partials -> totals
        dw, db = dwb[:, :W], dwb[:, W]
    else:
        from numba_kernels.cuda.causal_conv1d import conv_bwd_cuda

        dx, dw, db, dinit = conv_bwd_cuda(dout, x, weight, bias, initial_states, dfinal_states, seq, silu, dt)
    dx = _cast_back(dx, dt, on_dev)
    dw = _cast_back(dw, dsp.array_dtype(weight), on_dev)
    db = None if bias is None else _cast_back(db, dsp.array_dtype(bias), on_dev)
    dinit = None if initial_states is None else _cast_back(dinit, dt, on_dev)
    return dx, dw, db, dinit
