"""The CUDA kernels under the CUDA simulator (tiny shapes and tiles): same kernel source as the GPU,
with the warp-collective helpers (shuffles, mma.sync, ldmatrix) emulated lane by lane.

Run in their own process with NUMBA_ENABLE_CUDASIM=1 (tests/run_all.sh does). The same checks run on
a real GPU in benchmarks/gpu/check_flash_attention.py."""
import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels._dispatch import bfloat16
from numba_kernels.reference.flash_attention import flash_attention_ref, flash_attention_varlen_ref
from tests.conftest import TOL, dtype_id, max_err

pytestmark = pytest.mark.sim


def _qkv(rng, dt, B, Sq, Sk, H, Hk, D):
    return (rng.standard_normal((B, Sq, H, D)).astype(dt), rng.standard_normal((B, Sk, Hk, D)).astype(dt),
            rng.standard_normal((B, Sk, Hk, D)).astype(dt))


CASES = [
    ("plain", {}),
    ("causal", dict(causal=True)),
    ("window", dict(window_size=(5, 3))),
    ("softcap-alibi-dropout", dict(softcap=3.0, alibi_slopes=np.array([0.3, 0.7]), dropout_p=0.2, seed=11)),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dt", [np.float16, bfloat16, np.float32], ids=dtype_id)
def test_sim_forward(rng, dt, name, kw):
    # Sk spans several 16-key tiles and ends mid-tile; D=20 exercises head-dim padding
    q, k, v = _qkv(rng, dt, 1, 19, 37, 2, 1, 20)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cuda", **kw)
    ref, rlse = flash_attention_ref(q, k, v, return_lse=True, **kw)
    assert out.dtype == np.dtype(dt) and out.shape == q.shape
    assert max_err(out, ref) < TOL[np.dtype(dt)]
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], rlse[np.isfinite(rlse)], rtol=1e-5, atol=1e-5)


def test_sim_float64(rng):
    q, k, v = _qkv(rng, np.float64, 1, 9, 40, 2, 2, 8)
    out = nk.flash_attention(q, k, v, causal=True, backend="cuda")
    assert max_err(out, flash_attention_ref(q, k, v, causal=True)) < 1e-10


@pytest.mark.parametrize("dt", [np.float16, np.float32], ids=dtype_id)
def test_sim_masked_rows_and_varlen(rng, dt):
    lens_q, lens_k = [20, 3], [6, 17]
    cq = np.array([0, 20, 23], np.int32)
    ck = np.array([0, 6, 23], np.int32)
    q = rng.standard_normal((23, 2, 16)).astype(dt)
    k, v = (rng.standard_normal((23, 1, 16)).astype(dt) for _ in range(2))
    out, lse = nk.flash_attention_varlen(q, k, v, cq, ck, causal=True, return_lse=True, backend="cuda")
    ref, rlse = flash_attention_varlen_ref(q, k, v, cq, ck, causal=True, return_lse=True)
    assert np.isfinite(out.astype(np.float32)).all()
    np.testing.assert_array_equal(out[:14].astype(np.float32), 0.0)  # rows 0..13 of sequence 0 see no key
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
    assert max_err(out, ref) < TOL[np.dtype(dt)]


def test_sim_dropout_mask_equals_cpu(rng):
    q, k, v = _qkv(rng, np.float32, 1, 9, 33, 2, 2, 8)
    a = nk.flash_attention(q, k, v, dropout_p=0.4, seed=2024, backend="cuda")
    b = nk.flash_attention(q, k, v, dropout_p=0.4, seed=2024, backend="cpu")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sim_device_arrays_stay_on_device(rng):
    from numba import cuda

    q, k, v = _qkv(rng, np.float32, 1, 8, 8, 1, 1, 8)
    out = nk.flash_attention(cuda.to_device(q), cuda.to_device(k), cuda.to_device(v))
    assert hasattr(out, "copy_to_host")
    assert max_err(out.copy_to_host(), flash_attention_ref(q, k, v)) < 2e-5


def test_sim_one_m_tile_per_warp(rng, monkeypatch):
    """The default simulator tiles give each warp 2 m-tiles; check the 1-m-tile variant too."""
    from numba_kernels.cuda import flash_attention as cfa

    monkeypatch.setattr(cfa, "TC_TILES_SIM", (1, 1, 16))
    q, k, v = _qkv(rng, np.float16, 1, 19, 37, 2, 1, 20)
    out = nk.flash_attention(q, k, v, causal=True, backend="cuda")
    assert max_err(out, flash_attention_ref(q, k, v, causal=True)) < TOL[np.dtype(np.float16)]


ROWBOUND_CASES = [
    ("plain-ragged-last-tile", (19, 37), {}),
    ("causal", (19, 37), dict(causal=True)),
    ("window", (19, 37), dict(window_size=(5, 3))),
    ("left-window-only", (19, 37), dict(window_size=(4, -1))),
    ("causal-sq-gt-sk-masked-rows", (23, 9), dict(causal=True)),
    ("window-softcap-alibi-dropout", (19, 37), dict(window_size=(6, 2), softcap=3.0,
                                                   alibi_slopes=np.array([0.3, 0.7]), dropout_p=0.2, seed=11)),
]


