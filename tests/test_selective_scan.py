"""selective_scan / selective_state_update: CPU against the float64 reference on odd sizes, every option,
every B / C form and dtype; the reference against itself (scan == decode steps, seq_idx == separate
sequences, state chaining); bad inputs; and the CUDA kernels under the simulator (tiny shapes, ``-m sim``)."""
import itertools

import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels._dispatch import bfloat16
from numba_kernels.reference.selective_scan import selective_scan_ref, selective_state_update_ref
from tests.conftest import DTYPES, TOL, dtype_id, max_err

FORMS = ("const", "BNL", "grouped")


def _bc(rng, form, dt, B, Dm, N, L, G):
    if form == "const":
        return rng.standard_normal((Dm, N)).astype(np.float32)
    if form == "BNL":
        return rng.standard_normal((B, N, L)).astype(dt)
    return rng.standard_normal((B, G, N, L)).astype(dt)


def _inputs(rng, dt, B=2, Dm=4, L=63, N=5, G=2, bform="grouped", cform="BNL", segments=3):
    """dict of every selective_scan input (mamba-like ranges: A < 0, delta around softplus's knee)."""
    seq = np.zeros((B, L), np.int32)
    for bb in range(B):
        cuts = np.sort(rng.integers(1, max(L, 2), size=segments - 1))
        seq[bb] = np.searchsorted(cuts, np.arange(L), side="right")
    return dict(u=rng.standard_normal((B, Dm, L)).astype(dt),
                delta=(0.5 * rng.standard_normal((B, Dm, L))).astype(dt),
                A=-np.exp(0.5 * rng.standard_normal((Dm, N))).astype(np.float32),
                B=_bc(rng, bform, dt, B, Dm, N, L, G), C=_bc(rng, cform, dt, B, Dm, N, L, G),
                D=rng.standard_normal(Dm).astype(np.float32), z=rng.standard_normal((B, Dm, L)).astype(dt),
                delta_bias=(0.5 * rng.standard_normal(Dm)).astype(np.float32),
                initial_state=rng.standard_normal((B, Dm, N)).astype(np.float32), seq_idx=seq)


def _check(out, ref, dt, what):
    assert out.dtype == np.dtype(dt), f"{what}: dtype {out.dtype} != {np.dtype(dt)}"
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    err = max_err(out.astype(np.float64), ref)
    assert err < TOL[np.dtype(dt)], f"{what}: err {err:.2e}"


def _run(kw, backend="cpu", **extra):
    kw = dict(kw, **extra)
    got = nk.selective_scan(**kw, delta_softplus=True, return_last_state=True, backend=backend)
    ref = selective_scan_ref(**kw, delta_softplus=True, return_last_state=True)
    return got, ref


SHAPES = [(L, bf, cf) for L in (1, 63, 130, 1025) for bf in FORMS for cf in FORMS]


@pytest.mark.parametrize("L,bform,cform", SHAPES, ids=[f"L{l}-B{b}-C{c}" for l, b, c in SHAPES])
def test_forward_all_options(rng, L, bform, cform):
    kw = _inputs(rng, np.float32, B=2, Dm=6, L=L, N=5, G=3, bform=bform, cform=cform)
    (y, last), (yr, lr) = _run(kw)
    _check(y, yr, np.float32, "y")
    _check(last, lr, np.float32, "last_state")


OPTIONS = list(itertools.product((0, 1), repeat=6))


@pytest.mark.parametrize("D,z,bias,softplus,init,seq", OPTIONS,
                         ids=["D{}-z{}-bias{}-softplus{}-init{}-seq{}".format(*o) for o in OPTIONS])
