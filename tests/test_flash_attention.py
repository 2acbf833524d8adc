"""flash_attention / flash_attention_varlen: references against each other, CPU against the reference,
semantics (masks, dropout, LSE), the call contract, and bad inputs."""
import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels._dispatch import BackendUnavailableError, bfloat16
from numba_kernels._dropout import keep_mask
from numba_kernels.reference.flash_attention import (attention_one_ref, attention_one_tiled_ref,
                                                     flash_attention_ref, flash_attention_varlen_ref)
from tests.conftest import DTYPES, TOL, dtype_id, max_err

# option sets: (id, kwargs factory taking (rng, B, H))
OPTIONS = [
    ("plain", lambda r, B, H: {}),
    ("causal", lambda r, B, H: dict(causal=True)),
    ("window", lambda r, B, H: dict(window_size=(17, 5))),
    ("window-left", lambda r, B, H: dict(window_size=(9, -1))),
    ("causal-window", lambda r, B, H: dict(causal=True, window_size=(11, -1))),
    ("softcap", lambda r, B, H: dict(softcap=4.0)),
    ("alibi-H", lambda r, B, H: dict(alibi_slopes=r.random(H))),
    ("alibi-BH", lambda r, B, H: dict(alibi_slopes=r.random((B, H)).astype(np.float32), causal=True)),
    ("dropout", lambda r, B, H: dict(dropout_p=0.25, seed=1234)),
    ("scale", lambda r, B, H: dict(softmax_scale=0.3)),
    ("all", lambda r, B, H: dict(causal=True, window_size=(20, -1), softcap=3.0, alibi_slopes=r.random(H),
                                 dropout_p=0.1, seed=7)),
]
OPT_IDS = [o[0] for o in OPTIONS]


def _qkv(rng, dt, B, Sq, Sk, H, Hk, D):
    q = rng.standard_normal((B, Sq, H, D)).astype(dt)
    k = rng.standard_normal((B, Sk, Hk, D)).astype(dt)
    v = rng.standard_normal((B, Sk, Hk, D)).astype(dt)
    return q, k, v


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("opt", OPTIONS, ids=OPT_IDS)
@pytest.mark.parametrize("Sq,Sk", [(97, 113), (113, 97), (1, 64), (40, 40)], ids=lambda s: str(s))
def test_tiled_reference_matches_naive(rng, opt, Sq, Sk):
    q, k, v = _qkv(rng, np.float64, 1, Sq, Sk, 4, 2, 24)
    kw = opt[1](rng, 1, 4)
    if "alibi_slopes" in kw:  # the one-sequence references take (H,) slopes
        kw["alibi_slopes"] = np.asarray(kw["alibi_slopes"]).reshape(-1, 4)[0]
    o1, l1 = attention_one_ref(q[0], k[0], v[0], 0, **{**kw, "seed": kw.get("seed", 0)})
    o2, l2 = attention_one_tiled_ref(q[0], k[0], v[0], 0, block_k=16, **{**kw, "seed": kw.get("seed", 0)})
    np.testing.assert_allclose(o2, o1, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isfinite(l1), np.isfinite(l2))
    # an LSE is a log: its rounding error is absolute (~1e-16 of the terms), so an LSE near 0 needs an atol
    np.testing.assert_allclose(l2[np.isfinite(l2)], l1[np.isfinite(l1)], rtol=1e-12, atol=1e-12)


