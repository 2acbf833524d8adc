"""Where the CUDA fft_conv time goes: raw cuFFT R2C / C2R in place (our layout) vs out of place vs torch.fft,
and the public call's host (enqueue) time, for the issue-6 shapes. GPU only; torch is a peer / buffer source.

    python benchmarks/gpu/probe_fft_parts.py
"""
import ctypes
import os
import sys
import time

import numpy as np
import torch
from numba import cuda

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_library, tbench  # noqa: E402

nk = import_library()
from numba_kernels.cuda import cufft  # noqa: E402


def oop_plan(N, rows, inverse):
    L = cufft.lib()
    F = N // 2 + 1
    arr = ctypes.c_int * 1
    h = ctypes.c_int()
    inem, idist, onem, odist = (arr(F), F, arr(N), N) if inverse else (arr(N), N, arr(F), F)
    kind = cufft.C2R if inverse else cufft.R2C
    cufft._check("cufftPlanMany", L.cufftPlanMany(ctypes.byref(h), 1, arr(N), inem, 1, idist, onem, 1, odist,
                                                  kind, int(rows)))
    return h.value


def main():
    print(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M"), flush=True)
    L = cufft.lib()
    for B, H, Lx in [(64, 768, 256), (64, 768, 1024), (64, 768, 8192), (16, 768, 65536), (1, 768, 1 << 20)]:
        N = 1 << (2 * Lx - 2).bit_length()
        F = N // 2 + 1
        rows = B * H
        torch.cuda.empty_cache()
        buf = torch.zeros(rows, 2 * F, device="cuda")
        t_in_f = tbench(lambda: cufft.exec_inplace(buf.data_ptr(), N, rows, False, False))
        t_in_i = tbench(lambda: cufft.exec_inplace(buf.data_ptr(), N, rows, True, False))
        xr = torch.randn(rows, N, device="cuda")
        xc = torch.zeros(rows, F, 2, device="cuda")
        pf, pi = oop_plan(N, rows, False), oop_plan(N, rows, True)
        t_oop_f = tbench(lambda: L.cufftExecR2C(pf, ctypes.c_void_p(xr.data_ptr()), ctypes.c_void_p(xc.data_ptr())))
        t_oop_i = tbench(lambda: L.cufftExecC2R(pi, ctypes.c_void_p(xc.data_ptr()), ctypes.c_void_p(xr.data_ptr())))
        L.cufftDestroy(pf)
        L.cufftDestroy(pi)
        u = torch.randn(B, H, Lx, device="cuda")
        U = torch.fft.rfft(u, n=N)
        t_tf = tbench(lambda: torch.fft.rfft(u, n=N))
        t_ti = tbench(lambda: torch.fft.irfft(U, n=N))
        del xr, xc, buf, U
        k = torch.randn(H, Lx, device="cuda") / Lx ** 0.5
        ud, kd = cuda.as_cuda_array(u), cuda.as_cuda_array(k)
        nk.fft_conv(ud, kd, backend="cuda", fft_size=N)
        t_call = tbench(lambda: nk.fft_conv(ud, kd, backend="cuda", fft_size=N))
        torch.cuda.synchronize()
        hs = []
        for _ in range(10):
            t0 = time.perf_counter()
            nk.fft_conv(ud, kd, backend="cuda", fft_size=N)
            hs.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        gb = rows * N * 4 * 3 / 1e9  # real in + complex out (~same bytes)
        print(f"B{B} H{H} L{Lx} N{N}: inplace R2C {t_in_f * 1e3:.3f} C2R {t_in_i * 1e3:.3f} ms | out-of-place R2C "
              f"{t_oop_f * 1e3:.3f} C2R {t_oop_i * 1e3:.3f} ms | torch rfft(n) {t_tf * 1e3:.3f} irfft {t_ti * 1e3:.3f} ms"
              f" | nk.fft_conv device {t_call * 1e3:.3f} ms, host enqueue {np.median(hs) * 1e3:.3f} ms "
              f"| R2C GB moved ~{gb:.2f}", flush=True)
        nk.clear_fft_conv_cache()


def fused_threads():
    """The fused shared-memory kernel at each register-pass width (device time of the public call, first-call
    compile time) next to the kernel path (pad / cuFFT / multiply / cuFFT / crop) and torch.fft."""
    from numba_kernels.cuda import _fft_conv_fused as fz
    from numba_kernels.cuda import fft_conv as cfc

    for B, H, Lx, rmaxes in [(64, 768, 256, (3,)), (64, 768, 1024, (3, 4)), (64, 768, 4096, (3, 4)),
                             (64, 768, 8192, (4,))]:
        N = 1 << (2 * Lx - 2).bit_length()
        u = torch.randn(B, H, Lx, device="cuda")
        k = torch.randn(H, Lx, device="cuda") / Lx ** 0.5
        ud, kd = cuda.as_cuda_array(u), cuda.as_cuda_array(k)
        kf = torch.fft.rfft(k, n=N)
        t_torch = tbench(lambda: torch.fft.irfft(torch.fft.rfft(u, n=N) * kf, n=N)[..., :Lx])
        ref = torch.fft.irfft(torch.fft.rfft(u, n=N) * kf, n=N)[..., :Lx]
        saved = cfc.FUSED_MAX_N
        cfc.FUSED_MAX_N = 0
        t_kern = tbench(lambda: nk.fft_conv(ud, kd, backend="cuda", fft_size=N))
        cfc.FUSED_MAX_N = saved
        row = [f"torch {t_torch * 1e3:.3f} ms", f"kernels {t_kern * 1e3:.3f} ms"]
        for rm in rmaxes:
            fz.RMAX = rm
            try:
                t0 = time.perf_counter()
                y = nk.fft_conv(ud, kd, backend="cuda")
                torch.cuda.synchronize()
                tc = time.perf_counter() - t0
                e = float((torch.as_tensor(y, device="cuda") - ref).abs().max() / ref.abs().max())
                t = tbench(lambda: nk.fft_conv(ud, kd, backend="cuda"))
                row.append(f"fused r{rm} (NT {fz.threads(N)}) {t * 1e3:.3f} ms = {t_torch / t:.2f}x torch, "
                           f"1st call {tc:.1f} s, err {e:.1e}")
            except Exception as ex:
                row.append(f"fused r{rm} {type(ex).__name__}: {str(ex)[:200]}")
        fz.RMAX = 3
        print(f"B{B} H{H} L{Lx} N{N}: " + " | ".join(row), flush=True)
        nk.clear_fft_conv_cache()


if __name__ == "__main__":
    import sys

    if "fused" in sys.argv:
        fused_threads()
    else:
        main()
