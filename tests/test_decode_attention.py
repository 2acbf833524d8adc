"""flash_attention_with_kvcache / attention_combine on the CPU and the reference: contiguous vs paged caches of
any page size, append-then-attend, RoPE, split-KV, combine, leftpad / cache_batch_idx, options, dtypes, and bad
inputs that must leave the caches untouched. Small shapes: this file runs in CI stage 1."""
import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels.reference.decode_attention import (apply_rotary_ref, attention_combine_ref,
                                                      flash_attention_with_kvcache_ref)
from numba_kernels.reference.flash_attention import attention_one_ref
from tests.conftest import DTYPES, TOL, dtype_id, max_err

kvc = nk.flash_attention_with_kvcache
REF_ONLY = ("num_splits", "backend")


def _ref(q, kc, vc, k=None, v=None, **kw):
    """The float64 reference on copies of the caches: (out, lse, k_cache after, v_cache after)."""
    kc, vc = kc.copy(), vc.copy()
    kw = {n: x for n, x in kw.items() if n not in REF_ONLY}
    out, lse = flash_attention_with_kvcache_ref(q, kc, vc, k, v, return_lse=True, **kw)
    return out, lse, kc, vc


def _run(q, kc, vc, k=None, v=None, backend="cpu", **kw):
    """The public call on copies of the caches: (out, lse, k_cache after, v_cache after)."""
    kc, vc = kc.copy(), vc.copy()
    out, lse = kvc(q, kc, vc, k, v, return_lse=True, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == np.float32
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    return out, lse, kc, vc


def _close_lse(lse, ref, tol=1e-4):
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref))
    np.testing.assert_allclose(lse[np.isfinite(lse)], ref[np.isfinite(ref)], rtol=tol, atol=tol)


def _data(rng, dt, B, Sq, H, Hk, D, Smax, seqlens, snew=0, nan_past=True):
    """q, a contiguous cache (B, Smax, Hk, D) holding random tokens below seqlens (NaN past them: never
    read), and new k/v (B, snew, Hk, D) or None."""
    q = rng.standard_normal((B, Sq, H, D)).astype(dt)
    kc = rng.standard_normal((B, Smax, Hk, D)).astype(dt)
    vc = rng.standard_normal((B, Smax, Hk, D)).astype(dt)
    if nan_past:
        for b in range(B):
            kc[b, seqlens[b]:] = np.nan
            vc[b, seqlens[b]:] = np.nan
    k = v = None
    if snew:
        k = rng.standard_normal((B, snew, Hk, D)).astype(dt)
        v = rng.standard_normal((B, snew, Hk, D)).astype(dt)
    return q, kc, vc, k, v