def test_reference_against_textbook_softmax(rng):
    """No options: out = softmax(q k^T / sqrt(D)) v, written out by hand."""
    q, k, v = _qkv(rng, np.float64, 2, 9, 13, 3, 3, 8)
    out, lse = flash_attention_ref(q, k, v, return_lse=True)
    for b in range(2):
        for h in range(3):
            s = q[b, :, h] @ k[b, :, h].T / np.sqrt(8)
            p = np.exp(s - s.max(1, keepdims=True))
            np.testing.assert_allclose(out[b, :, h], (p / p.sum(1, keepdims=True)) @ v[b, :, h],
                                       rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(lse[b, h], np.log(np.exp(s).sum(1)), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("opt", OPTIONS, ids=OPT_IDS)
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=dtype_id)
def test_cpu_options(rng, dt, opt):
    B, Sq, Sk, H, Hk, D = 2, 97, 113, 4, 2, 40
    q, k, v = _qkv(rng, dt, B, Sq, Sk, H, Hk, D)
    kw = opt[1](rng, B, H)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    ref, rlse = flash_attention_ref(q, k, v, return_lse=True, **kw)
    assert out.dtype == dt and out.shape == q.shape and lse.shape == (B, H, Sq) and lse.dtype == np.float32
    assert max_err(out, ref) < TOL[np.dtype(dt)]
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], rlse[np.isfinite(rlse)], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 97, 113, 8, 1, 80), (2, 63, 63, 6, 3, 96), (1, 130, 257, 2, 2, 256),
                                   (3, 1, 200, 4, 4, 64), (1, 1025, 1025, 2, 1, 16)],
                         ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hk{}-D{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_shapes(rng, shape, causal):
    q, k, v = _qkv(rng, np.float32, *shape)
    out = nk.flash_attention(q, k, v, causal=causal, backend="cpu")
    assert max_err(out, flash_attention_ref(q, k, v, causal=causal)) < TOL[np.dtype(np.float32)]


MASK_EDGES = [
    ("causal", lambda r, H: dict(causal=True)),
    ("window-full-middle", lambda r, H: dict(window_size=(300, 40))),  # a 256-row block: edge, full, edge keys
    ("window-narrow", lambda r, H: dict(window_size=(100, 5))),  # narrower than a block: edges only
    ("causal-window", lambda r, H: dict(causal=True, window_size=(400, -1))),
    ("all", lambda r, H: dict(causal=True, window_size=(350, -1), softcap=3.0, alibi_slopes=r.random(H),
                              dropout_p=0.1, seed=5)),
]


@pytest.mark.parametrize("opt", MASK_EDGES, ids=[m[0] for m in MASK_EDGES])
@pytest.mark.parametrize("Sq,Sk", [(700, 700), (530, 900), (900, 530)], ids=lambda s: str(s))
def test_cpu_mask_edges_across_blocks(rng, opt, Sq, Sk):
    """Query blocks whose keys split into a part every row sees (full-height tiles) and mask edges on either
    side (64-row groups), across 256-row and 512-key block boundaries, Sq != Sk both ways (Sq > Sk
    causal: fully masked rows)."""
    q, k, v = _qkv(rng, np.float32, 1, Sq, Sk, 2, 1, 32)
    kw = opt[1](rng, 2)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    ref, rlse = flash_attention_ref(q, k, v, return_lse=True, **kw)
    assert max_err(out, ref) < TOL[np.dtype(np.float32)]
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], rlse[np.isfinite(rlse)], rtol=2e-6, atol=2e-6)


def _naive_in_dtype(q, k, v, dt, **kw):
    """The same math done naively in a low-precision dtype: fp32 products of rounded inputs, probabilities
    rounded to dt before P @ V, output rounded to dt (what a plain fp16/bf16 attention would give)."""
    ref32 = flash_attention_ref(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), **kw)
    return ref32.astype(dt).astype(np.float64)


