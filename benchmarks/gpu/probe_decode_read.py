"""On the GPU machine: where the decode kernel's bandwidth goes. Streams the bf16 decode K/V bytes through
kernels that do the tensor-core decode kernel's loads (warp-private cp.async rings of 16-key tiles, one block
per (sequence, k/v head, split)) and no math, for the cache layouts (seq-major (B, S, Hk, D) = ours, head-major
(B, Hk, S, D) = SDPA's) and ring depths; next to a same-run device copy, a torch read-only reduction, our
decode kernel and SDPA on the same shape.

``python probe_decode_read.py [ncu]``  (``ncu``: run ours and SDPA once each, for an ncu wrapper). Always: the
cp.async warp ring and register-staged 16-byte loads (plain and software-pipelined); PROBE_BULK=1 adds
cp.async.bulk (TMA) rings, PROBE_LDG=1 the load-flavour sweep, PROBE_COOP=1 block-cooperative cp.async tiles.
Logs: benchmarks/results/gpu_h200_2026-12-02b_decode_read_probe*.txt (earlier runs had more configurations on
by default)."""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_library  # noqa: E402

nk = import_library()
from numba import cuda, int64, uint32  # noqa: E402

from numba_kernels.cuda import _intrinsics as intr  # noqa: E402
from numba_kernels.cuda import _launch as fl  # noqa: E402
from numba_kernels.cuda._decode_kernels import _cp_wait, make_cp16  # noqa: E402

STR, CH = 68, 16  # D 128 bf16: 64 words per row (+4 pad), 16 chunks of 16 bytes


@cuda.jit(device=True, inline=True)
def _ids(S, nsplit):
    """(thread, warp, lane, split, k/v head, sequence, keys per split, first key) of a probe block."""
    tid = cuda.threadIdx.x
    chunk = S // nsplit
    return tid, tid // 32, tid % 32, cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z, chunk, cuda.blockIdx.x * chunk


@cuda.jit(device=True, inline=True)
def _row_seq(b, h, p, S, Hk):
    """Word offset of key p of k/v head h, sequence b, in a seq-major (B, S, Hk, 64 words) cache."""
    return ((int64(b) * S + p) * Hk + h) * 64


@cuda.jit(device=True, inline=True)
def _row_head(b, h, p, S, Hk):
    """The same in a head-major (B, Hk, S, 64 words) cache."""
    return ((int64(b) * Hk + h) * S + p) * 64


def make_stream(NW, STAGES, BC, head_major):
    """A read-only kernel with the decode kernel's load structure: each warp streams its own BC-key tiles
    (warp, warp + NW, ...) of one k/v head through a private STAGES-deep cp.async ring."""
    row = _row_head if head_major else _row_seq
    TILE = BC * STR
    WARP_W = STAGES * 2 * TILE
    wait = _cp_wait(STAGES - 1)
    NTH = 32 * NW
    cp16 = intr.cp_async16

    @cuda.jit(device=True, inline=True)
    def issue(smem, kc, vc, tt, dst, k0, b, hk, S, Hk, lane):
        for c in range(lane, BC * CH, 32):
            r = c // CH
            ch = c - r * CH
            p = k0 + tt * BC + r
            src = row(b, hk, p, S, Hk) + ch * 4
            cp16(smem, dst + r * STR + ch * 4, kc, src, 16)
            cp16(smem, dst + TILE + r * STR + ch * 4, vc, src, 16)

    def kern(kc, vc, S, Hk, nsplit, sink):
        tid, warp, lane, sp, hk, b, chunk, k0 = _ids(S, nsplit)
        smem = cuda.shared.array(0, uint32)
        acc = uint32(0)
        ntile = chunk // BC
        wbase = warp * WARP_W
        for s in range(STAGES - 1):
            tt = warp + s * NW
            if tt < ntile:
                issue(smem, kc, vc, tt, wbase + s * 2 * TILE, k0, b, hk, S, Hk, lane)
            intr.cp_async_commit()
        stage = 0
        it = warp
        while it < ntile:
            ahead = it + (STAGES - 1) * NW
            if ahead < ntile:
                sa = stage + STAGES - 1
                if sa >= STAGES:
                    sa -= STAGES
                issue(smem, kc, vc, ahead, wbase + sa * 2 * TILE, k0, b, hk, S, Hk, lane)
            intr.cp_async_commit()
            wait()
            intr.syncwarp()
            acc ^= smem[wbase + stage * 2 * TILE + lane]
            intr.syncwarp()
            stage += 1
            if stage == STAGES:
                stage = 0
            it += NW
        intr.cp_async_wait0()
        sink[(b * Hk + hk) * nsplit * NTH + sp * NTH + tid] = acc

    return cuda.jit(kern), NTH, 4 * NW * WARP_W


