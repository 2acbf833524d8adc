"""Mamba-1 selective scan backward on the CPU, in vectorized passes.

Task (b, channel block) walks the channels of its block one by one, so the time-varying dB / dC of a block are
per-task partials (deterministic, no atomics). Inside a task everything runs on time-major buffers of shape
(N, time) (row stride padded off multiples of 4 KiB), so the elementwise work is a loop over time that LLVM
vectorizes with long trip counts, whatever N is:

* per task: the block's B and C rows transposed to (N, L) once (a time-invariant B / C is broadcast per
  channel); time-varying dB / dC accumulate in (N, L) buffers written back transposed at the end;
* per channel, row passes over L: dt = softplus(delta + bias) and its derivative, dt * u, the gated output
  gradient g = dout * silu(z)' and the dz factor (branch-free, polynomial exp2 for float32);
* the row is cut into segments of S steps; a forward walk stores the state entering each segment;
* segment by segment from the end: the decays exp(dt A) in one vectorized pass (zeroed at a seq_idx reset,
  which folds the reset into both scans), the states from the checkpoint, the state gradient
  G_t = a_{t+1} G_{t+1} + g_t C_t backwards (the two scans are the only sequential loops: N independent
  chains per step), then vectorized passes over time for dA, du, ddelta (sums over N), dB, dC and dz.
Segments other than the last have their decays and states computed twice (forward walk and reverse).
"""
import numpy as np
from numba import prange

from numba_kernels.cpu._math import LOG2E
from numba_kernels.cpu.selective_scan import (
    SOFTPLUS_THRESHOLD,
    exp_scaled,
    njit_np,
    njit_np_parallel,
    sigmoid_vec,
    softplus_vec,
)

njit = njit_np  # numpy's error model: no zero checks in divisions, so the softplus / sigmoid passes vectorize
njit_parallel = njit_np_parallel

#: row padding (elements) of the (N, time) buffers, so that rows do not alias in the L1 sets
PAD = 16


@njit()
def _states8(n0, t0, tl, dtu, BT, aa, hs):
    """hs[n, j + 1] = aa[n, j] hs[n, j] + dt u B[n] for the 8 states n0 .. n0 + 7: 8 chains in registers."""
    A0, A1, A2, A3, A4, A5, A6, A7 = aa[n0], aa[n0 + 1], aa[n0 + 2], aa[n0 + 3], aa[n0 + 4], aa[n0 + 5], \
        aa[n0 + 6], aa[n0 + 7]
    e = t0 + tl  # segment views, indexed from 0
    B0, B1, B2, B3, B4, B5, B6, B7 = BT[n0, t0:e], BT[n0 + 1, t0:e], BT[n0 + 2, t0:e], BT[n0 + 3, t0:e], \
        BT[n0 + 4, t0:e], BT[n0 + 5, t0:e], BT[n0 + 6, t0:e], BT[n0 + 7, t0:e]
    dtu_ = dtu[t0:e]
    H0, H1, H2, H3, H4, H5, H6, H7 = hs[n0], hs[n0 + 1], hs[n0 + 2], hs[n0 + 3], hs[n0 + 4], hs[n0 + 5], \
        hs[n0 + 6], hs[n0 + 7]
    h0, h1, h2, h3, h4, h5, h6, h7 = H0[0], H1[0], H2[0], H3[0], H4[0], H5[0], H6[0], H7[0]
    for j in range(tl):
        x = dtu_[j]
        h0 = A0[j] * h0 + x * B0[j]
        H0[j + 1] = h0
        h1 = A1[j] * h1 + x * B1[j]
        H1[j + 1] = h1
        h2 = A2[j] * h2 + x * B2[j]
        H2[j + 1] = h2
        h3 = A3[j] * h3 + x * B3[j]
        H3[j + 1] = h3
        h4 = A4[j] * h4 + x * B4[j]
        H4[j + 1] = h4
        h5 = A5[j] * h5 + x * B5[j]
        H5[j + 1] = h5
        h6 = A6[j] * h6 + x * B6[j]
        H6[j + 1] = h6
        h7 = A7[j] * h7 + x * B7[j]
        H7[j + 1] = h7


