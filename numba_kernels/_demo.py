"""``python -m numba_kernels``: check every implemented op on every available backend against the float64
reference on random inputs, and time it next to a naive NumPy baseline. Prints a table."""
import time

import numpy as np

from numba_kernels import _dispatch as dsp


def _median_time(fn, repeats=3):
    fn()  # warm-up: JIT compile and caches stay out of the numbers
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _naive_attention(q, k, v, causal):
    """What one writes in NumPy: materialize the scores per batch, softmax, multiply by V."""
    B, Sq, H, D = q.shape
    rep = H // k.shape[2]
    out = np.empty_like(q)
    for b in range(B):
        qh = q[b].transpose(1, 0, 2)  # (H, Sq, D)
        kh = np.repeat(k[b].transpose(1, 0, 2), rep, axis=0)
        vh = np.repeat(v[b].transpose(1, 0, 2), rep, axis=0)
        s = qh @ kh.transpose(0, 2, 1) / np.sqrt(D)
        if causal:
            s = np.where(np.tril(np.ones(s.shape[1:], bool), k.shape[1] - Sq), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b] = ((p / p.sum(-1, keepdims=True)) @ vh).transpose(1, 0, 2)
    return out


def _naive_conv(x, w, b):
    """Causal depthwise conv + SiLU in NumPy: one shifted multiply-add per tap."""
    W = w.shape[1]
    xp = np.pad(x, ((0, 0), (0, 0), (W - 1, 0)))
    y = sum(w[None, :, j, None] * xp[:, :, j: j + x.shape[2]] for j in range(W)) + b[None, :, None]
    return y / (1 + np.exp(-y))


def _decode_case(rng, backend):
    """One decode step against a paged KV cache (page 16): append a token, attend causally."""
    from numba_kernels import flash_attention_with_kvcache
    from numba_kernels.reference.decode_attention import flash_attention_with_kvcache_ref

    B, S, H, Hk, D, page = 4, 4096, 32, 8, 128, 16
    dt = np.float32 if backend == "cpu" else dsp.bfloat16
    nb = B * S // page
    kc, vc = (rng.standard_normal((nb, page, Hk, D)).astype(dt) for _ in range(2))
    bt = rng.permutation(nb).reshape(B, -1).astype(np.int32)
    q = rng.standard_normal((B, 1, H, D)).astype(dt)
    kn, vn = (rng.standard_normal((B, 1, Hk, D)).astype(dt) for _ in range(2))
    seqlens = np.full(B, S - 1, np.int32)
    if backend == "cuda":
        from numba import cuda

        kc, vc = (cuda.to_device(x.view(np.uint16)) for x in (kc, vc))

    def run():
        return flash_attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=bt, causal=True,
                                            backend=backend)

    def host(x):
        return dsp.to_host(x, dt)

    def check(out):
        return flash_attention_with_kvcache_ref(q, host(kc).copy(), host(vc).copy(), kn, vn, cache_seqlens=seqlens,
                                                block_table=bt, causal=True)

    def naive():
        kh, vh = (host(x)[bt].reshape(B, S, Hk, D).astype(np.float32) for x in (kc, vc))
        return _naive_attention(q.astype(np.float32), kh, vh, True)

    return ("flash_attention_with_kvcache (decode, paged 16)", backend, np.dtype(dt).name,
            f"B{B} cache {S} H{H} Hk{Hk} D{D}", run, check, naive, 4.0 * B * H * S * D)


