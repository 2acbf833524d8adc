"""Mamba-1 selective scan on CUDA cores: forward scan and the decode-step state update.

* forward: one thread per (b, d) channel walks L sequentially with its N states (and, for time-invariant
  B / C, B[d] and C[d]) in registers (local arrays of compile-time size N, fully unrolled). A block owns NT
  channels of one batch row; per time tile of TL steps it stages u, delta and z in shared memory with
  coalesced loads (along L), scans the tile, writes y back into the u tile and stores it coalesced.
  Time-varying B / C (B, G, N, L) are read straight from global memory: the threads of a block mostly
  share a group, so these are broadcast loads that stay in L1 across consecutive t.
* update: one thread per (b, h, p) row of the state, N states updated in place.
Kernels are built by cached factories keyed by (element kind, N, tiles); absent optional inputs are empty
arrays and switch code paths at run time (uniform branches).

Dtypes as in ``numba_kernels.cuda.causal_conv1d``: float16 passed as is, bfloat16 as uint16 bits widened
and narrowed in the kernel; the state and all arithmetic in float32 (float64 for float64).
"""
import functools
import math

import numpy as np
from numba import cuda

from numba_kernels import _dispatch as dsp
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._attn_common import dev, jit_kernel
from numba_kernels.cuda._conv1d_kernels import ELEM, _converters, kind_of
from numba_kernels.cuda.causal_conv1d import _compute, _elem, _empty, _int

#: (channels per block NT, time tile TL): GPU float32/16-bit, GPU float64 (shared memory), simulator (tiny)
TILES = {"gpu": (64, 32), "gpu64": (64, 16), "sim": (4, 4)}
SOFTPLUS_THRESHOLD = 20.0


def tiles(kind):
    if intr.SIM:
        return TILES["sim"]
    return TILES["gpu64" if kind == "f64" else "gpu"]


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
def make_scan_kernel(kind, N, NT, TL):
    cin, cout, ft = _converters(kind)
    softplus_f = _softplus_fn(ft)
    ZERO, ONE = ft(0.0), ft(1.0)
    TL1 = TL + 1  # padded rows: thread c reads row c, no bank conflicts

    def kernel(u, delta, A, bvar, bconst, cvar, cconst, Dv, z, dbias, init, seq, softplus, y, last):
        tid = cuda.threadIdx.x
        d0 = cuda.blockIdx.x * NT
        b = cuda.blockIdx.y
        Dm = u.shape[1]
        L = u.shape[2]
        nch = min(NT, Dm - d0)
        act = tid < nch
        d = d0 + min(tid, nch - 1)
        us = cuda.shared.array((NT, TL1), ft)
        ds = cuda.shared.array((NT, TL1), ft)
        zs = cuda.shared.array((NT, TL1), ft)
        h = cuda.local.array(N, ft)
        a = cuda.local.array(N, ft)
        bl = cuda.local.array(N, ft)
        cl = cuda.local.array(N, ft)
        var_b = bvar.shape[0] > 0
        var_c = cvar.shape[0] > 0
        has_z = z.shape[0] > 0
        has_seq = seq.shape[0] > 0
        for n in range(N):
            h[n] = ZERO
            if init.shape[0] > 0:
                h[n] = init[b, d, n]
            a[n] = A[d, n]
            bl[n] = ZERO
            cl[n] = ZERO
            if not var_b:
                bl[n] = bconst[d, n]
            if not var_c:
                cl[n] = cconst[d, n]
        gb = 0
        if var_b:
            gb = d // (Dm // bvar.shape[1])
        gc = 0
        if var_c:
            gc = d // (Dm // cvar.shape[1])
        bias = ZERO
        if dbias.shape[0] > 0:
            bias = dbias[d]
        Dd = ZERO
        if Dv.shape[0] > 0:
            Dd = Dv[d]
        for t0 in range(0, L, TL):
            tl = min(TL, L - t0)
            for i in range(tid, NT * TL, NT):  # coalesced along L
                c = i // TL
                j = i - c * TL
                if c < nch and j < tl:
                    us[c, j] = cin(u[b, d0 + c, t0 + j])
                    ds[c, j] = cin(delta[b, d0 + c, t0 + j])
                    if has_z:
                        zs[c, j] = cin(z[b, d0 + c, t0 + j])
            cuda.syncthreads()
            if act:
                for j in range(tl):
                    t = t0 + j
                    if has_seq and t > 0:
                        if seq[b, t] != seq[b, t - 1]:
                            for n in range(N):
                                h[n] = ZERO
                    dt = ds[tid, j] + bias
                    if softplus:
                        dt = softplus_f(dt)
                    uv = us[tid, j]
                    du = dt * uv
                    acc = ZERO
                    for n in range(N):
                        bn = bl[n]
                        if var_b:
                            bn = cin(bvar[b, gb, n, t])
                        cn = cl[n]
                        if var_c:
                            cn = cin(cvar[b, gc, n, t])
                        hn = math.exp(dt * a[n]) * h[n] + du * bn
                        h[n] = hn
                        acc += cn * hn
                    out = acc + Dd * uv
                    if has_z:
                        zv = zs[tid, j]
                        out = out * zv / (ONE + math.exp(-zv))
                    us[tid, j] = out  # y replaces u in the tile
            cuda.syncthreads()
            for i in range(tid, NT * TL, NT):
                c = i // TL
                j = i - c * TL
                if c < nch and j < tl:
                    y[b, d0 + c, t0 + j] = cout(us[c, j])
            cuda.syncthreads()
        if act and last.shape[0] > 0:
            for n in range(N):
                last[b, d, n] = h[n]

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


