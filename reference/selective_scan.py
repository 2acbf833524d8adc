"""Mamba-1 selective scan, ground truth: float64 NumPy loops, obviously correct.

Semantics (see numba_kernels.selective_scan for the full docs). Per (b, d, n), with
dt[b, d, t] = softplus?(delta[b, d, t] + delta_bias[d]):
  h[t] = exp(dt[t] * A[d, n]) * h[t - 1] + dt[t] * B[.., n, t] * u[b, d, t]
  y[b, d, t] = sum_n C[.., n, t] * h[t] + D[d] * u[b, d, t], times silu(z[b, d, t]) when z is given
h[-1] = initial_state[b, d, n] (or 0); with seq_idx, h[t - 1] is replaced by 0 wherever
seq_idx[b, t] != seq_idx[b, t - 1]. B and C are (Dm, N) time-invariant, (B, N, L), or grouped (B, G, N, L)
where channel d uses group d // (Dm // G).
"""
import numpy as np


def _softplus(x):
    return np.logaddexp(0.0, x)


def _bc_at(M, b, d, Dm):
    """The (N, L) or (N,) slice of B / C used by channel d of batch row b (float64)."""
    if M.ndim == 2:  # (Dm, N) time-invariant
        return M[d][:, None]
    if M.ndim == 3:  # (B, N, L)
        return M[b]
    G = M.shape[1]  # (B, G, N, L)
    return M[b, d // (Dm // G)]


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_last_state=False, seq_idx=None):
    """u, delta (B, Dm, L), A (Dm, N), B / C (Dm, N) | (B, N, L) | (B, G, N, L) -> y (B, Dm, L) float64
    [, last_state (B, Dm, N) float64]."""
    u = np.asarray(u, np.float64)
    delta = np.asarray(delta, np.float64)
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    C = np.asarray(C, np.float64)
    Bt, Dm, L = u.shape
    N = A.shape[1]
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias, np.float64)[None, :, None]
    if delta_softplus:
        delta = _softplus(delta)
    y = np.zeros((Bt, Dm, L))
    last = np.zeros((Bt, Dm, N))
    for b in range(Bt):
        for d in range(Dm):
            Bd, Cd = _bc_at(B, b, d, Dm), _bc_at(C, b, d, Dm)
            h = np.zeros(N) if initial_state is None else np.asarray(initial_state[b, d], np.float64).copy()
            for t in range(L):
                if seq_idx is not None and t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                    h = np.zeros(N)
                dt = delta[b, d, t]
                h = np.exp(dt * A[d]) * h + dt * Bd[:, min(t, Bd.shape[1] - 1)] * u[b, d, t]
                y[b, d, t] = np.dot(Cd[:, min(t, Cd.shape[1] - 1)], h)
            last[b, d] = h
    if D is not None:
        y = y + np.asarray(D, np.float64)[None, :, None] * u
    if z is not None:
        zz = np.asarray(z, np.float64)
        y = y * zz / (1.0 + np.exp(-zz))
    return (y, last) if return_last_state else y


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
    """One decode step (mamba's ``selective_state_update``). Multi-head: state (Bs, H, P, N), x / dt / z
    (B, H, P), A (H, P, N), B / C (B, G, N), D / dt_bias (H, P); single-head: state (Bs, Dm, N), x / dt / z
    (B, Dm), A (Dm, N), B / C (B, N), D / dt_bias (Dm,). ``state`` rows ``state_batch_indices[b]`` (else b)
    are updated in place (values cast to its dtype); returns y like x, float64."""
    single = np.ndim(state) == 3
    st = np.asarray(state)
    x = np.asarray(x, np.float64)
    dt = np.asarray(dt, np.float64)
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    C = np.asarray(C, np.float64)
    if single:  # one head of P = Dm channels
        st4 = st[:, None]
        x, dt, A, B, C = x[:, None], dt[:, None], A[None], B[:, None], C[:, None]
        D = None if D is None else np.asarray(D)[None]
        z = None if z is None else np.asarray(z)[:, None]
        dt_bias = None if dt_bias is None else np.asarray(dt_bias)[None]
    else:
        st4 = st
    Bt, H, P = x.shape
    G = B.shape[1]
    if dt_bias is not None:
        dt = dt + np.asarray(dt_bias, np.float64)[None]
    if dt_softplus:
        dt = _softplus(dt)
    y = np.zeros((Bt, H, P))
    for b in range(Bt):
        sb = b if state_batch_indices is None else int(state_batch_indices[b])
        for h in range(H):
            g = h // (H // G)
            for p in range(P):
                s = np.asarray(st4[sb, h, p], np.float64)
                s = np.exp(dt[b, h, p] * A[h, p]) * s + dt[b, h, p] * B[b, g] * x[b, h, p]
                st4[sb, h, p] = s.astype(st.dtype)
                y[b, h, p] = np.dot(C[b, g], s)
    if D is not None:
        y = y + np.asarray(D, np.float64)[None] * x
    if z is not None:
        zz = np.asarray(z, np.float64)
        y = y * zz / (1.0 + np.exp(-zz))
    return y[:, 0] if single else y


