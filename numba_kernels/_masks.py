"""Attention mask geometry, written once as plain Python and compiled for each target
(``numba.njit`` on the CPU, ``cuda.jit(device=True)`` on the GPU).

Rows and columns are local to one sequence; ``off = Sk - Sq`` aligns the window bottom-right
(flash-attn): key j is visible from row i iff ``i + off - left <= j <= i + off + right``, -1 = unbounded.
"""


def key_range(i0, i1, Sq, Sk, left, right):
    """Visible key range [lo, hi) of query rows [i0, i1)."""
    off = Sk - Sq
    lo = 0
    hi = Sk
    if left >= 0:
        lo = max(0, i0 + off - left)
    if right >= 0:
        hi = min(Sk, i1 - 1 + off + right + 1)
    return lo, hi


def query_range(j0, j1, Sq, Sk, left, right):
    """Query rows [lo, hi) that see at least one key of [j0, j1)."""
    off = Sk - Sq
    lo = 0
    hi = Sq
    if right >= 0:
        lo = max(0, j0 - off - right)
    if left >= 0:
        hi = min(Sq, j1 - 1 - off + left + 1)
    return lo, hi


def visible(row, col, Sk, off, left, right):
    """Whether key ``col`` is visible from query ``row``."""
    ok = col < Sk
    if left >= 0:
        ok = ok and col >= row + off - left
    if right >= 0:
        ok = ok and col <= row + off + right
    return ok


def row_span(i, off, left, right, j0, n):
    """Visible columns [c0, c1) of row ``i`` inside the key block [j0, j0 + n) (c1 <= c0: none)."""
    c0 = 0
    c1 = n
    if left >= 0:
        c0 = min(n, max(0, i + off - left - j0))
    if right >= 0:
        c1 = max(0, min(n, i + off + right + 1 - j0))
    return c0, c1
