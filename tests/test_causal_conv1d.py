"""causal_conv1d / causal_conv1d_update / causal_conv1d_backward: CPU against the float64 reference,
the reference against finite differences and against itself (scan == decode steps, seq_idx == separate
sequences), bad inputs; and the CUDA kernels under the simulator (tiny shapes, ``-m sim``)."""
import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels._dispatch import bfloat16
from numba_kernels.reference.causal_conv1d import (causal_conv1d_backward_ref, causal_conv1d_ref,
                                                    causal_conv1d_update_ref)
from tests.conftest import DTYPES, TOL, dtype_id, max_err


def _inputs(rng, dt, B, D, L, W, bias=True, init=True, seq=True, segments=3):
    """x (B, D, L), weight (D, W), bias (D,), init (B, D, W-1), seq_idx (B, L) non-decreasing, random cuts."""
    x = rng.standard_normal((B, D, L)).astype(dt)
    w = (rng.standard_normal((D, W)) / np.sqrt(W)).astype(dt)
    b = rng.standard_normal(D).astype(dt) if bias else None
    s0 = rng.standard_normal((B, D, W - 1)).astype(dt) if init else None
    sq = None
    if seq:
        sq = np.zeros((B, L), np.int32)
        for bb in range(B):
            cuts = np.sort(rng.integers(0, L, size=segments - 1))
            sq[bb] = np.searchsorted(cuts, np.arange(L), side="right")
    return x, w, b, s0, sq


def _check(out, ref, dt, what):
    assert out.dtype == np.dtype(dt), f"{what}: dtype {out.dtype} != {np.dtype(dt)}"
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    if ref.size == 0:
        return
    err = max_err(out.astype(np.float64), ref)
    assert err < TOL[np.dtype(dt)], f"{what}: err {err:.2e}"


SHAPES = [(2, 3, L, W) for L in (1, 63, 130, 1025) for W in (1, 2, 4, 7)]


@pytest.mark.parametrize("B,D,L,W", SHAPES, ids=[f"B{b}-D{d}-L{l}-W{w}" for b, d, l, w in SHAPES])
def test_forward_backward_all_options(rng, B, D, L, W):
    x, w, b, s0, sq = _inputs(rng, np.float32, B, D, L, W)
    out, fin = nk.causal_conv1d(x, w, b, "silu", s0, True, sq, backend="cpu")
    ref, rfin = causal_conv1d_ref(x, w, b, "silu", s0, True, sq)
    _check(out, ref, np.float32, "out")
    _check(fin, rfin, np.float32, "final_states")
    dout = rng.standard_normal(x.shape).astype(np.float32)
    dfin = rng.standard_normal(s0.shape).astype(np.float32)
    got = nk.causal_conv1d_backward(dout, x, w, b, "silu", s0, dfin, sq, backend="cpu")
    exp = causal_conv1d_backward_ref(dout, x, w, b, "silu", s0, dfin, sq)
    for name, g, e in zip(("dx", "dweight", "dbias", "dinitial_states"), got, exp):
        _check(g, e, np.float32, name)


OPTIONS = [(bias, act, init, fin, seq) for bias in (False, True) for act in (None, "swish")
           for init in (False, True) for fin in (False, True) for seq in (False, True)]


@pytest.mark.parametrize("bias,act,init,fin,seq", OPTIONS,
                         ids=[f"bias{int(o[0])}-{o[1]}-init{int(o[2])}-final{int(o[3])}-seq{int(o[4])}" for o in OPTIONS])