def test_every_option_on_off(rng, D, z, bias, softplus, init, seq):
    kw = _inputs(rng, np.float64, L=63)
    for name, on in (("D", D), ("z", z), ("delta_bias", bias), ("initial_state", init), ("seq_idx", seq)):
        if not on:
            kw[name] = None
    for want_last in (False, True):
        got = nk.selective_scan(**kw, delta_softplus=bool(softplus), return_last_state=want_last, backend="cpu")
        ref = selective_scan_ref(**kw, delta_softplus=bool(softplus), return_last_state=want_last)
        for g, r in zip(got if want_last else (got,), ref if want_last else (ref,)):
            _check(g, r, np.float64, "forward")


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("L", [130, 1025], ids=["L130", "L1025"])
def test_dtypes(rng, dt, L):
    kw = _inputs(rng, dt, L=L)
    (y, last), (yr, lr) = _run(kw)
    _check(y, yr, dt, "y")
    _check(last, lr, np.float64 if np.dtype(dt) == np.float64 else np.float32, "last_state")
    # mamba's own rule for the low-precision outputs
    rtol, atol = {np.dtype(np.float16): (3e-3, 5e-3), bfloat16: (3e-2, 5e-2)}.get(np.dtype(dt), (6e-4, 2e-3))
    np.testing.assert_allclose(y.astype(np.float64), yr, rtol=rtol, atol=atol)


def test_softplus_threshold_and_large_delta(rng):
    kw = _inputs(rng, np.float32, L=40)
    kw["delta"] = (kw["delta"] * 40).astype(np.float32)  # values far beyond the threshold of 20, both signs
    (y, last), (yr, lr) = _run(kw)
    _check(y, yr, np.float32, "y")
    assert np.all(np.isfinite(y))


def _update_args(kw, t, H, P, G):
    """Token t of a scan's inputs in the multi-head update layout (channel d = h * P + p)."""
    B = kw["u"].shape[0]

    def tok(a):
        return np.ascontiguousarray(a[:, :, t]).reshape(B, H, P)

    def bc(M):
        return np.ascontiguousarray(M[..., t]).reshape(B, G, -1)

    return dict(x=tok(kw["u"]), dt=tok(kw["delta"]), A=kw["A"].reshape(H, P, -1), B=bc(kw["B"]), C=bc(kw["C"]),
                D=kw["D"].reshape(H, P), z=tok(kw["z"]), dt_bias=kw["delta_bias"].reshape(H, P))


@pytest.mark.parametrize("dt", [np.float32, bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["multihead", "singlehead"])
def test_scan_equals_update_steps(rng, dt, layout):
    B, H, P, N, L = 2, 4, 3, 6, 23
    G = 2 if layout == "multihead" else 1
    kw = _inputs(rng, dt, B=B, Dm=H * P, L=L, N=N, G=G, bform="grouped", cform="grouped")
    kw["seq_idx"] = None
    if layout == "singlehead":
        kw["B"], kw["C"] = kw["B"][:, 0], kw["C"][:, 0]  # (B, N, L)
    y, last = nk.selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="cpu")
    # a state pool larger than the batch, rows picked by state_batch_indices (fp32 state for every x dtype)
    pool = rng.standard_normal((B + 3, H, P, N)).astype(np.float32)
    sbi = np.array([4, 1], np.int32)
    pool[sbi] = kw["initial_state"].reshape(B, H, P, N)
    untouched = np.delete(pool, sbi, axis=0).copy()
    steps = []
    for t in range(L):
        a = _update_args(kw, t, H, P, G)
        if layout == "singlehead":  # state (Bs, Dm, N), x (B, Dm), A (Dm, N), B/C (B, N), D (Dm,)
            st = pool.reshape(B + 3, H * P, N)
            a = dict(x=a["x"].reshape(B, -1), dt=a["dt"].reshape(B, -1), A=kw["A"], B=a["B"][:, 0], C=a["C"][:, 0],
                     D=kw["D"], z=a["z"].reshape(B, -1), dt_bias=kw["delta_bias"])
        else:
            st = pool
        steps.append(nk.selective_state_update(st, **a, dt_softplus=True, state_batch_indices=sbi,
                                               backend="cpu").reshape(B, H * P))
    got = np.stack(steps, axis=2)
    assert got.dtype == np.dtype(dt)
    tol = 1e-5 if np.dtype(dt) == np.float32 else 2e-2  # bf16: both round y once
    np.testing.assert_allclose(got.astype(np.float64), y.astype(np.float64), rtol=tol, atol=tol)
    np.testing.assert_allclose(pool[sbi].reshape(B, H * P, N), last, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.delete(pool, sbi, axis=0), untouched)


