"""Gradients of the Mamba-1 selective scan: ``selective_scan_backward`` (mamba's selective scan backward, plus
the gradients of an initial state and through the last state, and packed sequences via seq_idx).

Nothing is saved by the forward: the backward recomputes the states chunk by chunk (a forward pass keeps
only the state entering every chunk; each chunk is recomputed when the reverse scan reaches it).
Shared gradients (dA, time-invariant dB / dC, dD, ddelta_bias, grouped dB / dC) are reduced
deterministically: per-(batch, channel) or per-(batch, channel block) partials summed in a fixed order.
"""
import math

import numpy as np

from numba_kernels import _dispatch as dsp
from numba_kernels.causal_conv1d import _cast_back, _check_like, _host_compute
from numba_kernels.selective_scan import _check_vec, _validate

#: recomputation chunk (time steps) of the CPU backward
CPU_CHUNK = 64
#: channels per block of the CPU backward (a block lies within one group of B and of C)
CPU_BLOCK = 32


def channel_blocks(Dm, gb, gc, width):
    """Blocks of at most ``width`` consecutive channels, none crossing a group of B or of C.

    Returns (start, length, B group, C group) int32 arrays, one entry per block; groups are 0 for
    time-invariant or ungrouped B / C."""
    dgb = Dm // gb if gb else Dm
    dgc = Dm // gc if gc else Dm
    seg = math.gcd(dgb, dgc)
    starts = [s0 + off for s0 in range(0, Dm, seg) for off in range(0, seg, width)]
    lens = [min(width, seg - (s % seg)) for s in starts]
    st = np.array(starts, np.int32)
    return st, np.array(lens, np.int32), (st // dgb).astype(np.int32), (st // dgc).astype(np.int32)


def selective_scan_backward(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            initial_state=None, seq_idx=None, dlast_state=None, backend=None):
    """Gradients of :func:`selective_scan` (the same inputs, nothing saved from the forward).

    Parameters
    ----------
    dout : ndarray, shape (B, Dm, L)
        Upstream gradient of y; u's dtype.
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx
        As given to :func:`selective_scan`.
    dlast_state : ndarray, shape (B, Dm, N), optional
        Upstream gradient of the last state (any float dtype); mamba-ssm has no gradient through it.
    backend : {"auto", "cpu", "cuda", "reference"}, optional

    Returns
    -------
    du, ddelta : ndarray, shape (B, Dm, L)
        u's dtype.
    dA : ndarray, shape (Dm, N)
        A's dtype (summed over the batch).
    dB, dC : ndarray
        Shaped like B / C: (Dm, N) summed over batch and time, in their own dtype; (B, N, L) or (B, G, N, L)
        summed over the channels of the group, in u's dtype.
    dD, ddelta_bias : ndarray, shape (Dm,), or None
        None when the input was not given.
    dz : ndarray, shape (B, Dm, L), or None
    dinitial_state : ndarray, shape (B, Dm, N), or None
        initial_state's dtype.

    The state is float32 (float64 for float64 u) and every gradient is accumulated in float32 (float64).
    Inputs are never modified.
    """
    dt, (Bt, Dm, L, N), gb, gc, seq = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    _check_like("dout", dout, dt, (Bt, Dm, L))
    _check_vec("dlast_state", dlast_state, (Bt, Dm, N))
    arrays = (dout, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, dlast_state)
    be = dsp.resolve_backend(backend, *arrays)
    on_dev = dsp.any_on_device(*arrays)
    cdt = dsp.compute_dtype(dt)
    sp = bool(delta_softplus)
    if be == "reference":
        from numba_kernels.reference.selective_scan import selective_scan_backward_ref

        h = [dsp.to_host(a) for a in (dout, u, delta, A, B, C, D, z, delta_bias)]
        grads = selective_scan_backward_ref(*h, sp, dsp.to_host(initial_state), dsp.to_host(seq),
                                            dsp.to_host(dlast_state))
    elif be == "cpu":
        grads = _backward_cpu(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, seq, dlast_state, sp,
                              gb, gc, cdt)
    else:
        from numba_kernels.cuda.selective_scan_backward import scan_bwd_cuda

        grads = scan_bwd_cuda(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, seq, dlast_state, sp,
                              gb, gc, dt)
    du, ddelta, dA, dB, dC, dD, dz, ddb, dinit = grads
    like = (u, u, A, B, C, D, z, delta_bias, initial_state)
    return tuple(None if g is None or x is None else _cast_back(g, dsp.array_dtype(x), on_dev)
                 for g, x in zip((du, ddelta, dA, dB, dC, dD, dz, ddb, dinit), like))


def _backward_cpu(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, seq, dlast, sp, gb, gc, cdt):
    from numba_kernels.cpu.selective_scan import scan_bwd_cpu

    Bt, Dm, L = u.shape
    N = A.shape[1]
    st, ln, bgrp, cgrp = channel_blocks(Dm, gb, gc, CPU_BLOCK)
    nblk = len(st)

    def bc(M, G):  # (B, G, L, N) time-varying (contiguous over N), or (Dm, N)
        if G == 0:
            return np.zeros((0, 0, 0, 0), cdt), _host_compute(M, cdt, 2)
        M4 = dsp.to_host(M).reshape(Bt, G, N, L)  # (B, N, L) -> (B, 1, N, L)
        return np.ascontiguousarray(M4.transpose(0, 1, 3, 2), dtype=cdt), np.zeros((0, 0), cdt)

    bv, bcst = bc(B, gb)
    cv, ccst = bc(C, gc)
    du = np.empty((Bt, Dm, L), cdt)
    ddelta = np.empty((Bt, Dm, L), cdt)
    dz = np.empty((Bt, Dm, L) if z is not None else (0, 0, 0), cdt)
    dA = np.empty((Bt, Dm, N), cdt)
    dBc = np.empty((Bt, Dm, N) if not gb else (0, 0, 0), cdt)
    dCc = np.empty((Bt, Dm, N) if not gc else (0, 0, 0), cdt)
    dBv = np.zeros((Bt, nblk, L, N) if gb else (0, 0, 0, 0), cdt)
    dCv = np.zeros((Bt, nblk, L, N) if gc else (0, 0, 0, 0), cdt)
    dD = np.empty((Bt, Dm), cdt)
    ddb = np.empty((Bt, Dm), cdt)
    dinit = np.empty((Bt, Dm, N) if initial_state is not None else (0, 0, 0), cdt)
    scan_bwd_cpu(_host_compute(dout, cdt, 3), _host_compute(u, cdt, 3), _host_compute(delta, cdt, 3),
                 _host_compute(A, cdt, 2), bv, bcst, cv, ccst, _host_compute(D, cdt, 1), _host_compute(z, cdt, 3),
                 _host_compute(delta_bias, cdt, 1), _host_compute(initial_state, cdt, 3),
                 _host_compute(seq, np.int32, 2), _host_compute(dlast, cdt, 3), sp, st, ln, CPU_CHUNK,
                 du, ddelta, dz, dA, dBc, dCc, dBv, dCv, dD, ddb, dinit)

    def var_grad(part, G, grp, M):  # (B, nblk, L, N) block partials -> (B, G, N, L) -> M's shape
        out = np.stack([part[:, grp == g].sum(axis=1) for g in range(G)], axis=1)
        return np.ascontiguousarray(out.transpose(0, 1, 3, 2)).reshape(tuple(M.shape))

    dB = var_grad(dBv, gb, bgrp, B) if gb else dBc.sum(axis=0)
    dC = var_grad(dCv, gc, cgrp, C) if gc else dCc.sum(axis=0)
    return (du, ddelta, dA.sum(axis=0), dB, dC, dD.sum(axis=0) if D is not None else None,
            dz if z is not None else None, ddb.sum(axis=0) if delta_bias is not None else None,
            dinit if initial_state is not None else None)
