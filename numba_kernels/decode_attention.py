"""Decode attention against a KV cache: ``flash_attention_with_kvcache`` (flash-attn 2 semantics, any page
size), ``attention_combine`` (flash-attn 3's ``flash_attn_combine``) and the ``PagedKVCache`` helper."""
from types import SimpleNamespace

import numpy as np

from numba_kernels import _dispatch as dsp
from numba_kernels.flash_attention import MAX_HEAD_DIM, _check_options

HALF_DTYPES = (np.dtype(np.float16), dsp.bfloat16)


def _on_device(x):
    """dsp.is_device_array, without evaluating a numba device array's ``__cuda_array_interface__``."""
    if x is None or isinstance(x, np.ndarray):
        return False
    return bool(getattr(type(x), "__cuda_memory__", False)) or dsp.is_device_array(x)


def dtype_of(x):
    """The dtype of an array argument; a uint16 *device* array holds bfloat16 bits (the library's
    convention: numba device arrays cannot carry bfloat16, so our ops return its bits as uint16)."""
    if isinstance(x, np.ndarray):
        return x.dtype
    if getattr(type(x), "__cuda_memory__", False):
        dt = np.dtype(x.dtype)
        return dsp.bfloat16 if dt == np.uint16 else dt
    dt = dsp.array_dtype(x)
    if dt == np.uint16 and dsp.is_device_array(x):
        return dsp.bfloat16
    return dt