@pytest.mark.parametrize("dt,sdt", [(np.float16, np.float16), (bfloat16, bfloat16), (np.float32, np.float64),
                                    (np.float64, np.float32)], ids=["f16-f16", "bf16-bf16", "f32-f64", "f64-f32"])
def test_update_state_dtypes(rng, dt, sdt):
    B, H, P, N, G = 3, 4, 5, 7, 2
    state = rng.standard_normal((B, H, P, N)).astype(sdt)
    sref = state.copy()
    a = dict(x=rng.standard_normal((B, H, P)).astype(dt), dt=rng.standard_normal((B, H, P)).astype(dt),
             A=-np.exp(rng.standard_normal((H, P, N))), B=rng.standard_normal((B, G, N)).astype(dt),
             C=rng.standard_normal((B, G, N)).astype(dt), D=rng.standard_normal((H, P)),
             z=rng.standard_normal((B, H, P)).astype(dt), dt_bias=rng.standard_normal((H, P)))
    y = nk.selective_state_update(state, **a, dt_softplus=True, backend="cpu")
    yr = selective_state_update_ref(sref, **a, dt_softplus=True)
    _check(y, yr, dt, "y")
    lo = TOL[np.dtype(sdt)] if np.dtype(sdt).itemsize == 2 else 1e-6
    np.testing.assert_allclose(state.astype(np.float64), sref.astype(np.float64), rtol=lo, atol=lo)


@pytest.mark.parametrize("lens", [(5, 1, 20), (2, 30), (26,)], ids=["5-1-20", "2-30", "26"])
def test_seq_idx_equals_separate_sequences(rng, lens):
    L = sum(lens)
    kw = _inputs(rng, np.float64, B=1, L=L)
    kw["seq_idx"] = np.repeat(np.arange(len(lens), dtype=np.int32) + 7, lens)[None]
    y, last = nk.selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="cpu")
    starts = np.concatenate([[0], np.cumsum(lens)])
    for i, (a, e) in enumerate(zip(starts[:-1], starts[1:])):
        part = {k: (v[..., a:e] if k in ("u", "delta", "z") or (k in ("B", "C") and v.ndim > 2) else v)
                for k, v in kw.items()}
        part["seq_idx"] = None
        part["initial_state"] = kw["initial_state"] if i == 0 else None  # zero state after a boundary
        yi, li = nk.selective_scan(**part, delta_softplus=True, return_last_state=True, backend="cpu")
        np.testing.assert_allclose(y[:, :, a:e], yi, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last, li, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("L1,L2", [(1, 62), (40, 90)], ids=["1+62", "40+90"])
def test_last_state_chaining(rng, L1, L2):
    kw = _inputs(rng, np.float32, L=L1 + L2)
    kw["seq_idx"] = None
    y, last = nk.selective_scan(**kw, return_last_state=True, backend="cpu")

    def cut(a, b):
        return {k: (v[..., a:b] if k in ("u", "delta", "z") or (k in ("B", "C") and v.ndim > 2) else v)
                for k, v in kw.items()}

    k1 = cut(0, L1)
    y1, s1 = nk.selective_scan(**k1, return_last_state=True, backend="cpu")
    k2 = dict(cut(L1, L1 + L2), initial_state=s1)
    y2, s2 = nk.selective_scan(**k2, return_last_state=True, backend="cpu")
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=2), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s2, last, rtol=1e-5, atol=1e-5)


