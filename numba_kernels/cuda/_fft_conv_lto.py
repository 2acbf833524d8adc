"""Single-FFT forward conv as two cuFFT calls, everything pointwise fused into cuFFT LTO callbacks.

cuFFT >= 11.3 links callbacks given as LTO-IR into its own kernels when a plan is made
(``cufftXtSetJITCallback``); numba-cuda compiles the Python callbacks below to LTO-IR
(``cuda.compile(..., abi="c", output="ltoir")``). A forward conv is then

  R2C, load callback: x[r, i] = u[r, i] * pregate[r, i] for i < L, 0 for L <= i < N  (pad, gate, cast)
      u -> S (B * H rows of F = N // 2 + 1 complex values, the reused scratch buffer)
  C2R, load callback: S[r, f] * K[r % H, f]                                          (filter multiply)
       store callback: y[r, t] = (v / N + bias * u * pregate) * postgate at t = (j - start) mod N < Lout
      S -> y (crop, bias, postgate, cast; every other j is dropped)

with r = b * H + h. The real side of both plans is addressed as dense rows of N (cuFFT never touches u or
y itself: the callbacks do every access, u and y keep their own dense layouts (L, Lout per row)). Shape
constants (N, L, Lout, start, H) and which options are present are compiled into the callbacks, so every
index is a multiply-shift; per-call device addresses (K, gates, bias, u) live in an 8-word callerInfo
buffer per plan pair, rewritten with one stream-ordered copy only when they change.

Under the CUDA simulator :func:`emulate` runs the same callbacks over every offset around numpy FFTs, so the
index logic is tested in CI; on the GPU, ``benchmarks/gpu/check_fft_conv.py`` checks it against the reference.
"""
import ctypes
import functools
import threading

import numpy as np
from numba import float32, float64, int64, types, uint16

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._conv1d_kernels import _converters

# callerInfo slots
K_, PRE, POST, BIAS, U = 0, 1, 2, 3, 4
NINFO = 8
NAMES = ("nk_fftconv_load_r2c", "nk_fftconv_load_c2r", "nk_fftconv_store_c2r")
#: (symbol style, 64-bit plan API) in the order tried; the first that plans is kept for the process. cuFFT
#: declares the callback it links as a C++ function of the given name (NVIDIA's samples pass the plain name of
#: a C++ __device__ function), so "cxx" compiles it under that name's Itanium mangling, e.g.
#: _Z19nk_fftconv_load_r2cPvyS_S_ for (void*, unsigned long long, void*, void*); "c" is the bare name (failed
#: with CUFFT_INTERNAL_ERROR on cuFFT 12.0, H200, 2026-12-01)
STRATEGIES = [("cxx", True), ("cxx", False), ("c", True)]
strategy = []
_ELEM = {"f32": float32, "f64": float64, "f16": types.float16, "bf16": uint16}

if not intr.SIM:
    from numba.cuda.extending import intrinsic

    @functools.lru_cache(maxsize=None)
    def _caster(nbtype):
        """addr (uint64) -> CPointer(nbtype)."""
        @intrinsic
        def as_ptr(typingctx, addr):
            sig = types.CPointer(nbtype)(types.uint64)

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

            return sig, codegen

        return as_ptr
else:
    def _caster(nbtype):
        return lambda a: a  # the simulator's info holds the flat arrays themselves


@functools.lru_cache(maxsize=None)
def make_callbacks(kind, N, L, Lout, start, H, pre, post, bias):
    """(load_r2c, load_c2r, store_c2r) Python callbacks for this configuration (cuFFT's signatures:
    load(data, offset, info, smem) -> element, store(data, offset, element, info, smem))."""
    cin, cout, ft = _converters(kind)
    pe, pf = _caster(_ELEM[kind]), _caster(ft)
    pc = _caster(types.complex128 if kind == "f64" else types.complex64)
    F = N // 2 + 1
    scale = ft(1.0 / N)
    ZERO = ft(0.0)

    def load_r2c(data, offset, info, smem):
        o = int64(offset)
        r = o // N
        i = o - r * N
        v = ZERO
        if i < L:
            j = r * L + i
            v = cin(data[j])
            if pre:
                v *= cin(pe(info[PRE])[j])
        return v

    def load_c2r(data, offset, info, smem):
        o = int64(offset)
        r = o // F
        f = o - r * F
        x = data[o]
        k = pc(info[K_])[(r % H) * F + f]
        return x * k

    def store_c2r(data, offset, value, info, smem):
        o = int64(offset)
        r = o // N
        t = o - r * N - start
        if t < 0:
            t += N
        if t < Lout:
            v = value * scale
            if bias:
                if t < L:
                    s = pf(info[BIAS])[r % H] * cin(pe(info[U])[r * L + t])
                    if pre:
                        s *= cin(pe(info[PRE])[r * L + t])
                    v += s
            if post:
                v *= cin(pe(info[POST])[r * Lout + t])
            data[r * Lout + t] = cout(v)

    return load_r2c, load_c2r, store_c2r