def _check_array(name, x, ndim, dtype=None):
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if not (isinstance(x, np.ndarray) or _on_device(x)):
        raise TypeError(f"{name} must be a numpy or CUDA device array, got {type(x).__name__}")
    dt = dtype_of(x)
    if dtype is None and dt not in dsp.FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, got {dt}")
    if dtype is not None and dt != dtype:
        raise TypeError(f"{name} must have the same dtype as q ({dtype}), got {dt}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return dt


def _int_array(name, x, shape):
    """A small integer array argument as an int64 host copy, shape-checked."""
    h = x if isinstance(x, np.ndarray) else np.asarray(dsp.to_host(x))
    if h.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype (int32), got {h.dtype}")
    if h.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {h.shape}")
    return h.astype(np.int64)


def _plan(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
          block_table, softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits):
    """Validate every argument of :func:`flash_attention_with_kvcache` (before anything is written);
    return the call as a namespace of host metadata."""
    dt = _check_array("q", q, 4)
    B, Sq, H, D = (int(s) for s in q.shape)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_array(name, x, 4, dt)
    if tuple(k_cache.shape) != tuple(v_cache.shape):
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    NB, page, Hk, Dc = (int(s) for s in k_cache.shape)
    if Dc != D:
        raise ValueError(f"k_cache must have head dim {D} like q, got shape {tuple(k_cache.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got q shape {tuple(q.shape)}")
    if Hk == 0 or H % Hk:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the k/v cache heads ({Hk})")
    if B == 0 or Sq == 0:
        raise ValueError(f"q must have at least one batch row and one query token, got shape {tuple(q.shape)}")
    if page == 0 or NB == 0:
        raise ValueError(f"k_cache must have at least one page/row and slot, got shape {tuple(k_cache.shape)}")
    paged = block_table is not None
    if paged:
        bt = dsp.to_host(block_table)
        if not isinstance(bt, np.ndarray) or bt.ndim != 2 or bt.shape[0] != B:
            raise ValueError(f"block_table must have shape ({B}, max_blocks), got {getattr(bt, 'shape', bt)}")
        table = _int_array("block_table", bt, bt.shape)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table: the block table already maps "
                             "batch rows to pages")
        cap = page * table.shape[1]
    else:
        if cache_batch_idx is None:
            if B > NB:
                raise ValueError(f"k_cache must have at least B = {B} rows without cache_batch_idx, got shape "
                                 f"{tuple(k_cache.shape)}")
            rows = np.arange(B)
        else:
            rows = _int_array("cache_batch_idx", cache_batch_idx, (B,))
            if rows.min() < 0 or rows.max() >= NB:
                raise ValueError(f"cache_batch_idx entries must be in [0, {NB}) (k_cache rows), got {rows.tolist()}")
        table = rows[:, None]
        cap = page
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    snew = 0
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            _check_array(name, x, 4, dt)
            if len(x.shape) != 4 or int(x.shape[0]) != B or tuple(x.shape[2:]) != (Hk, D):
                raise ValueError(f"{name} must have shape ({B}, Snew, {Hk}, {D}), got {tuple(x.shape)}")
        if tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        snew = int(k.shape[1])
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when k and v are appended (where do the new tokens go?)")
        if not paged and cache_batch_idx is not None and len(np.unique(table[:, 0])) != B:
            raise ValueError("cache_batch_idx must not repeat a cache row when k and v are appended")
    if cache_seqlens is None:
        seqlens = np.full(B, cap, dtype=np.int64)
    elif np.ndim(dsp.to_host(cache_seqlens)) == 0:
        seqlens = np.full(B, int(dsp.to_host(cache_seqlens)), dtype=np.int64)
    else:
        seqlens = _int_array("cache_seqlens", cache_seqlens, (B,))
    leftpad = np.zeros(B, np.int64) if cache_leftpad is None else _int_array("cache_leftpad", cache_leftpad, (B,))
    if seqlens.min() < 0 or seqlens.max() + snew > cap:
        raise ValueError(f"cache_seqlens + Snew must be in [0, {cap}] (the cache capacity{' of the block table' if paged else ''}),"
                         f" got cache_seqlens={seqlens.tolist()} with Snew={snew}")
    if cache_leftpad is not None and (leftpad.min() < 0 or np.any(leftpad > seqlens)):
        raise ValueError(f"cache_leftpad must be in [0, cache_seqlens], got {leftpad.tolist()} "
                         f"with cache_seqlens={seqlens.tolist()}")
    end = seqlens + snew
    if paged and not (table.size and table.min() >= 0 and table.max() < NB):
        # every page a sequence reads or writes must exist (only checked in detail when some entry is out of range)
        j = np.arange(table.shape[1])[None, :]
        used = (j >= (leftpad // page)[:, None]) & (j < (-(-end // page))[:, None]) & (end > leftpad)[:, None]
        bad = used & ((table < 0) | (table >= NB))
        if bad.any():
            b = int(np.nonzero(bad.any(axis=1))[0][0])
            raise ValueError(f"block_table[{b}] points outside k_cache's {NB} pages for positions "
                             f"[{leftpad[b]}, {end[b]}): {table[b][used[b]].tolist()}")
    if paged:
        if snew:  # two sequences must not append into the same page slot
            pos = seqlens[:, None] + np.arange(snew)[None, :]
            slots_used = table[np.arange(B)[:, None], pos // page] * page + pos % page
            if len(np.unique(slots_used)) != slots_used.size:
                raise ValueError("block_table maps the appended tokens of two sequences to the same cache slot")
    rotary = rotary_cos is not None or rotary_sin is not None
    rd = 0
    if rotary:
        if rotary_cos is None or rotary_sin is None:
            raise ValueError("rotary_cos and rotary_sin must be given together")
        # shapes and dtypes only: device tables are not copied to the host here
        cshape, sshape = (tuple(int(n) for n in np.shape(x)) for x in (rotary_cos, rotary_sin))
        if len(cshape) != 2 or cshape != sshape:
            raise ValueError(f"rotary_cos and rotary_sin must both have shape (seqlen_ro, rotary_dim / 2), "
                             f"got {cshape} and {sshape}")
        ct = dsp.array_dtype(rotary_cos)
        if ct.kind != "f" and ct != dsp.bfloat16:
            raise TypeError(f"rotary_cos must be a float array, got {ct}")
        rd = 2 * cshape[1]
        if not 0 < rd <= D:
            raise ValueError(f"rotary_dim = 2 * rotary_cos.shape[1] must be in [2, {D}], got {rd}")
        need = int((end.max() if (causal or tuple(window_size) != (-1, -1)) else max(seqlens.max() + 1, end.max())))
        if cshape[0] < need:
            raise ValueError(f"rotary_cos must cover positions up to {need - 1}, got {cshape[0]} rows")
    scale, left, right, softcap, _, slopes = _check_options(D, H, B, softmax_scale, window_size, softcap,
                                                            alibi_slopes, 0.0, causal)
    if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or not 0 <= num_splits <= 256:
        raise ValueError(f"num_splits must be an int in [0, 256] (0 = choose automatically), got {num_splits!r}")
    return SimpleNamespace(dt=dt, B=B, Sq=Sq, H=H, D=D, Hk=Hk, NB=NB, page=page, paged=paged, table=table, cap=cap,
                           seqlens=seqlens, leftpad=leftpad, end=end, snew=snew, rotary=rotary, rd=rd,
                           causal=causal, windowed=causal or (left, right) != (-1, -1), scale=scale, left=left,
                           right=right, softcap=softcap, slopes=slopes, num_splits=int(num_splits))


def rotary_positions(plan):
    """(q positions (B, Sq), new-k positions (B, Snew)) of the rotary embedding, as flash-attn: absolute
    cache positions; all of q sits at cache_seqlens unless the attention is causal or windowed."""
    qpos = plan.seqlens[:, None] + (np.arange(plan.Sq)[None, :] if plan.windowed else 0)
    qpos = np.broadcast_to(qpos, (plan.B, plan.Sq))
    return qpos, plan.seqlens[:, None] + np.arange(plan.snew)[None, :]


def _rotate_host(x, cos, sin, pos, interleaved):
    """Rotary embedding of x (B, S, Hx, D) at positions pos (B, S), computed in float32 or better."""
    cdt = dsp.compute_dtype(x.dtype)
    x = np.array(x, dtype=cdt)
    half = cos.shape[1]
    c = np.asarray(cos, dtype=cdt)[pos][:, :, None, :]
    s = np.asarray(sin, dtype=cdt)[pos][:, :, None, :]
    if interleaved:
        x0, x1 = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2] = x0 * c - x1 * s
        x[..., 1:2 * half:2] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half] = x0 * c - x1 * s
        x[..., half:2 * half] = x0 * s + x1 * c
    return x


def auto_splits(plan, workers, min_keys, tasks=None):
    """Key splits so that about 2 x ``workers`` tasks exist, each with at least ``min_keys`` keys;
    ``tasks``: parallel tasks before splitting (default B * Hk)."""
    if plan.num_splits:
        return plan.num_splits
    tasks = plan.B * plan.Hk if tasks is None else tasks
    longest = int((plan.end - plan.leftpad).max())
    return int(max(1, min(-(-2 * workers // tasks), longest // min_keys, 64)))


def append_host(plan, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved):
    """Write the new tokens (rotated when rotary is on) into host caches, in place."""
    if not plan.snew:
        return
    kn = k if not plan.rotary else _rotate_host(dsp.to_host(k, plan.dt), rotary_cos, rotary_sin,
                                                rotary_positions(plan)[1], rotary_interleaved)
    kn, vn = np.asarray(dsp.to_host(kn, plan.dt)), np.asarray(dsp.to_host(v, plan.dt))
    for b in range(plan.B):
        pos = np.arange(plan.seqlens[b], plan.end[b])
        rows = plan.table[b, pos // plan.page]
        k_cache[rows, pos % plan.page] = kn[b].astype(k_cache.dtype)
        v_cache[rows, pos % plan.page] = vn[b].astype(v_cache.dtype)


def _host_call(plan, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved, backend):
    """Append and attend on the host (CPU kernels or the reference); caches are host arrays, updated in place."""
    append_host(plan, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved)
    cdt = dsp.compute_dtype(plan.dt)
    qh = np.asarray(dsp.to_host(q, plan.dt))
    if plan.rotary:
        qh = _rotate_host(qh, rotary_cos, rotary_sin, rotary_positions(plan)[0], rotary_interleaved)
    qh = np.ascontiguousarray(qh, dtype=cdt)
    if backend == "reference":
        from numba_kernels.reference.decode_attention import flash_attention_with_kvcache_ref

        bt = plan.table if plan.paged else None
        idx = None if plan.paged else plan.table[:, 0]
        out, lse = flash_attention_with_kvcache_ref(
            qh, k_cache, v_cache, cache_seqlens=plan.end, cache_batch_idx=idx, cache_leftpad=plan.leftpad,
            block_table=bt, softmax_scale=plan.scale, window_size=(plan.left, plan.right), softcap=plan.softcap,
            alibi_slopes=plan.slopes, return_lse=True)
        return out.astype(cdt), lse.astype(np.float32)
    import numba

    from numba_kernels.cpu import decode_attention as cpu

    half = plan.dt in HALF_DTYPES
    kc = k_cache.view(np.uint16) if half else k_cache
    vc = v_cache.view(np.uint16) if half else v_cache
    lut = cpu.LUT[plan.dt.name] if half else cpu.NO_LUT
    ns = auto_splits(plan, numba.get_num_threads(), 4 * cpu.BLOCK_K, tasks=plan.B)  # a CPU task: all heads
    out_p = np.empty((ns, plan.B, plan.Sq, plan.H, plan.D), dtype=cdt)
    lse_p = np.empty((ns, plan.B, plan.H, plan.Sq), dtype=cdt)  # float64 LSEs keep float64 merges exact
    if ns == 1:  # the kernel writes the result itself
        out, lse = out_p[0], lse_p[0]
    else:  # the splits are merged at the end of the kernel call
        out = np.empty((plan.B, plan.Sq, plan.H, plan.D), dtype=cdt)
        lse = np.empty((plan.B, plan.H, plan.Sq), dtype=cdt)
    sl = cpu.NO_SLOPES[np.dtype(cdt)] if plan.slopes is None else plan.slopes.astype(cdt)
    cpu.decode_cpu(qh, np.ascontiguousarray(kc), np.ascontiguousarray(vc), lut, plan.table, plan.leftpad, plan.end,
                   ns, out_p, lse_p, cpu.make_consts(cdt, plan.scale, plan.softcap), plan.left, plan.right, sl,
                   out, lse)
    return out, lse


def _combine_host(out_p, lse_p, out_dtype):
    """(S, B, Sq, H, D) + (S, B, H, Sq) partials -> (B, Sq, H, D), (B, H, Sq) on the CPU."""
    from numba_kernels.cpu.decode_attention import combine_cpu

    S, B, Sq, H, D = out_p.shape
    o = np.ascontiguousarray(out_p).reshape(S, B * Sq * H, D)
    lp = np.ascontiguousarray(np.transpose(lse_p, (0, 1, 3, 2))).reshape(S, B * Sq * H)
    out = np.empty((B * Sq * H, D), dtype=out_dtype)
    lse = np.empty(B * Sq * H, dtype=lp.dtype)
    combine_cpu(o, lp, out, lse)
    return out.reshape(B, Sq, H, D), np.ascontiguousarray(lse.reshape(B, Sq, H).transpose(0, 2, 1))


def flash_attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, rotary_cos=None, rotary_sin=None,
                                 rotary_interleaved=True, cache_seqlens=None, cache_batch_idx=None,
                                 cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                                 window_size=(-1, -1), softcap=0.0, alibi_slopes=None, num_splits=0,
                                 return_lse=False, backend=None):
    """Attention of a few new query tokens against a KV cache, appending new keys/values in place first;
    flash-attn's ``flash_attn_with_kvcache``, with any page size.

    Parameters
    ----------
    q : ndarray, shape (B, Sq, H, D)
        Queries (Sq from 1 to a few hundred); float16, bfloat16, float32 or float64, D <= 256.
    k_cache, v_cache : ndarray, shape (B_cache, Smax, Hk, D) or (num_blocks, page_size, Hk, D)
        Contiguous caches (batch row b uses cache row ``cache_batch_idx[b]``, default b), or paged caches
        with ``block_table``. Same dtype as q; Hk divides H. Updated in place when k/v are given.
        **Any page size** (1, 7, 16, 256, ...); flash-attn 2 requires multiples of 256.
    k, v : ndarray, shape (B, Snew, Hk, D), optional
        New tokens, written into the caches at positions ``cache_seqlens[b] ...`` (rotated first when
        rotary is on) before attending. Needs ``cache_seqlens``.
    rotary_cos, rotary_sin : ndarray, shape (seqlen_ro, rotary_dim / 2), optional
        Rotary embedding tables. The new k is rotated at positions ``cache_seqlens[b] + t``; q at
        ``cache_seqlens[b] + i`` when causal or windowed, else every query token at ``cache_seqlens[b]``
        (flash-attn's rule). Only the first rotary_dim features rotate. On CUDA, C-contiguous device tables
        in the compute dtype (float64 for float64 caches, float32 otherwise) are read in place; other tables
        are uploaded on every call, so keep them on the device in a decode loop.
    rotary_interleaved : bool
        True: rotate pairs (0, 1), (2, 3), ... (GPT-J); False: (i, i + rotary_dim / 2) (GPT-NeoX).
    cache_seqlens : int or ndarray, shape (B,), int32, optional
        Tokens already in each sequence's cache (including its left padding). None: the cache is full.
    cache_batch_idx : ndarray, shape (B,), int32, optional
        Cache row of each batch row (contiguous caches only; rows must differ when appending).
    cache_leftpad : ndarray, shape (B,), int32, optional
        First valid cache position of each sequence (keys are positions [leftpad, cache_seqlens + Snew)).
    block_table : ndarray, shape (B, max_blocks), int32, optional
        Paged caches: position p of sequence b is slot ``p % page_size`` of page ``block_table[b, p // page_size]``.
        Only the entries a sequence reads or writes must be valid.
    softmax_scale, causal, window_size, softcap, alibi_slopes
        As in :func:`flash_attention`, over the keys of each sequence (causal: bottom-right aligned,
        query i is the token at position ``cache_seqlens + Snew - Sq + i``). A fully masked row gives 0.
    num_splits : int
        Split the keys of each sequence into this many pieces run in parallel and merged with
        :func:`attention_combine` (flash-decoding); 0 chooses from the sizes and the core/SM count.
    return_lse : bool
        Also return the LSE, shape (B, H, Sq), float32.
    backend : {"auto", "cpu", "cuda", "reference"}, optional

    Returns
    -------
    out : ndarray, shape (B, Sq, H, D)
        q's dtype, where q lived (bfloat16 device results are uint16 bits, see :func:`flash_attention`).
    lse : ndarray, shape (B, H, Sq), float32
        Only with ``return_lse=True``.

    Raises
    ------
    ValueError, TypeError
        For bad shapes, dtypes, block tables pointing outside the cache, or seqlens past the capacity;
        nothing is written to the caches then.
    """
    plan = _plan(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                 block_table, softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits)
    on_dev = [_on_device(a) for a in (q, k_cache, v_cache, k, v)]
    first_dev = next((a for a, d in zip((q, k_cache, v_cache, k, v), on_dev) if d), None)
    be = dsp.resolve_backend(backend, *((first_dev,) if first_dev is not None else (q, k_cache, v_cache, k, v)))
    on_device = any(on_dev[:3])
    if be == "cuda":
        from numba_kernels.cuda.decode_attention import decode_cuda

        out, lse = decode_cuda(plan, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved)
    else:
        dev_caches = [c for c in (k_cache, v_cache) if dsp.is_device_array(c)]
        kc = dsp.to_host(k_cache, plan.dt) if dev_caches else k_cache
        vc = dsp.to_host(v_cache, plan.dt) if dev_caches else v_cache
        out, lse = _host_call(plan, q, kc, vc, k, v, rotary_cos, rotary_sin, rotary_interleaved, be)
        if dev_caches and plan.snew:  # write the appended tokens back where the caches live
            dsp.to_device(k_cache).copy_to_device(np.ascontiguousarray(kc).view(np.uint16) if plan.dt == dsp.bfloat16 else kc)
            dsp.to_device(v_cache).copy_to_device(np.ascontiguousarray(vc).view(np.uint16) if plan.dt == dsp.bfloat16 else vc)
    if on_device:
        out = out if getattr(type(out), "__cuda_memory__", False) else dsp.to_device(out)
        lse = lse if getattr(type(lse), "__cuda_memory__", False) else dsp.to_device(lse)
    else:
        out, lse = dsp.to_host(out, plan.dt), dsp.to_host(lse)
        out, lse = np.asarray(out).astype(plan.dt, copy=False), np.asarray(lse).astype(np.float32, copy=False)
    return (out, lse) if return_lse else out


def attention_combine(out_partials, lse_partials, *, out_dtype=None, return_lse=False, backend=None):
    """Merge attention results computed over disjoint key sets (split-KV, or shards on several devices);
    flash-attn 3's ``flash_attn_combine``.

    Parameters
    ----------
    out_partials : ndarray, shape (S, B, Sq, H, D) or (S, T, H, D)
        Each split's normalized output (float32 recommended).
    lse_partials : ndarray, shape (S, B, H, Sq) or (S, H, T)
        Each split's natural-log LSE; ``-inf`` marks a split that saw no key (it gets no weight).
    out_dtype : dtype, optional
        Output dtype; default out_partials' dtype.
    return_lse : bool
        Also return the merged LSE, shape (B, H, Sq) or (H, T), float32.
    backend : {"auto", "cpu", "cuda", "reference"}, optional

    Returns
    -------
    out : ndarray, shape (B, Sq, H, D) or (T, H, D)
        ``sum_s exp(lse_s - lse) * out_s`` with ``lse = log sum_s exp(lse_s)``; rows where every
        split is -inf are 0 (LSE -inf), never NaN.
    lse : ndarray, float32
        Only with ``return_lse=True``.
    """
    dt = _check_array("out_partials", out_partials, len(out_partials.shape))
    nd = len(out_partials.shape)
    if nd not in (4, 5):
        raise ValueError(f"out_partials must have shape (S, B, Sq, H, D) or (S, T, H, D), got {tuple(out_partials.shape)}")
    _check_array("lse_partials", lse_partials, nd - 1)
    shp = tuple(out_partials.shape)
    want = (shp[0], shp[1], shp[3], shp[2]) if nd == 5 else (shp[0], shp[2], shp[1])
    if tuple(lse_partials.shape) != want:
        raise ValueError(f"lse_partials must have shape {want} to match out_partials {shp}, got {tuple(lse_partials.shape)}")
    if shp[0] == 0:
        raise ValueError("out_partials must hold at least one split")
    odt = dt if out_dtype is None else np.dtype(out_dtype)
    if odt not in dsp.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16, float32 or float64, got {odt}")
    be = dsp.resolve_backend(backend, out_partials, lse_partials)
    on_device = dsp.any_on_device(out_partials, lse_partials)
    o5 = out_partials if nd == 5 else out_partials.reshape((shp[0], 1) + shp[1:])
    l5 = lse_partials if nd == 5 else lse_partials.reshape((shp[0], 1) + tuple(lse_partials.shape[1:]))
    if be == "cuda":
        from numba_kernels.cuda.decode_attention import combine_cuda

        out, lse = combine_cuda(o5, l5, dt, odt)
    else:
        oh = np.asarray(dsp.to_host(o5, dt), dtype=dsp.compute_dtype(dt))
        lh = np.asarray(dsp.to_host(l5), dtype=np.float64)
        if be == "reference":
            from numba_kernels.reference.decode_attention import attention_combine_ref

            out, lse = attention_combine_ref(oh, np.transpose(lh, (0, 1, 3, 2)))
            lse = np.ascontiguousarray(np.transpose(lse, (0, 2, 1)))
        else:
            out, lse = _combine_host(oh, lh.astype(dsp.compute_dtype(dt)), dsp.compute_dtype(odt))
    if nd == 4:
        out, lse = out.reshape(shp[1:]), lse.reshape(tuple(lse_partials.shape[1:]))
    if on_device:
        out, lse = dsp.to_device(out), dsp.to_device(np.asarray(lse, dtype=np.float32))
    else:
        out, lse = np.asarray(dsp.to_host(out, odt)).astype(odt, copy=False), np.asarray(dsp.to_host(lse), np.float32)
    return (out, lse) if return_lse else out
