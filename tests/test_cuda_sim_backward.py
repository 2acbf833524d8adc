"""The CUDA flash_attention backward under the CUDA simulator (tiny shapes and tiles): the same kernel source as
on the GPU (CUDA-core and tensor-core kernels), compared with the float64 reference backward.

Run in its own process with NUMBA_ENABLE_CUDASIM=1 (tests/run_all.sh does). The same checks run on a real
GPU in benchmarks/gpu/check_flash_attention_backward.py."""
import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels._dispatch import bfloat16
from numba_kernels.reference.flash_attention import flash_attention_ref, flash_attention_varlen_ref
from numba_kernels.reference.flash_attention_backward import (flash_attention_backward_ref,
                                                              flash_attention_varlen_backward_ref)
from tests.conftest import TOL, max_err

pytestmark = pytest.mark.sim


def _inputs(rng, B, Sq, Sk, H, Hk, D):
    return (rng.standard_normal((B, Sq, H, D)), rng.standard_normal((B, Sq, H, D)),
            rng.standard_normal((B, Sk, Hk, D)), rng.standard_normal((B, Sk, Hk, D)))


def _check(got, ref, dt, factor=1.0):
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert g.dtype == np.dtype(dt) and g.shape == r.shape
        e = max_err(g.astype(np.float64), r)
        assert e < factor * TOL[np.dtype(dt)], f"d{name}: {e}"


CASES = [
    ("plain", dict()),
    ("causal", dict(causal=True)),
    ("window", dict(window_size=(5, 3))),
    ("softcap-alibi-dropout", dict(softcap=3.0, alibi_slopes=np.array([0.3, 0.7]), dropout_p=0.2, seed=11)),
]


def _run(rng, dt, kw, shape, deterministic, factor=1.0):
    do, q, k, v = _inputs(rng, *shape)
    out, lse = flash_attention_ref(q, k, v, return_lse=True, **kw)
    ref = flash_attention_backward_ref(do, q, k, v, out, lse, **kw)
    args = [x.astype(dt) for x in (do, q, k, v, out)]
    got = nk.flash_attention_backward(*args, lse.astype(np.float32 if dt != np.float64 else np.float64),
                                      backend="cuda", deterministic=deterministic, **kw)
    _check(got, ref, dt, factor)
    return args, lse, got


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_sim_backward_simt_float32(rng, name, kw):
    # GQA (2 query heads on 1 k/v head), Sk across several key tiles, D=20 padded
    _run(rng, np.float32, kw, (1, 9, 37, 2, 1, 20), deterministic=(name != "plain"))


def test_sim_backward_float64_causal_sq_gt_sk(rng):
    # Sq > Sk with causal: the first rows see no key and get zero gradients
    _run(rng, np.float64, dict(causal=True), (1, 11, 6, 2, 2, 8), deterministic=False)


