"""selective_scan_backward: the float64 reference against central finite differences; the CPU backend against
the reference for every option on/off, every B / C form, odd lengths and every dtype; varlen == separate
sequences; determinism; bad inputs; and the CUDA kernel under the simulator (``-m sim``, tiny shapes)."""
import itertools

import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels._dispatch import bfloat16
from numba_kernels.reference.selective_scan import selective_scan_backward_ref, selective_scan_ref
from tests.conftest import DTYPES, TOL, dtype_id, max_err
from tests.test_selective_scan import FORMS, _inputs

NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _with_grads(rng, kw, dt):
    B, Dm, L = kw["u"].shape
    N = kw["A"].shape[1]
    return (rng.standard_normal((B, Dm, L)).astype(dt),
            dict(kw, dlast_state=rng.standard_normal((B, Dm, N)).astype(np.float32)))


def _compare(got, ref, kw, dt, tol=None):
    for name, inp, g, r in zip(NAMES, INPUTS, got, ref):
        if kw.get(inp) is None:
            assert g is None and r is None, name
            continue
        x = kw[inp]
        assert g.shape == x.shape, f"{name}: shape {g.shape} != {x.shape}"
        assert g.dtype == x.dtype, f"{name}: dtype {g.dtype} != {x.dtype}"
        err = max_err(g.astype(np.float64), r)
        assert err < (tol or TOL[np.dtype(x.dtype)]), f"{name}: err {err:.2e}"


FD_CASES = [("grouped", "BNL", True, True), ("const", "grouped", False, True), ("BNL", "const", True, False)]


@pytest.mark.parametrize("bform,cform,softplus,options", FD_CASES,
                         ids=[f"B{b}-C{c}-softplus{int(s)}-opts{int(o)}" for b, c, s, o in FD_CASES])
def test_reference_matches_finite_differences(rng, bform, cform, softplus, options):
    kw = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
          for k, v in _inputs(rng, np.float64, B=2, Dm=4, L=7, N=3, G=2, bform=bform, cform=cform).items()}
    if not options:
        for k in ("D", "z", "delta_bias", "initial_state", "seq_idx"):
            kw[k] = None
    if not softplus:
        kw["delta"] = np.abs(kw["delta"])
    dout, kw = _with_grads(rng, kw, np.float64)
    dlast = kw.pop("dlast_state").astype(np.float64)
    dlast = dlast if options else None

    def loss():
        y, last = selective_scan_ref(**kw, delta_softplus=softplus, return_last_state=True)
        return float((y * dout).sum() + (0.0 if dlast is None else (last * dlast).sum()))

    grads = selective_scan_backward_ref(dout, **kw, delta_softplus=softplus, dlast_state=dlast)
    eps = 1e-6
    for name, inp, g in zip(NAMES, INPUTS, grads):
        x = kw[inp]
        if x is None:
            assert g is None, name
            continue
        fd = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            x0 = x[i]
            x[i] = x0 + eps
            lp = loss()
            x[i] = x0 - eps
            lm = loss()
            x[i] = x0
            fd[i] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(fd).max()), err_msg=name)


OPTIONS = list(itertools.product((0, 1), repeat=7))


@pytest.mark.parametrize("D,z,bias,softplus,init,seq,dlast", OPTIONS,
                         ids=["D{}-z{}-bias{}-sp{}-init{}-seq{}-dlast{}".format(*o) for o in OPTIONS])
def test_every_option_on_off(rng, D, z, bias, softplus, init, seq, dlast):
    dout, kw = _with_grads(rng, _inputs(rng, np.float64, L=63), np.float64)
    for name, on in (("D", D), ("z", z), ("delta_bias", bias), ("initial_state", init), ("seq_idx", seq),
                     ("dlast_state", dlast)):
        if not on:
            kw[name] = None
    if not softplus:  # keep dt > 0 so the state decays
        kw["delta"] = np.abs(kw["delta"])
        kw["delta_bias"] = None if kw["delta_bias"] is None else np.abs(kw["delta_bias"])
    got = nk.selective_scan_backward(dout, **kw, delta_softplus=bool(softplus), backend="cpu")
    ref = selective_scan_backward_ref(dout, **kw, delta_softplus=bool(softplus))
    _compare(got, ref, kw, np.float64)


SHAPES = [(L, bf, cf) for L in (1, 63, 130) for bf in FORMS for cf in FORMS]