def signatures(kind):
    """numba signatures of (load_r2c, load_c2r, store_c2r) for an element kind."""
    ft = float64 if kind == "f64" else float32
    ct = types.complex128 if kind == "f64" else types.complex64
    pe, pc, pi = types.CPointer(_ELEM[kind]), types.CPointer(ct), types.CPointer(types.uint64)
    return (ft(pe, types.uint64, pi, pe), ct(pc, types.uint64, pi, pc),
            types.void(pe, types.uint64, ft, pi, pe))


def symbol(name, store, dbl, style):
    """The symbol cuFFT links for callback ``name``: C++-mangled (value type in a store's signature)."""
    if style == "c":
        return name
    return f"_Z{len(name)}{name}Pvy{('d' if dbl else 'f') if store else ''}S_S_"


@functools.lru_cache(maxsize=64)
def ltoir(kind, N, L, Lout, start, H, pre, post, bias, cc, style="cxx"):
    """The three callbacks compiled to LTO-IR for compute capability ``cc``: ((name, bytes, cufft CB type), ...)."""
    from numba import cuda

    from numba_kernels.cuda import cufft

    dbl = kind == "f64"
    types_ = ((cufft.CB_LD_REAL_DOUBLE if dbl else cufft.CB_LD_REAL),
              (cufft.CB_LD_COMPLEX_DOUBLE if dbl else cufft.CB_LD_COMPLEX),
              (cufft.CB_ST_REAL_DOUBLE if dbl else cufft.CB_ST_REAL))
    out = []
    for j, (fn, sig, name, cbt) in enumerate(zip(make_callbacks(kind, N, L, Lout, start, H, pre, post, bias),
                                                signatures(kind), NAMES, types_)):
        sym = symbol(name, j == 2, dbl, style)
        ir, _ = cuda.compile(fn, sig, device=True, abi="c", abi_info={"abi_name": sym}, output="ltoir", cc=cc,
                             forceinline=True)
        out.append((name, bytes(ir), cbt))
    return tuple(out[:1]), tuple(out[1:])


class _Pair:
    """R2C and C2R callback plans of one configuration and their callerInfo buffer."""

    def __init__(self, cfg, rows, dbl, cc):
        from numba import cuda

        from numba_kernels.cuda import cufft

        self.lock = threading.Lock()  # info update + both transforms, in this order on the legacy stream
        self.info = cuda.device_array(NINFO, dtype=np.uint64)
        self.info_ptr = self.info.__cuda_array_interface__["data"][0]
        self.last = None
        self.host = np.zeros(NINFO, np.uint64)
        N, errs = cfg[1], []
        for style, api64 in (strategy or STRATEGIES):
            try:
                fwd, inv = ltoir(*cfg, cc, style)
                self.r2c = cufft.callback_plan((cfg, style), N, rows, False, dbl, fwd, self.info_ptr, api64)
                self.c2r = cufft.callback_plan((cfg, style), N, rows, True, dbl, inv, self.info_ptr, api64)
            except cufft.CufftError as e:
                errs.append(f"{style} symbols, {'64' if api64 else '32'}-bit plan: {e}")
                continue
            strategy[:] = [(style, api64)]
            return
        raise RuntimeError("; ".join(errs))

    def set_info(self, ptrs):
        if ptrs == self.last:
            return
        host = np.zeros(NINFO, np.uint64)
        host[:len(ptrs)] = ptrs
        # stream-ordered (legacy default stream): the previous call's transforms read the old values first
        _check_cu(_libcuda().cuMemcpyHtoDAsync_v2(ctypes.c_uint64(self.info_ptr), host.ctypes.data_as(ctypes.c_void_p),
                                                  ctypes.c_size_t(host.nbytes), ctypes.c_void_p(None)))
        self.host, self.last = host, ptrs  # keep the source alive until the next update