@njit()
def _grads8(n0, t0, tl, gg, CT, aa, GG, carry):
    """State gradients GG[n, j] = carry + g C[n], carry = aa[n, j] GG[n, j], backwards over the segment, for
    the 8 states n0 .. n0 + 7 (8 chains in registers, each one FMA deep a step: carry = a carry + a g C);
    carry (N,) in and out."""
    A0, A1, A2, A3, A4, A5, A6, A7 = aa[n0], aa[n0 + 1], aa[n0 + 2], aa[n0 + 3], aa[n0 + 4], aa[n0 + 5], \
        aa[n0 + 6], aa[n0 + 7]
    e = t0 + tl  # segment views, indexed from 0
    C0, C1, C2, C3, C4, C5, C6, C7 = CT[n0, t0:e], CT[n0 + 1, t0:e], CT[n0 + 2, t0:e], CT[n0 + 3, t0:e], \
        CT[n0 + 4, t0:e], CT[n0 + 5, t0:e], CT[n0 + 6, t0:e], CT[n0 + 7, t0:e]
    gg_ = gg[t0:e]
    G0, G1, G2, G3, G4, G5, G6, G7 = GG[n0], GG[n0 + 1], GG[n0 + 2], GG[n0 + 3], GG[n0 + 4], GG[n0 + 5], \
        GG[n0 + 6], GG[n0 + 7]
    c0, c1, c2, c3 = carry[n0], carry[n0 + 1], carry[n0 + 2], carry[n0 + 3]
    c4, c5, c6, c7 = carry[n0 + 4], carry[n0 + 5], carry[n0 + 6], carry[n0 + 7]
    for j in range(tl - 1, -1, -1):
        g = gg_[j]
        q = g * C0[j]
        G0[j] = c0 + q
        c0 = A0[j] * c0 + A0[j] * q
        q = g * C1[j]
        G1[j] = c1 + q
        c1 = A1[j] * c1 + A1[j] * q
        q = g * C2[j]
        G2[j] = c2 + q
        c2 = A2[j] * c2 + A2[j] * q
        q = g * C3[j]
        G3[j] = c3 + q
        c3 = A3[j] * c3 + A3[j] * q
        q = g * C4[j]
        G4[j] = c4 + q
        c4 = A4[j] * c4 + A4[j] * q
        q = g * C5[j]
        G5[j] = c5 + q
        c5 = A5[j] * c5 + A5[j] * q
        q = g * C6[j]
        G6[j] = c6 + q
        c6 = A6[j] * c6 + A6[j] * q
        q = g * C7[j]
        G7[j] = c7 + q
        c7 = A7[j] * c7 + A7[j] * q
    carry[n0], carry[n0 + 1], carry[n0 + 2], carry[n0 + 3] = c0, c1, c2, c3
    carry[n0 + 4], carry[n0 + 5], carry[n0 + 6], carry[n0 + 7] = c4, c5, c6, c7


@njit()
def _grads(t0, tl, gg, CT, aa, GG, carry):
    """:func:`_grads8` over all N states (blocks of 8, then one chain at a time)."""
    N = aa.shape[0]
    n8 = N - N % 8
    for n0 in range(0, n8, 8):
        _grads8(n0, t0, tl, gg, CT, aa, GG, carry)
    for n in range(n8, N):
        Ar, Cr, Gr = aa[n], CT[n], GG[n]
        c = carry[n]
        for j in range(tl - 1, -1, -1):
            q = gg[t0 + j] * Cr[t0 + j]
            Gr[j] = c + q
            c = Ar[j] * c + Ar[j] * q
        carry[n] = c


@njit()
def _fill(t0, tl, dts, dtu, A2, BT, seqr, aa, hs):
    """Decays aa[n, j] = exp(dt A[n]) (0 where seq_idx resets the state) and states hs[n, j + 1] of steps
    t0 .. t0 + tl - 1 from hs[:, 0] (the state entering t0)."""
    N = A2.shape[0]
    zero = np.zeros(1, aa.dtype)[0]
    dseg = dts[t0:t0 + tl]
    for n in range(N):  # vectorized over time
        a2 = A2[n]
        ar = aa[n]
        for j in range(tl):
            ar[j] = exp_scaled(dseg[j] * a2)
    if seqr.shape[0] > 0:
        for j in range(tl):
            t = t0 + j
            if t > 0 and seqr[t] != seqr[t - 1]:
                for n in range(N):
                    aa[n, j] = zero
    n8 = N - N % 8
    for n0 in range(0, n8, 8):
        _states8(n0, t0, tl, dtu, BT, aa, hs)
    for n in range(n8, N):
        Ar, Br, Hr = aa[n], BT[n], hs[n]
        h = Hr[0]
        for j in range(tl):
            h = Ar[j] * h + dtu[t0 + j] * Br[t0 + j]
            Hr[j + 1] = h


