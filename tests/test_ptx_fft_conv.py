"""Every real fft_conv CUDA kernel (padding + pregate, complex multiply, overlap-add block padding / block multiply / tail-add crop, filter-gradient spectrum sum, crop +
bias + gates, bias-gradient reduction) compiles to PTX for cc 9.0 for every element kind (no GPU needed).
The cuFFT transforms themselves are library calls, checked on the GPU by benchmarks/gpu/check_fft_conv.py."""
import pytest

pytestmark = pytest.mark.ptx

# the kernel names, fixed here so collection needs no numba-cuda target
NAMES = [f"{k}_{kind}" for kind in ("f32", "f64", "f16", "bf16") for k in ("pad", "crop", "dbias", "pad_blocks", "ola_crop")] + \
        [f"{k}_{kind}" for kind in ("f32", "f64") for k in ("cmul", "conj_sum", "cmul_blocks")]


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
    if name.startswith("dbias"):
        assert "bar.sync" in ptx, "the block reduction must synchronize"
