"""flash_attention_backward / flash_attention_varlen_backward: the float64 reference against central finite
differences, the CPU kernel against the reference for every option, odd sizes, GQA sums, varlen, dropout,
determinism, half precision (flash-attn's 3x rule), the call contract and bad inputs."""
import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels._dispatch import bfloat16
from numba_kernels.reference.flash_attention import flash_attention_ref, flash_attention_varlen_ref
from numba_kernels.reference.flash_attention_backward import (flash_attention_backward_ref,
                                                              flash_attention_varlen_backward_ref)
from tests.conftest import TOL, dtype_id, max_err

OPTIONS = [
    ("plain", lambda r, B, H: {}),
    ("causal", lambda r, B, H: dict(causal=True)),
    ("window", lambda r, B, H: dict(window_size=(3, 1))),
    ("window-left", lambda r, B, H: dict(window_size=(2, -1))),
    ("softcap", lambda r, B, H: dict(softcap=1.5)),
    ("alibi-H", lambda r, B, H: dict(alibi_slopes=r.random(H))),
    ("alibi-BH", lambda r, B, H: dict(alibi_slopes=r.random((B, H)), causal=True)),
    ("dropout", lambda r, B, H: dict(dropout_p=0.3, seed=1234)),
    ("scale", lambda r, B, H: dict(softmax_scale=-0.7)),
    ("all", lambda r, B, H: dict(causal=True, window_size=(4, -1), softcap=2.0, alibi_slopes=r.random(H),
                                 dropout_p=0.2, seed=7)),
]
OPT_IDS = [o[0] for o in OPTIONS]
# the same options at the sizes of the CPU tests (windows wide enough to cross tile edges)
BIG = dict(OPTIONS)
BIG.update({"window": lambda r, B, H: dict(window_size=(37, 5)), "window-left": lambda r, B, H: dict(window_size=(19, -1)),
            "softcap": lambda r, B, H: dict(softcap=4.0), "scale": lambda r, B, H: dict(softmax_scale=0.3),
            "all": lambda r, B, H: dict(causal=True, window_size=(40, -1), softcap=3.0, alibi_slopes=r.random(H),
                                        dropout_p=0.1, seed=7)})


def _inputs(rng, dt, B, Sq, Sk, H, Hk, D):
    q = rng.standard_normal((B, Sq, H, D)).astype(dt)
    k, v = (rng.standard_normal((B, Sk, Hk, D)).astype(dt) for _ in range(2))
    return q, k, v, rng.standard_normal((B, Sq, H, D)).astype(dt)


def _central_diff(loss, arrays, eps=1e-6):
    """Central finite differences of the scalar loss(*arrays) with respect to every element of each array."""
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            x0 = a[idx]
            a[idx] = x0 + eps
            lp = loss(*arrays)
            a[idx] = x0 - eps
            lm = loss(*arrays)
            a[idx] = x0
            g[idx] = (lp - lm) / (2 * eps)
        grads.append(g)
    return grads


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("opt", OPTIONS, ids=OPT_IDS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 4, 2, 3), (1, 6, 4, 2, 1, 3)], ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hk{}-D{}".format(*s))
def test_reference_against_finite_differences(rng, opt, shape):
    q, k, v, do = _inputs(rng, np.float64, *shape)
    kw = opt[1](rng, shape[0], shape[3])
    out, lse = flash_attention_ref(q, k, v, return_lse=True, **kw)
    got = flash_attention_backward_ref(do, q, k, v, out, lse, **kw)
    fd = _central_diff(lambda q, k, v: float((do * flash_attention_ref(q, k, v, **kw)).sum()), [q, k, v])
    for name, g, f in zip("qkv", got, fd):
        assert g.shape == f.shape, name
        np.testing.assert_allclose(g, f, rtol=1e-6, atol=1e-7, err_msg=f"d{name}")
    assert max(np.abs(g).max() for g in got) > 0.01  # the check is not vacuous


