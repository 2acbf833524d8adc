"""The CPU fft_conv forward as a row-chunked pipeline: every thread takes the next chunk of (b, h) rows and runs
cut -> rfft -> multiply by K[h] -> irfft -> crop on it in buffers it keeps, so a chunk's data stays in that
core's cache from the cut to the crop and no full-size temporary (padded input, spectrum, full output) is ever
allocated or touched; only u (and the gates) are read and y written once.

One block layout serves both FFT methods. A row of v = u * pregate (length L) is cut into nb blocks of M
samples, each zero-padded to the FFT size P (the single FFT is nb = 1 with M = P >= L + Lk - 1; overlap-add
is nb = ceil(L / M) with M = P - Lk + 1, so P - M <= M). The crop adds block j's head and block j - 1's tail
(its samples past M) into ``y[t] = full[t + off]``, then the skip term ``bias[h] * v[t]`` (t < L) and the
postgate. Transforms are unnormalized both ways and the multiply applies K / P.

Threads: the calling thread plus ``workers - 1`` helper threads (workers = os.cpu_count()), each with its own FFT
engine and buffers; the njit kernels here are serial and release the GIL, and so do scipy.fft and pyFFTW.
Chunks are handed out dynamically, so a core slowed by other work takes fewer of them, and the call never
waits for a helper that has not started (it returns once every chunk taken is done; cpu/_tasks.py says why).
"""
import itertools
import os
import threading

import numpy as np

from numba_kernels._jit import njit
from numba_kernels.cpu._tasks import executor

#: block rows (of P points) per chunk: CHUNK_POINTS // P, at least one (b, h) row of nb blocks and at least
#: MIN_BLOCK_ROWS[lib] block rows (pocketfft vectorizes across up to 16 float32 rows at a time)
CHUNK_POINTS = 1 << 17
MIN_BLOCK_ROWS = {"scipy": 16, "pyfftw": 1}
#: pyFFTW planner: FFTW_MEASURE within this many seconds per new (rows, P, dtype); plans are kept per thread
FFTW_FLAGS = ("FFTW_MEASURE",)
FFTW_PLAN_SECONDS = 2.0
#: engines (buffers + plans) kept per thread
ENGINES_PER_THREAD = 4

_local = threading.local()


