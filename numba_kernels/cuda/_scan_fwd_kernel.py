"""The selective-scan forward kernel (host side: ``numba_kernels.cuda.selective_scan``).

Block = NC channels of one batch row (within one group of B and of C) x Q lanes per channel; lane (c, q) owns
the states n = q * NQ + i (i < NQ = N / Q) of channel c in registers. Global rows are padded by the host to a
multiple of 16 bytes (``Lp``), so every global access is a 16-byte chunk. Per time tile of TL steps, with two
raw (element-typed) shared buffers and one converted (float) set:
  * issue: cp.async of the next-but-one tile's u, delta, z and time-varying B / C chunks into a raw buffer
    (global -> shared, no registers; in flight during a whole scan);
  * scan (tile it): each lane reads dt, u (16-byte loads, 4 steps) and its NQ values of B / C at step t
    (16-byte loads, B / C stored [t][n]) and updates h = exp(dt A) h + dt B u; its partial C.h of 4 steps goes
    to shared memory in one 16-byte store (no shuffles: the Q partials are added in the epilogue);
  * epilogue (tile it) + conversion (tile it + 1), one phase: y = sum of the Q partials + D u, times silu(z),
    packed and stored 16 bytes per thread; dt = softplus(delta + bias) once per element (0 past L, with
    u = 0, so a step past L leaves the state alone), u, and B / C transposed to [t][n].
Two barriers per tile. exp / softplus / silu: ex2 / lg2 / rcp on the SFU in float32 (``PM``: one exp in PM as a
degree-5 polynomial on the FMA pipe instead; ``FG``: silu through tanh.approx, 16-bit outputs only), libm in
float64. All of the kernel's shared memory is one dynamic allocation (``layout``).
"""
import functools
import math

from numba import cuda, float32, float64, int32, uint32

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _scan_intrinsics as si
from numba_kernels.cuda._attn_common import dev, jit_kernel

ISZ = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8}
#: channels per block NC, preferred lanes per channel Q, time tile TL (GPU, simulator)
DEFAULTS = {"gpu": (32, 4, 32), "sim": (2, 2, 8)}
SOFTPLUS_THRESHOLD = 20.0
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: 2**f on [-0.5, 0.5], degree 5, constant term exactly 1 (fitted here; max relative error 2.4e-7 in float32)
EXP2_POLY = (1.0, 0.6931471, 0.24022165, 0.05550582, 0.009676031, 0.0013276337)


def config(N, kind, q=None, tl=None, nc=None):
    """(NC, Q, TL): Q the largest power of two <= the preferred Q dividing N; TL a power of two >= 8."""
    NC, Qp, TL = DEFAULTS["sim" if intr.SIM else "gpu"]
    Qp, TL, NC = q or Qp, tl or TL, nc or NC
    Q = 1
    while Q * 2 <= Qp and N % (Q * 2) == 0:
        Q *= 2
    T = 8
    while T * 2 <= TL:
        T *= 2
    return NC, Q, T


