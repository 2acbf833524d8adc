"""fft_conv / fft_conv_backward: CPU (FFT and direct paths) against the direct float64 reference and
scipy.signal.fftconvolve, the reference backward against finite differences, the filter cache, bad inputs;
and the CUDA numba kernels under the simulator with a numpy FFT in place of cuFFT (tiny shapes, ``-m sim``)."""
import importlib

import numpy as np
import pytest
from scipy.signal import fftconvolve

import numba_kernels as nk
from numba_kernels._dispatch import BackendUnavailableError, bfloat16
from numba_kernels.reference.fft_conv import fft_conv_backward_ref, fft_conv_ref
from tests.conftest import SIM, TOL, dtype_id, max_err

fc = importlib.import_module("numba_kernels.fft_conv")  # the module (the package exports the function)
MODES = ("causal", "same", "full")


def _inputs(rng, dt, B, H, L, Lk, mode, opts=True):
    Lout = L + Lk - 1 if mode == "full" else L
    u = rng.standard_normal((B, H, L)).astype(dt)
    k = (rng.standard_normal((H, Lk)) / np.sqrt(Lk)).astype(dt)
    kw = {}
    if opts:
        kw = dict(bias=rng.standard_normal(H).astype(dt), pregate=rng.standard_normal((B, H, L)).astype(dt),
                  postgate=rng.standard_normal((B, H, Lout)).astype(dt))
    dout = rng.standard_normal((B, H, Lout)).astype(dt)
    return u, k, kw, dout


def _check(out, ref, dt, what):
    assert out.dtype == np.dtype(dt), f"{what}: dtype {out.dtype} != {np.dtype(dt)}"
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    err = max_err(out, ref)
    assert err < TOL[np.dtype(dt)], f"{what}: err {err:.2e}"


def _scipy(u, k, mode):
    y = fftconvolve(u.astype(np.float64), k[None].astype(np.float64), mode="full" if mode == "causal" else mode,
                    axes=-1)
    return y[..., :u.shape[2]] if mode == "causal" else y


