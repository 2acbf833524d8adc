"""Device helpers shared by the CUDA attention kernels: constants, masks, the dropout hash, jit options,
the tensor-core tile helpers."""
import functools
import math

import numpy as np
from numba import cuda, float32, int32

from numba_kernels import _masks
from numba_kernels._dropout import build_hash
from numba_kernels.cuda import _intrinsics as intr
from numba_kernels.cuda._intrinsics import ex2, shfl_xor, vote_any

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
F32_NEG_INF = np.float32(-np.inf)
F32_ZERO = np.float32(0.0)
F32_ONE = np.float32(1.0)
F32_LOG2E = np.float32(LOG2E)
F32_LN2 = np.float32(LN2)

#: decorator for inlined device functions (plain Python under the simulator)
dev = (lambda f: f) if intr.SIM else (lambda f: cuda.jit(device=True, inline=True)(f))
row_key, col_hash = build_hash(dev)


def jit_kernel(fn):
    """cuda.jit with the project's kernel options (the simulator rejects most of them)."""
    return cuda.jit(fn) if intr.SIM else cuda.jit(fn, fastmath=False, lineinfo=False)


key_range = dev(_masks.key_range)
query_range = dev(_masks.query_range)
visible = dev(_masks.visible)
row_span = dev(_masks.row_span)


@dev
def lane_ids(tid):
    """(warp, lane, lane // 4, lane % 4) of thread ``tid``: g, t are the mma fragment coordinates."""
    lane = tid % 32
    return tid // 32, lane, lane >> 2, lane & 3


@dev
def seq_bounds(cu_q, cu_k, b):
    """(first query row, query length, first key row, key length) of sequence b."""
    qs = cu_q[b]
    ks = cu_k[b]
    return qs, cu_q[b + 1] - qs, ks, cu_k[b + 1] - ks



@functools.lru_cache(maxsize=None)
def make_tc_helpers(bf16, STR, CH, NTH):
    """(mma_acc, load_rows, pack_a) of the tensor-core kernels: shared rows of STR uint32 words,
    CH 16-byte chunks per row, NTH threads per block."""
    mma = intr.mma_bf16 if bf16 else intr.mma_f16
    cp16 = intr.cp_async16

    @dev
    def mma_acc(acc, x, a0, a1, a2, a3, b0, b1):
        """acc[x:x+4] += A @ B for one m16n8k16 tile (acc stays in registers: x is constant after unrolling)."""
        d0, d1, d2, d3 = mma(a0, a1, a2, a3, b0, b1, acc[x], acc[x + 1], acc[x + 2], acc[x + 3])
        acc[x] = d0
        acc[x + 1] = d1
        acc[x + 2] = d2
        acc[x + 3] = d3

    @dev
    def load_rows(smem, dst0, src, row0, nrows, nrows_valid, head, tid):
        """cp.async an nrows x DP tile of src[row0 + r, head, :] into smem rows at dst0, zero-filled."""
        W = src.shape[2]
        HS = src.shape[1]
        for c in range(tid, nrows * CH, NTH):
            r = c // CH
            ch = c - r * CH
            ok = r < nrows_valid and ch * 4 < W
            src_idx = ((row0 + r) * HS + head) * W + ch * 4 if ok else 0
            cp16(smem, dst0 + r * STR + ch * 4, src, src_idx, 16 if ok else 0)

    return mma_acc, load_rows, make_pack_a(bf16)


@functools.lru_cache(maxsize=None)
def make_pack_a(bf16):
    """pack_a(acc, x): the A fragment (4 words of packed halves) of the 16 x 16 tile held by two n-tiles of
    accumulators acc[x:x+8]: the accumulator layout of mma (and of wgmma per warp) is the A layout of the next
    product."""
    pack = intr.pack_bf16x2 if bf16 else intr.pack_f16x2

    @dev
    def pack_a(acc, x):
        return (pack(acc[x], acc[x + 1]), pack(acc[x + 2], acc[x + 3]), pack(acc[x + 4], acc[x + 5]),
                pack(acc[x + 6], acc[x + 7]))

    return pack_a


