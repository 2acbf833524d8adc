"""Host-side cost of one decode call, piece by piece (no profiler: perf_counter over many repetitions), with
the light launch path (numba_kernels.cuda._launch) on and off, and a decode loop whose cache_seqlens change
every step (the metadata upload)."""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_library  # noqa: E402

nk = import_library()
from numba import cuda  # noqa: E402

from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.cuda import _launch as fl  # noqa: E402
from numba_kernels.cuda import decode_attention as cda  # noqa: E402
from numba_kernels.cuda._decode_kernels import make_decode_tc  # noqa: E402
from numba_kernels.decode_attention import _plan  # noqa: E402


def per_call(fn, n=200):
    """Host microseconds per call (min of 3 rounds of n calls; the device is synchronized around each round)."""
    best = float("inf")
    for _ in range(3):
        fn()
        cuda.synchronize()
        with cuda.defer_cleanup():
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t) / n)
        cuda.synchronize()
    return best * 1e6


B, S, H, Hk, D, page = 1, 1024, 32, 8, 128, 16
rng = np.random.default_rng(0)
kc = cuda.to_device(rng.standard_normal((B * S // page + 8, page, Hk, D)).astype(bfloat16).view(np.uint16))
vc = cuda.to_device(rng.standard_normal((B * S // page + 8, page, Hk, D)).astype(bfloat16).view(np.uint16))
bt = np.arange(B * S // page + 8, dtype=np.int32).reshape(B, -1)
q = rng.standard_normal((B, 1, H, D)).astype(bfloat16)
qd = cuda.to_device(q.view(np.uint16))
seqlens = np.full(B, S, np.int32)
plan = _plan(q, kc, vc, None, None, None, None, seqlens, None, None, bt, None, False, (-1, -1), 0.0, None, 0)
tb, st, en = (cuda.to_device(a.astype(np.int32)) for a in (plan.table, plan.leftpad, plan.end))
print(cuda.get_current_device().name, time.strftime("%Y-%m-%d %H:%M"))
print(f"_plan (validation)              {per_call(lambda: _plan(q, kc, vc, None, None, None, None, seqlens, None, None, bt, None, False, (-1, -1), 0.0, None, 0)):8.1f} us")
print(f"_i32 content-cached (3 arrays)  {per_call(lambda: (cda._i32(plan.table), cda._i32(plan.leftpad), cda._i32(plan.end))):8.1f} us")
print(f"_i32 by role, unchanged (3)     {per_call(lambda: (cda._i32(plan.table, 't'), cda._i32(plan.leftpad, 'l'), cda._i32(plan.end, 'e'))):8.1f} us")
ctr = [0]


def changing():
    ctr[0] += 1
    return cda._i32(plan.end - (ctr[0] & 1), "e")


print(f"_i32 by role, changed (async)   {per_call(changing):8.1f} us")
bad = 0
for i in range(50):  # the async uploads land: values read back equal what was put, buffers reused per role
    x = rng.integers(0, 1000, size=int(rng.integers(1, 5)), dtype=np.int32)
    d = cda._i32(x, "check")
    bad += not np.array_equal(d.copy_to_host(), x)
print(f"async upload read-back mismatches: {bad} of 50")
print(f"cuda.to_device(seqlens) (sync)  {per_call(lambda: cuda.to_device(seqlens)):8.1f} us")
print(f"cuda.device_array x2            {per_call(lambda: (cuda.device_array((4, 1, 1, H, D), np.float32), cuda.device_array((4, 1, H, 1), np.float32))):8.1f} us")
print(f"_fresh x2 (pooled)              {per_call(lambda: (cda._fresh((4, 1, 1, H, D), np.float32), cda._fresh((4, 1, H, 1), np.float32))):8.1f} us")
kern, nth, smem = make_decode_tc(4, 128, True, False, False, False, 3)
o = cuda.device_array((B, 1, H, D // 2), np.uint32)
lse = cuda.device_array((B, H, 1), np.float32)
sl = cda._cached(np.zeros((0, 0), np.float32))
args = (qd.view(np.uint32), kc.view(np.uint32), vc.view(np.uint32), tb, st, en, o, lse, sl, np.float32(0.1),
        np.float32(0), np.float32(0), np.int32(-1), np.int32(-1), np.int32(1), o, lse, cda._counters(64))
fl.launch(kern, (1, Hk, B), nth, smem, args)
print(f"kernel launch (numba, 18 args)  {per_call(lambda: kern[(1, Hk, B), nth, 0, smem](*args)):8.1f} us")
fl.launch(kern, (1, Hk, B), nth, smem, args)
print(f"kernel launch (_launch, 18 args){per_call(lambda: fl.launch(kern, (1, Hk, B), nth, smem, args)):8.1f} us"
      f"  fast path active: {fl.is_fast(kern, smem, args)}")
kw = dict(block_table=bt, cache_seqlens=seqlens)
rows = []
for on in (False, True):
    fl.ENABLED = on
    a = per_call(lambda: cda.attend_cuda(plan, qd, kc, vc, tb, st, en, "bf16"))
    p = per_call(lambda: nk.flash_attention_with_kvcache(qd, kc, vc, **kw), 100)
    steps = [np.full(B, S - 1 - (i % 7), np.int32) for i in range(8)]
    ctr[0] = 0

    def step():
        ctr[0] += 1
        return nk.flash_attention_with_kvcache(qd, kc, vc, block_table=bt, cache_seqlens=steps[ctr[0] & 7])

    d = per_call(step, 100)
    rows.append((on, a, p, d))
    print(f"fast launch {'on ' if on else 'off'}: attend_cuda {a:7.1f} us | public call {p:7.1f} us | "
          f"public call, cache_seqlens changing every step {d:7.1f} us", flush=True)
fl.ENABLED = True
kn = cuda.to_device(rng.standard_normal((B, 1, Hk, D)).astype(bfloat16).view(np.uint16))
vn = cuda.to_device(rng.standard_normal((B, 1, Hk, D)).astype(bfloat16).view(np.uint16))
app = np.full(B, S - 8, np.int32)  # the same slot every call: timing only
t_app = per_call(lambda: nk.flash_attention_with_kvcache(qd, kc, vc, kn, vn, block_table=bt, cache_seqlens=app), 100)
print(f"public call appending k / v (1 token) {t_app:7.1f} us", flush=True)

# where the public call's host time goes: cProfile over many calls (the profiler inflates every Python call by
# about the same amount, so read the shares, not the microseconds)
import cProfile  # noqa: E402
import pstats  # noqa: E402

for label, qx in (("device q", qd), ("host numpy q", q)):
    nk.flash_attention_with_kvcache(qx, kc, vc, **kw)
    cuda.synchronize()
    prof = cProfile.Profile()
    with cuda.defer_cleanup():
        prof.enable()
        for _ in range(500):
            nk.flash_attention_with_kvcache(qx, kc, vc, **kw)
        prof.disable()
    cuda.synchronize()
    print(f"--- cProfile, 500 public calls, {label} (sorted by own time)")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(22)
