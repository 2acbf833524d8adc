"""Mamba-1 selective scan on CUDA cores: forward scan (host side) and the decode-step state update.

* forward (kernel in ``_selective_scan_fwd``): a block owns NC consecutive channels of one batch row (never
  crossing a group of B or of C) and gives each channel Q lanes; lane q owns N / Q of the N states in
  registers, so the GPU runs B * Dm * Q threads instead of B * Dm and each lane has N / Q independent exp
  chains per step. Per time tile the block stages u, dt = softplus(delta + bias) (once per element), z,
  the seq_idx reset flags and the time-varying B / C tiles in shared memory (loaded into registers during
  the previous tile's scan, coalesced along L); the lanes walk the tile a few steps at a time and sum C.h
  over the Q lanes with xor shuffles; the block gates y with silu(z) and stores it coalesced.
  exp / softplus / silu use the SFU (ex2 / lg2 / rcp approx, ~2 ulp) in float32; float64 uses libm.
  On an H100 the exp floor (one ex2 per (b, d, t, n), 16 per clock per SM) is ~71% of copy bandwidth for
  bf16 at N 16; this kernel reaches 13-15% of copy (see BENCHMARKS.md).
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
from numba_kernels.cuda._selective_scan_fwd import _softplus_fn, fwd_config, make_scan_kernel
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


def scan_fwd_cuda(u, delta, A, B, C, D, z, dbias, init, seq, softplus, want_last, dt, out=None, q=None, tl=None,
                  nc=None):
    """Device y (B, Dm, L) in the element type of ``dt`` (written into ``out`` when given) and last state
    (B, Dm, N) in the compute dtype (None unless ``want_last``). ``q`` / ``tl`` / ``nc``: override the
    lanes per channel, time tile and channels per block (benchmark sweeps)."""
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
    out = cuda.device_array((Bt, Dm, L), dtype=ELEM[kind]) if out is None else out
    last = cuda.device_array((Bt, Dm, N), dtype=ft) if want_last else _empty((0, 0, 0), ft)

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
        e3 = types.Array(et, 3, "C")
        f1, f2, f3 = (types.Array(ft, n, "C") for n in (1, 2, 3))
        i1, i2 = types.Array(types.int32, 1, "C"), types.Array(types.int32, 2, "C")
        e1 = types.Array(et, 1, "C")
        for N in states:
            for vb, vc, sq in ((True, True, False), (False, False, False), (True, False, True)):
                cfg = fwd_config(N, kind)
                name = f"scan_{kind}_N{N}_{'var' if vb else 'const'}{'_seq' if sq else ''}"
                out.append((name, make_scan_kernel(kind, N, *cfg, vb, vc, sq).py_func,
                            (e1, e1, e1, e1, e1, e1, f2, f2, f2, f1, f1, f3, i2, types.int32, i1, i1,
                             types.int64, types.int64, types.int64, types.int64, f3)))
        for skind in sorted({"f32", kind}):
            st = ets[skind]
            uft = types.float64 if "f64" in (kind, skind) else types.float32
            u2, u3 = types.Array(uft, 2, "C"), types.Array(uft, 3, "C")
            out.append((f"update_{kind}_state_{skind}", make_update_kernel(kind, skind, 128).py_func,
                        (types.Array(st, 4, "C"), e3, e3, u3, e3, e3, u2, e3, u2, i1, types.int32, e3)))
    return out
