"""PagedKVCache: allocator bookkeeping, fork with copy-on-write, attend against the reference over each
sequence's tokens, out-of-blocks errors that change nothing, and (under the simulator) device buffers."""
import numpy as np
import pytest

import numba_kernels as nk
from numba_kernels import CacheFullError, PagedKVCache
from numba_kernels._dispatch import bfloat16
from numba_kernels.reference.flash_attention import attention_one_ref
from tests.conftest import DTYPES, TOL, dtype_id, max_err

Hk, D = 2, 16


def _tok(rng, n, dt=np.float32):
    return rng.standard_normal((n, Hk, D)).astype(dt)


def _state(c):
    """Everything a failed call must leave as it was."""
    return (np.asarray(c.k_cache).copy(), np.asarray(c.v_cache).copy(), c.num_free_blocks, list(c._free),
            c._ref.copy(), {s: c.blocks(s) for s in c.seq_ids}, {s: c.seqlen(s) for s in c.seq_ids})


def _assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:4] == b[2:4] and np.array_equal(a[4], b[4]) and a[5:] == b[5:]


def _filled(rng, num_blocks, page, lens):
    c = PagedKVCache(num_blocks, page, Hk, D)
    ids, toks = [], []
    for n in lens:
        s = c.new_sequence()
        k, v = _tok(rng, n), _tok(rng, n)
        c.append(s, k, v)
        ids.append(s)
        toks.append((k, v))
    return c, ids, toks


