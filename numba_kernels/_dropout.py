"""Counter-based dropout: the keep/drop decision is a pure function of (seed, batch, head, row, col).

The same integer hash runs in NumPy (reference), njit (CPU) and cuda.jit (GPU), so every backend
drops the same elements for the same seed and a backward pass can regenerate the mask.
All arithmetic is done on uint64 holding 32-bit values, so it means the same thing everywhere.
"""
import secrets

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)
_C1 = np.uint64(0x85EBCA6B)
_C2 = np.uint64(0xC2B2AE35)
_GOLD = np.uint64(0x9E3779B9)
_S16 = np.uint64(16)
_S13 = np.uint64(13)
_S32 = np.uint64(32)


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on a uint64 holding a 32-bit value."""
    h = h ^ (h >> _S16)
    h = (h * _C1) & _M32
    h = h ^ (h >> _S13)
    h = (h * _C2) & _M32
    h = h ^ (h >> _S16)
    return h


def build_hash(jit=None):
    """(row_key, col_hash) compiled with ``jit`` (numba.njit, cuda.jit(device=True), or None for NumPy).

    row_key(seed, b, h, i): hash state of row i of head h of sequence b (seed is a uint64).
    col_hash(rk, j): 32-bit hash (as uint64) of column j of that row; kept iff >= keep_threshold(p).
    """
    wrap = jit if jit is not None else (lambda f: f)
    fmix = wrap(_fmix32)

    def row_key(seed, b, h, i):
        x = fmix((seed & _M32) ^ _GOLD)
        x = fmix(x ^ ((seed >> _S32) & _M32))
        x = fmix(x ^ np.uint64(b))
        x = fmix(x ^ np.uint64(h))
        return fmix(x ^ np.uint64(i))

    def col_hash(rk, j):
        return fmix(rk ^ ((np.uint64(j) * _GOLD) & _M32))

    return wrap(row_key), wrap(col_hash)


row_key, col_hash = build_hash()


def keep_threshold(p):
    """Elements whose hash is >= this uint64 threshold are kept (probability ~= 1 - p)."""
    return np.uint64(min(int(round(float(p) * 4294967296.0)), 4294967295))


def normalize_seed(seed):
    """Seed as a Python int in [0, 2**64); ``None`` draws a fresh one from the OS."""
    if seed is None:
        return secrets.randbits(64)
    if isinstance(seed, (bool, float)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return int(seed) & 0xFFFFFFFFFFFFFFFF


def keep_mask(seed, b, h, rows, cols, p):
    """Boolean keep mask (len(rows), len(cols)) for reference code (NumPy, vectorized)."""
    seed = np.uint64(seed)
    rk = row_key(seed, b, h, np.asarray(rows, dtype=np.uint64))[:, None]
    hsh = col_hash(rk, np.asarray(cols, dtype=np.uint64)[None, :])
    return hsh >= keep_threshold(p)
