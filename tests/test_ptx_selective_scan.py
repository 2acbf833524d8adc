"""Every real selective_scan CUDA kernel configuration compiles to PTX for cc 9.0 (no GPU needed):
the forward scan (N = 4, 16) and the decode update (float32 or same-dtype state) for each element kind."""
import pytest

pytestmark = pytest.mark.ptx

KINDS = ("f32", "f64", "f16", "bf16")
# the kernel names, fixed here so collection needs no numba-cuda target
NAMES = ([f"scan_{k}_N{n}_{v}" for k in KINDS for n in (4, 16) for v in ("var", "const", "var_seq")] +
         [f"update_{k}_state_{s}" for k in KINDS for s in sorted({"f32", k})])


def _configs():
    from numba_kernels.cuda.selective_scan import ptx_signatures

    return {name: (fn, sig) for name, fn, sig in ptx_signatures(states=(4, 16))}


def test_every_kernel_is_listed():
    assert sorted(_configs()) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_selective_scan_kernel_compiles_for_sm90(name):
    from numba import cuda

    fn, sig = _configs()[name]
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx, f"{name}: state spilled to local memory"
    if "_f16" in name:  # native half conversions, no software emulation
        assert "cvt.f32.f16" in ptx
    if name.startswith("scan_"):  # tiles staged global -> shared by cp.async, read with 16-byte shared loads
        assert "ld.shared" in ptx and "st.shared" in ptx
        assert "cp.async.cg.shared.global" in ptx, f"{name}: no cp.async staging"
        if "_f64" not in name:
            assert "ld.shared.v4" in ptx, f"{name}: no 16-byte shared loads"


def test_bf16_scan_computes_some_exps_as_polynomials():
    # FWD_PM["bf16"] = 8: one exp in 8 of the scan on the FMA pipe, so fewer ex2 than the float32 kernel's
    from numba import cuda

    cfg = _configs()
    n = {k: cuda.compile_ptx(*cfg[f"scan_{k}_N16_var"], cc=(9, 0))[0].count("ex2.approx") for k in ("f32", "bf16")}
    assert n["bf16"] < n["f32"], n


# ---- the backward kernels (N = 16; time-varying and time-invariant B / C) and the partial-sum kernel ------
BWD_NAMES = ([f"bwd_{k}_N16_{v}" for k in KINDS for v in ("var_seq", "const")] + [f"group_sum_{k}" for k in KINDS])


def _bwd_configs():
    from numba_kernels.cuda.selective_scan_backward import ptx_signatures

    return {name: (fn, sig) for name, fn, sig in ptx_signatures(states=(16,))}


def test_every_backward_kernel_is_listed():
    assert sorted(_bwd_configs()) == sorted(BWD_NAMES)


@pytest.mark.parametrize("name", BWD_NAMES)
def test_selective_scan_backward_kernel_compiles_for_sm90(name):
    from numba import cuda

    fn, sig = _bwd_configs()[name]
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx, f"{name}: registers spilled to local memory"
    if name.startswith("bwd_"):  # the recomputed chunk lives in shared memory
        assert "ld.shared" in ptx and "st.shared" in ptx
