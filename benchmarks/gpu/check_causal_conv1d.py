"""On the GPU machine: correctness of every CUDA causal_conv1d path (forward, update, backward; all options
and dtypes) against the float64 reference, then forward / update bandwidth next to a same-run device copy
and a torch peer (depthwise F.conv1d with left padding). Prints a table last.

``--sim``: correctness only, tiny shapes, under the CUDA simulator (no GPU needed)."""
import os
import sys
import time

SIM = "--sim" in sys.argv
if SIM:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Checks, import_library  # noqa: E402
from _common import tbench as _tbench  # noqa: E402

nk = import_library()
from numba_kernels._dispatch import bfloat16  # noqa: E402
from numba_kernels.reference.causal_conv1d import (causal_conv1d_backward_ref, causal_conv1d_ref,  # noqa: E402
                                                    causal_conv1d_update_ref)

rng = np.random.default_rng(int(time.time()))


def tbench(fn, iters=30):
    return _tbench(fn, iters)


CHECKS = Checks(width=34)
err, report, fails = CHECKS.err, CHECKS.report, CHECKS.fails


def inputs(dt, B, D, L, W):
    x = rng.standard_normal((B, D, L)).astype(dt)
    w = (rng.standard_normal((D, W)) / np.sqrt(W)).astype(dt)
    b = rng.standard_normal(D).astype(dt)
    s0 = rng.standard_normal((B, D, W - 1)).astype(dt)
    seq = np.sort(rng.integers(0, 3, size=(B, L)), axis=1).astype(np.int32)
    return x, w, b, s0, seq


def correctness():
    B, D, L = (2, 3, 13) if SIM else (2, 64, 1025)
    opts = {"plain": (False, None, False, False), "bias+silu": (True, "silu", False, False),
            "init+final": (False, None, True, False), "seq": (False, None, False, True),
            "all": (True, "silu", True, True)}
    for dt in (np.float32, np.float16, bfloat16) + (() if SIM else (np.float64,)):
        for W in ((1, 4) if SIM else (1, 2, 4, 7)):
            x, w, b, s0, seq = inputs(dt, B, D, L, W)
            for name, (ub, act, ui, us) in opts.items():
                if SIM and name not in ("plain", "all"):
                    continue
                kw = dict(bias=b if ub else None, activation=act, initial_states=s0 if ui else None,
                          seq_idx=seq if us else None)
                t = time.perf_counter()
                out, fin = nk.causal_conv1d(x, w, return_final_states=True, backend="cuda", **kw)
                dtc = time.perf_counter() - t
                ref, rfin = causal_conv1d_ref(x, w, return_final_states=True, **kw)
                report(f"fwd {name} W{W}", dt, max(err(out, ref), err(fin, rfin)), f"({dtc:.1f}s incl. compile)")
                dout = rng.standard_normal(x.shape).astype(dt)
                dfin = rng.standard_normal(s0.shape).astype(dt) if ui else None
                g = nk.causal_conv1d_backward(dout, x, w, dfinal_states=dfin, backend="cuda", **kw)
                rg = causal_conv1d_backward_ref(dout, x, w, dfinal_states=dfin, **kw)
                report(f"bwd {name} W{W}", dt, max(err(a, r) for a, r in zip(g, rg) if r is not None))
            for circ in (False, True):  # decode steps == the scan
                state = np.concatenate([np.zeros((B, D, 2), dt), s0], axis=2)
                S = state.shape[2]
                if circ:
                    ring = np.zeros_like(state)
                    for k in range(W - 1):
                        ring[:, :, (5 - (W - 1) + k) % S] = s0[:, :, k]
                    state = ring
                outs = []
                for t in range(min(L, 9)):
                    cs = np.full(B, 5 + t, np.int32) if circ else None
                    outs.append(nk.causal_conv1d_update(np.ascontiguousarray(x[:, :, t]), state, w, b, "silu", cs,
                                                        backend="cuda"))
                ref = causal_conv1d_ref(x[:, :, :len(outs)], w, b, "silu", s0)
                report(f"update x{len(outs)} {'circular' if circ else 'shift'} W{W}", dt,
                       err(np.stack(outs, axis=2), ref))
    from numba import cuda
    x, w, b, s0, seq = inputs(np.float32, B, D, L, 4)
    o = nk.causal_conv1d(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), "silu")
    ok = hasattr(o, "copy_to_host")
    print(f"{'ok ' if ok else 'BAD'} device in -> device out ({type(o).__name__})")
    if not ok:
        fails.append("device out")


