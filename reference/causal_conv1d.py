"""Causal depthwise conv1d, ground truth: float64 NumPy loops, obviously correct.

Semantics (see numba_kernels.causal_conv1d for the full docs). With W the kernel width and
xpad = [initial_states (or zeros) of length W - 1, x] along the time axis (xpad index j holds x
position p = j - (W - 1)):
  pre[b, d, t] = bias[d] + sum_w weight[d, w] * xpad[b, d, t + w] * visible(b, t, t + w - (W - 1))
  out = pre, or silu(pre) = pre * sigmoid(pre)
  visible(b, t, p) = seq_id(b, p) == seq_idx[b, t], seq_id(b, p) = seq_idx[b, max(p, 0)]
(without seq_idx every position is visible; the padding positions p < 0 carry the id of position 0,
so initial_states only reach the first sequence segment).
  final_states[b, d, k] = xpad[b, d, L + k] * visible(b, L - 1, L + k - (W - 1)),  k < W - 1
"""
import numpy as np


def _act(pre, activation):
    if activation in ("silu", "swish"):
        return pre / (1.0 + np.exp(-pre))
    return pre


def _act_grad(pre, activation):
    if activation in ("silu", "swish"):
        s = 1.0 / (1.0 + np.exp(-pre))
        return s * (1.0 + pre * (1.0 - s))
    return np.ones_like(pre)


def _padded(x, W, initial_states):
    """x (B, D, L) -> xpad (B, D, L + W - 1) float64."""
    B, D, L = x.shape
    pad = np.zeros((B, D, W - 1)) if initial_states is None else np.asarray(initial_states, np.float64)
    return np.concatenate([pad, np.asarray(x, np.float64)], axis=2)


def _visible(seq_idx, B, L, W):
    """Boolean (B, L, W): whether output t sees xpad index t + w."""
    vis = np.ones((B, L, W), dtype=bool)
    if seq_idx is None:
        return vis
    s = np.asarray(seq_idx)
    for b in range(B):
        for t in range(L):
            for w in range(W):
                p = t + w - (W - 1)
                vis[b, t, w] = s[b, max(p, 0)] == s[b, t]
    return vis


def _final_visible(seq_idx, B, L, W):
    """Boolean (B, W - 1): whether final_states[b, :, k] keeps xpad index L + k."""
    vis = np.ones((B, W - 1), dtype=bool)
    if seq_idx is None or L == 0:
        return vis
    s = np.asarray(seq_idx)
    for b in range(B):
        for k in range(W - 1):
            vis[b, k] = s[b, max(L + k - (W - 1), 0)] == s[b, L - 1]
    return vis


def _pre(xpad, weight, bias, vis):
    B, D, Lp = xpad.shape
    W = weight.shape[1]
    L = Lp - (W - 1)
    pre = np.zeros((B, D, L)) if bias is None else np.broadcast_to(np.asarray(bias, np.float64)[None, :, None],
                                                                     (B, D, L)).copy()
    for w in range(W):
        pre += weight[None, :, w, None] * xpad[:, :, w:w + L] * vis[:, None, :, w]
    return pre


def causal_conv1d_ref(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False,
                      seq_idx=None):
    """x (B, D, L), weight (D, W) -> out (B, D, L) float64 [, final_states (B, D, W - 1) float64]."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    B, D, L = x.shape
    W = weight.shape[1]
    xpad = _padded(x, W, initial_states)
    out = _act(_pre(xpad, weight, bias, _visible(seq_idx, B, L, W)), activation)
    if not return_final_states:
        return out
    final = xpad[:, :, L:] * _final_visible(seq_idx, B, L, W)[:, None, :]
    return out, final


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """Decode step(s), causal-conv1d's ``causal_conv1d_update``: x (B, D) or (B, D, Lnew), conv_state
    (B, D, S) with S >= W - 1 -> out like x (float64); ``conv_state`` is updated in place (values cast to
    its dtype).

    Without cache_seqlens the state shifts left by Lnew and x is appended; with cache_seqlens (B,) the
    state is a circular buffer: the window is ``conv_state[(c - (W - 1) + k) % S]``, k < W - 1, and token
    i is written to ``(c + i) % S`` (the last write wins when Lnew > S)."""
    squeeze = np.ndim(x) == 2
    xs = np.asarray(x, np.float64)
    if squeeze:
        xs = xs[:, :, None]
    weight = np.asarray(weight, np.float64)
    B, D, Ln = xs.shape
    W = weight.shape[1]
    S = conv_state.shape[2]
    st = np.array(conv_state, dtype=np.float64)  # a copy: conv_state is written below
    if cache_seqlens is None:
        window = st[:, :, S - (W - 1):]
        new = np.concatenate([st, xs], axis=2)[:, :, -S:] if S > 0 else st
        conv_state[...] = new.astype(conv_state.dtype)
    else:
        window = np.zeros((B, D, W - 1))
        for b in range(B):
            c = int(cache_seqlens[b])
            for k in range(W - 1):
                window[b, :, k] = st[b, :, (c - (W - 1) + k) % S]
            for i in range(Ln):
                conv_state[b, :, (c + i) % S] = xs[b, :, i].astype(conv_state.dtype)
    out = causal_conv1d_ref(xs, weight, bias, activation, initial_states=window)
    return out[:, :, 0] if squeeze else out


def causal_conv1d_backward_ref(dout, x, weight, bias=None, activation=None, initial_states=None,
                               dfinal_states=None, seq_idx=None):
    """Gradients of :func:`causal_conv1d_ref` (float64): returns (dx (B, D, L), dweight (D, W),
    dbias (D,) or None, dinitial_states (B, D, W - 1) or None). ``dfinal_states`` (B, D, W - 1) is the
    upstream gradient of final_states."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    dout = np.asarray(dout, np.float64)
    B, D, L = x.shape
    W = weight.shape[1]
    xpad = _padded(x, W, initial_states)
    vis = _visible(seq_idx, B, L, W)
    g = dout * _act_grad(_pre(xpad, weight, bias, vis), activation)  # (B, D, L)
    dxpad = np.zeros_like(xpad)
    dweight = np.zeros((D, W))
    for w in range(W):
        gm = g * vis[:, None, :, w]
        dxpad[:, :, w:w + L] += gm * weight[None, :, w, None]
        dweight[:, w] = np.sum(gm * xpad[:, :, w:w + L], axis=(0, 2))
    if dfinal_states is not None:
        dxpad[:, :, L:] += np.asarray(dfinal_states, np.float64) * _final_visible(seq_idx, B, L, W)[:, None, :]
    dbias = None if bias is None else g.sum(axis=(0, 2))
    dinit = None if initial_states is None else dxpad[:, :, :W - 1]
    return dxpad[:, :, W - 1:], dweight, dbias, dinit