def _cases(backends):
    from numba_kernels import flash_attention, flash_attention_varlen
    from numba_kernels.reference.flash_attention import flash_attention_ref, flash_attention_varlen_ref

    rng = np.random.default_rng()
    for backend in backends:
        big = backend == "cuda"
        for dt, (B, S, H, D) in ([(np.float32, (1, 1024, 8, 64))] +
                                 ([(dsp.bfloat16, (4, 4096, 16, 128))] if big else [])):
            for causal in (False, True):
                q, k, v = (rng.standard_normal((B, S, H, D)).astype(dt) for _ in range(3))
                flops = 4 * B * H * S * S * D / (2 if causal else 1)

                def run(q=q, k=k, v=v, causal=causal, backend=backend):
                    return flash_attention(q, k, v, causal=causal, backend=backend)

                def check(out, q=q, k=k, v=v, causal=causal):
                    return flash_attention_ref(q, k, v, causal=causal)

                def naive(q=q, k=k, v=v, causal=causal):
                    return _naive_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), causal)

                yield ("flash_attention" + (" causal" if causal else ""), backend, np.dtype(dt).name,
                       f"B{B} S{S} H{H} D{D}", run, check, naive, flops)
        if backend == "cpu":  # the attention backward has no CUDA kernel yet
            from numba_kernels import flash_attention_backward
            from numba_kernels.reference.flash_attention_backward import flash_attention_backward_ref

            q, k, v, do = (rng.standard_normal((1, 1024, 8, 64)).astype(np.float32) for _ in range(4))
            out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="cpu")
            yield ("flash_attention_backward causal", backend, "float32", "B1 S1024 H8 D64",
                   lambda a=(do, q, k, v, out, lse): np.concatenate([g.ravel() for g in flash_attention_backward(
                       *a, causal=True, backend="cpu")]),
                   lambda res, a=(do, q, k, v, out, lse): np.concatenate([g.ravel() for g in flash_attention_backward_ref(
                       *a, causal=True)]), None, 2.5 * 4 * 8 * 1024 * 1024 * 64 / 2)
        from numba_kernels import causal_conv1d
        from numba_kernels.reference.causal_conv1d import causal_conv1d_ref

        for dt in [np.float32] + ([dsp.bfloat16] if backend == "cuda" else []):
            x = rng.standard_normal((4, 1024, 2048)).astype(dt)
            w = rng.standard_normal((1024, 4)).astype(np.float32)
            bias = rng.standard_normal(1024).astype(np.float32)
            yield ("causal_conv1d silu", backend, np.dtype(dt).name, "B4 D1024 L2048 W4",
                   lambda x=x, w=w, bias=bias, backend=backend: causal_conv1d(x, w, bias, activation="silu",
                                                                              backend=backend),
                   lambda res, x=x, w=w, bias=bias: causal_conv1d_ref(x, w, bias, activation="silu"),
                   lambda x=x, w=w, bias=bias: _naive_conv(x.astype(np.float32), w, bias), 2.0 * x.size * 4)
        yield _decode_case(rng, backend)
        lens = np.array([300, 17, 700, 1])
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        q, k, v = (rng.standard_normal((cu[-1], 8, 64)).astype(np.float32) for _ in range(3))
        flops = float(4 * 8 * 64 * (lens ** 2).sum() / 2)
        yield ("flash_attention_varlen causal", backend, "float32", f"4 seqs, {cu[-1]} tokens, H8 D64",
               lambda q=q, k=k, v=v, cu=cu, backend=backend: flash_attention_varlen(q, k, v, cu, cu, causal=True,
                                                                                    backend=backend),
               lambda out, q=q, k=k, v=v, cu=cu: flash_attention_varlen_ref(q, k, v, cu, cu, causal=True), None, flops)


def main(argv=None):
    from tqdm import tqdm

    backends = ["cpu"] + (["cuda"] if dsp.cuda_available() else [])
    cases = list(_cases(backends))
    rows = []
    for name, backend, dt, shape, run, check, naive, flops in tqdm(cases, desc="checking ops", unit="case"):
        t = _median_time(run)
        out = dsp.to_host(run(), np.dtype(dt) if dt != "bfloat16" else dsp.bfloat16)
        ref = check(out)
        err = float(np.max(np.abs(np.asarray(out, dtype=np.float64) - ref)) / max(1.0, np.max(np.abs(ref))))
        t_naive = _median_time(naive, repeats=1) if naive is not None else None
        rows.append((name, backend, dt, shape, err, t, flops / t / 1e9,
                     f"{t_naive / t:.1f}x" if t_naive else "-"))
    head = ("op", "backend", "dtype", "shape", "max rel err", "time", "GFLOP/s", "vs naive NumPy")
    table = [head] + [(r[0], r[1], r[2], r[3], f"{r[4]:.1e}", f"{r[5] * 1e3:.2f} ms", f"{r[6]:.1f}", r[7])
                      for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    print()
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nbackends checked: {', '.join(backends)}"
          + ("" if "cuda" in backends else " (no CUDA GPU found: the cuda backend was skipped)"))
    return 0
