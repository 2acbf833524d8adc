"""Every real fft_conv CUDA kernel (padding + pregate, complex multiply, overlap-add block padding / block multiply / tail-add crop, filter-gradient spectrum sum, crop +
bias + gates, bias-gradient reduction, the fused shared-memory conv) compiles to PTX for cc 9.0 for every element kind (no GPU needed).
The cuFFT transforms themselves are library calls, checked on the GPU by benchmarks/gpu/check_fft_conv.py.
Also the cuFFT LTO callbacks (``_fft_conv_lto``): PTX and LTO-IR for cc 9.0, every element kind."""
import pytest

pytestmark = pytest.mark.ptx

# the kernel names, fixed here so collection needs no numba-cuda target
NAMES = [f"{k}_{kind}" for kind in ("f32", "f64", "f16", "bf16") for k in ("pad", "crop", "dbias", "pad_blocks", "ola_crop")] + \
        [f"{k}_{kind}" for kind in ("f32", "f64") for k in ("cmul", "conj_sum", "cmul_blocks")] + \
        ["fused_f32_N512", "fused_bf16_N2048", "fused_f16_N1024", "fused_f32_N2048_plain", "fused_expand"]


def _configs():
    from numba_kernels.cuda.fft_conv import ptx_signatures

    return {name: (fn, sig) for name, fn, sig in ptx_signatures()}


def test_every_kernel_is_listed():
    assert sorted(_configs()) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_fft_conv_kernel_compiles_for_sm90(name):
    from numba import cuda

    fn, sig = _configs()[name]
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    assert ".entry" in ptx
    if name.startswith("dbias") or name.startswith("fused_f"):
        assert "bar.sync" in ptx, "the block reduction / the FFT stages must synchronize"
    if name.startswith("fused_f"):  # the register passes stay in registers (straight-line stage code)
        assert ".local" not in ptx, f"{name}: local memory"


LTO_KINDS = ("f32", "f64", "f16", "bf16")


@pytest.mark.parametrize("opts", [False, True], ids=["plain", "bias+gates"])
@pytest.mark.parametrize("kind", LTO_KINDS)
def test_lto_callbacks_compile_for_sm90(kind, opts):
    # the three cuFFT LTO callbacks: PTX under the C++-mangled symbol cuFFT links (its declaration of the
    # name it is given), no local memory, no integer division (shape constants become multiply-shifts),
    # and LTO-IR bytes for cufftXtSetJITCallback
    from numba import cuda

    from numba_kernels.cuda import _fft_conv_lto as lto

    N, L, Lout, H = 1125, 1000, 1096, 768  # a composite N and H: real divisions unless folded
    cbs = lto.make_callbacks(kind, N, L, Lout, 48, H, opts, opts, opts)
    for j, (fn, sig, name) in enumerate(zip(cbs, lto.signatures(kind), lto.NAMES)):
        sym = lto.symbol(name, j == 2, kind == "f64", "cxx")
        assert sym.startswith(f"_Z{len(name)}{name}Pvy")
        ptx, _ = cuda.compile(fn, sig, device=True, abi="c", abi_info={"abi_name": sym}, output="ptx", cc=(9, 0))
        assert ".visible .func" in ptx and sym in ptx
        assert ".local" not in ptx, f"{name}: local memory"
        assert "div." not in ptx and "rem." not in ptx, f"{name}: integer division left in"
    fwd, inv = lto.ltoir(kind, N, L, Lout, 48, H, opts, opts, opts, (9, 0), "cxx")
    assert [c[0] for c in fwd + inv] == list(lto.NAMES)
    assert all(isinstance(c[1], bytes) and len(c[1]) > 500 for c in fwd + inv)