def test_every_option_on_off(rng, bias, act, init, fin, seq):
    x, w, b, s0, sq = _inputs(rng, np.float64, 2, 5, 63, 4, bias, init, seq)
    res = nk.causal_conv1d(x, w, b, act, s0, fin, sq, backend="cpu")
    exp = causal_conv1d_ref(x, w, b, act, s0, fin, sq)
    for r, e in zip(res if fin else (res,), exp if fin else (exp,)):
        _check(r, e, np.float64, "forward")
    dout = rng.standard_normal(x.shape)
    dfin = rng.standard_normal((2, 5, 3)) if fin else None
    got = nk.causal_conv1d_backward(dout, x, w, b, act, s0, dfin, sq, backend="cpu")
    ref = causal_conv1d_backward_ref(dout, x, w, b, act, s0, dfin, sq)
    for g, e in zip(got, ref):
        assert (g is None) == (e is None)
        if e is not None:
            _check(g, e, np.float64, "backward")


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("L,W", [(130, 4), (1025, 7)], ids=["L130-W4", "L1025-W7"])
def test_dtypes(rng, dt, L, W):
    x, w, b, s0, sq = _inputs(rng, dt, 2, 4, L, W)
    out, fin = nk.causal_conv1d(x, w, b, "silu", s0, True, sq, backend="cpu")
    ref, rfin = causal_conv1d_ref(x, w, b, "silu", s0, True, sq)
    _check(out, ref, dt, "out")
    _check(fin, rfin, dt, "final_states")
    dout = rng.standard_normal(x.shape).astype(dt)
    dfin = rng.standard_normal(s0.shape).astype(dt)
    got = nk.causal_conv1d_backward(dout, x, w, b, "silu", s0, dfin, sq, backend="cpu")
    for name, g, e in zip(("dx", "dweight", "dbias", "dinit"), got,
                          causal_conv1d_backward_ref(dout, x, w, b, "silu", s0, dfin, sq)):
        _check(g, e, dt, name)
    state = rng.standard_normal((2, 4, W + 2)).astype(dt)
    st_ref = state.copy()
    xn = x[:, :, :3]
    _check(nk.causal_conv1d_update(xn, state, w, b, "silu", backend="cpu"),
           causal_conv1d_update_ref(xn, st_ref, w, b, "silu"), dt, "update")
    np.testing.assert_array_equal(state.view(np.uint8), st_ref.view(np.uint8))


def test_weight_dtype_may_differ_from_x(rng):
    x, w, b, _, _ = _inputs(rng, bfloat16, 1, 3, 40, 4, init=False, seq=False)
    w32, b32 = w.astype(np.float32), b.astype(np.float32)
    out = nk.causal_conv1d(x, w32, b32, backend="cpu")
    _check(out, causal_conv1d_ref(x, w32, b32), bfloat16, "out")
    _, dw, db, _ = nk.causal_conv1d_backward(np.ones_like(x), x, w32, b32, backend="cpu")
    assert dw.dtype == np.float32 and db.dtype == np.float32


def test_reference_backward_matches_finite_differences(rng):
    B, D, L, W = 2, 2, 6, 3
    x, w, b, s0, _ = _inputs(rng, np.float64, B, D, L, W, seq=False)
    sq = np.array([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]], np.int32)  # short last segment in row 0
    dout = rng.standard_normal(x.shape)
    dfin = rng.standard_normal(s0.shape)

    def loss(x_, w_, b_, s0_):
        out, fin = causal_conv1d_ref(x_, w_, b_, "silu", s0_, True, sq)
        return float(np.sum(out * dout) + np.sum(fin * dfin))

    grads = causal_conv1d_backward_ref(dout, x, w, b, "silu", s0, dfin, sq)
    args = [x, w, b, s0]
    eps = 1e-6
    for i, (a, g) in enumerate(zip(args, grads)):
        num = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            up = [c.copy() for c in args]
            dn = [c.copy() for c in args]
            up[i][idx] += eps
            dn[i][idx] -= eps
            num[idx] = (loss(*up) - loss(*dn)) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-7, err_msg=f"argument {i}")
    assert np.any(grads[3] != 0)  # the initial state reaches the first segment


