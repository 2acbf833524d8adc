"""The Mamba-1 selective scan backward with threads along time (CUDA cores; host side:
``numba_kernels.cuda.selective_scan_backward``, wrapper: ``numba_kernels.selective_scan_backward``).

The recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t u_t B_t) and its adjoint are linear, so
both run as warp scans over time instead of a walk of one lane per channel:

* Block = Q warps = Q groups of NQ states (N = Q NQ) over one chunk of T = 32 NI time steps: lane l of warp q
  owns the NI consecutive steps l NI .. l NI + NI - 1 of the chunk and the states q NQ .. q NQ + NQ - 1.
  The block takes the channels of one channel block (at most CB consecutive channels inside one group of B and
  of C, ``channel_blocks``) one after the other for every chunk, so the per-(step, state) partial sums of
  time-varying dB / dC over the block's channels stay in the owning lane's registers (deterministic: a fixed
  order, no atomics) and leave once per chunk.
* Forward recurrence: each lane composes its NI steps into one affine map (A_l, B_l); a Kogge-Stone scan with
  ``shfl_up`` gives the map of the steps before the lane; applied to the state entering the chunk it gives the
  lane's first state. The state entering each chunk comes from a pre-pass of the same kernel (``PRE``: forward
  over the chunks, only the composition, writing the state entering every chunk to a global scratch); a one
  chunk sequence needs no pre-pass.
* Adjoint: with c_t = a_t dh_t, dh_t = g_t + c_{t+1} (g_t = dy_t C_t; c past the end = dlast_state), so c runs
  right to left through the maps (a_t, a_t g_t): the same composition scanned with ``shfl_down``; the chunks are
  taken from the last, each channel's c entering from the right kept in shared memory (c at t = 0 is
  dinitial_state). A seq_idx reset at step t sets a_t = 0 in both directions (and in the dA / ddelta terms).
* Per step and state the lane then walks its NI steps (dh backwards, h forwards, both in registers) and adds
  dh dt u (dB), dy h (dC), dh B (du), A dh a h_{t-1} (ddelta) and dt dh a h_{t-1} (dA). The per-step sums over
  the states (du, ddelta, the pre-gate output for dz) are summed over the Q warps through shared memory in a
  fixed order and finished (D, softplus' derivative, the z gate) by all threads, coalesced along time. dA, dD,
  ddelta_bias and time-invariant dB / dC are reduced over the lanes by xor shuffles into per-(channel, state)
  shared slots that one warp owns.
Whether B / C are time-varying, seq_idx and PRE are compile-time; the other options switch at run time.
"""
import functools

from numba import cuda, uint64

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._attn_common import jit_kernel
from numba_kernels.cuda._conv1d_kernels import ELEM, _converters
from numba_kernels.cuda._selective_scan_fwd import SOFTPLUS_THRESHOLD, _fast_fns, _sigmoid_fn

W = uint64  # shared / global indices as unsigned: no negative-index wraparound code per access


def groups(N):
    """(Q warps, NQ states per lane): the most warps that leave each lane at least 4 states (N = Q NQ, Q <= 8)."""
    for Q in (8, 4, 2):
        if N % Q == 0 and N // Q >= 4:
            return Q, N // Q
    return 1, N


