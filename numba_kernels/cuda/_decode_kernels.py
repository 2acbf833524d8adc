"""Decode attention CUDA kernels (cached factories); the host side is ``numba_kernels.cuda.decode_attention``.

All kernels read the cache through a page table: position p of sequence b is slot ``p % page`` of page
``table[b, p // page]`` (a contiguous cache is a paged one with one page per cache row), so every page size
works. One block owns the query rows of one k/v head (its GQA group's query heads x the query tokens,
packed as row R = g * Sq + i), so each K/V byte is read once per block, and one key split of the sequence.

* ``make_decode_tc`` (float16/bfloat16, head dim a multiple of 8): 16 packed rows per block on tensor cores
  (mma.sync m16n8k16). The warps split the keys: each warp streams its own 16-key tiles through a private
  pipeline (no block barrier in the loop): cp.async rings, or (the default up to head dim 128) 16-byte loads
  into registers stored to two shared buffers a tile later; it keeps its own online softmax, and the warps'
  (max, sum, O) are merged through shared memory at the end. Tile variants are factory parameters (keys per
  tile, stages, L2 prefetch hint, Q fragments in registers, early page lookups, K/V through registers, the
  LEAN instruction cuts: the kernel is issue-bound); the H200 sweeps are in BENCHMARKS.md.
* ``make_decode_direct`` (the same, head dim <= 128): K/V loaded straight into mma fragment registers, no
  shared-memory stage (notes below, at the factory).
The CUDA-core decode kernel, the split merge and the rotary/append kernels are in ``_decode_simt``.
"""
import functools
import math

from numba import cuda, float32, int32, int64, uint32

from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._attn_common import (F32_LN2, F32_LOG2E, F32_NEG_INF, F32_ZERO, LAZY_LOG2, dev, jit_kernel,
                                             key_range, make_online_softmax, make_tc_helpers)
from numba_kernels.cuda._intrinsics import ex2, shfl_idx, shfl_xor, syncwarp
from numba_kernels.cuda._scan_intrinsics import ld4, st16

if intr.SIM:
    def _cp_wait(n):
        return lambda: None

    cp16_pf = intr.cp_async16

    def make_cp16(text):
        return intr.cp_async16
else:
    from llvmlite import ir
    from numba.cuda import types as _nbt
    from numba.cuda.extending import intrinsic

    def _cp_wait(n):
        return intr._make_void_asm(f"cp.async.wait_group {n};")

    def make_cp16(text):
        """An ``intr.cp_async16``-like copy (dst, dst_idx, src, src_idx, nbytes) with the asm ``text``
        ($0 shared address, $1 global address, $2 source bytes)."""
        @intrinsic
        def cp16(typingctx, dst, dst_idx, src, src_idx, nbytes):
            sig = _nbt.void(dst, dst_idx, src, src_idx, nbytes)

            def codegen(context, builder, signature, args):
                dst_addr = intr._shared_addr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
                sptr = intr._data_ptr(context, builder, signature.args[2], args[2], args[3], signature.args[3])
                n = context.cast(builder, args[4], signature.args[4], _nbt.int32)
                i32 = ir.IntType(32)
                fnty = ir.FunctionType(ir.VoidType(), [i32, ir.IntType(64), i32])
                asm = ir.InlineAsm(fnty, text, "r,l,r", side_effect=True)
                builder.call(asm, [dst_addr, builder.ptrtoint(sptr, ir.IntType(64)), n])
                return context.get_dummy_value()

            return sig, codegen

        return cp16

    #: ``intr.cp_async16`` with an L2 prefetch hint of 256 bytes (the whole K/V row around the chunk)
    cp16_pf = make_cp16("cp.async.cg.shared.global.L2::256B [$0], [$1], 16, $2;")


#: most key splits one call may use (the fused split merge keeps 16 x MAX_SPLITS weights in shared memory)
MAX_SPLITS = 256