def bench():
    import torch
    import torch.nn.functional as F
    from numba import cuda

    from numba_kernels.cuda import causal_conv1d as ccc

    x = torch.randn(2 ** 30 // 4, device="cuda")
    y = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 4 / tbench(lambda: y.copy_(x), 10) / 1e9
    del x, y
    rows = [f"device copy (torch, 1 GiB): {copy_bw:.0f} GB/s (read + write)"]
    print(rows[0], flush=True)
    B, D, W = 8, 4096, 4
    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for name, dt in (("bf16", bfloat16), ("fp32", np.dtype(np.float32))):
        isz = np.dtype(dt).itemsize
        wt = torch.randn(D, W, device="cuda") / 2
        bt = torch.randn(D, device="cuda")
        wd, bd = cuda.as_cuda_array(wt), cuda.as_cuda_array(bt)
        wpeer, bpeer = wt.to(tdt[name]).unsqueeze(1), bt.to(tdt[name])

        def dev(t):  # torch tensor -> numba device array in the kernel element type (bf16: uint16 bits)
            return cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16) if name == "bf16" else cuda.as_cuda_array(t)

        for L in (2048, 8192):
            xt = torch.randn(B, D, L, device="cuda", dtype=tdt[name])
            ot = torch.empty_like(xt)
            xd, od = dev(xt), dev(ot)
            nbytes = 2 * B * D * L * isz + D * W * 4 + D * 4
            for act in (None, "silu"):
                t = tbench(lambda: ccc.conv_fwd_cuda(xd, wd, bd, None, None, act is not None, False, dt, out=od))
                rows.append(f"fwd  {name} B{B} D{D} L{L} W{W} act={act}: ours {nbytes / t / 1e9:6.0f} GB/s "
                            f"({100 * nbytes / t / 1e9 / copy_bw:3.0f}% of copy) {t * 1e6:7.1f} us")
                print(rows[-1], flush=True)
            ref = F.conv1d(F.pad(xt, (W - 1, 0)), wpeer, bpeer, groups=D)
            ccc.conv_fwd_cuda(xd, wd, bd, None, None, False, False, dt, out=od)
            torch.cuda.synchronize()
            e = float((ot.float() - ref.float()).abs().max() / ref.float().abs().max())
            tp = tbench(lambda: F.conv1d(F.pad(xt, (W - 1, 0)), wpeer, bpeer, groups=D))
            rows.append(f"     torch F.conv1d(groups=D, left pad): {nbytes / tp / 1e9:6.0f} GB/s {tp * 1e6:7.1f} us; "
                        f"ours vs torch max rel diff {e:.1e}")
            print(rows[-1], flush=True)
            del xt, ot
        # decode: one token per (b, d); conv_state (B, D, W - 1) read and written
        xs = torch.randn(B, D, 1, device="cuda", dtype=tdt[name])
        st = torch.randn(B, D, W - 1, device="cuda", dtype=tdt[name])
        os_ = torch.empty_like(xs)
        xsd, std, osd = dev(xs), dev(st), dev(os_)
        nbytes = 2 * B * D * isz + 2 * B * D * (W - 1) * isz + D * W * 4 + D * 4
        t = tbench(lambda: ccc.conv_update_cuda(xsd, std, wd, bd, None, True, dt, out=osd), 100)
        rows.append(f"upd  {name} B{B} D{D} W{W} 1 token: ours {nbytes / t / 1e9:6.0f} GB/s {t * 1e6:6.1f} us")
        print(rows[-1], flush=True)
        wv = wt.to(tdt[name])

        def torch_update():
            win = torch.cat([st, xs], dim=-1)  # (B, D, W)
            st.copy_(win[:, :, 1:])
            return F.silu((win * wv).sum(-1) + bpeer)

        tp = tbench(torch_update, 100)
        rows.append(f"     torch cat + mul-sum + silu update:   {nbytes / tp / 1e9:6.0f} GB/s {tp * 1e6:6.1f} us")
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    print(f"numba_kernels from {os.path.dirname(nk.__file__)}; simulator={SIM}", flush=True)
    correctness()
    rows = [] if SIM else bench()
    print("\n==== summary ====")
    for r in rows:
        print(r)
    print("correctness:", "all ok" if not fails else f"FAILED {fails}")
    sys.exit(1 if fails else 0)
