"""Mamba-1 selective scan on CUDA cores: forward scan (host side) and the decode-step state update.

* forward (kernel in ``_scan_fwd_kernel``): a block owns NC consecutive channels of one batch row (never
  crossing a group of B or of C) and gives each channel Q lanes; lane q owns N / Q of the N states in registers.
  Raw tiles of u, delta, z and time-varying B / C go global -> shared by cp.async in 16-byte chunks (rows padded by
  the host to 16 bytes when needed); dt = softplus(delta + bias) is computed once per element; the lanes scan with
  16-byte shared loads and leave per-lane partial sums of C.h in shared memory, which the epilogue adds, gates
  with silu(z) and stores 16 bytes per thread. exp / softplus / silu use the SFU (ex2 / lg2 / rcp approx, ~2 ulp)
  in float32; float64 uses libm. On an H200 the SFU (one ex2 per (b, d, t, n)) allows at most ~52% of copy
  bandwidth for bf16 at N 16 even at the datasheet rate; this kernel reaches 23% (bf16) / 44% (fp32), see
  BENCHMARKS.md. ``scan_fwd_cuda_v1`` keeps the previous kernel (``_selective_scan_fwd``) for comparisons.
* backward: ``numba_kernels.cuda.selective_scan_backward``.
* update: one thread per (b, h, p) row of the state, N states updated in place.
Kernels are built by cached factories keyed by (element kind, N, tiles, B / C time-varying, seq_idx); the
other optional inputs are empty arrays and switch code paths at run time (uniform branches).

Dtypes as in ``numba_kernels.cuda.causal_conv1d``: float16 passed as is, bfloat16 as uint16 bits widened
and narrowed in the kernel; the state and all arithmetic in float32 (float64 for float64).
"""
import functools
import math

import numpy as np
from numba import cuda

from numba_kernels import _dispatch as dsp
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _launch as fl
from numba_kernels.cuda import _scan_fwd_kernel as fk
from numba_kernels.cuda._pool import out_array
from numba_kernels.cuda._selective_scan_fwd import _softplus_fn
from numba_kernels.cuda._attn_common import jit_kernel
from numba_kernels.cuda._conv1d_kernels import ELEM, _converters, kind_of
from numba_kernels.cuda.causal_conv1d import _compute, _elem, _empty, _int

#: decode update: threads per block (GPU, simulator)
UPDATE_NT = {"gpu": 128, "sim": 4}


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


#: forward variant knobs (see ``_scan_fwd_kernel.make_kernel``), per element kind: PM = every PM-th exp as an FMA
#: polynomial (bf16: 8, H200 sweep 2026-12-01: 860 us vs 897 us at B8 Dm1536 N16 L8192, checked; 4 / 2 / 1 were
#: slower), FG = silu through tanh.approx (bf16 only; off: not measured together with PM)
FWD_PM = {"bf16": 8}
FWD_FG = False


def _none(shape, dtype):
    """A cached zero-size device array (an absent option): ``causal_conv1d._empty``."""
    return _empty(shape, np.dtype(dtype))


def _ptr(a):
    """The data address of a device array (0 when empty; the NumPy buffer's under the simulator)."""
    if not a.size:
        return 0
    if intr.SIM:
        return a._ary.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


def _contig(a):
    """A C-contiguous device array (strided device views go through the host: rare, correct, slow)."""
    if intr.SIM or a.is_c_contiguous():
        return a
    return cuda.to_device(np.ascontiguousarray(a.copy_to_host()))


@functools.lru_cache(maxsize=None)
def _rows_kernel(crop):
    """Copy rows between (R, L) and (R, Lp) layouts, flat: pad with zeros (crop=False) or crop."""
    def kernel(src, dst, L, Lp):
        i = cuda.grid(1)
        if i < dst.size:
            if crop:
                r = i // L
                dst[i] = src[i + r * (Lp - L)]
            else:
                r = i // Lp
                t = i - r * Lp
                dst[i] = src[r * L + t] if t < L else 0

    return jit_kernel(kernel)


def _bits(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(a.dtype).itemsize])