if intr.SIM:
    cp16_ef = intr.cp_async16
else:
    from llvmlite import ir
    from numba.cuda import types as _nbt
    from numba.cuda.extending import intrinsic

    #: cp.async 16 bytes with an L2 evict_first policy
    cp16_ef = make_cp16("{ .reg .b64 pol; createpolicy.fractional.L2::evict_first.b64 pol, 1.0; "
                        "cp.async.cg.shared.global.L2::cache_hint [$0], [$1], 16, $2, pol; }")


def _ld4(text):
    """A 16-byte global load ``text`` (an ld.global...v4.u32 variant) of arr[idx:idx + 4] -> 4 uint32."""
    if intr.SIM:
        return lambda arr, idx: (arr[idx], arr[idx + 1], arr[idx + 2], arr[idx + 3])

    @intrinsic
    def ld4(typingctx, arr, idx):
        sig = _nbt.UniTuple(_nbt.uint32, 4)(arr, idx)

        def codegen(context, builder, signature, args):
            ptr = intr._data_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
            i32 = ir.IntType(32)
            ret = ir.LiteralStructType([i32] * 4)
            fnty = ir.FunctionType(ret, [ir.IntType(64)])
            res = builder.call(ir.InlineAsm(fnty, text + " {$0,$1,$2,$3}, [$4];", "=r,=r,=r,=r,l", side_effect=True),
                               [builder.ptrtoint(ptr, ir.IntType(64))])
            return context.make_tuple(builder, signature.return_type, [builder.extract_value(res, i) for i in range(4)])

        return sig, codegen

    return ld4


LD_TEXTS = {"ld": "ld.global.v4.u32", "nc": "ld.global.nc.v4.u32", "nc_na": "ld.global.nc.L1::no_allocate.v4.u32",
            "nc_na_pf": "ld.global.nc.L1::no_allocate.L2::256B.v4.u32", "cs": "ld.global.cs.v4.u32"}


