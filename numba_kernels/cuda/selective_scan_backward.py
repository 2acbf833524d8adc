"""Mamba-1 selective scan backward on CUDA: block configuration, chunk length, the launches and the
deterministic partial sums (host wrapper: ``numba_kernels.selective_scan_backward``). The kernel and its
shared-memory layout are in ``numba_kernels.cuda._scan_bwd_kernel`` (its docstring describes the algorithm).
"""
import functools

import numpy as np
from numba import cuda

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _launch as fl
from numba_kernels.cuda._attn_common import jit_kernel
from numba_kernels.cuda._conv1d_kernels import ELEM, _converters, kind_of
from numba_kernels.cuda._pool import out_array
from numba_kernels.cuda._scan_bwd_kernel import make_bwd_kernel, smem_bytes
from numba_kernels.cuda.causal_conv1d import _compute, _elem, _empty, _int
from numba_kernels.cuda.flash_attention import _cached
from numba_kernels.cuda.selective_scan import _bc
#: channels per block NC, preferred lanes per channel Q (GPU, simulator)
CONFIG = {"gpu": (32, 4), "sim": (16, 2)}
#: shared memory budget of one block (bytes): K is the largest power of two <= KMAX that fits. H200 2026-12-02,
#: bf16 B8 Dm1536 N16 z (benchmarks/gpu/ab_scan_bwd.py), the kernel before the walk lost its per-step shuffles
#: and epilogue: Q4 30 KB (K 8) 8.86 / 22.3 ms at L 2048 / 8192, 56 KB (K 16) 9.24 / 22.7, 100 KB (K 32)
#: 10.8 / 33.4; Q8 K16 8.43 / 28.5; Q2 K8 9.07 / 30.2; Q16 K32 10.1 / 34.6. The partial-sum slots (3 K (NC Q + 1)
#: words) take 12 KB more at K 8: 40 KB keeps Q4 at K 8 (39 KB; the grid, ~3 blocks per SM, bounds occupancy)
SMEM_BUDGET = 40 * 1024
#: issue the next chunk's global loads (u, delta, dout, z, B, C, seq, the checkpoint) into registers before the
#: current chunk's scan / walk, so their latency overlaps it (False: load each chunk right before staging it).
#: H200 2026-12-02, bf16 B8 Dm1536 N16 L2048 (benchmarks/results/gpu_h200_2026-12-02_scan_bwd_ab.txt): off
#: 4.771 ms, on 5.153 ms (its registers cost more than the overlap gains), the kernel before this session 9.706 ms
PREFETCH = False
KMAX = 64
SIM_CHUNK = 4


def config(N, q=None):
    """(NC, Q): Q the largest power of two <= the preferred Q dividing N."""
    NC, Qp = CONFIG["sim" if intr.SIM else "gpu"]
    Qp = q or Qp
    Q = 1
    while Q * 2 <= Qp and N % (Q * 2) == 0:
        Q *= 2
    return NC, Q


def chunk_len(N, f64, NC, Q, VB=True, VC=True):
    if intr.SIM:
        return SIM_CHUNK
    k = KMAX
    while k > 1 and smem_bytes(N, k, NC, Q, VB, VC, f64) > SMEM_BUDGET:
        k //= 2
    return k


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
    out = out_array((Bt, G, M), ELEM[kind])
    NT = 32 if intr.SIM else 256
    fl.launch(make_group_sum_kernel(kind), -(-(Bt * G * M) // NT), NT, 0,
                (part3, _cached(np.asarray(starts, np.int32)), out))
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
    NC, Q = config(N)
    K = chunk_len(N, f64, NC, Q, bool(gb), bool(gc))
    st, ln, bgrp, cgrp = channel_blocks(Dm, gb, gc, NC)
    nblk = len(st)
    nc = -(-L // K)
    bv, bc = _bc(B, kind, ft, Bt, N, L)
    cv, cc = _bc(C, kind, ft, Bt, N, L)
    et = ELEM[kind]
    du = out_array((Bt, Dm, L), et)
    ddelta = out_array((Bt, Dm, L), et)
    dz = out_array((Bt, Dm, L), et) if z is not None else _empty((0, 0, 0), et)
    dA = out_array((Bt, Dm, N), ft)
    dBc = out_array((Bt, Dm, N), ft) if not gb else _empty((0, 0, 0), ft)
    dCc = out_array((Bt, Dm, N), ft) if not gc else _empty((0, 0, 0), ft)
    dBv = out_array((Bt, nblk, N, L), ft) if gb else _empty((0, 0, 0, 0), ft)
    dCv = out_array((Bt, nblk, N, L), ft) if gc else _empty((0, 0, 0, 0), ft)
    dD = out_array((Bt, Dm), ft)
    ddb = out_array((Bt, Dm), ft)
    dinit = out_array((Bt, Dm, N), ft) if init is not None else _empty((0, 0, 0), ft)
    ck = out_array((Bt, nc, N, Dm), ft)
    args = (_elem(dout, kind, 3), _elem(u, kind, 3), _elem(delta, kind, 3), _compute(A, ft, 2), bv, bc, cv, cc,
            _compute(D, ft, 1), _elem(z, kind, 3), _compute(dbias, ft, 1), _compute(init, ft, 3), _int(seq, 2),
            _compute(dlast, ft, 3), np.int32(softplus), _cached(st), _cached(ln), ck,
            du, ddelta, dz, dA, dBc, dCc, dBv, dCv, dD, ddb, dinit)
    smem = smem_bytes(N, K, NC, Q, bool(gb), bool(gc), f64)
    fl.launch(make_bwd_kernel(kind, N, K, NC, Q, bool(gb), bool(gc), seq is not None, PREFETCH), (nblk, Bt), NC * Q,
              smem, args)

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
            for vb, vc, sq in ((True, True, True), (False, False, False)):
                NC, Q = config(N)
                K = chunk_len(N, kind == "f64", NC, Q, vb, vc)
                out.append((f"bwd_{kind}_N{N}_{'var' if vb else 'const'}{'_seq' if sq else ''}",
                            make_bwd_kernel(kind, N, K, NC, Q, vb, vc, sq, PREFETCH).py_func,
                            (e3, e3, e3, f2, e4, f2, e4, f2, f1, e3, f1, f3, i2, f3, types.int32, i1, i1, f4,
                             e3, e3, e3, f3, f3, f3, f4, f4, f2, f2, f3)))
        out.append((f"group_sum_{kind}", make_group_sum_kernel(kind).py_func,
                    (types.Array(ft, 3, "C"), i1, e3)))
    return out