@pytest.mark.parametrize("L,bform,cform", SHAPES, ids=[f"L{l}-B{b}-C{c}" for l, b, c in SHAPES])
def test_forms_and_lengths(rng, L, bform, cform):
    dout, kw = _with_grads(rng, _inputs(rng, np.float32, B=2, Dm=6, L=L, N=5, G=3, bform=bform, cform=cform),
                           np.float32)
    got = nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="cpu")
    _compare(got, selective_scan_backward_ref(dout, **kw, delta_softplus=True), kw, np.float32)


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_dtypes(rng, dt):
    # Dm 80 spans several channel blocks of a group; L 200 several recomputation chunks
    dout, kw = _with_grads(rng, _inputs(rng, dt, B=2, Dm=80, L=200, N=4, G=2), dt)
    got = nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="cpu")
    _compare(got, selective_scan_backward_ref(dout, **kw, delta_softplus=True), kw, dt)


def test_deterministic_and_inputs_untouched(rng):
    dout, kw = _with_grads(rng, _inputs(rng, np.float32, B=2, Dm=70, L=90, N=4, G=2, bform="grouped",
                                        cform="const"), np.float32)
    copies = {k: v.copy() for k, v in kw.items()}
    g1 = nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="cpu")
    g2 = nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="cpu")
    for a, b, n in zip(g1, g2, NAMES):
        np.testing.assert_array_equal(a, b, err_msg=n)
    for k, v in kw.items():
        np.testing.assert_array_equal(v, copies[k], err_msg=k)


def test_seq_idx_equals_separate_sequences(rng):
    lens = (5, 1, 20)
    L = sum(lens)
    dout, kw = _with_grads(rng, _inputs(rng, np.float64, B=1, L=L, bform="BNL", cform="grouped"), np.float64)
    kw = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in kw.items()}
    kw["seq_idx"] = np.repeat(np.arange(len(lens), dtype=np.int32), lens)[None]
    full = nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="cpu")
    starts = np.concatenate([[0], np.cumsum(lens)])
    acc = {n: 0.0 for n in ("dA", "dD", "ddelta_bias")}
    for i, (a, e) in enumerate(zip(starts[:-1], starts[1:])):
        part = {k: (v[..., a:e] if k in ("u", "delta", "z") or (k in ("B", "C") and v.ndim > 2) else v)
                for k, v in kw.items()}
        part["seq_idx"] = None
        part["initial_state"] = kw["initial_state"] if i == 0 else None
        part["dlast_state"] = kw["dlast_state"] if i == len(lens) - 1 else None
        g = dict(zip(NAMES, nk.selective_scan_backward(dout[..., a:e], **part, delta_softplus=True, backend="cpu")))
        for n in ("du", "ddelta", "dz", "dB", "dC"):
            np.testing.assert_allclose(dict(zip(NAMES, full))[n][..., a:e], g[n], rtol=1e-10, atol=1e-10, err_msg=n)
        for n in acc:
            acc[n] = acc[n] + g[n]
        if i == 0:
            np.testing.assert_allclose(full[8], g["dinitial_state"], rtol=1e-10, atol=1e-10)
    for n, v in acc.items():
        np.testing.assert_allclose(dict(zip(NAMES, full))[n], v, rtol=1e-10, atol=1e-10, err_msg=n)


def test_reference_backend(rng):
    dout, kw = _with_grads(rng, _inputs(rng, bfloat16, L=20), bfloat16)
    got = nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="reference")
    _compare(got, selective_scan_backward_ref(dout, **kw, delta_softplus=True), kw, bfloat16)


def _bad(**kw):
    def call(rng):
        base = _inputs(rng, np.float32, B=2, Dm=4, L=9, N=5, G=2)
        args = dict(base, **kw)
        dout = args.pop("dout", np.ones((2, 4, 9), np.float32))
        return nk.selective_scan_backward(dout, **args)
    return call


