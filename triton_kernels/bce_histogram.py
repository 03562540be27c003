"""The threshold histogram of the Triton sigmoid BCE forward (docs/OPS.md `sigmoid_bce_fwd`,
`hist_edges` / `hist_counts`), added by `_sigmoid_bce_kernel` when its HIST switch is set.

Each logit x of class c with target y is added to hist[y > 0.5, c, b], b = the number of edges
strictly below x (x compared in ACC against the float32 edges), with one int64 atomic per
element (integer sums: deterministic); NaN logits are left out. b is first guessed as
ceil((x - e_0) B / (e_B - e_0)), right for equal-width edges up to rounding (a logit equal to an
edge gives that edge's index, its bin); the edges e_{g-1} and e_g either confirm the guess g or
bracket b on one side of it, and a binary search over the bracket, run while any lane of the
tile is unresolved, finishes. The result is exact for any increasing edges; the search only
costs time where a guess was wrong.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def histogram_scale(edges_ptr, n_edges, ACC: tl.constexpr):
    """(e_0, B / (e_B - e_0)) in ACC for the bin guess; the scale is 0 for a single edge, where
    every guess is 0 and the checks decide."""
    e0 = tl.load(edges_ptr).to(ACC)
    span = tl.load(edges_ptr + (n_edges - 1)).to(ACC) - e0
    scale = tl.where(span > 0, (n_edges - 1) / tl.where(span > 0, span, 1.0), 0.0)
    return e0, scale.to(ACC)


@triton.jit
def _bin(x, valid, edges_ptr, n_edges, e0, scale):
    """The bin of each valid logit, the number of edges strictly below it (0 elsewhere): the
    equal-width guess g, checked against e_{g-1} and e_g, then a binary search over what those
    left open (see above)."""
    t = tl.ceil((x - e0) * scale)
    t = tl.where(t == t, tl.minimum(tl.maximum(t, 0.0), n_edges + 0.0), 0.0)  # NaN: guess 0
    g = t.to(tl.int32)
    lo = tl.zeros(x.shape, tl.int32)
    hi = tl.where(valid, n_edges, 0)
    check = valid & (g > 0)  # e_{g-1} < x: b >= g, else b < g
    below = tl.load(edges_ptr + (g - 1), mask=check, other=0.0).to(x.dtype) < x
    lo = tl.where(check & below, g, lo)
    hi = tl.where(check & ~below, g - 1, hi)
    check = valid & (g < n_edges)  # e_g < x: b > g, else b <= g
    below = tl.load(edges_ptr + g, mask=check, other=0.0).to(x.dtype) < x
    lo = tl.where(check & below, g + 1, lo)
    hi = tl.where(check & ~below, tl.minimum(hi, g), hi)
    while tl.max(hi - lo) > 0:  # no iteration when every guess was right
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(edges_ptr + mid, mask=active, other=0.0).to(x.dtype) < x
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return lo


@triton.jit
def histogram_add(x, y, mask, c2, C, edges_ptr, hist_ptr, n_edges, e0, scale):
    """Adds a tile to the (2, C, B + 2) int64 histogram, one integer atomic per counted element
    (order-independent sums); NaN logits are left out."""
    valid = mask & (x == x)
    b = _bin(x, valid, edges_ptr, n_edges, e0, scale)
    pos = (y > 0.5).to(tl.int64)
    cell = (pos * C + c2.to(tl.int64)) * (n_edges + 1) + b
    tl.atomic_add(hist_ptr + cell, tl.full(x.shape, 1, tl.int64), mask=valid, sem="relaxed")
