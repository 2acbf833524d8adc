"""The Mamba-1 selective scan backward kernel (CUDA cores): shared-memory layout and the kernel factory
(host side: ``numba_kernels.cuda.selective_scan_backward``; wrapper: ``numba_kernels.selective_scan_backward``).

* Block = NC consecutive channels of one batch row (never crossing a group of B or of C, see
  ``channel_blocks``) x Q lanes per channel: lane (c, q) owns the states n = q * NQ + i (i < NQ = N / Q) of
  channel c, their state gradients and dA in registers.
* Time runs in chunks of K steps. Every chunk is first staged in shared memory by the whole block, coalesced
  along time: u, delta + bias, dt = softplus(...), dout, z, the gated dout, time-varying B / C ([t][n]), the
  seq_idx reset flags. Outputs (du, ddelta, dz) overwrite their inputs' slots and leave coalesced. A chunk's
  global loads go to registers (``fetch``) and then to shared memory (``put``); with ``PREFETCH`` (off: slower
  on the H200) the fetch of the next chunk is issued before this chunk's scan / walk.
* Recomputation: a forward pass over the chunks writes the state entering every chunk to a global scratch
  (B, L / K, N, Dm); the reverse pass takes the chunks from the end, recomputes the chunk's K + 1 states into
  shared memory (rows [j][i] of one word per thread plus a pad word: conflict-free for the walk and for the
  sums over channels) and walks them backwards.
* The walk carries only the recurrence dh = dA_t (dh + g_t C_t): no shuffles, no branches. Each lane writes
  its partial sums over its NQ states of du, ddelta and the pre-gate output y (for dz) to shared slots
  (PU / PD / PY, [step][thread]); after the walk, lane q of a channel sums the Q partials of steps q, q + Q, ...
  and does their epilogue (softplus' derivative, D, the z gate): independent steps, no per-step chain.
  Shared indices are unsigned (``W``): no negative-index wraparound code per access; a lane's B / C values of a
  step are NQ / 4 16-byte loads (``V4``: NQ a multiple of 4, float32 compute).
  Before (8.9 ms at bf16 B8 Dm1536 N16 L2048 on the H200, ~1% of copy bandwidth) the walk did the Q-lane
  shuffle sums and a lane-0 epilogue every step.
* Time-varying dC (sum over the block's channels of g_t h_t: channels past the block's own have g = 0, so the
  sums run over all NC, four interleaved partial sums) is one pass over the recomputed states before the walk;
  time-varying dB (sum of dh_t dt_t u_t) reuses the state slot of step t, free once step t is walked, and is
  summed after the walk: per (b, block) partials (B, nblk, N, L) that a second kernel adds over the blocks of
  each group in a fixed order. dA, dD, ddelta_bias and time-invariant dB / dC go to per-(b, d) partials summed
  over the batch the same way: deterministic, no atomics.
Whether B / C are time-varying and whether seq_idx is given are compile-time (VB, VC, SEQ); the other options
switch at run time.
"""
import functools

from numba import cuda, int32, uint64

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _scan_intrinsics as si
from numba_kernels.cuda._attn_common import jit_kernel
from numba_kernels.cuda._conv1d_kernels import ELEM, _converters
from numba_kernels.cuda._scan_fwd_kernel import channel_params
from numba_kernels.cuda._selective_scan_fwd import SOFTPLUS_THRESHOLD, _fast_fns, _sigmoid_fn

W = uint64  # shared-memory indices as unsigned: no negative-index wraparound code per access


