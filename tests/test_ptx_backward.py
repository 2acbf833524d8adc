"""Every real CUDA flash_attention backward kernel configuration compiles to PTX for cc 9.0 (no GPU needed); the
tensor-core kernels use mma.sync / ldmatrix / cp.async and keep their fragments and accumulators in registers."""
import re

import pytest

from numba_kernels.cuda.flash_attention_backward import TC_BWD_DQ_QREG

pytestmark = pytest.mark.ptx

# 2 head dims x (3 tensor-core variants x 3 kernels + 2 CUDA-core dtypes x 2 kernels) + 2 short-range D64, and
# while TC_BWD_DQ_QREG is off, its dQ kernel (bf16) at both head dims
N_CONFIGS = 28 + (0 if TC_BWD_DQ_QREG else 2)


@pytest.fixture(scope="module")
def configs():
    from numba_kernels.cuda.flash_attention_backward import ptx_signatures

    cfg = ptx_signatures(head_dims=(64, 128))
    assert len(cfg) == N_CONFIGS
    return cfg


@pytest.mark.parametrize("idx", range(N_CONFIGS))
def test_flash_attention_backward_kernel_compiles_for_sm90(configs, idx):
    from numba import cuda

    name, fn, sig = configs[idx]
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    if name.startswith("tc_"):
        for instr in ("mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned.m8n8.x4", "cp.async.cg.shared.global"):
            assert instr in ptx, f"{name}: {instr} missing"
        if name.startswith("tc_dkdv_dq"):
            assert "ldmatrix.sync.aligned.m8n8.x4.trans" in ptx and "red.global.add.v2.f32" in ptx
        if "_cap_alibi_drop" not in name:  # the plain / causal hot path keeps every fragment in registers
            assert not re.search(r"\.local\s", ptx), f"{name}: fragments or accumulators spilled to local memory"
