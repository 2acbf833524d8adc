"""Long convolution, ground truth: direct O(L * Lk) float64 NumPy, obviously correct.

Semantics (see numba_kernels.fft_conv for the full docs), per row (b, h), with v = u * pregate:
  full[t] = sum_s k[h, s] * v[t - s],  t < L + Lk - 1           (numpy.convolve(v, k, "full"))
  mode "causal": y[t] = full[t],              t < L             (start = 0, Lout = L)
  mode "same":   y[t] = full[t + (Lk-1)//2],  t < L             (scipy.signal.fftconvolve "same", Lout = L)
  mode "full":   y[t] = full[t],              t < L + Lk - 1
  y[t] += bias[h] * v[t] for t < L (the skip term, at the output's own index), then y *= postgate.
"""
import numpy as np

MODES = ("causal", "same", "full")


def out_len_start(mode, L, Lk):
    """(output length, offset of output index 0 in the full convolution)."""
    if mode == "causal":
        return L, 0
    if mode == "same":
        return L, (Lk - 1) // 2
    return L + Lk - 1, 0


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _pre(u, k, mode, bias, pregate):
    """(v (B, H, L), the un-gated output ypre (B, H, Lout), start)."""
    u, k, bias, pregate = _f64(u), _f64(k), _f64(bias), _f64(pregate)
    B, H, L = u.shape
    Lk = k.shape[1]
    Lout, start = out_len_start(mode, L, Lk)
    v = u if pregate is None else u * pregate
    full = np.zeros((B, H, L + Lk - 1))
    for s in range(Lk):
        full[:, :, s:s + L] += k[None, :, s, None] * v
    y = full[:, :, start:start + Lout].copy()
    if bias is not None:
        y[:, :, :L] += bias[None, :, None] * v
    return v, y, start


def fft_conv_ref(u, k, mode="causal", bias=None, pregate=None, postgate=None):
    """Direct float64 long convolution.

    Parameters
    ----------
    u : ndarray, shape (B, H, L)
    k : ndarray, shape (H, Lk)
    mode : {"causal", "same", "full"}
    bias : ndarray, shape (H,), optional
    pregate : ndarray, shape (B, H, L), optional
    postgate : ndarray, shape (B, H, Lout), optional

    Returns
    -------
    y : ndarray, shape (B, H, Lout), float64
        Lout = L for "causal" / "same", L + Lk - 1 for "full".
    """
    _, y, _ = _pre(u, k, mode, bias, pregate)
    return y if postgate is None else y * _f64(postgate)


def fft_conv_backward_ref(dout, u, k, mode="causal", bias=None, pregate=None, postgate=None):
    """Gradients of :func:`fft_conv_ref`, direct float64.

    Parameters
    ----------
    dout : ndarray, shape (B, H, Lout)
    u, k, mode, bias, pregate, postgate
        As given to :func:`fft_conv_ref`.

    Returns
    -------
    du : ndarray, shape (B, H, L)
    dk : ndarray, shape (H, Lk)
    dbias : ndarray, shape (H,) or None
    dpregate : ndarray, shape (B, H, L) or None
    dpostgate : ndarray, shape (B, H, Lout) or None
    """
    v, y, start = _pre(u, k, mode, bias, pregate)
    dout, kk = _f64(dout), _f64(k)
    B, H, L = v.shape
    Lk = kk.shape[1]
    dpost = None if postgate is None else dout * y
    g = dout if postgate is None else dout * _f64(postgate)
    gfull = np.zeros((B, H, L + Lk - 1))  # gradient of the full convolution
    gfull[:, :, start:start + g.shape[2]] = g
    dv = np.zeros((B, H, L))
    dk = np.zeros((H, Lk))
    for s in range(Lk):  # full[t + s] += k[s] v[t]
        dv += kk[None, :, s, None] * gfull[:, :, s:s + L]
        dk[:, s] = np.sum(gfull[:, :, s:s + L] * v, axis=(0, 2))
    dbias = None
    if bias is not None:
        dv += _f64(bias)[None, :, None] * g[:, :, :L]
        dbias = np.sum(g[:, :, :L] * v, axis=(0, 2))
    du = dv if pregate is None else dv * _f64(pregate)
    dpre = None if pregate is None else dv * _f64(u)
    return du, dk, dbias, dpre, dpost
