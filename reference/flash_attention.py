"""FlashAttention forward, ground truth: float64 NumPy, materialized scores, obviously correct.

Semantics follow flash-attn 2 (see numba_kernels.flash_attention for the full docs):
  logits[h, i, j] = f(scale * q_i . k_j) + alibi[h, i, j]          f = identity or cap * tanh(x / cap)
  alibi[h, i, j]  = -slope[h] * |i + Sk - Sq - j|
  key j is visible from row i iff  i + Sk - Sq - left <= j <= i + Sk - Sq + right   (-1 = unbounded;
  causal means right = 0), so causal masks are aligned bottom-right when Sq != Sk.
  P = softmax(logits) (a fully masked row gives P = 0 and LSE = -inf), dropout keeps P[h,i,j] with
  the counter hash of numba_kernels._dropout and scales kept values by 1 / (1 - p), out = P @ V.
"""
import numpy as np

from numba_kernels._dropout import keep_mask


def _visible(Sq, Sk, causal, window_size):
    """Boolean (Sq, Sk) mask of keys each query row may attend to."""
    left, right = window_size
    if causal:
        right = 0
    i = np.arange(Sq)[:, None] + (Sk - Sq)
    j = np.arange(Sk)[None, :]
    mask = np.ones((Sq, Sk), dtype=bool)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def _logits(q, k, scale, softcap, slopes):
    """q (Sq, H, D), k (Sk, H, D) -> logits (H, Sq, Sk) before masking."""
    Sq, Sk = q.shape[0], k.shape[0]
    s = np.einsum("ihd,jhd->hij", q, k) * scale  # (H, Sq, Sk)
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    if slopes is not None:
        dist = np.abs(np.arange(Sq)[:, None] + (Sk - Sq) - np.arange(Sk)[None, :])  # (Sq, Sk)
        s = s - slopes[:, None, None] * dist[None]
    return s


def _dropout_scale(b, H, Sq, Sk, dropout_p, seed):
    """(H, Sq, Sk) multiplier: 1/(1-p) where kept, 0 where dropped."""
    keep = np.stack([keep_mask(seed, b, h, np.arange(Sq), np.arange(Sk), dropout_p) for h in range(H)])
    return keep / (1.0 - dropout_p)


def attention_one_ref(q, k, v, b=0, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                      softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0):
    """One sequence. q (Sq, H, D), k/v (Sk, Hk, D) -> out (Sq, H, D) float64, lse (H, Sq) float64.

    ``b`` is the batch (sequence) index the dropout hash uses; ``alibi_slopes`` is (H,) or None.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    Sq, H, D = q.shape
    Sk, Hk = k.shape[:2]
    scale = 1.0 / np.sqrt(D) if softmax_scale is None else float(softmax_scale)
    k = np.repeat(k, H // Hk, axis=1)  # (Sk, H, D): query head h reads kv head h // (H // Hk)
    v = np.repeat(v, H // Hk, axis=1)
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, dtype=np.float64)
    s = _logits(q, k, scale, softcap, slopes)
    s = np.where(_visible(Sq, Sk, causal, window_size)[None], s, -np.inf)
    m = s.max(axis=-1, initial=-np.inf, keepdims=True)  # (H, Sq, 1)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(axis=-1)  # (H, Sq)
    with np.errstate(divide="ignore"):
        lse = np.where(l > 0, m[..., 0] + np.log(l), -np.inf)
    p = e / np.where(l > 0, l, 1.0)[..., None]
    if dropout_p > 0:
        p = p * _dropout_scale(b, H, Sq, Sk, dropout_p, seed)
    out = np.einsum("hij,jhd->ihd", p, v)
    return out, lse


def attention_one_tiled_ref(q, k, v, b=0, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                            softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0, block_k=16):
    """Same contract as :func:`attention_one_ref`, computed the FlashAttention way: key blocks of
    ``block_k`` with an online softmax (running max m, running sum l, rescaled accumulator)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    Sq, H, D = q.shape
    Sk, Hk = k.shape[:2]
    scale = 1.0 / np.sqrt(D) if softmax_scale is None else float(softmax_scale)
    k = np.repeat(k, H // Hk, axis=1)
    v = np.repeat(v, H // Hk, axis=1)
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, dtype=np.float64)
    visible = _visible(Sq, Sk, causal, window_size)
    drop = _dropout_scale(b, H, Sq, Sk, dropout_p, seed) if dropout_p > 0 else None
    m = np.full((H, Sq), -np.inf)
    l = np.zeros((H, Sq))
    acc = np.zeros((H, Sq, D))
    for j0 in range(0, Sk, block_k):
        j1 = min(Sk, j0 + block_k)
        s = _logits(q, k[j0:j1], scale, softcap, None)
        if slopes is not None:
            dist = np.abs(np.arange(Sq)[:, None] + (Sk - Sq) - np.arange(j0, j1)[None, :])
            s = s - slopes[:, None, None] * dist[None]
        s = np.where(visible[None, :, j0:j1], s, -np.inf)
        m_new = np.maximum(m, s.max(axis=-1))
        m_safe = np.where(np.isfinite(m_new), m_new, 0.0)
        alpha = np.exp(m - m_safe)  # exp(-inf) = 0 on the first visible block
        e = np.exp(s - m_safe[..., None])
        l = l * alpha + e.sum(axis=-1)
        if drop is not None:
            e = e * drop[:, :, j0:j1]
        acc = acc * alpha[..., None] + np.einsum("hij,jhd->hid", e, v[j0:j1])
        m = m_new
    with np.errstate(divide="ignore"):
        lse = np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), -np.inf)
    out = acc / np.where(l > 0, l, 1.0)[..., None]
    return np.transpose(out, (1, 0, 2)), lse


def _slopes_for(alibi_slopes, b):
    if alibi_slopes is None:
        return None
    a = np.asarray(alibi_slopes, dtype=np.float64)
    return a if a.ndim == 1 else a[b]


def flash_attention_ref(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, dropout_p=0.0, seed=0, return_lse=False, tiled=False):
    """Batched reference. q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D) float64
    [, lse (B, H, Sq) float64]. ``tiled=True`` uses the online-softmax reference instead."""
    one = attention_one_tiled_ref if tiled else attention_one_ref
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, s = one(q[b], k[b], v[b], b, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                   softcap=softcap, alibi_slopes=_slopes_for(alibi_slopes, b), dropout_p=dropout_p, seed=seed)
        outs.append(o)
        lses.append(s)
    out, lse = np.stack(outs), np.stack(lses)
    return (out, lse) if return_lse else out


def flash_attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                               causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, dropout_p=0.0, seed=0, return_lse=False, tiled=False):
    """Packed reference. q (total_q, H, D), k/v (total_k, Hk, D), cu_seqlens (B+1,) ->
    out (total_q, H, D) float64 [, lse (H, total_q) float64, flash-attn's varlen LSE layout]."""
    one = attention_one_tiled_ref if tiled else attention_one_ref
    H, D = q.shape[1], v.shape[2]
    out = np.zeros((q.shape[0], H, D))
    lse = np.full((H, q.shape[0]), -np.inf)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if qe == qs:
            continue
        o, s = one(q[qs:qe], k[ks:ke], v[ks:ke], b, causal=causal, softmax_scale=softmax_scale,
                   window_size=window_size, softcap=softcap, alibi_slopes=_slopes_for(alibi_slopes, b),
                   dropout_p=dropout_p, seed=seed)
        out[qs:qe] = o
        lse[:, qs:qe] = s
    return (out, lse) if return_lse else out
