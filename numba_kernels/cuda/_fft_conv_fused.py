"""Single-kernel FFT convolution for FFT sizes that fit in shared memory (FlashFFTConv's regime, N <= 16384).

One block convolves two rows of the same channel h at once: z = a + i b (a = u[b0, h] * pregate, b = u[b0 + 1, h]
* pregate, zero-padded to N) is transformed by a complex FFT of size N in shared memory, multiplied by the full
spectrum K of the real filter, and transformed back; because K is the spectrum of a real filter, the real part of
the result is conv(a, k) and the imaginary part conv(b, k). The crop, the bias (skip) term, the postgate and the
cast to the element type happen in the same kernel, so u is read once and y written once: no padded buffer, no
spectrum in global memory, no cuFFT call.

Transforms: the forward is a radix-2 decimation-in-frequency FFT (natural order in, bit-reversed order out), the
inverse a radix-2 decimation-in-time FFT with conjugate twiddles (bit-reversed in, natural out), so no
permutation pass is needed: the filter spectrum is stored in bit-reversed order (``make_expand_kernel``) with the
1 / N scale folded in. Twiddles W^m = exp(-2 pi i m / N), m < N / 2, come from a float64-computed table in
global memory (cached in L1). fp32 arithmetic throughout (inputs float16 / bfloat16 / float32).

The radix-2 stages run in register passes (``passes``): each thread holds 2^r elements of one index set and runs r
stages on them, so shared memory (re and im, one skew word per 32 entries: 8.25 N bytes) is written and read only
between passes; see ``make_fused_kernel``.
"""
import functools

import numpy as np
from numba import cuda, float32

from numba_kernels.cuda._attn_common import dev, jit_kernel
from numba_kernels.cuda._conv1d_kernels import _converters

#: most radix-2 stages per register pass (2^RMAX elements per thread and pass); H200 2026-12-01, B64 H768 L1024
#: (N 2048): 4 -> 1.169 ms, 3 -> 1.811 ms (benchmarks/results/gpu_h200_2026-12-01b_fft_fused_probe.txt)
RMAX = 4


def smem_bytes(N):
    """Dynamic shared memory of the fused kernel for FFT size N (re and im, one skew word per 32)."""
    return 8 * (_pad(N - 1) + 1)


def threads(N, sim=False, rmax=None):
    """Threads per block for FFT size N: one index set of the widest pass per thread (at least a warp)."""
    r = max(passes(max(1, N.bit_length() - 1), rmax or RMAX))
    if sim:
        return max(1, min(N >> r, 4))
    return max(32, min(N >> r, 512))  # 1024 threads ran out of registers at N 8192 (H200); more sets per thread


