"""The CPU attention forward gives the same bits in a process that compiles its kernels as in one that loads
them from numba's cache (with ``reassoc`` fast-math the two differed: LLVM reassociated the softmax sums
differently when the kernels were inlined into freshly compiled callers)."""
import os
import subprocess
import sys

SCRIPT = """
import hashlib
import numpy as np
import numba_kernels as nk
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 300, 4, 64)).astype(np.float32) for _ in range(3))
out, lse = nk.flash_attention(q, k, v, causal=True, return_lse=True, backend="cpu")
print(hashlib.md5(out.tobytes() + lse.tobytes()).hexdigest())
"""


def test_fresh_compile_equals_cached_load(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = [subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert any((tmp_path / "cache").rglob("*.nbi")), "the first run did not fill the cache"
    fresh, cached = (r.stdout.strip().splitlines()[-1] for r in runs)
    assert fresh == cached
