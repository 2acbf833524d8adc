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


def _assemble_sm90a(ptx):
    """ptxas -arch=sm_90a -v of the PTX where a ptxas is on PATH: its info / warning text ('' without one); the
    assembly must succeed."""
    import os
    import shutil
    import subprocess
    import tempfile

    ptxas = shutil.which("ptxas")
    if not ptxas:
        return ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(re.sub(r"\.version \d+\.\d+", ".version 8.5", ptx))  # the local ptxas may be older than NVVM
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")], capture_output=True,
                           text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stderr


def _wgmma_configs():
    from numba_kernels.cuda import flash_attention_backward as cfb

    dq = cfb.TC_BWD_WGMMA_DQ
    return [(dp, cfg, bf16, flags, has_dq) for dp, cfg in sorted(cfb.TC_BWD_WGMMA.items()) if cfg
            for bf16, flags, has_dq in ((True, (False, False, False), dq), (True, (False, False, False), False),
                                        (False, (False, False, False), dq), (True, (True, True, True), dq))]


@pytest.mark.parametrize("dp,cfg,bf16,flags,has_dq", _wgmma_configs(),
                         ids=[f"D{c[0]}-{c[1][0]}wg-{c[1][1]}rows-{'bf16' if c[2] else 'f16'}"
                              f"{'-cap-alibi-drop' if c[3][0] else ''}{'-dq' if c[4] else ''}" for c in _wgmma_configs()])
def test_wgmma_dkdv_kernel_compiles_for_sm90a(dp, cfg, bf16, flags, has_dq):
    """The shipped Hopper backward configurations (dQ fused for deterministic=False, the dQ pass's dK/dV-only
    kernel for deterministic=True) give sm_90a PTX with the warpgroup products of their tile shapes (S^T / dP^T
    m64n{rows}k16 from two descriptors, dV / dK m64n{D}k16 with A in registers and B transposed, dQ m64n{D / wg}k16
    with both operands transposed and its fp32 vector reductions), the async-proxy fence after the cp.async loads,
    and (plain path) no local memory; where a ptxas is on PATH it assembles for sm_90a."""
    from numba import types

    from numba_kernels.cuda import _wgmma as wg
    from numba_kernels.cuda._flash_bwd_wgmma import make_wgmma_bwd_kernel
    from numba_kernels.cuda.flash_attention_backward import ptx_signatures

    sig = next(s for n, f, s in ptx_signatures((64,)) if n.startswith("tc_dkdv_bf16"))
    assert sig[0] == types.Array(types.uint32, 3, "C")
    nwg, br = cfg
    kern = make_wgmma_bwd_kernel(nwg, br, dp, bf16, *flags, has_dq)[0]
    ptx, name = wg.sm90a_ptx(kern.py_func, sig)
    ty = "bf16" if bf16 else "f16"
    op = rf"wgmma\.mma_async\.sync\.aligned\.m64n{{}}k16\.f32\.{ty}\.{ty} \{{{{[^}}}}]*\}}}}, "
    assert ".target sm_90a" in ptx
    assert re.search(op.format(br) + r"%rd\d+, %rd\d+, 1, 1, 1, 0, 0;", ptx)
    assert re.search(op.format(dp) + r"\{", ptx)
    dq_op = re.search(op.format(dp // nwg) + r"%rd\d+, %rd\d+, 1, 1, 1, 1, 1;", ptx)
    assert bool(dq_op) == has_dq and (("red.global.add.v2.f32" in ptx) == has_dq)
    for instr in ("wgmma.fence.sync.aligned", "wgmma.commit_group.sync.aligned", "wgmma.wait_group.sync.aligned 0",
                  "fence.proxy.async.shared::cta", "cp.async.cg.shared.global"):
        assert instr in ptx, instr
    if not flags[0]:
        assert not re.search(r"\.local\s", ptx), "accumulators spilled to local memory"
    _assemble_sm90a(ptx)


@pytest.mark.parametrize("dp", [64, 128])
def test_wgmma_pipelined_kernel_compiles_for_sm90a(dp):
    """The pipelined option (TC_BWD_WGMMA_PIPE, off until timed): two commit groups waited one at a time, the first
    k-step of S^T / dP^T without accumulator input (scale-d 0, so no register writes between the batches); where a
    ptxas is on PATH, it assembles for sm_90a without a compiler-injected warpgroup wait (C7517), which would
    serialize the overlap."""
    from numba_kernels.cuda import _wgmma as wg
    from numba_kernels.cuda._flash_bwd_wgmma import make_wgmma_bwd_kernel
    from numba_kernels.cuda.flash_attention_backward import ptx_signatures

    sig = next(s for n, f, s in ptx_signatures((64,)) if n.startswith("tc_dkdv_bf16"))
    kern = make_wgmma_bwd_kernel(2, 64, dp, True, False, False, False, True, True)[0]
    ptx, _ = wg.sm90a_ptx(kern.py_func, sig)
    assert "wgmma.wait_group.sync.aligned 1;" in ptx
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n64k16\.f32\.bf16\.bf16 \{[^}]*\}, %rd\d+, %rd\d+, 0, 1, 1, "
                     r"0, 0;", ptx)
    assert "C7517" not in _assemble_sm90a(ptx), "ptxas injected a warpgroup wait"


@pytest.mark.parametrize("dp,cfg", [(64, (2, 64)), (128, (2, 64)), (128, (1, 64))],
                         ids=["D64-2wg-64keys", "D128-2wg-64keys", "D128-1wg-64keys"])
def test_wgmma_dq_pass_compiles_for_sm90a(dp, cfg):
    """The deterministic dQ pass on warpgroup MMA (TC_BWD_WGMMA_DQPASS, off until timed): S / dP m64n{keys}k16 from
    two descriptors (the first k-step with scale-d 0), dQ m64n{D}k16 with A in registers and K read transposed; no
    local memory; where a ptxas is on PATH it assembles for sm_90a without an injected warpgroup wait."""
    from numba_kernels.cuda import _wgmma as wg
    from numba_kernels.cuda._flash_bwd_wgmma import make_wgmma_dq_kernel
    from numba_kernels.cuda.flash_attention_backward import ptx_signatures

    sig = next(s for n, f, s in ptx_signatures((64,)) if n.startswith("tc_dq_bf16"))
    nwg, bc = cfg
    ptx, _ = wg.sm90a_ptx(make_wgmma_dq_kernel(nwg, bc, dp, True, False, False, False)[0].py_func, sig)
    op = r"wgmma\.mma_async\.sync\.aligned\.m64n{}k16\.f32\.bf16\.bf16 \{{[^}}]*\}}, "
    assert re.search(op.format(bc) + r"%rd\d+, %rd\d+, 0, 1, 1, 0, 0;", ptx)
    assert re.search(op.format(dp) + r"\{[^}]*\}, %rd\d+, 1, 1, 1, 1;", ptx)
    assert not re.search(r"\.local\s", ptx)
    assert "C7517" not in _assemble_sm90a(ptx), "ptxas injected a warpgroup wait"
