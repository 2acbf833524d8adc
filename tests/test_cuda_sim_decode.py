"""Decode attention CUDA kernels under the simulator (tiny shapes and tiles): the tensor-core kernel
(float16/bfloat16), the CUDA-core kernel (float32/float64, odd head dims), the rotary/append kernels on
device caches through a page table, the split merge and attention_combine. The same checks run on a real
GPU in benchmarks/gpu/check_decode_attention.py."""
import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels._dispatch import bfloat16
from numba_kernels.reference.decode_attention import attention_combine_ref, flash_attention_with_kvcache_ref
from tests.conftest import TOL, dtype_id, max_err

pytestmark = pytest.mark.sim


def _dev(x):
    from numba import cuda

    return cuda.to_device(x.view(np.uint16) if x.dtype == bfloat16 else x)


def _host(x, dt):
    h = x.copy_to_host()
    return h.view(bfloat16) if dt == bfloat16 else h


CASES = [  # (dtype, head dim, page size (0 = contiguous), Sq, new tokens, num_splits, rotary, options)
    (np.float16, 16, 5, 1, 2, 0, None, {}),
    (bfloat16, 32, 3, 3, 3, 2, None, dict(causal=True)),
    (np.float16, 16, 0, 5, 1, 1, True, dict(softcap=2.0, alibi_slopes=np.array([0.2, 0.5, 0.1, 0.9]))),
    (np.float32, 40, 7, 2, 2, 3, False, dict(window_size=(6, 0))),
    (np.float64, 24, 0, 1, 0, 2, None, dict(cache_leftpad=np.array([2, 0], np.int32))),
    (np.float16, 20, 4, 2, 1, 0, True, dict(causal=True)),  # head dim not a multiple of 8: CUDA cores
    (bfloat16, 16, 4, 1, 1, 10, None, {}),  # more splits than the kernel merges itself: the merge kernel
]


@pytest.mark.parametrize("dt,D,page,Sq,snew,ns,rot,kw", CASES,
                         ids=[f"{dtype_id(c[0])}-D{c[1]}-page{c[2]}-Sq{c[3]}-ns{c[5]}" for c in CASES])
def test_sim_decode(rng, dt, D, page, Sq, snew, ns, rot, kw):
    _decode_case(rng, dt, D, page, Sq, snew, ns, rot, kw)