@pytest.mark.parametrize("name,shape,kw", ROWBOUND_CASES, ids=[c[0] for c in ROWBOUND_CASES])
def test_sim_forward_row_bounds_mask(rng, monkeypatch, name, shape, kw):
    """The forward's masked tiles through per-row 32-bit column bounds (TC_ROWBOUNDS): the key-range end, causal
    (bottom-right, with rows that see no key when Sq > Sk), two-sided and left-only windows, with softcap, ALiBi
    and dropout; output and LSE against the float64 reference."""
    from numba_kernels.cuda import flash_attention as cfa

    monkeypatch.setattr(cfa, "TC_ROWBOUNDS", True)
    q, k, v = _qkv(rng, np.float16, 1, shape[0], shape[1], 2, 1, 20)
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cuda", **kw)
    ref, rlse = flash_attention_ref(q, k, v, return_lse=True, **kw)
    assert max_err(out, ref) < TOL[np.dtype(np.float16)]
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
    fin = np.isfinite(rlse)
    np.testing.assert_allclose(lse[fin], rlse[fin], rtol=1e-4, atol=1e-4)


def test_sim_forward_row_bounds_varlen(rng, monkeypatch):
    """TC_ROWBOUNDS with varlen causal: per-sequence key ranges, a sequence whose rows see no key."""
    from numba_kernels.cuda import flash_attention as cfa

    monkeypatch.setattr(cfa, "TC_ROWBOUNDS", True)
    cq, ck = np.array([0, 20, 23], np.int32), np.array([0, 6, 23], np.int32)
    q = rng.standard_normal((23, 2, 16)).astype(np.float16)
    k, v = (rng.standard_normal((23, 1, 16)).astype(np.float16) for _ in range(2))
    out = nk.flash_attention_varlen(q, k, v, cq, ck, causal=True, backend="cuda")
    ref = flash_attention_varlen_ref(q, k, v, cq, ck, causal=True)
    assert max_err(out, ref) < TOL[np.dtype(np.float16)]


@pytest.mark.parametrize("causal", [False, True])
def test_sim_forward_generic_tile_loader(rng, monkeypatch, causal):
    """The forward's generic tile copies (TC_ROWLOAD off, the default before 2026-12-03; still selectable): ragged
    last tiles and a padded head dim."""
    from numba_kernels.cuda import flash_attention as cfa

    monkeypatch.setattr(cfa, "TC_ROWLOAD", False)
    q, k, v = _qkv(rng, np.float16, 1, 19, 37, 2, 1, 20)
    out = nk.flash_attention(q, k, v, causal=causal, backend="cuda")
    assert max_err(out, flash_attention_ref(q, k, v, causal=causal)) < TOL[np.dtype(np.float16)]


@pytest.mark.parametrize("name,kw", CASES + [("varlen-causal", dict(causal=True))],
                         ids=[c[0] for c in CASES] + ["varlen-causal"])
@pytest.mark.parametrize("D", [20, 48], ids=["D20-fixed-columns", "D48-chunks-not-dividing-the-threads"])
def test_sim_forward_row_loader_lazy(rng, monkeypatch, name, kw, D):
    """The tensor-core forward with its tiles through make_row_loader and the lazy rescale (TC_ROWLOAD on by default,
    TC_LAZY off: timed on the H200 and not faster): ragged last tiles of Q and K/V, padded head dims, varlen with rows that see no
    key; keys scaled up along the sequence so the running max keeps moving."""
    from numba_kernels.cuda import flash_attention as cfa

    monkeypatch.setattr(cfa, "TC_ROWLOAD", True)
    monkeypatch.setattr(cfa, "TC_LAZY", True)
    if name.startswith("varlen"):
        cq, ck = np.array([0, 20, 23], np.int32), np.array([0, 6, 23], np.int32)
        q = rng.standard_normal((23, 2, D)).astype(bfloat16)
        k, v = (rng.standard_normal((23, 1, D)).astype(bfloat16) for _ in range(2))
        out = nk.flash_attention_varlen(q, k, v, cq, ck, backend="cuda", **kw)
        ref = flash_attention_varlen_ref(q, k, v, cq, ck, **kw)
    else:
        q, k, v = _qkv(rng, np.float64, 1, 19, 37, 2, 1, D)
        k = (k * np.linspace(0.2, 3.0, 37)[None, :, None, None]).astype(bfloat16)
        q, v = q.astype(bfloat16), v.astype(bfloat16)
        out = nk.flash_attention(q, k, v, backend="cuda", **kw)
        ref = flash_attention_ref(q, k, v, **kw)
    assert max_err(out, ref) < TOL[np.dtype(bfloat16)]
