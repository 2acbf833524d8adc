"""Mamba-1 selective scan on the CPU: njit, parallel over the (batch, channel) rows.

Each task owns one row (b, d) and walks L sequentially with the N-vector state in a local array:
``h = exp(dt * A[d]) * h + dt * B[:, t] * u``, ``y = C[:, t] . h + D * u``, times silu(z).
Arrays arrive in the compute dtype (float32, or float64 for float64 inputs); the host wrapper widens
float16 / bfloat16 and narrows the results. Time-varying B / C arrive transposed to (B, G, L, N) so the
inner loop over the N states is contiguous. Absent optional inputs are passed as empty arrays.
"""
import numpy as np
from numba import prange

from numba_kernels._jit import njit, njit_parallel

SOFTPLUS_THRESHOLD = 20.0


@njit(inline="always")
def _softplus(x):
    """log(1 + exp(x)), stable: x itself above the threshold (mamba's rule)."""
    if x > SOFTPLUS_THRESHOLD:
        return x
    return np.log1p(np.exp(x))


@njit_parallel
def scan_fwd_cpu(u, delta, A, bvar, bconst, cvar, cconst, Dv, zz, dbias, init, seq, softplus, y, last):
    """u / delta (B, Dm, L); A (Dm, N); bvar / cvar (B, G, L, N) | (0,0,0,0) and bconst / cconst (Dm, N) |
    (0,0): exactly one of each pair is non-empty; Dv / dbias (Dm,) | (0,); zz (B, Dm, L) | (0,0,0);
    init (B, Dm, N) | (0,0,0); seq (B, L) int32 | (0,0) -> y (B, Dm, L); last (B, Dm, N) | (0,0,0)."""
    Bt, Dm, L = u.shape
    N = A.shape[1]
    zero = np.zeros(1, u.dtype)[0]
    one = np.ones(1, u.dtype)[0]
    for r in prange(Bt * Dm):
        b = r // Dm
        d = r - b * Dm
        h = np.zeros(N, dtype=u.dtype)
        if init.shape[0] > 0:
            for n in range(N):
                h[n] = init[b, d, n]
        Ad = A[d]
        gb = d // (Dm // bvar.shape[1]) if bvar.shape[0] > 0 else 0
        gc = d // (Dm // cvar.shape[1]) if cvar.shape[0] > 0 else 0
        bias = dbias[d] if dbias.shape[0] > 0 else zero
        Dd = Dv[d] if Dv.shape[0] > 0 else zero
        ur, dr, yr = u[b, d], delta[b, d], y[b, d]
        for t in range(L):
            if seq.shape[0] > 0 and t > 0 and seq[b, t] != seq[b, t - 1]:
                for n in range(N):
                    h[n] = zero
            dt = dr[t] + bias
            if softplus:
                dt = _softplus(dt)
            ut = ur[t]
            Bt_ = bvar[b, gb, t] if bvar.shape[0] > 0 else bconst[d]
            Ct_ = cvar[b, gc, t] if cvar.shape[0] > 0 else cconst[d]
            du = dt * ut
            acc = zero
            for n in range(N):
                hn = np.exp(dt * Ad[n]) * h[n] + du * Bt_[n]
                h[n] = hn
                acc += Ct_[n] * hn
            out = acc + Dd * ut
            if zz.shape[0] > 0:
                zv = zz[b, d, t]
                out = out * zv / (one + np.exp(-zv))
            yr[t] = out
        if last.shape[0] > 0:
            for n in range(N):
                last[b, d, n] = h[n]


@njit_parallel
def state_update_cpu(state, x, dt, A, Bm, Cm, Dv, zz, dbias, sbi, softplus, y):
    """One decode step. state (Bs, H, P, N) updated in place; x / dt (B, H, P); A (H, P, N); Bm / Cm (B, G, N);
    Dv / dbias (H, P) | (0,0); zz (B, H, P) | (0,0,0); sbi (B,) int64 | (0,) -> y (B, H, P)."""
    Bt, H, P = x.shape
    N = A.shape[2]
    G = Bm.shape[1]
    zero = np.zeros(1, x.dtype)[0]
    one = np.ones(1, x.dtype)[0]
    for r in prange(Bt * H * P):
        b = r // (H * P)
        hp = r - b * (H * P)
        hh = hp // P
        p = hp - hh * P
        g = hh // (H // G)
        sb = sbi[b] if sbi.shape[0] > 0 else b
        d = dt[b, hh, p] + (dbias[hh, p] if dbias.shape[0] > 0 else zero)
        if softplus:
            d = _softplus(d)
        xv = x[b, hh, p]
        dx = d * xv
        s = state[sb, hh, p]
        Ar, Br, Cr = A[hh, p], Bm[b, g], Cm[b, g]
        acc = zero
        for n in range(N):
            hn = np.exp(d * Ar[n]) * s[n] + dx * Br[n]
            s[n] = hn
            acc += Cr[n] * hn
        out = acc + (Dv[hh, p] * xv if Dv.shape[0] > 0 else zero)
        if zz.shape[0] > 0:
            zv = zz[b, hh, p]
            out = out * zv / (one + np.exp(-zv))
        y[b, hh, p] = out
