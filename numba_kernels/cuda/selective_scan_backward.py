"""Mamba-1 selective scan backward on CUDA cores (host wrapper: ``numba_kernels.selective_scan_backward``).

* One warp per block of up to 32 consecutive channels of one batch row (blocks never cross a group of B or
  of C, see ``channel_blocks``); one lane per channel (b, d), its N states, state gradients and the
  per-channel accumulators (dA, time-invariant dB / dC) in registers.
* Recomputation: a forward pass writes the state entering every chunk of K steps to a global scratch
  (B, L / K, N, Dm) float32 (float64), coalesced over the lanes. The reverse scan then takes the chunks from
  the end: it recomputes the chunk's K + 1 states into shared memory ((K + 1) x N x 32, lane fastest: no bank
  conflicts) and walks them backwards.
* Time-varying dB / dC (summed over the channels of a group): every step the lanes put their N values in a
  padded (N, 33) shared tile and lane n adds row n (no bank conflicts, 32 loads per step instead of 5 N
  shuffles) into per-(b, block) partials (B, nblk, N, L); a second
  kernel adds the blocks of each group in a fixed order. dA, dD, ddelta_bias and time-invariant dB / dC go
  to per-(b, d) partials summed over the batch the same way: deterministic, no atomics.
* u, delta, z and dout are read (and du, ddelta, dz written) per lane straight from global memory: correct,
  not tuned (the forward is the tuned kernel).
Whether B / C are time-varying is compile-time (VB, VC); the other options switch at run time.
"""
import functools

import numpy as np
from numba import cuda

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._attn_common import jit_kernel
from numba_kernels.cuda._conv1d_kernels import ELEM, _converters, kind_of
from numba_kernels.cuda.causal_conv1d import _compute, _elem, _empty, _int
from numba_kernels.cuda._selective_scan_fwd import SOFTPLUS_THRESHOLD, _fast_fns, _sigmoid_fn
from numba_kernels.cuda.selective_scan import _bc

WARP = 32
#: shared memory budget of the recomputed chunk (bytes): K is the largest power of two that fits
SMEM_BUDGET = 96 * 1024
SIM_CHUNK = 4


def chunk_len(N, f64):
    if intr.SIM:
        return SIM_CHUNK
    k = 64
    while k > 1 and smem_bytes(N, k, f64) > SMEM_BUDGET:
        k //= 2
    return k


def smem_bytes(N, K, f64):
    return ((K + 1) * N * WARP + 2 * N * (WARP + 1)) * (8 if f64 else 4)


