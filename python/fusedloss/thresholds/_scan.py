"""The per-class scan: every cut of every class from one sort.

For one class the labelings a threshold can produce are only "the k lowest scores negative,
the rest positive" for k = 0..N, and only for k that cut between two distinct scores (a
threshold cannot separate equal scores). Sorting each class's scores and taking cumulative
sums of its positives gives the confusion counts of every such cut (`_curves`), so any metric
of every cut is known in O(N log N) per class. All classes are done at once by sorting along
dim 0 of the (N, C) tensor, with torch ops on whatever device the scores are on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._core import _above_all, _below_all, _midpoint_cut

# Cap on (N + 1) * classes-per-chunk elements of each float64 work array in tune_thresholds
# (about 8 such arrays live at once: 2**24 elements is 128 MiB each). Chosen so that a
# 1M-sample x 1k-class validation set does not need tens of GB; a chunk holds at least one class.
_CHUNK_ELEMENTS = 1 << 24


class _Curves(NamedTuple):
    """Every cut of every column of an (N, c) block. Cut k (k = 0..N) labels the k lowest
    scores negative and the rest positive."""

    vals: Tensor  # (N, c) each column's scores, ascending
    cum_pos: Tensor  # (N + 1, c) int64: positives among the k lowest scores (= FN of cut k)
    valid: Tensor  # (N + 1, c) bool: cut k is reachable by a threshold

    def counts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(TP, FP, FN, TN) of every cut, each (N + 1, c) int64."""
        n = self.vals.shape[0]
        k = torch.arange(n + 1, device=self.vals.device, dtype=torch.int64)[:, None]
        n_pos = self.cum_pos[-1:]
        fn = self.cum_pos
        tp = n_pos - fn
        tn = k - fn
        fp = (n - n_pos) - tn
        return tp, fp, fn, tn


def _curves(x: Tensor, pos: Tensor) -> _Curves:
    vals, order = torch.sort(x, dim=0)
    ysorted = pos.gather(0, order).to(torch.int64)
    zeros = torch.zeros(1, x.shape[1], dtype=torch.int64, device=x.device)
    cum_pos = torch.cat([zeros, ysorted.cumsum(0)], 0)
    # Interior cut k separates vals[k-1] and vals[k]: only possible when they differ. The end
    # cuts (all positive, all negative) are always reachable.
    ends = torch.ones_like(zeros, dtype=torch.bool)
    valid = torch.cat([ends, vals[1:] > vals[:-1], ends], 0)
    return _Curves(vals, cum_pos, valid)


def _chunks(n: int, c: int) -> list[slice]:
    """Class slices whose work arrays stay under _CHUNK_ELEMENTS elements (>= 1 class each)."""
    step = max(1, _CHUNK_ELEMENTS // (n + 1))
    return [slice(i, min(i + step, c)) for i in range(0, c, step)]


def _cut_at(vals: Tensor, best: Tensor, from_logits: bool) -> Tensor:
    """(c,) threshold realising cut best[j] of sorted column vals[:, j] under `x > t`: below
    the minimum (cut 0), at or above the maximum (cut N), else the rounded midpoint of its two
    neighbours (rules in the package docstring)."""
    n = vals.shape[0]
    lo = vals.gather(0, (best - 1).clamp(min=0)[None])[0]
    hi = vals.gather(0, best.clamp(max=n - 1)[None])[0]
    interior = _midpoint_cut(lo, torch.maximum(hi, lo))  # (hi = lo where best is 0 or N)
    return torch.where(best == 0, _below_all(vals[0], from_logits),
                       torch.where(best == n, _above_all(vals[-1], from_logits), interior))


def _gather_counts(curves: _Curves, best: Tensor) -> Tensor:
    """(3, c) [TP, FP, FN] of cut best[j] of each column."""
    tp, fp, fn, _ = curves.counts()
    return torch.stack([t.gather(0, best[None])[0] for t in (tp, fp, fn)])