def make_ldg(TK, kind, head_major, NTH=128):
    """Register-staged read-only stream: each iteration a block loads TK keys of K and V of its (b, hk, split)
    with 16-byte loads into registers (all issued before any use), xor-reduced."""
    row = _row_head if head_major else _row_seq
    U = TK * CH // NTH
    NR = 8 * U
    ld4 = _ld4(LD_TEXTS[kind])

    def kern(kc, vc, S, Hk, nsplit, sink):
        tid, warp, lane, sp, hk, b, chunk, k0 = _ids(S, nsplit)
        acc = uint32(0)
        regs = cuda.local.array(NR, uint32)
        for kt in range(chunk // TK):
            for u in range(U):
                c = tid + u * NTH
                r = c // CH
                ch = c - r * CH
                p = k0 + kt * TK + r
                src = row(b, hk, p, S, Hk) + ch * 4
                regs[8 * u], regs[8 * u + 1], regs[8 * u + 2], regs[8 * u + 3] = ld4(kc, src)
                regs[8 * u + 4], regs[8 * u + 5], regs[8 * u + 6], regs[8 * u + 7] = ld4(vc, src)
            for x in range(NR):
                acc ^= regs[x]
        sink[((b * Hk + hk) * nsplit + sp) * NTH + tid] = acc

    return cuda.jit(kern), NTH, 0


def make_stream2(NW, STAGES, TK, head_major, all_heads, kv_phase, HK, ef=False):
    """Block-cooperative read-only stream: tiles of TK keys of one head (grid (ns, Hk, B)) or of TK keys x all
    HK heads (all_heads: grid (ns, 1, B)); kv_phase: K and V tiles are separate ring entries (K, V, K, ...),
    else each entry holds both. One block barrier per ring entry."""
    row = _row_head if head_major else _row_seq
    ROWS = TK * HK if all_heads else TK
    NARR = 1 if kv_phase else 2
    ENT = NARR * ROWS * STR
    NTH = 32 * NW
    wait = _cp_wait(STAGES - 1)
    cp16 = cp16_ef if ef else intr.cp_async16

    @cuda.jit(device=True, inline=True)
    def issue(smem, kc, vc, j, dst, k0, b, hk0, S, Hk, tid):
        kt = j // 2 if kv_phase else j
        for c in range(tid, ROWS * CH, NTH):
            r = c // CH
            ch = c - r * CH
            if all_heads:
                if head_major:
                    h = r // TK
                    p = k0 + kt * TK + (r - h * TK)
                else:
                    p = k0 + kt * TK + r // HK
                    h = r % HK
            else:
                h = hk0
                p = k0 + kt * TK + r
            src = row(b, h, p, S, Hk) + ch * 4
            if kv_phase:
                if j % 2 == 0:
                    cp16(smem, dst + r * STR + ch * 4, kc, src, 16)
                else:
                    cp16(smem, dst + r * STR + ch * 4, vc, src, 16)
            else:
                cp16(smem, dst + r * STR + ch * 4, kc, src, 16)
                cp16(smem, dst + ROWS * STR + r * STR + ch * 4, vc, src, 16)

    def kern(kc, vc, S, Hk, nsplit, sink):
        tid, warp, lane, sp, hk, b, chunk, k0 = _ids(S, nsplit)
        n = (chunk // TK) * (2 if kv_phase else 1)
        smem = cuda.shared.array(0, uint32)
        acc = uint32(0)
        for s in range(STAGES - 1):
            if s < n:
                issue(smem, kc, vc, s, s * ENT, k0, b, hk, S, Hk, tid)
            intr.cp_async_commit()
        stage = 0
        for j in range(n):
            ahead = j + STAGES - 1
            if ahead < n:
                sa = stage + STAGES - 1
                if sa >= STAGES:
                    sa -= STAGES
                issue(smem, kc, vc, ahead, sa * ENT, k0, b, hk, S, Hk, tid)
            intr.cp_async_commit()
            wait()
            cuda.syncthreads()
            acc ^= smem[stage * ENT + tid]
            cuda.syncthreads()
            stage += 1
            if stage == STAGES:
                stage = 0
        intr.cp_async_wait0()
        sink[((b * cuda.gridDim.y + hk) * nsplit + sp) * NTH + tid] = acc

    return cuda.jit(kern), NTH, 4 * STAGES * ENT


if not intr.SIM:
    def _mbar_op(text):
        """An mbarrier instruction ``text`` on (shared array, index) with one int32 operand ($1)."""
        @intrinsic
        def op(typingctx, arr, idx, val):
            sig = _nbt.void(arr, idx, val)

            def codegen(context, builder, signature, args):
                addr = intr._shared_addr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
                n = context.cast(builder, args[2], signature.args[2], _nbt.int32)
                fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(32), ir.IntType(32)])
                builder.call(ir.InlineAsm(fnty, text, "r,r", side_effect=True), [addr, n])
                return context.get_dummy_value()

            return sig, codegen

        return op

    mbar_init = _mbar_op("mbarrier.init.shared::cta.b64 [$0], $1;")
    mbar_expect = _mbar_op("{ .reg .b64 st; mbarrier.arrive.expect_tx.shared::cta.b64 st, [$0], $1; }")
    mbar_wait = _mbar_op("{ .reg .pred p; W${:uid}: mbarrier.try_wait.parity.shared::cta.b64 p, [$0], $1; "
                         "@!p bra W${:uid}; }")

    @intrinsic
    def bulk_g2s(typingctx, dst, dst_idx, src, src_idx, nbytes, bar, bar_idx):
        sig = _nbt.void(dst, dst_idx, src, src_idx, nbytes, bar, bar_idx)

        def codegen(context, builder, signature, args):
            d = intr._shared_addr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
            sp = intr._data_ptr(context, builder, signature.args[2], args[2], args[3], signature.args[3])
            n = context.cast(builder, args[4], signature.args[4], _nbt.int32)
            m = intr._shared_addr(context, builder, signature.args[5], args[5], args[6], signature.args[6])
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i32, ir.IntType(64), i32, i32])
            text = "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];"
            builder.call(ir.InlineAsm(fnty, text, "r,l,r,r", side_effect=True),
                         [d, builder.ptrtoint(sp, ir.IntType(64)), n, m])
            return context.get_dummy_value()

        return sig, codegen

    fence_init = intr._make_void_asm("fence.mbarrier_init.release.cluster;")
    fence_proxy = intr._make_void_asm("fence.proxy.async.shared::cta;")