def scan_fwd_cuda(u, delta, A, B, C, D, z, dbias, init, seq, softplus, want_last, dt, out=None):
    """Device y (B, Dm, L) in the element type of ``dt`` (written into ``out`` when given) and last state
    (B, Dm, N) in the compute dtype (None unless ``want_last``)."""
    kind = kind_of(dt)
    ft = np.float64 if kind == "f64" else np.float32
    Bt, Dm, L = u.shape
    N = A.shape[1]
    NT, TL = tiles(kind)
    bv, bc = _bc(B, kind, ft, Bt, N, L)
    cv, cc = _bc(C, kind, ft, Bt, N, L)
    out = cuda.device_array((Bt, Dm, L), dtype=ELEM[kind]) if out is None else out
    last = cuda.device_array((Bt, Dm, N), dtype=ft) if want_last else _empty((0, 0, 0), ft)
    args = (_elem(u, kind, 3), _elem(delta, kind, 3), _compute(A, ft, 2), bv, bc, cv, cc, _compute(D, ft, 1),
            _elem(z, kind, 3), _compute(dbias, ft, 1), _compute(init, ft, 3), _int(seq, 2), np.int32(softplus),
            out, last)
    intr.launch(make_scan_kernel(kind, N, NT, TL), (-(-Dm // NT), Bt), NT, 0, args)
    return out, (last if want_last else None)


def state_update_cuda(st4, state, x3, dt, A, B, C, D, z, dbias, sbi, softplus, xdt, cdt, out=None):
    """Device y (B, H, P) in x's element type; ``st4`` (the (Bs, H, P, N) view of ``state``) updated in place
    (a host ``state`` through a device copy)."""
    kind, skind = kind_of(xdt), kind_of(dsp.array_dtype(state))
    ft = np.dtype(cdt).type
    Bt, H, P = x3.shape
    NT = tiles(kind)[0] * (1 if intr.SIM else 2)
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
        NT, TL = TILES["gpu64" if kind == "f64" else "gpu"]
        for N in states:
            out.append((f"scan_{kind}_N{N}", make_scan_kernel(kind, N, NT, TL).py_func,
                        (e3, e3, f2, e4, f2, e4, f2, f1, e3, f1, f3, i2, types.int32, e3, f3)))
        for skind in sorted({"f32", kind}):
            st = ets[skind]
            uft = types.float64 if "f64" in (kind, skind) else types.float32
            u2, u3 = types.Array(uft, 2, "C"), types.Array(uft, 3, "C")
            out.append((f"update_{kind}_state_{skind}", make_update_kernel(kind, skind, 128).py_func,
                        (types.Array(st, 4, "C"), e3, e3, u3, e3, e3, u2, e3, u2, i1, types.int32, e3)))
    return out