@functools.lru_cache(maxsize=None)
def make_bwd_kernel(kind, N, K, VB, VC):
    cin, cout, ft = _converters(kind)
    exps, SCALE, softplus_f, _ = _fast_fns(kind == "f64")
    sigmoid_f = _sigmoid_fn(kind == "f64")
    ZERO, ONE = ft(0.0), ft(1.0)
    THR = ft(SOFTPLUS_THRESHOLD)
    RED = (K + 1) * N * WARP  # start of the (2N, 33) reduction tiles of dB / dC
    WP1 = WARP + 1  # padded rows: lane r reading row r hits bank (r + k) % 32

    def kernel(dout, u, delta, A, bvar, bconst, cvar, cconst, Dv, z, dbias, init, seq, dlast, softplus,
               blk_start, blk_len, ck, du, ddelta, dz, dA_p, dBc_p, dCc_p, dBv_p, dCv_p, dD_p, ddb_p, dinit):
        lane = cuda.threadIdx.x
        blk = cuda.blockIdx.x
        b = cuda.blockIdx.y
        Dm = u.shape[1]
        L = u.shape[2]
        d0 = blk_start[blk]
        nch = blk_len[blk]
        act = lane < nch
        d = d0 + min(lane, nch - 1)
        hs = cuda.shared.array(0, ft)  # (K + 1, N, WARP) recomputed states of one chunk, then (2N, WARP + 1)
        h = cuda.local.array(N, ft)
        dh = cuda.local.array(N, ft)
        av = cuda.local.array(N, ft)
        a2 = cuda.local.array(N, ft)
        dAa = cuda.local.array(N, ft)
        bl = cuda.local.array(N, ft)
        cl = cuda.local.array(N, ft)
        dBa = cuda.local.array(N, ft)
        dCa = cuda.local.array(N, ft)
        has_seq = seq.shape[0] > 0
        has_z = z.shape[0] > 0
        gb = 0
        if VB:
            gb = d0 // (Dm // bvar.shape[1])
        gc = 0
        if VC:
            gc = d0 // (Dm // cvar.shape[1])
        bias = ZERO
        if dbias.shape[0] > 0:
            bias = dbias[d]
        Dd = ZERO
        if Dv.shape[0] > 0:
            Dd = Dv[d]
        for n in range(N):
            h[n] = ZERO
            if init.shape[0] > 0:
                h[n] = init[b, d, n]
            dh[n] = ZERO
            if dlast.shape[0] > 0:
                dh[n] = dlast[b, d, n]
            av[n] = A[d, n]
            a2[n] = av[n] * SCALE  # exp(dt A) = exps(dt a2)
            dAa[n] = ZERO
            dBa[n] = ZERO
            dCa[n] = ZERO
            bl[n] = ZERO
            cl[n] = ZERO
            if not VB:
                bl[n] = bconst[d, n]
            if not VC:
                cl[n] = cconst[d, n]
        # forward: the state entering every chunk
        for t in range(L):
            if t % K == 0 and act:
                for n in range(N):
                    ck[b, t // K, n, d] = h[n]
            if has_seq and t > 0:
                if seq[b, t] != seq[b, t - 1]:
                    for n in range(N):
                        h[n] = ZERO
            dt = ft(cin(delta[b, d, t])) + bias
            if softplus:
                dt = softplus_f(dt)
            dtu = dt * ft(cin(u[b, d, t]))
            for n in range(N):
                bn = bl[n]
                if VB:
                    bn = ft(cin(bvar[b, gb, n, t]))
                h[n] = exps(dt * a2[n]) * h[n] + dtu * bn
        sD = ZERO
        sb = ZERO
        nc = (L + K - 1) // K
        for cc in range(nc):
            c = nc - 1 - cc
            t0 = c * K
            tl = min(K, L - t0)
            for n in range(N):
                h[n] = ck[b, c, n, d]
                hs[n * WARP + lane] = h[n]
            for j in range(tl):  # recompute the chunk's states
                t = t0 + j
                rs = False
                if has_seq and t > 0:
                    rs = seq[b, t] != seq[b, t - 1]
                dt = ft(cin(delta[b, d, t])) + bias
                if softplus:
                    dt = softplus_f(dt)
                dtu = dt * ft(cin(u[b, d, t]))
                for n in range(N):
                    bn = bl[n]
                    if VB:
                        bn = ft(cin(bvar[b, gb, n, t]))
                    hp = h[n]
                    if rs:
                        hp = ZERO
                    h[n] = exps(dt * a2[n]) * hp + dtu * bn
                    hs[((j + 1) * N + n) * WARP + lane] = h[n]
            for jj in range(tl):  # walk back
                j = tl - 1 - jj
                t = t0 + j
                rs = False
                if has_seq and t > 0:
                    rs = seq[b, t] != seq[b, t - 1]
                x = ft(cin(delta[b, d, t])) + bias
                dt = x
                if softplus:
                    dt = softplus_f(x)
                ut = ft(cin(u[b, d, t]))
                g = ft(cin(dout[b, d, t]))
                if has_z:
                    zv = ft(cin(z[b, d, t]))
                    s = sigmoid_f(zv)
                    ypre = Dd * ut
                    for n in range(N):
                        cn = cl[n]
                        if VC:
                            cn = ft(cin(cvar[b, gc, n, t]))
                        ypre += cn * hs[((j + 1) * N + n) * WARP + lane]
                    if act:
                        dz[b, d, t] = cout(g * ypre * s * (ONE + zv * (ONE - s)))
                    g = g * zv * s
                dtu = dt * ut
                dus = ZERO
                ddt = ZERO
                for n in range(N):
                    bn = bl[n]
                    if VB:
                        bn = ft(cin(bvar[b, gb, n, t]))
                    cn = cl[n]
                    if VC:
                        cn = ft(cin(cvar[b, gc, n, t]))
                    dhn = dh[n] + g * cn
                    an = exps(dt * a2[n])
                    hp = hs[(j * N + n) * WARP + lane]
                    if rs:
                        hp = ZERO
                    vc = g * hs[((j + 1) * N + n) * WARP + lane]
                    vb = dhn * dtu
                    if not act:
                        vb = ZERO
                        vc = ZERO
                    if VB:
                        hs[RED + n * WP1 + lane] = vb
                    else:
                        dBa[n] += vb
                    if VC:
                        hs[RED + (N + n) * WP1 + lane] = vc
                    else:
                        dCa[n] += vc
                    dus += dhn * bn
                    ddt += dhn * (av[n] * an * hp + bn * ut)
                    dAa[n] += dhn * dt * an * hp
                    dh[n] = an * dhn
                    if rs:
                        dh[n] = ZERO
                if VB or VC:  # sum the channels' dB / dC of step t: lane r adds row r of the (N, 32) tiles
                    intr.syncwarp()
                    for r in range(lane, N, WARP):
                        if VB:
                            acc = ZERO
                            for k in range(WARP):
                                acc += hs[RED + r * WP1 + k]
                            dBv_p[b, blk, r, t] = acc
                        if VC:
                            acc = ZERO
                            for k in range(WARP):
                                acc += hs[RED + (N + r) * WP1 + k]
                            dCv_p[b, blk, r, t] = acc
                    intr.syncwarp()
                sD += g * ut
                if softplus and x <= THR:
                    ddt = ddt * sigmoid_f(x)
                sb += ddt
                if act:
                    du[b, d, t] = cout(dus * dt + g * Dd)
                    ddelta[b, d, t] = cout(ddt)
        if act:
            dD_p[b, d] = sD
            ddb_p[b, d] = sb
            for n in range(N):
                dA_p[b, d, n] = dAa[n]
                if not VB:
                    dBc_p[b, d, n] = dBa[n]
                if not VC:
                    dCc_p[b, d, n] = dCa[n]
                if dinit.shape[0] > 0:
                    dinit[b, d, n] = dh[n]

    return jit_kernel(kernel)


@functools.lru_cache(maxsize=None)
def make_group_sum_kernel(kind):
    """out[b, g, m] = sum over blocks k in [starts[g], starts[g + 1]) of part[b, k, m], in a fixed order."""
    _, cout, ft = _converters(kind)

    def kernel(part, starts, out):
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        Bt, G, M = out.shape
        if i >= Bt * G * M:
            return
        b = i // (G * M)
        r = i - b * (G * M)
        g = r // M
        m = r - g * M
        acc = ft(0.0)
        for k in range(starts[g], starts[g + 1]):
            acc += part[b, k, m]
        out[b, g, m] = cout(acc)

    return jit_kernel(kernel)


def _group_sum(part3, starts, kind, shape):
    """part3 (B, K, M) device -> (B, G, M) summed per block range, in the element type of ``kind``."""
    Bt, _, M = part3.shape
    G = len(starts) - 1
    out = cuda.device_array((Bt, G, M), dtype=ELEM[kind])
    NT = 32 if intr.SIM else 256
    intr.launch(make_group_sum_kernel(kind), -(-(Bt * G * M) // NT), NT, 0,
                (part3, cuda.to_device(np.asarray(starts, np.int32)), out))
    return out.reshape(shape)


def _batch_sum(part, kind):
    """(B, ...) device partials -> (...) summed over the batch (compute dtype)."""
    Bt = part.shape[0]
    rest = tuple(part.shape[1:])
    return _group_sum(part.reshape(1, Bt, int(np.prod(rest))), [0, Bt], kind, rest)


def scan_bwd_cuda(dout, u, delta, A, B, C, D, z, dbias, init, seq, dlast, softplus, gb, gc, dt):
    """Device gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit): element type of ``dt`` for
    du / ddelta / dz / time-varying dB, dC; the compute dtype for the rest (None for inputs not given)."""
    from numba_kernels.selective_scan_backward import channel_blocks

    kind = kind_of(dt)
    f64 = kind == "f64"
    ft = np.float64 if f64 else np.float32
    fkind = "f64" if f64 else "f32"
    Bt, Dm, L = u.shape
    N = A.shape[1]
    K = chunk_len(N, f64)
    st, ln, bgrp, cgrp = channel_blocks(Dm, gb, gc, WARP)
    nblk = len(st)
    nc = -(-L // K)
    bv, bc = _bc(B, kind, ft, Bt, N, L)
    cv, cc = _bc(C, kind, ft, Bt, N, L)
    et = ELEM[kind]
    du = cuda.device_array((Bt, Dm, L), dtype=et)
    ddelta = cuda.device_array((Bt, Dm, L), dtype=et)
    dz = cuda.device_array((Bt, Dm, L), dtype=et) if z is not None else _empty((0, 0, 0), et)
    dA = cuda.device_array((Bt, Dm, N), dtype=ft)
    dBc = cuda.device_array((Bt, Dm, N), dtype=ft) if not gb else _empty((0, 0, 0), ft)
    dCc = cuda.device_array((Bt, Dm, N), dtype=ft) if not gc else _empty((0, 0, 0), ft)
    dBv = cuda.device_array((Bt, nblk, N, L), dtype=ft) if gb else _empty((0, 0, 0, 0), ft)
    dCv = cuda.device_array((Bt, nblk, N, L), dtype=ft) if gc else _empty((0, 0, 0, 0), ft)
    dD = cuda.device_array((Bt, Dm), dtype=ft)
    ddb = cuda.device_array((Bt, Dm), dtype=ft)
    dinit = cuda.device_array((Bt, Dm, N), dtype=ft) if init is not None else _empty((0, 0, 0), ft)
    ck = cuda.device_array((Bt, nc, N, Dm), dtype=ft)
    args = (_elem(dout, kind, 3), _elem(u, kind, 3), _elem(delta, kind, 3), _compute(A, ft, 2), bv, bc, cv, cc,
            _compute(D, ft, 1), _elem(z, kind, 3), _compute(dbias, ft, 1), _compute(init, ft, 3), _int(seq, 2),
            _compute(dlast, ft, 3), np.int32(softplus), cuda.to_device(st), cuda.to_device(ln), ck,
            du, ddelta, dz, dA, dBc, dCc, dBv, dCv, dD, ddb, dinit)
    smem = smem_bytes(N, K, f64)
    intr.launch(make_bwd_kernel(kind, N, K, bool(gb), bool(gc)), (nblk, Bt), WARP, smem, args)

    def var(part, G, grp, M):  # (B, nblk, N, L) -> (B, G, N, L) -> M's shape, in u's element type
        starts = np.searchsorted(grp, np.arange(G + 1)).astype(np.int32)
        return _group_sum(part.reshape(Bt, nblk, N * L), starts, kind, tuple(M.shape))

    dBo = var(dBv, gb, bgrp, B) if gb else _batch_sum(dBc, fkind)
    dCo = var(dCv, gc, cgrp, C) if gc else _batch_sum(dCc, fkind)
    return (du, ddelta, _batch_sum(dA, fkind), dBo, dCo, _batch_sum(dD, fkind) if D is not None else None,
            dz if z is not None else None, _batch_sum(ddb, fkind) if dbias is not None else None,
            dinit if init is not None else None)


def ptx_signatures(states=(4, 16)):
    """(name, python function, numba signature) of every real backward kernel configuration, for PTX checks."""
    from numba import types

    out = []
    ets = {"f16": types.float16, "bf16": types.uint16, "f32": types.float32, "f64": types.float64}
    for kind in ("f32", "f64", "f16", "bf16"):
        et = ets[kind]
        ft = types.float64 if kind == "f64" else types.float32
        e3, e4 = types.Array(et, 3, "C"), types.Array(et, 4, "C")
        f1, f2, f3, f4 = (types.Array(ft, n, "C") for n in (1, 2, 3, 4))
        i1, i2 = types.Array(types.int32, 1, "C"), types.Array(types.int32, 2, "C")
        for N in states:
            for vb, vc in ((True, True), (False, False)):
                K = chunk_len(N, kind == "f64")
                out.append((f"bwd_{kind}_N{N}_{'var' if vb else 'const'}", make_bwd_kernel(kind, N, K, vb, vc).py_func,
                            (e3, e3, e3, f2, e4, f2, e4, f2, f1, e3, f1, f3, i2, f3, types.int32, i1, i1, f4,
                             e3, e3, e3, f3, f3, f3, f4, f4, f2, f2, f3)))
        out.append((f"group_sum_{kind}", make_group_sum_kernel(kind).py_func,
                    (types.Array(ft, 3, "C"), i1, e3)))
    return out