@njit()
def _row(dr, ur, gr, zr, Ad, BT, CT, var_b, var_c, seqr, h0, bias, Dd, softplus, S, dBT, dCT,
         dur, ddr, dzr, dAr, dBcr, dCcr, carry, ck, aa, hs, GG, dts, dtu, spg, gg, dzf, v1, v2, v3):
    """Backward of one row: writes dur / ddr / dzr (L,), dAr (N,) and, for time-invariant B / C, dBcr / dCcr
    (N,); adds into dBT / dCT ((N, L) time-varying). carry (N,) holds dlast on entry and the gradient of the
    state entering t = 0 on exit. Returns (dD, ddelta_bias) of the row."""
    L = ur.shape[0]
    N = Ad.shape[0]
    zero = np.zeros(1, ur.dtype)[0]
    one = np.ones(1, ur.dtype)[0]
    A2 = Ad * ur.dtype.type(LOG2E)
    if softplus:  # separate simple loops, so that each vectorizes
        for t in range(L):
            dts[t] = softplus_vec(dr[t] + bias)
        for t in range(L):
            x = dr[t] + bias
            s = sigmoid_vec(x)
            spg[t] = s if x <= SOFTPLUS_THRESHOLD else one
    else:
        for t in range(L):
            dts[t] = dr[t] + bias
        for t in range(L):
            spg[t] = one
    for t in range(L):
        dtu[t] = dts[t] * ur[t]
    if zr.shape[0] > 0:
        for t in range(L):
            zv = zr[t]
            s = sigmoid_vec(zv)
            gg[t] = gr[t] * zv * s
            dzf[t] = gr[t] * s * (one + zv * (one - s))
    else:
        for t in range(L):
            gg[t] = gr[t]
    nc = (L + S - 1) // S
    for n in range(N):
        hs[n, 0] = h0[n]
        dAr[n] = zero
        dBcr[n] = zero
        dCcr[n] = zero
    for c in range(nc - 1):  # checkpoints: the state entering every segment
        for n in range(N):
            ck[n, c] = hs[n, 0]
        _fill(c * S, S, dts, dtu, A2, BT, seqr, aa, hs)
        for n in range(N):
            hs[n, 0] = hs[n, S]
    sD = zero
    sbias = zero
    for c in range(nc - 1, -1, -1):
        t0 = c * S
        tl = min(S, L - t0)
        if c < nc - 1:
            for n in range(N):
                hs[n, 0] = ck[n, c]
        _fill(t0, tl, dts, dtu, A2, BT, seqr, aa, hs)
        _grads(t0, tl, gg, CT, aa, GG, carry)  # state gradient, backwards
        e = t0 + tl  # segment views, indexed from 0 (so LLVM sees unit-stride accesses)
        dts_, dtu_, gg_, u_, spg_ = dts[t0:e], dtu[t0:e], gg[t0:e], ur[t0:e], spg[t0:e]
        for j in range(tl):
            v1[j] = zero  # sum_n G B
            v2[j] = zero  # sum_n A G a h_prev
            v3[j] = Dd * u_[j]  # C . h + D u
        for n in range(N):  # vectorized over time from here on
            an = Ad[n]
            Gr, ar, hr, hn, Br, Cr = GG[n], aa[n], hs[n], hs[n, 1:], BT[n, t0:e], CT[n, t0:e]
            accA = zero
            for j in range(tl):
                w = Gr[j] * ar[j] * hr[j]
                v2[j] += an * w
                accA += dts_[j] * w
            dAr[n] += accA
            for j in range(tl):
                v1[j] += Gr[j] * Br[j]
            if zr.shape[0] > 0:
                for j in range(tl):
                    v3[j] += Cr[j] * hn[j]
            if var_b:
                dBr = dBT[n, t0:e]
                for j in range(tl):
                    dBr[j] += Gr[j] * dtu_[j]
            else:
                acc = zero
                for j in range(tl):
                    acc += Gr[j] * dtu_[j]
                dBcr[n] += acc
            if var_c:
                dCr = dCT[n, t0:e]
                for j in range(tl):
                    dCr[j] += gg_[j] * hn[j]
            else:
                acc = zero
                for j in range(tl):
                    acc += gg_[j] * hn[j]
                dCcr[n] += acc
        du_, dd_ = dur[t0:e], ddr[t0:e]
        for j in range(tl):
            g = gg_[j]
            du_[j] = dts_[j] * v1[j] + g * Dd
            ddt = (v2[j] + u_[j] * v1[j]) * spg_[j]
            dd_[j] = ddt
            sbias += ddt
            sD += g * u_[j]
        if zr.shape[0] > 0:
            dz_, dzf_ = dzr[t0:e], dzf[t0:e]
            for j in range(tl):
                dz_[j] = dzf_[j] * v3[j]
    return sD, sbias