def test_inputs_not_modified_and_reference_backend(rng):
    kw = _inputs(rng, np.float16, L=30, cform="grouped")
    copies = {k: v.copy() for k, v in kw.items()}
    y = nk.selective_scan(**kw, delta_softplus=True, backend="cpu")
    yr = nk.selective_scan(**kw, delta_softplus=True, backend="reference")
    assert yr.dtype == np.float16 and max_err(y, yr.astype(np.float64)) < TOL[np.dtype(np.float16)]
    for k, v in kw.items():
        np.testing.assert_array_equal(v, copies[k], err_msg=k)
    a = _update_args(kw, 3, 2, 2, 2)
    for backend in ("cpu", "reference"):
        st = rng.standard_normal((2, 2, 2, 5)).astype(np.float32)
        st0 = st.copy()
        cp = {k: v.copy() for k, v in a.items()}
        nk.selective_state_update(st, **a, backend=backend)
        assert not np.array_equal(st, st0), f"{backend}: state not updated in place"
        for k, v in a.items():
            np.testing.assert_array_equal(v, cp[k], err_msg=k)


def _bad_scan(**kw):
    def call(rng):
        base = _inputs(rng, np.float32, B=2, Dm=4, L=9, N=5, G=2)
        return nk.selective_scan(**dict(base, **{k: (v(base) if callable(v) else v) for k, v in kw.items()}))
    return call


def _bad_update(**kw):
    def call(rng):
        base = dict(state=np.zeros((2, 4, 3, 5), np.float32), x=np.ones((2, 4, 3), np.float32),
                    dt=np.ones((2, 4, 3), np.float32), A=-np.ones((4, 3, 5), np.float32),
                    B=np.ones((2, 2, 5), np.float32), C=np.ones((2, 2, 5), np.float32))
        return nk.selective_state_update(**dict(base, **kw))
    return call


BAD = [
    ("u 2-D", _bad_scan(u=lambda b: b["u"][0]), ValueError, "u must have 3 dimensions"),
    ("u int", _bad_scan(u=lambda b: b["u"].astype(np.int32)), TypeError, "u must have dtype"),
    ("u list", _bad_scan(u=lambda b: b["u"].tolist()), TypeError, "u must be a numpy"),
    ("delta dtype", _bad_scan(delta=lambda b: b["delta"].astype(np.float64)), TypeError,
     "delta must have the same dtype as u"),
    ("delta shape", _bad_scan(delta=lambda b: b["delta"][:, :, :8]), ValueError, "delta must have shape (2, 4, 9)"),
    ("A shape", _bad_scan(A=lambda b: b["A"][:3]), ValueError, "A must have shape (4, N)"),
    ("B shape", _bad_scan(B=lambda b: b["B"][..., :8]), ValueError, "B must have shape (4, 5), (2, 5, 9)"),
    ("B groups", _bad_scan(B=lambda b: np.zeros((2, 3, 5, 9), np.float32)), ValueError,
     "groups G=3 must divide Dm=4"),
    ("C dtype", _bad_scan(C=lambda b: b["C"].astype(np.float16)), TypeError, "C (time-varying) must have the same dtype"),
    ("C 5-D", _bad_scan(C=lambda b: b["C"][None]), ValueError, "C must have shape"),
    ("D shape", _bad_scan(D=np.ones(3, np.float32)), ValueError, "D must have shape (4,)"),
    ("z dtype", _bad_scan(z=lambda b: b["z"].astype(np.float64)), TypeError, "z must have the same dtype as u"),
    ("delta_bias shape", _bad_scan(delta_bias=np.ones((4, 1), np.float32)), ValueError,
     "delta_bias must have 1 dimensions"),
    ("initial_state shape", _bad_scan(initial_state=np.ones((2, 4, 4), np.float32)), ValueError,
     "initial_state must have shape (2, 4, 5)"),
    ("seq dtype", _bad_scan(seq_idx=np.zeros((2, 9))), TypeError, "seq_idx must have an integer"),
    ("seq shape", _bad_scan(seq_idx=np.zeros((2, 8), np.int32)), ValueError, "seq_idx must have shape (2, 9)"),
    ("backend", _bad_scan(backend="gpu"), ValueError, "backend must be one of"),
    ("update state 2-D", _bad_update(state=np.zeros((2, 5), np.float32)), ValueError,
     "state must have shape (B, Dm, N) or (B, H, P, N)"),
    ("update x shape", _bad_update(x=np.ones((2, 4, 2), np.float32)), ValueError, "x must have shape (2, 4, 3)"),
    ("update dt dtype", _bad_update(dt=np.ones((2, 4, 3))), TypeError, "dt must have the same dtype as x"),
    ("update A shape", _bad_update(A=np.ones((4, 3, 4), np.float32)), ValueError, "A must have shape (4, 3, 5)"),
    ("update B groups", _bad_update(B=np.ones((2, 3, 5), np.float32)), ValueError, "G=3 must divide H=4"),
    ("update C shape", _bad_update(C=np.ones((2, 1, 5), np.float32)), ValueError, "C must have shape (2, 2, 5)"),
    ("update D shape", _bad_update(D=np.ones(4, np.float32)), ValueError, "D must have 2 dimensions"),
    ("update state rows", _bad_update(state=np.zeros((3, 4, 3, 5), np.float32)), ValueError,
     "state must have 2 rows"),
    ("update sbi range", _bad_update(state_batch_indices=np.array([0, 2], np.int32)), ValueError,
     "state_batch_indices must be in [0, 2)"),
    ("update sbi dtype", _bad_update(state_batch_indices=np.array([0.0, 1.0])), TypeError,
     "state_batch_indices must have an integer"),
]