@dev
def split_range(Sq, Sk, left, right, sp, nsplit, align):
    """Keys [k0, k1) of split ``sp`` of ``nsplit``: the visible range cut into ``align``-aligned pieces."""
    lo, hi = key_range(0, Sq, Sq, Sk, left, right)
    n = hi - lo
    if n < 0:
        n = 0
    chunk = (n + nsplit - 1) // nsplit
    chunk = ((chunk + align - 1) // align) * align
    k0 = lo + sp * chunk
    k1 = min(hi, k0 + chunk)
    return k0, k1


@dev
def page_of(p, P, LEAN):
    """(page, slot) of position p >= 0 in pages of P rows; LEAN: a 32-bit unsigned division (positions and page
    sizes are < 2^31), not a 64-bit floor division."""
    if LEAN:
        pg = int64(uint32(p) // uint32(P))
    else:
        pg = p // P
    return pg, p - pg * P


@dev
def packed_row(R, Sq, hk, G):
    """Packed row R of k/v head hk -> (query token i, query head h)."""
    g = R // Sq
    return R - g * Sq, hk * G + g


#: splits the wide merge (``make_decode_finish(WIDE=True)``, LEAN bit 8) loads at once per item; off in the shipped
#: tiles: at most 2% faster on the H200 (2026-12-04, B1 16 splits 16.2 vs 16.4 us at 1k keys), still slower than
#: the merge kernel there
WIDE_SPLITS = 16


@functools.lru_cache(maxsize=None)
def make_decode_finish(NW, DP, bf16, SPLIT, MERGE, WIDE=False):
    """The end of a tensor-core decode block (shared by ``make_decode_tc`` and ``make_decode_direct``), as
    (put_ml, finish, MI, shared float32 words). Each warp has kept its own online softmax over its keys for the
    block's 16 packed rows; ``put_ml`` stores a warp's (max, sum) per row (sums reduced over the quad) into the
    merge area ``ef`` (dynamic shared memory), the caller stores its O rows at ef[MI + (warp * 16 + r) * DP + d]
    (unnormalized, in the warp's max), then ``finish`` merges the warps, writes the output (or the split's
    partial and LSE) and, for SPLIT and MERGE, merges the splits in the last block of its row group.
    WIDE: up to WIDE_SPLITS splits, each thread of the merging block issues the loads of every split for two
    (row, column pair) items before it adds any (one dependent L2 round trip per two items instead of one per
    MUNROLL splits and item): the merge is the exposed tail of a small call."""
    NTH = 32 * NW
    HALF_DP = DP // 2
    MAXS = MAX_SPLITS
    MI = 2 * NW * 16                    # float offset of the per-warp O rows in the merge area
    EPI = NW * 16 * (DP + 2)            # float32 words of the warp merge
    SPLIT_W = 16 * MAXS + 32            # float32 words of the split merge (weights, then max and sum per row)
    MUNROLL = 8                         # splits whose partials one thread loads at once in the split merge
    MX2 = 2 * MUNROLL
    WS = WIDE_SPLITS
    XW = 4 * WS                         # the wide merge's per-thread load buffer: 2 items x WS splits x 2
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2

    @dev
    def put_merged(out, lse_out, ef, b, i, h, c, r, v0, v1):
        """Normalize a merged column pair of packed row r (query i, head h) by the weight sum; its LSE at c 0."""
        tot = ef[16 * MAXS + 16 + r]
        inv = F32_ZERO if tot == F32_ZERO else float32(1.0) / tot
        out[b, i, h, c // 2] = pack(v0 * inv, v1 * inv)
        if c == 0:
            lse_out[b, h, i] = ef[16 * MAXS + r] + math.log(tot) if tot > F32_ZERO else F32_NEG_INF

    @dev
    def merge_item(x, mt, M, D):
        """Item x of the split merge: (real, packed row r in the m-tile, column pair c, packed row R)."""
        r = x // HALF_DP
        c = 2 * (x - r * HALF_DP)
        R = mt * 16 + r
        return R < M and c < D, r, c, R

    @dev
    def merge_wide(o, out, lse_out, ef, b, hk, mt, Sq, G, M, D, nsplit, tid):
        """The weighted sum of merge_splits for nsplit <= WS: items x and x + NTH together, every split's two
        values of both loaded (clamped to the last split, unconditional) before the first add."""
        xw = cuda.local.array(XW, float32)
        for x in range(tid, 16 * HALF_DP, 2 * NTH):
            for u in range(2):
                ok, r, c, R = merge_item(x + u * NTH, mt, M, D)
                if x + u * NTH < 16 * HALF_DP and ok:
                    i, h = packed_row(R, Sq, hk, G)
                    for j in range(WS):
                        sc = min(j, nsplit - 1)
                        xw[u * 2 * WS + 2 * j] = o[sc, b, i, h, c]
                        xw[u * 2 * WS + 2 * j + 1] = o[sc, b, i, h, c + 1]
            for u in range(2):
                ok, r, c, R = merge_item(x + u * NTH, mt, M, D)
                if x + u * NTH < 16 * HALF_DP and ok:
                    i, h = packed_row(R, Sq, hk, G)
                    v0 = F32_ZERO
                    v1 = F32_ZERO
                    for j in range(WS):
                        if j < nsplit:
                            wv = ef[r * nsplit + j]
                            if wv != F32_ZERO:
                                v0 += wv * xw[u * 2 * WS + 2 * j]
                                v1 += wv * xw[u * 2 * WS + 2 * j + 1]
                    put_merged(out, lse_out, ef, b, i, h, c, r, v0, v1)

    @dev
    def merge_unrolled(o, out, lse_out, ef, b, hk, mt, Sq, G, M, D, nsplit, tid):
        """The weighted sum of merge_splits, MUNROLL splits' loads in flight per item."""
        xs = cuda.local.array(MX2, float32)
        for x in range(tid, 16 * HALF_DP, NTH):
            ok, r, c, R = merge_item(x, mt, M, D)
            if ok:
                i, h = packed_row(R, Sq, hk, G)
                v0 = F32_ZERO
                v1 = F32_ZERO
                for s0 in range(0, nsplit, MUNROLL):  # MUNROLL splits' loads in flight (clamped, unconditional)
                    for j in range(MUNROLL):
                        sc = min(s0 + j, nsplit - 1)
                        xs[2 * j] = o[sc, b, i, h, c]
                        xs[2 * j + 1] = o[sc, b, i, h, c + 1]
                    for j in range(MUNROLL):
                        if s0 + j < nsplit:
                            wv = ef[r * nsplit + s0 + j]
                            if wv != F32_ZERO:
                                v0 += wv * xs[2 * j]
                                v1 += wv * xs[2 * j + 1]
                put_merged(out, lse_out, ef, b, i, h, c, r, v0, v1)

    @dev
    def merge_splits(o, lse, out, lse_out, counter, ef, b, hk, mt, n_mt, Hk, Sq, G, M, D, nsplit, tid):
        """The last block of (b, hk, mt) to finish merges every split's rows: weights exp(lse_s - max) per row
        into shared memory, then out = sum_s w_s o_s / sum_s w_s."""
        cuda.threadfence()  # this block's partials are visible device-wide before it counts itself done
        cuda.syncthreads()
        flag = cuda.shared.array(1, int32)
        cidx = (b * Hk + hk) * n_mt + mt
        if tid == 0:
            flag[0] = 1 if cuda.atomic.add(counter, cidx, 1) == nsplit - 1 else 0
        cuda.syncthreads()
        if flag[0] == 0:
            return
        cuda.threadfence()
        for x in range(tid, 16 * nsplit, NTH):
            r = x // nsplit
            R = mt * 16 + r
            val = F32_NEG_INF
            if R < M:
                i, h = packed_row(R, Sq, hk, G)
                val = lse[x - r * nsplit, b, h, i]
            ef[x] = val
        cuda.syncthreads()
        if tid < 16:
            mx = F32_NEG_INF
            for sp in range(nsplit):
                mx = max(mx, ef[tid * nsplit + sp])
            mu = F32_ZERO if mx == F32_NEG_INF else mx
            tot = F32_ZERO
            for sp in range(nsplit):
                e = ex2((ef[tid * nsplit + sp] - mu) * F32_LOG2E)
                ef[tid * nsplit + sp] = e
                tot += e
            ef[16 * MAXS + tid] = mu
            ef[16 * MAXS + 16 + tid] = tot
        cuda.syncthreads()
        if WIDE and nsplit <= WS:
            merge_wide(o, out, lse_out, ef, b, hk, mt, Sq, G, M, D, nsplit, tid)
        else:
            merge_unrolled(o, out, lse_out, ef, b, hk, mt, Sq, G, M, D, nsplit, tid)
        if tid == 0:
            counter[cidx] = 0  # ready for the next call

    @dev
    def put_ml(ef, warp, g, t, m_a, m_b, l_a, l_b):
        """This warp's row max and (quad-reduced) row sum of rows g and g + 8 into the merge area."""
        l_a += shfl_xor(l_a, 1)
        l_a += shfl_xor(l_a, 2)
        l_b += shfl_xor(l_b, 1)
        l_b += shfl_xor(l_b, 2)
        if t == 0:
            ef[warp * 16 + g] = m_a
            ef[warp * 16 + g + 8] = m_b
            ef[NW * 16 + warp * 16 + g] = l_a
            ef[NW * 16 + warp * 16 + g + 8] = l_b

    @dev
    def finish(ef, o, lse, out, lse_out, counter, b, hk, mt, n_mt, Hk, Sq, G, M, D, sp, nsplit, tid):
        """Merge the warps' (max, sum, O) from ``ef``; write out / LSE (or the split partials, then merge)."""
        cuda.syncthreads()
        for x in range(tid, 16 * HALF_DP, NTH):
            r = x // HALF_DP
            c = 2 * (x - r * HALF_DP)
            R = mt * 16 + r
            if R < M and c < D:
                i, h = packed_row(R, Sq, hk, G)
                mx = F32_NEG_INF
                for w in range(NW):
                    mx = max(mx, ef[w * 16 + r])
                mu = F32_ZERO if mx == F32_NEG_INF else mx
                tot = F32_ZERO
                v0 = F32_ZERO
                v1 = F32_ZERO
                for w in range(NW):
                    e = ex2(ef[w * 16 + r] - mu)
                    tot += e * ef[NW * 16 + w * 16 + r]
                    v0 += e * ef[MI + (w * 16 + r) * DP + c]
                    v1 += e * ef[MI + (w * 16 + r) * DP + c + 1]
                inv = F32_ZERO if tot == F32_ZERO else float32(1.0) / tot
                if SPLIT:
                    o[sp, b, i, h, c] = v0 * inv
                    if c + 1 < D:
                        o[sp, b, i, h, c + 1] = v1 * inv
                else:
                    o[b, i, h, c // 2] = pack(v0 * inv, v1 * inv)
                if c == 0:
                    val = (mu + math.log2(tot)) * F32_LN2 if tot > F32_ZERO else F32_NEG_INF
                    if SPLIT:
                        lse[sp, b, h, i] = val
                    else:
                        lse[b, h, i] = val
        if SPLIT and MERGE:
            merge_splits(o, lse, out, lse_out, counter, ef, b, hk, mt, n_mt, Hk, Sq, G, M, D, nsplit, tid)

    return put_ml, finish, MI, max(EPI, SPLIT_W if SPLIT and MERGE else 0)


@functools.lru_cache(maxsize=None)
def make_decode_tc(NW, DP, bf16, HAS_CAP, HAS_ALIBI, SPLIT, STAGES=2, MERGE=True, BC=16, PF=False, QREG=False, TPF=False,
                   REG=False, LEAN=0):
    """Tensor-core decode kernel: NW warps, 16 packed rows, BC-key tiles (16 or 32) per warp streamed through
    STAGES shared buffers per warp, head dim padded to DP; PF: cp.async with an L2 256-byte prefetch hint;
    QREG: the Q fragments are loaded once into registers (4 * DP / 16 words) instead of per tile;
    TPF: each lane's page-table entry for the next tile it issues is loaded one loop iteration early, so its
    latency hides behind the current tile's math instead of delaying the issue.
    REG: K/V tiles come through registers instead of cp.async: each lane's 16-byte global loads of the tile two
    ahead are issued before the current tile's math and stored to shared memory one iteration later (the
    STAGES = 2 shared buffers plus one tile in registers per warp; 8 * BC * DP / 256 words per lane). On the
    H200 a read-only stream of this shape moved 4.33-4.42 TB/s this way against 4.17-4.27 through cp.async
    rings (benchmarks/gpu/probe_decode_read.py).
    LEAN (bit mask; the kernel is issue-bound, so these cut instructions per tile):
    1: each lane's 16-byte chunk column and first row are fixed (when the chunks per row divide 32), so the
    copies of a tile are straight-line code on per-lane offsets instead of a loop of 64-bit divisions;
    2: a tile inside the key range every query row sees whole (block-uniform, set before the loop) skips the
    mask;
    4: lazy rescale: the running max only moves (and O, l are rescaled) when some row's tile max exceeds it
    by more than LAZY_LOG2 (a warp vote); else P = 2^(s - m) <= 2^LAZY_LOG2 with the old max, exact in fp32
    and in the bf16/f16 P operand's range;
    8: the in-kernel split merge loads every split of two items at once (``make_decode_finish(WIDE=True)``, up to
    WIDE_SPLITS splits).
    Returns (kernel, threads per block, dynamic shared bytes).

    SPLIT: each block writes its split's normalized partial output and LSE (o, lse: (nsplit, B, Sq, H, D) and
    (nsplit, B, H, Sq) float32), then counts itself done in ``counter``; the last block of a (sequence, head,
    m-tile) merges the splits into ``out`` / ``lse_out`` and resets the counter (no second launch). With
    MERGE=False the partials are left for ``make_combine`` (better for many splits: one block per row group
    merging 30+ splits is a serial tail, while the merge kernel spreads it over B x H x Sq blocks)."""
    assert BC in (16, 32)
    assert not REG or STAGES == 2, "the register-staged ring has two shared buffers"
    STR = DP // 2 + 4                   # shared row stride in uint32 words
    CH = DP // 8                        # 16-byte chunks per padded row
    NT_S, KS_D, NT_O = BC // 8, DP // 16, DP // 8
    O_LEN, S_LEN = NT_O * 4, NT_S * 4
    QF_LEN = 4 * KS_D if QREG else 1    # Q fragment words kept in registers
    NTH = 32 * NW
    TILE = BC * STR
    Q_W = 16 * STR
    WARP_W = STAGES * 2 * TILE          # STAGES buffers of (K, V) per warp
    RB = NW * BC                        # row-base scratch entries
    put_ml, finish, MI, FIN_W = make_decode_finish(NW, DP, bf16, SPLIT, MERGE, bool(LEAN & 8))
    SMEM = 4 * max(Q_W + NW * WARP_W, FIN_W)
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2
    ldsm, ldsm_t = intr.ldsm_x4_o, intr.ldsm_x4_t_o  # kept after the cp.async waits
    cp16 = cp16_pf if PF else intr.cp_async16
    wait_tile = _cp_wait(STAGES - 1)  # the oldest of STAGES outstanding groups has landed
    mma_acc = make_tc_helpers(bf16, STR, CH, NTH)[0]
    NU = BC * CH // 32                  # 16-byte chunks per lane and tile (REG), for K and for V each
    NR = 8 * NU if REG else 1
    assert not REG or (BC * CH) % 32 == 0
    FAST = bool(LEAN & 1) and 32 % CH == 0 and BC % (32 // CH) == 0
    RS = 32 // CH if FAST else 1        # rows a warp pass covers: lane -> (row lane // CH, chunk lane % CH)
    SH = CH.bit_length() - 1
    NOMASK, LAZY = bool(LEAN & 2), bool(LEAN & 4)

    @dev
    def lane_chunk(lane, W):
        """FAST: (first row, word offset of the chunk, whether the chunk is inside the head dim) of this lane."""
        c4 = (lane & (CH - 1)) * 4
        return lane >> SH, c4, c4 < W

    @dev
    def copy_rows(smem, rbase, kc, vc, dst, warp, lane, W):
        """The warp's cp.async copies of its BC K and V rows (row bases in ``rbase``, -1 = zero-fill) to ``dst``."""
        if FAST:
            r0, c4, okc = lane_chunk(lane, W)
            d0 = dst + r0 * STR + c4
            i0 = warp * BC + r0
            for u in range(BC // RS):
                base = rbase[uint32(i0 + u * RS)]
                ok = (base >= 0) & okc
                src = base + c4 if ok else int64(0)
                nb = 16 if ok else 0
                cp16(smem, d0 + u * RS * STR, kc, src, nb)
                cp16(smem, d0 + TILE + u * RS * STR, vc, src, nb)
            return
        for c in range(lane, BC * CH, 32):
            r = c // CH
            ch = c - r * CH
            base = rbase[warp * BC + r]
            ok = base >= 0 and ch * 4 < W
            src = base + ch * 4 if ok else int64(0)
            cp16(smem, dst + r * STR + ch * 4, kc, src, 16 if ok else 0)
            cp16(smem, dst + TILE + r * STR + ch * 4, vc, src, 16 if ok else 0)

    @dev
    def load_rows(regs, rbase, kc, vc, warp, lane, W, nvalid):
        """REG: this lane's 16-byte chunks of the warp's BC K and V rows (row bases in ``rbase``; the first nvalid
        exist) into regs."""
        if FAST:
            r0, c4, okc = lane_chunk(lane, W)
            i0 = warp * BC + r0
            if (nvalid >= BC) & (W >= CH * 4):  # a whole tile (warp-uniform): no zero-fill, no predicates
                for u in range(NU):
                    src = rbase[uint32(i0 + u * RS)] + c4
                    regs[8 * u], regs[8 * u + 1], regs[8 * u + 2], regs[8 * u + 3] = ld4(kc, src)
                    regs[8 * u + 4], regs[8 * u + 5], regs[8 * u + 6], regs[8 * u + 7] = ld4(vc, src)
                return
            for u in range(NU):
                base = rbase[uint32(i0 + u * RS)]
                if (base >= 0) & okc:
                    src = base + c4
                    regs[8 * u], regs[8 * u + 1], regs[8 * u + 2], regs[8 * u + 3] = ld4(kc, src)
                    regs[8 * u + 4], regs[8 * u + 5], regs[8 * u + 6], regs[8 * u + 7] = ld4(vc, src)
                else:
                    for x in range(8):
                        regs[8 * u + x] = uint32(0)
            return
        for u in range(NU):
            c = lane + 32 * u
            r = c // CH
            ch = c - r * CH
            base = rbase[warp * BC + r]
            if base >= 0 and ch * 4 < W:
                src = base + ch * 4
                regs[8 * u], regs[8 * u + 1], regs[8 * u + 2], regs[8 * u + 3] = ld4(kc, src)
                regs[8 * u + 4], regs[8 * u + 5], regs[8 * u + 6], regs[8 * u + 7] = ld4(vc, src)
            else:
                for x in range(8):
                    regs[8 * u + x] = uint32(0)

    @dev
    def store_rows(smem, regs, dst, lane):
        """REG: the chunks ``load_rows`` put in regs into the warp's stage at ``dst``."""
        if FAST:
            d0 = dst + (lane >> SH) * STR + (lane & (CH - 1)) * 4
            for u in range(NU):
                d = d0 + u * RS * STR
                st16(smem, d, regs[8 * u], regs[8 * u + 1], regs[8 * u + 2], regs[8 * u + 3])
                st16(smem, d + TILE, regs[8 * u + 4], regs[8 * u + 5], regs[8 * u + 6], regs[8 * u + 7])
            return
        for u in range(NU):
            c = lane + 32 * u
            r = c // CH
            ch = c - r * CH
            st16(smem, dst + r * STR + ch * 4, regs[8 * u], regs[8 * u + 1], regs[8 * u + 2], regs[8 * u + 3])
            st16(smem, dst + TILE + r * STR + ch * 4, regs[8 * u + 4], regs[8 * u + 5], regs[8 * u + 6],
                 regs[8 * u + 7])

    @dev
    def set_rows(rbase, kc, table, b, hk, p0, nvalid, warp, lane):
        """Lanes < BC look up the page of row p0 + lane (the first nvalid rows exist) and store its element
        offset in ``rbase`` (-1 = zero-fill)."""
        if lane < BC:
            base = int64(-1)
            if lane < nvalid:
                P = kc.shape[1]
                pg, slot = page_of(p0 + lane, P, LEAN)
                base = ((int64(table[b, pg]) * P + slot) * kc.shape[2] + hk) * kc.shape[3]
            rbase[warp * BC + lane] = base
        syncwarp()

    @dev
    def issue_tile(smem, rbase, kc, vc, table, b, hk, p0, nvalid, dst, warp, lane):
        """cp.async the K and V rows of logical positions p0 .. p0 + BC - 1 (the first nvalid exist) into this
        warp's stage at ``dst``: lanes < BC look up one row's page, the warp then copies 16-byte chunks."""
        set_rows(rbase, kc, table, b, hk, p0, nvalid, warp, lane)
        copy_rows(smem, rbase, kc, vc, dst, warp, lane, kc.shape[3])
        syncwarp()  # every lane has read rbase before the next issue rewrites it

    @dev
    def lookup(kc, table, b, p0, nvalid, lane):
        """(page, slot) of this lane's row p0 + lane; page -1 when the row does not exist (or lane >= BC)."""
        pv = int32(-1)
        slot = int64(0)
        if lane < BC and lane < nvalid:
            pg, slot = page_of(p0 + lane, kc.shape[1], LEAN)
            pv = table[b, pg]
        return pv, slot

    @dev
    def set_rows_from(rbase, kc, hk, pv, slot, warp, lane):
        """set_rows with the rows' (page, slot) already looked up (``lookup``)."""
        if lane < BC:
            base = int64(-1)
            if pv >= 0:
                base = ((int64(pv) * kc.shape[1] + slot) * kc.shape[2] + hk) * kc.shape[3]
            rbase[warp * BC + lane] = base
        syncwarp()

    @dev
    def issue_from(smem, rbase, kc, vc, hk, pv, slot, dst, warp, lane):
        """issue_tile with the rows' (page, slot) already looked up (``lookup``)."""
        set_rows_from(rbase, kc, hk, pv, slot, warp, lane)
        copy_rows(smem, rbase, kc, vc, dst, warp, lane, kc.shape[3])
        syncwarp()

    softmax_tile = make_online_softmax(S_LEN, NT_O, HAS_CAP, HAS_ALIBI, False, LAZY_LOG2 if LAZY else 0.0)

    def kernel(qw, kc, vc, table, start, end, o, lse, slopes, scale_log2, softcap, cap_in, left, right, nsplit,
               out, lse_out, counter):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane >> 2
        t = lane & 3
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        B, Sq, H, W = qw.shape
        Hk = kc.shape[2]
        G = H // Hk
        M = G * Sq
        n_mt = (M + 15) // 16
        mt = cuda.blockIdx.x % n_mt
        sp = cuda.blockIdx.x // n_mt
        D = 2 * W
        st = start[b]
        Sk = end[b] - st
        off = Sk - Sq
        k0, k1 = split_range(Sq, Sk, left, right, sp, nsplit, BC)
        smem = cuda.shared.array(0, uint32)
        rbase = cuda.shared.array(RB, int64)
        # ---- the block's 16 packed query rows
        for c in range(tid, 16 * CH, NTH):
            r = c // CH
            ch = c - r * CH
            R = mt * 16 + r
            ok = R < M and ch * 4 < W
            src = int64(0)
            if ok:
                i, h = packed_row(R, Sq, hk, G)
                src = ((int64(b) * Sq + i) * H + h) * W + ch * 4
            cp16(smem, r * STR + ch * 4, qw, src, 16 if ok else 0)
        intr.cp_async_commit()  # waited for after the first K/V tiles are issued (below), so the two overlap
        Ra = mt * 16 + g
        Rb = Ra + 8
        ia, ha = packed_row(Ra, Sq, hk, G)
        ib, hb = packed_row(Rb, Sq, hk, G)
        sl_a = F32_ZERO
        sl_b = F32_ZERO
        if HAS_ALIBI:
            if Ra < M:
                sl_a = slopes[b, ha] * F32_LOG2E
            if Rb < M:
                sl_b = slopes[b, hb] * F32_LOG2E
        mrow = lane & 7
        q_lane = (mrow + 8 * ((lane >> 3) & 1)) * STR + 4 * (lane >> 4)
        k_lane = (mrow + 8 * (lane >> 4)) * STR + 4 * ((lane >> 3) & 1)
        v_lane = TILE + (mrow + 8 * ((lane >> 3) & 1)) * STR + 4 * (lane >> 4)
        m_a = F32_NEG_INF
        m_b = F32_NEG_INF
        l_a = F32_ZERO
        l_b = F32_ZERO
        oacc = cuda.local.array(O_LEN, float32)
        for x in range(O_LEN):
            oacc[x] = F32_ZERO
        sacc = cuda.local.array(S_LEN, float32)
        qf = cuda.local.array(QF_LEN, uint32)
        wbase = Q_W + warp * WARP_W
        ntile = (k1 - k0 + BC - 1) // BC
        W = kc.shape[3]
        regs = cuda.local.array(NR, uint32)
        pv = int32(-1)
        slot = int64(0)
        if REG:  # tile warp -> stage 0 through registers; tile warp + NW into registers
            if warp < ntile:
                set_rows(rbase, kc, table, b, hk, st + k0 + warp * BC, k1 - k0 - warp * BC, warp, lane)
                load_rows(regs, rbase, kc, vc, warp, lane, W, k1 - k0 - warp * BC)
                store_rows(smem, regs, wbase, lane)
                syncwarp()
            tt = warp + NW
            if tt < ntile:
                set_rows(rbase, kc, table, b, hk, st + k0 + tt * BC, k1 - k0 - tt * BC, warp, lane)
                load_rows(regs, rbase, kc, vc, warp, lane, W, k1 - k0 - tt * BC)
                syncwarp()
            if TPF:
                tt = warp + 2 * NW
                if tt < ntile:
                    pv, slot = lookup(kc, table, b, st + k0 + tt * BC, k1 - k0 - tt * BC, lane)
        else:
            # warp-private ring of STAGES tiles: tiles warp, warp + NW, ...; one commit group per tile slot
            for s in range(STAGES - 1):
                tt = warp + s * NW
                if tt < ntile:
                    issue_tile(smem, rbase, kc, vc, table, b, hk, st + k0 + tt * BC, k1 - k0 - tt * BC,
                               wbase + s * 2 * TILE, warp, lane)
                intr.cp_async_commit()
            if TPF:  # the first in-loop issue's page lookup
                tt = warp + (STAGES - 1) * NW
                if tt < ntile:
                    pv, slot = lookup(kc, table, b, st + k0 + tt * BC, k1 - k0 - tt * BC, lane)
        # the Q group (the oldest) has landed in every thread, then in the block
        if REG:
            intr.cp_async_wait0()
        else:
            wait_tile()
        cuda.syncthreads()
        if QREG:
            for kk in range(KS_D):
                qf[4 * kk], qf[4 * kk + 1], qf[4 * kk + 2], qf[4 * kk + 3] = ldsm(smem, q_lane + kk * 8)
        lo_all = k0  # NOMASK: keys [lo_all, hi_all) are visible from all Sq query rows
        hi_all = k1
        if left >= 0:
            lo_all = max(lo_all, Sq - 1 + off - left)
        if right >= 0:
            hi_all = min(hi_all, off + right + 1)
        stage = 0
        it = warp
        while it < ntile:
            ahead = it + (STAGES - 1) * NW
            if REG:
                # registers hold tile it + NW (loaded an iteration ago): to the other buffer, whose last reader
                # (the previous iteration) is done; then the loads of tile it + 2 NW go out before this tile's math
                if ahead < ntile:
                    store_rows(smem, regs, wbase + (1 - stage) * 2 * TILE, lane)
                ahead2 = ahead + NW
                if ahead2 < ntile:
                    if TPF:
                        set_rows_from(rbase, kc, hk, pv, slot, warp, lane)
                        nxt = ahead2 + NW
                        if nxt < ntile:
                            pv, slot = lookup(kc, table, b, st + k0 + nxt * BC, k1 - k0 - nxt * BC, lane)
                    else:
                        set_rows(rbase, kc, table, b, hk, st + k0 + ahead2 * BC, k1 - k0 - ahead2 * BC, warp, lane)
                    load_rows(regs, rbase, kc, vc, warp, lane, W, k1 - k0 - ahead2 * BC)
            elif ahead < ntile:
                sa = stage + STAGES - 1
                if sa >= STAGES:
                    sa -= STAGES
                if TPF:
                    issue_from(smem, rbase, kc, vc, hk, pv, slot, wbase + sa * 2 * TILE, warp, lane)
                    nxt = ahead + NW
                    if nxt < ntile:
                        pv, slot = lookup(kc, table, b, st + k0 + nxt * BC, k1 - k0 - nxt * BC, lane)
                else:
                    issue_tile(smem, rbase, kc, vc, table, b, hk, st + k0 + ahead * BC, k1 - k0 - ahead * BC,
                               wbase + sa * 2 * TILE, warp, lane)
            if not REG:
                intr.cp_async_commit()
                wait_tile()
            syncwarp()
            kv0 = wbase + stage * 2 * TILE
            j0 = k0 + it * BC
            for x in range(S_LEN):
                sacc[x] = F32_ZERO
            for kk in range(KS_D):
                if QREG:
                    a0, a1, a2, a3 = qf[4 * kk], qf[4 * kk + 1], qf[4 * kk + 2], qf[4 * kk + 3]
                else:
                    a0, a1, a2, a3 = ldsm(smem, q_lane + kk * 8)
                for np2 in range(NT_S // 2):
                    b0, b1, b2, b3 = ldsm(smem, kv0 + k_lane + np2 * 16 * STR + kk * 8)
                    mma_acc(sacc, np2 * 8, a0, a1, a2, a3, b0, b1)
                    mma_acc(sacc, np2 * 8 + 4, a0, a1, a2, a3, b2, b3)
            masked = True
            if NOMASK:  # every key of the tile visible from every query row: no mask
                masked = (j0 < lo_all) | (j0 + BC > hi_all)
            if masked:
                m_a, m_b, l_a, l_b = softmax_tile(sacc, 0, oacc, 0, m_a, m_b, l_a, l_b, ia, ib, 0, 0, j0, t, True,
                                                  k1, off, left, right, sl_a, sl_b, scale_log2, softcap, cap_in, 0,
                                                  F32_ZERO)
            else:
                m_a, m_b, l_a, l_b = softmax_tile(sacc, 0, oacc, 0, m_a, m_b, l_a, l_b, ia, ib, 0, 0, j0, t, False,
                                                  k1, off, left, right, sl_a, sl_b, scale_log2, softcap, cap_in, 0,
                                                  F32_ZERO)
            for kp in range(BC // 16):  # P (16 rows x 16 keys per k-step) as the A operand of PV
                a0 = pack(sacc[kp * 8], sacc[kp * 8 + 1])
                a1 = pack(sacc[kp * 8 + 2], sacc[kp * 8 + 3])
                a2 = pack(sacc[kp * 8 + 4], sacc[kp * 8 + 5])
                a3 = pack(sacc[kp * 8 + 6], sacc[kp * 8 + 7])
                for np2 in range(NT_O // 2):
                    b0, b1, b2, b3 = ldsm_t(smem, kv0 + v_lane + kp * 16 * STR + np2 * 8)
                    mma_acc(oacc, np2 * 8, a0, a1, a2, a3, b0, b1)
                    mma_acc(oacc, np2 * 8 + 4, a0, a1, a2, a3, b2, b3)
            syncwarp()  # every lane is done with this stage before the next issue refills it
            stage += 1
            if stage == STAGES:
                stage = 0
            it += NW
        intr.cp_async_wait0()
        cuda.syncthreads()  # the merge area overlaps the K/V stages
        ef = cuda.shared.array(0, float32)
        put_ml(ef, warp, g, t, m_a, m_b, l_a, l_b)
        for nt in range(NT_O):
            c = nt * 8 + 2 * t
            ef[MI + (warp * 16 + g) * DP + c] = oacc[nt * 4]
            ef[MI + (warp * 16 + g) * DP + c + 1] = oacc[nt * 4 + 1]
            ef[MI + (warp * 16 + g + 8) * DP + c] = oacc[nt * 4 + 2]
            ef[MI + (warp * 16 + g + 8) * DP + c + 1] = oacc[nt * 4 + 3]
        finish(ef, o, lse, out, lse_out, counter, b, hk, mt, n_mt, Hk, Sq, G, M, D, sp, nsplit, tid)

    return jit_kernel(kernel), NTH, SMEM


# ---- the direct-operand kernel
# Decode attention on tensor cores with K/V read straight into mma operand registers (no shared-memory stage).
#
# Decode is a stream of K/V bytes; a shared-memory stage (cp.async or register-staged) costs a store, a barrier
# and an ldmatrix per byte and caps the blocks per SM. Here every lane loads, with 16-byte global loads, exactly
# the words its mma.sync m16n8k16 fragments need, by permuting the contraction dimension:
#
# * S = Q K^T (k = head dim d): in k-step s = 2 i + sig the fragment's logical k = 2 t + u (u in 0, 1) is
#   d = 32 i + 8 t + 4 sig + u and k = 2 t + 8 + u is d = 32 i + 8 t + 4 sig + 2 + u. So lane (g, t) of a warp
#   needs, for key g of an n-tile, the 16-byte chunks at d = 32 i + 8 t (i < DP / 32): four lanes read one key's
#   whole row, 64 contiguous bytes per load instruction and key. Q's A fragments use the same map (loaded once).
# * O = P V (k = key, n = d): n-tile j = 8 h + e holds d = 64 h + 8 n + e, so lane (g, t) needs, for its four
#   keys 2 t, 2 t + 1, 2 t + 8, 2 t + 9 of the 16-key tile, the chunks at d = 64 h + 8 g (h < DP / 64): eight
#   lanes read 128 contiguous bytes of a key per instruction. The B fragment pairs two keys' values of one d,
#   which is a byte permute of two loaded words (shift / mask). O's accumulator of n-tile j lane (g, t) is
#   d = 64 h + 16 t + e and 64 h + 16 t + 8 + e.
#
# The keys stay in order, so masking, ALiBi and the online softmax are the prefill kernels' (``_attn_common``).
# Each warp streams its own 16-key tiles (warp, warp + NW, ...) with the next tile's loads in flight during the
# current tile's math (PIPE), and each lane's page lookup (its key lane % 16, shared by shuffles) runs a tile
# ahead of its loads. ROWS8: the block's packed rows fit in 8 (GQA group x query tokens
# <= 8, the usual decode), so the mma rows 8-15 are zero and their accumulators are not kept. The warp merge, the
# output and the split merge are ``_decode_kernels.make_decode_finish``'s, as in the staged kernel.

#: keys per warp tile of the direct kernel (one PV k-step)
DIRECT_BC = 16


def direct_dp(D):
    """Head dim of the direct kernel (64 or 128: its loads are unpredicated, so no padding), or 0 when it does
    not take this head dim."""
    return D if D in (64, 128) else 0


@functools.lru_cache(maxsize=None)
def make_decode_direct(NW, DP, bf16, HAS_CAP, HAS_ALIBI, SPLIT, MERGE=True, ROWS8=True, PIPE=1, MAXREG=0):
    """Tensor-core decode kernel with K/V loaded into mma fragments: NW warps, 16 packed rows (8 with ROWS8),
    16-key tiles per warp, head dim DP (64 or 128, the cache's). Same arguments, outputs and split protocol as
    ``make_decode_tc``. PIPE 1: one register set per lane, the next tile's K loads during this tile's softmax
    and PV, its V during its scores; PIPE 2: two register sets, a whole tile's loads ahead of the math (more
    registers). MAXREG: a register cap for the compiler (0 = none). Returns (kernel, threads per block,
    dynamic shared bytes)."""
    assert DP in (64, 128) and PIPE in (1, 2)
    NCK = DP // 32                      # K / Q chunks per lane and key row: words 16 i + 4 t
    NCV = DP // 64                      # V chunks per lane and key row: words 32 h + 4 g
    KS = DP // 16                       # k-steps of S = Q K^T
    NT_O = DP // 8                      # n-tiles of O
    OW = 2 if ROWS8 else 4              # O accumulators kept per n-tile
    NKR = 2 * NCK * 4                   # K words per lane and tile (two n-tiles of 8 keys)
    NVR = 4 * NCV * 4                   # V words per lane and tile (four keys)
    QWN = 4 * NCK                       # Q words per lane and row
    OL = NT_O * OW
    NTH = 32 * NW
    BC = DIRECT_BC
    mma = intr.mma_bf16 if bf16 else intr.mma_f16
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2
    put_ml, finish, MI, FIN_W = make_decode_finish(NW, DP, bf16, SPLIT, MERGE)
    softmax_tile = make_online_softmax(8, 0, HAS_CAP, HAS_ALIBI, False)  # no O rescale: done here per OW
    ZW = uint32(0)

    @dev
    def row_of(kc, table, b, hk, p0, nvalid, lane):
        """Cache row ((page * page_size + slot) * Hk + hk) of key p0 + lane % 16; past the first nvalid keys, the
        row of key p0 (real cache data, so the loads need no predicate: K of those keys is masked in the
        softmax, and V meets P = 0 there)."""
        l = lane & 15
        if l >= nvalid:
            l = 0
        P = kc.shape[1]
        p = p0 + l
        pg = p // P
        return int32((table[b, pg] * P + (p - pg * P)) * kc.shape[2] + hk)

    @dev
    def load_k(kr, kc, rl, g, t, W):
        """This lane's K fragment words of one 16-key tile: keys 8 n + g, chunks at words 16 i + 4 t (cache rows
        from the lanes' ``row_of``, shuffled). Unconditional loads: a predicated load with a zero-fill makes
        the compiler wait for each load before the next."""
        for n in range(2):
            src = int64(shfl_idx(rl, n * 8 + g)) * W + 4 * t
            for i in range(NCK):
                x = (n * NCK + i) * 4
                kr[x], kr[x + 1], kr[x + 2], kr[x + 3] = ld4(kc, src + 16 * i)

    @dev
    def load_v(vr, vc, rl, g, t, W):
        """This lane's V fragment words: keys 2 t, 2 t + 1, 2 t + 8, 2 t + 9, chunks at words 32 h + 4 g."""
        for kk in range(4):
            src = int64(shfl_idx(rl, 2 * t + (kk & 1) + 8 * (kk >> 1))) * W + 4 * g
            for h in range(NCV):
                x = (kk * NCV + h) * 4
                vr[x], vr[x + 1], vr[x + 2], vr[x + 3] = ld4(vc, src + 32 * h)

    @dev
    def mma_s(sacc, x, a0, a1, a2, a3, b0, b1):
        d0, d1, d2, d3 = mma(a0, a1, a2, a3, b0, b1, sacc[x], sacc[x + 1], sacc[x + 2], sacc[x + 3])
        sacc[x] = d0
        sacc[x + 1] = d1
        sacc[x + 2] = d2
        sacc[x + 3] = d3

    @dev
    def scores(kr, qa, qb, sacc):
        """sacc = S = Q K^T of one tile."""
        for x in range(8):
            sacc[x] = F32_ZERO
        for s in range(KS):
            i = s >> 1
            e = 2 * (s & 1)
            a0 = qa[4 * i + e]
            a2 = qa[4 * i + e + 1]
            a1 = ZW
            a3 = ZW
            if not ROWS8:
                a1 = qb[4 * i + e]
                a3 = qb[4 * i + e + 1]
            for n in range(2):
                x = (n * NCK + i) * 4 + e
                mma_s(sacc, 4 * n, a0, a1, a2, a3, kr[x], kr[x + 1])

    @dev
    def softmax_pv(vr, sacc, oacc, m_a, m_b, l_a, l_b, ia, ib, j0, t, k1, off, left, right, sl_a, sl_b, scale_log2,
                   softcap, cap_in):
        """Online softmax of the tile's scores, O += P V; returns the new (m_a, m_b, l_a, l_b)."""
        mo_a = m_a
        mo_b = m_b
        m_a, m_b, l_a, l_b = softmax_tile(sacc, 0, oacc, 0, m_a, m_b, l_a, l_b, ia, ib, 0, 0, j0, t, True, k1, off,
                                          left, right, sl_a, sl_b, scale_log2, softcap, cap_in, 0, F32_ZERO)
        al_a = ex2(mo_a - (F32_ZERO if m_a == F32_NEG_INF else m_a))
        al_b = ex2(mo_b - (F32_ZERO if m_b == F32_NEG_INF else m_b))
        for j in range(NT_O):
            oacc[OW * j] *= al_a
            oacc[OW * j + 1] *= al_a
            if not ROWS8:
                oacc[OW * j + 2] *= al_b
                oacc[OW * j + 3] *= al_b
        a0 = pack(sacc[0], sacc[1])
        a2 = pack(sacc[4], sacc[5])
        a1 = ZW
        a3 = ZW
        if not ROWS8:
            a1 = pack(sacc[2], sacc[3])
            a3 = pack(sacc[6], sacc[7])
        for h in range(NCV):
            for e in range(8):
                wd = h * 4 + (e >> 1)
                w0 = vr[wd]
                w1 = vr[NCV * 4 + wd]
                w2 = vr[2 * NCV * 4 + wd]
                w3 = vr[3 * NCV * 4 + wd]
                if e & 1:
                    b0 = (w0 >> 16) | (w1 & uint32(0xFFFF0000))
                    b1 = (w2 >> 16) | (w3 & uint32(0xFFFF0000))
                else:
                    b0 = (w0 & uint32(0xFFFF)) | (w1 << 16)
                    b1 = (w2 & uint32(0xFFFF)) | (w3 << 16)
                j = 8 * h + e
                if ROWS8:
                    d0, d1, d2, d3 = mma(a0, a1, a2, a3, b0, b1, oacc[OW * j], oacc[OW * j + 1], F32_ZERO, F32_ZERO)
                    oacc[OW * j] = d0
                    oacc[OW * j + 1] = d1
                else:
                    d0, d1, d2, d3 = mma(a0, a1, a2, a3, b0, b1, oacc[OW * j], oacc[OW * j + 1], oacc[OW * j + 2],
                                         oacc[OW * j + 3])
                    oacc[OW * j] = d0
                    oacc[OW * j + 1] = d1
                    oacc[OW * j + 2] = d2
                    oacc[OW * j + 3] = d3
        return m_a, m_b, l_a, l_b

    def kernel(qw, kc, vc, table, start, end, o, lse, slopes, scale_log2, softcap, cap_in, left, right, nsplit,
               out, lse_out, counter):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane >> 2
        t = lane & 3
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        B, Sq, H, Wq = qw.shape
        Hk = kc.shape[2]
        W = kc.shape[3]
        G = H // Hk
        M = G * Sq
        n_mt = (M + 15) // 16
        mt = cuda.blockIdx.x % n_mt
        sp = cuda.blockIdx.x // n_mt
        D = 2 * Wq
        st = start[b]
        Sk = end[b] - st
        off = Sk - Sq
        k0, k1 = split_range(Sq, Sk, left, right, sp, nsplit, DIRECT_BC)
        # ---- this lane's Q fragment words (rows g and g + 8 of the block's 16 packed rows)
        Ra = mt * 16 + g
        Rb = Ra + 8
        ia, ha = packed_row(Ra, Sq, hk, G)
        ib, hb = packed_row(Rb, Sq, hk, G)
        qa = cuda.local.array(QWN, uint32)
        qb = cuda.local.array(QWN, uint32)
        for i in range(NCK):
            w = 16 * i + 4 * t
            if Ra < M and w < Wq:
                qa[4 * i], qa[4 * i + 1], qa[4 * i + 2], qa[4 * i + 3] = ld4(qw, ((int64(b) * Sq + ia) * H + ha) * Wq + w)
            else:
                for x in range(4):
                    qa[4 * i + x] = ZW
            if not ROWS8:
                if Rb < M and w < Wq:
                    qb[4 * i], qb[4 * i + 1], qb[4 * i + 2], qb[4 * i + 3] = ld4(qw, ((int64(b) * Sq + ib) * H + hb) * Wq
                                                                                 + w)
                else:
                    for x in range(4):
                        qb[4 * i + x] = ZW
        sl_a = F32_ZERO
        sl_b = F32_ZERO
        if HAS_ALIBI:
            if Ra < M:
                sl_a = slopes[b, ha] * F32_LOG2E
            if Rb < M:
                sl_b = slopes[b, hb] * F32_LOG2E
        m_a = F32_NEG_INF
        m_b = F32_NEG_INF
        l_a = F32_ZERO
        l_b = F32_ZERO
        oacc = cuda.local.array(OL, float32)
        for x in range(OL):
            oacc[x] = F32_ZERO
        sacc = cuda.local.array(8, float32)
        ka = cuda.local.array(NKR, uint32)
        va = cuda.local.array(NVR, uint32)
        kb = cuda.local.array(NKR if PIPE == 2 else 1, uint32)
        vb = cuda.local.array(NVR if PIPE == 2 else 1, uint32)
        ntile = (k1 - k0 + BC - 1) // BC
        p0 = st + k0
        n0 = k1 - k0
        it = warp
        if it < ntile:
            rl = row_of(kc, table, b, hk, p0 + it * BC, n0 - it * BC, lane)
            load_k(ka, kc, rl, g, t, W)
            load_v(va, vc, rl, g, t, W)
        rl = int32(-1)
        if it + NW < ntile:
            rl = row_of(kc, table, b, hk, p0 + (it + NW) * BC, n0 - (it + NW) * BC, lane)
        if PIPE == 1:
            # one register set, phases shifted: K of the next tile loads during this tile's softmax and PV,
            # V of the next tile during the next tile's scores
            while it < ntile:
                nx = it + NW
                scores(ka, qa, qb, sacc)
                if nx < ntile:
                    load_k(ka, kc, rl, g, t, W)
                m_a, m_b, l_a, l_b = softmax_pv(va, sacc, oacc, m_a, m_b, l_a, l_b, ia, ib, k0 + it * BC, t, k1, off,
                                                left, right, sl_a, sl_b, scale_log2, softcap, cap_in)
                if nx < ntile:
                    load_v(va, vc, rl, g, t, W)
                    if nx + NW < ntile:
                        rl = row_of(kc, table, b, hk, p0 + (nx + NW) * BC, n0 - (nx + NW) * BC, lane)
                it = nx
        else:
            # two register sets: tile it in (ka, va), tile it + NW in (kb, vb); the next tile's loads go out
            # before this tile's math
            while it < ntile:
                nx = it + NW
                if nx < ntile:
                    load_k(kb, kc, rl, g, t, W)
                    load_v(vb, vc, rl, g, t, W)
                    if nx + NW < ntile:
                        rl = row_of(kc, table, b, hk, p0 + (nx + NW) * BC, n0 - (nx + NW) * BC, lane)
                scores(ka, qa, qb, sacc)
                m_a, m_b, l_a, l_b = softmax_pv(va, sacc, oacc, m_a, m_b, l_a, l_b, ia, ib, k0 + it * BC, t, k1, off,
                                                left, right, sl_a, sl_b, scale_log2, softcap, cap_in)
                if nx >= ntile:
                    break
                nx2 = nx + NW
                if nx2 < ntile:
                    load_k(ka, kc, rl, g, t, W)
                    load_v(va, vc, rl, g, t, W)
                    if nx2 + NW < ntile:
                        rl = row_of(kc, table, b, hk, p0 + (nx2 + NW) * BC, n0 - (nx2 + NW) * BC, lane)
                scores(kb, qa, qb, sacc)
                m_a, m_b, l_a, l_b = softmax_pv(vb, sacc, oacc, m_a, m_b, l_a, l_b, ia, ib, k0 + nx * BC, t, k1, off,
                                                left, right, sl_a, sl_b, scale_log2, softcap, cap_in)
                it = nx2
        # ---- the warps' (max, sum, O) into the merge area, then the shared epilogue
        ef = cuda.shared.array(0, float32)
        put_ml(ef, warp, g, t, m_a, m_b, l_a, l_b)
        for h in range(NCV):
            for e in range(8):
                j = 8 * h + e
                c = 64 * h + 16 * t + e
                ef[MI + (warp * 16 + g) * DP + c] = oacc[OW * j]
                ef[MI + (warp * 16 + g) * DP + c + 8] = oacc[OW * j + 1]
                if not ROWS8:
                    ef[MI + (warp * 16 + g + 8) * DP + c] = oacc[OW * j + 2]
                    ef[MI + (warp * 16 + g + 8) * DP + c + 8] = oacc[OW * j + 3]
        finish(ef, o, lse, out, lse_out, counter, b, hk, mt, n_mt, Hk, Sq, G, M, D, sp, nsplit, tid)

    if MAXREG and not intr.SIM:
        return cuda.jit(kernel, fastmath=False, lineinfo=False, max_registers=MAXREG), NTH, 4 * FIN_W
    return jit_kernel(kernel), NTH, 4 * FIN_W
