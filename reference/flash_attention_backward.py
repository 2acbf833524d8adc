"""FlashAttention backward, ground truth: float64 NumPy, materialized P, written from the math.

Forward (per sequence b, head h; see reference/flash_attention.py):
  s0[i, j]     = scale * q_i . k_j
  logit[i, j]  = f(s0) - slope * |i + Sk - Sq - j|      f = identity or cap * tanh(s0 / cap)
  P[i, j]      = exp(logit[i, j] - lse_i) on visible keys, 0 elsewhere (and on fully masked rows)
  Z[i, j]      = keep[i, j] / (1 - p)                    (1 without dropout)
  out_i        = sum_j P[i, j] Z[i, j] v_j

Backward, for the upstream gradient dO:
  dV_j   = sum_i P[i, j] Z[i, j] dO_i
  dP     = Z * (dO V^T)
  D_i    = rowsum(dO_i * out_i)            (= sum_j P[i, j] dP[i, j])
  dS     = P * (dP - D_i)                  gradient of the logits
  dS0    = dS * f'(s0)                     f' = 1 - tanh^2(s0 / cap) with softcap, else 1
  dQ_i   = scale * sum_j dS0[i, j] k_j,    dK_j = scale * sum_i dS0[i, j] q_i
GQA: a key/value head's dK and dV are the sums over the query heads that read it.
"""
import numpy as np

from .flash_attention import _dropout_scale, _slopes_for, _visible


def attention_one_backward_ref(dout, q, k, v, out, lse, b=0, *, causal=False, softmax_scale=None,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0):
    """One sequence.

    Parameters
    ----------
    dout, q, out : ndarray, shape (Sq, H, D)
    k, v : ndarray, shape (Sk, Hk, D)
    lse : ndarray, shape (H, Sq)
        The forward's log-sum-exp (natural log, -inf for a fully masked row).
    b : int
        Batch (sequence) index the dropout hash uses; ``alibi_slopes`` is (H,) or None.

    Returns
    -------
    dq : ndarray, shape (Sq, H, D), float64
    dk, dv : ndarray, shape (Sk, Hk, D), float64
    """
    dout, q, k, v, out, lse = (np.asarray(a, dtype=np.float64) for a in (dout, q, k, v, out, lse))
    Sq, H, D = q.shape
    Sk, Hk = k.shape[:2]
    G = H // Hk
    scale = 1.0 / np.sqrt(D) if softmax_scale is None else float(softmax_scale)
    kr = np.repeat(k, G, axis=1)  # (Sk, H, D): query head h reads kv head h // G
    vr = np.repeat(v, G, axis=1)
    # 1. logits and the derivative of the softcap
    s0 = np.einsum("ihd,jhd->hij", q, kr) * scale  # (H, Sq, Sk)
    if softcap > 0:
        t = np.tanh(s0 / softcap)
        logit, dlogit = softcap * t, 1.0 - t * t
    else:
        logit, dlogit = s0, 1.0
    if alibi_slopes is not None:
        dist = np.abs(np.arange(Sq)[:, None] + (Sk - Sq) - np.arange(Sk)[None, :])  # (Sq, Sk)
        logit = logit - np.asarray(alibi_slopes, dtype=np.float64)[:, None, None] * dist[None]
    # 2. P from the saved LSE; masked entries and fully masked rows are exactly 0
    live = _visible(Sq, Sk, causal, window_size)[None] & np.isfinite(lse)[..., None]  # (H, Sq, Sk)
    lse_safe = np.where(np.isfinite(lse), lse, 0.0)
    p = np.where(live, np.exp(np.where(live, logit - lse_safe[..., None], 0.0)), 0.0)
    z = _dropout_scale(b, H, Sq, Sk, dropout_p, seed) if dropout_p > 0 else 1.0
    # 3. dV, dP, D, dS
    dv = np.einsum("hij,ihd->jhd", p * z, dout)  # (Sk, H, D)
    dp = np.einsum("ihd,jhd->hij", dout, vr) * z
    di = np.einsum("ihd,ihd->hi", dout, out)  # (H, Sq)
    ds0 = p * (dp - di[..., None]) * dlogit
    # 4. dQ, dK through the scale; GQA group sums
    dq = np.einsum("hij,jhd->ihd", ds0, kr) * scale
    dk = np.einsum("hij,ihd->jhd", ds0, q) * scale
    dk = dk.reshape(Sk, Hk, G, D).sum(axis=2)
    dv = dv.reshape(Sk, Hk, G, D).sum(axis=2)
    return dq, dk, dv


def flash_attention_backward_ref(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                                 softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0):
    """Batched reference backward.

    Parameters
    ----------
    dout, q, out : ndarray, shape (B, Sq, H, D)
    k, v : ndarray, shape (B, Sk, Hk, D)
    lse : ndarray, shape (B, H, Sq)
    causal, softmax_scale, window_size, softcap, alibi_slopes, dropout_p, seed
        As in the forward (:func:`flash_attention_ref`); ``alibi_slopes`` (H,) or (B, H).

    Returns
    -------
    dq : ndarray, shape (B, Sq, H, D), float64
    dk, dv : ndarray, shape (B, Sk, Hk, D), float64
    """
    res = [attention_one_backward_ref(dout[b], q[b], k[b], v[b], out[b], lse[b], b, causal=causal,
                                      softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                      alibi_slopes=_slopes_for(alibi_slopes, b), dropout_p=dropout_p, seed=seed)
           for b in range(q.shape[0])]
    return tuple(np.stack([r[i] for r in res]) for i in range(3))


def flash_attention_varlen_backward_ref(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                                        max_seqlen_k=None, *, causal=False, softmax_scale=None,
                                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                                        seed=0):
    """Packed reference backward.

    Parameters
    ----------
    dout, q, out : ndarray, shape (total_q, H, D)
    k, v : ndarray, shape (total_k, Hk, D)
    lse : ndarray, shape (H, total_q)
    cu_seqlens_q, cu_seqlens_k : ndarray, shape (B + 1,)

    Returns
    -------
    dq : ndarray, shape (total_q, H, D), float64
    dk, dv : ndarray, shape (total_k, Hk, D), float64
    """
    dq = np.zeros(q.shape)
    dk = np.zeros(k.shape)
    dv = np.zeros(v.shape)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if qe == qs or ke == ks:
            continue
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = attention_one_backward_ref(
            dout[qs:qe], q[qs:qe], k[ks:ke], v[ks:ke], out[qs:qe], lse[:, qs:qe], b, causal=causal,
            softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
            alibi_slopes=_slopes_for(alibi_slopes, b), dropout_p=dropout_p, seed=seed)
    return dq, dk, dv