@pytest.mark.parametrize("name,call,err,msg", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(rng, name, call, err, msg):
    with pytest.raises(err) as ei:
        call(rng)
    assert msg in str(ei.value)


# ---- the CUDA kernels under the simulator (NUMBA_ENABLE_CUDASIM=1; tiny shapes, NT = TL = 4) ----------
# Dm = 6 spans two channel blocks (the second one partial), L = 7 two time tiles.
@pytest.mark.sim
@pytest.mark.parametrize("dt,bform,cform", [(np.float32, "grouped", "BNL"), (np.float16, "const", "grouped"),
                                            (bfloat16, "BNL", "const")], ids=["f32", "f16", "bf16"])
def test_sim_forward(rng, dt, bform, cform):
    kw = _inputs(rng, dt, B=1, Dm=6, L=7, N=3, G=2, bform=bform, cform=cform, segments=2)
    (y, last), (yr, lr) = _run(kw, backend="cuda")
    _check(y, yr, dt, "y")
    _check(last, lr, np.float32, "last_state")


@pytest.mark.sim
@pytest.mark.parametrize("G,bform,cform", [(1, "BNL", "grouped"), (3, "grouped", "const")],
                         ids=["G1-BNL-grouped", "G3-grouped-const"])
def test_sim_forward_state_split(rng, G, bform, cform):
    # N = 4: Q = 4 lanes per channel (shuffle sums); Dm 12 over blocks of 8 channels, or 3 groups of 4
    kw = _inputs(rng, np.float32, B=2, Dm=12, L=9, N=4, G=G, bform=bform, cform=cform, segments=3)
    (y, last), (yr, lr) = _run(kw, backend="cuda")
    _check(y, yr, np.float32, "y")
    _check(last, lr, np.float32, "last_state")


@pytest.mark.sim
@pytest.mark.parametrize("dt", [np.float32, bfloat16], ids=dtype_id)
def test_sim_update(rng, dt):
    B, H, P, N, G = 2, 2, 3, 3, 2
    kw = _inputs(rng, dt, B=B, Dm=H * P, L=2, N=N, G=G, cform="grouped")
    a = _update_args(kw, 1, H, P, G)
    state = rng.standard_normal((B + 1, H, P, N)).astype(np.float32)
    sref = state.copy()
    sbi = np.array([2, 0], np.int32)
    y = nk.selective_state_update(state, **a, dt_softplus=True, state_batch_indices=sbi, backend="cuda")
    _check(y, selective_state_update_ref(sref, **a, dt_softplus=True, state_batch_indices=sbi), dt, "y")
    np.testing.assert_allclose(state, sref, rtol=1e-6, atol=1e-6)


@pytest.mark.sim
def test_sim_device_arrays(rng):
    from numba import cuda

    kw = _inputs(rng, np.float64, B=1, Dm=4, L=5, N=2, G=1, bform="BNL")
    for k in ("D", "z", "delta_bias", "initial_state", "seq_idx"):  # float64 with every option off
        kw[k] = None
    dev = {k: cuda.to_device(v) for k, v in kw.items() if v is not None}
    y, last = nk.selective_scan(**dev, return_last_state=True)
    assert hasattr(y, "copy_to_host") and hasattr(last, "copy_to_host")
    yr, lr = selective_scan_ref(**kw, return_last_state=True)
    _check(y.copy_to_host(), yr, np.float64, "y")
    _check(last.copy_to_host(), lr, np.float64, "last_state")
    kw = _inputs(rng, np.float32, B=1, Dm=4, L=5, N=2, G=1, bform="BNL")
    # single-head decode step on a device state: updated in place on the device
    st = rng.standard_normal((1, 4, 2)).astype(np.float32)
    sref = st.copy()
    a = dict(x=kw["u"][:, :, 0].copy(), dt=kw["delta"][:, :, 0].copy(), A=kw["A"], B=kw["B"][:, :, 0].copy(),
             C=kw["C"][:, :, 0].copy(), D=kw["D"])
    sd = cuda.to_device(st)
    yd = nk.selective_state_update(sd, **{k: cuda.to_device(v) for k, v in a.items()})
    assert hasattr(yd, "copy_to_host") and yd.shape == (1, 4)
    _check(yd.copy_to_host(), selective_state_update_ref(sref, **a), np.float32, "update y")
    np.testing.assert_allclose(sd.copy_to_host(), sref, rtol=1e-6, atol=1e-6)


@pytest.mark.sim
@pytest.mark.parametrize("dt,L,pm,fg", [(np.float32, 16, 2, False), (bfloat16, 16, 3, True), (np.float16, 9, 1, False)],
                         ids=["f32-L16-poly2", "bf16-L16-poly3-tanhgate", "f16-L9-poly1"])
def test_sim_forward_unaligned_and_variants(rng, dt, L, pm, fg):
    # device rows starting off a 16-byte boundary (padded copies), and the polynomial-exp / tanh-gate kernels
    from numba import cuda

    from numba_kernels.cuda.selective_scan import scan_fwd_cuda

    kw = _inputs(rng, dt, B=1, Dm=4, L=L, N=4, G=2, bform="grouped", cform="BNL", segments=2)

    def dev(a):  # a device copy one element into a larger buffer: its address is not 16-byte aligned
        if a.dtype.kind != "f" and a.dtype != bfloat16:
            return cuda.to_device(a)
        bits = a.view(np.uint16) if a.dtype == bfloat16 else a
        buf = cuda.to_device(np.concatenate([bits.reshape(-1)[:1], bits.reshape(-1)]))
        return buf[1:].reshape(a.shape)

    d = {k: dev(v) for k, v in kw.items()}
    y, last = scan_fwd_cuda(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], d["delta_bias"],
                            d["initial_state"], d["seq_idx"], True, True, dt, pm=pm, fg=fg)
    yr, lr = selective_scan_ref(**kw, delta_softplus=True, return_last_state=True)
    yh = y.copy_to_host()
    _check(yh.view(bfloat16) if dt == bfloat16 else yh, yr, dt, "y")
    _check(last.copy_to_host(), lr, np.float32, "last_state")