SIZES = [(1, 3), (97, 5), (97, 300), (1009, 97), (1009, 1009), (64, 64)]


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
@pytest.mark.parametrize("forced", [False, True], ids=["auto", "fft_size"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("L,Lk", SIZES, ids=[f"L{a}-Lk{b}" for a, b in SIZES])
def test_forward_backward_vs_reference(rng, L, Lk, mode, forced):
    # forced=True gives fft_size, which always takes the FFT path (the auto choice is direct for Lk <= 64)
    u, k, kw, dout = _inputs(rng, np.float64, 2, 3, L, Lk, mode)
    fs = 4 * (L + Lk) + 7 if forced else None  # odd, non-fast size: still exact
    y = nk.fft_conv(u, k, mode=mode, fft_size=fs, backend="cpu", **kw)
    _check(y, fft_conv_ref(u, k, mode, **kw), np.float64, "y")
    y0 = nk.fft_conv(u, k, mode=mode, fft_size=fs, backend="cpu")
    _check(y0, _scipy(u, k, mode), np.float64, "y vs scipy.signal.fftconvolve")
    got = nk.fft_conv_backward(dout, u, k, mode=mode, fft_size=fs, backend="cpu", **kw)
    exp = fft_conv_backward_ref(dout, u, k, mode, **kw)
    for name, g, e in zip(("du", "dk", "dbias", "dpregate", "dpostgate"), got, exp):
        _check(g, e, np.float64, name)


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dt", [np.float64, np.float32], ids=dtype_id)
def test_direct_forward_tiles(rng, mode, dt):
    # the fused direct forward in DIRECT_TILE-output tiles: rows spanning three tiles, taps crossing tile edges
    from numba_kernels.cpu.fft_conv import DIRECT_TILE

    L, Lk = 2 * DIRECT_TILE + 333, 41
    u, k, kw, _ = _inputs(rng, dt, 2, 3, L, Lk, mode)
    for opts in ({}, kw, {"bias": kw["bias"]}, {"postgate": kw["postgate"]}):
        y = nk.fft_conv(u, k, mode=mode, backend="cpu", method="direct", **opts)
        _check(y, fft_conv_ref(u, k, mode, **opts), dt, f"y (direct, {sorted(opts)})")


OLA_SIZES = [(1009, 13), (2003, 97), (997, 1), (1000, 300), (64, 64)]


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("L,Lk", OLA_SIZES, ids=[f"L{a}-Lk{b}" for a, b in OLA_SIZES])
def test_overlap_add_vs_reference(rng, L, Lk, mode):
    # method="overlap_add" forces the block path (the smallest block when the cost model would not pick it)
    u, k, kw, _ = _inputs(rng, np.float64, 2, 3, L, Lk, mode)
    y = nk.fft_conv(u, k, mode=mode, backend="cpu", method="overlap_add", **kw)
    _check(y, fft_conv_ref(u, k, mode, **kw), np.float64, "y (overlap-add, gated, bias)")
    y0 = nk.fft_conv(u, k, mode=mode, backend="cpu", method="overlap_add")
    _check(y0, _scipy(u, k, mode), np.float64, "y (overlap-add) vs scipy.signal.fftconvolve")


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
@pytest.mark.parametrize("factors", [(2,), (8,)], ids=["P2Lk", "P8Lk"])
def test_overlap_add_float32_blocks(rng, monkeypatch, factors):
    from numba_kernels.cpu import fft_conv as cf
    from numba_kernels.cpu import fft_conv_rows as fr

    monkeypatch.setattr(cf, "OLA_FACTORS", factors)
    monkeypatch.setattr(fr, "CHUNK_POINTS", 1)  # one (b, h) row per chunk: many chunks over both threads
    monkeypatch.setattr(fr, "MIN_BLOCK_ROWS", {"scipy": 1, "pyfftw": 1})
    u, k, kw, _ = _inputs(rng, np.float32, 2, 5, 3001, 41, "same")
    y = nk.fft_conv(u, k, mode="same", backend="cpu", method="overlap_add", **kw)
    _check(y, fft_conv_ref(u, k, "same", **kw), np.float32, "y")


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
@pytest.mark.parametrize("lib", ["scipy", "pyfftw"])
@pytest.mark.parametrize("method", ["fft", "overlap_add"])
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=dtype_id)
def test_row_pipeline_each_fft_lib(rng, monkeypatch, lib, method, dt):
    # both FFT engines of the row-chunked forward, with many small chunks handed to both threads
    if lib == "pyfftw":
        pytest.importorskip("pyfftw")
    from numba_kernels.cpu import fft_conv_rows as fr

    monkeypatch.setattr(fr, "CHUNK_POINTS", 64)
    monkeypatch.setattr(fr, "MIN_BLOCK_ROWS", {"scipy": 1, "pyfftw": 1})
    for mode in MODES:
        u, k, kw, _ = _inputs(rng, dt, 3, 5, 517, 29, mode)
        y = nk.fft_conv(u, k, mode=mode, backend="cpu", fft_lib=lib, method=method, **kw)
        _check(y, fft_conv_ref(u, k, mode, **kw), dt, f"y ({lib}, {method}, {mode})")
        y1 = fr.fwd_rows(u, *[np.zeros((0,) * n, dt) for n in (3, 1, 3)], np.fft.rfft(k, 1024).astype(
            np.result_type(dt, np.complex64)), 0, 517, 1024, 1024, 1, lib, workers=1)  # one thread, plain conv
        _check(y1, _scipy(u, k, "causal"), dt, f"y ({lib}, one thread)")


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
def test_chooser_picks_overlap_add_where_cheaper(rng):
    from numba_kernels.cpu.fft_conv import choose

    def auto(L, Lk):
        import scipy.fft

        return choose(L, Lk, L, scipy.fft.next_fast_len(L + Lk - 1, real=True))

    assert auto(1 << 20, 256)[0] == "overlap_add"  # measured 2.0x faster (BENCHMARKS.md)
    assert auto(1 << 20, 4096)[0] == "overlap_add"
    meth, P, M = auto(1 << 20, 256)
    assert M == P - 256 + 1 and M >= 255 and P < 1 << 15
    assert auto(16384, 256)[0] == "fft" and auto(65536, 4096)[0] == "fft" and auto(1 << 20, 1 << 16)[0] == "fft"
    assert auto(1 << 20, 16)[0] == "direct"
    assert choose(1 << 20, 256, 1 << 20, 1 << 21, forced=True)[0] == "fft"  # a given fft_size wins
    # the auto path really takes overlap-add at such a size (one row), and is exact
    L, Lk = 300_000, 1024
    assert auto(L, Lk)[0] == "overlap_add"
    u, k, kw, _ = _inputs(rng, np.float64, 1, 1, L, Lk, "causal")
    _check(nk.fft_conv(u, k, backend="cpu", **kw), fft_conv_ref(u, k, "causal", **kw), np.float64, "y")


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
@pytest.mark.parametrize("dt", [np.float32, np.float16, bfloat16], ids=dtype_id)
@pytest.mark.parametrize("L,Lk", [(1009, 97), (257, 31)], ids=["fft", "direct"])
def test_dtypes(rng, dt, L, Lk):
    u, k, kw, dout = _inputs(rng, dt, 2, 3, L, Lk, "causal")
    y = nk.fft_conv(u, k, backend="cpu", **kw)
    _check(y, fft_conv_ref(u, k, "causal", **kw), dt, "y")
    got = nk.fft_conv_backward(dout, u, k, backend="cpu", **kw)
    for name, g, e in zip(("du", "dk", "dbias", "dpregate", "dpostgate"), got,
                          fft_conv_backward_ref(dout, u, k, "causal", **kw)):
        _check(g, e, dt, name)


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
def test_optional_inputs_absent_give_none(rng):
    u, k, _, dout = _inputs(rng, np.float32, 1, 2, 50, 7, "same", opts=False)
    du, dk, db, dpre, dpost = nk.fft_conv_backward(dout, u, k, mode="same", backend="cpu")
    assert db is None and dpre is None and dpost is None
    _check(du, fft_conv_backward_ref(dout, u, k, "same")[0], np.float32, "du")


@pytest.mark.parametrize("mode", MODES)
def test_reference_backward_vs_finite_differences(rng, mode):
    u, k, kw, dout = _inputs(rng, np.float64, 1, 2, 6, 4, mode)
    args = dict(u=u, k=k, **kw)
    grads = dict(zip(("u", "k", "bias", "pregate", "postgate"),
                     fft_conv_backward_ref(dout, u, k, mode, **kw)))

    def loss(a):
        return float(np.sum(fft_conv_ref(a["u"], a["k"], mode, a["bias"], a["pregate"], a["postgate"]) * dout))

    eps = 1e-6
    for name, g in grads.items():
        num = np.zeros_like(args[name])
        for idx in np.ndindex(args[name].shape):
            p = {n: a.copy() for n, a in args.items()}
            p[name][idx] += eps
            m = {n: a.copy() for n, a in args.items()}
            m[name][idx] -= eps
            num[idx] = (loss(p) - loss(m)) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
def test_filter_cache_reuse_is_identical(rng):
    nk.clear_fft_conv_cache()
    u, k, kw, _ = _inputs(rng, np.float32, 2, 3, 300, 100, "causal")
    y1 = nk.fft_conv(u, k, backend="cpu", **kw)
    assert fc.cache_info()["misses"] == 1
    y2 = nk.fft_conv(u, k, backend="cpu", **kw)
    assert fc.cache_info()["hits"] == 1
    np.testing.assert_array_equal(y1, y2)
    k[1, 5] += 1.0  # edited in place: the checksum (float64 sum) must miss
    y3 = nk.fft_conv(u, k, backend="cpu", **kw)
    assert fc.cache_info()["misses"] == 2
    _check(y3, fft_conv_ref(u, k, "causal", **kw), np.float32, "y after editing k")
    k2 = k.copy()  # a different object with equal values: its own entry, same result
    np.testing.assert_array_equal(nk.fft_conv(u, k2, backend="cpu", **kw), y3)
    assert fc.cache_info()["misses"] == 3
    nk.clear_fft_conv_cache()
    assert fc.cache_info() == {"hits": 0, "misses": 0, "size": 0}


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
def test_fft_lib_choice(monkeypatch):
    from numba_kernels.cpu.fft_conv import fft_lib

    try:
        import pyfftw  # noqa: F401
        have = True
    except ImportError:
        have = False
    assert fft_lib("auto").name == ("pyfftw" if have else "scipy")
    assert fft_lib("scipy").name == "scipy"
    monkeypatch.setenv("NUMBA_KERNELS_FFT_LIB", "scipy")
    assert fft_lib().name == "scipy"
    if not have:
        with pytest.raises(BackendUnavailableError, match="pyfftw is not installed"):
            nk.fft_conv(np.ones((1, 1, 8)), np.ones((1, 100)), backend="cpu", fft_lib="pyfftw")
    with pytest.raises(ValueError, match="fft_lib must be one of"):
        fft_lib("mkl")


BAD = [
    ("H", dict(k=np.ones((4, 5), np.float32)), ValueError, r"k must have shape \(3, Lk\)"),
    ("k-1d", dict(k=np.ones(5, np.float32)), ValueError, "k must have 2 dimensions"),
    ("u-int", dict(u=np.ones((2, 3, 16), np.int32)), TypeError, "u must have dtype in"),
    ("pregate-dtype", dict(pregate=np.ones((2, 3, 16), np.float64)), TypeError,
     "pregate must have the same dtype as u"),
    ("postgate-shape", dict(postgate=np.ones((2, 3, 17), np.float32)), ValueError,
     r"postgate must have shape \(2, 3, 16\)"),
    ("bias-shape", dict(bias=np.ones(4, np.float32)), ValueError, r"bias must have shape \(3,\)"),
    ("mode", dict(mode="valid"), ValueError, "mode must be one of"),
    ("fft-small", dict(fft_size=19), ValueError, "fft_size must be >= 20"),
    ("fft-inf", dict(fft_size=float("inf")), ValueError, "fft_size must be a finite integer"),
    ("fft-nan", dict(fft_size=float("nan")), ValueError, "fft_size must be a finite integer"),
    ("fft-frac", dict(fft_size=64.5), ValueError, "fft_size must be a finite integer"),
    ("fft-str", dict(fft_size="64"), TypeError, "fft_size must be an integer"),
    ("backend", dict(backend="gpu"), ValueError, "backend must be one of"),
    ("method", dict(method="ola"), ValueError, "method must be one of"),
]


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
@pytest.mark.parametrize("name,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, over, exc, msg):
    args = dict(u=np.ones((2, 3, 16), np.float32), k=np.ones((3, 5), np.float32), mode="causal")
    args.update(over)
    u, k = args.pop("u"), args.pop("k")
    with pytest.raises(exc, match=msg):
        nk.fft_conv(u, k, **args)
    with pytest.raises(exc, match=msg):
        nk.fft_conv_backward(np.ones((2, 3, 16), u.dtype if u.dtype.kind == "f" else np.float32), u, k, **args)


@pytest.mark.skipif(SIM, reason="CPU tests run without the simulator")
def test_dout_shape_checked():
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 12\)"):
        nk.fft_conv_backward(np.ones((1, 2, 8)), np.ones((1, 2, 8)), np.ones((2, 5)), mode="full")


# ---- the CUDA numba kernels under the simulator (numpy FFT in place of cuFFT) -----------------------------
SIM_CASES = [("causal", 7, 3, np.float32), ("same", 5, 9, np.float32), ("full", 6, 4, bfloat16)]


@pytest.mark.sim
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "kernels"])
@pytest.mark.parametrize("mode,L,Lk,dt", SIM_CASES, ids=[f"{m}-L{a}-Lk{b}-{dtype_id(d)}" for m, a, b, d in SIM_CASES])
def test_sim_forward_backward(rng, monkeypatch, mode, L, Lk, dt, fused):
    from numba_kernels.cuda import fft_conv as cfc

    if not fused:  # the pad / multiply / crop kernels around the transforms
        monkeypatch.setattr(cfc, "FUSED_MAX_N", 0)
    u, k, kw, dout = _inputs(rng, dt, 2, 2, L, Lk, mode)
    y = nk.fft_conv(u, k, mode=mode, backend="cuda", **kw)
    _check(y, fft_conv_ref(u, k, mode, **kw), dt, "y")
    got = nk.fft_conv_backward(dout, u, k, mode=mode, backend="cuda", **kw)
    for name, g, e in zip(("du", "dk", "dbias", "dpregate", "dpostgate"), got,
                          fft_conv_backward_ref(dout, u, k, mode, **kw)):
        _check(g, e, dt, name)