def test_varlen_reference_against_finite_differences(rng):
    cq, ck = np.array([0, 3, 3, 7], np.int32), np.array([0, 4, 6, 9], np.int32)
    q, do = (rng.standard_normal((7, 2, 3)) for _ in range(2))
    k, v = (rng.standard_normal((9, 1, 3)) for _ in range(2))
    kw = dict(causal=True, alibi_slopes=rng.random((3, 2)), softcap=2.0, dropout_p=0.25, seed=11)
    out, lse = flash_attention_varlen_ref(q, k, v, cq, ck, return_lse=True, **kw)
    got = flash_attention_varlen_backward_ref(do, q, k, v, out, lse, cq, ck, **kw)
    fd = _central_diff(lambda q, k, v: float((do * flash_attention_varlen_ref(q, k, v, cq, ck, **kw)).sum()),
                       [q, k, v])
    for g, f in zip(got, fd):
        np.testing.assert_allclose(g, f, rtol=1e-6, atol=1e-7)


def test_fully_masked_rows_give_zero_gradients(rng):
    # causal with Sq > Sk: the first Sq - Sk rows see no key (bottom-right alignment)
    q, k, v, do = _inputs(rng, np.float32, 1, 50, 20, 2, 1, 16)
    out, lse = nk.flash_attention(q, k, v, causal=True, return_lse=True, backend="cpu")
    for backend in ("cpu", "reference"):
        dq, dk, dv = nk.flash_attention_backward(do, q, k, v, out, lse, causal=True, backend=backend)
        assert all(np.isfinite(g).all() for g in (dq, dk, dv))
        np.testing.assert_array_equal(dq[0, :30], 0.0)
        assert np.abs(dq[0, 30:]).max() > 0 and np.abs(dk).max() > 0


# ---------------------------------------------------------------------------------------------- CPU vs reference
def _check_cpu(rng, dt, shape, kw, tol=None):
    q, k, v, do = _inputs(rng, dt, *shape)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    got = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
    ref = flash_attention_backward_ref(do, q, k, v, out, lse, **kw)
    for name, g, r, x in zip("qkv", got, ref, (q, k, v)):
        assert g.dtype == dt and g.shape == x.shape, name
        assert max_err(g, r) < (tol or TOL[np.dtype(dt)]), f"d{name}: {max_err(g, r)}"
    return got, ref


@pytest.mark.parametrize("opt", OPTIONS, ids=OPT_IDS)
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=dtype_id)
def test_cpu_options(rng, dt, opt):
    B, H = 2, 4
    _check_cpu(rng, dt, (B, 97, 113, H, 2, 40), BIG[opt[0]](rng, B, H))


