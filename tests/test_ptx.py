"""Every real CUDA kernel configuration compiles to PTX for cc 9.0 (no GPU needed), the tensor-core
kernels use mma.sync / ldmatrix / cp.async and keep their accumulators in registers."""
import re

import pytest

pytestmark = pytest.mark.ptx


def _configs():
    from numba_kernels.cuda.flash_attention import ptx_signatures

    return ptx_signatures(head_dims=(40, 128, 256))


@pytest.mark.parametrize("idx", range(15))
def test_flash_attention_kernel_compiles_for_sm90(idx):
    from numba import cuda

    configs = _configs()
    assert len(configs) == 15
    name, fn, sig = configs[idx]
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    if name.startswith("tc_"):
        for instr in ("mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned.m8n8.x4", "cp.async.cg.shared.global"):
            assert instr in ptx, f"{name}: {instr} missing"
        if "_cap_alibi_drop" not in name:  # the plain/causal hot path keeps every fragment in registers
            assert not re.search(r"\.local\s", ptx), f"{name}: accumulators spilled to local memory"


@pytest.mark.parametrize("D", [64, 128])
def test_flash_attention_row_loader_lazy_compiles_for_sm90(monkeypatch, D):
    """The forward's row loader with the lazy rescale (TC_ROWLOAD on by default, TC_LAZY off) compiles for cc 9.0,
    with the lazy rescale's warp vote and no accumulators in local memory."""
    from numba import cuda

    from numba_kernels.cuda import flash_attention as cfa

    monkeypatch.setattr(cfa, "TC_ROWLOAD", True)
    monkeypatch.setattr(cfa, "TC_LAZY", True)
    name, fn, sig = next(c for c in cfa.ptx_signatures(head_dims=(D,)) if c[0] == f"tc_bf16_D{D}")
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert "cp.async.cg.shared.global" in ptx and "vote.sync.any.pred" in ptx
    assert not re.search(r"\.local\s", ptx), f"{name}: accumulators spilled to local memory"


@pytest.mark.parametrize("D", [64, 128])
def test_flash_attention_row_bounds_compiles_for_sm90(monkeypatch, D):
    """The forward with per-row 32-bit mask bounds (TC_ROWBOUNDS, timed and off) compiles for cc 9.0 with its
    accumulators in registers."""
    from numba import cuda

    from numba_kernels.cuda import flash_attention as cfa

    monkeypatch.setattr(cfa, "TC_ROWBOUNDS", True)
    name, fn, sig = next(c for c in cfa.ptx_signatures(head_dims=(D,)) if c[0] == f"tc_bf16_D{D}")
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert "mma.sync.aligned.m16n8k16" in ptx
    assert not re.search(r"\.local\s", ptx), f"{name}: accumulators spilled to local memory"