FUSED_SIM = [("causal", 3, 37, 20, np.float32, True), ("causal", 2, 33, 3, np.float16, False),
             ("same", 1, 16, 16, bfloat16, True), ("full", 3, 5, 9, np.float32, True),
             ("causal", 2, 1, 1, np.float32, False),
             ("causal", 1, 200, 200, np.float32, True)]  # N 512: three register passes (an inner one with lo > 0)


@pytest.mark.sim
@pytest.mark.parametrize("mode,B,L,Lk,dt,opts", FUSED_SIM,
                         ids=[f"{m}-B{b}-L{a}-Lk{c}-{dtype_id(d)}-{'opts' if o else 'plain'}" for m, b, a, c, d, o in FUSED_SIM])
def test_sim_fused_kernel(rng, monkeypatch, mode, B, L, Lk, dt, opts):
    # one block per pair of rows (odd B: the last block has one), radix-2 FFTs in shared memory, bit-reversed
    # filter spectrum; asserts the fused path ran
    from numba_kernels.cuda import fft_conv as cfc

    calls = []
    real = cfc._fwd_fused
    monkeypatch.setattr(cfc, "_fwd_fused", lambda *a: calls.append(a[6]) or real(*a))
    u, k, kw, _ = _inputs(rng, dt, B, 2, L, Lk, mode, opts=opts)
    y = nk.fft_conv(u, k, mode=mode, backend="cuda", **kw)
    assert calls, "the fused kernel did not run"
    _check(y, fft_conv_ref(u, k, mode, **kw), dt, "y (fused)")
    if mode == "causal":  # an explicit power-of-two fft_size is used as given; another size is not fused
        calls.clear()
        y2 = nk.fft_conv(u, k, mode=mode, backend="cuda", fft_size=4 * _pow2_causal(L, Lk), **kw)
        assert calls == [4 * _pow2_causal(L, Lk)]
        _check(y2, fft_conv_ref(u, k, mode, **kw), dt, "y (fused, fft_size)")
        calls.clear()
        nk.fft_conv(u, k, mode=mode, backend="cuda", fft_size=3 * _pow2_causal(L, Lk), **kw)
        assert not calls