def _paged(rng, kc, vc, page, spare=3):
    """The same tokens in a paged cache: pages scattered in a random order among spare NaN pages.
    Returns (k_pages (NB, page, Hk, D), v_pages, block_table (B, max_blocks) int32)."""
    B, Smax, Hk, D = kc.shape
    nb = -(-Smax // page)
    NB = B * nb + spare
    table = rng.permutation(NB)[:B * nb].reshape(B, nb).astype(np.int32)
    kp = np.full((NB, page, Hk, D), np.nan, dtype=kc.dtype)
    vp = kp.copy()
    pos = np.arange(Smax)
    for b in range(B):
        kp[table[b, pos // page], pos % page] = kc[b]
        vp[table[b, pos // page], pos % page] = vc[b]
    return kp, vp, table


def _unpage(kp, table, Smax):
    """Paged cache -> contiguous (B, Smax, Hk, D) view of each sequence's positions."""
    pos = np.arange(Smax)
    return np.stack([kp[table[b, pos // kp.shape[1]], pos % kp.shape[1]] for b in range(table.shape[0])])


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("page", [1, 7, 16, 128], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("Sq,snew", [(1, 0), (1, 1), (5, 3)], ids=lambda s: str(s))
def test_contiguous_paged_reference(rng, page, Sq, snew):
    B, H, Hk, D, Smax = 3, 4, 2, 40, 100
    seqlens = np.array([37, 0, 90], dtype=np.int32)
    if snew == 0:
        seqlens[1] = 5
    q, kc, vc, k, v = _data(rng, np.float32, B, Sq, H, Hk, D, Smax, seqlens, snew)
    kw = dict(cache_seqlens=seqlens, causal=True)
    ref, rlse, rkc, rvc = _ref(q, kc, vc, k, v, **kw)
    out, lse, okc, ovc = _run(q, kc, vc, k, v, **kw)
    assert max_err(out, ref) < TOL[np.dtype(np.float32)]
    _close_lse(lse, rlse)
    np.testing.assert_array_equal(okc, rkc)
    np.testing.assert_array_equal(ovc, rvc)
    kp, vp, table = _paged(rng, kc, vc, page)
    pout, plse, pk, pv = _run(q, kp, vp, k, v, block_table=table, **kw)
    np.testing.assert_allclose(pout, out, rtol=1e-6, atol=1e-6)
    _close_lse(plse, lse, 1e-6)
    np.testing.assert_array_equal(_unpage(pk, table, Smax), rkc)  # the appended rows, through the table
    np.testing.assert_array_equal(_unpage(pv, table, Smax), rvc)
    pref, prlse, _, _ = _ref(q, kp, vp, k, v, block_table=table, **kw)
    assert max_err(pref, ref) < 1e-12


def test_full_cache_and_scalar_seqlens(rng):
    """cache_seqlens None = the cache is full; an int applies to every row."""
    q, kc, vc, _, _ = _data(rng, np.float64, 2, 2, 4, 4, 24, 33, [33, 33])
    np.testing.assert_allclose(kvc(q, kc, vc), _ref(q, kc, vc)[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(kvc(q, kc, vc, cache_seqlens=20), _ref(q, kc, vc, cache_seqlens=[20, 20])[0],
                               rtol=1e-10, atol=1e-10)


def test_empty_and_fully_masked_rows_give_zero(rng):
    seqlens = np.array([0, 30], dtype=np.int32)
    q, kc, vc, _, _ = _data(rng, np.float32, 2, 3, 2, 1, 16, 40, seqlens)
    out, lse = kvc(q, kc, vc, cache_seqlens=seqlens, return_lse=True, num_splits=3)
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)
    seqlens[0] = 1  # causal, bottom-right: query 0 and 1 of row 0 see no key (1 key, 3 queries)
    kc[0, 0], vc[0, 0] = rng.standard_normal((2, 1, 16))
    out, lse = kvc(q, kc, vc, cache_seqlens=seqlens, causal=True, return_lse=True, num_splits=2)
    assert np.all(out[0, :2] == 0) and not np.isnan(out).any() and np.all(lse[0, :, :2] == -np.inf)
    ref, rlse, _, _ = _ref(q, kc, vc, cache_seqlens=seqlens, causal=True)
    assert max_err(out, ref) < TOL[np.dtype(np.float32)]
    _close_lse(lse, rlse)


# ---------------------------------------------------------------------------------------------- append
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged7"])
def test_append_then_attend_equals_flash_attention(rng, paged):
    """Appending Snew tokens then attending (causal) equals flash_attention over the concatenated sequence."""
    B, Sq, H, Hk, D, Smax = 2, 4, 6, 3, 32, 64
    seqlens = np.array([21, 50], dtype=np.int32)
    snew = 6
    q, kc, vc, k, v = _data(rng, np.float32, B, Sq, H, Hk, D, Smax, seqlens, snew)
    k0, v0 = kc.copy(), vc.copy()
    kw = dict(cache_seqlens=seqlens)
    if paged:
        kc, vc, kw["block_table"] = _paged(rng, kc, vc, 7)
    out, lse = kvc(q, kc, vc, k, v, causal=True, return_lse=True, **kw)
    if paged:
        kc, vc = _unpage(kc, kw["block_table"], Smax), _unpage(vc, kw["block_table"], Smax)
    for b in range(B):
        s = seqlens[b]
        np.testing.assert_array_equal(kc[b, s:s + snew], k[b])
        np.testing.assert_array_equal(vc[b, s:s + snew], v[b])
        np.testing.assert_array_equal(kc[b, :s], k0[b, :s])  # earlier tokens untouched
        kk = np.concatenate([k0[b, :s], k[b]])[None]
        vv = np.concatenate([v0[b, :s], v[b]])[None]
        fo, fl = nk.flash_attention(q[b:b + 1], kk, vv, causal=True, return_lse=True, backend="cpu")
        np.testing.assert_allclose(out[b], fo[0], rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(lse[b], fl[0], rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------- rotary
def test_apply_rotary_ref_is_a_complex_rotation(rng):
    x = rng.standard_normal((5, 2, 12))
    theta = rng.standard_normal((9, 4))
    pos = rng.integers(0, 9, 5)
    got = apply_rotary_ref(x, np.cos(theta), np.sin(theta), pos, interleaved=True)
    z = (x[..., 0:8:2] + 1j * x[..., 1:8:2]) * np.exp(1j * theta[pos])[:, None]
    np.testing.assert_allclose(got[..., 0:8:2], z.real, atol=1e-12)
    np.testing.assert_allclose(got[..., 1:8:2], z.imag, atol=1e-12)
    np.testing.assert_array_equal(got[..., 8:], x[..., 8:])
    got = apply_rotary_ref(x, np.cos(theta), np.sin(theta), pos, interleaved=False)
    z = (x[..., :4] + 1j * x[..., 4:8]) * np.exp(1j * theta[pos])[:, None]
    np.testing.assert_allclose(got[..., :4], z.real, atol=1e-12)
    np.testing.assert_allclose(got[..., 4:8], z.imag, atol=1e-12)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rotary(rng, interleaved, paged, causal):
    """Fused RoPE = rotating q and the new k by hand (apply_rotary_ref at flash-attn's positions), then
    attending without rotary; the appended cache rows hold the rotated k."""
    B, Sq, H, Hk, D, Smax, rd, snew = 2, 3, 4, 2, 40, 48, 24, 3
    seqlens = np.array([9, 30], dtype=np.int32)
    q, kc, vc, k, v = _data(rng, np.float32, B, Sq, H, Hk, D, Smax, seqlens, snew)
    theta = np.arange(Smax)[:, None] * (10000.0 ** (-np.arange(rd // 2) / (rd // 2)))[None]
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    kw = dict(cache_seqlens=seqlens, causal=causal)
    if paged:
        kc, vc, kw["block_table"] = _paged(rng, kc, vc, 16)
    out, lse, okc, ovc = _run(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, **kw)
    ref, rlse, rkc, _ = _ref(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, **kw)
    assert max_err(out, ref) < TOL[np.dtype(np.float32)]
    _close_lse(lse, rlse)
    qr = np.empty_like(q)
    kr = np.empty_like(k)
    for b in range(B):
        qpos = seqlens[b] + np.arange(Sq) if causal else np.full(Sq, seqlens[b])
        qr[b] = apply_rotary_ref(q[b], cos, sin, qpos, interleaved)
        kr[b] = apply_rotary_ref(k[b], cos, sin, seqlens[b] + np.arange(snew), interleaved)
    hand, _, hkc, _ = _run(qr, kc, vc, kr, v, **kw)
    np.testing.assert_allclose(out, hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(okc, hkc, rtol=1e-6, atol=1e-6, equal_nan=True)  # rotated k in the cache
    np.testing.assert_allclose(okc, rkc, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(ovc, _run(qr, kc, vc, kr, v, **kw)[3])  # v is not rotated


# ---------------------------------------------------------------------------------------------- split-KV
@pytest.mark.parametrize("opt", [{}, dict(causal=True, window_size=(150, -1)), dict(softcap=5.0)],
                         ids=["plain", "causal-window", "softcap"])
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=dtype_id)
def test_num_splits_agree(rng, dt, opt):
    B, Sq, H, Hk, D, Smax = 2, 2, 4, 1, 24, 700
    seqlens = np.array([700, 333], dtype=np.int32)
    q, kc, vc, _, _ = _data(rng, dt, B, Sq, H, Hk, D, Smax, seqlens)
    base, blse = kvc(q, kc, vc, cache_seqlens=seqlens, num_splits=1, return_lse=True, **opt)
    ref, rlse, _, _ = _ref(q, kc, vc, cache_seqlens=seqlens, **opt)
    assert max_err(base, ref) < TOL[np.dtype(dt)]
    _close_lse(blse, rlse)
    tol = 1e-12 if dt == np.float64 else 2e-6
    for ns in (2, 5, 0, 64):
        out, lse = kvc(q, kc, vc, cache_seqlens=seqlens, num_splits=ns, return_lse=True, **opt)
        np.testing.assert_allclose(out, base, rtol=tol, atol=tol, err_msg=f"num_splits={ns}")
        _close_lse(lse, blse, tol)


def _partials(rng, S, q, k, v, parts):
    """Attention of q (T, H, D) over each key subset: out (S, T, H, D) and lse (S, H, T), garbage output and
    -inf LSE for an empty subset."""
    T, H, D = q.shape
    out = rng.standard_normal((S, T, H, D)) * 100
    lse = np.full((S, H, T), -np.inf)
    for s in range(S):
        idx = np.flatnonzero(parts == s)
        if idx.size:
            out[s], lse[s] = attention_one_ref(q, k[idx], v[idx])
    return out, lse


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["4d", "5d"])
def test_attention_combine_of_any_partition(rng, backend, layout):
    T, H, D, Sk, S = 6, 3, 16, 50, 4
    q = rng.standard_normal((T, H, D))
    k, v = rng.standard_normal((Sk, H, D)), rng.standard_normal((Sk, H, D))
    whole, wlse = attention_one_ref(q, k, v)
    for trial in range(3):
        parts = rng.integers(0, S - 1, Sk)  # split S - 1 never gets a key: its LSE is -inf
        if trial == 2:
            parts = np.zeros(Sk, dtype=np.int64)
        op, lp = _partials(rng, S, q, k, v, parts)
        if layout == "5d":  # (S, B=2, Sq=3, H, D) and (S, B, H, Sq)
            op = op.reshape(S, 2, 3, H, D)
            lp = lp.reshape(S, H, 2, 3).transpose(0, 2, 1, 3)
        out, lse = nk.attention_combine(op.astype(np.float32), lp.astype(np.float32), return_lse=True,
                                        backend=backend)
        if layout == "5d":
            out = out.reshape(T, H, D)
            lse = lse.transpose(1, 0, 2).reshape(H, T)
        assert out.dtype == np.float32 and lse.dtype == np.float32
        assert max_err(out, whole) < 2e-5
        np.testing.assert_allclose(lse, wlse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_attention_combine_all_minus_inf_is_zero(rng, backend):
    op = rng.standard_normal((3, 2, 4, 8)).astype(np.float32)
    lp = np.log(rng.random((3, 4, 2))).astype(np.float32)
    lp[:, 1, 0] = -np.inf
    out, lse = nk.attention_combine(op, lp, return_lse=True, backend=backend, out_dtype=np.float16)
    assert out.dtype == np.float16 and not np.isnan(out).any()
    assert np.all(out[0, 1] == 0) and lse[1, 0] == -np.inf
    ref, rlse = attention_combine_ref(op, lp.transpose(0, 2, 1))
    assert max_err(out, ref) < TOL[np.dtype(np.float16)]
    _close_lse(lse, rlse.T, 1e-5)


def test_attention_combine_bad_inputs(rng):
    op = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="lse_partials"):
        nk.attention_combine(op, np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="out_partials"):
        nk.attention_combine(op[0, 0], np.zeros((4,), np.float32))
    with pytest.raises(TypeError, match="out_dtype"):
        nk.attention_combine(op, np.zeros((2, 4, 3), np.float32), out_dtype=np.int32)


# ---------------------------------------------------------------------------------------------- leftpad, batch idx
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged5"])
def test_leftpad_and_cache_batch_idx(rng, paged):
    """Keys are positions [leftpad, seqlens + Snew) of the cache row (or pages) of each batch row; checked
    against flash_attention over exactly those keys."""
    B, Bc, Sq, H, Hk, D, Smax, snew = 3, 5, 2, 4, 2, 16, 40, 2
    seqlens = np.array([12, 30, 7], dtype=np.int32)
    leftpad = np.array([3, 0, 7], dtype=np.int32)  # the last row sees only its new tokens
    rows = np.array([4, 0, 2], dtype=np.int32)
    q = rng.standard_normal((B, Sq, H, D)).astype(np.float32)
    kc = rng.standard_normal((Bc, Smax, Hk, D)).astype(np.float32)
    vc = rng.standard_normal((Bc, Smax, Hk, D)).astype(np.float32)
    k = rng.standard_normal((B, snew, Hk, D)).astype(np.float32)
    v = rng.standard_normal((B, snew, Hk, D)).astype(np.float32)
    for b in range(B):  # NaN where nothing may be read: before leftpad, past seqlens
        kc[rows[b], :leftpad[b]] = kc[rows[b], seqlens[b]:] = np.nan
    kw = dict(cache_seqlens=seqlens, cache_leftpad=leftpad, causal=True)
    if paged:
        kp, vp, table = _paged(rng, kc[rows], vc[rows], 5)
        out, lse, ok, _ = _run(q, kp, vp, k, v, block_table=table, **kw)
        ok = _unpage(ok, table, Smax)
        ref, rlse, _, _ = _ref(q, kp, vp, k, v, block_table=table, **kw)
    else:
        out, lse, ok, _ = _run(q, kc, vc, k, v, cache_batch_idx=rows, **kw)
        ok = ok[rows]
        ref, rlse, _, _ = _ref(q, kc, vc, k, v, cache_batch_idx=rows, **kw)
    assert max_err(out, ref) < TOL[np.dtype(np.float32)]
    _close_lse(lse, rlse)
    for b in range(B):
        s, lp = seqlens[b], leftpad[b]
        np.testing.assert_array_equal(ok[b, s:s + snew], k[b])
        kk = np.concatenate([kc[rows[b], lp:s], k[b]])[None]
        vv = np.concatenate([vc[rows[b], lp:s], v[b]])[None]
        fo = nk.flash_attention(q[b:b + 1], kk, vv, causal=True, backend="cpu")
        np.testing.assert_allclose(out[b], fo[0], rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------- options, dtypes
OPTIONS = [
    ("plain", lambda r, B, H: {}),
    ("causal", lambda r, B, H: dict(causal=True)),
    ("window", lambda r, B, H: dict(window_size=(20, 3))),
    ("causal-window", lambda r, B, H: dict(causal=True, window_size=(9, -1))),
    ("softcap", lambda r, B, H: dict(softcap=3.0)),
    ("alibi-H", lambda r, B, H: dict(alibi_slopes=r.random(H))),
    ("alibi-BH", lambda r, B, H: dict(alibi_slopes=r.random((B, H)).astype(np.float32), causal=True)),
    ("scale", lambda r, B, H: dict(softmax_scale=0.3)),
    ("all", lambda r, B, H: dict(causal=True, window_size=(25, -1), softcap=4.0, alibi_slopes=r.random(H))),
]


@pytest.mark.parametrize("opt", OPTIONS, ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize("H,Hk,Sq", [(8, 2, 1), (4, 1, 7), (3, 3, 2)], ids=["GQA-Sq1", "MQA-Sq7", "MHA-Sq2"])
def test_options(rng, opt, H, Hk, Sq):
    B, D, Smax = 2, 48, 90
    seqlens = np.array([61, 88], dtype=np.int32)
    q, kc, vc, k, v = _data(rng, np.float32, B, Sq, H, Hk, D, Smax, seqlens, snew=2)
    kw = dict(cache_seqlens=seqlens, **opt[1](rng, B, H))
    ref, rlse, _, _ = _ref(q, kc, vc, k, v, **kw)
    for page in (None, 6):
        kk, vv, extra = kc, vc, {}
        if page:
            kk, vv, table = _paged(rng, kc, vc, page)
            extra = dict(block_table=table)
        out, lse, _, _ = _run(q, kk, vv, k, v, num_splits=3, **kw, **extra)
        assert max_err(out, ref) < TOL[np.dtype(np.float32)]
        _close_lse(lse, rlse)


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged7"])
def test_dtypes(rng, dt, paged):
    """float16 / bfloat16 caches are read as stored (widened exactly); new tokens are stored in the cache dtype."""
    B, Sq, H, Hk, D, Smax = 2, 3, 4, 2, 40, 80
    seqlens = np.array([50, 71], dtype=np.int32)
    q, kc, vc, k, v = _data(rng, dt, B, Sq, H, Hk, D, Smax, seqlens, snew=3)
    kw = dict(cache_seqlens=seqlens, causal=True, alibi_slopes=rng.random(H))
    if paged:
        kc, vc, kw["block_table"] = _paged(rng, kc, vc, 7)
    out, lse, okc, ovc = _run(q, kc, vc, k, v, **kw)
    ref, rlse, rkc, rvc = _ref(q, kc, vc, k, v, **kw)
    assert out.dtype == dt and okc.dtype == dt
    assert max_err(out, ref) < TOL[np.dtype(dt)]
    _close_lse(lse, rlse, 1e-4 if dt != np.float64 else 1e-6)
    np.testing.assert_array_equal(okc.view(np.uint8), rkc.view(np.uint8))  # same bits, NaN pages included
    np.testing.assert_array_equal(ovc.view(np.uint8), rvc.view(np.uint8))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged4"])
def test_reference_backend_matches_reference(rng, paged):
    """backend="reference" (rotary and append in the wrapper, then the reference) = the reference function."""
    B, Sq, H, Hk, D, Smax = 2, 3, 4, 2, 16, 32
    seqlens = np.array([10, 25], dtype=np.int32)
    q, kc, vc, k, v = _data(rng, np.float64, B, Sq, H, Hk, D, Smax, seqlens, snew=2)
    cos, sin = np.cos(rng.random((40, 6))), np.sin(rng.random((40, 6)))
    kw = dict(cache_seqlens=seqlens, causal=True, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False,
              softcap=2.0, alibi_slopes=rng.random((B, H)), cache_leftpad=np.array([2, 0], np.int32))
    if paged:
        kc, vc, kw["block_table"] = _paged(rng, kc, vc, 4)
    out, lse, okc, _ = _run(q, kc, vc, k, v, backend="reference", **kw)
    ref, rlse, rkc, _ = _ref(q, kc, vc, k, v, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    _close_lse(lse, rlse, 1e-6)  # the public LSE is float32
    np.testing.assert_allclose(okc, rkc, rtol=1e-12, atol=1e-12, equal_nan=True)
    cpu, _, _, _ = _run(q, kc, vc, k, v, backend="cpu", **kw)
    assert max_err(cpu, ref) < TOL[np.dtype(np.float64)]


# ---------------------------------------------------------------------------------------------- bad inputs
def _bad_cases():
    """(id, mutate(args) -> args, error type, message fragment); args are the keyword arguments of a valid
    paged append call (k/v given, so a late check would have written into the caches)."""
    def with_(**kw):
        return lambda a: {**a, **kw}

    def table_entry(val):
        def f(a):
            t = a["block_table"].copy()
            t[1, 0] = val
            return {**a, "block_table": t}
        return f

    def dup_slots(a):
        t = a["block_table"].copy()
        t[1] = t[0]  # both rows append into the same page slots
        return {**a, "block_table": t, "cache_seqlens": np.array([5, 5], np.int32)}

    return [
        ("table-past-end", table_entry(10_000), ValueError, "block_table"),
        ("table-negative", table_entry(-1), ValueError, "block_table"),
        ("table-float", lambda a: {**a, "block_table": a["block_table"].astype(np.float32)}, TypeError, "block_table"),
        ("table-shape", lambda a: {**a, "block_table": a["block_table"][:1]}, ValueError, "block_table"),
        ("seqlens-past-capacity", with_(cache_seqlens=np.array([5, 28], np.int32)), ValueError, "cache_seqlens"),
        ("seqlens-negative", with_(cache_seqlens=np.array([-1, 3], np.int32)), ValueError, "cache_seqlens"),
        ("seqlens-shape", with_(cache_seqlens=np.array([5, 3, 1], np.int32)), ValueError, "cache_seqlens"),
        ("no-seqlens", with_(cache_seqlens=None), ValueError, "cache_seqlens"),
        ("k-without-v", with_(v=None), ValueError, "k and v"),
        ("k-dtype", lambda a: {**a, "k": a["k"].astype(np.float64)}, TypeError, "k must have the same dtype"),
        ("cache-dtype", lambda a: {**a, "v_cache": a["v_cache"].astype(np.float64)}, TypeError, "v_cache"),
        ("k-shape", lambda a: {**a, "k": a["k"][:, :, :1], "v": a["v"][:, :, :1]}, ValueError, "k must have shape"),
        ("batch-idx-with-table", with_(cache_batch_idx=np.array([0, 1], np.int32)), ValueError, "cache_batch_idx"),
        ("duplicate-slots", dup_slots, ValueError, "same cache slot"),
        ("leftpad", with_(cache_leftpad=np.array([9, 0], np.int32)), ValueError, "cache_leftpad"),
        ("rotary-short", with_(rotary_cos=np.ones((4, 4), np.float32), rotary_sin=np.ones((4, 4), np.float32)),
         ValueError, "rotary_cos"),
        ("rotary-one", with_(rotary_cos=np.ones((40, 4), np.float32)), ValueError, "rotary_cos"),
        ("num-splits", with_(num_splits=-1), ValueError, "num_splits"),
        ("window", with_(window_size=(3,)), ValueError, "window_size"),
        ("backend", with_(backend="tpu"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_and_leave_caches_unchanged(rng, case):
    _, mutate, exc, msg = case
    B, Sq, H, Hk, D = 2, 1, 4, 2, 8
    kc = rng.standard_normal((6, 5, Hk, D)).astype(np.float32)  # 6 pages of 5 slots
    vc = rng.standard_normal((6, 5, Hk, D)).astype(np.float32)
    args = dict(q=rng.standard_normal((B, Sq, H, D)).astype(np.float32), k_cache=kc, v_cache=vc,
                k=rng.standard_normal((B, 3, Hk, D)).astype(np.float32),
                v=rng.standard_normal((B, 3, Hk, D)).astype(np.float32),
                block_table=np.array([[0, 2, 4], [1, 3, 5]], np.int32), cache_seqlens=np.array([5, 3], np.int32),
                backend="cpu")
    kvc(**{**args, "k_cache": kc.copy(), "v_cache": vc.copy()})  # the unmutated call is valid
    args = mutate(args)
    k0, v0 = args["k_cache"].copy(), args["v_cache"].copy()
    with pytest.raises(exc, match=msg):
        kvc(**args)
    np.testing.assert_array_equal(args["k_cache"], k0)
    np.testing.assert_array_equal(args["v_cache"], v0)


def test_bad_contiguous_inputs_leave_caches_unchanged(rng):
    kc = rng.standard_normal((3, 8, 1, 8)).astype(np.float32)
    vc, k0 = kc.copy(), kc.copy()
    q = rng.standard_normal((2, 1, 2, 8)).astype(np.float32)
    k = rng.standard_normal((2, 1, 1, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="cache_batch_idx must not repeat"):
        kvc(q, kc, vc, k, k, cache_seqlens=2, cache_batch_idx=np.array([1, 1], np.int32))
    with pytest.raises(ValueError, match="cache_batch_idx entries"):
        kvc(q, kc, vc, k, k, cache_seqlens=2, cache_batch_idx=np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="cache_seqlens"):
        kvc(q, kc, vc, k, k, cache_seqlens=8)
    with pytest.raises(ValueError, match="multiple of the k/v cache heads"):
        kvc(rng.standard_normal((2, 1, 3, 8)).astype(np.float32), np.ones((3, 8, 2, 8), np.float32),
            np.ones((3, 8, 2, 8), np.float32))
    with pytest.raises(ValueError, match="head dim"):
        kvc(q[..., :4], kc, vc)
    np.testing.assert_array_equal(kc, k0)
    np.testing.assert_array_equal(vc, k0)


@pytest.mark.parametrize("dt", [np.float32, np.float16], ids=dtype_id)
@pytest.mark.parametrize("num_splits", [1, 7], ids=["1split", "7splits"])
def test_cpu_position_blocking_remainders(rng, dt, num_splits):
    """The CPU kernel's four-position score and value passes, with every remainder (key
    counts 0-3 mod 4 per split and tile), GQA rows 4 + 1 per k/v head, many tasks on the work counter."""
    B, Sq, H, Hk, D, Smax = 4, 1, 10, 2, 24, 140
    seqlens = np.array([129, 130, 131, 132], dtype=np.int32)
    q, kc, vc, _, _ = _data(rng, dt, B, Sq, H, Hk, D, Smax, seqlens)
    for paged in (False, True):
        kw = dict(cache_seqlens=seqlens, num_splits=num_splits)
        k_, v_ = kc, vc
        if paged:
            k_, v_, kw["block_table"] = _paged(rng, kc, vc, 3)
        out, lse, _, _ = _run(q, k_, v_, **kw)
        ref, rlse, _, _ = _ref(q, k_, v_, **kw)
        assert max_err(out, ref) < TOL[np.dtype(dt)]
        _close_lse(lse, rlse)


def test_cpu_task_runner_and_combine_variants(rng, monkeypatch):
    """One thread, helper threads (``run_tasks``) and the OpenMP region give bitwise-equal results (each task owns
    its outputs, the same serial split merge follows); the serial and parallel ``combine_cpu`` merges agree."""
    from numba_kernels.cpu import decode_attention as cd

    B, Sq, H, Hk, D, Smax = 3, 2, 8, 2, 16, 300
    seqlens = np.array([300, 17, 255], dtype=np.int32)
    q, kc, vc, _, _ = _data(rng, np.float32, B, Sq, H, Hk, D, Smax, seqlens)
    outs = []
    for nt in (1, 2, None):  # None: the OpenMP region (a call this small)
        orig = cd.decode_cpu
        monkeypatch.setattr(cd, "decode_cpu", lambda *a, _o=orig, _n=nt: _o(*a, nthreads=_n))
        outs.append(_run(q, kc, vc, cache_seqlens=seqlens, num_splits=5)[:2])
        monkeypatch.setattr(cd, "decode_cpu", orig)
    for o in outs[1:]:
        np.testing.assert_array_equal(outs[0][1], o[1])
        np.testing.assert_array_equal(outs[0][0], o[0])
    ref, rlse, _, _ = _ref(q, kc, vc, cache_seqlens=seqlens)
    assert max_err(outs[1][0], ref) < TOL[np.dtype(np.float32)]
    _close_lse(outs[1][1], rlse)
    op = rng.standard_normal((4, 50, 16)).astype(np.float32)
    lp = rng.standard_normal((4, 50)).astype(np.float32)
    lp[:, 3] = -np.inf  # a row no split sees
    lp[1:, 7] = -np.inf
    res = []
    for lim in (1 << 20, 0):  # the serial, then the parallel merge
        monkeypatch.setattr(cd, "COMBINE_SERIAL_MAX", lim)
        o, l = np.empty((50, 16), np.float32), np.empty(50, np.float32)
        cd.combine_cpu(op, lp, o, l)
        res.append((o, l))
    np.testing.assert_allclose(res[0][0], res[1][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(res[0][1], res[1][1])
    np.testing.assert_array_equal(res[0][0][3], 0)


def test_cpu_region_stall_backoff(rng, monkeypatch):
    """A short call whose OpenMP region stalled sends the next calls to the task runner for REGION_BACKOFF_S
    seconds (same results), then the region is tried again."""
    from numba_kernels.cpu import decode_attention as cd

    B, Sq, H, Hk, D, Smax = 2, 1, 8, 2, 16, 64
    seqlens = np.array([64, 40], dtype=np.int32)
    q, kc, vc, _, _ = _data(rng, np.float32, B, Sq, H, Hk, D, Smax, seqlens)
    calls = []
    orig = cd.run_tasks
    monkeypatch.setattr(cd, "run_tasks", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    monkeypatch.setattr(cd, "_region_backoff_until", [0.0])
    monkeypatch.setattr(cd, "REGION_STALL_S", 1e9)  # no call counts as stalled (a busy test machine, a compile)
    ref = _run(q, kc, vc, cache_seqlens=seqlens)[:2]
    assert not calls  # a short call: the region
    monkeypatch.setattr(cd, "REGION_STALL_S", -1.0)  # every region call counts as stalled
    _run(q, kc, vc, cache_seqlens=seqlens)
    assert not calls and cd._region_backoff_until[0] > 0
    monkeypatch.setattr(cd, "REGION_STALL_S", 1e9)
    out = _run(q, kc, vc, cache_seqlens=seqlens)[:2]
    assert len(calls) == 1  # backed off to the task runner
    np.testing.assert_array_equal(out[0], ref[0])
    np.testing.assert_array_equal(out[1], ref[1])
    cd._region_backoff_until[0] = 0.0  # backoff over: the region again
    _run(q, kc, vc, cache_seqlens=seqlens)
    assert len(calls) == 1