@functools.lru_cache(maxsize=None)
def layout(kind, N, NC, Q, TL, VB, VC, SEQ):
    """Offsets of the shared arrays (floats / int32 / uint32 words, one dynamic allocation) and its bytes."""
    fw = 8 if kind == "f64" else 4
    TLP = TL + 16 // fw  # padded float rows: 16-byte loads of 8 channels hit distinct bank groups
    o = {"TLP": TLP}
    n = 0
    for name, count in (("US", NC * TLP), ("DS", NC * TLP), ("BS", TL * N if VB else 0),
                        ("CS", TL * N if VC else 0), ("PS", NC * Q * TLP), ("PRM", 2 * NC)):
        o[name] = n
        n += -(-count * fw // 16) * 16 // fw  # each array 16-byte aligned
    nbytes = n * fw
    o["RST"] = nbytes // 4
    nbytes += -(-4 * TL // 16) * 16 if SEQ else 0
    rwr = TL * ISZ[kind] // 4  # words of a raw row
    o["RWR"] = rwr
    o["RAW"] = nbytes // 4
    o["BUF"] = (3 * NC + (N if VB else 0) + (N if VC else 0)) * rwr  # words of one raw buffer
    o["ROB"] = 3 * NC * rwr  # B / C raw rows within a buffer
    o["ROC"] = o["ROB"] + (N * rwr if VB else 0)
    return o, nbytes + 2 * o["BUF"] * 4


def _codecs(kind):
    """(decode 4 words -> the VE values of a 16-byte chunk into a local array, encode a local array -> 4 words)."""
    if kind in ("bf16", "f16"):
        unpack = intr.unpack_bf16x2 if kind == "bf16" else intr.unpack_f16x2
        pack = intr.pack_bf16x2 if kind == "bf16" else intr.pack_f16x2

        @dev
        def dec(w0, w1, w2, w3, v):
            v[0], v[1] = unpack(w0)
            v[2], v[3] = unpack(w1)
            v[4], v[5] = unpack(w2)
            v[6], v[7] = unpack(w3)

        @dev
        def enc(v):
            return pack(v[0], v[1]), pack(v[2], v[3]), pack(v[4], v[5]), pack(v[6], v[7])
    elif kind == "f32":
        @dev
        def dec(w0, w1, w2, w3, v):
            v[0], v[1], v[2], v[3] = si.f32_of(w0), si.f32_of(w1), si.f32_of(w2), si.f32_of(w3)

        @dev
        def enc(v):
            return si.bits_f32(v[0]), si.bits_f32(v[1]), si.bits_f32(v[2]), si.bits_f32(v[3])
    else:
        @dev
        def dec(w0, w1, w2, w3, v):
            v[0] = si.f64_of(w0, w1)
            v[1] = si.f64_of(w2, w3)

        @dev
        def enc(v):
            a, b = si.bits_f64(v[0])
            c, d = si.bits_f64(v[1])
            return a, b, c, d
    return dec, enc


@dev
def channel_params(sf, prm, nc, nt, tid, d0, nch, dbias, Dv, zero):
    """sf[prm + i] = delta_bias, sf[prm + nc + i] = D of channel d0 + i (i < nc; channels past nch repeat the last
    one), loaded by the block's nt threads (the forward and the backward kernel's shared PRM rows)."""
    for i in range(tid, nc, nt):
        dd = d0 + min(i, nch - 1)
        sf[prm + i] = dbias[dd] if dbias.shape[0] > 0 else zero
        sf[prm + nc + i] = Dv[dd] if Dv.shape[0] > 0 else zero


@functools.lru_cache(maxsize=None)
def _math(f64, FG):
    """(exp of a pre-scaled argument, the scale, polynomial exp2, softplus, silu) in the compute type."""
    if f64:
        thr = float64(SOFTPLUS_THRESHOLD)

        @dev
        def exps(x):
            return math.exp(x)

        @dev
        def softplus(x):
            return x if x > thr else math.log1p(math.exp(x))

        @dev
        def silu(v):
            return v / (1.0 + math.exp(-v))

        return exps, float64(1.0), exps, softplus, silu
    thr, l2e, ln2 = float32(SOFTPLUS_THRESHOLD), float32(LOG2E), float32(LN2)
    one, half, small = float32(1.0), float32(0.5), float32(1e-3)
    lo, hi, magic = float32(-126.0), float32(127.0), float32(12582912.0)  # 1.5 * 2**23: round to integer
    p0, p1, p2, p3, p4, p5 = (float32(c) for c in EXP2_POLY)

    @dev
    def exps(x):
        return intr.ex2(x)

    @dev
    def exp2_poly(x):
        """2**x by range reduction (x = j + f, |f| <= 1/2) and a degree-5 polynomial: FMA pipe only."""
        x = min(max(x, lo), hi)
        r = x + magic
        f = x - (r - magic)
        p = ((((p5 * f + p4) * f + p3) * f + p2) * f + p1) * f + p0
        return si.scale_bits(p, r)

    @dev
    def softplus(x):  # branch-free: log1p(e) = e (1 - e / 2) for tiny e, x itself above the threshold
        e = intr.ex2(x * l2e)
        s = e * (one - half * e) if e < small else si.lg2(one + e) * ln2
        return x if x > thr else s

    if FG:
        @dev
        def silu(v):
            hv = half * v
            return hv + hv * si.tanh_approx(hv)
    else:
        @dev
        def silu(v):
            return v * si.rcp(one + intr.ex2(-v * l2e))

    return exps, l2e, exp2_poly, softplus, silu


@functools.lru_cache(maxsize=None)
def make_kernel(kind, N, NC, Q, TL, VB, VC, SEQ, PM=0, FG=False):
    """The forward kernel for element kind ``kind`` and N states. PM > 0: every PM-th exp of a lane's 4-step
    group as a polynomial; FG: silu through tanh.approx (16-bit kinds)."""
    f64 = kind == "f64"
    ft = float64 if f64 else float32
    PM = 0 if f64 else PM
    PMM = max(PM, 1)
    F64 = f64
    exps, SCALE, exp2_poly, softplus_f, silu_f = _math(f64, bool(FG) and not f64)
    dec, enc = _codecs(kind)
    ZERO = ft(0.0)
    NQ = N // Q
    NT = NC * Q
    VE = 16 // ISZ[kind]  # elements of a 16-byte chunk
    CPR = TL // VE  # chunks of a tile row (a power of two)
    LC = CPR.bit_length() - 1
    KX = NC * CPR  # u / delta / z chunks of a tile; per thread: KX / NT rounded up, in an unrolled loop
    KXT = -(-KX // NT)
    KB = N * CPR  # B or C chunks of a tile
    KBT = -(-KB // NT)
    UG = 8 if TL % 8 == 0 else 4  # scan steps per unrolled group
    V4 = NQ % 4 == 0 and N % 4 == 0  # B / C of a step as 16-byte loads
    o, _ = layout(kind, N, NC, Q, TL, VB, VC, SEQ)
    TLP, US, DS, BS, CS, PS, PRM = (o[k] for k in ("TLP", "US", "DS", "BS", "CS", "PS", "PRM"))
    RST, RWR, RAW, BUF, ROB, ROC = (o[k] for k in ("RST", "RWR", "RAW", "BUF", "ROB", "ROC"))
    ld, ld4 = intr.ld, si.ld4

    @dev
    def load_nq(sf, base, out):  # out[:NQ] = sf[base:base + NQ]
        if V4:
            for m in range(NQ // 4):
                out[4 * m], out[4 * m + 1], out[4 * m + 2], out[4 * m + 3] = ld4(sf, base + 4 * m)
        else:
            for i in range(NQ):
                out[i] = ld(sf, base + i)

    @dev
    def issue(rw, u, delta, z, bv, cv, buf, t1, row0, brow, crow_, nch, Lp, tid, has_z):
        base = RAW + buf * BUF
        for m in range(KXT):
            k = tid + m * NT
            if k < KX:
                cc = k >> LC
                jj = k & (CPR - 1)
                t = t1 + jj * VE
                ok = (cc < nch) & (t < Lp)
                src = row0 + cc * Lp + t if ok else 0
                nb = 16 if ok else 0
                dst = base + cc * RWR + jj * 4
                si.cp16(rw, dst, u, src, nb)
                si.cp16(rw, dst + NC * RWR, delta, src, nb)
                if has_z:
                    si.cp16(rw, dst + 2 * NC * RWR, z, src, nb)
        if VB or VC:
            for m in range(KBT):
                k = tid + m * NT
                if k < KB:
                    n = k >> LC
                    jj = k & (CPR - 1)
                    t = t1 + jj * VE
                    ok = t < Lp
                    nb = 16 if ok else 0
                    if VB:
                        si.cp16(rw, base + ROB + n * RWR + jj * 4, bv, brow + n * Lp + t if ok else 0, nb)
                    if VC:
                        si.cp16(rw, base + ROC + n * RWR + jj * 4, cv, crow_ + n * Lp + t if ok else 0, nb)
        intr.cp_async_commit()

    def kernel(u, delta, z, y, bv, cv, A, bconst, cconst, Dv, dbias, init, seq, last, blk, softplus,
               Dm, L, Lp, GB, GC):
        tid = cuda.threadIdx.x
        c = tid // Q
        q = tid - c * Q
        b = cuda.blockIdx.y
        d0 = blk[cuda.blockIdx.x, 0]
        nch = blk[cuda.blockIdx.x, 1]
        cr = min(c, nch - 1)
        d = d0 + cr
        sf = cuda.shared.array(0, ft)  # views of the one dynamic allocation (see ``layout``)
        rw = cuda.shared.array(0, uint32)
        ri = cuda.shared.array(0, int32)
        h = cuda.local.array(NQ, ft)
        a2 = cuda.local.array(NQ, ft)
        bk = cuda.local.array(NQ, ft)
        ck = cuda.local.array(NQ, ft)
        bt = cuda.local.array(NQ, ft)
        ct = cuda.local.array(NQ, ft)
        dtl = cuda.local.array(UG, ft)
        ul = cuda.local.array(UG, ft)
        accl = cuda.local.array(UG, ft)
        va = cuda.local.array(VE, ft)
        vb = cuda.local.array(VE, ft)
        vz = cuda.local.array(VE, ft)
        has_z = z.shape[0] > 0
        row0 = (b * Dm + d0) * Lp  # element offset of (b, d0, 0)
        brow = 0
        if VB:
            brow = (b * GB + d0 // (Dm // GB)) * N * Lp
        crw = 0
        if VC:
            crw = (b * GC + d0 // (Dm // GC)) * N * Lp
        channel_params(sf, PRM, NC, NT, tid, d0, nch, dbias, Dv, ZERO)  # per-channel bias and D
        for i in range(NQ):
            n = q * NQ + i
            h[i] = init[b, d, n] if init.shape[0] > 0 else ZERO
            a2[i] = A[d, n] * SCALE
            bk[i] = ZERO if VB else bconst[d, n]
            ck[i] = ZERO if VC else cconst[d, n]
        nt = (L + TL - 1) // TL
        issue(rw, u, delta, z, bv, cv, 0, 0, row0, brow, crw, nch, Lp, tid, has_z)
        for it in range(-1, nt):  # it = -1: the prologue (conversion of tile 0 only)
            buf = it & 1
            t0 = it * TL
            if it >= 0:
                crow = US + cr * TLP
                prow = PS + tid * TLP
                for jb in range(0, TL, UG):  # the scan of tile it, UG steps per unrolled group
                    for g in range(UG // 4):
                        dtl[4 * g], dtl[4 * g + 1], dtl[4 * g + 2], dtl[4 * g + 3] = ld4(sf, crow + (DS - US) + jb + 4 * g)
                        ul[4 * g], ul[4 * g + 1], ul[4 * g + 2], ul[4 * g + 3] = ld4(sf, crow + jb + 4 * g)
                    for k in range(UG):
                        j = jb + k
                        if SEQ:
                            if ri[RST + j] != 0:
                                for i in range(NQ):
                                    h[i] = ZERO
                        dt = dtl[k]
                        dtu = dt * ul[k]
                        if VB:
                            load_nq(sf, BS + j * N + q * NQ, bt)
                        if VC:
                            load_nq(sf, CS + j * N + q * NQ, ct)
                        acc = ZERO
                        for i in range(NQ):
                            bn = bt[i] if VB else bk[i]
                            cn = ct[i] if VC else ck[i]
                            if PM > 0 and (k * NQ + i) % PMM == PMM - 1:
                                e = exp2_poly(dt * a2[i])
                            else:
                                e = exps(dt * a2[i])
                            hn = e * h[i] + dtu * bn
                            h[i] = hn
                            acc += cn * hn
                        accl[k] = acc
                    if F64:
                        for k in range(UG):
                            sf[prow + jb + k] = accl[k]
                    else:
                        for g in range(UG // 4):
                            si.st16(sf, prow + jb + 4 * g, si.bits_f32(accl[4 * g]), si.bits_f32(accl[4 * g + 1]),
                                    si.bits_f32(accl[4 * g + 2]), si.bits_f32(accl[4 * g + 3]))
            intr.cp_async_wait0()  # this thread's chunks of tile it + 1 have landed
            cuda.syncthreads()
            if it >= 0:  # epilogue of tile it
                base = RAW + buf * BUF
                for mm in range(KXT):
                    k = tid + mm * NT
                    cc = k >> LC
                    jj = k & (CPR - 1)
                    j0 = jj * VE
                    if (cc < nch) & (t0 + j0 < Lp) & (k < KX):
                        pr = PS + cc * Q * TLP + j0
                        for m in range(VE // 4):  # the Q partial sums of C.h
                            vb[4 * m], vb[4 * m + 1], vb[4 * m + 2], vb[4 * m + 3] = ld4(sf, pr + 4 * m)
                        for e in range(4 * (VE // 4), VE):
                            vb[e] = sf[pr + e]
                        for qq in range(1, Q):
                            pr = PS + (cc * Q + qq) * TLP + j0
                            for m in range(VE // 4):
                                w0, w1, w2, w3 = ld4(sf, pr + 4 * m)
                                vb[4 * m] += w0
                                vb[4 * m + 1] += w1
                                vb[4 * m + 2] += w2
                                vb[4 * m + 3] += w3
                            for e in range(4 * (VE // 4), VE):
                                vb[e] += sf[pr + e]
                        w0, w1, w2, w3 = ld4(rw, base + cc * RWR + jj * 4)
                        dec(w0, w1, w2, w3, va)
                        if has_z:
                            w0, w1, w2, w3 = ld4(rw, base + 2 * NC * RWR + cc * RWR + jj * 4)
                            dec(w0, w1, w2, w3, vz)
                        Dc = sf[PRM + NC + cc]
                        for e in range(VE):
                            v = vb[e] + Dc * va[e]
                            if has_z:
                                v = silu_f(vz[e]) * v
                            vb[e] = v
                        w0, w1, w2, w3 = enc(vb)
                        si.st16(y, row0 + cc * Lp + t0 + j0, w0, w1, w2, w3)
            if it + 1 < nt:  # conversion of tile it + 1
                base = RAW + (buf ^ 1) * BUF
                t1 = t0 + TL
                for mm in range(KXT):
                    k = tid + mm * NT
                    if k >= KX:
                        break
                    cc = k >> LC
                    jj = k & (CPR - 1)
                    j0 = jj * VE
                    w0, w1, w2, w3 = ld4(rw, base + cc * RWR + jj * 4)
                    dec(w0, w1, w2, w3, va)
                    w0, w1, w2, w3 = ld4(rw, base + NC * RWR + cc * RWR + jj * 4)
                    dec(w0, w1, w2, w3, vb)
                    bias = sf[PRM + cc]
                    for e in range(VE):
                        x = vb[e] + bias
                        if softplus:
                            x = softplus_f(x)
                        vb[e] = x
                    if t1 + j0 + VE > L:  # the chunk holding t = L: dt = 0 past L (u is zero-filled there)
                        for e in range(VE):
                            vb[e] = vb[e] if t1 + j0 + e < L else ZERO
                    r = cc * TLP + j0
                    if F64:
                        for e in range(VE):
                            sf[US + r + e] = va[e]
                            sf[DS + r + e] = vb[e]
                    else:
                        for m in range(VE // 4):
                            si.st16(sf, US + r + 4 * m, si.bits_f32(va[4 * m]), si.bits_f32(va[4 * m + 1]),
                                    si.bits_f32(va[4 * m + 2]), si.bits_f32(va[4 * m + 3]))
                            si.st16(sf, DS + r + 4 * m, si.bits_f32(vb[4 * m]), si.bits_f32(vb[4 * m + 1]),
                                    si.bits_f32(vb[4 * m + 2]), si.bits_f32(vb[4 * m + 3]))
                if VB or VC:
                    for mm in range(KBT):
                        k = tid + mm * NT
                        if k >= KB:
                            break
                        n = k >> LC
                        jj = k & (CPR - 1)
                        if VB:
                            w0, w1, w2, w3 = ld4(rw, base + ROB + n * RWR + jj * 4)
                            dec(w0, w1, w2, w3, va)
                            for e in range(VE):
                                sf[BS + (jj * VE + e) * N + n] = va[e]
                        if VC:
                            w0, w1, w2, w3 = ld4(rw, base + ROC + n * RWR + jj * 4)
                            dec(w0, w1, w2, w3, vb)
                            for e in range(VE):
                                sf[CS + (jj * VE + e) * N + n] = vb[e]
                if SEQ:
                    for j in range(tid, TL, NT):
                        t = t1 + j
                        rs = 0
                        if (t > 0) & (t < L):
                            if seq[b, t] != seq[b, t - 1]:
                                rs = 1
                        ri[RST + j] = rs
            cuda.syncthreads()
            if it + 2 < nt:  # raw buffer `buf` is free again: the loads of tile it + 2
                issue(rw, u, delta, z, bv, cv, buf, t0 + 2 * TL, row0, brow, crw, nch, Lp, tid, has_z)
        if (c < nch) & (last.shape[0] > 0):
            for i in range(NQ):
                last[b, d, q * NQ + i] = h[i]

    return jit_kernel(kernel)
