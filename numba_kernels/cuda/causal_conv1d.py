"""Causal depthwise conv1d on CUDA cores: forward, decode update and backward.

* forward: one block per (L tile of TL outputs, channel d, batch b); the tile's input window
  (TL + W - 1 values, initial state or zeros before position 0) and its seq ids are staged in shared
  memory with coalesced loads, then each thread computes TL / NT outputs. A tiny kernel writes final_states.
* update: one thread per (b, d) row; the W - 1 window lives in a local array, the row of conv_state is
  updated in place (shift, or circular buffer with cache_seqlens).
* backward: the same tiling; each block recomputes g = dout * act'(pre) for its tile plus a W - 1 halo,
  writes dx, and block-reduces its dweight / dbias partials into (B, tiles, D, W + 1); a second kernel sums
  the partials (deterministic, no atomics). Block tile 0 also writes dinitial_states.
Kernels are built by cached factories keyed by (element kind, float64, W, TL, NT): W is a compile-time
constant (static shared arrays, unrollable tap loops).

Dtypes: float32 / float64 as they are; float16 arrays are passed as float16 (numba-cuda converts with
cvt.f32.f16, and the simulator is plain NumPy); bfloat16 as its uint16 bits, widened in the kernel with
``float32 bits = u16 << 16`` and narrowed with round-to-nearest-even on the bits (a bitcast intrinsic here,
a NumPy view under the simulator). Accumulation in float32 (float64 for float64).
"""
import functools

import numpy as np
from numba import cuda

from numba_kernels import _dispatch as dsp
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda import _launch as fl
from numba_kernels.cuda._conv1d_kernels import (ELEM, kind_of, make_bwd_kernel, make_final_kernel, make_fwd_kernel,
                                                make_sum_kernel, make_update_kernel)
from numba_kernels.cuda._pool import out_array

#: (outputs per block TL, threads NT): GPU and simulator (tiny)
TILES = {"gpu": (1024, 256), "sim": (8, 8)}
SMEM_LIMIT = 48 * 1024


def tiles():
    return TILES["sim" if intr.SIM else "gpu"]


# ---- host side ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _empty(shape, dtype):
    return cuda.to_device(np.zeros(shape, dtype=dtype))


def _elem(a, kind, ndim):
    """Device array of a tensor in its kernel element type (bfloat16 -> uint16 bits); empty when None."""
    et = np.dtype(ELEM[kind])
    if a is None:
        return _empty((0,) * ndim, et)
    if dsp.is_device_array(a):
        a = dsp.to_device(a)
        return a.view(et) if kind == "bf16" and np.dtype(a.dtype) != et else a
    return cuda.to_device(np.ascontiguousarray(a).view(et))


def _compute(a, ft, ndim):
    """Device array in the compute dtype (weights, bias): used as is when it already is one."""
    if a is None:
        return _empty((0,) * ndim, ft)
    if dsp.is_device_array(a) and dsp.array_dtype(a) == ft:
        return dsp.to_device(a)
    return cuda.to_device(np.ascontiguousarray(dsp.to_host(a), dtype=ft))


def _int(a, ndim):
    return _empty((0,) * ndim, np.int32) if a is None else dsp.to_device(a)


def _check_smem(nbytes, W):
    if nbytes > SMEM_LIMIT:
        raise ValueError(f"weight width W={W} is too large for the CUDA kernels "
                         f"({nbytes} bytes of shared memory > {SMEM_LIMIT}); use backend='cpu'")