@pytest.mark.parametrize("dt", [np.float16, bfloat16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_half_precision_flash_attn_rule(rng, dt, causal):
    """flash-attn's rule: the kernel's error is at most 2x that of the naive computation in the dtype."""
    q, k, v = _qkv(rng, dt, 2, 97, 113, 4, 2, 64)
    out = nk.flash_attention(q, k, v, causal=causal, backend="cpu")
    assert out.dtype == dt
    ref = flash_attention_ref(q, k, v, causal=causal)
    err = np.abs(out.astype(np.float64) - ref).max()
    err_naive = np.abs(_naive_in_dtype(q, k, v, dt, causal=causal) - ref).max()
    assert err <= 2 * err_naive + 1e-6
    assert max_err(out, ref) < TOL[np.dtype(dt)]


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_reference_backend_keeps_dtype(rng, dt):
    q, k, v = _qkv(rng, dt, 1, 5, 7, 2, 1, 8)
    out = nk.flash_attention(q, k, v, backend="reference")
    assert out.dtype == dt
    assert max_err(out, flash_attention_ref(q, k, v)) < TOL[np.dtype(dt)]


def test_fully_masked_rows_give_zero_not_nan(rng):
    # causal with Sq > Sk: the first Sq - Sk rows see no key at all (bottom-right alignment)
    q, k, v = _qkv(rng, np.float32, 1, 50, 20, 2, 2, 16)
    for backend in ("cpu", "reference"):
        out, lse = nk.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[0, :30], 0.0)
        assert np.isneginf(lse[0, :, :30]).all() and np.isfinite(lse[0, :, 30:]).all()
        assert np.abs(out[0, 30:]).max() > 0


def test_causal_is_bottom_right_aligned(rng):
    # Sq=2, Sk=5: row 0 sees keys 0..3, row 1 sees keys 0..4 (flash-attn), not 0..0 / 0..1 (top-left)
    q, k, v = _qkv(rng, np.float64, 1, 2, 5, 1, 1, 4)
    out = nk.flash_attention(q, k, v, causal=True, backend="cpu")
    full0 = nk.flash_attention(q[:, :1], k[:, :4], v[:, :4], backend="cpu")
    np.testing.assert_allclose(out[:, :1], full0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dt", [np.float32, np.float16], ids=dtype_id)
def test_varlen_cpu(rng, dt):
    lens_q, lens_k = [5, 130, 1, 0, 64], [7, 100, 33, 4, 64]
    cq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = rng.standard_normal((cq[-1], 4, 48)).astype(dt)
    k, v = (rng.standard_normal((ck[-1], 2, 48)).astype(dt) for _ in range(2))
    slopes = rng.random((5, 4))
    kw = dict(causal=True, alibi_slopes=slopes, dropout_p=0.1, seed=5)
    out, lse = nk.flash_attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), return_lse=True, backend="cpu",
                                         **kw)
    ref, rlse = flash_attention_varlen_ref(q, k, v, cq, ck, return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (4, cq[-1])
    assert max_err(out, ref) < TOL[np.dtype(dt)]
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
    # each packed sequence equals a batched call on that sequence alone (batch index b for dropout/alibi)
    b = 2
    one = flash_attention_ref(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                              causal=True, alibi_slopes=slopes[b], dropout_p=0.0)
    ref_nodrop = flash_attention_varlen_ref(q, k, v, cq, ck, causal=True, alibi_slopes=slopes)
    np.testing.assert_allclose(ref_nodrop[cq[b]:cq[b + 1]], one[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- dropout
def test_dropout_keep_fraction():
    for p in (0.1, 0.5, 0.9):
        m = keep_mask(42, 0, 3, np.arange(256), np.arange(512), p)
        assert abs(m.mean() - (1 - p)) < 0.01


def test_dropout_depends_on_every_coordinate():
    base = keep_mask(1, 0, 0, np.arange(64), np.arange(64), 0.5)
    for args in ((2, 0, 0), (1, 1, 0), (1, 0, 1)):
        other = keep_mask(args[0], args[1], args[2], np.arange(64), np.arange(64), 0.5)
        assert 0.4 < (base != other).mean() < 0.6


def test_dropout_seed_none_returns_seed_and_reproduces(rng):
    q, k, v = _qkv(rng, np.float32, 1, 33, 33, 2, 2, 16)
    out, seed = nk.flash_attention(q, k, v, dropout_p=0.3, backend="cpu")
    assert isinstance(seed, int)
    again = nk.flash_attention(q, k, v, dropout_p=0.3, seed=seed, backend="cpu")
    np.testing.assert_array_equal(out, again)
    other = nk.flash_attention(q, k, v, dropout_p=0.3, seed=seed + 1, backend="cpu")
    assert not np.array_equal(out, other)
    out2, lse, seed2 = nk.flash_attention(q, k, v, dropout_p=0.3, return_lse=True, backend="cpu")
    assert isinstance(seed2, int) and lse.shape == (1, 2, 33)


# ---------------------------------------------------------------------------------------------- contract
def test_inputs_not_modified(rng):
    q, k, v = _qkv(rng, np.float32, 1, 20, 30, 2, 1, 8)
    copies = [x.copy() for x in (q, k, v)]
    nk.flash_attention(q, k, v, causal=True, softcap=2.0, dropout_p=0.2, seed=1, backend="cpu")
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, c)


def test_backend_from_environment(rng, monkeypatch):
    q, k, v = _qkv(rng, np.float32, 1, 4, 4, 1, 1, 4)
    monkeypatch.setenv("NUMBA_KERNELS_BACKEND", "reference")
    a = nk.flash_attention(q, k, v)
    monkeypatch.setenv("NUMBA_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        nk.flash_attention(q, k, v)
    monkeypatch.delenv("NUMBA_KERNELS_BACKEND")
    np.testing.assert_allclose(nk.flash_attention(q, k, v), a, rtol=1e-5, atol=1e-6)


def test_cuda_backend_without_gpu_is_a_clear_error(rng):
    from numba_kernels._dispatch import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present")
    q, k, v = _qkv(rng, np.float32, 1, 4, 4, 1, 1, 4)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        nk.flash_attention(q, k, v, backend="cuda")


def test_non_contiguous_inputs(rng):
    q, k, v = _qkv(rng, np.float32, 1, 16, 16, 2, 2, 8)
    qt = np.asfortranarray(q)
    kt = k[:, ::-1].copy()[:, ::-1]
    np.testing.assert_allclose(nk.flash_attention(qt, kt, v, backend="cpu"), flash_attention_ref(q, k, v),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def _good(rng):
    return _qkv(rng, np.float32, 2, 8, 8, 4, 2, 16)


@pytest.mark.parametrize("case,exc,msg", [
    ("q-rank", ValueError, "q must have 4 dimensions"),
    ("k-batch", ValueError, "k must have batch size"),
    ("v-shape", ValueError, "v must have the same shape as k"),
    ("head-dim", ValueError, "k must have head dim"),
    ("gqa", ValueError, "multiple of the k/v heads"),
    ("dtype-mix", TypeError, "k must have the same dtype as q"),
    ("dtype-int", TypeError, "q must have dtype in"),
    ("d-too-big", ValueError, "head dim must be in"),
    ("window", ValueError, "window_size entries must be >= -1"),
    ("window-type", ValueError, "window_size must be a pair"),
    ("dropout", ValueError, "dropout_p must be in"),
    ("softcap", ValueError, "softcap must be"),
    ("scale", ValueError, "softmax_scale must be"),
    ("alibi", ValueError, "alibi_slopes must have shape"),
    ("seed", TypeError, "seed must be an int"),
    ("backend", ValueError, "backend must be one of"),
    ("not-array", TypeError, "q must be a numpy or CUDA device array"),
])
def test_bad_inputs(rng, case, exc, msg):
    q, k, v = _good(rng)
    kw = {}
    if case == "q-rank":
        q = q[0]
    elif case == "k-batch":
        k, v = k[:1], v[:1]
    elif case == "v-shape":
        v = v[:, :5]
    elif case == "head-dim":
        k, v = k[..., :8], v[..., :8]
    elif case == "gqa":
        k, v = (rng.standard_normal((2, 8, 3, 16)).astype(np.float32) for _ in range(2))
    elif case == "dtype-mix":
        k = k.astype(np.float64)
    elif case == "dtype-int":
        q, k, v = (x.astype(np.int32) for x in (q, k, v))
    elif case == "d-too-big":
        q, k, v = (np.zeros(x.shape[:-1] + (300,), np.float32) + 1 for x in (q, k, v))
    elif case == "window":
        kw = dict(window_size=(-2, 0))
    elif case == "window-type":
        kw = dict(window_size=5)
    elif case == "dropout":
        kw = dict(dropout_p=1.0)
    elif case == "softcap":
        kw = dict(softcap=-1.0)
    elif case == "scale":
        kw = dict(softmax_scale=float("nan"))
    elif case == "alibi":
        kw = dict(alibi_slopes=np.ones(3))
    elif case == "seed":
        kw = dict(dropout_p=0.1, seed="abc")
    elif case == "backend":
        kw = dict(backend="tpu")
    elif case == "not-array":
        q = q.tolist()
    with pytest.raises(exc, match=msg):
        nk.flash_attention(q, k, v, **kw)


@pytest.mark.parametrize("cu,msg", [
    ([0, 5, 3, 10], "non-decreasing"),
    ([1, 5, 10], "must start at 0"),
    ([0, 5, 11], r"cu_seqlens_q\[-1\] must equal"),
    ([[0, 10]], "1-D integer array"),
    (np.array([0.0, 10.0]), "integer dtype"),
])
def test_bad_cu_seqlens(rng, cu, msg):
    q = rng.standard_normal((10, 2, 8)).astype(np.float32)
    k = rng.standard_normal((12, 2, 8)).astype(np.float32)
    with pytest.raises((ValueError, TypeError), match=msg):
        nk.flash_attention_varlen(q, k, k, np.asarray(cu), np.array([0, 12], np.int32))


def test_bad_varlen_lengths(rng):
    q = rng.standard_normal((10, 2, 8)).astype(np.float32)
    k = rng.standard_normal((12, 2, 8)).astype(np.float32)
    cq, ck = np.array([0, 4, 10], np.int32), np.array([0, 6, 12], np.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k must have length 3"):
        nk.flash_attention_varlen(q, k, k, cq, np.array([0, 12], np.int32))
    with pytest.raises(ValueError, match="max_seqlen_q=3 is smaller than the longest sequence"):
        nk.flash_attention_varlen(q, k, k, cq, ck, max_seqlen_q=3)
