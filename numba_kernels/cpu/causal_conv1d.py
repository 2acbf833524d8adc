"""Causal depthwise conv1d on the CPU: njit, parallel over the (batch, channel) rows.

Each task owns one row (b, d): it stages the padded input row xpad (L + W - 1) in a local buffer
(initial state or zeros, then x), and accumulates the output one tap at a time
(``out[t] += weight[w] * xpad[t + w]``), a vectorizable pass over the row per tap.
Arrays arrive in the compute dtype (float32, or float64 for float64 inputs); the host wrapper widens
float16 / bfloat16 and narrows the results. Absent optional inputs are passed as empty arrays.

Visibility with seq_idx (B, L): output t sees xpad index j (x position p = j - (W - 1)) iff
``seq_idx[b, max(p, 0)] == seq_idx[b, t]``.
"""
import numpy as np
from numba import prange

from numba_kernels._jit import njit, njit_parallel


@njit(inline="always")
def _stage_row(xpad, x, init, b, d, W):
    """xpad[:W-1] = initial state (or 0), xpad[W-1:] = x[b, d]."""
    for k in range(W - 1):
        xpad[k] = init[b, d, k] if init.shape[0] > 0 else 0
    xr = x[b, d]
    for t in range(xr.shape[0]):
        xpad[W - 1 + t] = xr[t]


@njit(inline="always")
def _pre_row(pre, xpad, wrow, bias_d, seq, b, W):
    """pre[t] = bias_d + sum_w wrow[w] * xpad[t + w] (masked by seq_idx when given)."""
    L = pre.shape[0]
    for t in range(L):
        pre[t] = bias_d
    if seq.shape[0] == 0:
        for w in range(W):
            wv = wrow[w]
            xs = xpad[w:w + L]
            for t in range(L):
                pre[t] += wv * xs[t]
    else:
        for t in range(L):
            st = seq[b, t]
            acc = pre[t]
            for w in range(W):
                if seq[b, max(t + w - (W - 1), 0)] == st:
                    acc += wrow[w] * xpad[t + w]
            pre[t] = acc


@njit(inline="always")
def _final_visible(seq, b, L, W, k):
    if seq.shape[0] == 0 or L == 0:
        return True
    return seq[b, max(L + k - (W - 1), 0)] == seq[b, L - 1]


@njit_parallel
def conv_fwd_cpu(x, weight, bias, init, seq, silu, out, final):
    """x (B, D, L), weight (D, W), bias (D,) | (0,), init (B, D, W-1) | (0,0,0), seq (B, L) int32 | (0,0)
    -> out (B, D, L); final (B, D, W-1) | (0,0,0) filled when non-empty."""
    B, D, L = x.shape
    W = weight.shape[1]
    zero = np.zeros(1, x.dtype)[0]
    one = np.ones(1, x.dtype)[0]
    for r in prange(B * D):
        b = r // D
        d = r - b * D
        xpad = np.empty(L + W - 1, dtype=x.dtype)
        _stage_row(xpad, x, init, b, d, W)
        bd = bias[d] if bias.shape[0] > 0 else zero
        o = out[b, d]
        _pre_row(o, xpad, weight[d], bd, seq, b, W)
        if silu:
            for t in range(L):
                o[t] = o[t] / (one + np.exp(-o[t]))
        if final.shape[0] > 0:
            for k in range(W - 1):
                final[b, d, k] = xpad[L + k] if _final_visible(seq, b, L, W, k) else zero


@njit_parallel
def conv_bwd_cpu(dout, x, weight, bias, init, dfinal, seq, silu, dx, dwb, dinit):
    """Backward. dout/x (B, D, L); dfinal (B, D, W-1) | (0,0,0). Writes dx (B, D, L), per-batch partial
    weight/bias grads dwb (B, D, W + 1) (column W: bias) and dinit (B, D, W-1) | (0,0,0)."""
    B, D, L = x.shape
    W = weight.shape[1]
    zero = np.zeros(1, x.dtype)[0]
    one = np.ones(1, x.dtype)[0]
    for r in prange(B * D):
        b = r // D
        d = r - b * D
        xpad = np.empty(L + W - 1, dtype=x.dtype)
        _stage_row(xpad, x, init, b, d, W)
        wrow = weight[d]
        g = np.empty(L, dtype=x.dtype)
        do = dout[b, d]
        if silu:
            bd = bias[d] if bias.shape[0] > 0 else zero
            _pre_row(g, xpad, wrow, bd, seq, b, W)
            for t in range(L):
                p = g[t]
                s = one / (one + np.exp(-p))
                g[t] = do[t] * s * (one + p * (one - s))
        else:
            for t in range(L):
                g[t] = do[t]
        dxpad = np.zeros(L + W - 1, dtype=x.dtype)
        gsum = zero
        for t in range(L):
            gsum += g[t]
        dwb[b, d, W] = gsum
        for w in range(W):
            wv = wrow[w]
            acc = zero
            if seq.shape[0] == 0:
                xs = xpad[w:w + L]
                dxs = dxpad[w:w + L]
                for t in range(L):
                    dxs[t] += g[t] * wv
                    acc += g[t] * xs[t]
            else:
                for t in range(L):
                    if seq[b, max(t + w - (W - 1), 0)] == seq[b, t]:
                        dxpad[t + w] += g[t] * wv
                        acc += g[t] * xpad[t + w]
            dwb[b, d, w] = acc
        if dfinal.shape[0] > 0:
            for k in range(W - 1):
                if _final_visible(seq, b, L, W, k):
                    dxpad[L + k] += dfinal[b, d, k]
        dxr = dx[b, d]
        for t in range(L):
            dxr[t] = dxpad[W - 1 + t]
        if dinit.shape[0] > 0:
            for k in range(W - 1):
                dinit[b, d, k] = dxpad[k]


@njit_parallel
def conv_update_cpu(x, state, weight, bias, cache_seqlens, silu, out):
    """Decode steps. x (B, D, Ln) compute dtype, state (B, D, S) in its own dtype (updated in place),
    cache_seqlens (B,) int64 | (0,) -> out (B, D, Ln) compute dtype. The update is done in the caller's
    state array only when its dtype is float32/float64; the wrapper handles 16-bit states."""
    B, D, Ln = x.shape
    W = weight.shape[1]
    S = state.shape[2]
    zero = np.zeros(1, x.dtype)[0]
    one = np.ones(1, x.dtype)[0]
    for r in prange(B * D):
        b = r // D
        d = r - b * D
        xpad = np.empty(Ln + W - 1, dtype=x.dtype)
        st = state[b, d]
        if cache_seqlens.shape[0] > 0:
            c = cache_seqlens[b]
            for k in range(W - 1):
                xpad[k] = st[(c - (W - 1) + k) % S]
            for i in range(Ln):
                st[(c + i) % S] = x[b, d, i]
        else:
            for k in range(W - 1):
                xpad[k] = st[S - (W - 1) + k]
            for s in range(S):  # state <- last S of [state, x]; reads run ahead of writes
                j = Ln + s
                st[s] = st[j] if j < S else x[b, d, j - S]
        for i in range(Ln):
            xpad[W - 1 + i] = x[b, d, i]
        bd = bias[d] if bias.shape[0] > 0 else zero
        o = out[b, d]
        _pre_row(o, xpad, weight[d], bd, np.zeros((0, 0), np.int32), b, W)
        if silu:
            for t in range(Ln):
                o[t] = o[t] / (one + np.exp(-o[t]))