def _decode_case(rng, dt, D, page, Sq, snew, ns, rot, kw):
    B, H, Hk = 2, 4, 2
    seqlens = np.array([7, 19], np.int32)
    q = rng.standard_normal((B, Sq, H, D)).astype(dt)
    if page:
        nb = 2 * (-(-24 // page)) + 1
        kc, vc = (rng.standard_normal((nb, page, Hk, D)).astype(dt) for _ in range(2))
        kw = dict(kw, block_table=rng.permutation(nb)[:nb - 1].reshape(2, -1).astype(np.int32))
    else:
        kc, vc = (rng.standard_normal((B, 24, Hk, D)).astype(dt) for _ in range(2))
    k, v = ((rng.standard_normal((B, snew, Hk, D)).astype(dt) for _ in range(2)) if snew else (None, None))
    if rot is not None:
        kw = dict(kw, rotary_cos=rng.standard_normal((30, D // 4)), rotary_sin=rng.standard_normal((30, D // 4)),
                  rotary_interleaved=rot)
    kc_ref, vc_ref = kc.copy(), vc.copy()
    ref, rlse = flash_attention_with_kvcache_ref(q, kc_ref, vc_ref, k, v, cache_seqlens=seqlens, return_lse=True, **kw)
    kd, vd = _dev(kc), _dev(vc)
    out, lse = nk.flash_attention_with_kvcache(q, kd, vd, k, v, cache_seqlens=seqlens, num_splits=ns,
                                               return_lse=True, backend="cuda", **kw)
    tol = TOL[np.dtype(dt)]
    assert max_err(_host(out, dt), ref) < tol
    assert max_err(_host(kd, dt), kc_ref) < tol and max_err(_host(vd, dt), vc_ref) < tol  # the append
    lse = lse.copy_to_host()
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
    np.testing.assert_allclose(lse, rlse, rtol=1e-5, atol=max(1e-5, tol))


def test_sim_masked_rows_give_zero(rng):
    """Sq > keys with causal: the first rows see nothing (0 out, -inf LSE); an empty cache too."""
    q = rng.standard_normal((2, 4, 2, 16)).astype(np.float16)
    kc, vc = (rng.standard_normal((2, 8, 1, 16)).astype(np.float16) for _ in range(2))
    seqlens = np.array([2, 0], np.int32)
    out, lse = nk.flash_attention_with_kvcache(q, _dev(kc), _dev(vc), cache_seqlens=seqlens, causal=True,
                                               num_splits=2, return_lse=True, backend="cuda")
    ref, rlse = flash_attention_with_kvcache_ref(q, kc, vc, cache_seqlens=seqlens, causal=True, return_lse=True)
    out = out.copy_to_host()
    assert np.isfinite(out.astype(np.float32)).all() and max_err(out, ref) < TOL[np.dtype(np.float16)]
    np.testing.assert_array_equal(out[1], 0)
    np.testing.assert_array_equal(np.isfinite(lse.copy_to_host()), np.isfinite(rlse))


@pytest.mark.parametrize("S", [3, 11, 260], ids=["3-splits", "11-splits", "260-splits-past-the-weight-table"])
def test_sim_attention_combine(rng, S):
    """The merge kernel: fewer splits than one unrolled load group, several groups with a ragged end, and more
    splits than its shared weight table holds (weights recomputed)."""
    D = 8 if S < 100 else 2
    o = rng.standard_normal((S, 2, 2, 2, D)).astype(np.float32)
    lp = rng.standard_normal((S, 2, 2, 2)).astype(np.float32)
    lp[0, 0, 0, 0] = -np.inf
    lp[:, 1, 1, 1] = -np.inf
    o[1, 0, 1, 0] = np.nan  # a split with weight 0 must not reach the output
    lp[1, 0, 0, 1] = -np.inf
    out, lse = nk.attention_combine(_dev(o), _dev(lp), return_lse=True, backend="cuda")
    ref, rlse = attention_combine_ref(np.nan_to_num(o), np.transpose(lp, (0, 1, 3, 2)))
    assert max_err(out.copy_to_host(), ref) < 1e-6
    np.testing.assert_allclose(lse.copy_to_host(), np.transpose(rlse, (0, 2, 1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tiles", [(2, 2, 32, True, True, False), (2, 3, 16, False, False, True),
                                   (2, 2, 16, False, False, True, True), (2, 2, 32, False, True, False, True)],
                         ids=["32-key-tiles-qreg-prefetch", "early-page-lookup", "registers-early-lookup",
                              "registers-32-key-tiles"])
def test_sim_decode_tile_variants(rng, monkeypatch, tiles):
    """Tensor-core variants: 32-key tiles with Q fragments in registers and the prefetch-hinted copy (its
    simulator form); page lookups one iteration early (3 stages, so the early lookup crosses the ring);
    K/V staged through registers instead of cp.async, with and without the early lookups."""
    from numba_kernels.cuda import decode_attention as cda

    monkeypatch.setitem(cda.TC_TILES, "sim", tiles)
    q = rng.standard_normal((2, 2, 4, 16)).astype(bfloat16)
    kc, vc = (rng.standard_normal((61, 5, 2, 16)).astype(bfloat16) for _ in range(2))
    bt = rng.permutation(61)[:60].reshape(2, 30).astype(np.int32)
    seqlens = np.array([150, 37], np.int32)  # several tiles per warp: the in-loop issues run
    for ns in (1, 2):
        out = nk.flash_attention_with_kvcache(q, _dev(kc), _dev(vc), cache_seqlens=seqlens, block_table=bt,
                                              causal=True, num_splits=ns, backend="cuda")
        ref = flash_attention_with_kvcache_ref(q, kc, vc, cache_seqlens=seqlens, block_table=bt, causal=True)
        assert max_err(_host(out, bfloat16), ref) < TOL[np.dtype(bfloat16)]


@pytest.mark.parametrize("tiles,D", [((2, 3, 16, False, False, True, False, 7), 16),
                                     ((2, 2, 16, False, False, True, True, 7), 32),
                                     ((2, 2, 32, False, False, False, False, 6), 16),
                                     ((2, 3, 16, False, False, True, False, 7), 48)],
                         ids=["all-lean-cp.async", "all-lean-registers", "32-key-tiles-mask-skip-lazy",
                              "head-dim-48-chunks-not-dividing-32"])
@pytest.mark.parametrize("grow", [False, True], ids=["flat-scores", "scores-growing-along-the-cache"])
def test_sim_decode_lean(rng, monkeypatch, tiles, D, grow):
    """The instruction-lean tile loop (LEAN bits): per-lane copy offsets, the unmasked path for tiles every
    query row sees whole (windowed and causal with Sq 2, so both paths run), and the lazy rescale, whose
    running max moves only past 2^8: keys scaled up along the cache make every tile move it, flat ones none."""
    from numba_kernels.cuda import decode_attention as cda

    monkeypatch.setitem(cda.TC_TILES, "sim", tiles)
    q = rng.standard_normal((2, 2, 4, D)).astype(bfloat16)
    kc, vc = (rng.standard_normal((61, 5, 2, D)) for _ in range(2))
    bt = rng.permutation(61)[:60].reshape(2, 30).astype(np.int32)
    if grow:  # key magnitudes rising with the logical position, through the page table
        kc[bt] *= np.linspace(0.1, 4.0, 150).reshape(1, 30, 5, 1, 1)
    kc, vc = kc.astype(bfloat16), vc.astype(bfloat16)
    seqlens = np.array([150, 37], np.int32)
    for kw in (dict(causal=True), dict(window_size=(70, 0))):
        out, lse = nk.flash_attention_with_kvcache(q, _dev(kc), _dev(vc), cache_seqlens=seqlens, block_table=bt,
                                                   num_splits=2, return_lse=True, backend="cuda", **kw)
        ref, rlse = flash_attention_with_kvcache_ref(q, kc, vc, cache_seqlens=seqlens, block_table=bt,
                                                     return_lse=True, **kw)
        assert max_err(_host(out, bfloat16), ref) < TOL[np.dtype(bfloat16)]
        np.testing.assert_allclose(lse.copy_to_host(), rlse, rtol=1e-4, atol=1e-3)


def test_launch_param_format():
    """The light launch path packs numba's flattened kernel ABI: 8-byte slots, an array is 5 + 2 * ndim of them."""
    from numba.cuda import types

    from numba_kernels.cuda._launch import param_format

    fmt, kinds = param_format((types.Array(types.float32, 4, "C"), types.int32, types.float32, types.boolean,
                               types.Array(types.uint32, 1, "C"), types.float64))
    assert kinds == (0, 1, 1, 1, 0, 1)
    assert fmt.size == 8 * ((5 + 8) + 1 + 1 + 1 + (5 + 2) + 1)
    with pytest.raises(NotImplementedError):
        param_format((types.complex64,))


def test_pooled_results_reused_only_when_released(monkeypatch):
    """_fresh hands out a pooled buffer again only once nothing outside the pool holds it (or a view of its memory)."""
    from types import SimpleNamespace

    from numba_kernels.cuda import decode_attention as cda

    class FakeArr:
        def __init__(self):
            self.gpu_data = object()

        def view(self, dtype=None):
            v = FakeArr()
            v.gpu_data = self.gpu_data
            return v

    fake = SimpleNamespace(device_array=lambda shape, dtype: FakeArr(),
                           get_current_device=lambda: SimpleNamespace(id=0))
    monkeypatch.setattr(cda, "cuda", fake)
    monkeypatch.setattr(cda, "intr", SimpleNamespace(SIM=False))
    monkeypatch.setattr(cda, "_pool", {})
    a = cda._fresh((3,), np.float32)
    b = cda._fresh((3,), np.float32)
    assert b is not a  # a is still held
    va = a.view()
    del a
    c = cda._fresh((3,), np.float32)
    assert c is not va and c.gpu_data is not va.gpu_data  # a's memory is still seen through a view
    del va, c
    d = cda._fresh((3,), np.float32)
    e = cda._fresh((3,), np.float32)
    assert d is not e and {id(d), id(e)} <= {id(x[0]) for x in cda._pool[((3,), np.dtype(np.float32).str, None, 0)]}
    del d, e
    # with a cached view: the caller holds the view only; the buffer comes back once the view is dropped
    f, fv = cda._fresh((5,), np.float32, np.uint16)
    del f
    g, gv = cda._fresh((5,), np.float32, np.uint16)
    assert gv is not fv and g.gpu_data is not fv.gpu_data
    del fv, g, gv
    h, hv = cda._fresh((5,), np.float32, np.uint16)
    assert h.gpu_data is hv.gpu_data
    assert h is cda._pool[((5,), np.dtype(np.float32).str, np.dtype(np.uint16).str, 0)][0][0]


@pytest.mark.parametrize("dt,Sq,pipe,kw", [(bfloat16, 2, 1, {}), (np.float16, 5, 2, dict(softcap=3.0)),
                                           (bfloat16, 1, 1, dict(alibi_slopes=np.array([0.3, 0.1, 0.7, 0.2])))],
                         ids=["bf16-8-rows-pipe1", "f16-16-rows-pipe2-softcap", "bf16-alibi"])
def test_sim_decode_direct(rng, monkeypatch, dt, Sq, pipe, kw):
    """The direct-operand tensor-core kernel (opt-in, ``DIRECT_TILES``): K/V loaded into mma fragments, both
    pipelines, 8 packed rows (M <= 8) and 16, split and unsplit, paged with a page size that is not a tile's."""
    from numba_kernels.cuda import decode_attention as cda

    monkeypatch.setitem(cda.DIRECT_TILES, "sim", (2, pipe, 0))
    D = 64
    q = rng.standard_normal((2, Sq, 4, D)).astype(dt)
    kc, vc = (rng.standard_normal((25, 5, 2, D)).astype(dt) for _ in range(2))
    bt = rng.permutation(25)[:24].reshape(2, 12).astype(np.int32)
    seqlens = np.array([58, 13], np.int32)
    for ns in (1, 2):
        out = nk.flash_attention_with_kvcache(q, _dev(kc), _dev(vc), cache_seqlens=seqlens, block_table=bt,
                                              causal=True, num_splits=ns, backend="cuda", **kw)
        ref = flash_attention_with_kvcache_ref(q, kc, vc, cache_seqlens=seqlens, block_table=bt, causal=True, **kw)
        assert max_err(_host(out, dt), ref) < TOL[np.dtype(dt)]


def test_choose_splits_rules(monkeypatch):
    """One wave of blocks, >= MIN_SPLIT_KEYS keys per split, and for the tensor-core kernel at most
    SHORT_CACHE_SPLITS on caches up to SHORT_CACHE_KEYS (132 SMs x 2 blocks, B1 Hk 8 as measured)."""
    from types import SimpleNamespace

    from numba_kernels.cuda import decode_attention as cda

    monkeypatch.setattr(cda, "_num_sms", lambda: 132)

    def plan(B, S):
        return SimpleNamespace(num_splits=0, B=B, Hk=8, end=np.full(B, S), leftpad=np.zeros(B, int))

    assert cda.choose_splits(plan(1, 4096), 1, 2) == 33  # the CUDA-core kernel: the full wave
    assert cda.choose_splits(plan(1, 4096), 1, 2, short_cap=True) == cda.SHORT_CACHE_SPLITS == 16
    assert cda.choose_splits(plan(1, 1024), 1, 2, short_cap=True) == 16
    assert cda.choose_splits(plan(1, 512), 1, 2, short_cap=True) == 512 // cda.MIN_SPLIT_KEYS
    assert cda.choose_splits(plan(1, 16384), 1, 2, short_cap=True) == 33
    assert cda.choose_splits(plan(8, 32768), 1, 2, short_cap=True) == 4
    assert cda.choose_splits(plan(64, 1024), 1, 2, short_cap=True) == 1
    p = plan(1, 4096)
    p.num_splits = 5
    assert cda.choose_splits(p, 1, 2, short_cap=True) == 5  # an explicit count wins


def test_tc_config_keeps_wide_heads_off_registers():
    """Up to padded head dim 128 the tensor-core decode kernel stages K/V through registers (TC_TILES); above, one
    tile in registers would spill (D 256: 255 registers and ~800 bytes of spills), so TC_TILES_WIDE (cp.async)."""
    from numba_kernels.cuda import decode_attention as cda

    assert cda.tc_config(128, "gpu") == cda.TC_TILES["gpu"] and cda.TC_TILES["gpu"][6]
    assert cda.tc_config(64, "gpu") == cda.TC_TILES["gpu"]
    wide = cda.tc_config(256, "gpu")
    assert wide == cda.TC_TILES_WIDE["gpu"] and not wide[6] and len(wide) == 8
    assert cda.tc_config(256, "sim") == cda.TC_TILES["sim"]  # the simulator has no register limit


def test_tc_config_small_jobs():
    """Jobs of at most SMALL_JOB_KEYS keys (batch x k/v heads x row tiles x longest cache) take TC_TILES_SMALL
    (32-key cp.async tiles) at padded head dims <= 128; larger jobs and wide heads do not."""
    from numba_kernels.cuda import decode_attention as cda

    small = cda.TC_TILES_SMALL["gpu"]
    assert small[2] == 32 and not small[6] and len(small) == 8
    assert cda.tc_config(128, "gpu", 1 * 8 * 1 * 16384) == small  # B1 Hk8 16k: measured faster
    assert cda.tc_config(64, "gpu", cda.SMALL_JOB_KEYS) == small
    assert cda.tc_config(128, "gpu", cda.SMALL_JOB_KEYS + 1) == cda.TC_TILES["gpu"]
    assert cda.tc_config(128, "gpu", 1 * 8 * 1 * 131072) == cda.TC_TILES["gpu"]  # B1 128k: measured slower
    assert cda.tc_config(128, "gpu") == cda.TC_TILES["gpu"]
    assert cda.tc_config(256, "gpu", 1) == cda.TC_TILES_WIDE["gpu"]
    assert cda.tc_config(128, "sim", 1) == cda.TC_TILES["sim"]  # simulator: no small-job config by default


@pytest.mark.parametrize("limit,bc,D", [(None, 32, 16), (None, 32, 40), (100, 16, 16)],
                         ids=["small-job-32-key-tiles", "small-job-D40-chunks-not-dividing-32", "over-the-limit"])
def test_sim_decode_small_job_config(rng, monkeypatch, limit, bc, D):
    """The public call picks the small-job configuration by its job size (and the default above the limit), and
    the 32-key cp.async tiles with every LEAN bit and early page lookups are correct (paged, causal and windowed,
    automatic and explicit splits; a head dim whose 16-byte chunks do not divide a warp)."""
    from numba_kernels.cuda import decode_attention as cda

    monkeypatch.setitem(cda.TC_TILES_SMALL, "sim", (2, 2, 32, False, False, True, False, 7))
    if limit is not None:
        monkeypatch.setattr(cda, "SMALL_JOB_KEYS", limit)
    seen = []
    real = cda.make_decode_tc

    def spy(*a, **k):
        seen.append(a[8] if len(a) > 8 else k.get("BC", 16))
        return real(*a, **k)

    monkeypatch.setattr(cda, "make_decode_tc", spy)
    q = rng.standard_normal((2, 1, 4, D)).astype(bfloat16)
    kc, vc = (rng.standard_normal((61, 5, 2, D)).astype(bfloat16) for _ in range(2))
    bt = rng.permutation(61)[:60].reshape(2, 30).astype(np.int32)
    seqlens = np.array([150, 37], np.int32)  # job = 2 x 2 x 1 x 150 = 600 keys
    for ns, kw in ((0, dict(causal=True)), (2, dict(window_size=(70, 0)))):
        out = nk.flash_attention_with_kvcache(q, _dev(kc), _dev(vc), cache_seqlens=seqlens, block_table=bt,
                                              num_splits=ns, backend="cuda", **kw)
        ref = flash_attention_with_kvcache_ref(q, kc, vc, cache_seqlens=seqlens, block_table=bt, **kw)
        assert max_err(_host(out, bfloat16), ref) < TOL[np.dtype(bfloat16)]
    assert seen and set(seen) == {bc}


@pytest.mark.parametrize("ns,D", [(3, 16), (16, 16), (20, 16), (16, 48)],
                         ids=["3-splits", "16-splits-the-widest", "20-splits-falls-back", "D48-several-item-rounds"])
def test_sim_decode_wide_split_merge(rng, monkeypatch, ns, D):
    """The in-kernel split merge with every split's loads of two items at once (LEAN bit 8, up to WIDE_SPLITS
    splits; more take the MUNROLL loop): causal Sq 2 with GQA 4 (8 packed rows, so both items of a thread are real
    and some splits of the short sequence are empty), output and LSE against the float64 reference."""
    from numba_kernels.cuda import decode_attention as cda

    monkeypatch.setitem(cda.TC_TILES, "sim", (2, 2, 16, False, False, True, True, 15))
    monkeypatch.setattr(cda, "FUSED_MERGE_MAX", 32)
    q = rng.standard_normal((2, 2, 8, D)).astype(bfloat16)
    kc, vc = (rng.standard_normal((61, 5, 2, D)).astype(bfloat16) for _ in range(2))
    bt = rng.permutation(61)[:60].reshape(2, 30).astype(np.int32)
    seqlens = np.array([150, 37], np.int32)
    out, lse = nk.flash_attention_with_kvcache(q, _dev(kc), _dev(vc), cache_seqlens=seqlens, block_table=bt,
                                               causal=True, num_splits=ns, return_lse=True, backend="cuda")
    ref, rlse = flash_attention_with_kvcache_ref(q, kc, vc, cache_seqlens=seqlens, block_table=bt, causal=True,
                                                 return_lse=True)
    assert max_err(_host(out, bfloat16), ref) < TOL[np.dtype(bfloat16)]
    np.testing.assert_allclose(lse.copy_to_host(), rlse, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("table_dtype", [np.float32, np.float64], ids=["device-float32-as-is", "device-float64"])
def test_sim_decode_rotary_tables_on_the_device(rng, table_dtype):
    """Rotary tables passed as device arrays (a float32 one used as it is, a float64 one converted) give the same
    appended caches and output as the same tables on the host; paged float16 caches, NeoX halves, causal."""
    from numba import cuda

    B, Sq, H, Hk, D, page = 2, 2, 4, 2, 16, 4
    seqlens = np.array([5, 9], np.int32)
    q = rng.standard_normal((B, Sq, H, D)).astype(np.float16)
    kc, vc = (rng.standard_normal((8, page, Hk, D)).astype(np.float16) for _ in range(2))
    k, v = (rng.standard_normal((B, 2, Hk, D)).astype(np.float16) for _ in range(2))
    cos, sin = rng.standard_normal((16, D // 4)), rng.standard_normal((16, D // 4))
    table = rng.permutation(8).reshape(B, 4).astype(np.int32)
    kw = dict(cache_seqlens=seqlens, block_table=table, causal=True, rotary_interleaved=False, backend="cuda")
    results = []
    for c, s in ((cos, sin), (cuda.to_device(cos.astype(table_dtype)), cuda.to_device(sin.astype(table_dtype)))):
        kd, vd = _dev(kc), _dev(vc)
        out = nk.flash_attention_with_kvcache(q, kd, vd, k, v, rotary_cos=c, rotary_sin=s, **kw)
        results.append([out.copy_to_host(), kd.copy_to_host(), vd.copy_to_host()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    ref = flash_attention_with_kvcache_ref(q, kc.copy(), vc.copy(), k, v, rotary_cos=cos, rotary_sin=sin,
                                           **{n: x for n, x in kw.items() if n != "backend"})
    assert max_err(results[1][0], ref) < TOL[np.dtype(np.float16)]