@functools.lru_cache(maxsize=None)
def layout(N, K, NC, Q, VB, VC):
    """(offsets of the shared arrays in words of the compute type, total words): the recomputed states HS
    ((K + 1) N / Q rows of NC Q + 1 words: row (j, i), column thread), the per-channel rows U, X, DT, DO, Z, GG
    (NC rows of K + 1 words each), B / C ([t][n], K x N), the walk's per-lane partial sums PU / PD / PY (K rows of
    NC Q + 1 words: row step, column thread), per-channel bias and D (PRM), the reset flags RS (K int32, as one
    word each). The padding word of each row puts consecutive rows on consecutive banks; every array starts at a
    multiple of 4 words (16-byte loads of B / C)."""
    o = {}
    n = 0
    NCK = NC * (K + 1)
    NTP = NC * Q + 1
    for name, count in (("HS", (K + 1) * (N // Q) * NTP), ("U", NCK), ("X", NCK), ("DT", NCK), ("DO", NCK),
                        ("Z", NCK), ("GG", NCK), ("BS", K * N if VB else 0), ("CS", K * N if VC else 0),
                        ("PU", K * NTP), ("PD", K * NTP), ("PY", K * NTP), ("PRM", 2 * NC), ("RS", K)):
        n = -(-n // 4) * 4
        o[name] = n
        n += count
    return o, n


def smem_bytes(N, K, NC, Q, VB, VC, f64):
    return layout(N, K, NC, Q, VB, VC)[1] * (8 if f64 else 4)


@functools.lru_cache(maxsize=None)
def make_bwd_kernel(kind, N, K, NC, Q, VB, VC, SEQ, PF=True):
    cin, cout, ft = _converters(kind)
    exps, SCALE, softplus_f, _ = _fast_fns(kind == "f64")
    sigmoid_f = _sigmoid_fn(kind == "f64")
    ZERO, ONE = ft(0.0), ft(1.0)
    THR = ft(SOFTPLUS_THRESHOLD)
    NQ = N // Q
    NT = NC * Q
    o, _ = layout(N, K, NC, Q, VB, VC)
    HS, U, X, DT, DO, Z, GG, BS, CS, PU, PD, PY, PRM, RS = (
        o[k] for k in ("HS", "U", "X", "DT", "DO", "Z", "GG", "BS", "CS", "PU", "PD", "PY", "PRM", "RS"))
    NCK = NC * K
    NK = N * K
    KP = K + 1  # padded channel rows
    NTP = NT + 1  # padded state rows
    RSW = RS * (2 if kind == "f64" else 1)  # RS in int32 words
    NI1 = -(-NCK // NT)  # per thread: (channel, step) items, (state, step) items, steps of a chunk
    NI2 = -(-NK // NT)
    NI3 = -(-K // NT)
    ET = ELEM[kind]
    V4 = NQ % 4 == 0 and kind != "f64"  # a lane's B / C values of a step: NQ / 4 16-byte shared loads

    @cuda.jit(device=True, inline=True)
    def bc_row(sf, base, q, dst):
        """dst[i] = sf[base + q NQ + i] (i < NQ): a lane's B or C values of one step ([t][n] rows)."""
        if V4:
            for i4 in range(NQ // 4):
                dst[4 * i4], dst[4 * i4 + 1], dst[4 * i4 + 2], dst[4 * i4 + 3] = si.ld4(sf, W(base + q * NQ + 4 * i4))
        else:
            for i in range(NQ):
                dst[i] = sf[W(base + q * NQ + i)]

    @cuda.jit(device=True, inline=True)
    def qsum(v):  # sum over the Q lanes of a channel (consecutive lanes of one warp)
        m = 1
        while m < Q:
            v += intr.shfl_xor(v, m)
            m *= 2
        return v

    @cuda.jit(device=True, inline=True)
    def scan_chunk(sf, ri, h, a2, bl, bq, q, crow, tl, tid, keep):
        """Advance this lane's states h over the staged chunk's tl steps; ``keep``: store each step's states in
        HS row j + 1 (the recomputation) too."""
        for j in range(tl):
            if SEQ:
                if ri[W(RSW + j)] != 0:
                    for i in range(NQ):
                        h[i] = ZERO
            dt = sf[W(DT + crow + j)]
            dtu = dt * sf[W(U + crow + j)]
            if VB:
                bc_row(sf, BS + j * N, q, bq)
            for i in range(NQ):
                bn = bq[i] if VB else bl[i]
                h[i] = exps(dt * a2[i]) * h[i] + dtu * bn
                if keep:
                    sf[W(HS + ((j + 1) * NQ + i) * NTP + tid)] = h[i]

    @cuda.jit(device=True, inline=True)
    def chsum(sf, a, sa, b, sb):
        """sum over the NC channels c2 of sf[a + c2 sa] (* sf[b + c2 sb] when sb > 0) in a fixed order: four
        interleaved partial sums (independent chains), channels past the block's own carry zeros."""
        s0 = ZERO
        s1 = ZERO
        s2 = ZERO
        s3 = ZERO
        for m in range(NC // 4):
            c2 = 4 * m
            if sb > 0:
                s0 += sf[W(a + c2 * sa)] * sf[W(b + c2 * sb)]
                s1 += sf[W(a + (c2 + 1) * sa)] * sf[W(b + (c2 + 1) * sb)]
                s2 += sf[W(a + (c2 + 2) * sa)] * sf[W(b + (c2 + 2) * sb)]
                s3 += sf[W(a + (c2 + 3) * sa)] * sf[W(b + (c2 + 3) * sb)]
            else:
                s0 += sf[W(a + c2 * sa)]
                s1 += sf[W(a + (c2 + 1) * sa)]
                s2 += sf[W(a + (c2 + 2) * sa)]
                s3 += sf[W(a + (c2 + 3) * sa)]
        for c2 in range(NC - NC % 4, NC):
            if sb > 0:
                s0 += sf[W(a + c2 * sa)] * sf[W(b + c2 * sb)]
            else:
                s0 += sf[W(a + c2 * sa)]
        return (s0 + s1) + (s2 + s3)

    @cuda.jit(device=True, inline=True)
    def sum_slot(idx):
        """(state n, step j, HS offset of channel 0's value of step j + 1) summed by channel-sum thread idx:
        consecutive idx take consecutive HS rows of one lane group, so their loads hit distinct banks."""
        qq = idx // (NQ * K)
        rr = idx - qq * (NQ * K)
        j = rr // NQ
        return qq * NQ + rr - j * NQ, j, HS + (NQ + rr) * NTP + qq

    @cuda.jit(device=True, inline=True)
    def fetch(ru, rx, rg, rz, rb, rc, rq, rp, u, delta, dout, z, bvar, cvar, seq, full, b, d0, nch, gb, gc, t0,
              tl, tid, has_z):
        """This thread's global loads of chunk [t0, t0 + tl) into registers (raw elements, not used here: with
        PF they stay in flight during the previous chunk's work); ``full``: also dout, z, C."""
        for k in range(NI1):
            idx = tid + k * NT
            c = idx // K
            j = idx - c * K
            if (idx < NCK) & (j < tl):
                dd = W(d0 + min(c, nch - 1))
                t = W(t0 + j)
                ru[k] = u[b, dd, t]
                rx[k] = delta[b, dd, t]
                if full:
                    rg[k] = dout[b, dd, t]
                    if has_z:
                        rz[k] = z[b, dd, t]
        if VB or (VC and full):
            for k in range(NI2):
                idx = tid + k * NT
                n = idx // K
                j = idx - n * K
                if (idx < NK) & (j < tl):
                    if VB:
                        rb[k] = bvar[b, W(gb), W(n), W(t0 + j)]
                    if VC and full:
                        rc[k] = cvar[b, W(gc), W(n), W(t0 + j)]
        if SEQ:
            for k in range(NI3):
                j = tid + k * NT
                t = t0 + j
                if (j < K) & (j < tl) & (t > 0):
                    rq[k] = seq[b, W(t)]
                    rp[k] = seq[b, W(t - 1)]

    @cuda.jit(device=True, inline=True)
    def put(sf, ri, ru, rx, rg, rz, rb, rc, rq, rp, softplus, full, nch, t0, tl, tid, has_z):
        """The fetched chunk into shared memory (zeros past tl): u, dt = softplus(delta + bias), B, the reset
        flags; ``full``: also delta + bias, dout, z, the gated dout (zero past the block's channels), C."""
        for k in range(NI1):
            idx = tid + k * NT
            if idx < NCK:
                c = idx // K
                j = idx - c * K
                uv = ZERO
                x = ZERO
                dt = ZERO
                if j < tl:
                    uv = ft(cin(ru[k]))
                    x = ft(cin(rx[k])) + sf[W(PRM + c)]
                    dt = x
                    if softplus:
                        dt = softplus_f(x)
                r = c * KP + j
                sf[W(U + r)] = uv
                sf[W(DT + r)] = dt
                if full:
                    sf[W(X + r)] = x
                    g = ZERO
                    zv = ZERO
                    if j < tl:
                        if c < nch:  # zero past the block's channels: the channel sums run over all NC
                            g = ft(cin(rg[k]))
                        if has_z:
                            zv = ft(cin(rz[k]))
                    sf[W(DO + r)] = g
                    sf[W(Z + r)] = zv
                    if has_z:
                        g = g * zv * sigmoid_f(zv)
                    sf[W(GG + r)] = g
        if VB or (VC and full):
            for k in range(NI2):
                idx = tid + k * NT
                if idx < NK:
                    n = idx // K
                    j = idx - n * K
                    if VB:
                        sf[W(BS + j * N + n)] = ft(cin(rb[k])) if j < tl else ZERO
                    if VC and full:
                        sf[W(CS + j * N + n)] = ft(cin(rc[k])) if j < tl else ZERO
        if SEQ:
            for k in range(NI3):
                j = tid + k * NT
                if j < K:
                    rs = 0
                    if (j < tl) & (t0 + j > 0):
                        if rq[k] != rp[k]:
                            rs = 1
                    ri[W(RSW + j)] = rs

    def kernel(dout, u, delta, A, bvar, bconst, cvar, cconst, Dv, z, dbias, init, seq, dlast, softplus,
               blk_start, blk_len, ck, du, ddelta, dz, dA_p, dBc_p, dCc_p, dBv_p, dCv_p, dD_p, ddb_p, dinit):
        tid = cuda.threadIdx.x
        c = tid // Q
        q = tid - c * Q
        blk = cuda.blockIdx.x
        b = cuda.blockIdx.y
        Dm = u.shape[1]
        L = u.shape[2]
        d0 = blk_start[blk]
        nch = blk_len[blk]
        act = c < nch
        cr = min(c, nch - 1)
        d = d0 + cr
        sf = cuda.shared.array(0, ft)
        ri = cuda.shared.array(0, int32)  # the RS words (word size of ft: 4 bytes f32, 8 bytes f64)
        h = cuda.local.array(NQ, ft)
        dh = cuda.local.array(NQ, ft)
        av = cuda.local.array(NQ, ft)
        a2 = cuda.local.array(NQ, ft)
        dAa = cuda.local.array(NQ, ft)
        bl = cuda.local.array(NQ, ft)
        cl = cuda.local.array(NQ, ft)
        dBa = cuda.local.array(NQ, ft)
        dCa = cuda.local.array(NQ, ft)
        bq = cuda.local.array(NQ, ft)  # a step's B / C values of this lane's states
        cq = cuda.local.array(NQ, ft)
        hq = cuda.local.array(NQ, ft)  # the fetched chunk: the state entering it, raw u, delta, dout, z, B, C, seq
        ru = cuda.local.array(NI1, ET)
        rx = cuda.local.array(NI1, ET)
        rg = cuda.local.array(NI1, ET)
        rz = cuda.local.array(NI1, ET)
        rb = cuda.local.array(NI2, ET)
        rc = cuda.local.array(NI2, ET)
        rq = cuda.local.array(NI3, int32)
        rp = cuda.local.array(NI3, int32)
        bw = W(b)
        has_z = z.shape[0] > 0
        gb = 0
        if VB:
            gb = d0 // (Dm // bvar.shape[1])
        gc = 0
        if VC:
            gc = d0 // (Dm // cvar.shape[1])
        channel_params(sf, PRM, NC, NT, tid, d0, nch, dbias, Dv, ZERO)
        for i in range(NQ):
            n = q * NQ + i
            h[i] = init[b, d, n] if init.shape[0] > 0 else ZERO
            dh[i] = dlast[b, d, n] if dlast.shape[0] > 0 else ZERO
            av[i] = A[d, n]
            a2[i] = av[i] * SCALE  # exp(dt A) = exps(dt a2)
            dAa[i] = ZERO
            dBa[i] = ZERO
            dCa[i] = ZERO
            bl[i] = ZERO if VB else bconst[d, n]
            cl[i] = ZERO if VC else cconst[d, n]
        cuda.syncthreads()
        nc = (L + K - 1) // K
        crow = cr * KP
        # forward over the chunks: the state entering each one
        if PF:
            fetch(ru, rx, rg, rz, rb, rc, rq, rp, u, delta, dout, z, bvar, cvar, seq, False, bw, d0, nch, gb, gc, 0,
                  min(K, L), tid, has_z)
        for cc in range(nc):
            t0 = cc * K
            tl = min(K, L - t0)
            if not PF:
                fetch(ru, rx, rg, rz, rb, rc, rq, rp, u, delta, dout, z, bvar, cvar, seq, False, bw, d0, nch, gb, gc,
                      t0, tl, tid, has_z)
            put(sf, ri, ru, rx, rg, rz, rb, rc, rq, rp, softplus, False, nch, t0, tl, tid, has_z)
            cuda.syncthreads()
            if PF and cc + 1 < nc:  # the next chunk's loads, in flight during this one's scan
                fetch(ru, rx, rg, rz, rb, rc, rq, rp, u, delta, dout, z, bvar, cvar, seq, False, bw, d0, nch, gb, gc,
                      t0 + K, min(K, L - t0 - K), tid, has_z)
            if act:
                for i in range(NQ):
                    ck[bw, W(cc), W(q * NQ + i), W(d)] = h[i]
            scan_chunk(sf, ri, h, a2, bl, bq, q, crow, tl, tid, False)
            cuda.syncthreads()
        Dd = sf[PRM + NC + cr]
        sD = ZERO  # this lane's share (steps q, q + Q, ...) of the channel's dD and ddelta_bias
        sb = ZERO
        if PF:
            t0 = (nc - 1) * K
            for i in range(NQ):
                hq[i] = ck[bw, W(nc - 1), W(q * NQ + i), W(d)]
            fetch(ru, rx, rg, rz, rb, rc, rq, rp, u, delta, dout, z, bvar, cvar, seq, True, bw, d0, nch, gb, gc, t0,
                  L - t0, tid, has_z)
        for cb in range(nc):
            cc = nc - 1 - cb
            t0 = cc * K
            tl = min(K, L - t0)
            if not PF:
                for i in range(NQ):
                    hq[i] = ck[bw, W(cc), W(q * NQ + i), W(d)]
                fetch(ru, rx, rg, rz, rb, rc, rq, rp, u, delta, dout, z, bvar, cvar, seq, True, bw, d0, nch, gb, gc,
                      t0, tl, tid, has_z)
            put(sf, ri, ru, rx, rg, rz, rb, rc, rq, rp, softplus, True, nch, t0, tl, tid, has_z)
            for i in range(NQ):
                h[i] = hq[i]
                sf[W(HS + i * NTP + tid)] = h[i]
            cuda.syncthreads()
            if PF and cc > 0:  # the previous chunk's loads, in flight during this one's recomputation and walk
                for i in range(NQ):
                    hq[i] = ck[bw, W(cc - 1), W(q * NQ + i), W(d)]
                fetch(ru, rx, rg, rz, rb, rc, rq, rp, u, delta, dout, z, bvar, cvar, seq, True, bw, d0, nch, gb, gc,
                      t0 - K, K, tid, has_z)
            scan_chunk(sf, ri, h, a2, bl, bq, q, crow, tl, tid, True)  # recompute the chunk's states
            if VC:  # dC[t, n] = sum over the channels of g_t h_t[n]
                cuda.syncthreads()
                for idx in range(tid, NK, NT):  # consecutive threads: consecutive state rows (distinct banks)
                    n, j, hb = sum_slot(idx)
                    if j < tl:
                        dCv_p[b, blk, n, t0 + j] = chsum(sf, GG + j, KP, hb, Q)
                if VB:  # the walk writes dB's terms over the states read here (without VB it writes no HS)
                    cuda.syncthreads()
            # walk back: only the recurrence dh = dA_t (dh + g_t C_t) is sequential; the lane's partial sums of
            # du, ddelta and the pre-gate output go to shared slots (step j, thread), reduced after the walk
            for jj in range(tl):
                j = tl - 1 - jj
                dt = sf[W(DT + crow + j)]
                ut = sf[W(U + crow + j)]
                g = sf[W(GG + crow + j)]
                rs = False
                if SEQ:
                    rs = ri[W(RSW + j)] != 0
                dtu = dt * ut if act else ZERO  # (dB's channel sums take the lanes past the block's channels)
                hb = HS + j * NQ * NTP + tid  # HS row (j, 0): the states entering step j
                yp = ZERO
                dus = ZERO
                ddt = ZERO
                if VB:
                    bc_row(sf, BS + j * N, q, bq)
                if VC:
                    bc_row(sf, CS + j * N, q, cq)
                for i in range(NQ):
                    bn = bq[i] if VB else bl[i]
                    cn = cq[i] if VC else cl[i]
                    slot = hb + (NQ + i) * NTP  # row (j + 1, i): the state after step j
                    hn = sf[W(slot)]
                    hp = ZERO if rs else sf[W(hb + i * NTP)]
                    yp += cn * hn
                    dhn = dh[i] + g * cn
                    an = exps(dt * a2[i])
                    w = dhn * an * hp
                    if not VC:
                        dCa[i] += g * hn
                    vb = dhn * dtu
                    if VB:
                        sf[W(slot)] = vb  # step t's state is no longer needed: dB's term
                    else:
                        dBa[i] += vb
                    dus += dhn * bn
                    ddt += av[i] * w  # ddelta's B u term is u_t du's: added after the lane sums
                    dAa[i] += dt * w
                    dh[i] = ZERO if rs else an * dhn
                pj = j * NTP + tid
                sf[W(PU + pj)] = dus
                sf[W(PD + pj)] = ddt
                sf[W(PY + pj)] = yp
            if Q > 1:
                intr.syncwarp()  # a channel's Q lanes are consecutive lanes of one warp
            # epilogue of the chunk's steps, lane q of a channel taking steps q, q + Q, ...: independent steps
            for j in range(q if act else tl, tl, Q):  # (lanes past the block's channels share its last one's rows)
                r = crow + j
                pj = j * NTP + c * Q
                dus = ZERO
                ddt = ZERO
                yp = ZERO
                for q2 in range(Q):
                    dus += sf[W(PU + pj + q2)]
                    ddt += sf[W(PD + pj + q2)]
                    yp += sf[W(PY + pj + q2)]
                ut = sf[W(U + r)]
                g = sf[W(GG + r)]
                x = sf[W(X + r)]
                ddt += dus * ut
                if softplus and x <= THR:
                    ddt = ddt * sigmoid_f(x)
                sD += g * ut
                sb += ddt
                sf[W(U + r)] = dus * sf[W(DT + r)] + g * Dd
                sf[W(X + r)] = ddt
                if has_z:
                    zv = sf[W(Z + r)]
                    s = sigmoid_f(zv)
                    sf[W(Z + r)] = sf[W(DO + r)] * (yp + Dd * ut) * s * (ONE + zv * (ONE - s))
            cuda.syncthreads()
            if VB:  # dB[t, n] = sum over the channels of dh_t[n] dt_t u_t
                for idx in range(tid, NK, NT):
                    n, j, hb = sum_slot(idx)
                    if j < tl:
                        dBv_p[b, blk, n, t0 + j] = chsum(sf, hb, Q, 0, 0)
            for idx in range(tid, NCK, NT):
                c2 = idx // K
                j = idx - c2 * K
                if (c2 < nch) & (j < tl):
                    dd = d0 + c2
                    r = c2 * KP + j
                    du[b, dd, t0 + j] = cout(sf[W(U + r)])
                    ddelta[b, dd, t0 + j] = cout(sf[W(X + r)])
                    if has_z:
                        dz[b, dd, t0 + j] = cout(sf[W(Z + r)])
            cuda.syncthreads()
        sD = qsum(sD)
        sb = qsum(sb)
        if act:
            if q == 0:
                dD_p[b, d] = sD
                ddb_p[b, d] = sb
            for i in range(NQ):
                n = q * NQ + i
                dA_p[b, d, n] = dAa[i]
                if not VB:
                    dBc_p[b, d, n] = dBa[i]
                if not VC:
                    dCc_p[b, d, n] = dCa[i]
                if dinit.shape[0] > 0:
                    dinit[b, d, n] = dh[i]

    return jit_kernel(kernel)