@functools.lru_cache(maxsize=None)
def make_row_loader(NR, STR, CH, NTH, GENERIC=False):
    """cp.async of an NR-row tile (CH 16-byte chunks per row) of src[row0 + r, head, :] into shared rows of STR
    words, zero-filled past ``nvalid`` rows and past the row's end: each thread copies one fixed chunk column of
    every (NTH / CH)-th row, a trip count fixed at compile time (the generic loader when CH does not divide NTH,
    or when GENERIC)."""
    if GENERIC or NTH % CH:
        load_rows = make_tc_helpers(False, STR, CH, NTH)[1]

        @dev
        def load_generic(smem, dst0, src, row0, nvalid, head, tid):
            load_rows(smem, dst0, src, row0, NR, nvalid, head, tid)

        return load_generic
    RPI = NTH // CH
    NPASS = -(-NR // RPI)
    EVEN = NR % RPI == 0
    cp16 = intr.cp_async16

    @dev
    def load(smem, dst0, src, row0, nvalid, head, tid):
        W = src.shape[2]
        HS = src.shape[1]
        r = tid // CH
        ch = tid - r * CH
        okc = ch * 4 < W
        base = ((row0 + r) * HS + head) * W + ch * 4
        step = RPI * HS * W
        dst = dst0 + r * STR + ch * 4
        for i in range(NPASS):
            rr = r + i * RPI
            if EVEN or rr < NR:
                ok = okc and rr < nvalid
                cp16(smem, dst + i * RPI * STR, src, base + i * step if ok else 0, 16 if ok else 0)

    return load


#: lazy rescale (``make_online_softmax(LAZY=)``): how far (log2 units) a tile's row max may pass the running max
#: before the max moves and O and l are rescaled
LAZY_LOG2 = 8.0


@dev
def col_bounds(row, base, Sk, off, left, right):
    """Visible key columns of query ``row`` at or after column ``base``, as int32 (lo, hi): column base + c (c >= 0)
    is visible iff lo <= c <= hi (``row_span`` over the keys [base, Sk))."""
    c0, c1 = row_span(row, off, left, right, base, Sk - base)
    return int32(c0), int32(c1 - 1)


@functools.lru_cache(maxsize=None)
def make_online_softmax(S_LEN, NT_O, HAS_CAP, HAS_ALIBI, HAS_DROP, LAZY=0.0, ROWBOUNDS=False):
    """The per-tile online softmax of the tensor-core forward kernels (prefill and decode) on the mma.sync
    accumulator layout: S_LEN score and NT_O * 4 output accumulators per thread.
    LAZY > 0 (log2 units): the running maxes move, and O and l are rescaled, only when some row of the warp
    (a vote) sees a tile max above its running max + LAZY; otherwise the old maxes stay and P <= 2^LAZY.
    The result (O / l, m + log2 l) is the same; a tile that moves no max costs no rescale.
    ROWBOUNDS: the mask compares each element's column offset (a compile-time constant) with its row's visible
    column bounds (``col_bounds``, once per row and tile, 32-bit) instead of evaluating ``visible`` (64-bit
    arithmetic) per element."""

    @dev
    def softmax_tile(sacc, sb, oacc, ob, m_a, m_b, l_a, l_b, ra, rb, rk_a, rk_b, j0, t, need_mask, Sk, off,
                     left, right, slope_a, slope_b, scale_log2, softcap, cap_in, thresh, inv_keep):
        """Online softmax of one m-tile's S accumulators sacc[sb:sb+S_LEN] (this thread's rows ra, rb; columns
        j0 + (y >> 2) * 8 + 2 t + (y & 1)) in log2 units: softcap, ALiBi (slope per row), mask (columns >= Sk
        are masked too), running max / sum update, dropout, P written back in place, O accumulators
        oacc[ob:ob+O_LEN] rescaled. Returns the new (m_a, m_b, l_a, l_b); l is this lane's partial sum."""
        mx_a = F32_NEG_INF
        mx_b = F32_NEG_INF
        lo_a = hi_a = lo_b = hi_b = int32(0)
        if ROWBOUNDS and need_mask:
            lo_a, hi_a = col_bounds(ra, j0 + 2 * t, Sk, off, left, right)
            lo_b, hi_b = col_bounds(rb, j0 + 2 * t, Sk, off, left, right)
        for y in range(S_LEN):
            s = sacc[sb + y]
            if HAS_CAP:
                s = softcap * math.tanh(s * cap_in) * F32_LOG2E
            else:
                s = s * scale_log2
            col = j0 + (y >> 2) * 8 + 2 * t + (y & 1)
            row = ra if (y & 2) == 0 else rb
            if HAS_ALIBI:
                s -= (slope_a if (y & 2) == 0 else slope_b) * float32(abs(row + off - col))
            if need_mask:
                if ROWBOUNDS:
                    c = int32((y >> 2) * 8 + (y & 1))
                    if (y & 2) == 0:
                        if c < lo_a or c > hi_a:
                            s = F32_NEG_INF
                    elif c < lo_b or c > hi_b:
                        s = F32_NEG_INF
                elif not visible(row, col, Sk, off, left, right):
                    s = F32_NEG_INF
            sacc[sb + y] = s
            if (y & 2) == 0:
                mx_a = max(mx_a, s)
            else:
                mx_b = max(mx_b, s)
        mx_a = max(mx_a, shfl_xor(mx_a, 1))
        mx_a = max(mx_a, shfl_xor(mx_a, 2))
        mx_b = max(mx_b, shfl_xor(mx_b, 1))
        mx_b = max(mx_b, shfl_xor(mx_b, 2))
        mn_a = max(m_a, mx_a)
        mn_b = max(m_b, mx_b)
        move = True
        if LAZY > 0:  # a row whose running max is -inf moves on its first finite score (-inf + LAZY = -inf)
            move = vote_any((mx_a > m_a + float32(LAZY)) | (mx_b > m_b + float32(LAZY)))
            if not move:
                mn_a = m_a
                mn_b = m_b
        mu_a = F32_ZERO if mn_a == F32_NEG_INF else mn_a
        mu_b = F32_ZERO if mn_b == F32_NEG_INF else mn_b
        alpha_a = F32_ONE
        alpha_b = F32_ONE
        if move:
            alpha_a = ex2(m_a - mu_a)
            alpha_b = ex2(m_b - mu_b)
        sum_a = F32_ZERO
        sum_b = F32_ZERO
        for y in range(S_LEN):
            if (y & 2) == 0:
                p = ex2(sacc[sb + y] - mu_a)
                sum_a += p
            else:
                p = ex2(sacc[sb + y] - mu_b)
                sum_b += p
            if HAS_DROP:  # dropout acts on P after the row sum, as in the math
                col = j0 + (y >> 2) * 8 + 2 * t + (y & 1)
                rk = rk_a if (y & 2) == 0 else rk_b
                p = p * inv_keep if col_hash(rk, col) >= thresh else F32_ZERO
            sacc[sb + y] = p
        if move:
            for nt in range(NT_O):
                oacc[ob + nt * 4] *= alpha_a
                oacc[ob + nt * 4 + 1] *= alpha_a
                oacc[ob + nt * 4 + 2] *= alpha_b
                oacc[ob + nt * 4 + 3] *= alpha_b
        return mn_a, mn_b, l_a * alpha_a + sum_a, l_b * alpha_b + sum_b

    return softmax_tile