@pytest.mark.parametrize("W,S", [(1, 0), (4, 3), (4, 6), (7, 9)], ids=["W1-S0", "W4-S3", "W4-S6", "W7-S9"])
@pytest.mark.parametrize("chunk", [1, 5], ids=["step1", "step5"])
def test_scan_equals_decode_steps(rng, W, S, chunk):
    B, D, L = 2, 3, 23
    x, w, b, s0, _ = _inputs(rng, np.float32, B, D, L, W, seq=False)
    full, fin = nk.causal_conv1d(x, w, b, "silu", s0, True, backend="cpu")
    state = np.concatenate([rng.standard_normal((B, D, S - (W - 1))).astype(np.float32), s0], axis=2)
    cs = 11  # circular buffer: the window of the first token sits just before position cs
    ring = np.zeros((B, D, max(S, 1)), np.float32)
    for k in range(W - 1):
        ring[:, :, (cs - (W - 1) + k) % ring.shape[2]] = s0[:, :, k]
    steps, rsteps = [], []
    for t0 in range(0, L, chunk):
        xt = x[:, :, t0:t0 + chunk]
        xt = xt[:, :, 0] if chunk == 1 else xt
        steps.append(nk.causal_conv1d_update(xt, state, w, b, "silu", backend="cpu").reshape(B, D, -1))
        seqlens = np.full(B, cs + t0, np.int32)
        rsteps.append(nk.causal_conv1d_update(xt, ring, w, b, "silu", seqlens, backend="cpu").reshape(B, D, -1))
    for got in (steps, rsteps):
        np.testing.assert_allclose(np.concatenate(got, axis=2), full, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state[:, :, S - (W - 1):], fin)  # the state ends as final_states
    np.testing.assert_array_equal(state[:, :, :S], np.concatenate([s0, x], axis=2)[:, :, -S:] if S else state)


def test_update_reference_matches_causal_conv1d_semantics(rng):
    """Circular buffer with Lnew > S: the last write wins, the window is read before writing."""
    x, w, b, _, _ = _inputs(rng, np.float64, 1, 2, 5, 3, init=False, seq=False)
    state = rng.standard_normal((1, 2, 4))
    before = state.copy()
    out = causal_conv1d_update_ref(x, state, w, b, None, np.array([6], np.int32))
    window = before[:, :, [0, 1]]  # (6 - 2) % 4, (6 - 1) % 4
    np.testing.assert_allclose(out, causal_conv1d_ref(x, w, b, initial_states=window))
    # token i goes to (6 + i) % 4 = 2, 3, 0, 1, 2: token 4 overwrote token 0
    np.testing.assert_array_equal(state[0], x[0][:, [2, 3, 4, 1]])


@pytest.mark.parametrize("lens", [(5, 1, 20), (2, 30), (26,)], ids=["5-1-20", "2-30", "26"])
def test_seq_idx_equals_separate_sequences(rng, lens):
    W, D = 4, 3
    L = sum(lens)
    x, w, b, s0, _ = _inputs(rng, np.float64, 1, D, L, W, seq=False)
    sq = np.repeat(np.arange(len(lens), dtype=np.int32) + 7, lens)[None]
    out, fin = nk.causal_conv1d(x, w, b, "silu", s0, True, sq, backend="cpu")
    dout, dfin = rng.standard_normal(x.shape), rng.standard_normal(s0.shape)
    dx, dw, db, dinit = nk.causal_conv1d_backward(dout, x, w, b, "silu", s0, dfin, sq, backend="cpu")
    starts = np.concatenate([[0], np.cumsum(lens)])
    sw, sdinit = np.zeros_like(w), None
    for i, (a, e) in enumerate(zip(starts[:-1], starts[1:])):
        first, last = i == 0, i == len(lens) - 1
        init_i = s0 if first else None
        o, f = nk.causal_conv1d(x[:, :, a:e], w, b, "silu", init_i, True, backend="cpu")
        np.testing.assert_allclose(out[:, :, a:e], o, rtol=1e-12, atol=1e-12)
        g = nk.causal_conv1d_backward(dout[:, :, a:e], x[:, :, a:e], w, b, "silu", init_i,
                                      dfin if last else None, backend="cpu")
        np.testing.assert_allclose(dx[:, :, a:e], g[0], rtol=1e-12, atol=1e-12)
        sw += g[1]
        if first:
            sdinit = g[3]
        if last:
            np.testing.assert_allclose(fin, f, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, sw, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dinit, sdinit, rtol=1e-12, atol=1e-12)


