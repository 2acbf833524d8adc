"""CPU flash attention host side: q/k/v/dout packed head-major into a reused per-thread scratch buffer (NumPy copies
or one task per head on several threads), out and the gradients written by the kernels straight into the caller's
(T, H, D) layout. Every path gives the same bits, never hands scratch memory to the caller, and is thread-safe."""
import concurrent.futures

import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels.cpu import flash_attention as ff
from numba_kernels.reference.flash_attention_backward import (flash_attention_backward_ref,
                                                              flash_attention_varlen_backward_ref)
from tests.conftest import TOL, max_err


def _fwd_bwd(q, k, v, do, **kw):
    out, lse = nk.flash_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    return (out, lse) + tuple(nk.flash_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw))


def _inputs(rng, dt, B, Sq, Sk, H, Hk, D):
    q = rng.standard_normal((B, Sq, H, D)).astype(dt)
    k, v = (rng.standard_normal((B, Sk, Hk, D)).astype(dt) for _ in range(2))
    return q, k, v, rng.standard_normal((B, Sq, H, D)).astype(dt)


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(37, 5), softcap=3.0)], ids=["causal", "window"])
def test_threaded_pack_matches_numpy_pack(rng, monkeypatch, dt, kw):
    """pack_heads: one task per head on this thread plus helpers, or NumPy copies: the same bits, and gradients
    that match the reference."""
    q, k, v, do = _inputs(rng, dt, 2, 300, 333, 4, 2, 40)
    monkeypatch.setattr(ff, "PACK_PARALLEL_MIN_BYTES", 1 << 62)
    serial = _fwd_bwd(q, k, v, do, **kw)
    monkeypatch.setattr(ff, "PACK_PARALLEL_MIN_BYTES", 0)
    tasks = _fwd_bwd(q, k, v, do, **kw)
    for a, b in zip(serial, tasks):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    ref = flash_attention_backward_ref(do, q, k, v, *tasks[:2], **kw)
    for name, g, r in zip("qkv", tasks[2:], ref):
        assert max_err(g, r) < TOL[np.dtype(dt)], f"d{name}: {max_err(g, r)}"


def test_threaded_pack_of_strided_varlen_inputs(rng, monkeypatch):
    """Varlen arrays reach pack_heads as the caller passed them: strided views pack like contiguous copies."""
    cu_q = np.array([0, 100, 250, 251, 400], np.int32)
    cu_k = np.array([0, 120, 200, 230, 420], np.int32)
    q = rng.standard_normal((400, 4, 128)).astype(np.float32)[..., ::2]  # (400, 4, 64), every other element
    k = rng.standard_normal((420, 2, 64)).astype(np.float32)
    k = np.asfortranarray(k)
    v = rng.standard_normal((420, 4, 64)).astype(np.float32)[:, ::2]  # (420, 2, 64)
    do = rng.standard_normal((400, 4, 64)).astype(np.float32)[::-1]
    kw = dict(causal=True)
    monkeypatch.setattr(ff, "PACK_PARALLEL_MIN_BYTES", 0)
    res = []
    for x in ((q, k, v, do), tuple(np.ascontiguousarray(a) for a in (q, k, v, do))):
        out, lse = nk.flash_attention_varlen(*x[:3], cu_q, cu_k, return_lse=True, backend="cpu", **kw)
        res.append((out, lse) + tuple(nk.flash_attention_varlen_backward(x[3], *x[:3], out, lse, cu_q, cu_k,
                                                                         backend="cpu", **kw)))
    for a, b in zip(*res):
        assert a.tobytes() == b.tobytes()
    ref = flash_attention_varlen_backward_ref(do, q, k, v, res[0][0], res[0][1], cu_q, cu_k, **kw)
    for name, g, r in zip("qkv", res[0][2:], ref):
        assert max_err(g, r) < TOL[np.dtype(np.float32)], f"d{name}: {max_err(g, r)}"


