"""Every real causal_conv1d CUDA kernel configuration compiles to PTX for cc 9.0 (no GPU needed):
forward, final states, decode update, backward and the weight-gradient sum, for each element kind
(float32, float64, float16, bfloat16 bits) and widths 1, 4, 7."""
import re

import pytest

pytestmark = pytest.mark.ptx

# the kernel names, fixed here so collection needs no numba-cuda target
NAMES = [f"{k}_{kind}_W{W}" for kind in ("f32", "f64", "f16", "bf16") for W in (1, 4, 7)
         for k in ("fwd", "update", "bwd")] + [f"final_{kind}_W{W}" for kind in ("f32", "f64", "f16", "bf16")
                                              for W in (4, 7)] + ["sum_f32", "sum_f64"]


def _configs():
    from numba_kernels.cuda.causal_conv1d import ptx_signatures

    return {name: (fn, sig) for name, fn, sig in ptx_signatures(widths=(1, 4, 7))}


def test_every_kernel_is_listed():
    assert sorted(_configs()) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_causal_conv1d_kernel_compiles_for_sm90(name):
    from numba import cuda

    fn, sig = _configs()[name]
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    if "_f16_" in name:  # native half conversions, no software emulation
        assert "cvt.f32.f16" in ptx
    if name.startswith(("fwd_", "bwd_")):  # the input window is staged in shared memory
        assert re.search(r"\.shared\s", ptx), f"{name}: no shared memory"