def test_sim_backward_deterministic_twice_equal(rng):
    args, lse, a = _run(rng, np.float32, dict(causal=True), (1, 9, 37, 2, 1, 20), deterministic=True)
    b = nk.flash_attention_backward(*args, lse.astype(np.float32), causal=True, backend="cuda", deterministic=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_sim_backward_varlen(rng):
    cq = np.array([0, 7, 10], np.int32)
    ck = np.array([0, 3, 18], np.int32)
    q, do = (rng.standard_normal((10, 2, 8)) for _ in range(2))
    k, v = (rng.standard_normal((18, 1, 8)) for _ in range(2))
    out, lse = flash_attention_varlen_ref(q, k, v, cq, ck, causal=True, return_lse=True)
    ref = flash_attention_varlen_backward_ref(do, q, k, v, out, lse, cq, ck, causal=True)
    args = [x.astype(np.float32) for x in (do, q, k, v, out)]
    got = nk.flash_attention_varlen_backward(*args, lse.astype(np.float32), cq, ck, causal=True, backend="cuda")
    _check(got, ref, np.float32)
    np.testing.assert_array_equal(got[0][:4], 0.0)  # rows 0..3 of sequence 0 see no key


TC_CASES = [
    ("f16-plain-atomic-dq", np.float16, dict(), False),
    ("bf16-causal-deterministic", bfloat16, dict(causal=True), True),
    ("bf16-window", bfloat16, dict(window_size=(5, 3)), False),
    # the window hides whole warps' key / row slabs from some tiles (warp skip in both kernels)
    ("f16-window-deterministic", np.float16, dict(window_size=(2, 1)), True),
    ("f16-softcap-alibi-dropout-deterministic", np.float16,
     dict(softcap=3.0, alibi_slopes=np.array([0.3, 0.7]), dropout_p=0.2, seed=11), True),
    ("bf16-softcap-alibi-dropout", bfloat16,
     dict(softcap=3.0, alibi_slopes=np.array([0.3, 0.7]), dropout_p=0.2, seed=11), False),
]


@pytest.mark.parametrize("name,dt,kw,det", TC_CASES, ids=[c[0] for c in TC_CASES])
def test_sim_backward_tensor_cores(rng, name, dt, kw, det):
    # the tensor-core kernels on 2-warp key tiles: Sk=37 spans two key tiles and ends mid-tile, Sq=19 two
    # query tiles; GQA (2 query heads on 1 k/v head); D=20 padded to 32
    _run(rng, dt, kw, (1, 19, 37, 2, 1, 20), deterministic=det)


def test_sim_backward_tensor_cores_deterministic_twice_equal_varlen(rng):
    cq = np.array([0, 7, 23], np.int32)
    ck = np.array([0, 3, 21], np.int32)
    q, do = (rng.standard_normal((23, 2, 16)) for _ in range(2))
    k, v = (rng.standard_normal((21, 2, 16)) for _ in range(2))
    out, lse = flash_attention_varlen_ref(q, k, v, cq, ck, causal=True, return_lse=True)
    ref = flash_attention_varlen_backward_ref(do, q, k, v, out, lse, cq, ck, causal=True)
    args = [x.astype(np.float16) for x in (do, q, k, v, out)] + [lse.astype(np.float32), cq, ck]
    a = nk.flash_attention_varlen_backward(*args, causal=True, backend="cuda", deterministic=True)
    b = nk.flash_attention_varlen_backward(*args, causal=True, backend="cuda", deterministic=True)
    _check(a, ref, np.float16)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))
    np.testing.assert_array_equal(a[0][:4].astype(np.float32), 0.0)  # rows 0..3 of sequence 0 see no key


def test_sim_backward_half_above_tensor_core_head_dim(rng):
    """Head dims above TC_BWD_MAX_D run on the CUDA-core kernels (widened to float32)."""
    _run(rng, np.float16, dict(causal=True), (1, 5, 6, 1, 1, 136), deterministic=False)


@pytest.mark.parametrize("tiles", [((4, 32), (1, 16), True), ((2, 32), (1, 16), True)],
                         ids=["4-warps-2-m-tiles-dq-column-slices", "2-warps-2-m-tiles-one-slice"])
def test_sim_backward_dq_reductions_tile_geometry(rng, monkeypatch, tiles):
    """dQ by reductions with 2 m-tiles of query rows per tile (warp w does m-tile w % 2, a head-dim slice w // 2):
    the geometry of the GPU's D 128 (4, 32) and short-range tiles, which the default simulator tiles (1 m-tile)
    do not reach; causal GQA with ragged tiles, D 32."""
    from numba_kernels.cuda import flash_attention_backward as cfb

    monkeypatch.setattr(cfb, "TC_BWD_TILES_SIM", tiles)
    _run(rng, bfloat16, dict(causal=True), (1, 37, 45, 2, 1, 32), deterministic=False)


@pytest.mark.parametrize("name,dt,kw", [("bf16-causal", bfloat16, dict(causal=True)),
                                        ("f16-window-softcap-alibi-dropout", np.float16,
                                         dict(window_size=(5, 3), softcap=3.0, alibi_slopes=np.array([0.3, 0.7]),
                                              dropout_p=0.2, seed=11))],
                         ids=["bf16-causal", "f16-window-softcap-alibi-dropout"])
def test_sim_backward_dq_pass_q_in_registers(rng, monkeypatch, name, dt, kw):
    """The deterministic dQ pass with its warp's Q / dO fragments read once into registers (TC_BWD_DQ_QREG): ragged
    query and key tiles (Sq 19, Sk 37), GQA, D 20 padded to 32, so each warp's fragments span two k-steps."""
    from numba_kernels.cuda import flash_attention_backward as cfb

    monkeypatch.setattr(cfb, "TC_BWD_DQ_QREG", True)
    _run(rng, dt, kw, (1, 19, 37, 2, 1, 20), deterministic=True)


WGMMA_CASES = [("bf16-causal", bfloat16, dict(causal=True)),
               ("f16-window-softcap-alibi-dropout", np.float16,
                dict(window_size=(20, 3), softcap=3.0, alibi_slopes=np.array([0.3, 0.7]), dropout_p=0.2, seed=11))]


