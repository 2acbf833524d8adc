"""The selective-scan forward kernel (host side and design notes in ``numba_kernels.cuda.selective_scan``).

Block = NC channels of one batch row (within one group of B and of C) x Q lanes per channel; lane q owns the
states n = q * N/Q + i (i < N/Q) in registers. Per time tile of TL steps:
  1. the tile's u, delta, z and time-varying B / C, loaded into registers during the previous tile's scan
     (coalesced along L), go to shared memory: dt = softplus(delta + bias) once per element; steps past L
     get dt = u = 0, which leaves the state unchanged, so the scan always runs TL steps;
  2. the loads of the next tile are issued;
  3. each lane walks the TL steps, U at a time: h = exp(dt A) h + dt B u for its states, its part of C.h
     (plus D u on lane 0); the U partial sums are added over the Q lanes with xor shuffles (U independent
     chains in flight) and lane 0 writes y (before the gate) over u in the tile;
  4. the block gates y with silu(z) and stores it coalesced.
Global tensors are passed flat (1-D) and read with precomputed offsets; hot shared loads go through ``ld``
(no negative-index wraparound code). exp / softplus / silu run on the SFU (ex2 / lg2 / rcp, ~2 ulp) for
the float32 kinds; float64 uses libm.
"""
import functools
import math

from numba import cuda, float32, float64, int32, uint16
from numba.core.types import float16

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _scan_intrinsics as sfu
from numba_kernels.cuda._attn_common import dev, jit_kernel
from numba_kernels.cuda._conv1d_kernels import _converters

#: channels per block NC and preferred lanes per channel Q (GPU, simulator)
FWD = {"gpu": (32, 4), "sim": (8, 4)}
#: time tile TL and steps per unrolled group U (GPU, simulator)
FWD_TL = {"gpu": (32, 4), "sim": (4, 2)}
#: static shared memory budget of the tiles (bytes)
FWD_SMEM = 44 * 1024
SOFTPLUS_THRESHOLD = 20.0
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ETYPE = {"f16": float16, "bf16": uint16, "f32": float32, "f64": float64}


def fwd_config(N, kind, q=None, tl=None, nc=None):
    """(NC, Q, TL, U) of the forward for N states: Q the largest power of two <= the preferred Q dividing N;
    TL a multiple of Q and U that fits the shared memory budget."""
    key = "sim" if intr.SIM else "gpu"
    NC, Qp = FWD[key]
    TL, U = FWD_TL[key]
    Qp = q or Qp
    TL = tl or TL
    Q = 1
    while Q * 2 <= Qp and N % (Q * 2) == 0:
        Q *= 2
    if intr.SIM and Q > 1:  # the warp-shuffle emulation needs whole warps of 32 threads
        NC = 32 // Q
    NC = nc or NC
    if not (intr.SIM or tl):  # the next tile waits in 3 * TL / Q registers per lane: keep that <= 24
        TL = min(TL, max(8 * Q, U))  # (H100 sweep: Q 4 TL 64 and Q 2 TL 32 / 64 were slower than Q 4 TL 32)
    isz = 8 if kind == "f64" else 4
    while TL > 4 and ((3 * NC + 2 * N) * (TL + 1) + TL) * isz > FWD_SMEM:
        TL //= 2
    TL = max(TL, Q, U)
    U = min(U, TL)
    return NC, Q, TL, U


@functools.lru_cache(maxsize=None)
def _softplus_fn(ft):
    thr = ft(SOFTPLUS_THRESHOLD)

    @dev
    def softplus(x):
        if x > thr:
            return x
        return math.log1p(math.exp(x))

    return softplus


@functools.lru_cache(maxsize=None)
def _fast_fns(f64):
    """(exp of an argument pre-scaled by SCALE, SCALE, softplus, silu): float32 on the SFU, or float64 libm."""
    if f64:
        @dev
        def exps(x):
            return math.exp(x)

        @dev
        def silu(v):
            return v / (1.0 + math.exp(-v))

        return exps, float64(1.0), _softplus_fn(float64), silu
    thr, l2e, ln2 = float32(SOFTPLUS_THRESHOLD), float32(LOG2E), float32(LN2)
    one, half, small = float32(1.0), float32(0.5), float32(1e-3)

    @dev
    def exps(x):
        return intr.ex2(x)

    @dev
    def softplus(x):
        if x > thr:
            return x
        e = intr.ex2(x * l2e)
        if e < small:  # log1p(e) = e - e^2 / 2 + O(e^3)
            return e * (one - half * e)
        return sfu.lg2(one + e) * ln2

    @dev
    def silu(v):
        return v * sfu.rcp(one + intr.ex2(-v * l2e))

    return exps, l2e, softplus, silu