def make_bulk(NW, STAGES, BC, head_major):
    """Warp-private ring of BC-key tiles filled by cp.async.bulk (TMA engine), one mbarrier per stage:
    seq-major: one 256-byte bulk copy per row (lanes < BC); head-major: one BC x 256-byte copy per array."""
    TILE = BC * 64            # no padding: bulk copies land dense
    WARP_W = STAGES * 2 * TILE
    NTH = 32 * NW
    NB = NW * STAGES

    @cuda.jit(device=True, inline=True)
    def issue(smem, kc, vc, bars, tt, s, wbase, warp, lane, k0, b, hk, S, Hk):
        """Tile tt into stage s: lane 0 arms the stage's barrier for the tile's bytes, then the copies."""
        bar = warp * STAGES + s
        if lane == 0:
            mbar_expect(bars, bar, 2 * BC * 256)
        if head_major:
            if lane == 0:
                src = _row_head(b, hk, k0 + tt * BC, S, Hk)
                bulk_g2s(smem, wbase + s * 2 * TILE, kc, src, BC * 256, bars, bar)
                bulk_g2s(smem, wbase + s * 2 * TILE + TILE, vc, src, BC * 256, bars, bar)
        elif lane < BC:
            src = _row_seq(b, hk, k0 + tt * BC + lane, S, Hk)
            bulk_g2s(smem, wbase + s * 2 * TILE + lane * 64, kc, src, 256, bars, bar)
            bulk_g2s(smem, wbase + s * 2 * TILE + TILE + lane * 64, vc, src, 256, bars, bar)

    def kern(kc, vc, S, Hk, nsplit, sink):
        tid, warp, lane, sp, hk, b, chunk, k0 = _ids(S, nsplit)
        smem = cuda.shared.array(0, uint32)
        bars = cuda.shared.array(NB, int64)
        if lane == 0:
            for s in range(STAGES):
                mbar_init(bars, warp * STAGES + s, 1)
        fence_init()
        intr.syncwarp()
        ntile = chunk // BC
        wbase = warp * WARP_W
        acc = uint32(0)
        for s in range(STAGES - 1):
            tt = warp + s * NW
            if tt < ntile:
                issue(smem, kc, vc, bars, tt, s, wbase, warp, lane, k0, b, hk, S, Hk)
        stage = 0
        ph = uint32(0)
        it = warp
        while it < ntile:
            ahead = it + (STAGES - 1) * NW
            if ahead < ntile:
                sa = stage + STAGES - 1
                if sa >= STAGES:
                    sa -= STAGES
                fence_proxy()
                issue(smem, kc, vc, bars, ahead, sa, wbase, warp, lane, k0, b, hk, S, Hk)
            mbar_wait(bars, warp * STAGES + stage, (ph >> stage) & 1)
            ph ^= uint32(1) << stage
            acc ^= smem[wbase + stage * 2 * TILE + lane]
            intr.syncwarp()
            stage += 1
            if stage == STAGES:
                stage = 0
            it += NW
        sink[((b * Hk + hk) * nsplit + sp) * NTH + tid] = acc

    return cuda.jit(kern), NTH, 4 * NW * WARP_W


def make_ldg_pipe(TK, kind, NTH=128):
    """Register-staged read-only stream, software-pipelined: tile t + 1's 16-byte loads are issued before tile
    t's registers are consumed (two register sets, two tiles per loop trip), seq-major layout."""
    U = TK * CH // NTH
    NR = 8 * U
    ld4 = _ld4(LD_TEXTS[kind])

    @cuda.jit(device=True, inline=True)
    def load(regs, kc, vc, kt, k0, b, hk, S, Hk, tid):
        for u in range(U):
            c = tid + u * NTH
            r = c // CH
            ch = c - r * CH
            src = _row_seq(b, hk, k0 + kt * TK + r, S, Hk) + ch * 4
            regs[8 * u], regs[8 * u + 1], regs[8 * u + 2], regs[8 * u + 3] = ld4(kc, src)
            regs[8 * u + 4], regs[8 * u + 5], regs[8 * u + 6], regs[8 * u + 7] = ld4(vc, src)

    def kern(kc, vc, S, Hk, nsplit, sink):
        tid, warp, lane, sp, hk, b, chunk, k0 = _ids(S, nsplit)
        acc = uint32(0)
        ra = cuda.local.array(NR, uint32)
        rb = cuda.local.array(NR, uint32)
        n = chunk // TK
        load(ra, kc, vc, 0, k0, b, hk, S, Hk, tid)
        for kt in range(0, n, 2):
            if kt + 1 < n:
                load(rb, kc, vc, kt + 1, k0, b, hk, S, Hk, tid)
            for x in range(NR):
                acc ^= ra[x]
            if kt + 2 < n:
                load(ra, kc, vc, kt + 2, k0, b, hk, S, Hk, tid)
            if kt + 1 < n:
                for x in range(NR):
                    acc ^= rb[x]
        sink[((b * Hk + hk) * nsplit + sp) * NTH + tid] = acc

    return cuda.jit(kern), NTH, 0