def test_inputs_not_modified_and_reference_backend(rng):
    x, w, b, s0, sq = _inputs(rng, np.float16, 2, 3, 30, 4)
    copies = [a.copy() for a in (x, w, b, s0, sq)]
    out = nk.causal_conv1d(x, w, b, "silu", s0, False, sq, backend="cpu")
    ref = nk.causal_conv1d(x, w, b, "silu", s0, False, sq, backend="reference")
    assert ref.dtype == np.float16 and max_err(out, ref.astype(np.float64)) < TOL[np.dtype(np.float16)]
    nk.causal_conv1d_backward(out, x, w, b, "silu", s0, s0, sq, backend="cpu")
    for a, c in zip((x, w, b, s0, sq), copies):
        np.testing.assert_array_equal(a, c)


BAD = [
    ("x 2-D", lambda x, w: nk.causal_conv1d(x[0], w), ValueError, "x must have 3 dimensions"),
    ("x int", lambda x, w: nk.causal_conv1d(x.astype(np.int32), w), TypeError, "x must have dtype"),
    ("x list", lambda x, w: nk.causal_conv1d(x.tolist(), w), TypeError, "x must be a numpy"),
    ("weight D", lambda x, w: nk.causal_conv1d(x, w[:2]), ValueError, "weight must have shape (3, W)"),
    ("weight W0", lambda x, w: nk.causal_conv1d(x, w[:, :0]), ValueError, "W >= 1"),
    ("bias", lambda x, w: nk.causal_conv1d(x, w, np.ones(4, np.float32)), ValueError, "bias must have shape (3,)"),
    ("activation", lambda x, w: nk.causal_conv1d(x, w, activation="relu"), ValueError, "activation must be"),
    ("init dtype", lambda x, w: nk.causal_conv1d(x, w, initial_states=np.zeros((2, 3, 3))), TypeError,
     "initial_states must have the same dtype as x"),
    ("init shape", lambda x, w: nk.causal_conv1d(x, w, initial_states=np.zeros((2, 3, 4), np.float32)),
     ValueError, "initial_states must have shape (2, 3, 3)"),
    ("seq dtype", lambda x, w: nk.causal_conv1d(x, w, seq_idx=np.zeros((2, 9))), TypeError, "seq_idx must have an integer"),
    ("seq shape", lambda x, w: nk.causal_conv1d(x, w, seq_idx=np.zeros((2, 8), np.int32)), ValueError,
     "seq_idx must have shape (2, 9)"),
    ("backend", lambda x, w: nk.causal_conv1d(x, w, backend="gpu"), ValueError, "backend must be one of"),
    ("update x 4-D", lambda x, w: nk.causal_conv1d_update(x[None], np.zeros((2, 3, 3), np.float32), w), ValueError,
     "x must have shape (B, D) or (B, D, Lnew)"),
    ("state short", lambda x, w: nk.causal_conv1d_update(x, np.zeros((2, 3, 2), np.float32), w), ValueError,
     "S >= W - 1 = 3"),
    ("state dtype", lambda x, w: nk.causal_conv1d_update(x, np.zeros((2, 3, 3)), w), TypeError,
     "conv_state must have the same dtype as x"),
    ("seqlens <0", lambda x, w: nk.causal_conv1d_update(x, np.zeros((2, 3, 3), np.float32), w,
                                                        cache_seqlens=np.array([0, -1], np.int32)), ValueError,
     "cache_seqlens must be >= 0"),
    ("seqlens shape", lambda x, w: nk.causal_conv1d_update(x, np.zeros((2, 3, 3), np.float32), w,
                                                           cache_seqlens=np.zeros(3, np.int32)), ValueError,
     "cache_seqlens must have shape (2,)"),
    ("dout shape", lambda x, w: nk.causal_conv1d_backward(x[:, :, :4], x, w), ValueError, "dout must have shape"),
    ("dfinal dtype", lambda x, w: nk.causal_conv1d_backward(x, x, w, dfinal_states=np.zeros((2, 3, 3))), TypeError,
     "dfinal_states must have the same dtype"),
]