@functools.lru_cache(maxsize=None)
def _sigmoid_fn(f64):
    """1 / (1 + exp(-x)): rcp / ex2 on the SFU in float32, exact in float64."""
    if f64:
        @dev
        def sigmoid(x):
            return 1.0 / (1.0 + math.exp(-x))

        return sigmoid
    one, l2e = float32(1.0), float32(LOG2E)

    @dev
    def sigmoid(x):
        return sfu.rcp(one + intr.ex2(-x * l2e))

    return sigmoid


@functools.lru_cache(maxsize=None)
def make_scan_kernel(kind, N, NC, Q, TL, U, VB, VC, SEQ):
    cin, cout, ft = _converters(kind)
    et = ETYPE[kind]
    exps, SCALE, softplus_f, silu_f = _fast_fns(kind == "f64")
    ZERO = ft(0.0)
    NQ = N // Q
    NT = NC * Q
    TLP = TL + 1  # padded rows: distinct channels / states read distinct banks
    IT = (NC * TL) // NT  # tile elements per thread (u, delta, z)
    ITB = -(-(N * TL) // NT)  # B / C tile elements per thread
    NBS = N * TLP if VB else 1
    NCS = N * TLP if VC else 1
    ITBB = ITB if VB else 1
    ITBC = ITB if VC else 1
    NCT = NC * TLP  # shared tile sizes: precomputed names (array shapes must be constants)
    ld = intr.ld
    shfl = intr.shfl_xor

    def kernel(u, delta, z, y, bvar, cvar, A, bconst, cconst, Dv, dbias, init, seq, softplus, blk_start, blk_len,
               Dm, L, GB, GC, last):
        tid = cuda.threadIdx.x
        c = tid // Q
        q = tid - c * Q
        blk = cuda.blockIdx.x
        b = cuda.blockIdx.y
        d0 = blk_start[blk]
        nch = blk_len[blk]
        act = c < nch
        cr = min(c, nch - 1)
        d = d0 + cr
        crow = cr * TLP
        us = cuda.shared.array(NCT, ft)
        ds = cuda.shared.array(NCT, ft)
        zs = cuda.shared.array(NCT, ft)
        bs = cuda.shared.array(NBS, ft)
        cs = cuda.shared.array(NCS, ft)
        rst = cuda.shared.array(TL, int32)
        h = cuda.local.array(NQ, ft)
        a2 = cuda.local.array(NQ, ft)
        bl = cuda.local.array(NQ, ft)
        cl = cuda.local.array(NQ, ft)
        accs = cuda.local.array(U, ft)
        pu = cuda.local.array(IT, et)
        pd = cuda.local.array(IT, et)
        pz = cuda.local.array(IT, et)
        pb = cuda.local.array(ITBB, et)
        pc = cuda.local.array(ITBC, et)
        has_z = z.shape[0] > 0
        has_bias = dbias.shape[0] > 0
        row0 = (b * Dm + d0) * L  # flat offset of (b, d0, 0)
        brow = 0
        if VB:
            brow = (b * GB + d0 // (Dm // GB)) * N * L
        crw = 0
        if VC:
            crw = (b * GC + d0 // (Dm // GC)) * N * L
        for i in range(NQ):
            n = q * NQ + i
            h[i] = ZERO
            if init.shape[0] > 0:
                h[i] = init[b, d, n]
            a2[i] = A[d, n] * SCALE
            bl[i] = ZERO
            cl[i] = ZERO
            if not VB:
                bl[i] = bconst[d, n]
            if not VC:
                cl[i] = cconst[d, n]
        Dq = ZERO  # D u is added once, on lane 0
        if Dv.shape[0] > 0 and q == 0:
            Dq = Dv[d]
        for t1 in range(0, L + TL, TL):
            t0 = t1 - TL  # the tile scanned in this pass; t1: the tile prefetched
            tl = min(TL, L - t0)
            if t0 >= 0:  # 1. registers -> shared memory
                for k in range(IT):
                    i = tid + k * NT
                    cc = i // TL
                    j = i - cc * TL
                    uv = ZERO
                    x = ZERO
                    zv = ZERO
                    if cc < nch and j < tl:
                        uv = ft(cin(pu[k]))
                        x = ft(cin(pd[k]))
                        if has_bias:
                            x += dbias[d0 + cc]
                        if softplus:
                            x = softplus_f(x)
                        if has_z:
                            zv = ft(cin(pz[k]))
                    us[cc * TLP + j] = uv
                    ds[cc * TLP + j] = x
                    zs[cc * TLP + j] = zv
                if VB:
                    for k in range(ITB):
                        i = tid + k * NT
                        n = i // TL
                        j = i - n * TL
                        if n < N:
                            bs[n * TLP + j] = ft(cin(pb[k])) if j < tl else ZERO
                if VC:
                    for k in range(ITB):
                        i = tid + k * NT
                        n = i // TL
                        j = i - n * TL
                        if n < N:
                            cs[n * TLP + j] = ft(cin(pc[k])) if j < tl else ZERO
                if SEQ:
                    for j in range(tid, TL, NT):
                        t = t0 + j
                        r = 0
                        if t > 0 and j < tl:
                            if seq[b, t] != seq[b, t - 1]:
                                r = 1
                        rst[j] = r
                cuda.syncthreads()
            if t1 < L:  # 2. issue the loads of the next tile
                tl1 = min(TL, L - t1)
                for k in range(IT):
                    i = tid + k * NT
                    cc = i // TL
                    j = i - cc * TL
                    if cc < nch and j < tl1:
                        off = row0 + cc * L + t1 + j
                        pu[k] = ld(u, off)
                        pd[k] = ld(delta, off)
                        if has_z:
                            pz[k] = ld(z, off)
                if VB:
                    for k in range(ITB):
                        i = tid + k * NT
                        n = i // TL
                        j = i - n * TL
                        if n < N and j < tl1:
                            pb[k] = ld(bvar, brow + n * L + t1 + j)
                if VC:
                    for k in range(ITB):
                        i = tid + k * NT
                        n = i // TL
                        j = i - n * TL
                        if n < N and j < tl1:
                            pc[k] = ld(cvar, crw + n * L + t1 + j)
            if t0 >= 0:
                for jb in range(0, TL, U):  # 3. the scan, U steps per group
                    for k in range(U):
                        j = jb + k
                        if SEQ:
                            if rst[j] != 0:
                                for i in range(NQ):
                                    h[i] = ZERO
                        dt = ld(ds, crow + j)
                        uv = ld(us, crow + j)
                        dtu = dt * uv
                        acc = Dq * uv
                        for i in range(NQ):
                            bn = bl[i]
                            if VB:
                                bn = ld(bs, (q * NQ + i) * TLP + j)
                            cn = cl[i]
                            if VC:
                                cn = ld(cs, (q * NQ + i) * TLP + j)
                            hn = exps(dt * a2[i]) * h[i] + dtu * bn
                            h[i] = hn
                            acc += cn * hn
                        accs[k] = acc
                    o = 1
                    while o < Q:
                        for k in range(U):
                            accs[k] += shfl(accs[k], o)
                        o *= 2
                    if act and q == 0:
                        for k in range(U):
                            us[crow + jb + k] = accs[k]  # y (before the gate) replaces u
                cuda.syncthreads()
                for k in range(IT):  # 4. gate and store, coalesced
                    i = tid + k * NT
                    cc = i // TL
                    j = i - cc * TL
                    if cc < nch and j < tl:
                        v = us[cc * TLP + j]
                        if has_z:
                            v = silu_f(zs[cc * TLP + j]) * v
                        y[row0 + cc * L + t0 + j] = cout(v)
                cuda.syncthreads()
        if act and last.shape[0] > 0:
            for i in range(NQ):
                last[b, d, q * NQ + i] = h[i]

    return jit_kernel(kernel)