def twiddles(N):
    """Host float32 (N,) table: [2m] = cos(-2 pi m / N), [2m + 1] = sin(-2 pi m / N), m < N / 2 (computed in
    float64; the caller keeps the device copy)."""
    ang = -2.0 * np.pi * np.arange(N // 2, dtype=np.float64) / N
    t = np.empty(N, np.float32)
    t[0::2], t[1::2] = np.cos(ang), np.sin(ang)
    return t


@functools.lru_cache(maxsize=None)
def make_expand_kernel(LOGN, NT):
    """Kp[h, 2p], Kp[h, 2p + 1] = K[f] / N with f = bitreverse(p) over LOGN bits, from the half spectrum
    Kh (1, H, 2F) of a real filter (K[f] = conj(Kh[N - f]) for f > N / 2). Grid (ceil(N / NT), H)."""
    N = 1 << LOGN
    HALF = N // 2
    INV = float32(1.0 / N)

    def kernel(Kh, Kp):
        p = cuda.blockIdx.x * NT + cuda.threadIdx.x
        h = cuda.blockIdx.y
        if p < N:
            f = 0
            x = p
            for _ in range(LOGN):
                f = (f << 1) | (x & 1)
                x >>= 1
            if f <= HALF:
                kr = Kh[0, h, 2 * f]
                ki = Kh[0, h, 2 * f + 1]
            else:
                kr = Kh[0, h, 2 * (N - f)]
                ki = -Kh[0, h, 2 * (N - f) + 1]
            Kp[h, 2 * p] = kr * INV
            Kp[h, 2 * p + 1] = ki * INV

    return jit_kernel(kernel)


def passes(LOGN, RMAX):
    """Radix-2 stages per register pass (each <= RMAX, largest first): the forward runs them in this order from
    the top index bits down, the inverse in the reverse order from the bottom bits up."""
    k = -(-LOGN // RMAX)
    base, extra = divmod(LOGN, k)
    return tuple(base + 1 if i < extra else base for i in range(k))


@dev
def _sync():
    """cuda.syncthreads() for generated code: defined here so the simulator's swap of this module's ``cuda``
    reaches it."""
    cuda.syncthreads()


def _pad(i):
    return i + (i >> 5)  # one skew word per 32: strided register-pass accesses hit distinct banks


@functools.lru_cache(maxsize=None)
def make_fused_kernel(kind, LOGN, NT, RMAX, opts=(True, True, True)):
    """The fused conv for element kind ``kind`` ("f16" | "bf16" | "f32"), FFT size 2^LOGN, NT threads.

    kernel(u (B, H, L), pre (B, H, L) | empty, post (B, H, Lout) | empty, bias (H,) float32 | empty,
    Kp (H, 2N) float32 (``make_expand_kernel``), tw (N,) float32 (``twiddles``), out (B, H, Lout), start):
    out[b, h, t] = (conv(u * pre, k)[(t + start) mod N] + bias[h] u[b, h, t] pre[b, h, t] (t < L)) * post[b, h, t].
    Grid (ceil(B / 2), H); dynamic shared memory ``smem_bytes(N)``. ``opts`` = (bias, pregate, postgate) may be
    given: an option marked False is compiled out (its array must then be empty), one marked True is used when
    its array is not empty.

    Each pass holds R = 2^r elements per thread in registers and runs r radix-2 stages on them: the forward
    (decimation in frequency) from the top index bits down, the last forward pass multiplies by the filter
    spectrum and runs the first inverse pass (decimation in time, the same index sets) on the same registers, so
    shared memory is touched only between passes. The first pass reads u from global memory, the last writes y.
    """
    cin, cout, _ = _converters(kind)
    N = 1 << LOGN
    NP = _pad(N - 1) + 1         # padded length of one of the re / im arrays
    ZERO = float32(0.0)
    PS = passes(LOGN, RMAX)
    pad = dev(_pad)
    HB, HPRE, HPOST = (bool(o) for o in opts)
    MASK = N - 1

    def make_stages(lo, r, fwd):
        """r radix-2 stages on the R = 2^r registers of the index set base + m 2^lo (m < R), as straight-line
        code generated here (constant register indices whatever LLVM's unroll limits: no local memory).

        The twiddle of the pair (m, m + half) in a stage is W^((low << sh) + (m mod half) 2^(lo + sh)), low = base
        mod 2^lo: a per-thread factor t = W^(low << sh) (one table load per stage; 1 when lo = 0) times a
        compile-time constant c, so unit and -i constants cost no multiply and lo = 0 passes load no twiddles."""
        R = 1 << r
        S = 1 << lo
        src = ["def run(tw, xr, xi, base):", f"    low = base & {S - 1}"]
        consts = {}
        for st in range(r):
            if fwd:   # DIF stage on bit lo + r - 1 - st: span (R >> (st + 1)) * S
                half = R >> (st + 1)
                sh = LOGN - lo - r + st
            else:     # DIT stage on bit lo + st (conjugate twiddles)
                half = 1 << st
                sh = LOGN - 1 - lo - st
            if S > 1:
                src += [f"    w = low << {sh}", "    tr = tw[2 * w]", "    ti = tw[2 * w + 1]"]
            for m in range(R):
                if m & half:
                    continue
                e = ((m & (half - 1)) << (lo + sh)) % N  # constant part of the exponent, units of 1 / N
                ang = -2.0 * np.pi * e / N
                cr, ci = f"C{len(consts)}", f"C{len(consts) + 1}"
                consts[cr], consts[ci] = float32(np.cos(ang)), float32(np.sin(ang))
                a, b = m, m + half
                src += [f"    ar = xr[{a}]", f"    ai = xi[{a}]", f"    dr = xr[{b}]", f"    di = xi[{b}]"]
                if fwd:
                    src += [f"    xr[{a}] = ar + dr", f"    xi[{a}] = ai + di", "    dr = ar - dr", "    di = ai - di"]
                if S > 1 and e != 0:
                    src += [f"    wr = tr * {cr} - ti * {ci}", f"    wi = tr * {ci} + ti * {cr}"]
                elif S > 1:
                    src += ["    wr = tr", "    wi = ti"]
                elif e != 0 and 4 * e != N:
                    src += [f"    wr = {cr}", f"    wi = {ci}"]
                if e == 0 and S == 1:          # w = 1
                    src += ["    pr = dr", "    pi = di"]
                elif 4 * e == N and S == 1:    # w = -i: d (-i) = di - i dr; d conj(w) = d i = -di + i dr
                    src += ["    pr = di", "    pi = -dr"] if fwd else ["    pr = -di", "    pi = dr"]
                elif fwd:
                    src += ["    pr = dr * wr - di * wi", "    pi = dr * wi + di * wr"]
                else:
                    src += ["    pr = dr * wr + di * wi", "    pi = di * wr - dr * wi"]
                if fwd:
                    src += [f"    xr[{b}] = pr", f"    xi[{b}] = pi"]
                else:
                    src += [f"    xr[{a}] = ar + pr", f"    xi[{a}] = ai + pi", f"    xr[{b}] = ar - pr",
                            f"    xi[{b}] = ai - pi"]
        ns = dict(consts)
        exec(compile("\n".join(src), f"<fft stages lo={lo} r={r} {'fwd' if fwd else 'inv'} N={N}>", "exec"), ns)
        return dev(ns["run"])

    def crop_fn(ya, yb, j, u, pre, post, bias, out, b0, h, two, L, Lout, start):
        t = (j - start) & MASK   # (j - start) mod N, known non-negative (no index wrap-around code)
        if t < Lout:
            if HB and bias.shape[0] > 0 and t < L:
                sa = bias[h] * cin(u[b0, h, t])
                if HPRE and pre.shape[0] > 0:
                    sa *= cin(pre[b0, h, t])
                ya += sa
                if two:
                    sb = bias[h] * cin(u[b0 + 1, h, t])
                    if HPRE and pre.shape[0] > 0:
                        sb *= cin(pre[b0 + 1, h, t])
                    yb += sb
            if HPOST and post.shape[0] > 0:
                ya *= cin(post[b0, h, t])
                if two:
                    yb *= cin(post[b0 + 1, h, t])
            out[b0, h, t] = cout(ya)
            if two:
                out[b0 + 1, h, t] = cout(yb)

    crop = dev(crop_fn)

    def load_u_fn(u, pre, b0, h, two, L, i):
        """(u * pre)[b0, h, i] and [b0 + 1, h, i] (0 past L or for a missing second row)."""
        a = ZERO
        c = ZERO
        if i < L:
            a = cin(u[b0, h, i])
            if two:
                c = cin(u[b0 + 1, h, i])
            if HPRE and pre.shape[0] > 0:
                a *= cin(pre[b0, h, i])
                if two:
                    c *= cin(pre[b0 + 1, h, i])
        return a, c

    load_u = dev(load_u_fn)

    # the sequence: forward passes over bit ranges from the top down, the middle pass (bits [0, r_last):
    # forward, multiply, inverse), inverse passes from the bottom up
    fw_ranges = []
    hi = LOGN
    for r in PS:
        fw_ranges.append((hi - r, r))
        hi -= r
    RL = 1 << max(PS)            # registers per thread (the widest pass)
    k = len(PS)

    def build():
        fns = []
        for idx, (lo, r) in enumerate(fw_ranges[:-1]):
            fns.append(make_pass(lo, r, "fwd", idx == 0, False))
        fns.append(make_pass(0, fw_ranges[-1][1], "mid", k == 1, k == 1))
        for idx, (lo, r) in enumerate(reversed(fw_ranges[:-1])):
            fns.append(make_pass(lo, r, "inv", False, idx == k - 2))
        return fns

    def noop(tw, xr, xi, base):
        pass

    def make_pass(lo, r, mode, first, last):
        """Index bits [lo, lo + r): "fwd" stages, "inv" stages, or "mid" (lo = 0: forward stages, times Kp,
        inverse stages); ``first``: input from u, ``last``: output to y (else shared memory both ways)."""
        sf = make_stages(lo, r, True) if mode != "inv" else dev(noop)
        si = make_stages(lo, r, False) if mode != "fwd" else dev(noop)
        MID = mode == "mid"
        R = 1 << r
        S = 1 << lo
        SETS = N >> r

        def run(sm, tw, Kp, xr, xi, u, pre, post, bias, out, b0, h, two, L, Lout, start, tid):
            for q0 in range(tid, SETS, NT):
                q = q0 & MASK    # provably in [0, N): every index below non-negative (no wrap-around code)
                low = q & (S - 1)
                base = ((q >> lo) << (lo + r)) | low
                for m in range(R):
                    i = base + m * S
                    if first:
                        xr[m], xi[m] = load_u(u, pre, b0, h, two, L, i)
                    else:
                        xr[m] = sm[pad(i)]
                        xi[m] = sm[NP + pad(i)]
                sf(tw, xr, xi, base)
                if MID:
                    for m in range(R):
                        i = base + m
                        kr = Kp[h, 2 * i]
                        ki = Kp[h, 2 * i + 1]
                        zr = xr[m]
                        zi = xi[m]
                        xr[m] = zr * kr - zi * ki
                        xi[m] = zr * ki + zi * kr
                si(tw, xr, xi, base)
                for m in range(R):
                    i = base + m * S
                    if last:
                        crop(xr[m], xi[m], i, u, pre, post, bias, out, b0, h, two, L, Lout, start)
                    else:
                        sm[pad(i)] = xr[m]
                        sm[NP + pad(i)] = xi[m]

        return dev(run)

    fns = build()

    # the passes called one after another with a barrier between them, from one generated function (a nested
    # chain of two-call functions gave the same PTX but numba's IR inlining took ~2x the compile time)
    args = "sm, tw, Kp, xr, xi, u, pre, post, bias, out, b0, h, two, L, Lout, start, tid"
    src = [f"def run({args}):"]
    for i in range(len(fns)):
        if i:
            src.append("    SYNC()")
        src.append(f"    F{i}({args})")
    ns = {f"F{i}": f for i, f in enumerate(fns)}
    ns["SYNC"] = _sync
    exec(compile("\n".join(src), f"<fft passes N={N}>", "exec"), ns)
    body = dev(ns["run"])

    def kernel(u, pre, post, bias, Kp, tw, out, start):
        sm = cuda.shared.array(0, float32)
        xr = cuda.local.array(RL, float32)
        xi = cuda.local.array(RL, float32)
        h = cuda.blockIdx.y
        b0 = 2 * cuda.blockIdx.x
        body(sm, tw, Kp, xr, xi, u, pre, post, bias, out, b0, h, b0 + 1 < u.shape[0], u.shape[2], out.shape[2],
             start, cuda.threadIdx.x & 1023)  # the mask: indices provably non-negative (no wrap-around code)

    return jit_kernel(kernel)