def main():
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import check_decode_attention as cda
    from numba_kernels.cuda.decode_attention import attend_cuda

    dtime = cda.dtime
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    tc = dtime(lambda: y.copy_(x))
    copy_bw = 2 * x.numel() / tc
    xf = x.view(torch.float32)
    tr = dtime(lambda: torch.sum(xf))
    print(f"device copy {copy_bw / 1e12:.2f} TB/s (read + write of 1 GiB) | torch.sum read "
          f"{x.numel() / tr / 1e12:.2f} TB/s", flush=True)
    del x, y, xf
    Hk, D = 8, 128
    for B, S in ((8, 32768), (32, 8192), (1, 131072)):
        kv = 2 * B * S * Hk * D * 2
        c = cda._setup(B, S, "contig")
        t_ours = dtime(lambda: attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16"))
        kt = c["k_t"].view(B, S, Hk, D).transpose(1, 2).contiguous()
        vt = c["v_t"].view(B, S, Hk, D).transpose(1, 2).contiguous()
        qt = torch.as_tensor(c["q"].view(np.int16), device="cuda").view(torch.bfloat16).transpose(1, 2).contiguous()
        t_sdpa = dtime(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
        print(f"B{B} S{S}: ours {t_ours * 1e6:.1f} us {kv / t_ours / 1e12:.2f} TB/s | SDPA {t_sdpa * 1e6:.1f} us "
              f"{kv / t_sdpa / 1e12:.2f} TB/s", flush=True)
        ku = cuda.as_cuda_array(c["k_t"].view(torch.int32)).reshape(-1)
        vu = cuda.as_cuda_array(c["v_t"].view(torch.int32)).reshape(-1)
        ku = ku.view(np.uint32)
        vu = vu.view(np.uint32)
        khu = cuda.as_cuda_array(kt.view(torch.int32)).reshape(-1).view(np.uint32)
        vhu = cuda.as_cuda_array(vt.view(torch.int32)).reshape(-1).view(np.uint32)
        for cfg in ((4, 3, 16),):
            nw, stg, bc = cfg
            kern, nth, smem = make_stream(nw, stg, bc, False)
            kernh, _, _ = make_stream(nw, stg, bc, True)
            line = []
            for ns in (2, 4, 8, 16):
                if B * Hk * ns < 64 or B * Hk * ns > 4096 or (S // ns) % bc:
                    continue
                sink = cuda.device_array(B * Hk * ns * nth, np.uint32)
                ts = dtime(lambda: fl.launch(kern, (ns, Hk, B), nth, smem, (ku, vu, S, Hk, ns, sink)), n=10)
                th = dtime(lambda: fl.launch(kernh, (ns, Hk, B), nth, smem, (khu, vhu, S, Hk, ns, sink)), n=10)
                line.append(f"ns{ns}: seq {kv / ts / 1e12:.2f} head {kv / th / 1e12:.2f}")
            print(f"  warp-ring nw{nw} st{stg} bc{bc} smem {smem // 1024}K | " + " | ".join(line), flush=True)
        for tk, kind, pipe in ((32, "nc_na", True), (64, "nc_na", True), (32, "nc_na", False), (64, "nc_na", False),
                               (16, "nc_na", True)):
            kern = (make_ldg_pipe(tk, kind) if pipe else make_ldg(tk, kind, False))[0]
            line = []
            for fake in (0, 100 * 1024, 70 * 1024):  # dynamic smem requested only to cap blocks per SM
                for ns in (2, 4, 8, 16):
                    nb = B * ns * Hk
                    if nb < 64 or nb > 8192 or (S // ns) % (2 * tk):
                        continue
                    sink = cuda.device_array(nb * 128, np.uint32)
                    t = dtime(lambda: fl.launch(kern, (ns, Hk, B), 128, fake, (ku, vu, S, Hk, ns, sink)), n=10)
                    line.append(f"smem{fake // 1024}K ns{ns} {kv / t / 1e12:.2f}")
            print(f"  ldg{' pipe' if pipe else ''} tk{tk} {kind} seq | " + " | ".join(line), flush=True)
        for nw, stg, bc in (() if not os.environ.get("PROBE_BULK") else ((4, 3, 16), (4, 4, 16))):
            line = []
            for hm in (False, True):
                kern, nth, smem = make_bulk(nw, stg, bc, hm)
                if smem > 227 * 1024:
                    continue
                arrs = (khu, vhu) if hm else (ku, vu)
                for ns in (2, 4, 8, 16):
                    nb = B * ns * Hk
                    if nb < 64 or nb > 8192 or (S // ns) % bc:
                        continue
                    sink = cuda.device_array(nb * nth, np.uint32)
                    t = dtime(lambda: fl.launch(kern, (ns, Hk, B), nth, smem, arrs + (S, Hk, ns, sink)), n=10)
                    line.append(f"{'head' if hm else 'seq'} ns{ns} {kv / t / 1e12:.2f}")
            print(f"  bulk nw{nw} st{stg} bc{bc} smem {smem // 1024}K | " + " | ".join(line), flush=True)
        for tk in ((64,) if os.environ.get("PROBE_LDG") else ()):
            for kind in ("ld", "nc_na", "nc_na_pf", "cs"):
                line = []
                for hm in (False, True):
                    kern, nth, smem = make_ldg(tk, kind, hm)
                    arrs = (khu, vhu) if hm else (ku, vu)
                    for ns in (2, 4, 8, 16, 32):
                        nb = B * ns * Hk
                        if nb < 64 or nb > 8192 or (S // ns) % tk:
                            continue
                        sink = cuda.device_array(nb * nth, np.uint32)
                        t = dtime(lambda: fl.launch(kern, (ns, Hk, B), nth, 0, arrs + (S, Hk, ns, sink)), n=10)
                        line.append(f"{'head' if hm else 'seq'} ns{ns} {kv / t / 1e12:.2f}")
                print(f"  ldg tk{tk} {kind} | " + " | ".join(line), flush=True)
        coop = ((4, 3, 128, False, True, False), (8, 2, 16, True, False, False))
        for nw, stg, tk, allh, kvp, ef in (coop if os.environ.get("PROBE_COOP") else ()):
            line = []
            for hm in (False, True):
                kern, nth, smem = make_stream2(nw, stg, tk, hm, allh, kvp, Hk, ef)
                if smem > 227 * 1024:
                    continue
                arrs = (khu, vhu) if hm else (ku, vu)
                for ns in (2, 4, 8, 16, 32):
                    nb = B * ns * (1 if allh else Hk)
                    if nb < 32 or nb > 4096 or (S // ns) % tk:
                        continue
                    sink = cuda.device_array(nb * nth, np.uint32)
                    grid = (ns, 1 if allh else Hk, B)
                    t = dtime(lambda: fl.launch(kern, grid, nth, smem, arrs + (S, Hk, ns, sink)), n=10)
                    line.append(f"{'head' if hm else 'seq'} ns{ns} {kv / t / 1e12:.2f}")
            print(f"  coop nw{nw} st{stg} tk{tk}{' allheads' if allh else ''}{' kvphase' if kvp else ''}"
                  f"{' evict_first' if ef else ''} smem {smem // 1024}K | " + " | ".join(line), flush=True)
        del c, kt, vt
        torch.cuda.empty_cache()


def ncu_once():
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import check_decode_attention as cda
    from numba_kernels.cuda.decode_attention import attend_cuda

    B, S, Hk, D = 8, 32768, 8, 128
    c = cda._setup(B, S, "contig")
    attend_cuda(c["plan"], c["qd"], c["kc"], c["vc"], *c["meta"], "bf16")
    kt = c["k_t"].view(B, S, Hk, D).transpose(1, 2).contiguous()
    vt = c["v_t"].view(B, S, Hk, D).transpose(1, 2).contiguous()
    qt = torch.as_tensor(c["q"].view(np.int16), device="cuda").view(torch.bfloat16).transpose(1, 2).contiguous()
    F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    t0 = time.time()
    if "ncu" in sys.argv:
        ncu_once()
    else:
        main()
    print(f"done in {time.time() - t0:.1f} s")