def test_scratch_reuse_keeps_bits_and_never_reaches_the_caller(rng, monkeypatch):
    """A call after a larger and a smaller one (scratch buffers grown, then reused) gives the bits of a call with
    no scratch kept at all; out, lse and the gradients are contiguous, apart from each other and the scratch."""
    big = _inputs(rng, np.float32, 1, 600, 600, 4, 4, 64)
    small = _inputs(rng, np.float32, 2, 70, 90, 4, 2, 40)
    monkeypatch.setattr(ff, "SCRATCH_KEEP_BYTES", 0)  # every scratch array is a fresh allocation
    fresh = _fwd_bwd(*big, causal=True)
    monkeypatch.setattr(ff, "SCRATCH_KEEP_BYTES", 16 << 20)
    first = _fwd_bwd(*big, causal=True)
    _fwd_bwd(*small, causal=True)
    again = _fwd_bwd(*big, causal=True)
    for a, b, c in zip(fresh, first, again):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    kept = list(ff._scratch.bufs.values())
    assert kept, "nothing was kept"
    for i, a in enumerate(again):
        assert a.flags.c_contiguous
        assert not any(np.shares_memory(a, s) for s in kept)
        assert not any(np.shares_memory(a, b) for b in again[i + 1:])
    assert again[2].shape == big[0].shape and again[3].shape == big[1].shape


def test_concurrent_calls_from_two_threads(rng):
    """Scratch buffers are per thread, the calling threads' own OpenBLAS counts are limited too and a shared limit
    is only restored by the last block to end (``cpu._blas``): two threads calling forward and backward at once
    get the serial (main-thread) results bit for bit. Before, calls from another thread ran two-threaded gemms
    (a limit set from a non-main thread does not reach its own calls) and differed in the last bits."""
    cases = [_inputs(rng, np.float32, 1, 400, 400, 4, 2, 64), _inputs(rng, np.float32, 2, 200, 260, 4, 4, 48)]
    serial = [_fwd_bwd(*c, causal=True) for c in cases]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases)) as ex:  # .result() re-raises
        futs = [ex.submit(lambda c: [_fwd_bwd(*c, causal=True) for _ in range(3)], c) for c in cases]
        got = [f.result() for f in futs]
    for i, ref in enumerate(serial):
        for res in got[i]:
            for a, b in zip(ref, res):
                assert a.tobytes() == b.tobytes()


def test_single_threaded_blas_reaches_a_worker_thread():
    """Inside ``single_threaded_blas`` on a thread other than the main one, OpenBLAS runs one thread for that
    thread's own calls (same gemm bits as on the main thread), and the count is restored afterwards."""
    import numba

    from numba_kernels.cpu import _blas

    @numba.njit(nogil=True)
    def dot(a, b):
        return np.dot(a, b)

    g = np.random.default_rng(0)
    a, b = g.standard_normal((256, 64)).astype(np.float32), g.standard_normal((64, 256)).astype(np.float32)
    with _blas.single_threaded_blas():
        main = dot(a, b)
    res = {}

    def work():
        before = [i["num_threads"] for i in _blas._get_controller().info()]
        with _blas.single_threaded_blas():
            res["inside"] = [i["num_threads"] for i in _blas._get_controller().info()]
            res["dot"] = dot(a, b)
        res["before"], res["after"] = before, [i["num_threads"] for i in _blas._get_controller().info()]

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as ex:
        ex.submit(work).result()
    assert res["dot"].tobytes() == main.tobytes()
    if _blas._local_setters():
        assert set(res["inside"]) == {1}
    assert res["after"] == res["before"]


def test_overlapping_blas_limits_are_restored():
    """A main-thread block that ends while a worker's block runs leaves the counts to the last one out: nothing is
    restored under the running call, and the main thread's next block that ends alone restores them all."""
    import threading

    from numba_kernels.cpu import _blas

    def counts():
        return [i["num_threads"] for i in _blas._get_controller().info()]

    before = counts()
    inside, release = threading.Event(), threading.Event()

    def work():
        with _blas.single_threaded_blas():
            inside.set()
            release.wait(30)

    cm = _blas.single_threaded_blas()
    cm.__enter__()
    t = threading.Thread(target=work)
    t.start()
    assert inside.wait(30)
    cm.__exit__(None, None, None)  # the main thread's block ends first: the worker's call must keep its limit
    release.set()
    t.join()
    with _blas.single_threaded_blas():
        pass
    assert counts() == before
