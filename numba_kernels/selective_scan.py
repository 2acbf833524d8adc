"""Mamba-1 selective scan: ``selective_scan`` (mamba's ``selective_scan_fn`` forward, plus an initial state
and packed sequences via seq_idx) and the decode step ``selective_state_update``.

The backward pass is ``selective_scan_backward`` (numba_kernels.selective_scan_backward)."""
import numpy as np

from numba_kernels import _dispatch as dsp
from numba_kernels.causal_conv1d import _cast_back, _check_int, _host_compute


def _check_like(name, a, dt, shape, ref="x"):
    """Optional tensor with the dtype of ``ref`` (dtype ``dt``) and exactly this shape."""
    if a is None:
        return None
    if dsp.check_float(name, a, len(shape)) != dt:
        raise TypeError(f"{name} must have the same dtype as {ref} ({dt}), got {dsp.array_dtype(a)}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
    return a


def _check_vec(name, a, shape):
    """Optional float parameter (any float dtype) of exactly this shape."""
    if a is None:
        return None
    dsp.check_float(name, a, len(shape))
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
    return a


def _check_bc(name, M, dt, Bt, Dm, N, L):
    """B or C: (Dm, N) time-invariant (any float dtype), or (B, N, L) / (B, G, N, L) in u's dtype.
    Returns G (0 for time-invariant)."""
    mdt = dsp.check_float(name, M)
    shp = tuple(M.shape)
    if len(shp) == 2:
        if shp != (Dm, N):
            raise ValueError(f"{name} must have shape ({Dm}, {N}), ({Bt}, {N}, {L}) or ({Bt}, G, {N}, {L}), got {shp}")
        return 0
    if len(shp) not in (3, 4) or shp[0] != Bt or shp[-2:] != (N, L):
        raise ValueError(f"{name} must have shape ({Dm}, {N}), ({Bt}, {N}, {L}) or ({Bt}, G, {N}, {L}), got {shp}")
    G = 1 if len(shp) == 3 else shp[1]
    if G < 1 or Dm % G:
        raise ValueError(f"{name}: the number of groups G={G} must divide Dm={Dm}")
    if mdt != dt:
        raise TypeError(f"{name} (time-varying) must have the same dtype as u ({dt}), got {mdt}")
    return G


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx):
    """Check the scan inputs; return (u's dtype, (B, Dm, L, N), G of B, G of C (0: time-invariant), seq_idx)."""
    dt = dsp.check_float("u", u, 3)
    Bt, Dm, L = u.shape
    if L < 1:
        raise ValueError(f"u must have shape (B, Dm, L) with L >= 1, got {tuple(u.shape)}")
    _check_like("delta", delta, dt, (Bt, Dm, L), "u")
    dsp.check_float("A", A, 2)
    if A.shape[0] != Dm or A.shape[1] < 1:
        raise ValueError(f"A must have shape ({Dm}, N) with N >= 1, got {tuple(A.shape)}")
    N = A.shape[1]
    gb = _check_bc("B", B, dt, Bt, Dm, N, L)
    gc = _check_bc("C", C, dt, Bt, Dm, N, L)
    _check_vec("D", D, (Dm,))
    _check_like("z", z, dt, (Bt, Dm, L), "u")
    _check_vec("delta_bias", delta_bias, (Dm,))
    _check_vec("initial_state", initial_state, (Bt, Dm, N))
    seq = _check_int("seq_idx", seq_idx, (Bt, L))
    return dt, (Bt, Dm, L, N), gb, gc, seq


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   return_last_state=False, seq_idx=None, backend=None):
    """Mamba-1 selective scan forward; mamba's ``selective_scan_fn`` (real A) with an initial state and seq_idx.

    Per (b, d, n), with ``dt = softplus?(delta[b, d, t] + delta_bias[d])`` (float32 or better; softplus is
    ``log1p(exp(x))``, or x above 20)::

        h = exp(dt * A[d, n]) * h + dt * B[.., n, t] * u[b, d, t]
        y[b, d, t] = sum_n C[.., n, t] * h + D[d] * u[b, d, t]      (times silu(z[b, d, t]) when z is given)

    The state is float32 (float64 for float64 u) whatever the input dtype.

    Parameters
    ----------
    u : ndarray, shape (B, Dm, L)
        float16, bfloat16 (``ml_dtypes``), float32 or float64; L >= 1.
    delta : ndarray, shape (B, Dm, L)
        Same dtype as u.
    A : ndarray, shape (Dm, N)
        Real, any float dtype (converted to the compute dtype).
    B, C : ndarray, shape (Dm, N), (B, N, L) or (B, G, N, L)
        Time-invariant (any float dtype), or time-varying in u's dtype; grouped: G divides Dm and channel d
        uses group ``d // (Dm // G)``. B and C choose their forms independently.
    D : ndarray, shape (Dm,), optional
        Skip connection (any float dtype).
    z : ndarray, shape (B, Dm, L), optional
        Gate, same dtype as u: y is multiplied by ``silu(z)``.
    delta_bias : ndarray, shape (Dm,), optional
    delta_softplus : bool
    initial_state : ndarray, shape (B, Dm, N), optional
        The state before t = 0 (any float dtype); with seq_idx it only applies to the first segment.
    return_last_state : bool
        Also return the state after the last step.
    seq_idx : ndarray, shape (B, L), int32, optional
        Packed sequences: the state restarts from zero (not from initial_state) at every t > 0 with
        ``seq_idx[b, t] != seq_idx[b, t - 1]``.
    backend : {"auto", "cpu", "cuda", "reference"}, optional
        Default: ``NUMBA_KERNELS_BACKEND``, else "auto" (cuda when an input is a device array).

    Returns
    -------
    y : ndarray, shape (B, Dm, L)
        u's dtype; numba device array when inputs were device arrays.
    last_state : ndarray, shape (B, Dm, N)
        Only with ``return_last_state=True``; float32 (float64 for float64 u).

    Inputs are never modified.
    """
    dt, (Bt, Dm, L, N), gb, gc, seq = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    arrays = (u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    be = dsp.resolve_backend(backend, *arrays)
    on_dev = dsp.any_on_device(*arrays)
    cdt = dsp.compute_dtype(dt)
    sp = bool(delta_softplus)
    if be == "reference":
        from numba_kernels.reference.selective_scan import selective_scan_ref

        h = [dsp.to_host(a) for a in (u, delta, A, B, C, D, z, delta_bias)]
        y, last = selective_scan_ref(*h, sp, dsp.to_host(initial_state), True, dsp.to_host(seq))
    elif be == "cpu":
        from numba_kernels.cpu.selective_scan import scan_fwd_cpu

        def bc(M, G):  # (B, G, L, N) time-varying (contiguous over N), or (Dm, N)
            if G == 0:
                return np.zeros((0, 0, 0, 0), cdt), _host_compute(M, cdt, 2)
            M4 = dsp.to_host(M).reshape(Bt, G, N, L)  # (B, N, L) -> (B, 1, N, L)
            return np.ascontiguousarray(M4.transpose(0, 1, 3, 2), dtype=cdt), np.zeros((0, 0), cdt)

        bv, bcst = bc(B, gb)
        cv, ccst = bc(C, gc)
        y = np.empty((Bt, Dm, L), dtype=cdt)
        last = np.empty((Bt, Dm, N) if return_last_state else (0, 0, 0), dtype=cdt)
        scan_fwd_cpu(_host_compute(u, cdt, 3), _host_compute(delta, cdt, 3), _host_compute(A, cdt, 2), bv, bcst,
                     cv, ccst, _host_compute(D, cdt, 1), _host_compute(z, cdt, 3), _host_compute(delta_bias, cdt, 1),
                     _host_compute(initial_state, cdt, 3), _host_compute(seq, np.int32, 2), sp, y, last)
    else:
        from numba_kernels.cuda.selective_scan import scan_fwd_cuda

        y, last = scan_fwd_cuda(u, delta, A, B, C, D, z, delta_bias, initial_state, seq, sp, return_last_state, dt)
    y = _cast_back(y, dt, on_dev)
    if not return_last_state:
        return y
    return y, _cast_back(last, cdt, on_dev)


def _update_shapes(state, x):
    """(single_head, Bs, H, P, N) from state (Bs, Dm, N) | (Bs, H, P, N) and x (B, Dm) | (B, H, P)."""
    dsp.check_float("state", state)
    if len(state.shape) not in (3, 4):
        raise ValueError(f"state must have shape (B, Dm, N) or (B, H, P, N), got {tuple(state.shape)}")
    single = len(state.shape) == 3
    want = (x.shape[0],) + tuple(state.shape[1:-1])
    if len(x.shape) != len(state.shape) - 1 or tuple(x.shape) != want:
        raise ValueError(f"x must have shape {want} (state {tuple(state.shape)}), got {tuple(x.shape)}")
    if single:
        return True, state.shape[0], 1, state.shape[1], state.shape[2]
    return False, state.shape[0], state.shape[1], state.shape[2], state.shape[3]


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None, backend=None):
    """One decode step of :func:`selective_scan`; mamba's ``selective_state_update``.

    **Modifies ``state`` in place** (rows ``state_batch_indices[b]``, else b); no other input is written.
    Running :func:`selective_scan` over L tokens equals L calls of this op.

    Parameters
    ----------
    state : ndarray, shape (Bs, H, P, N) or (Bs, Dm, N)
        Any float dtype (float32 recommended); updated in place (a host array even when the kernel runs on
        the GPU). Computation in float32 (float64 when state or x is float64).
    x : ndarray, shape (B, H, P) or (B, Dm)
        float16, bfloat16, float32 or float64.
    dt : ndarray, shape like x
        Same dtype as x.
    A : ndarray, shape (H, P, N) or (Dm, N)
        Any float dtype.
    B, C : ndarray, shape (B, G, N) or (B, N)
        Same dtype as x; G divides H and head h uses group ``h // (H // G)``.
    D, dt_bias : ndarray, shape (H, P) or (Dm,), optional
    z : ndarray, shape like x, optional
        Gate (same dtype as x): y is multiplied by ``silu(z)``.
    dt_softplus : bool
    state_batch_indices : ndarray, shape (B,), int32, optional
        Row of ``state`` used by batch row b (values in [0, Bs)); without it Bs must equal B.
    backend : {"auto", "cpu", "cuda", "reference"}, optional

    Returns
    -------
    y : ndarray, shape like x
        x's dtype.
    """
    xdt = dsp.check_float("x", x)
    single, Bs, H, P, N = _update_shapes(state, x)
    Bt = x.shape[0]
    xs = tuple(x.shape)
    _check_like("dt", dt, xdt, xs)
    _check_vec("A", A, xs[1:] + (N,))
    if single:
        _check_like("B", B, xdt, (Bt, N))
        G = 1
    else:
        dsp.check_float("B", B, 3)
        G = B.shape[1]
        _check_like("B", B, xdt, (Bt, G, N))
    if G < 1 or H % G:
        raise ValueError(f"B: the number of groups G={G} must divide H={H}")
    _check_like("C", C, xdt, tuple(B.shape))
    _check_vec("D", D, xs[1:])
    _check_like("z", z, xdt, xs)
    _check_vec("dt_bias", dt_bias, xs[1:])
    sbi = _check_int("state_batch_indices", state_batch_indices, (Bt,))
    if sbi is None and Bs != Bt:
        raise ValueError(f"state must have {Bt} rows (x's batch) without state_batch_indices, got {Bs}")
    if isinstance(sbi, np.ndarray) and (np.any(sbi < 0) or np.any(sbi >= Bs)):
        raise ValueError(f"state_batch_indices must be in [0, {Bs}), got {sbi.tolist()}")
    arrays = (state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    be = dsp.resolve_backend(backend, *arrays)
    on_dev = dsp.any_on_device(*arrays)
    sdt = dsp.array_dtype(state)
    cdt = np.dtype(np.float64) if np.float64 in (xdt, sdt) else np.dtype(np.float32)
    # one multi-head form: single head = H 1, P Dm
    x3 = x.reshape((Bt, H, P))
    st4 = state.reshape((Bs, H, P, N))
    mh = [None if a is None else a.reshape(s) for a, s in
          ((dt, (Bt, H, P)), (A, (H, P, N)), (B, (Bt, G, N)), (C, (Bt, G, N)), (D, (H, P)), (z, (Bt, H, P)),
           (dt_bias, (H, P)))]
    sp = bool(dt_softplus)
    if be == "cuda":
        from numba_kernels.cuda.selective_scan import state_update_cuda

        y = state_update_cuda(st4, state, x3, *mh, sbi, sp, xdt, cdt)
    elif dsp.is_device_array(state):
        raise ValueError(f"backend={be!r} cannot update a device state in place; use backend='cuda'")
    elif be == "reference":
        from numba_kernels.reference.selective_scan import selective_state_update_ref

        h = [dsp.to_host(a) for a in (x3, *mh)]
        work = np.asarray(st4)
        y = selective_state_update_ref(work, *h, sp, dsp.to_host(sbi))
        if not np.shares_memory(work, state):
            state[...] = work.reshape(state.shape)
    else:
        from numba_kernels.cpu.selective_scan import state_update_cpu

        s4 = np.asarray(st4)
        work = s4 if (s4.dtype == cdt and s4.flags.c_contiguous and np.shares_memory(s4, state)) else s4.astype(cdt)
        y = np.empty((Bt, H, P), dtype=cdt)
        state_update_cpu(work, _host_compute(x3, cdt, 3), *[_host_compute(a, cdt, n) for a, n in
                                                              zip(mh, (3, 3, 3, 3, 2, 3, 2))],
                         np.zeros(0, np.int64) if sbi is None else dsp.to_host(sbi).astype(np.int64), sp, y)
        if work is not s4:
            state[...] = work.reshape(state.shape).astype(sdt)
    y = _cast_back(y, xdt, on_dev)
    return y.reshape(xs)