@functools.lru_cache(maxsize=None)
def layout(N, NI, CB, VB, VC, PRE):
    """(offsets in words of the compute type, total words): staged B / C of a chunk ([n][t], N x T), the cross-warp
    sums WS (2 buffers x Q warps x 3 x T), the per-(channel, state) carries HC (h in the pre-pass, c otherwise),
    dA / time-invariant dB / dC slots (CB x N each), dD / ddelta_bias slots (CB x Q x 2)."""
    Q, _ = groups(N)
    T = 32 * NI
    o = {}
    n = 0
    for name, count in (("BS", N * T if VB else 0), ("CS", N * T if VC and not PRE else 0),
                        ("WS", 0 if PRE else 6 * Q * T), ("HC", CB * N), ("AS", 0 if PRE else CB * N),
                        ("BK", 0 if PRE or VB else CB * N), ("CK", 0 if PRE or VC else CB * N),
                        ("DS", 0 if PRE else 2 * CB * Q)):
        n = -(-n // 4) * 4
        o[name] = n
        n += count
    return o, max(n, 4)


def smem_bytes(N, NI, CB, VB, VC, PRE, f64):
    return layout(N, NI, CB, VB, VC, PRE)[1] * (8 if f64 else 4)


@functools.lru_cache(maxsize=None)
def make_time_kernel(kind, N, NI, CB, VB, VC, SEQ, PRE):
    cin, cout, ft = _converters(kind)
    exps, SCALE, softplus_f, _ = _fast_fns(kind == "f64")
    sigmoid_f = _sigmoid_fn(kind == "f64")
    ZERO, ONE = ft(0.0), ft(1.0)
    THR = ft(SOFTPLUS_THRESHOLD)
    Q, NQ = groups(N)
    T = 32 * NI
    NT = 32 * Q
    o, _ = layout(N, NI, CB, VB, VC, PRE)
    BS, CS, WS, HC, AS, BK, CK, DS = (o[k] for k in ("BS", "CS", "WS", "HC", "AS", "BK", "CK", "DS"))
    NQI = NQ * NI
    ET = ELEM[kind]

    @cuda.jit(device=True, inline=True)
    def wsum(v):  # sum over the 32 lanes (every lane gets it)
        m = 16
        while m > 0:
            v += intr.shfl_xor(v, m)
            m //= 2
        return v

    @cuda.jit(device=True, inline=True)
    def fetch(ru, rx, rg, rz, u, delta, dout, z, bw, dw, tb, L, has_z):
        """The raw elements of steps tb .. tb + NI - 1 (clamped to L - 1) of channel dw: unconditional loads."""
        for i in range(NI):
            tw = W(min(tb + i, L - 1))
            ru[i] = u[bw, dw, tw]
            rx[i] = delta[bw, dw, tw]
            if not PRE:
                rg[i] = dout[bw, dw, tw]
        if has_z and not PRE:
            for i in range(NI):
                rz[i] = z[bw, dw, W(min(tb + i, L - 1))]

    def kernel(dout, u, delta, A, bvar, bconst, cvar, cconst, Dv, z, dbias, init, seq, dlast, softplus,
               blk_start, blk_len, ck, du, ddelta, dz, dA_p, dBc_p, dCc_p, dBv_p, dCv_p, dD_p, ddb_p, dinit):
        tid = cuda.threadIdx.x
        q = tid // 32
        lane = tid - q * 32
        blk = cuda.blockIdx.x
        b = cuda.blockIdx.y
        bw = W(b)
        Dm = u.shape[1]
        L = u.shape[2]
        d0 = blk_start[blk]
        nch = blk_len[blk]
        sf = cuda.shared.array(0, ft)
        has_z = z.shape[0] > 0
        has_init = init.shape[0] > 0
        has_dlast = dlast.shape[0] > 0
        has_bias = dbias.shape[0] > 0
        has_D = Dv.shape[0] > 0
        gb = 0
        if VB:
            gb = d0 // (Dm // bvar.shape[1])
        gc = 0
        if VC:
            gc = d0 // (Dm // cvar.shape[1])
        # per lane: its NI steps (u, dt, the gated dout, the reset mask), its NQ states' data
        ru = cuda.local.array(NI, ET)  # raw elements of the next channel's steps
        rx = cuda.local.array(NI, ET)
        rg = cuda.local.array(NI, ET)
        rz = cuda.local.array(NI, ET)
        uu = cuda.local.array(NI, ft)
        dtv = cuda.local.array(NI, ft)
        gv = cuda.local.array(NI, ft)
        keep = cuda.local.array(NI, ft)
        av = cuda.local.array(NQI, ft)  # a_t per (state, step)
        pB = cuda.local.array(NQI, ft)  # time-varying dB / dC partial sums over the block's channels
        pC = cuda.local.array(NQI, ft)
        dus = cuda.local.array(NI, ft)  # per step: sum over the lane's states of dh B, A dh a h_{t-1}, C h
        dda = cuda.local.array(NI, ft)
        yp = cuda.local.array(NI, ft)
        dhv = cuda.local.array(NI, ft)
        cq = cuda.local.array(NI, ft)
        a2 = cuda.local.array(NQ, ft)
        Av = cuda.local.array(NQ, ft)
        bl = cuda.local.array(NQ, ft)
        cl = cuda.local.array(NQ, ft)
        hin = cuda.local.array(NQ, ft)
        cin_ = cuda.local.array(NQ, ft)
        dAk = cuda.local.array(NQ, ft)
        dBk = cuda.local.array(NQ, ft)
        dCk = cuda.local.array(NQ, ft)
        for idx in range(tid, CB * N, NT):
            r = idx // N
            n = idx - r * N
            if r < nch:
                d = d0 + r
                if PRE:
                    sf[W(HC + idx)] = init[b, d, n] if has_init else ZERO
                else:
                    sf[W(HC + idx)] = dlast[b, d, n] if has_dlast else ZERO
                    sf[W(AS + idx)] = ZERO
                    if not VB:
                        sf[W(BK + idx)] = ZERO
                    if not VC:
                        sf[W(CK + idx)] = ZERO
        if not PRE:
            for idx in range(tid, 2 * CB * Q, NT):
                sf[W(DS + idx)] = ZERO
        for k in range(NQI):
            pB[k] = ZERO
            pC[k] = ZERO
        nc = (L + T - 1) // T
        for kk in range(nc):
            kc = kk if PRE else nc - 1 - kk
            t0 = kc * T
            cuda.syncthreads()  # the previous chunk's B / C and carries are no longer read
            tb = t0 + lane * NI
            fetch(ru, rx, rg, rz, u, delta, dout, z, bw, W(d0), tb, L, has_z)  # the first channel's steps
            if VB or (VC and not PRE):
                for k in range(NQI):  # N T / NT elements per thread
                    idx = tid + k * NT
                    n = idx // T
                    j = idx - n * T
                    t = t0 + j
                    tw = W(min(t, L - 1))  # unconditional loads (issued back to back), zeros past L
                    if VB:
                        bvl = ft(cin(bvar[bw, W(gb), W(n), tw]))
                        sf[W(BS + idx)] = bvl if t < L else ZERO
                    if VC and not PRE:
                        cvl = ft(cin(cvar[bw, W(gc), W(n), tw]))
                        sf[W(CS + idx)] = cvl if t < L else ZERO
            if SEQ:  # a_t = 0 where seq_idx changes (the same steps for every channel)
                for i in range(NI):
                    t = tb + i
                    tc = min(t, L - 1)
                    s0 = seq[bw, W(tc)]
                    s1 = seq[bw, W(max(tc - 1, 0))]
                    keep[i] = ZERO if (t > 0) & (s0 != s1) else ONE
            cuda.syncthreads()
            for r in range(nch):
                d = d0 + r
                dw = W(d)
                bias = ft(dbias[d]) if has_bias else ZERO
                for i in range(NI):
                    ok = tb + i < L
                    uv = ft(cin(ru[i]))
                    x = ft(cin(rx[i])) + bias
                    dt = softplus_f(x) if softplus else x
                    g = ZERO
                    if not PRE:
                        g = ft(cin(rg[i]))
                        if has_z:
                            zv = ft(cin(rz[i]))
                            g = g * zv * sigmoid_f(zv)
                    uu[i] = uv if ok else ZERO
                    dtv[i] = dt if ok else ZERO
                    gv[i] = g if ok else ZERO
                    dus[i] = ZERO
                    dda[i] = ZERO
                    yp[i] = ZERO
                if r + 1 < nch:  # the next channel's steps, in flight during this one's scans
                    fetch(ru, rx, rg, rz, u, delta, dout, z, bw, W(d + 1), tb, L, has_z)
                for s in range(NQ):
                    nn = q * NQ + s
                    Av[s] = ft(A[dw, W(nn)])
                    a2[s] = Av[s] * SCALE
                    if not VB:
                        bl[s] = ft(bconst[dw, W(nn)])
                    if not VC:
                        cl[s] = ft(cconst[dw, W(nn)])
                    dAk[s] = ZERO
                    dBk[s] = ZERO
                    dCk[s] = ZERO
                hbase = HC + r * N + q * NQ
                for s in range(NQ):
                    nn = q * NQ + s
                    # the state entering the chunk and (adjoint) the c entering it from the right
                    if PRE or kc == 0:
                        hc = sf[W(hbase + s)] if PRE else (ft(init[bw, dw, W(nn)]) if has_init else ZERO)
                    else:
                        hc = ck[bw, W(kc), dw, W(nn)]
                    cc = ZERO if PRE else sf[W(hbase + s)]
                    brow = BS + nn * T + lane * NI
                    crow = CS + nn * T + lane * NI
                    Al = ONE
                    Bl = ZERO
                    for i in range(NI):
                        a = exps(dtv[i] * a2[s])
                        if SEQ:
                            a = a * keep[i]
                        av[s * NI + i] = a
                        bn = sf[W(brow + i)] if VB else bl[s]
                        Bl = a * Bl + dtv[i] * uu[i] * bn
                        Al = Al * a
                    Cr = ZERO
                    if not PRE:
                        for ii in range(NI):
                            i = NI - 1 - ii
                            cn = sf[W(crow + i)] if VC else cl[s]
                            Cr = av[s * NI + i] * (Cr + gv[i] * cn)
                    # forward: inclusive scan of the lanes' maps (earlier lanes applied first)
                    Af = Al
                    Bf = Bl
                    off = 1
                    while off < 32:
                        Ap = intr.shfl_up(Af, off)
                        Bp = intr.shfl_up(Bf, off)
                        if lane >= off:
                            Bf = Af * Bp + Bf
                            Af = Af * Ap
                        off *= 2
                    if PRE:
                        if lane == 31:  # the state leaving the chunk: entering the next one
                            he = Af * hc + Bf
                            sf[W(hbase + s)] = he
                            if kc + 1 < nc:
                                ck[bw, W(kc + 1), dw, W(nn)] = he
                    else:
                        Ae = intr.shfl_up(Af, 1)
                        Be = intr.shfl_up(Bf, 1)
                        if lane == 0:
                            Ae = ONE
                            Be = ZERO
                        hin[s] = Ae * hc + Be
                        # adjoint: inclusive scan from the right (later lanes applied first)
                        Ar = Al
                        Cv = Cr
                        off = 1
                        while off < 32:
                            An = intr.shfl_down(Ar, off)
                            Cn = intr.shfl_down(Cv, off)
                            if lane + off < 32:
                                Cv = Ar * Cn + Cv
                                Ar = Ar * An
                            off *= 2
                        Ae = intr.shfl_down(Ar, 1)
                        Ce = intr.shfl_down(Cv, 1)
                        if lane == 31:
                            Ae = ONE
                            Ce = ZERO
                        cin_[s] = Ae * cc + Ce
                        if lane == 0:  # c at the chunk's first step: entering the chunk before it from the right
                            sf[W(hbase + s)] = Ar * cc + Cv
                if not PRE:
                    for s in range(NQ):
                        nn = q * NQ + s
                        brow = BS + nn * T + lane * NI
                        crow = CS + nn * T + lane * NI
                        c = cin_[s]
                        for ii in range(NI):
                            i = NI - 1 - ii
                            cn = sf[W(crow + i)] if VC else cl[s]
                            cq[i] = cn
                            dh = gv[i] * cn + c
                            dhv[i] = dh
                            c = av[s * NI + i] * dh
                        hp = hin[s]
                        for i in range(NI):
                            a = av[s * NI + i]
                            bn = sf[W(brow + i)] if VB else bl[s]
                            dtu = dtv[i] * uu[i]
                            ah = a * hp
                            h = ah + dtu * bn
                            dh = dhv[i]
                            if VB:
                                pB[s * NI + i] += dh * dtu
                            else:
                                dBk[s] += dh * dtu
                            if VC:
                                pC[s * NI + i] += gv[i] * h
                            else:
                                dCk[s] += gv[i] * h
                            dus[i] += dh * bn
                            w = dh * ah
                            dda[i] += Av[s] * w
                            dAk[s] += dtv[i] * w
                            yp[i] += cq[i] * h
                            hp = h
                    for s in range(NQ):
                        nn = q * NQ + s
                        va = wsum(dAk[s])
                        vb = wsum(dBk[s]) if not VB else ZERO
                        vc = wsum(dCk[s]) if not VC else ZERO
                        if lane == 0:
                            slot = r * N + nn
                            sf[W(AS + slot)] += va
                            if not VB:
                                sf[W(BK + slot)] += vb
                            if not VC:
                                sf[W(CK + slot)] += vc
                    par = r & 1
                    wrow = WS + ((par * Q + q) * 3) * T + lane * NI
                    for i in range(NI):
                        sf[W(wrow + i)] = dus[i]
                        sf[W(wrow + T + i)] = dda[i]
                        sf[W(wrow + 2 * T + i)] = yp[i]
                    cuda.syncthreads()
                    # finish the chunk's steps of this channel, coalesced along time
                    Dd = ft(Dv[d]) if has_D else ZERO
                    sD = ZERO
                    sb = ZERO
                    for j in range(tid, T, NT):
                        t = t0 + j
                        tw = W(min(t, L - 1))
                        uv = ft(cin(u[bw, dw, tw]))  # unconditional loads first
                        x = ft(cin(delta[bw, dw, tw])) + bias
                        go = ft(cin(dout[bw, dw, tw]))
                        zv = ft(cin(z[bw, dw, tw])) if has_z else ZERO
                        if t < L:
                            su = ZERO
                            sd = ZERO
                            sy = ZERO
                            for q2 in range(Q):
                                row = WS + ((par * Q + q2) * 3) * T + j
                                su += sf[W(row)]
                                sd += sf[W(row + T)]
                                sy += sf[W(row + 2 * T)]
                            dt = softplus_f(x) if softplus else x
                            g = go
                            s_ = ZERO
                            if has_z:
                                s_ = sigmoid_f(zv)
                                g = go * zv * s_
                            ddt = sd + su * uv
                            if softplus and x <= THR:
                                ddt = ddt * sigmoid_f(x)
                            sD += g * uv
                            sb += ddt
                            du[bw, dw, tw] = cout(su * dt + g * Dd)
                            ddelta[bw, dw, tw] = cout(ddt)
                            if has_z:
                                dz[bw, dw, tw] = cout(go * (sy + Dd * uv) * s_ * (ONE + zv * (ONE - s_)))
                    sD = wsum(sD)
                    sb = wsum(sb)
                    if lane == 0:
                        sf[W(DS + (r * Q + q) * 2)] += sD
                        sf[W(DS + (r * Q + q) * 2 + 1)] += sb
            if not PRE:  # the chunk's time-varying dB / dC partials (sums over the block's channels)
                for s in range(NQ):
                    nn = q * NQ + s
                    for i in range(NI):
                        t = tb + i
                        if t < L:
                            if VB:
                                dBv_p[bw, W(blk), W(nn), W(t)] = pB[s * NI + i]
                            if VC:
                                dCv_p[bw, W(blk), W(nn), W(t)] = pC[s * NI + i]
                        pB[s * NI + i] = ZERO
                        pC[s * NI + i] = ZERO
        if not PRE:
            cuda.syncthreads()
            for idx in range(tid, CB * N, NT):
                r = idx // N
                n = idx - r * N
                if r < nch:
                    d = d0 + r
                    dA_p[b, d, n] = sf[W(AS + idx)]
                    if not VB:
                        dBc_p[b, d, n] = sf[W(BK + idx)]
                    if not VC:
                        dCc_p[b, d, n] = sf[W(CK + idx)]
                    if has_init:
                        dinit[b, d, n] = sf[W(HC + idx)]
            for r in range(tid, nch, NT):
                sD = ZERO
                sb = ZERO
                for q2 in range(Q):
                    sD += sf[W(DS + (r * Q + q2) * 2)]
                    sb += sf[W(DS + (r * Q + q2) * 2 + 1)]
                dD_p[b, d0 + r] = sD
                ddb_p[b, d0 + r] = sb

    return jit_kernel(kernel)