def _bc_grad_add(dM, M, b, d, Dm, contrib):
    """Add the (N, L) gradient ``contrib`` of channel d, batch b to dM (shaped like M)."""
    if M.ndim == 2:
        dM[d] += contrib.sum(axis=1)
    elif M.ndim == 3:
        dM[b] += contrib
    else:
        dM[b, d // (Dm // M.shape[1])] += contrib


def selective_scan_backward_ref(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                initial_state=None, seq_idx=None, dlast_state=None):
    """Gradients of :func:`selective_scan_ref` (float64, every state stored), written from the math.

    With x = delta + delta_bias, dt = softplus?(x), a[t] = exp(dt[t] A) and hp[t] the state entering step t
    (h[t - 1], the initial state at t = 0, zero after a seq_idx boundary)::

        h[t] = a[t] * hp[t] + dt[t] B[t] u[t];  ypre[t] = C[t] . h[t] + D u[t];  y = ypre * silu(z)
        g[t] = dout[t] * silu(z[t]);  dz[t] = dout[t] ypre[t] silu'(z[t])
        dh[t] = g[t] C[t] + (a[t + 1] dh[t + 1] unless t + 1 starts a segment; dlast_state at t = L - 1)
        dC[t] += g[t] h[t];  dB[t] += dh[t] dt[t] u[t];  du[t] = dh[t] . (dt[t] B[t]) + g[t] D;  dD += g[t] u[t]
        d dt[t] = dh[t] . (A a[t] hp[t] + B[t] u[t]);  dA += dh[t] dt[t] a[t] hp[t]
        ddelta[t] = d dt[t] * sigmoid(x[t]) (softplus) or d dt[t];  ddelta_bias = sum ddelta;  dinit = a[0] dh[0]

    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), float64, shaped like the inputs
    (None for the optional inputs not given)."""
    f = np.float64
    dout, u, delta = (np.asarray(x, f) for x in (dout, u, delta))
    A, B, C = (np.asarray(x, f) for x in (A, B, C))
    Bt, Dm, L = u.shape
    N = A.shape[1]
    x = delta + (0.0 if delta_bias is None else np.asarray(delta_bias, f)[None, :, None])
    dt = _softplus(x) if delta_softplus else x
    dtdx = 1.0 / (1.0 + np.exp(-x)) if delta_softplus else np.ones_like(x)
    Dv = np.zeros(Dm) if D is None else np.asarray(D, f)
    du, ddt = np.zeros((Bt, Dm, L)), np.zeros((Bt, Dm, L))
    dA, dB, dC = np.zeros((Dm, N)), np.zeros(B.shape), np.zeros(C.shape)
    dD = np.zeros(Dm)
    dinit = np.zeros((Bt, Dm, N))
    ypre = np.zeros((Bt, Dm, L))
    for b in range(Bt):
        for d in range(Dm):
            Bd = np.broadcast_to(_bc_at(B, b, d, Dm), (N, L))
            Cd = np.broadcast_to(_bc_at(C, b, d, Dm), (N, L))
            reset = np.zeros(L, bool)
            if seq_idx is not None:
                reset[1:] = np.asarray(seq_idx)[b, 1:] != np.asarray(seq_idx)[b, :-1]
            a = np.exp(dt[b, d][None, :] * A[d][:, None])  # (N, L)
            hp, h = np.zeros((N, L)), np.zeros((N, L))
            prev = np.zeros(N) if initial_state is None else np.asarray(initial_state[b, d], f)
            for t in range(L):
                hp[:, t] = 0.0 if reset[t] else prev
                h[:, t] = a[:, t] * hp[:, t] + dt[b, d, t] * Bd[:, t] * u[b, d, t]
                prev = h[:, t]
            ypre[b, d] = (Cd * h).sum(axis=0) + Dv[d] * u[b, d]
            g = dout[b, d] if z is None else dout[b, d] * _silu(np.asarray(z[b, d], f))
            dh = np.zeros((N, L))
            carry = np.zeros(N) if dlast_state is None else np.asarray(dlast_state[b, d], f).copy()
            for t in range(L - 1, -1, -1):
                dh[:, t] = g[t] * Cd[:, t] + carry
                carry = 0.0 * carry if reset[t] else a[:, t] * dh[:, t]
            dinit[b, d] = carry
            _bc_grad_add(dC, C, b, d, Dm, g[None, :] * h)
            _bc_grad_add(dB, B, b, d, Dm, dh * (dt[b, d] * u[b, d])[None, :])
            du[b, d] = (dh * Bd).sum(axis=0) * dt[b, d] + g * Dv[d]
            ddt[b, d] = (dh * (A[d][:, None] * a * hp + Bd * u[b, d][None, :])).sum(axis=0)
            dA[d] += (dh * dt[b, d][None, :] * a * hp).sum(axis=1)
            dD[d] += (g * u[b, d]).sum()
    ddelta = ddt * dtdx
    dz = None
    if z is not None:
        zz = np.asarray(z, f)
        s = 1.0 / (1.0 + np.exp(-zz))
        dz = dout * ypre * s * (1.0 + zz * (1.0 - s))
    return (du, ddelta, dA, dB, dC, None if D is None else dD, dz,
            None if delta_bias is None else ddelta.sum(axis=(0, 2)), None if initial_state is None else dinit)


def _silu(z):
    return z / (1.0 + np.exp(-z))
