"""Mamba-1 selective scan on CUDA cores: forward scan and the decode-step state update.

* forward (``make_scan_kernel``): a block owns NC consecutive channels of one batch row (never crossing a
  group of B or of C) and gives each channel Q lanes; lane q owns N / Q of the N states in registers, so the
  GPU runs B * Dm * Q threads instead of B * Dm and each lane has N / Q independent exp chains per step.
  Per time tile of TL steps the block stages u, dt = softplus(delta + bias) (computed once per element),
  z, the seq_idx reset flags and the time-varying B / C tiles (N x TL of the block's group) in shared memory
  with loads coalesced along L; each lane walks the tile, C.h is summed over the Q lanes with xor
  shuffles, and the block gates y with silu(z) and stores it coalesced. exp / softplus / silu use the SFU
  (ex2 / lg2 / rcp approx, ~2 ulp) in float32; float64 uses libm.
  The floor of this op on an H100/H200 is the SFU, not memory: one ex2 per (b, d, t, n) at 16 per clock
  per SM (see BENCHMARKS.md).
* update: one thread per (b, h, p) row of the state, N states updated in place.
Kernels are built by cached factories keyed by (element kind, N, tiles, B / C time-varying); the other
optional inputs are empty arrays and switch code paths at run time (uniform branches).

Dtypes as in ``numba_kernels.cuda.causal_conv1d``: float16 passed as is, bfloat16 as uint16 bits widened
and narrowed in the kernel; the state and all arithmetic in float32 (float64 for float64).
"""
import functools
import math

import numpy as np
from numba import cuda, float32, float64, int32

from numba_kernels import _dispatch as dsp
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _scan_intrinsics as sfu
from numba_kernels.cuda._attn_common import dev, jit_kernel
from numba_kernels.cuda._conv1d_kernels import ELEM, _converters, kind_of
from numba_kernels.cuda.causal_conv1d import _compute, _elem, _empty, _int

#: forward: channels per block NC and lanes per channel Q (each lane owns N / Q states); simulator: tiny
FWD = {"gpu": (32, 4), "sim": (8, 4)}
#: static shared memory budget of the forward's tiles (bytes): the time tile TL is the largest that fits
FWD_SMEM = 44 * 1024
SOFTPLUS_THRESHOLD = 20.0
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: decode update: threads per block (GPU, simulator)
UPDATE_NT = {"gpu": 128, "sim": 4}