def conv_fwd_cuda(x, weight, bias, init, seq, silu, want_final, dt, out=None):
    """Device out (B, D, L) [and final (B, D, W - 1)] in the element type of ``dt`` (written into ``out``
    when given, e.g. by the benchmark)."""
    kind = kind_of(dt)
    ft = np.float64 if kind == "f64" else np.float32
    B, D, L = x.shape
    W = weight.shape[1]
    TL, NT = tiles()
    _check_smem((TL + W - 1) * (np.dtype(ft).itemsize + 4), W)
    xd, initd, seqd = _elem(x, kind, 3), _elem(init, kind, 3), _int(seq, 2)
    out = out_array((B, D, L), ELEM[kind]) if out is None else out
    args = (xd, _compute(weight, ft, 2), _compute(bias, ft, 1), initd, seqd, np.int32(silu), out)
    fl.launch(make_fwd_kernel(kind, W, TL, NT), (-(-L // TL), D, B), NT, 0, args)
    final = None
    if want_final:
        final = out_array((B, D, W - 1), ELEM[kind])
        n = B * D * (W - 1)
        if n:
            fl.launch(make_final_kernel(kind, W), -(-n // NT), NT, 0, (xd, initd, seqd, final))
    return out, final


def conv_update_cuda(x3, conv_state, weight, bias, cache_seqlens, silu, dt, out=None):
    """Device out (B, D, Ln); ``conv_state`` updated in place (a host array through a device copy)."""
    kind = kind_of(dt)
    ft = np.float64 if kind == "f64" else np.float32
    B, D, Ln = x3.shape
    W = weight.shape[1]
    _, NT = tiles()
    sd = _elem(conv_state, kind, 3)
    out = out_array((B, D, Ln), ELEM[kind]) if out is None else out
    args = (_elem(x3, kind, 3), sd, _compute(weight, ft, 2), _compute(bias, ft, 1), _int(cache_seqlens, 1),
            np.int32(silu), out)
    fl.launch(make_update_kernel(kind, W, NT), -(-(B * D) // NT), NT, 0, args)
    if not dsp.is_device_array(conv_state):
        conv_state[...] = sd.copy_to_host().view(conv_state.dtype)
    return out


def conv_bwd_cuda(dout, x, weight, bias, init, dfinal, seq, silu, dt):
    """Device (dx, dweight (D, W), dbias (D,), dinit | None); weight grads in the compute dtype."""
    kind = kind_of(dt)
    ft = np.float64 if kind == "f64" else np.float32
    B, D, L = x.shape
    W = weight.shape[1]
    TL, NT = tiles()
    _check_smem((TL + 2 * (W - 1)) * (np.dtype(ft).itemsize + 4) + (TL + W - 1 + NT) * np.dtype(ft).itemsize, W)
    ntl = -(-L // TL)
    dx = out_array((B, D, L), ELEM[kind])
    part = out_array((B, ntl, D, W + 1), ft)
    dinit = out_array((B, D, W - 1), ELEM[kind]) if init is not None else _empty((0, 0, 0), ELEM[kind])
    args = (_elem(dout, kind, 3), _elem(x, kind, 3), _compute(weight, ft, 2), _compute(bias, ft, 1),
            _elem(init, kind, 3), _elem(dfinal, kind, 3), _int(seq, 2), np.int32(silu), dx, part, dinit)
    fl.launch(make_bwd_kernel(kind, W, TL, NT), (ntl, D, B), NT, 0, args)
    dwb = out_array((D, W + 1), ft)
    fl.launch(make_sum_kernel(kind == "f64"), -(-(D * (W + 1)) // NT), NT, 0, (part, dwb))
    h = dwb.copy_to_host()  # (D, W + 1): small; the wrapper puts it back on the device if needed
    return dx, np.ascontiguousarray(h[:, :W]), np.ascontiguousarray(h[:, W]), (dinit if init is not None else None)


def ptx_signatures(widths=(1, 4, 7)):
    """(name, python function, numba signature) of every real kernel configuration, for PTX checks."""
    from numba import types

    TL, NT = TILES["gpu"]
    out = []
    for kind in ("f32", "f64", "f16", "bf16"):
        et = {"f16": types.float16, "bf16": types.uint16, "f32": types.float32, "f64": types.float64}[kind]
        ft = types.float64 if kind == "f64" else types.float32
        a = types.Array(et, 3, "C")
        f1, f2, f4 = (types.Array(ft, n, "C") for n in (1, 2, 4))
        i1, i2 = types.Array(types.int32, 1, "C"), types.Array(types.int32, 2, "C")
        for W in widths:
            out.append((f"fwd_{kind}_W{W}", make_fwd_kernel(kind, W, TL, NT).py_func,
                        (a, f2, f1, a, i2, types.int32, a)))
            out.append((f"update_{kind}_W{W}", make_update_kernel(kind, W, NT).py_func,
                        (a, a, f2, f1, i1, types.int32, a)))
            out.append((f"bwd_{kind}_W{W}", make_bwd_kernel(kind, W, TL, NT).py_func,
                        (a, a, f2, f1, a, a, i2, types.int32, a, f4, a)))
            if W > 1:
                out.append((f"final_{kind}_W{W}", make_final_kernel(kind, W).py_func, (a, a, i2, a)))
        if kind in ("f32", "f64"):
            out.append((f"sum_{kind}", make_sum_kernel(kind == "f64").py_func, (f4, f2)))
    return out