@pytest.mark.parametrize("name,call,err,msg", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(rng, name, call, err, msg):
    x = rng.standard_normal((2, 3, 9)).astype(np.float32)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(err) as ei:
        call(x, w)
    assert msg in str(ei.value)


# ---- the CUDA kernels under the simulator (NUMBA_ENABLE_CUDASIM=1; tiny shapes, TL = NT = 8) ----------
@pytest.mark.sim
@pytest.mark.parametrize("dt", [np.float32, np.float16, bfloat16], ids=dtype_id)
def test_sim_forward(rng, dt):
    # L = 13 spans two 8-output tiles; seq_idx cuts inside the first tile's halo
    x, w, b, s0, sq = _inputs(rng, dt, 2, 2, 13, 4)
    out, fin = nk.causal_conv1d(x, w, b, "silu", s0, True, sq, backend="cuda")
    ref, rfin = causal_conv1d_ref(x, w, b, "silu", s0, True, sq)
    _check(out, ref, dt, "out")
    _check(fin, rfin, dt, "final_states")


@pytest.mark.sim
@pytest.mark.parametrize("dt", [np.float32, bfloat16], ids=dtype_id)
def test_sim_backward(rng, dt):
    x, w, b, s0, sq = _inputs(rng, dt, 2, 2, 13, 4)
    sq[0, 2:] += 1  # a segment boundary inside the initial-state taps
    dout = rng.standard_normal(x.shape).astype(dt)
    dfin = rng.standard_normal(s0.shape).astype(dt)
    got = nk.causal_conv1d_backward(dout, x, w, b, "silu", s0, dfin, sq, backend="cuda")
    exp = causal_conv1d_backward_ref(dout, x, w, b, "silu", s0, dfin, sq)
    for name, g, e in zip(("dx", "dweight", "dbias", "dinit"), got, exp):
        _check(g, e, dt, name)


@pytest.mark.sim
def test_sim_update_and_device_arrays(rng):
    from numba import cuda

    B, D, W, S = 1, 3, 3, 4
    x, w, b, s0, _ = _inputs(rng, np.float32, B, D, 5, W, seq=False)
    state = rng.standard_normal((B, D, S)).astype(np.float32)
    st_ref = state.copy()
    out = nk.causal_conv1d_update(x, state, w, b, "silu", np.array([6], np.int32), backend="cuda")
    _check(out, causal_conv1d_update_ref(x, st_ref, w, b, "silu", np.array([6], np.int32)), np.float32, "circular")
    np.testing.assert_array_equal(state, st_ref)
    dstate = cuda.to_device(state)
    o = nk.causal_conv1d_update(cuda.to_device(np.ascontiguousarray(x[:, :, 0])), dstate, cuda.to_device(w), cuda.to_device(b))
    assert hasattr(o, "copy_to_host") and o.shape == (B, D)
    _check(o.copy_to_host(), causal_conv1d_update_ref(x[:, :, 0], st_ref, w, b), np.float32, "device step")
    np.testing.assert_array_equal(dstate.copy_to_host(), st_ref)
    # W = 1 forward on device arrays
    x1, w1 = x, rng.standard_normal((D, 1)).astype(np.float32)
    o1 = nk.causal_conv1d(cuda.to_device(x1), cuda.to_device(w1))
    _check(o1.copy_to_host(), causal_conv1d_ref(x1, w1), np.float32, "W1 device")