def fwd_config(N, kind, q=None, tl=None, nc=None):
    """(NC, Q, TL) of the forward for N states: Q the largest power of two <= the preferred Q dividing N."""
    NC, Qp = FWD["sim" if intr.SIM else "gpu"]
    NC = nc or NC
    Qp = q or Qp
    Q = 1
    while Q * 2 <= Qp and N % (Q * 2) == 0:
        Q *= 2
    if intr.SIM:  # the warp-shuffle emulation needs whole warps of 32 threads when Q > 1
        return (nc or 32 // Q if Q > 1 else NC), Q, tl or 4
    isz = 8 if kind == "f64" else 4
    TL = tl or 64
    while TL > 4 and ((3 * NC + 2 * N) * (TL + 1) + TL) * isz > FWD_SMEM:
        TL //= 2
    return NC, Q, TL


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
    """(exp of an argument pre-scaled by SCALE, SCALE, softplus, silu) in float32 on the SFU (ex2 / lg2 / rcp),
    or float64 (libm) for float64."""
    if f64:
        softplus = _softplus_fn(float64)

        @dev
        def exps(x):
            return math.exp(x)

        @dev
        def silu(v):
            return v / (1.0 + math.exp(-v))

        return exps, float64(1.0), softplus, silu
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
def make_scan_kernel(kind, N, NC, Q, TL, VB, VC):
    """Forward scan. Block = NC channels (one group of B and of C) x Q lanes; lane q of channel c owns the
    states n = q * N/Q + i, i < N/Q (registers). Per time tile of TL steps the block stages u, dt (softplus
    applied once per element), z, the reset flags of seq_idx and time-varying B / C tiles in shared memory
    (coalesced loads along L), then each lane walks the tile: h = exp(dt A) h + dt B u for its states, C.h
    partial sums added over the Q lanes with xor shuffles; lane 0 puts C.h + D u into the u tile, and the
    block gates it with silu(z) and stores it coalesced."""
    cin, cout, ft = _converters(kind)
    exps, SCALE, softplus_f, silu_f = _fast_fns(kind == "f64")
    ZERO = ft(0.0)
    NQ = N // Q
    NT = NC * Q
    TLP = TL + 1  # padded rows: distinct channels / states read distinct banks
    NBS = N if VB else 1
    NCS = N if VC else 1
    TLB = TLP if VB else 1
    TLC = TLP if VC else 1
    shfl = intr.shfl_xor

    def kernel(u, delta, A, bvar, bconst, cvar, cconst, Dv, z, dbias, init, seq, softplus, blk_start, blk_len,
               y, last):
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
        us = cuda.shared.array((NC, TLP), ft)
        ds = cuda.shared.array((NC, TLP), ft)
        zs = cuda.shared.array((NC, TLP), ft)
        bs = cuda.shared.array((NBS, TLB), ft)
        cs = cuda.shared.array((NCS, TLC), ft)
        rst = cuda.shared.array(TL, int32)
        h = cuda.local.array(NQ, ft)
        a2 = cuda.local.array(NQ, ft)
        bl = cuda.local.array(NQ, ft)
        cl = cuda.local.array(NQ, ft)
        has_z = z.shape[0] > 0
        has_seq = seq.shape[0] > 0
        has_bias = dbias.shape[0] > 0
        gb = 0
        if VB:
            gb = d0 // (Dm // bvar.shape[1])
        gc = 0
        if VC:
            gc = d0 // (Dm // cvar.shape[1])
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
        Dd = ZERO
        if Dv.shape[0] > 0:
            Dd = Dv[d]
        for t0 in range(0, L, TL):
            tl = min(TL, L - t0)
            for i in range(tid, NC * TL, NT):  # coalesced along L
                cc = i // TL
                j = i - cc * TL
                if cc < nch and j < tl:
                    dd = d0 + cc
                    us[cc, j] = cin(u[b, dd, t0 + j])
                    x = ft(cin(delta[b, dd, t0 + j]))
                    if has_bias:
                        x += dbias[dd]
                    if softplus:
                        x = softplus_f(x)
                    ds[cc, j] = x
                    if has_z:
                        zs[cc, j] = cin(z[b, dd, t0 + j])
            if VB:
                for i in range(tid, N * TL, NT):
                    n = i // TL
                    j = i - n * TL
                    if j < tl:
                        bs[n, j] = cin(bvar[b, gb, n, t0 + j])
            if VC:
                for i in range(tid, N * TL, NT):
                    n = i // TL
                    j = i - n * TL
                    if j < tl:
                        cs[n, j] = cin(cvar[b, gc, n, t0 + j])
            if has_seq:
                for j in range(tid, tl, NT):
                    t = t0 + j
                    r = 0
                    if t > 0:
                        if seq[b, t] != seq[b, t - 1]:
                            r = 1
                    rst[j] = r
            cuda.syncthreads()
            for j in range(tl):
                if has_seq:
                    if rst[j] != 0:
                        for i in range(NQ):
                            h[i] = ZERO
                dt = ds[cr, j]
                uv = us[cr, j]
                dtu = dt * uv
                acc = ZERO
                for i in range(NQ):
                    bn = bl[i]
                    if VB:
                        bn = bs[q * NQ + i, j]
                    cn = cl[i]
                    if VC:
                        cn = cs[q * NQ + i, j]
                    hn = exps(dt * a2[i]) * h[i] + dtu * bn
                    h[i] = hn
                    acc += cn * hn
                o = 1
                while o < Q:
                    acc += shfl(acc, o)
                    o *= 2
                if act and q == 0:
                    us[c, j] = acc + Dd * uv  # y (before the gate) replaces u in the tile
            cuda.syncthreads()
            for i in range(tid, NC * TL, NT):
                cc = i // TL
                j = i - cc * TL
                if cc < nch and j < tl:
                    v = us[cc, j]
                    if has_z:
                        v = silu_f(zs[cc, j]) * v
                    y[b, d0 + cc, t0 + j] = cout(v)
            cuda.syncthreads()
        if act and last.shape[0] > 0:
            for i in range(NQ):
                last[b, d, q * NQ + i] = h[i]

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_update_kernel(kind, skind, NT):
    cin, cout, ft = _converters(kind)
    sin, sout, sft = _converters(skind)
    ft = sft if skind == "f64" else ft
    softplus_f = _softplus_fn(ft)
    ZERO, ONE = ft(0.0), ft(1.0)

    def kernel(state, x, dt, A, Bm, Cm, Dv, z, dbias, sbi, softplus, y):
        r = cuda.blockIdx.x * NT + cuda.threadIdx.x
        Bt, H, P = x.shape
        if r >= Bt * H * P:
            return
        N = A.shape[2]
        b = r // (H * P)
        hp = r - b * (H * P)
        hh = hp // P
        p = hp - hh * P
        g = hh // (H // Bm.shape[1])
        sb = b
        if sbi.shape[0] > 0:
            sb = sbi[b]
        d = ft(cin(dt[b, hh, p]))
        if dbias.shape[0] > 0:
            d += dbias[hh, p]
        if softplus:
            d = softplus_f(d)
        xv = ft(cin(x[b, hh, p]))
        dx = d * xv
        acc = ZERO
        for n in range(N):
            hn = math.exp(d * A[hh, p, n]) * ft(sin(state[sb, hh, p, n])) + dx * ft(cin(Bm[b, g, n]))
            state[sb, hh, p, n] = sout(hn)
            acc += ft(cin(Cm[b, g, n])) * hn
        if Dv.shape[0] > 0:
            acc += Dv[hh, p] * xv
        if z.shape[0] > 0:
            zv = ft(cin(z[b, hh, p]))
            acc = acc * zv / (ONE + math.exp(-zv))
        y[b, hh, p] = cout(acc)

    return jit_kernel(kernel)


# ---- host side ------------------------------------------------------------------------------------
def _bc(M, kind, ft, Bt, N, L):
    """(time-varying (B, G, N, L) in the element type | empty, time-invariant (Dm, N) in ft | empty)."""
    if len(M.shape) == 2:
        return _empty((0, 0, 0, 0), ELEM[kind]), _compute(M, ft, 2)
    G = 1 if len(M.shape) == 3 else M.shape[1]
    return _elem(M, kind, 4).reshape(Bt, G, N, L), _empty((0, 0), ft)


def scan_fwd_cuda(u, delta, A, B, C, D, z, dbias, init, seq, softplus, want_last, dt, out=None, q=None, tl=None,
                  nc=None):
    """Device y (B, Dm, L) in the element type of ``dt`` (written into ``out`` when given) and last state
    (B, Dm, N) in the compute dtype (None unless ``want_last``). ``q`` / ``tl`` / ``nc``: override the
    lanes per channel, time tile and channels per block (benchmark sweeps)."""
    kind = kind_of(dt)
    ft = np.float64 if kind == "f64" else np.float32
    Bt, Dm, L = u.shape
    N = A.shape[1]
    NC, Q, TL = fwd_config(N, kind, q, tl, nc)
    gb = 0 if len(B.shape) == 2 else (1 if len(B.shape) == 3 else B.shape[1])
    gc = 0 if len(C.shape) == 2 else (1 if len(C.shape) == 3 else C.shape[1])
    st, ln, _, _ = channel_blocks_dev(Dm, gb, gc, NC)
    bv, bc = _bc(B, kind, ft, Bt, N, L)
    cv, cc = _bc(C, kind, ft, Bt, N, L)
    out = cuda.device_array((Bt, Dm, L), dtype=ELEM[kind]) if out is None else out
    last = cuda.device_array((Bt, Dm, N), dtype=ft) if want_last else _empty((0, 0, 0), ft)
    args = (_elem(u, kind, 3), _elem(delta, kind, 3), _compute(A, ft, 2), bv, bc, cv, cc, _compute(D, ft, 1),
            _elem(z, kind, 3), _compute(dbias, ft, 1), _compute(init, ft, 3), _int(seq, 2), np.int32(softplus),
            st, ln, out, last)
    intr.launch(make_scan_kernel(kind, N, NC, Q, TL, bool(gb), bool(gc)), (len(st), Bt), NC * Q, 0, args)
    return out, (last if want_last else None)


@functools.lru_cache(maxsize=256)
def channel_blocks_dev(Dm, gb, gc, width):
    """``channel_blocks`` with (start, length) on the device (cached per shape); host group ids."""
    from numba_kernels.selective_scan_backward import channel_blocks

    st, ln, bg, cg = channel_blocks(int(Dm), int(gb), int(gc), int(width))
    return cuda.to_device(st), cuda.to_device(ln), bg, cg


def state_update_cuda(st4, state, x3, dt, A, B, C, D, z, dbias, sbi, softplus, xdt, cdt, out=None):
    """Device y (B, H, P) in x's element type; ``st4`` (the (Bs, H, P, N) view of ``state``) updated in place
    (a host ``state`` through a device copy)."""
    kind, skind = kind_of(xdt), kind_of(dsp.array_dtype(state))
    ft = np.dtype(cdt).type
    Bt, H, P = x3.shape
    NT = UPDATE_NT["sim" if intr.SIM else "gpu"]
    sd = _elem(st4, skind, 4)
    out = cuda.device_array((Bt, H, P), dtype=ELEM[kind]) if out is None else out
    args = (sd, _elem(x3, kind, 3), _elem(dt, kind, 3), _compute(A, ft, 3), _elem(B, kind, 3), _elem(C, kind, 3),
            _compute(D, ft, 2), _elem(z, kind, 3), _compute(dbias, ft, 2), _int(sbi, 1), np.int32(softplus), out)
    intr.launch(make_update_kernel(kind, skind, NT), -(-(Bt * H * P) // NT), NT, 0, args)
    if not dsp.is_device_array(state):
        state[...] = sd.copy_to_host().view(state.dtype).reshape(state.shape)
    return out


def ptx_signatures(states=(4, 16)):
    """(name, python function, numba signature) of every real kernel configuration, for PTX checks."""
    from numba import types

    out = []
    ets = {"f16": types.float16, "bf16": types.uint16, "f32": types.float32, "f64": types.float64}
    for kind in ("f32", "f64", "f16", "bf16"):
        et = ets[kind]
        ft = types.float64 if kind == "f64" else types.float32
        e3, e4 = types.Array(et, 3, "C"), types.Array(et, 4, "C")
        f1, f2, f3 = (types.Array(ft, n, "C") for n in (1, 2, 3))
        i1, i2 = types.Array(types.int32, 1, "C"), types.Array(types.int32, 2, "C")
        for N in states:
            for vb, vc in ((True, True), (False, False)):
                NC, Q, TL = fwd_config(N, kind)
                out.append((f"scan_{kind}_N{N}_{'var' if vb else 'const'}",
                            make_scan_kernel(kind, N, NC, Q, TL, vb, vc).py_func,
                            (e3, e3, f2, e4, f2, e4, f2, f1, e3, f1, f3, i2, types.int32, i1, i1, e3, f3)))
        for skind in sorted({"f32", kind}):
            st = ets[skind]
            uft = types.float64 if "f64" in (kind, skind) else types.float32
            u2, u3 = types.Array(uft, 2, "C"), types.Array(uft, 3, "C")
            out.append((f"update_{kind}_state_{skind}", make_update_kernel(kind, skind, 128).py_func,
                        (types.Array(st, 4, "C"), e3, e3, u3, e3, e3, u2, e3, u2, i1, types.int32, e3)))
    return out
