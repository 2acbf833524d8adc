"""Mamba-1 selective scan on the CPU: njit, parallel over the (batch, channel) rows.

Forward: each task owns one row (b, d) and walks L sequentially with the N-vector state in a local array:
``h = exp(dt * A[d]) * h + dt * B[:, t] * u``, ``y = C[:, t] . h + D * u``, times silu(z). The loops are
written so LLVM vectorizes them over N (float32 on AVX2 / AVX-512): dt = softplus(delta + bias) and the gate
in separate passes over the row (branch-free softplus / sigmoid), and the decays exp(dt A) of a time tile in
one elementwise pass through a polynomial exp2 (``cpu._math.exp2_fast``; float64 uses libm).
Backward (``scan_bwd_cpu``): vectorized passes over time-major buffers, in ``cpu/selective_scan_backward.py``.
Arrays arrive in the compute dtype (float32, or float64 for float64 inputs); the host wrapper widens
float16 / bfloat16 and narrows the results. Time-varying B / C arrive transposed to (B, G, L, N) so the
inner loop over the N states is contiguous. Absent optional inputs are passed as empty arrays.
"""
import functools

import numpy as np
from numba import prange, types
from numba.extending import overload

from numba_kernels._jit import njit, njit_parallel
from numba_kernels.cpu._math import LOG2E, exp2_fast

#: the project's njit flags plus numpy's error model: a float division then has no zero check (an early exit
#: that stops LLVM vectorizing the softplus / sigmoid passes, which divide by 2 + w and 1 + exp(-x) >= 1)
njit_np = functools.partial(njit, error_model="numpy")
njit_np_parallel = functools.partial(njit, parallel=True, error_model="numpy")

SOFTPLUS_THRESHOLD = 20.0
#: time tile of the CPU forward (decays computed a tile at a time)
TCPU = 32


@njit(inline="always")
def _softplus(x):
    """log(1 + exp(x)), stable: x itself above the threshold (mamba's rule)."""
    if x > SOFTPLUS_THRESHOLD:
        return x
    return np.log1p(np.exp(x))


def exp_scaled(x):  # pragma: no cover - replaced by the overload below inside njit code
    return np.exp2(x)


@overload(exp_scaled, inline="always", fastmath=True)
def _exp_scaled_ol(x):
    """2**x = exp(x / LOG2E) for an argument pre-scaled by LOG2E: float32 through the vectorizable polynomial
    (clamped at 2**128 = inf), float64 through libm."""
    if x == types.float32:
        return lambda x: exp2_fast(min(x, np.float32(128.0)))
    return lambda x: np.exp2(x)


def softplus_vec(x):  # pragma: no cover - replaced by the overload below inside njit code
    return x if x > SOFTPLUS_THRESHOLD else np.log1p(np.exp(x))


@overload(softplus_vec, inline="always", fastmath=True)
def _softplus_vec_ol(x):
    """softplus with mamba's threshold, branch-free so loops over it vectorize. float32:
    max(x, 0) + log1p(w), w = exp(-|x|) in (0, 1], log1p(w) = 2 atanh(s) = 2 (s + s^3/3 + ... + s^15/15) with
    s = w / (2 + w) <= 1/3 (relative error < 1e-7). float64: libm."""
    if x == types.float32:
        def impl(x):
            w = exp2_fast(-abs(x) * np.float32(LOG2E))
            s = w / (np.float32(2.0) + w)
            s2 = s * s
            p = np.float32(1.0 / 15.0)
            p = p * s2 + np.float32(1.0 / 13.0)
            p = p * s2 + np.float32(1.0 / 11.0)
            p = p * s2 + np.float32(1.0 / 9.0)
            p = p * s2 + np.float32(1.0 / 7.0)
            p = p * s2 + np.float32(1.0 / 5.0)
            p = p * s2 + np.float32(1.0 / 3.0)
            p = p * s2 + np.float32(1.0)
            sp = max(x, np.float32(0.0)) + np.float32(2.0) * s * p
            return x if x > np.float32(SOFTPLUS_THRESHOLD) else sp
        return impl
    return lambda x: x if x > SOFTPLUS_THRESHOLD else np.log1p(np.exp(x))


def sigmoid_vec(x):  # pragma: no cover - replaced by the overload below inside njit code
    return 1.0 / (1.0 + np.exp(-x))


@overload(sigmoid_vec, inline="always", fastmath=True)
def _sigmoid_vec_ol(x):
    """1 / (1 + exp(-x)), vectorizable for float32 (exp through the polynomial, 2**128 = inf gives 0)."""
    if x == types.float32:
        return lambda x: np.float32(1.0) / (np.float32(1.0) + exp2_fast(min(-x * np.float32(LOG2E),
                                                                           np.float32(128.0))))
    return lambda x: 1.0 / (1.0 + np.exp(-x))