@pytest.mark.parametrize("name,dt,kw", WGMMA_CASES, ids=[c[0] for c in WGMMA_CASES])
def test_sim_backward_wgmma_dkdv(rng, monkeypatch, name, dt, kw):
    """The Hopper dK/dV kernel (warpgroup MMA from canonical-layout shared tiles, TC_BWD_WGMMA_SIM) with the simulator's
    warpgroup products: one warpgroup (64 keys), 16 query rows per tile; Sk 70 spans two key tiles and ends mid-tile
    (the second warpgroup tile half past the end), Sq 37 three ragged query tiles, GQA, D 20 padded to 32 (two
    k-steps of S^T, the head dim past 20 zero-filled)."""
    from numba_kernels.cuda import flash_attention_backward as cfb

    monkeypatch.setattr(cfb, "TC_BWD_WGMMA_SIM", (1, 16))
    _run(rng, dt, kw, (1, 37, 70, 2, 1, 20), deterministic=True)


@pytest.mark.parametrize("nwg", [1, 2], ids=["1-warpgroup", "2-warpgroups"])
def test_sim_backward_wgmma_with_dq(rng, monkeypatch, nwg):
    """The wgmma kernel computing dQ as well (TC_BWD_WGMMA_DQ, deterministic=False): dS^T through shared memory as the
    transposed A operand of dQ = dS K, warpgroup w taking the dQ columns w D / NWG .., fp32 reductions into the dQ
    buffer; 64 query rows per tile (Sq 70: a full and a ragged tile), Sk 150 over two or three key blocks (a hidden
    warpgroup writes zeros to its dS^T rows), causal GQA, D 20 padded to 32."""
    from numba_kernels.cuda import flash_attention_backward as cfb

    monkeypatch.setattr(cfb, "TC_BWD_WGMMA_SIM", (nwg, 64))
    monkeypatch.setattr(cfb, "TC_BWD_WGMMA_DQ", True)
    _run(rng, bfloat16, dict(causal=True), (1, 70, 150, 2, 1, 20), deterministic=False)


PIPE_CASES = [("causal-alibi-dq", dict(causal=True, alibi_slopes=np.array([0.3, 0.7])), False),
              ("window-deterministic", dict(window_size=(40, 7)), True)]


@pytest.mark.parametrize("name,kw,det", PIPE_CASES, ids=[c[0] for c in PIPE_CASES])
def test_sim_backward_wgmma_pipelined(rng, monkeypatch, name, kw, det):
    """The wgmma kernel with its products overlapping the elementwise work (TC_BWD_WGMMA_PIPE: S^T and dP^T in two
    commit groups, P from S^T, dV issued before dS): 2 warpgroups, 64 query rows, with dQ fused (causal ALiBi GQA)
    and with the dQ pass (window); Sq 70, Sk 150, D 20 padded to 32."""
    from numba_kernels.cuda import flash_attention_backward as cfb

    monkeypatch.setattr(cfb, "TC_BWD_WGMMA_SIM", (2, 64))
    monkeypatch.setattr(cfb, "TC_BWD_WGMMA_PIPE", True)
    _run(rng, bfloat16, kw, (1, 70, 150, 2, 1, 20), deterministic=det)


DQPASS_CASES = [("bf16-causal", bfloat16, dict(causal=True)),
                ("f16-window-softcap-alibi-dropout", np.float16,
                 dict(window_size=(20, 3), softcap=3.0, alibi_slopes=np.array([0.3, 0.7]), dropout_p=0.2, seed=11))]


@pytest.mark.parametrize("name,dt,kw", DQPASS_CASES, ids=[c[0] for c in DQPASS_CASES])
def test_sim_backward_wgmma_dq_pass(rng, monkeypatch, name, dt, kw):
    """The deterministic dQ pass on warpgroup MMA (TC_BWD_WGMMA_DQPASS): 64 query rows per warpgroup (Sq 70: a full
    and a ragged query tile), 16-key tiles over Sk 37 (three, the last ragged), GQA, D 20 padded to 32; run twice,
    bitwise equal."""
    from numba_kernels.cuda import flash_attention_backward as cfb

    monkeypatch.setattr(cfb, "TC_BWD_WGMMA_DQPASS_SIM", (1, 16))
    args, lse, got = _run(rng, dt, kw, (1, 70, 37, 2, 1, 20), deterministic=True)
    again = nk.flash_attention_backward(*args, lse.astype(np.float32), backend="cuda", deterministic=True, **kw)
    for x, y in zip(got, again):
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))
