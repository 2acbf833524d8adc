"""Every real decode-attention CUDA kernel compiles to PTX for cc 9.0; the tensor-core ones use
mma.sync / ldmatrix / cp.async and keep their accumulators in registers; the fused-merge split kernel
loads K/V with 16-byte global loads staged through registers."""
import re

import pytest

pytestmark = pytest.mark.ptx

HEAD_DIMS = (128,)
N_CONFIGS = 12 * len(HEAD_DIMS)  # 6 tensor-core (2 of them the small-job configuration) + 6 CUDA-core per head dim


def _configs():
    from numba_kernels.cuda.decode_attention import ptx_signatures

    return ptx_signatures(head_dims=HEAD_DIMS)


@pytest.mark.parametrize("idx", range(N_CONFIGS))
def test_decode_kernel_compiles_for_sm90(idx):
    from numba import cuda

    configs = _configs()
    assert len(configs) == N_CONFIGS
    name, fn, sig = configs[idx]
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    if name.startswith("decode_tc_"):
        for instr in ("mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned.m8n8.x4", "cp.async.cg.shared.global"):
            assert instr in ptx, f"{name}: {instr} missing"
        assert not re.search(r"\.local\s", ptx), f"{name}: accumulators spilled to local memory"
    if name.startswith("decode_tc_bf16_split_D"):  # the fused-merge configuration stages K/V through registers
        assert "ld.global.v4.u32" in ptx and "st.shared.v4.u32" in ptx, f"{name}: register-staged K/V loads missing"


def test_support_kernels_compile_for_sm90():
    from numba import cuda, types

    from numba_kernels.cuda._decode_simt import make_append_kv, make_combine, make_rotate

    i32_1, i32_2 = types.Array(types.int32, 1, "C"), types.Array(types.int32, 2, "C")
    f32_2 = types.Array(types.float32, 2, "C")
    for kind, el in (("bf16", types.uint16), ("f16", types.float16), ("f32", types.float32)):
        a4 = types.Array(el, 4, "C")
        kern = make_rotate(kind, 64)
        cuda.compile_ptx(kern.py_func, (a4, a4, i32_1, types.int64, f32_2, f32_2, types.boolean), cc=(9, 0))
        for rotate, cs in ((True, f32_2), (False, a4)):  # without rotary the launch passes k_new as cos / sin
            kern = make_append_kv(kind, rotate, 64)
            cuda.compile_ptx(kern.py_func, (a4, a4, a4, a4, i32_2, i32_1, cs, cs, types.boolean), cc=(9, 0))
        comb = make_combine("f32", kind, 128)
        cuda.compile_ptx(comb.py_func, (types.Array(types.float32, 5, "C"), types.Array(types.float32, 4, "C"), a4,
                                        types.Array(types.float32, 3, "C")), cc=(9, 0))


@pytest.mark.parametrize("cfg", [(4, 2, 16, False, False, True, True, 15), (4, 2, 32, False, False, True, False, 15)],
                         ids=["registers", "32-key-cp.async"])
def test_decode_wide_merge_compiles_for_sm90(cfg):
    """The wide in-kernel split merge (LEAN bit 8, timed and off) compiles for cc 9.0 with its per-thread load
    buffer (2 items x WIDE_SPLITS splits x 2 values) in registers."""
    from numba import cuda

    from numba_kernels.cuda._decode_kernels import make_decode_tc

    sig = next(s for n, f, s in _configs() if n == "decode_tc_bf16_split_D128")
    nw, stages, bc, pf, qreg, tpf, reg, lean = cfg
    kern = make_decode_tc(nw, 128, True, False, False, True, stages, True, bc, pf, qreg, tpf, reg, lean)[0]
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    assert "mma.sync.aligned.m16n8k16" in ptx
    assert not re.search(r"\.local\s", ptx), "wide merge buffer spilled to local memory"