@pytest.mark.parametrize("shape", [(1, 97, 113, 8, 1, 80), (1, 113, 97, 2, 2, 40), (2, 63, 63, 6, 3, 96),
                                   (3, 1, 200, 4, 4, 64), (1, 530, 600, 2, 1, 64), (1, 300, 1, 2, 2, 16)],
                         ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hk{}-D{}".format(*s))
@pytest.mark.parametrize("opt", ["plain", "causal", "all"])
def test_cpu_shapes(rng, shape, opt):
    """Odd sizes, several tiles per task (530 x 600 crosses the 256-row blocks), MQA, one query/one key."""
    _check_cpu(rng, np.float32, shape, BIG[opt](rng, shape[0], shape[3]))


@pytest.mark.parametrize("dt", [np.float16, bfloat16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_half_precision_flash_attn_rule(rng, dt, causal):
    """flash-attn's rule for gradients: the kernel's error is at most 3x that of the naive computation in
    the dtype (the same math on the rounded inputs in float32, rounded to dt)."""
    q, k, v, do = _inputs(rng, dt, 2, 97, 113, 4, 2, 64)
    out, lse = nk.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cpu")
    got = nk.flash_attention_backward(do, q, k, v, out, lse, causal=causal, backend="cpu")
    ref = flash_attention_backward_ref(do, q, k, v, out, lse, causal=causal)
    f32 = [x.astype(np.float32) for x in (do, q, k, v, out)]
    naive = flash_attention_backward_ref(*f32, lse, causal=causal)
    naive = [n.astype(np.float32).astype(dt).astype(np.float64) for n in naive]
    for name, g, r, n in zip("qkv", got, ref, naive):
        assert g.dtype == dt
        err, err_naive = np.abs(g.astype(np.float64) - r).max(), np.abs(n - r).max()
        assert err <= 3 * err_naive + 1e-6, f"d{name}: {err} vs naive {err_naive}"


def test_gqa_group_sums(rng):
    """dk, dv of a shared k/v head equal the sums over its query heads of the MHA gradients."""
    B, Sq, Sk, H, Hk, D = 1, 70, 90, 6, 2, 32
    q, k, v, do = _inputs(rng, np.float32, B, Sq, Sk, H, Hk, D)
    kw = dict(causal=True, dropout_p=0.2, seed=3)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    dq, dk, dv = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
    kr, vr = (np.repeat(x, H // Hk, axis=2) for x in (k, v))  # MHA with each k/v head repeated
    dq_m, dk_m, dv_m = nk.flash_attention_backward(do, q, kr, vr, out, lse, backend="cpu", **kw)
    np.testing.assert_allclose(dq, dq_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, dk_m.reshape(B, Sk, Hk, H // Hk, D).sum(3), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dv, dv_m.reshape(B, Sk, Hk, H // Hk, D).sum(3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=dtype_id)
def test_varlen_cpu(rng, dt):
    lens_q, lens_k = [5, 300, 1, 0, 64, 3], [7, 280, 33, 4, 64, 0]
    cq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q, do = (rng.standard_normal((cq[-1], 4, 48)).astype(dt) for _ in range(2))
    k, v = (rng.standard_normal((ck[-1], 2, 48)).astype(dt) for _ in range(2))
    kw = dict(causal=True, alibi_slopes=rng.random((6, 4)), dropout_p=0.1, seed=5, softcap=5.0)
    out, lse = nk.flash_attention_varlen(q, k, v, cq, ck, return_lse=True, backend="cpu", **kw)
    got = nk.flash_attention_varlen_backward(do, q, k, v, out, lse, cq, ck, max(lens_q), max(lens_k), backend="cpu",
                                             **kw)
    ref = flash_attention_varlen_backward_ref(do, q, k, v, out, lse, cq, ck, **kw)
    for g, r, x in zip(got, ref, (q, k, v)):
        assert g.shape == x.shape and g.dtype == dt
        assert max_err(g, r) < TOL[np.dtype(dt)]
    # sequence 4 (batch index 4 for dropout/alibi) equals the batched backward of that sequence alone
    b = 4
    kw1 = dict(kw, alibi_slopes=kw["alibi_slopes"][b], dropout_p=0.0)
    sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
    out1, lse1 = nk.flash_attention(q[None, sq], k[None, sk], v[None, sk], return_lse=True, backend="cpu", **kw1)
    one = nk.flash_attention_backward(do[None, sq], q[None, sq], k[None, sk], v[None, sk], out1, lse1, backend="cpu",
                                      **kw1)
    kw0 = dict(kw, dropout_p=0.0)
    out0, lse0 = nk.flash_attention_varlen(q, k, v, cq, ck, return_lse=True, backend="cpu", **kw0)
    packed = nk.flash_attention_varlen_backward(do, q, k, v, out0, lse0, cq, ck, backend="cpu", **kw0)
    for p, o, s in zip(packed, one, (sq, sk, sk)):
        np.testing.assert_allclose(p[s], o[0], rtol=1e-4, atol=10 * TOL[np.dtype(dt)])


def test_dropout_gradients_need_the_forward_seed(rng):
    q, k, v, do = _inputs(rng, np.float32, 1, 65, 80, 2, 2, 32)
    out, lse, seed = nk.flash_attention(q, k, v, dropout_p=0.3, return_lse=True, backend="cpu")  # drawn seed
    got = nk.flash_attention_backward(do, q, k, v, out, lse, dropout_p=0.3, seed=seed, backend="cpu")
    ref = flash_attention_backward_ref(do, q, k, v, out, lse, dropout_p=0.3, seed=seed)
    for g, r in zip(got, ref):
        assert max_err(g, r) < TOL[np.dtype(np.float32)]
    other = nk.flash_attention_backward(do, q, k, v, out, lse, dropout_p=0.3, seed=seed + 1, backend="cpu")
    assert max_err(other[2], ref[2]) > 1e-2  # a different mask gives different gradients


def test_cpu_deterministic(rng):
    q, k, v, do = _inputs(rng, np.float32, 2, 600, 530, 4, 2, 64)
    kw = dict(causal=True, softcap=3.0, dropout_p=0.1, seed=9)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    a = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", deterministic=False, **kw)
    b = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", deterministic=True, **kw)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("dt", [np.float32, bfloat16], ids=dtype_id)
def test_reference_backend(rng, dt):
    q, k, v, do = _inputs(rng, dt, 2, 9, 11, 4, 2, 8)
    kw = dict(causal=True, alibi_slopes=rng.random((2, 4)), dropout_p=0.2, seed=3)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    got = nk.flash_attention_backward(do, q, k, v, out, lse, backend="reference", **kw)
    cpu = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
    ref = flash_attention_backward_ref(do, q, k, v, out, lse, **kw)
    for g, c, r in zip(got, cpu, ref):
        assert g.dtype == dt and max_err(g, r) < TOL[np.dtype(dt)] and max_err(c, r) < TOL[np.dtype(dt)]


def test_inputs_not_modified(rng):
    q, k, v, do = _inputs(rng, np.float32, 1, 20, 30, 2, 1, 8)
    out, lse = nk.flash_attention(q, k, v, causal=True, return_lse=True, backend="cpu")
    args = (do, q, k, v, out, lse)
    copies = [x.copy() for x in args]
    nk.flash_attention_backward(*args, causal=True, softcap=2.0, backend="cpu")
    for x, c in zip(args, copies):
        np.testing.assert_array_equal(x, c)


def _good(rng):
    q, k, v, do = _inputs(rng, np.float32, 2, 8, 8, 4, 2, 16)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu")
    return [do, q, k, v, out, lse]


@pytest.mark.parametrize("case,exc,msg", [
    ("dout-shape", ValueError, r"dout must have q's shape \(2, 8, 4, 16\)"),
    ("dout-dtype", TypeError, "dout must have the same dtype as q"),
    ("out-shape", ValueError, "out must have q's shape"),
    ("out-rank", ValueError, "out must have 4 dimensions"),
    ("lse-shape", ValueError, r"lse must have shape \(2, 4, 8\)"),
    ("lse-dtype", TypeError, "lse must have dtype in"),
    ("lse-none", TypeError, "lse must be an array"),
    ("seed-missing", ValueError, "seed is required when dropout_p > 0"),
    ("seed-type", TypeError, "seed must be an int"),
    ("k-batch", ValueError, "k must have batch size"),
    ("gqa", ValueError, "multiple of the k/v heads"),
    ("window", ValueError, "window_size entries must be >= -1"),
    ("dropout", ValueError, "dropout_p must be in"),
    ("alibi", ValueError, "alibi_slopes must have shape"),
    ("deterministic", TypeError, "deterministic must be a bool"),
    ("backend", ValueError, "backend must be one of"),
])
def test_bad_inputs(rng, case, exc, msg):
    a = _good(rng)
    kw = {}
    if case == "dout-shape":
        a[0] = a[0][:, :5]
    elif case == "dout-dtype":
        a[0] = a[0].astype(np.float64)
    elif case == "out-shape":
        a[4] = a[4][..., :8]
    elif case == "out-rank":
        a[4] = a[4][0]
    elif case == "lse-shape":
        a[5] = a[5].transpose(0, 2, 1)
    elif case == "lse-dtype":
        a[5] = a[5].astype(np.float16)
    elif case == "lse-none":
        a[5] = None
    elif case == "seed-missing":
        kw = dict(dropout_p=0.1)
    elif case == "seed-type":
        kw = dict(dropout_p=0.1, seed="abc")
    elif case == "k-batch":
        a[2], a[3] = a[2][:1], a[3][:1]
    elif case == "gqa":
        a[2] = a[3] = rng.standard_normal((2, 8, 3, 16)).astype(np.float32)
    elif case == "window":
        kw = dict(window_size=(-2, 0))
    elif case == "dropout":
        kw = dict(dropout_p=1.0, seed=1)
    elif case == "alibi":
        kw = dict(alibi_slopes=np.ones(3))
    elif case == "deterministic":
        kw = dict(deterministic="yes")
    elif case == "backend":
        kw = dict(backend="tpu")
    with pytest.raises(exc, match=msg):
        nk.flash_attention_backward(*a, **kw)


def test_cuda_backend_without_gpu_is_a_clear_error(rng, monkeypatch):
    from numba_kernels._dispatch import BackendUnavailableError, cuda_available

    if cuda_available():
        pytest.skip("a GPU (or the simulator) is present")
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        nk.flash_attention_backward(*_good(rng), backend="cuda")
    monkeypatch.setenv("NUMBA_KERNELS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        nk.flash_attention_backward(*_good(rng))


def test_bad_varlen_inputs(rng):
    q, do = (rng.standard_normal((10, 2, 8)).astype(np.float32) for _ in range(2))
    k = rng.standard_normal((12, 2, 8)).astype(np.float32)
    cq, ck = np.array([0, 4, 10], np.int32), np.array([0, 6, 12], np.int32)
    out, lse = nk.flash_attention_varlen(q, k, k, cq, ck, return_lse=True, backend="cpu")
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 10\)"):
        nk.flash_attention_varlen_backward(do, q, k, k, out, lse.T, cq, ck)
    with pytest.raises(ValueError, match="cu_seqlens_k must have length 3"):
        nk.flash_attention_varlen_backward(do, q, k, k, out, lse, cq, np.array([0, 12], np.int32))
    with pytest.raises(ValueError, match="max_seqlen_k=3 is smaller than the longest sequence"):
        nk.flash_attention_varlen_backward(do, q, k, k, out, lse, cq, ck, max_seqlen_k=3)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] must equal"):
        nk.flash_attention_varlen_backward(do, q, k, k, out, lse, np.array([0, 4, 11], np.int32), ck)


def test_cpu_diagonal_tiles_go_in_strips():
    """A tile the causal mask cuts is done in SUB_Q-row strips over the visible keys only; full tiles stay whole."""
    from numba_kernels.cpu import flash_attention_backward as fb

    S = 512
    assert fb._strip(256, 256, 0, 256, S, S, -1, 0) == 256  # rows 256-511 see all of keys 0-255
    assert fb._strip(0, 256, 0, 256, S, S, -1, 0) == fb.SUB_Q  # the diagonal tile
    assert fb._strip(0, 256, 0, 256, S, S, -1, -1) == 256  # no mask
    assert fb._cols(0, 64, 0, 256, S, S, -1, 0) == (0, 64)  # first strip: keys 0-63 only
    assert fb._cols(192, 64, 0, 256, S, S, -1, 0) == (0, 256)
    assert fb._cols(0, 64, 256, 256, S, S, -1, 0)[1] <= 0  # nothing visible: skipped


@pytest.mark.parametrize("shape", [(1, 530, 600, 2, 1, 64), (2, 600, 530, 4, 2, 40), (1, 300, 1, 2, 2, 16)],
                         ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hk{}-D{}".format(*s))
@pytest.mark.parametrize("opt", ["plain", "causal", "window", "all"])
def test_cpu_dq_shares_match_own_dq_pass(rng, monkeypatch, shape, opt):
    """dQ from the dK/dV pass's per-key-block shares (the default at these sizes) and from its own pass
    (shares disabled) both match the reference and each other; the shares path is reproducible bitwise."""
    from numba_kernels.cpu import flash_attention_backward as fb

    kw = BIG[opt](rng, shape[0], shape[3])
    q, k, v, do = _inputs(rng, np.float32, *shape)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    shares = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
    again = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
    monkeypatch.setattr(fb, "DQ_SHARES_MAX_BYTES", 0)
    own = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
    ref = flash_attention_backward_ref(do, q, k, v, out, lse, **kw)
    for name, a, b, c, r in zip("qkv", shares, again, own, ref):
        assert a.tobytes() == b.tobytes(), name
        assert max_err(a, r) < TOL[np.dtype(np.float32)], f"d{name} shares: {max_err(a, r)}"
        assert max_err(c, r) < TOL[np.dtype(np.float32)], f"d{name} own pass: {max_err(c, r)}"
        assert max_err(a, c) < 1e-5, f"d{name}: shares vs own pass {max_err(a, c)}"


@pytest.mark.parametrize("opt", ["causal", "all"])
def test_cpu_dq_shares_in_head_groups(rng, monkeypatch, opt):
    """With room for the shares of only 2 of 3 k/v heads at a time, the backward runs in k/v head groups
    (2 + 1, GQA group 2): the gradients are bitwise those of one group (dropout and ALiBi use global heads)."""
    from numba_kernels.cpu import flash_attention_backward as fb

    shape = (1, 530, 600, 6, 3, 64)
    kw = BIG[opt](rng, shape[0], shape[3])
    q, k, v, do = _inputs(rng, np.float32, *shape)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    one = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
    per_kv_head = 3 * 2 * 530 * 64 * 4  # key blocks x query heads per k/v head x Sq x D x 4 bytes
    monkeypatch.setattr(fb, "DQ_SHARES_MAX_BYTES", 2 * per_kv_head)
    groups = nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
    ref = flash_attention_backward_ref(do, q, k, v, out, lse, **kw)
    for name, a, b, r in zip("qkv", one, groups, ref):
        assert a.tobytes() == b.tobytes(), name
        assert max_err(b, r) < TOL[np.dtype(np.float32)], f"d{name}: {max_err(b, r)}"


@pytest.mark.parametrize("opt", ["plain", "causal", "all"])
def test_cpu_task_runner_matches_parallel_region(rng, monkeypatch, opt):
    """Calls above PARALLEL_REGION_MAX_FLOPS run on this thread plus helper threads (``_tasks.run_tasks``), short
    ones in one parallel region: forward and backward give the same bits either way, and match the reference."""
    from numba_kernels.cpu import flash_attention as ff

    shape = (2, 530, 600, 4, 2, 64)
    kw = BIG[opt](rng, shape[0], shape[3])
    q, k, v, do = _inputs(rng, np.float32, *shape)
    monkeypatch.setattr(ff, "PARALLEL_REGION_MAX_FLOPS", 1 << 62)  # everything in the parallel region
    region = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    region_g = nk.flash_attention_backward(do, q, k, v, *region, backend="cpu", **kw)
    monkeypatch.setattr(ff, "PARALLEL_REGION_MAX_FLOPS", 0)  # everything through run_tasks
    tasks = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    tasks_g = nk.flash_attention_backward(do, q, k, v, *tasks, backend="cpu", **kw)
    for a, b in zip(region + region_g, tasks + tasks_g):
        assert a.tobytes() == b.tobytes()
    ref = flash_attention_backward_ref(do, q, k, v, *tasks, **kw)
    for name, g, r in zip("qkv", tasks_g, ref):
        assert max_err(g, r) < TOL[np.dtype(np.float32)], f"d{name}: {max_err(g, r)}"