BAD = [
    ("dout shape", _bad(dout=np.ones((2, 4, 8), np.float32)), ValueError, "dout must have shape (2, 4, 9)"),
    ("dout dtype", _bad(dout=np.ones((2, 4, 9))), TypeError, "dout must have the same dtype"),
    ("dlast shape", _bad(dlast_state=np.ones((2, 4, 4), np.float32)), ValueError,
     "dlast_state must have shape (2, 4, 5)"),
    ("A shape", _bad(A=np.ones((3, 5), np.float32)), ValueError, "A must have shape (4, N)"),
    ("B groups", _bad(B=np.ones((2, 3, 5, 9), np.float32)), ValueError, "G=3 must divide Dm=4"),
    ("backend", _bad(backend="tpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("name,call,err,msg", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(rng, name, call, err, msg):
    with pytest.raises(err) as ei:
        call(rng)
    assert msg in str(ei.value)


# ---- the CUDA kernel under the simulator (NUMBA_ENABLE_CUDASIM=1; chunk K = 4, 16 channels x Q lanes per block:
# Q = 1 for N = 3, Q = 2 (states split over two lanes, shuffle sums) for N = 4) --------------------------------
@pytest.mark.sim
@pytest.mark.parametrize("dt,bform,cform,N", [(np.float32, "grouped", "BNL", 3), (bfloat16, "const", "grouped", 3),
                                              (np.float32, "BNL", "grouped", 4), (np.float64, "const", "const", 4)],
                         ids=["f32-grouped-BNL-N3", "bf16-const-grouped-N3", "f32-BNL-grouped-N4", "f64-const-N4"])
def test_sim_backward(rng, dt, bform, cform, N):
    # Dm 6 in 2 groups: 2 channel blocks per batch row (3 of 16 channels busy); L 7: two chunks, the second partial
    dout, kw = _with_grads(rng, _inputs(rng, dt, B=2, Dm=6, L=7, N=N, G=2, bform=bform, cform=cform, segments=2),
                           dt)
    got = nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="cuda")
    _compare(got, selective_scan_backward_ref(dout, **kw, delta_softplus=True), kw, dt)


@pytest.mark.sim
def test_sim_backward_prefetch(rng, monkeypatch):
    # the PREFETCH variant (off by default: slower on the H200) still computes the same gradients
    from numba_kernels.cuda import selective_scan_backward as csb

    monkeypatch.setattr(csb, "PREFETCH", True)
    dout, kw = _with_grads(rng, _inputs(rng, np.float32, B=2, Dm=6, L=7, N=4, G=2, bform="BNL", cform="grouped",
                                        segments=2), np.float32)
    got = nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="cuda")
    _compare(got, selective_scan_backward_ref(dout, **kw, delta_softplus=True), kw, np.float32)


@pytest.mark.sim
def test_sim_backward_device_arrays_no_options(rng):
    from numba import cuda

    dout, kw = _with_grads(rng, _inputs(rng, np.float64, B=1, Dm=3, L=5, N=2, bform="BNL", cform="BNL"),
                           np.float64)
    for k in ("D", "z", "delta_bias", "initial_state", "seq_idx", "dlast_state"):
        kw[k] = None
    dev = {k: cuda.to_device(v) for k, v in kw.items() if v is not None}
    got = nk.selective_scan_backward(cuda.to_device(dout), **dev)
    assert all(hasattr(g, "copy_to_host") for g in got if g is not None)
    ref = selective_scan_backward_ref(dout, **kw)
    _compare([None if g is None else g.copy_to_host() for g in got], ref, kw, np.float64)


# ---- the CPU kernel's segmented path (rows longer than BWD_SEG_MAX) and its 8-state register blocks --------
SEG_CASES = [(30, 7, 11, "BNL", "const"), (30, 7, 16, "grouped", "BNL"), (1, 7, 8, "const", "grouped"),
             (21, 7, 9, "const", "const"), (16, 16, 3, "BNL", "grouped")]


@pytest.mark.parametrize("L,seg,N,bform,cform", SEG_CASES,
                         ids=[f"L{l}-seg{s}-N{n}-B{b}-C{c}" for l, s, n, b, c in SEG_CASES])
def test_cpu_segments_and_state_blocks(rng, monkeypatch, L, seg, N, bform, cform):
    # L 30 / seg 7: four full segments and a partial one (recomputed from checkpoints); L 21: a multiple;
    # N 8 / 9 / 11 / 16: blocks of 8 states, with and without the one-state remainder
    from numba_kernels.cpu import selective_scan as cpu_ss

    monkeypatch.setattr(cpu_ss, "BWD_SEG_MAX", seg)
    dout, kw = _with_grads(rng, _inputs(rng, np.float64, B=2, Dm=6, L=L, N=N, G=3, bform=bform, cform=cform,
                                        segments=3), np.float64)
    got = nk.selective_scan_backward(dout, **kw, delta_softplus=True, backend="cpu")
    _compare(got, selective_scan_backward_ref(dout, **kw, delta_softplus=True), kw, np.float64)
    # float32 without softplus (dt = delta + bias kept > 0 so the state decays)
    kw = dict(kw, delta=np.abs(kw["delta"]), delta_bias=np.abs(kw["delta_bias"]))
    kw32 = {k: (v.astype(np.float32) if k in ("u", "delta", "z") or (k in ("B", "C") and v.ndim > 2) else v)
            for k, v in kw.items()}
    got32 = nk.selective_scan_backward(dout.astype(np.float32), **kw32, delta_softplus=False, backend="cpu")
    ref32 = selective_scan_backward_ref(dout.astype(np.float32), **kw32, delta_softplus=False)
    for name, g, r in zip(NAMES, got32, ref32):
        assert max_err(g.astype(np.float64), r) < 2e-5, name