@njit_np_parallel()
def scan_fwd_cpu(u, delta, A, bvar, bconst, cvar, cconst, Dv, zz, dbias, init, seq, softplus, y, last):
    """u / delta (B, Dm, L); A (Dm, N); bvar / cvar (B, G, L, N) | (0,0,0,0) and bconst / cconst (Dm, N) |
    (0,0): exactly one of each pair is non-empty; Dv / dbias (Dm,) | (0,); zz (B, Dm, L) | (0,0,0);
    init (B, Dm, N) | (0,0,0); seq (B, L) int32 | (0,0) -> y (B, Dm, L); last (B, Dm, N) | (0,0,0)."""
    Bt, Dm, L = u.shape
    N = A.shape[1]
    zero = np.zeros(1, u.dtype)[0]
    for r in prange(Bt * Dm):
        b = r // Dm
        d = r - b * Dm
        h = np.zeros(N, dtype=u.dtype)
        if init.shape[0] > 0:
            for n in range(N):
                h[n] = init[b, d, n]
        Ad = A[d] * A.dtype.type(LOG2E)  # exp(dt A) = 2**(dt A log2 e)
        gb = d // (Dm // bvar.shape[1]) if bvar.shape[0] > 0 else 0
        gc = d // (Dm // cvar.shape[1]) if cvar.shape[0] > 0 else 0
        bias = dbias[d] if dbias.shape[0] > 0 else zero
        Dd = Dv[d] if Dv.shape[0] > 0 else zero
        ur, dr, yr = u[b, d], delta[b, d], y[b, d]
        dts = np.empty(L, dtype=u.dtype)  # dt of the row, in one vectorizable pass
        dA = np.empty((TCPU, N), dtype=u.dtype)
        if softplus:
            for t in range(L):
                dts[t] = softplus_vec(dr[t] + bias)
        else:
            for t in range(L):
                dts[t] = dr[t] + bias
        # B / C rows of this channel: (L, N) time-varying or (1, N) time-invariant, stepped by bs / cs
        Brow = bvar[b, gb] if bvar.shape[0] > 0 else bconst[d:d + 1]
        Crow = cvar[b, gc] if cvar.shape[0] > 0 else cconst[d:d + 1]
        bs = 1 if bvar.shape[0] > 0 else 0
        cs = 1 if cvar.shape[0] > 0 else 0
        for t0 in range(0, L, TCPU):
            tl = min(TCPU, L - t0)
            for j in range(tl):  # decays of the tile: one elementwise (vectorized) pass
                dt = dts[t0 + j]
                for n in range(N):
                    dA[j, n] = exp_scaled(dt * Ad[n])
            for j in range(tl):
                t = t0 + j
                if seq.shape[0] > 0 and t > 0 and seq[b, t] != seq[b, t - 1]:
                    for n in range(N):
                        h[n] = zero
                ut = ur[t]
                du = dts[t] * ut
                Bt_ = Brow[t * bs]
                Ct_ = Crow[t * cs]
                aj = dA[j]
                acc = zero
                for n in range(N):
                    hn = aj[n] * h[n] + du * Bt_[n]
                    h[n] = hn
                    acc += Ct_[n] * hn
                yr[t] = acc + Dd * ut
        if zz.shape[0] > 0:  # the gate, in one vectorizable pass
            zr = zz[b, d]
            for t in range(L):
                yr[t] = yr[t] * zr[t] * sigmoid_vec(zr[t])
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


#: longest segment of the CPU backward: rows up to this length are done in one segment (decays and states
#: computed once); longer rows are checkpointed every BWD_SEG_MAX steps and recompute all but the last segment
BWD_SEG_MAX = 2048


def scan_bwd_cpu(dout, u, delta, A, bvar, bconst, cvar, cconst, Dv, zz, dbias, init, seq, dlast, softplus,
                 blk_start, blk_len, K, du, ddelta, dz, dA, dBc, dCc, dBv, dCv, dD, ddb, dinit):
    """The CPU backward (``cpu.selective_scan_backward.scan_bwd_kernel``): tasks over (batch, channel block), so
    the grouped dB / dC partials are per task (deterministic, no atomics).

    Inputs as in :func:`scan_fwd_cpu`, plus dout (B, Dm, L) and dlast (B, Dm, N) | (0,0,0); K is the smallest
    checkpoint interval the caller accepts (the segment is max(K, min(L, BWD_SEG_MAX)) steps). Outputs (compute
    dtype, written, not accumulated, except the zero-filled partials): du / ddelta (B, Dm, L); dz (B, Dm, L) |
    (0,0,0); per-(b, d) partials dA / dBc / dCc (B, Dm, N) (dBc / dCc (0,0,0) for time-varying B / C), dD / ddb
    (B, Dm); per-(b, block) partials dBv / dCv (B, nblk, L, N) | (0,0,0,0), zero-filled; dinit (B, Dm, N) |
    (0,0,0)."""
    from numba_kernels.cpu.selective_scan_backward import scan_bwd_kernel

    seg = max(int(K), min(u.shape[2], BWD_SEG_MAX))
    scan_bwd_kernel(dout, u, delta, A, bvar, bconst, cvar, cconst, Dv, zz, dbias, init, seq, dlast, softplus,
                    blk_start, blk_len, seg, du, ddelta, dz, dA, dBc, dCc, dBv, dCv, dD, ddb, dinit)