@njit
def cut(u2, g2, r0, r1, M, nb, buf):
    """buf[(r - r0) * nb + j, :] = (u2 * g2)[r, j * M : j * M + M] zero-padded to P (g2 empty = 1); rows past
    r1 are zero. u2/g2 (rows, L); buf (q, P)."""
    L = u2.shape[1]
    q, P = buf.shape
    for rr in range(q // nb):
        r = r0 + rr
        for j in range(nb):
            row = buf[rr * nb + j]
            n = 0
            if r < r1:
                t0 = j * M
                n = min(M, L - t0)
                x = u2[r, t0:t0 + n]
                if g2.shape[0] > 0:
                    g = g2[r, t0:t0 + n]
                    for i in range(n):
                        row[i] = x[i] * g[i]
                else:
                    for i in range(n):
                        row[i] = x[i]
            for i in range(n, P):
                row[i] = 0.0


@njit
def mulk(spec, K, r0, H, nb, scale):
    """spec[q, :] *= K[(r0 + q // nb) % H, :] * scale, in place. spec (q, F); K (H, F)."""
    q, F = spec.shape
    for i in range(q):
        kr = K[(r0 + i // nb) % H]
        s = spec[i]
        for f in range(F):
            s[f] = s[f] * kr[f] * scale


@njit
def crop(y, r0, r1, H, M, nb, off, u2, g2, bias, post2, out2):
    """out2[r, t] = (y_head + y_tail at p = t + off, + bias[h] * u2 * g2 for t < L) * post2 for rows r0..r1.
    y (q, P) block outputs (block j of row r at (r - r0) * nb + j); u2/g2 (rows, L); out2/post2 (rows, Lout)."""
    P = y.shape[1]
    L = u2.shape[1]
    Lout = out2.shape[1]
    for r in range(r0, r1):
        base = (r - r0) * nb
        o = out2[r]
        for j in range(nb + 1):  # heads: samples [0, M) of block j land at p = j * M + i; block nb is empty
            p0 = j * M
            t_lo, t_hi = max(0, p0 - off), min(Lout, p0 + M - off)
            if j < nb:
                yh = y[base + j]
                for t in range(t_lo, t_hi):
                    o[t] = yh[t + off - p0]
            else:
                for t in range(t_lo, t_hi):
                    o[t] = 0.0
        for j in range(1, nb + 1):  # tails: samples [M, P) of block j - 1 add onto block j
            p0 = j * M
            t_lo, t_hi = max(0, p0 - off), min(Lout, p0 + P - M - off)
            yt = y[base + j - 1]
            for t in range(t_lo, t_hi):
                o[t] += yt[t + off - p0 + M]
        Ls = min(L, Lout)
        if bias.shape[0] > 0:
            bh = bias[r % H]
            x = u2[r]
            if g2.shape[0] > 0:
                g = g2[r]
                for t in range(Ls):
                    o[t] += bh * x[t] * g[t]
            else:
                for t in range(Ls):
                    o[t] += bh * x[t]
        if post2.shape[0] > 0:
            pg = post2[r]
            for t in range(Lout):
                o[t] *= pg[t]


class _ScipyEngine:
    """scipy.fft on one thread; the cut buffer is kept, the spectrum and output are scipy's allocations."""

    def __init__(self, q, P, dt):
        import scipy.fft

        self.fft, self.P = scipy.fft, P
        self.buf = np.empty((q, P), dt)

    def forward(self):
        return self.fft.rfft(self.buf, axis=-1, workers=1)

    def inverse(self, spec):
        return self.fft.irfft(spec, n=self.P, axis=-1, workers=1, norm="forward", overwrite_x=True)


class _FftwEngine:
    """Two pyFFTW plans (r2c, c2r, one thread each) on aligned buffers of their own."""

    def __init__(self, q, P, dt):
        import pyfftw

        cdt = np.result_type(dt, np.complex64)
        self.buf = pyfftw.empty_aligned((q, P), dt)
        self.spec = pyfftw.empty_aligned((q, P // 2 + 1), cdt)
        self.out = pyfftw.empty_aligned((q, P), dt)
        kw = dict(axes=(1,), threads=1, planning_timelimit=FFTW_PLAN_SECONDS)
        self.fwd = pyfftw.FFTW(self.buf, self.spec, flags=FFTW_FLAGS, **kw)
        self.inv = pyfftw.FFTW(self.spec, self.out, direction="FFTW_BACKWARD",
                               flags=FFTW_FLAGS + ("FFTW_DESTROY_INPUT",), **kw)

    def forward(self):
        self.fwd.execute()
        return self.spec

    def inverse(self, spec):
        self.inv.execute()  # unnormalized (execute, not __call__)
        return self.out


def _engine(lib, q, P, dt):
    """This thread's engine for (lib, q, P, dt), kept in a small per-thread LRU."""
    cache = getattr(_local, "engines", None)
    if cache is None:
        cache = _local.engines = {}
    key = (lib, q, P, np.dtype(dt).str)
    eng = cache.pop(key, None)
    if eng is None:
        eng = (_FftwEngine if lib == "pyfftw" else _ScipyEngine)(q, P, dt)
        while len(cache) >= ENGINES_PER_THREAD:
            cache.pop(next(iter(cache)))
    cache[key] = eng
    return eng


def chunk_rows(P, nb, lib, rows, threads):
    """(b, h) rows per chunk for blocks of P points, nb blocks per row: the sizes above, but at most
    rows / threads (every thread gets a chunk)."""
    return max(1, min(max(CHUNK_POINTS // (P * nb), -(-MIN_BLOCK_ROWS[lib] // nb)), -(-rows // threads)))


def fwd_rows(u, pre, bias, post, K, off, Lout, P, M, nb, lib, workers=None):
    """y (B, H, Lout) of the forward on the block pipeline (module docstring). u/pre (B, H, L) C-contiguous
    (pre may be empty), post (B, H, Lout) or empty, bias (H,) or empty, K (H, P // 2 + 1) = rfft(k, P)
    unnormalized; lib "scipy" | "pyfftw"."""
    B, H, L = u.shape
    rows = B * H
    u2 = u.reshape(rows, L)  # (B*H, L)
    g2 = pre.reshape(rows, L) if pre.shape[0] else pre.reshape(0, 0)
    p2 = post.reshape(rows, Lout) if post.shape[0] else post.reshape(0, 0)
    out = np.empty((B, H, Lout), u.dtype)
    o2 = out.reshape(rows, Lout)
    R = chunk_rows(P, nb, lib, rows, workers or os.cpu_count() or 1)
    nchunks = -(-rows // R)
    scale = u.dtype.type(1.0 / P)
    counter = itertools.count()
    done, errors = [0], []
    cond = threading.Condition()

    def work():
        eng = None
        while True:
            c = next(counter)  # atomic under the GIL
            if c >= nchunks:
                return
            if eng is None:
                eng = _engine(lib, R * nb, P, u.dtype)
            r0 = c * R
            r1 = min(rows, r0 + R)
            try:
                cut(u2, g2, r0, r1, M, nb, eng.buf)
                spec = eng.forward()
                mulk(spec, K, r0, H, nb, scale)
                crop(eng.inverse(spec), r0, r1, H, M, nb, off, u2, g2, bias, p2, o2)
            except BaseException as e:  # recorded before the chunk counts as done
                errors.append(e)
                raise
            finally:
                with cond:
                    done[0] += 1
                    cond.notify_all()

    T = min(workers or os.cpu_count() or 1, nchunks)
    for _ in range(T - 1):
        executor().submit(work)
    work()  # this thread drains the chunks too; then only the chunks a helper has taken are waited for
    with cond:
        while done[0] < nchunks and not errors:
            cond.wait(0.01)
    if errors:
        raise errors[0]
    return out
