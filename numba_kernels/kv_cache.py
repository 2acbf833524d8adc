"""``PagedKVCache``: paged K/V buffers of any page size plus a block allocator, producing the
``block_table`` / ``cache_seqlens`` arguments of :func:`flash_attention_with_kvcache`.

Bookkeeping lives on the host (a free-block stack, a reference count per block, and per sequence its
block list and length); the buffers live on the host (NumPy) or on the GPU (numba device arrays,
bfloat16 as uint16 bits). Forked sequences share their prefix pages; a shared page is copied
(copy-on-write) before either owner appends into it. Every operation that can fail checks first and
changes nothing when it raises.
"""
import numpy as np

from numba_kernels import _dispatch as dsp
from numba_kernels.decode_attention import dtype_of, flash_attention_with_kvcache


class CacheFullError(RuntimeError):
    """Raised when a :class:`PagedKVCache` has too few free blocks for a request; nothing was changed."""


class PagedKVCache:
    """Paged key/value caches and the block allocator that fills them.

    Parameters
    ----------
    num_blocks : int
        Pages in each buffer.
    page_size : int
        Tokens per page (any value >= 1).
    num_kv_heads, head_dim : int
        Hk and D of the caches.
    dtype : dtype
        float16, bfloat16 (``ml_dtypes``), float32 or float64.
    device : {"cpu", "cuda"}
        Where the buffers live: NumPy arrays, or numba device arrays (bfloat16 held as uint16 bits).

    Attributes
    ----------
    k_cache, v_cache : ndarray or DeviceNDArray, shape (num_blocks, page_size, Hk, D)
        The buffers, zero-initialized; pass them (with :meth:`block_table` and :meth:`cache_seqlens`) to
        :func:`flash_attention_with_kvcache`, or use :meth:`attend`.

    Examples
    --------
    >>> cache = PagedKVCache(64, 16, 2, 8)
    >>> s = cache.new_sequence()
    >>> cache.append(s, np.ones((5, 2, 8), np.float32), np.ones((5, 2, 8), np.float32))
    >>> cache.seqlen(s), cache.num_free_blocks
    (5, 63)
    """

    def __init__(self, num_blocks, page_size, num_kv_heads, head_dim, dtype=np.float32, device="cpu"):
        for name, x in (("num_blocks", num_blocks), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
                raise ValueError(f"{name} must be an int >= 1, got {x!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in dsp.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {self.dtype}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.num_blocks, self.page_size = int(num_blocks), int(page_size)
        self.num_kv_heads, self.head_dim, self.device = int(num_kv_heads), int(head_dim), device
        shape = (self.num_blocks, self.page_size, self.num_kv_heads, self.head_dim)
        self.k_cache, self.v_cache = self._zeros(shape), self._zeros(shape)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._ref = np.zeros(self.num_blocks, dtype=np.int64)
        self._blocks = {}  # seq_id -> list of block ids (may extend past the tokens: reserved room)
        self._len = {}  # seq_id -> tokens stored
        self._next_id = 0

    def _zeros(self, shape):
        if self.device == "cpu":
            return np.zeros(shape, dtype=self.dtype)
        from numba import cuda

        if not dsp.cuda_available():
            raise dsp.BackendUnavailableError("PagedKVCache(device='cuda') needs a CUDA GPU (or the simulator)")
        store = np.dtype(np.uint16) if self.dtype == dsp.bfloat16 else self.dtype
        arr = cuda.device_array(shape, dtype=store)
        try:
            from numba.cuda.cudadrv.driver import device_memset

            device_memset(arr, 0, arr.size * store.itemsize)
        except Exception:  # the simulator
            arr.copy_to_device(np.zeros(shape, dtype=store))
        return arr

    # ------------------------------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self):
        """Blocks not held by any sequence."""
        return len(self._free)

    @property
    def seq_ids(self):
        """Ids of the live sequences, in creation order."""
        return list(self._len)

    def _check_seq(self, seq_id):
        if seq_id not in self._len:
            raise KeyError(f"unknown sequence id {seq_id!r} (live: {self.seq_ids})")

    def _check_seqs(self, seq_ids):
        ids = [seq_ids] if isinstance(seq_ids, (int, np.integer)) else list(seq_ids)
        for s in ids:
            self._check_seq(s)
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must not repeat a sequence, got {ids}")
        return ids

    def seqlen(self, seq_id):
        """Tokens stored for ``seq_id``."""
        self._check_seq(seq_id)
        return self._len[seq_id]

    def blocks(self, seq_id):
        """The block ids of ``seq_id`` (a copy), including reserved ones past its tokens."""
        self._check_seq(seq_id)
        return list(self._blocks[seq_id])

    def refcount(self, block):
        """How many sequences hold ``block``."""
        return int(self._ref[block])

    def block_table(self, seq_ids, max_blocks=None):
        """The ``block_table`` argument for these sequences.

        Parameters
        ----------
        seq_ids : sequence of int, length B
        max_blocks : int, optional
            Width of the table (default: the longest block list, at least 1).

        Returns
        -------
        ndarray, shape (B, max_blocks), int32
            Row b lists the pages of ``seq_ids[b]``; unused entries are 0 (never read).
        """
        ids = self._check_seqs(seq_ids)
        width = max([len(self._blocks[s]) for s in ids] + [1])
        if max_blocks is not None:
            if max_blocks < width:
                raise ValueError(f"max_blocks must be >= {width} (the longest block list), got {max_blocks}")
            width = int(max_blocks)
        table = np.zeros((len(ids), width), dtype=np.int32)
        for b, s in enumerate(ids):
            table[b, :len(self._blocks[s])] = self._blocks[s]
        return table

    def cache_seqlens(self, seq_ids):
        """The ``cache_seqlens`` argument: ndarray, shape (B,), int32, the tokens of each sequence."""
        return np.array([self._len[s] for s in self._check_seqs(seq_ids)], dtype=np.int32)

    def gather(self, seq_id):
        """Host copies (k, v), each shape (seqlen, Hk, D) in the cache dtype, of a sequence's tokens."""
        self._check_seq(seq_id)
        n, page = self._len[seq_id], self.page_size
        pos = np.arange(n)
        rows = np.asarray(self._blocks[seq_id], dtype=np.int64)[pos // page] if n else np.zeros(0, np.int64)
        k = dsp.to_host(self.k_cache, self.dtype)[rows, pos % page]
        v = dsp.to_host(self.v_cache, self.dtype)[rows, pos % page]
        return k, v

    # ------------------------------------------------------------------------------------------ allocator
    def new_sequence(self):
        """Start an empty sequence (no block yet); returns its id."""
        sid = self._next_id
        self._next_id += 1
        self._blocks[sid], self._len[sid] = [], 0
        return sid

    def free(self, seq_id):
        """Drop a sequence; blocks no other sequence holds return to the free list."""
        self._check_seq(seq_id)
        for blk in reversed(self._blocks.pop(seq_id)):
            self._ref[blk] -= 1
            if self._ref[blk] == 0:
                self._free.append(blk)
        del self._len[seq_id]

    def fork(self, seq_id):
        """A new sequence sharing the pages of ``seq_id``'s tokens (no copy; reference counted).
        The shared partially filled last page is copied by whichever sequence appends into it first."""
        self._check_seq(seq_id)
        n = self._len[seq_id]
        shared = self._blocks[seq_id][:-(-n // self.page_size)]
        sid = self.new_sequence()
        self._blocks[sid], self._len[sid] = list(shared), n
        self._ref[shared] += 1
        return sid

    def _plan_reserve(self, ids, counts):
        """Blocks to copy (seq, index) and to add per sequence, with the total needed; changes nothing."""
        page, ref, cow, add, need = self.page_size, {}, [], [], 0
        for s, n in zip(ids, counts):
            blocks, n0 = self._blocks[s], self._len[s]
            if n:
                for i in range(n0 // page, min(-(-(n0 + n) // page), len(blocks))):
                    blk = blocks[i]
                    r = ref.get(blk, int(self._ref[blk]))
                    if r > 1:  # written into while shared: copy it (the last holder writes in place)
                        cow.append((s, i))
                        ref[blk] = r - 1
                        need += 1
            extra = max(0, -(-(n0 + n) // page) - len(blocks))
            add.append(extra)
            need += extra
        return cow, add, need

    def reserve(self, seq_ids, n):
        """Make room for ``n`` more tokens in each sequence: allocate pages and copy shared pages that
        the new tokens will be written into (copy-on-write). Lengths do not change.

        Parameters
        ----------
        seq_ids : int or sequence of int, length B
        n : int or sequence of int, length B

        Raises
        ------
        CacheFullError
            Too few free blocks; nothing was allocated or copied.
        """
        self._reserve(seq_ids, n)

    def _reserve(self, seq_ids, n):
        """:meth:`reserve`, returning an undo log for :meth:`_undo`."""
        ids = self._check_seqs(seq_ids)
        counts = np.broadcast_to(np.asarray(n, dtype=np.int64), (len(ids),))
        if np.any(counts < 0):
            raise ValueError(f"n must be >= 0, got {np.asarray(n).tolist()}")
        cow, add, need = self._plan_reserve(ids, counts)
        if need > len(self._free):
            raise CacheFullError(f"the KV cache needs {need} free blocks of {self.page_size} tokens for this "
                                 f"request but only {len(self._free)} of {self.num_blocks} are free "
                                 f"(free sequences or create a larger PagedKVCache); nothing was changed")
        log = []  # (seq_id, old block list, blocks taken from the free list, blocks whose ref dropped)
        for s, i in cow:
            old, new = self._blocks[s][i], self._free.pop()
            self._copy_block(new, old)
            log.append((s, list(self._blocks[s]), [new], [old]))
            self._ref[old] -= 1
            self._ref[new] = 1
            self._blocks[s][i] = new
        for s, extra in zip(ids, add):
            if extra:
                new = [self._free.pop() for _ in range(extra)]
                log.append((s, list(self._blocks[s]), new, []))
                self._ref[new] = 1
                self._blocks[s].extend(new)
        return log

    def _undo(self, log):
        for s, old_blocks, taken, dropped in reversed(log):
            self._blocks[s] = old_blocks
            self._ref[taken] = 0
            self._ref[dropped] += 1
            self._free.extend(reversed(taken))

    def _copy_block(self, dst, src):
        if self.device == "cpu":
            self.k_cache[dst] = self.k_cache[src]
            self.v_cache[dst] = self.v_cache[src]
        else:
            self.k_cache[dst].copy_to_device(self.k_cache[src])
            self.v_cache[dst].copy_to_device(self.v_cache[src])

    # ------------------------------------------------------------------------------------------ tokens
    def _check_tokens(self, name, x, lead):
        """x must be shaped lead + (Hk, D); host arrays of another float dtype are cast, device arrays
        must already hold the cache dtype. Returns x ready to write."""
        if x is None or not (isinstance(x, np.ndarray) or dsp.is_device_array(x)):
            raise TypeError(f"{name} must be a numpy or CUDA device array, got {type(x).__name__}")
        want = tuple(lead) + (self.num_kv_heads, self.head_dim)
        bad_lead = lead[0] is not None and x.shape[0] != lead[0]
        if len(x.shape) != len(want) or tuple(x.shape)[1:] != want[1:] or bad_lead:
            shown = tuple("S" if w is None else w for w in want)
            raise ValueError(f"{name} must have shape {shown}, got {tuple(x.shape)}")
        dt = dtype_of(x)
        if dt not in dsp.FLOAT_DTYPES:
            raise TypeError(f"{name} must have a float dtype, got {dt}")
        if dsp.is_device_array(x) and dt != self.dtype:
            raise TypeError(f"{name} on the device must have the cache dtype {self.dtype}, got {dt}")
        return x

    def append(self, seq_id, k, v):
        """Write tokens at the end of a sequence (allocating pages, copying a shared last page) and
        advance its length.

        Parameters
        ----------
        seq_id : int
        k, v : ndarray or device array, shape (S, Hk, D)
            New keys/values (already rotated if the model uses RoPE); host arrays are cast to the cache dtype.

        Raises
        ------
        CacheFullError
            Too few free blocks; nothing was changed.
        """
        self._check_seq(seq_id)
        k = self._check_tokens("k", k, (None,))
        v = self._check_tokens("v", v, (k.shape[0],))
        S = int(k.shape[0])
        self._reserve([seq_id], S)
        n0, page, blocks = self._len[seq_id], self.page_size, self._blocks[seq_id]
        for cache, x in ((self.k_cache, k), (self.v_cache, v)):
            if self.device == "cpu":
                x = np.asarray(dsp.to_host(x, self.dtype)).astype(self.dtype, copy=False)
            elif not dsp.is_device_array(x):
                x = np.ascontiguousarray(x, dtype=self.dtype)
                x = x.view(np.uint16) if self.dtype == dsp.bfloat16 else x
            t = 0
            while t < S:  # one contiguous run of slots per page
                p = n0 + t
                m = min(S - t, page - p % page)
                cache[blocks[p // page], p % page:p % page + m] = x[t:t + m]
                t += m
        self._len[seq_id] = n0 + S

    def attend(self, q, seq_ids, k=None, v=None, **kwargs):
        """Append k/v (if given) to each sequence and attend q over its tokens, through
        :func:`flash_attention_with_kvcache` on the paged buffers.

        Parameters
        ----------
        q : ndarray, shape (B, Sq, H, D)
        seq_ids : sequence of int, length B
            The sequence of each batch row (distinct).
        k, v : ndarray, shape (B, Snew, Hk, D), optional
            New tokens, appended (rotated first when ``rotary_cos``/``rotary_sin`` are given) before attending.
        **kwargs
            Any other option of :func:`flash_attention_with_kvcache` (causal, window_size, rotary_cos,
            rotary_sin, rotary_interleaved, softcap, alibi_slopes, num_splits, return_lse, backend, ...);
            not block_table, cache_seqlens, cache_batch_idx or cache_leftpad.

        Returns
        -------
        What :func:`flash_attention_with_kvcache` returns: out (B, Sq, H, D) [, lse (B, H, Sq)].

        Raises
        ------
        CacheFullError
            Too few free blocks for the new tokens; nothing was changed.
        ValueError, TypeError
            From the call's validation; the allocation is rolled back and no sequence's tokens change
            (a page copied for copy-on-write may remain as data in a free block).
        """
        taken = {"block_table", "cache_seqlens", "cache_batch_idx", "cache_leftpad"} & set(kwargs)
        if taken:
            raise TypeError(f"attend() sets {sorted(taken)} itself; call flash_attention_with_kvcache directly "
                            f"with self.k_cache / self.v_cache for custom tables")
        ids = self._check_seqs(seq_ids)
        if q is None or len(q.shape) != 4 or int(q.shape[0]) != len(ids):
            raise ValueError(f"q must have shape ({len(ids)}, Sq, H, {self.head_dim}) for {len(ids)} sequences, "
                             f"got {getattr(q, 'shape', None)}")
        if (k is None) != (v is None):
            raise ValueError("k and v must be given together (new tokens to append) or both be None")
        snew = 0 if k is None else int(k.shape[1]) if len(k.shape) == 4 else -1
        if snew < 0:
            raise ValueError(f"k must have shape ({len(ids)}, Snew, {self.num_kv_heads}, {self.head_dim}), "
                             f"got {tuple(k.shape)}")
        log = self._reserve(ids, snew)
        try:
            res = flash_attention_with_kvcache(q, self.k_cache, self.v_cache, k, v, block_table=self.block_table(ids),
                                               cache_seqlens=self.cache_seqlens(ids), **kwargs)
        except BaseException:
            self._undo(log)  # the call validates before writing, so the buffers are untouched too
            raise
        for s in ids:
            self._len[s] += snew
        return res

    def __repr__(self):
        return (f"PagedKVCache(num_blocks={self.num_blocks}, page_size={self.page_size}, Hk={self.num_kv_heads}, "
                f"D={self.head_dim}, dtype={self.dtype.name}, device={self.device!r}, sequences={len(self._len)}, "
                f"free_blocks={self.num_free_blocks})")