def _pow2_causal(L, Lk):
    """The power of two >= L + min(L, Lk) - 1 (the causal single-FFT size)."""
    return 1 << max(1, (L + min(L, Lk) - 2).bit_length())


def test_fused_twiddles_and_sizes():
    from numba_kernels.cuda import _fft_conv_fused as fz
    from numba_kernels.cuda.fft_conv import fused_size

    t = fz.twiddles(16).astype(np.float64)
    np.testing.assert_allclose(t[0::2] + 1j * t[1::2], np.exp(-2j * np.pi * np.arange(8) / 16), atol=1e-7)
    assert fused_size(511, False, "f32") == 512 and fused_size(512, True, "f32") == 512
    assert fused_size(500, True, "f32") == 0  # an explicit non-power-of-two size keeps cuFFT
    assert fused_size(512, False, "f64") == 0  # float64 keeps cuFFT
    assert fused_size(1 << 20, False, "bf16") == 0
    assert fz.smem_bytes(8192) == 8 * (8191 + 8191 // 32 + 1)  # re + im, one skew word per 32 entries
    assert fz.passes(9, 4) == (3, 3, 3) and fz.passes(11, 4) == (4, 4, 3) and fz.passes(1, 4) == (1,)


OLA_SIM = [("causal", 13, 3, np.float32), ("same", 11, 4, np.float16), ("full", 9, 2, bfloat16)]


@pytest.mark.sim
@pytest.mark.parametrize("mode,L,Lk,dt", OLA_SIM, ids=[f"{m}-L{a}-Lk{b}-{dtype_id(d)}" for m, a, b, d in OLA_SIM])
def test_sim_overlap_add(rng, mode, L, Lk, dt):
    # blocks of M = P - Lk + 1 samples: several blocks per row, the tail of each added by the crop kernel
    u, k, kw, _ = _inputs(rng, dt, 2, 2, L, Lk, mode)
    y = nk.fft_conv(u, k, mode=mode, backend="cuda", method="overlap_add", **kw)
    _check(y, fft_conv_ref(u, k, mode, **kw), dt, "y (overlap-add)")
    u2 = u[:, :, ::-1].copy()  # the reused scratch buffer must not leak the previous call's data
    y2 = nk.fft_conv(u2, k, mode=mode, backend="cuda", method="overlap_add")
    _check(y2, fft_conv_ref(u2, k, mode), dt, "y (second call, reused buffer)")


@pytest.mark.sim
def test_sim_auto_overlap_add_rule():
    from numba_kernels.cuda.fft_conv import use_overlap_add

    assert use_overlap_add(1 << 21, 256, 1 << 21 + 1) is not None
    assert use_overlap_add(65536, 256, 67500) is None  # single FFTs up to 1M points stay single


@pytest.mark.sim
def test_sim_device_arrays_and_cache(rng):
    from numba import cuda

    nk.clear_fft_conv_cache()
    u, k, _, _ = _inputs(rng, np.float32, 1, 2, 9, 4, "causal", opts=False)
    kd = cuda.to_device(k)
    y1 = nk.fft_conv(cuda.to_device(u), kd)
    y2 = nk.fft_conv(cuda.to_device(u), kd)
    assert hasattr(y1, "copy_to_host"), type(y1)
    assert fc.cache_info()["hits"] == 1
    np.testing.assert_array_equal(y1.copy_to_host(), y2.copy_to_host())
    _check(y1.copy_to_host(), fft_conv_ref(u, k), np.float32, "y")


@pytest.mark.sim
def test_sim_fft_size_override(rng):
    u, k, kw, _ = _inputs(rng, np.float32, 1, 2, 6, 3, "same")
    y = nk.fft_conv(u, k, mode="same", fft_size=13, backend="cuda", **kw)  # odd N: F = 7 spectrum slots
    _check(y, fft_conv_ref(u, k, "same", **kw), np.float32, "y")


LTO_SIM = [("causal", 7, 3, 16, np.float32, True), ("same", 6, 4, 13, np.float16, True),
           ("full", 5, 3, 8, bfloat16, False)]


@pytest.mark.sim
@pytest.mark.parametrize("mode,L,Lk,N,dt,opts", LTO_SIM, ids=[f"{m}-L{a}-N{n}-{dtype_id(d)}" for m, a, _, n, d, _o in LTO_SIM])
def test_sim_lto_callbacks(rng, mode, L, Lk, N, dt, opts):
    # the cuFFT LTO callbacks (pad + pregate + cast, filter multiply, crop + bias + postgate + cast), run over
    # every offset of cuFFT's dense real / complex rows around numpy FFTs (odd N: F = 7 spectrum slots)
    from numba_kernels.cuda import _fft_conv_lto as lto
    from numba_kernels.cuda._conv1d_kernels import ELEM, kind_of

    B, H = 2, 3
    u, k, kw, _ = _inputs(rng, dt, B, H, L, Lk, mode, opts=opts)
    Lout, start = fc._out_len_start(mode, L, Lk)
    kind = kind_of(dt)
    el = lambda a: None if a is None else np.ascontiguousarray(a).view(ELEM[kind])  # noqa: E731
    K = np.fft.rfft(k.astype(np.float32), n=N).astype(np.complex64)
    bias = None if "bias" not in kw else kw["bias"].astype(np.float32)
    y = lto.emulate(kind, el(u), K, el(kw.get("pregate")), el(kw.get("postgate")), bias, N, L, Lout, start, H)
    _check(y.view(dt) if kind == "bf16" else y, fft_conv_ref(u, k, mode, **kw), dt, "y (LTO callbacks)")


# ---- the cuFFT binding on a real GPU (``-m gpu``; skipped without one, e.g. in CI) ---------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["causal", "same", "full"])
def test_gpu_cufft_binding(rng, mode):
    # an explicit non-power-of-two fft_size keeps the cuFFT path (pad / R2C / multiply / C2R / crop), forward
    # and backward; cuFFT errors carry the status name; the plan cache is destroyed with the filter cache
    from numba_kernels.cuda import cufft

    u, k, kw, dout = _inputs(rng, np.float32, 2, 3, 1000, 97, mode)
    y = nk.fft_conv(u, k, mode=mode, backend="cuda", fft_size=1125, **kw)
    _check(y, fft_conv_ref(u, k, mode, **kw), np.float32, "y (cuFFT)")
    got = nk.fft_conv_backward(dout, u, k, mode=mode, backend="cuda", fft_size=1125, **kw)
    for name, g, e in zip(("du", "dk", "dbias", "dpregate", "dpostgate"), got,
                          fft_conv_backward_ref(dout, u, k, mode, **kw)):
        _check(g, e, np.float32, f"{name} (cuFFT)")
    assert cufft.plan_count() > 0
    with pytest.raises(cufft.CufftError, match="CUFFT_"):
        cufft.plan(0, 1, False, False)
    nk.clear_fft_conv_cache()
    assert cufft.plan_count() == 0