_cu = None


def _libcuda():
    global _cu
    if _cu is None:
        _cu = ctypes.CDLL("libcuda.so.1")
        _cu.cuMemcpyHtoDAsync_v2.restype = ctypes.c_int
    return _cu


def _check_cu(status):
    if status != 0:
        raise RuntimeError(f"cuMemcpyHtoDAsync failed with CUDA status {status}")


_pairs = {}
_lock = threading.Lock()
#: configurations whose plan failed (the error text), so the fallback path is taken without retrying
failed = {}


def clear():
    """Forget the plan pairs (after cufft.clear_plans destroyed the plans) and their info buffers."""
    with _lock:
        _pairs.clear()
        failed.clear()


def _dev_id():
    from numba import cuda

    return int(cuda.get_current_device().id)


def _ptr(a):
    return 0 if a is None else int(a.__cuda_array_interface__["data"][0])


def forward(kind, ud, K, S, new_out, pre, post, bias, N, L, Lout, start):
    """y ((B, H, Lout) element kind, from ``new_out()``) for u (ud, (B, H, L)); K the cached filter spectrum
    (1, H, 2F); S the scratch spectrum (B, H, 2F); pre / post / bias device arrays or None. Returns None (and
    records why in ``failed``) when the callback plans cannot be made here."""
    from numba import cuda

    from numba_kernels.cuda import cufft

    B, H = ud.shape[0], ud.shape[1]
    cfg = (kind, int(N), int(L), int(Lout), int(start) % int(N), int(H), pre is not None, post is not None,
           bias is not None)
    key = (cfg, B * H, _dev_id())
    pair = _pairs.get(key)
    if pair is None:
        if key in failed:
            return None
        with _lock:
            try:
                pair = _pairs.get(key)
                if pair is None:
                    cc = cuda.get_current_device().compute_capability
                    pair = _pairs[key] = _Pair(cfg, B * H, kind == "f64", cc)
            except Exception as e:  # no JIT callbacks, NVRTC / nvJitLink failure, compile error
                failed[key] = f"{type(e).__name__}: {e}"
                return None
    out = new_out()
    dbl = kind == "f64"
    with pair.lock:  # threads share the pair (and its info buffer); each has its own scratch S
        pair.set_info((_ptr(K), _ptr(pre), _ptr(post), _ptr(bias), _ptr(ud)))
        cufft.exec_plan(pair.r2c, False, dbl, _ptr(ud), _ptr(S))
        cufft.exec_plan(pair.c2r, True, dbl, _ptr(S), _ptr(out))
    return out


def emulate(kind, u, K, pre, post, bias, N, L, Lout, start, H):
    """Host emulation of the two callback transforms (numpy FFT, every offset through the Python callbacks):
    u (B, H, L) element kind, K (H, F) complex -> y (B, H, Lout). For tests under the simulator."""
    B = u.shape[0]
    R, F = B * H, N // 2 + 1
    cb = make_callbacks(kind, N, L, Lout, start % N, H, pre is not None, post is not None, bias is not None)
    flat = [K.reshape(-1), None if pre is None else pre.reshape(-1), None if post is None else post.reshape(-1),
            bias, u.reshape(-1)]
    x = np.array([cb[0](flat[U], o, flat, None) for o in range(R * N)]).reshape(R, N)
    S = np.fft.rfft(x, axis=-1).reshape(-1)
    X = np.array([cb[1](S, o, flat, None) for o in range(R * F)]).reshape(R, F)
    v = np.fft.irfft(X, n=N, axis=-1).reshape(-1) * N
    y = np.zeros(R * Lout, u.dtype)
    for o in range(R * N):
        cb[2](y, o, v[o], flat, None)
    return y.reshape(B, H, Lout)
