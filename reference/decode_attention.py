"""Decode attention against a KV cache, ground truth: float64 NumPy, one sequence at a time.

Semantics follow flash-attn 2's ``flash_attn_with_kvcache`` (see numba_kernels.decode_attention):
  * batch row b reads cache row ``cache_batch_idx[b]`` (contiguous cache) or the pages listed in
    ``block_table[b]`` (paged cache: logical position p lives in page ``block_table[b, p // page]``,
    slot ``p % page``);
  * its keys are the positions ``[cache_leftpad[b], cache_seqlens[b] + Snew)``: the cached tokens, then
    the new k/v, which are first written (appended) into the cache at ``cache_seqlens[b]``;
  * rotary embeddings rotate the new k at absolute positions ``cache_seqlens[b] + t`` and q at
    ``cache_seqlens[b] + i`` when causal or windowed, else all of q at ``cache_seqlens[b]``;
  * then plain attention (reference.flash_attention) over those keys, causal masks bottom-right.
"""
import numpy as np

from .flash_attention import attention_one_ref


def apply_rotary_ref(x, cos, sin, positions, interleaved=True):
    """Rotate the first ``2 * cos.shape[1]`` features of x (S, H, D) at ``positions`` (S,).

    interleaved=True rotates pairs (0, 1), (2, 3), ...; False (GPT-NeoX) rotates (i, i + rotary_dim / 2).
    Returns a float64 copy.
    """
    x = np.array(x, dtype=np.float64)
    half = cos.shape[1]
    c = np.asarray(cos, dtype=np.float64)[positions][:, None, :]  # (S, 1, half)
    s = np.asarray(sin, dtype=np.float64)[positions][:, None, :]
    if interleaved:
        x0, x1 = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2] = x0 * c - x1 * s
        x[..., 1:2 * half:2] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half] = x0 * c - x1 * s
        x[..., half:2 * half] = x0 * s + x1 * c
    return x


def _slots(b, positions, block_table, page, cache_batch_idx):
    """(cache row or page, slot) arrays of the logical positions of batch row b."""
    positions = np.asarray(positions)
    if block_table is not None:
        return np.asarray(block_table)[b, positions // page], positions % page
    row = b if cache_batch_idx is None else int(cache_batch_idx[b])
    return np.full(positions.shape, row), positions


def flash_attention_with_kvcache_ref(q, k_cache, v_cache, k=None, v=None, *, rotary_cos=None, rotary_sin=None,
                                     rotary_interleaved=True, cache_seqlens=None, cache_batch_idx=None,
                                     cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, return_lse=False):
    """q (B, Sq, H, D); caches (B_cache, Smax, Hk, D) or paged (num_blocks, page, Hk, D) with
    block_table (B, max_blocks). k/v (B, Snew, Hk, D) are appended into the caches *in place*
    (in the caches' dtype) before attending. Returns out (B, Sq, H, D) float64 [, lse (B, H, Sq) float64]."""
    B, Sq, H, D = q.shape
    page = k_cache.shape[1]
    cap = page * np.asarray(block_table).shape[1] if block_table is not None else k_cache.shape[1]
    seqlens = np.full(B, cap, dtype=np.int64) if cache_seqlens is None else (
        np.broadcast_to(np.asarray(cache_seqlens, dtype=np.int64), (B,)))
    leftpad = np.zeros(B, dtype=np.int64) if cache_leftpad is None else np.asarray(cache_leftpad, dtype=np.int64)
    snew = 0 if k is None else k.shape[1]
    rotate = rotary_cos is not None
    windowed = causal or tuple(window_size) != (-1, -1)
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, dtype=np.float64)
    outs, lses = [], []
    for b in range(B):
        s0 = int(seqlens[b])
        if snew:
            kn, vn = np.asarray(k[b], dtype=np.float64), np.asarray(v[b], dtype=np.float64)
            if rotate:
                kn = apply_rotary_ref(kn, rotary_cos, rotary_sin, s0 + np.arange(snew), rotary_interleaved)
            rows, slots = _slots(b, s0 + np.arange(snew), block_table, page, cache_batch_idx)
            k_cache[rows, slots] = kn.astype(k_cache.dtype)
            v_cache[rows, slots] = vn.astype(v_cache.dtype)
        qb = np.asarray(q[b], dtype=np.float64)
        if rotate:
            qpos = s0 + np.arange(Sq) if windowed else np.full(Sq, s0)
            qb = apply_rotary_ref(qb, rotary_cos, rotary_sin, qpos, rotary_interleaved)
        rows, slots = _slots(b, np.arange(int(leftpad[b]), s0 + snew), block_table, page, cache_batch_idx)
        kb = np.asarray(k_cache[rows, slots], dtype=np.float64)
        vb = np.asarray(v_cache[rows, slots], dtype=np.float64)
        o, lse = attention_one_ref(qb, kb, vb, b, causal=causal, softmax_scale=softmax_scale,
                                   window_size=window_size, softcap=softcap,
                                   alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b]))
        outs.append(o)
        lses.append(lse)
    out, lse = np.stack(outs), np.stack(lses)
    return (out, lse) if return_lse else out


def attention_combine_ref(out_partials, lse_partials):
    """Merge attention over disjoint key sets. out_partials (S, ..., D) with lse_partials (S, ...) where
    out_partials[:, x] pairs with lse_partials[:, x] -> (out (..., D), lse (...)) float64.
    Partials with LSE -inf carry no weight; if all are -inf the result is 0 with LSE -inf."""
    o = np.asarray(out_partials, dtype=np.float64)
    lse = np.asarray(lse_partials, dtype=np.float64)
    m = lse.max(axis=0)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    w = np.exp(lse - m_safe)  # (S, ...)
    tot = w.sum(axis=0)
    with np.errstate(divide="ignore"):
        lse_out = np.where(tot > 0, m_safe + np.log(np.where(tot > 0, tot, 1.0)), -np.inf)
    out = (w[..., None] * o).sum(axis=0) / np.where(tot > 0, tot, 1.0)[..., None]
    return out, lse_out