# ---------------------------------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("page", [1, 3, 16], ids=lambda p: f"page{p}")
def test_append_bookkeeping(rng, page):
    c = PagedKVCache(40, page, Hk, D)
    a, b = c.new_sequence(), c.new_sequence()
    assert a != b and c.seqlen(a) == 0 and c.blocks(a) == [] and c.num_free_blocks == 40
    ks, vs = [], []
    for n in (1, 4, page, 2):  # chunks that start and end mid-page and cross page boundaries
        k, v = _tok(rng, n), _tok(rng, n)
        c.append(a, k, v)
        ks.append(k)
        vs.append(v)
    c.append(b, _tok(rng, 5), _tok(rng, 5))
    n_a = 7 + page
    assert c.seqlen(a) == n_a and len(c.blocks(a)) == -(-n_a // page)
    assert c.num_free_blocks == 40 - len(c.blocks(a)) - len(c.blocks(b))
    assert not set(c.blocks(a)) & set(c.blocks(b))
    gk, gv = c.gather(a)
    np.testing.assert_array_equal(gk, np.concatenate(ks))
    np.testing.assert_array_equal(gv, np.concatenate(vs))
    table, lens = c.block_table([b, a]), c.cache_seqlens([b, a])
    assert table.dtype == np.int32 and lens.dtype == np.int32 and lens.tolist() == [5, n_a]
    assert table.shape == (2, len(c.blocks(a))) and table[1].tolist() == c.blocks(a)
    assert table[0, :len(c.blocks(b))].tolist() == c.blocks(b)
    assert c.block_table([a], max_blocks=50).shape == (1, 50)
    with pytest.raises(ValueError, match="max_blocks"):
        c.block_table([a], max_blocks=0)


def test_reserve_then_append_uses_the_reserved_pages(rng):
    c = PagedKVCache(10, 4, Hk, D)
    s = c.new_sequence()
    c.reserve([s], 9)
    assert len(c.blocks(s)) == 3 and c.seqlen(s) == 0 and c.num_free_blocks == 7
    c.append(s, _tok(rng, 9), _tok(rng, 9))
    assert len(c.blocks(s)) == 3 and c.num_free_blocks == 7
    c.reserve(s, 0)
    assert c.num_free_blocks == 7


def test_free_returns_blocks(rng):
    c, (a, b), _ = _filled(rng, 12, 4, [10, 7])
    assert c.num_free_blocks == 12 - 3 - 2
    c.free(a)
    assert c.num_free_blocks == 10 and a not in c.seq_ids
    with pytest.raises(KeyError):
        c.seqlen(a)
    c.free(b)
    assert c.num_free_blocks == 12 and np.all(c._ref == 0)
    s = c.new_sequence()
    c.append(s, _tok(rng, 48), _tok(rng, 48))  # every block is usable again
    assert c.num_free_blocks == 0


@pytest.mark.parametrize("n", [10, 12], ids=["partial-last-page", "full-pages"])
def test_fork_copy_on_write(rng, n):
    c, (a,), ((k, v),) = _filled(rng, 20, 4, [n])
    free0 = c.num_free_blocks
    b = c.fork(a)
    assert c.seqlen(b) == n and c.blocks(b) == c.blocks(a) and c.num_free_blocks == free0
    assert all(c.refcount(x) == 2 for x in c.blocks(a))
    kb, vb = _tok(rng, 5), _tok(rng, 5)
    c.append(b, kb, vb)  # child writes: a shared partial page is copied first
    ka, va = c.gather(a)
    np.testing.assert_array_equal(ka, k)  # the parent's tokens are intact
    np.testing.assert_array_equal(va, v)
    gk, gv = c.gather(b)
    np.testing.assert_array_equal(gk, np.concatenate([k, kb]))
    np.testing.assert_array_equal(gv, np.concatenate([v, vb]))
    full = n // 4
    assert c.blocks(b)[:full] == c.blocks(a)[:full]  # full prefix pages stay shared
    if n % 4:
        assert c.blocks(b)[full] != c.blocks(a)[full] and c.refcount(c.blocks(a)[full]) == 1
    ka2 = _tok(rng, 3)
    c.append(a, ka2, ka2)  # the parent now owns its last page alone: written in place, no copy
    blocks_a = c.blocks(a)
    np.testing.assert_array_equal(c.gather(a)[0], np.concatenate([k, ka2]))
    np.testing.assert_array_equal(c.gather(b)[0], np.concatenate([k, kb]))
    c.free(a)
    np.testing.assert_array_equal(c.gather(b)[0], np.concatenate([k, kb]))  # shared pages survive
    assert all(c.refcount(x) == 1 for x in c.blocks(b))
    c.free(b)
    assert c.num_free_blocks == 20 and not set(blocks_a) & set(c._blocks)


def test_fork_of_fork_and_empty(rng):
    c, (a,), ((k, _),) = _filled(rng, 20, 3, [7])
    b = c.fork(a)
    d = c.fork(b)
    assert c.refcount(c.blocks(a)[0]) == 3
    e = c.fork(c.new_sequence())
    assert c.seqlen(e) == 0 and c.blocks(e) == []
    for s in (a, b, d):
        t = _tok(rng, 2)
        c.append(s, t, t)
        np.testing.assert_array_equal(c.gather(s)[0], np.concatenate([k, t]))


# ---------------------------------------------------------------------------------------------- attend
def _check_attend(c, q, ids, before, new, out, lse, causal):
    """out/lse against the reference over each sequence's tokens (before + new)."""
    for i, s in enumerate(ids):
        kk = np.concatenate([before[i][0], new[0][i]]) if new else before[i][0]
        vv = np.concatenate([before[i][1], new[1][i]]) if new else before[i][1]
        gk, gv = c.gather(s)
        np.testing.assert_array_equal(gk, kk)
        np.testing.assert_array_equal(gv, vv)
        ref, rlse = attention_one_ref(q[i], kk, vv, causal=causal)
        assert max_err(out[i], ref) < TOL[np.dtype(np.float32)]
        np.testing.assert_allclose(lse[i], rlse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("page", [1, 7, 16], ids=lambda p: f"page{p}")
def test_attend_matches_reference(rng, page):
    """Decode steps over a batch holding a parent, its fork and an unrelated sequence: each row attends over
    exactly its own tokens, and forked rows diverge without disturbing each other."""
    c, (a, x), toks = _filled(rng, 200, page, [23, 40])
    b = c.fork(a)
    ids = [a, b, x]
    seqs = [toks[0], toks[0], toks[1]]
    H = 4
    for step, (Sq, snew) in enumerate([(1, 1), (3, 3), (1, 0), (2, 5)]):
        q = rng.standard_normal((3, Sq, H, D)).astype(np.float32)
        new = None
        if snew:
            new = (rng.standard_normal((3, snew, Hk, D)).astype(np.float32),
                   rng.standard_normal((3, snew, Hk, D)).astype(np.float32))
        out, lse = c.attend(q, ids, *(new or (None, None)), causal=True, return_lse=True, num_splits=2)
        _check_attend(c, q, ids, seqs, new, out, lse, causal=True)
        if new:
            seqs = [(np.concatenate([seqs[i][0], new[0][i]]), np.concatenate([seqs[i][1], new[1][i]]))
                    for i in range(3)]
        assert c.cache_seqlens(ids).tolist() == [len(t[0]) for t in seqs]


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_dtypes(rng, dt):
    """Host float32 tokens are stored in the cache dtype; attend runs in that dtype."""
    c = PagedKVCache(30, 5, Hk, D, dtype=dt)
    s = c.new_sequence()
    k, v = _tok(rng, 13), _tok(rng, 13)
    c.append(s, k, v)
    assert c.k_cache.dtype == dt
    np.testing.assert_array_equal(c.gather(s)[0], k.astype(dt))
    q = rng.standard_normal((1, 2, 4, D)).astype(dt)
    kn = rng.standard_normal((1, 2, Hk, D)).astype(dt)
    out = c.attend(q, [s], kn, kn, causal=True)
    assert out.dtype == dt
    gk, gv = c.gather(s)
    ref, _ = attention_one_ref(q[0], gk, gv, causal=True)
    assert max_err(out[0], ref) < TOL[np.dtype(dt)]


# ---------------------------------------------------------------------------------------------- errors
def test_out_of_blocks_changes_nothing(rng):
    c, (a, b), _ = _filled(rng, 8, 4, [10, 6])  # 3 + 2 blocks used, 3 free
    f = c.fork(a)  # shares a's 3 blocks, the last one half full
    st = _state(c)
    with pytest.raises(CacheFullError, match="free blocks"):
        c.append(b, _tok(rng, 20), _tok(rng, 20))  # needs 5 more blocks
    _assert_same(_state(c), st)
    with pytest.raises(CacheFullError):
        c.reserve([a, b, f], [1, 10, 5])  # a: 1 copy; b: 2 new; f: in place (a copied) + 1 new = 4 > 3
    _assert_same(_state(c), st)
    q = rng.standard_normal((3, 1, 4, D)).astype(np.float32)
    new = rng.standard_normal((3, 6, Hk, D)).astype(np.float32)
    with pytest.raises(CacheFullError):
        c.attend(q, [a, b, f], new, new)
    _assert_same(_state(c), st)
    c.reserve([a, f], [1, 1])  # exactly enough: one copy (the second holder then writes in place)
    assert c.num_free_blocks == 2


def _live_state(c):
    """The bookkeeping and every live sequence's tokens (a copy-on-write that was rolled back may leave
    data in a free block, which nothing can observe)."""
    st = _state(c)
    return st[2:4] + (st[4].tolist(),) + st[5:] + ({s: [x.tobytes() for x in c.gather(s)] for s in c.seq_ids},)


def test_failed_attend_rolls_back(rng):
    c, (a, b), _ = _filled(rng, 20, 4, [10, 6])
    f = c.fork(a)
    st = _live_state(c)
    q = rng.standard_normal((2, 1, 4, D)).astype(np.float32)
    new = rng.standard_normal((2, 3, Hk, D)).astype(np.float32)
    with pytest.raises(TypeError, match="k must have the same dtype"):  # raised after the copy-on-write
        c.attend(q, [a, f], new.astype(np.float64), new)
    assert _live_state(c) == st
    with pytest.raises(ValueError, match="window_size"):
        c.attend(q, [a, f], new, new, window_size=(1, 2, 3))
    assert _live_state(c) == st
    with pytest.raises(TypeError, match="block_table"):
        c.attend(q, [a, f], new, new, block_table=c.block_table([a, f]))
    with pytest.raises(ValueError, match="q must have shape"):
        c.attend(q, [a], new, new)
    with pytest.raises(ValueError, match="repeat"):
        c.attend(q, [a, a], new, new)
    with pytest.raises(ValueError, match="k and v"):
        c.attend(q, [a, b], new, None)
    assert _live_state(c) == st


def test_bad_arguments(rng):
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(4, 0, Hk, D)
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(4, 2, Hk, D, dtype=np.int32)
    with pytest.raises(ValueError, match="device"):
        PagedKVCache(4, 2, Hk, D, device="tpu")
    c = PagedKVCache(4, 2, Hk, D)
    s = c.new_sequence()
    st = _state(c)
    with pytest.raises(KeyError):
        c.append(99, _tok(rng, 1), _tok(rng, 1))
    with pytest.raises(ValueError, match="k must have shape"):
        c.append(s, rng.standard_normal((2, Hk + 1, D)), _tok(rng, 2))
    with pytest.raises(ValueError, match="v must have shape"):
        c.append(s, _tok(rng, 2), _tok(rng, 3))
    with pytest.raises(TypeError, match="float"):
        c.append(s, _tok(rng, 2).astype(np.int64), _tok(rng, 2))
    with pytest.raises(ValueError, match="n must be >= 0"):
        c.reserve([s], -1)
    _assert_same(_state(c), st)
    assert "free_blocks=4" in repr(c)


# ---------------------------------------------------------------------------------------------- device
@pytest.mark.sim
@pytest.mark.parametrize("dt", [np.float32, bfloat16], ids=dtype_id)
def test_device_buffers(rng, dt):
    """device="cuda": numba device buffers (bfloat16 as uint16 bits), appends from host and device arrays,
    fork and copy-on-write on the device."""
    from numba import cuda

    c = PagedKVCache(12, 3, Hk, D, dtype=dt, device="cuda")
    assert nk._dispatch.is_device_array(c.k_cache)
    assert c.k_cache.dtype == (np.uint16 if dt == bfloat16 else dt)
    a = c.new_sequence()
    k = _tok(rng, 7, dt)
    c.append(a, k, k)
    b = c.fork(a)
    k2 = _tok(rng, 4, dt)
    dk2 = cuda.to_device(k2.view(np.uint16) if dt == bfloat16 else k2)
    c.append(b, dk2, dk2)
    ga, gb = c.gather(a)[0], c.gather(b)[0]
    assert ga.dtype == dt
    np.testing.assert_array_equal(ga, k)
    np.testing.assert_array_equal(gb, np.concatenate([k, k2]))
    assert c.blocks(a)[:2] == c.blocks(b)[:2] and c.blocks(a)[2] != c.blocks(b)[2]
