"""Host-side cost of one decode call, piece by piece (no profiler: perf_counter over many repetitions)."""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_library  # noqa: E402

nk = import_library()
from numba import cuda  # noqa: E402

from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.cuda import decode_attention as cda  # noqa: E402
from numba_kernels.cuda._decode_kernels import make_decode_tc  # noqa: E402
from numba_kernels.decode_attention import _plan  # noqa: E402


def per_call(fn, n=200):
    fn()
    cuda.synchronize()
    with cuda.defer_cleanup():
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t) / n
    cuda.synchronize()
    return dt * 1e6


B, S, H, Hk, D, page = 1, 1024, 32, 8, 128, 16
rng = np.random.default_rng(0)
kc = cuda.to_device(rng.standard_normal((B * S // page, page, Hk, D)).astype(bfloat16).view(np.uint16))
vc = cuda.to_device(rng.standard_normal((B * S // page, page, Hk, D)).astype(bfloat16).view(np.uint16))
bt = np.arange(B * S // page, dtype=np.int32).reshape(B, -1)
q = rng.standard_normal((B, 1, H, D)).astype(bfloat16)
qd = cuda.to_device(q.view(np.uint16))
seqlens = np.full(B, S, np.int32)
plan = _plan(q, kc, vc, None, None, None, None, seqlens, None, None, bt, None, False, (-1, -1), 0.0, None, 0)
tb, st, en = (cuda.to_device(a.astype(np.int32)) for a in (plan.table, plan.leftpad, plan.end))
print(cuda.get_current_device().name)
print(f"_plan (validation)              {per_call(lambda: _plan(q, kc, vc, None, None, None, None, seqlens, None, None, bt, None, False, (-1, -1), 0.0, None, 0)):8.1f} us")
print(f"_i32 cached metadata (3 arrays) {per_call(lambda: (cda._i32(plan.table), cda._i32(plan.leftpad), cda._i32(plan.end))):8.1f} us")
print(f"cuda.to_device(seqlens)         {per_call(lambda: cuda.to_device(seqlens)):8.1f} us")
print(f"cuda.device_array x2            {per_call(lambda: (cuda.device_array((4, 1, 1, H, D), np.float32), cuda.device_array((4, 1, H, 1), np.float32))):8.1f} us")
print(f"3 x .view(np.uint32)            {per_call(lambda: (qd.view(np.uint32), kc.view(np.uint32), vc.view(np.uint32))):8.1f} us")
kern, nth, smem = make_decode_tc(4, 128, True, False, False, False, 3)
o = cuda.device_array((B, 1, H, D // 2), np.uint32)
lse = cuda.device_array((B, H, 1), np.float32)
sl = cda._cached(np.zeros((0, 0), np.float32))
args = (qd.view(np.uint32), kc.view(np.uint32), vc.view(np.uint32), tb, st, en, o, lse, sl, np.float32(0.1),
        np.float32(0), np.float32(0), np.int32(-1), np.int32(-1), np.int32(1))
cda._launch(kern, (1, Hk, B), nth, smem, args)
print(f"kernel launch (numba, 15 args)  {per_call(lambda: kern[(1, Hk, B), nth, 0, smem](*args)):8.1f} us")
print(f"attend_cuda                     {per_call(lambda: cda.attend_cuda(plan, qd, kc, vc, tb, st, en, 'bf16')):8.1f} us")
kw = dict(block_table=bt, cache_seqlens=seqlens)
print(f"public call                     {per_call(lambda: nk.flash_attention_with_kvcache(qd, kc, vc, **kw), 50):8.1f} us")