def _rows(src, shape, L, Lp, crop, out=None):
    """``src`` (..., L) padded to (..., Lp) (or (..., Lp) cropped to L) as a new device array / into ``out``."""
    dst = out_array(shape, src.dtype) if out is None else out
    n = int(np.prod(shape))
    if n:
        NT = 32 if intr.SIM else 256
        fl.launch(_rows_kernel(crop), -(-n // NT), NT, 0, (_bits(src.reshape(src.size)), _bits(dst.reshape(n)),
                                                           np.int64(L), np.int64(Lp)))
    return dst


def scan_fwd_cuda(u, delta, A, B, C, D, z, dbias, init, seq, softplus, want_last, dt, out=None, q=None, tl=None,
                  nc=None, pm=None, fg=None):
    """Device y (B, Dm, L) in the element type of ``dt`` (written into ``out`` when given) and last state
    (B, Dm, N) in the compute dtype (None unless ``want_last``). ``q`` / ``tl`` / ``nc`` / ``pm`` / ``fg``:
    override lanes per channel, time tile, channels per block, polynomial exps, tanh gate (benchmark sweeps).
    Rows whose length or address is not a multiple of 16 bytes go through padded copies."""
    kind = kind_of(dt)
    ft = np.float64 if kind == "f64" else np.float32
    et = ELEM[kind]
    Bt, Dm, L = u.shape
    N = A.shape[1]
    NC, Q, TL = fk.config(N, kind, q, tl, nc)
    PM = FWD_PM.get(kind, 0) if pm is None else pm
    FG = (FWD_FG if fg is None else fg) and kind == "bf16"
    gb = 0 if len(B.shape) == 2 else (1 if len(B.shape) == 3 else B.shape[1])
    gc = 0 if len(C.shape) == 2 else (1 if len(C.shape) == 3 else C.shape[1])
    if Bt == 0 or Dm == 0:  # nothing to launch
        y = out_array((Bt, Dm, L), et) if out is None else out
        return y, (out_array((Bt, Dm, N), ft) if want_last else None)
    blk = blocks_dev(Dm, gb, gc, NC)
    VE = 16 // fk.ISZ[kind]
    Lp = -(-L // VE) * VE

    def elem(a, shape):
        if a is None:
            return _none((0,) * len(shape), et)
        a = _contig(_elem(a, kind, len(shape)))
        return a if tuple(a.shape) == shape else a.reshape(shape)

    ue, de, ze = (elem(a, (Bt, Dm, L)) for a in (u, delta, z))
    bv = elem(B, (Bt, gb, N, L)) if gb else _none((0,) * 4, et)
    cv = elem(C, (Bt, gc, N, L)) if gc else _none((0,) * 4, et)
    pad = Lp != L or any(_ptr(a) % 16 for a in (ue, de, ze, bv, cv))
    if pad:
        ue, de, ze, bv, cv = (_rows(a, a.shape[:-1] + (Lp,), L, Lp, False) if a.size else a
                              for a in (ue, de, ze, bv, cv))
    direct = out is not None and not pad and _ptr(out) % 16 == 0 and (intr.SIM or out.is_c_contiguous())
    yp = out if direct else out_array((Bt, Dm, Lp), et)
    last = out_array((Bt, Dm, N), ft) if want_last else _none((0, 0, 0), ft)

    def comp(a, nd):
        return _none((0,) * nd, ft) if a is None else _compute(a, ft, nd)

    bc = comp(B, 2) if not gb else _none((0, 0), ft)
    cc = comp(C, 2) if not gc else _none((0, 0), ft)
    sq = _none((0, 0), np.int32) if seq is None else _int(seq, 2)
    args = (ue, de, ze, yp, bv, cv, comp(A, 2), bc, cc, comp(D, 1), comp(dbias, 1), comp(init, 3), sq, last, blk,
            np.int32(softplus), np.int64(Dm), np.int64(L), np.int64(Lp), np.int64(max(gb, 1)), np.int64(max(gc, 1)))
    kern = fk.make_kernel(kind, N, NC, Q, TL, bool(gb), bool(gc), seq is not None, PM, FG)
    _, smem = fk.layout(kind, N, NC, Q, TL, bool(gb), bool(gc), seq is not None)
    fl.launch(kern, (blk.shape[0], Bt), NC * Q, smem, args)  # cached cuLaunchKernel (cuda/_launch.py)
    y = yp
    if not direct:
        y = _rows(yp, (Bt, Dm, L), L, Lp, True, out) if Lp != L else yp
        if out is not None and y is not out:
            out.copy_to_device(y)
            y = out
    return y, (last if want_last else None)


@functools.lru_cache(maxsize=256)
def blocks_dev(Dm, gb, gc, width):
    """``channel_blocks`` as one device (nblk, 2) int32 array of (start, length) (cached per shape)."""
    from numba_kernels.selective_scan_backward import channel_blocks

    st, ln, _, _ = channel_blocks(int(Dm), int(gb), int(gc), int(width))
    return cuda.to_device(np.ascontiguousarray(np.stack([st, ln], axis=1), dtype=np.int32))


def scan_fwd_cuda_v1(u, delta, A, B, C, D, z, dbias, init, seq, softplus, want_last, dt, out=None, q=None, tl=None,
                     nc=None):
    """The previous forward kernel (_selective_scan_fwd; kept for same-run comparisons)."""
    from numba_kernels.cuda._selective_scan_fwd import fwd_config, make_scan_kernel

    kind = kind_of(dt)
    ft = np.float64 if kind == "f64" else np.float32
    Bt, Dm, L = u.shape
    N = A.shape[1]
    NC, Q, TL, U = fwd_config(N, kind, q, tl, nc)
    gb = 0 if len(B.shape) == 2 else (1 if len(B.shape) == 3 else B.shape[1])
    gc = 0 if len(C.shape) == 2 else (1 if len(C.shape) == 3 else C.shape[1])
    st, ln, _, _ = channel_blocks_dev(Dm, gb, gc, NC)
    bv, bc = _bc(B, kind, ft, Bt, N, L)
    cv, cc = _bc(C, kind, ft, Bt, N, L)
    out = out_array((Bt, Dm, L), ELEM[kind]) if out is None else out
    last = out_array((Bt, Dm, N), ft) if want_last else _empty((0, 0, 0), ft)

    def flat(a):
        return a.reshape(a.size)

    args = (flat(_elem(u, kind, 3)), flat(_elem(delta, kind, 3)), flat(_elem(z, kind, 1)), flat(out), flat(bv),
            flat(cv), _compute(A, ft, 2), bc, cc, _compute(D, ft, 1), _compute(dbias, ft, 1),
            _compute(init, ft, 3), _int(seq, 2), np.int32(softplus), st, ln, np.int64(Dm), np.int64(L),
            np.int64(max(gb, 1)), np.int64(max(gc, 1)), last)
    kern = make_scan_kernel(kind, N, NC, Q, TL, U, bool(gb), bool(gc), seq is not None)
    intr.launch(kern, (len(st), Bt), NC * Q, 0, args)
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
    out = out_array((Bt, H, P), ELEM[kind]) if out is None else out
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
        e3 = types.Array(et, 3, "C")
        f1, f2, f3 = (types.Array(ft, n, "C") for n in (1, 2, 3))
        i1, i2 = types.Array(types.int32, 1, "C"), types.Array(types.int32, 2, "C")
        e1 = types.Array(et, 1, "C")
        e4, i2 = types.Array(et, 4, "C"), types.Array(types.int32, 2, "C")
        i64 = types.int64
        for N in states:
            for vb, vc, sq in ((True, True, False), (False, False, False), (True, False, True)):
                cfg = fk.config(N, kind)
                name = f"scan_{kind}_N{N}_{'var' if vb else 'const'}{'_seq' if sq else ''}"
                out.append((name, fk.make_kernel(kind, N, *cfg, vb, vc, sq, FWD_PM.get(kind, 0),
                                                          FWD_FG and kind == "bf16").py_func,
                            (e3, e3, e3, e3, e4, e4, f2, f2, f2, f1, f1, f3, i2, f3, i2, types.int32,
                             i64, i64, i64, i64, i64)))
        for skind in sorted({"f32", kind}):
            st = ets[skind]
            uft = types.float64 if "f64" in (kind, skind) else types.float32
            u2, u3 = types.Array(uft, 2, "C"), types.Array(uft, 3, "C")
            out.append((f"update_{kind}_state_{skind}", make_update_kernel(kind, skind, 128).py_func,
                        (types.Array(st, 4, "C"), e3, e3, u3, e3, e3, u2, e3, u2, i1, types.int32, e3)))
    return out