@njit_parallel()
def scan_bwd_kernel(dout, u, delta, A, bvar, bconst, cvar, cconst, Dv, zz, dbias, init, seq, dlast, softplus,
                    blk_start, blk_len, S, du, ddelta, dz, dA, dBc, dCc, dBv, dCv, dD, ddb, dinit):
    """Arrays as in :func:`numba_kernels.cpu.selective_scan.scan_bwd_cpu`; S >= 1 is the segment length (the
    state is checkpointed every S steps; each segment's decays, states and state gradients sit in (N, S)
    buffers)."""
    Bt, Dm, L = u.shape
    N = A.shape[1]
    nblk = blk_start.shape[0]
    S = max(1, min(S, L))
    nc = (L + S - 1) // S
    dt_ = u.dtype
    var_b = bvar.shape[0] > 0
    var_c = cvar.shape[0] > 0
    Lp = L + PAD
    Sp = S + 1 + PAD
    for task in prange(Bt * nblk):
        b = task // nblk
        blk = task - b * nblk
        d0 = blk_start[blk]
        ck = np.empty((N, nc), dtype=dt_)
        aa = np.empty((N, Sp), dtype=dt_)
        hs = np.empty((N, Sp), dtype=dt_)
        GG = np.empty((N, Sp), dtype=dt_)
        BT = np.empty((N, Lp), dtype=dt_)
        CT = np.empty((N, Lp), dtype=dt_)
        dBT = np.zeros((N, Lp) if var_b else (0, 0), dtype=dt_)
        dCT = np.zeros((N, Lp) if var_c else (0, 0), dtype=dt_)
        dts = np.empty(L, dtype=dt_)
        dtu = np.empty(L, dtype=dt_)
        spg = np.empty(L, dtype=dt_)
        gg = np.empty(L, dtype=dt_)
        dzf = np.empty(L, dtype=dt_)
        v1 = np.empty(S, dtype=dt_)
        v2 = np.empty(S, dtype=dt_)
        v3 = np.empty(S, dtype=dt_)
        carry = np.empty(N, dtype=dt_)
        h0 = np.zeros(N, dtype=dt_)
        dBloc = np.empty(N, dtype=dt_)
        dCloc = np.empty(N, dtype=dt_)
        nodz = np.empty(0, dtype=dt_)
        noseq = np.empty(0, dtype=seq.dtype)
        if var_b:  # the block's B / C rows, transposed once per task
            Bsrc = bvar[b, d0 // (Dm // bvar.shape[1])]
            for t in range(L):
                for n in range(N):
                    BT[n, t] = Bsrc[t, n]
        if var_c:
            Csrc = cvar[b, d0 // (Dm // cvar.shape[1])]
            for t in range(L):
                for n in range(N):
                    CT[n, t] = Csrc[t, n]
        for d in range(d0, d0 + blk_len[blk]):
            if not var_b:
                for n in range(N):
                    bn = bconst[d, n]
                    for t in range(L):
                        BT[n, t] = bn
            if not var_c:
                for n in range(N):
                    cn = cconst[d, n]
                    for t in range(L):
                        CT[n, t] = cn
            bias = dbias[d] if dbias.shape[0] > 0 else dt_.type(0.0)
            Dd = Dv[d] if Dv.shape[0] > 0 else dt_.type(0.0)
            for n in range(N):
                carry[n] = dlast[b, d, n] if dlast.shape[0] > 0 else dt_.type(0.0)
                if init.shape[0] > 0:
                    h0[n] = init[b, d, n]
            dBr = dBloc if var_b else dBc[b, d]
            dCr = dCloc if var_c else dCc[b, d]
            zr = zz[b, d] if zz.shape[0] > 0 else nodz
            dzr = dz[b, d] if zz.shape[0] > 0 else nodz
            seqr = seq[b] if seq.shape[0] > 0 else noseq
            sD, sbias = _row(delta[b, d], u[b, d], dout[b, d], zr, A[d], BT, CT, var_b, var_c, seqr, h0, bias,
                             Dd, softplus, S, dBT, dCT, du[b, d], ddelta[b, d], dzr, dA[b, d], dBr, dCr, carry,
                             ck, aa, hs, GG, dts, dtu, spg, gg, dzf, v1, v2, v3)
            dD[b, d] = sD
            ddb[b, d] = sbias
            if dinit.shape[0] > 0:
                for n in range(N):
                    dinit[b, d, n] = carry[n]
        if var_b:  # the block's partials, back to (L, N)
            dBo = dBv[b, blk]
            for t in range(L):
                for n in range(N):
                    dBo[t, n] = dBT[n, t]
        if var_c:
            dCo = dCv[b, blk]
            for t in range(L):
                for n in range(N):
                    dCo[t, n] = dCT[n, t]
