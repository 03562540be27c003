"""Per-class decision thresholds for multi-label (sigmoid) classifiers.

A multi-label classifier decodes each class c by `x[:, c] > t[c]` in logit space (strict:
a logit exactly at the threshold is negative), the rule of `fusedloss.sigmoid_decode` and of
`binary_cross_entropy_with_logits(..., logit_threshold=...)`. A fixed `t = logit(0.5) = 0`
is rarely the best choice: a rare class whose scores never pass 0.5 is never predicted. This
module chooses `t` per class to maximise a metric on held-out data.

Two tools:
- `tune_thresholds(scores, targets, metric)`: the exact optimum on the given data. For one
  class the labels a threshold can produce are only "the k lowest scores negative, the rest
  positive" for k = 0..N, and only for k that cut between two distinct scores (a threshold
  cannot separate equal scores). Sorting each class's scores once and taking cumulative sums
  of its positives gives the confusion counts of every such cut, so the metric of every cut
  is known in O(N log N) per class; all classes are done at once by sorting along dim 0 of
  the (N, C) tensor, with torch ops on whatever device the scores are on.
- `ThresholdHistogram`: a streaming approximation for data that does not fit in memory or
  lives on several processes: per-class histograms of logits split by target, summed batch by
  batch and across processes, then tuned with the bin edges as the candidate cuts. The counts
  at an edge are the exact confusion counts of the data seen, so the answer is exact among
  edge cuts; its gap to the exact optimum is bounded by the samples of the bin that holds the
  exact cut (`ThresholdHistogram.gap_bound`).

Conventions (all metrics are in [0, 1], higher is better):
- A target is positive when `target > 0.5` (float, bool or integer targets), as in the
  library's counts.
- A ratio whose denominator is zero is 1: precision with nothing predicted, recall (and so
  the true-positive rate) of a class with no positives, the true-negative rate of a class with
  no negatives, and F-beta when there is nothing to find and nothing was found. So a class
  with no positives is tuned to predict nothing (F1 = 1), a class whose samples are all
  positive to predict everything. (scikit-learn's `zero_division` default is 0 instead, which
  would make every threshold equally bad for such a class.)
- Where several cuts reach the same metric value, the lowest one (most predicted positives,
  highest recall) is returned.
- Cut placement: between two adjacent distinct scores a < b the threshold is their midpoint,
  rounded into [a, b) in the result dtype so that `x > t` reproduces the cut exactly. The end
  cuts keep a margin so that they survive conversion between logit and probability space:
  for logits, "predict all" is the minimum minus 1 and "predict none" the maximum plus 1; for
  probabilities they are the midpoints with the outer bounds 0 and 1 (minimum / 2 and
  (maximum + 1) / 2). Where the margin is lost to rounding the cut is the next float below
  the minimum (a minimum probability of 0 gives a negative cut, logit -inf) or the maximum
  itself (a maximum probability of 1 gives the cut 1, logit +inf).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TunedThresholds", "tune_thresholds", "ThresholdHistogram", "METRICS"]

METRICS = ("f1", "fbeta", "precision_at_recall", "balanced_accuracy")
AVERAGES = ("per_class", "micro")

# Cap on (N + 1) * classes-per-chunk elements of each float64 work array in tune_thresholds
# (about 8 such arrays live at once: 2**24 elements is 128 MiB each). Chosen so that a
# 1M-sample x 1k-class validation set does not need tens of GB; a chunk holds at least one class.
_CHUNK_ELEMENTS = 1 << 24


class TunedThresholds(NamedTuple):
    """Result of `tune_thresholds` / `ThresholdHistogram.tune`, one entry per class.

    logit_threshold: (C,) decision rule `x > logit_threshold` on logits (exact when tuned
        from logits: pass it as `logit_threshold=` to the library). Float32 for float32 /
        half logits; float64 for float64 logits, whose cut the library's decoding (float32
        thresholds, docs/OPS.md) reproduces only where it is representable in float32.
    threshold: (C,) the same cut in probability space, `p > threshold` (exact when tuned from
        probabilities; from logits it is `sigmoid(logit_threshold)`, which rounds to 0 or 1
        for |logit| beyond ~17 in float32).
    score: (C,) float64, the metric reached on the tuning data (for average="micro" the
        micro metric, repeated for every class).
    counts: (3, C) int64 [TP, FP, FN] per class at the chosen cut, the layout of the
        library's `return_counts=True`.
    """

    logit_threshold: Tensor
    threshold: Tensor
    score: Tensor
    counts: Tensor


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 / 0 := 1 (see the module docstring)."""
    return torch.where(den == 0, torch.ones_like(num), num / torch.where(den == 0, 1.0, den))


def _metric(tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor, metric: str, beta: float,
            min_recall: float | None) -> Tensor:
    """Metric (float64) of each cut from integer confusion counts; -inf where infeasible."""
    tp, fp, fn, tn = (t.to(torch.float64) for t in (tp, fp, fn, tn))
    if metric in ("f1", "fbeta"):
        b2 = float(beta) ** 2
        # With b2 = 1 every term is an exact integer in float64, so equal ratios compare equal.
        return _ratio((1.0 + b2) * tp, (1.0 + b2) * tp + b2 * fn + fp)
    if metric == "balanced_accuracy":
        return 0.5 * (_ratio(tp, tp + fn) + _ratio(tn, tn + fp))
    # precision_at_recall: the best precision among cuts whose recall reaches min_recall.
    recall = _ratio(tp, tp + fn)
    precision = _ratio(tp, tp + fp)
    return torch.where(recall >= min_recall, precision, torch.full_like(precision, -torch.inf))


def _check_metric(metric: str, beta: float, min_recall: float | None, average: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if metric == "fbeta":
        if not (float(beta) > 0 and float(beta) < float("inf")):
            raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    elif beta != 1.0:
        raise ValueError(f"beta is only used by metric='fbeta', got beta={beta!r} with "
                         f"metric={metric!r}")
    if metric == "precision_at_recall":
        if min_recall is None or not (0.0 < float(min_recall) <= 1.0):
            raise ValueError("metric='precision_at_recall' needs min_recall in (0, 1], got "
                             f"min_recall={min_recall!r}")
    elif min_recall is not None:
        raise ValueError(f"min_recall is only used by metric='precision_at_recall', got "
                         f"min_recall={min_recall!r} with metric={metric!r}")


def _as_positive(targets: Tensor, shape: torch.Size, name: str = "targets") -> Tensor:
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(targets).__name__}")
    if targets.shape != shape:
        raise ValueError(f"{name} must have the scores' shape {tuple(shape)}, got "
                         f"{tuple(targets.shape)}")
    if targets.dtype == torch.bool:
        return targets
    if targets.is_complex():
        raise TypeError(f"{name} must be real (float, bool or integer), got {targets.dtype}")
    if targets.is_floating_point():
        if bool(torch.isnan(targets).any()):
            raise ValueError(f"{name} contains NaN")
        return targets > 0.5
    return targets > 0  # integer targets: 0 / 1 (anything > 0.5 is positive)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The library compares in float64 for float64 logits and in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _below(x: Tensor) -> Tensor:
    """The largest representable value strictly below x (same dtype)."""
    return torch.nextafter(x, torch.full_like(x, -torch.inf))


def _below_all(lowest: Tensor, from_logits: bool) -> Tensor:
    """The "predict all" cut: 1 below the lowest logit, or midway between 0 and the lowest
    probability.

    A margin (rather than the next float down) keeps the cut on the same side of the data
    after conversion between logit and probability space. Where the margin is lost to
    rounding (|logit| >= 2**25 in float32) or the lowest probability is 0, the next
    representable value below is used (for probabilities a negative cut, logit -inf).
    """
    cut = lowest - 1.0 if from_logits else 0.5 * lowest
    return torch.where(cut < lowest, cut, _below(lowest))


def _above_all(highest: Tensor, from_logits: bool) -> Tensor:
    """The "predict none" cut: 1 above the highest logit, or midway between the highest
    probability and 1; the highest score itself where the margin is lost to rounding (the
    rule is strict, so nothing is predicted; a probability cut of 1 has logit +inf)."""
    cut = highest + 1.0 if from_logits else 0.5 * highest + 0.5
    return torch.where(cut > highest, cut, highest)


def _midpoint_cut(a: Tensor, b: Tensor) -> Tensor:
    """A threshold t with a <= t < b (a < b elementwise): the midpoint, rounded into [a, b).

    a/2 + b/2 cannot overflow; when a and b are adjacent floats the rounded midpoint may land
    on b, and then a itself is the cut (the rule is strict, so a stays negative).
    """
    mid = 0.5 * a + 0.5 * b
    return torch.where((mid >= b) | (mid < a), a, mid)


def _logit(p: Tensor) -> Tensor:
    """logit of a probability-space cut, in float64; cuts below 0 (predict all) give -inf."""
    p64 = p.to(torch.float64)
    out = torch.logit(p64.clamp(min=0.0))
    return torch.where(p64 < 0, torch.full_like(out, -torch.inf), out)


def _prepare(scores: Tensor, targets: Tensor, from_logits: bool):
    """Validate, return (scores (N, C) in the comparison dtype, positives (N, C) bool)."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if scores.dim() < 2:
        raise ValueError("scores must have shape (..., C) with the classes in the last dim and "
                         f"at least one sample dim, got shape {tuple(scores.shape)} (for a single "
                         "class pass scores[:, None])")
    if scores.numel() == 0:
        raise ValueError(f"scores must hold at least one sample and one class, got shape "
                         f"{tuple(scores.shape)}")
    pos = _as_positive(targets, scores.shape)
    if pos.device != scores.device:
        raise ValueError(f"targets is on {pos.device} but scores is on {scores.device}")
    x = scores.detach().to(_score_dtype(scores.dtype))
    if from_logits:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("scores (logits) must be finite: found NaN or +-inf")
    else:
        if bool(torch.isnan(x).any()) or bool(((x < 0) | (x > 1)).any()):
            raise ValueError("scores (probabilities, from_logits=False) must lie in [0, 1]: "
                             "found a value outside it or NaN")
    c = x.shape[-1]
    return x.reshape(-1, c), pos.reshape(-1, c)


def _tune_sorted(x: Tensor, pos: Tensor, metric: str, beta: float, min_recall: float | None,
                 from_logits: bool):
    """Exact tuning of every column of x (N, C). Returns (cut (C,), score (C,), counts (3, C))."""
    n = x.shape[0]
    vals, order = torch.sort(x, dim=0)
    ysorted = pos.gather(0, order).to(torch.int64)
    # Cut k (k = 0..N) predicts the k lowest scores negative. cum_pos[k] = positives among them.
    zeros = torch.zeros(1, x.shape[1], dtype=torch.int64, device=x.device)
    cum_pos = torch.cat([zeros, ysorted.cumsum(0)], 0)  # (N + 1, C)
    k = torch.arange(n + 1, device=x.device, dtype=torch.int64)[:, None]
    n_pos = cum_pos[-1:]
    fn = cum_pos
    tp = n_pos - fn
    tn = k - cum_pos
    fp = (n - n_pos) - tn
    score = _metric(tp, fp, fn, tn, metric, beta, min_recall)
    # Interior cut k separates vals[k-1] and vals[k]: only possible when they differ.
    distinct = vals[1:] > vals[:-1]  # (N - 1, C)
    valid = torch.cat([torch.ones_like(zeros, dtype=torch.bool), distinct,
                       torch.ones_like(zeros, dtype=torch.bool)], 0)
    score = torch.where(valid, score, torch.full_like(score, -torch.inf))
    best = score.argmax(0)  # first maximum = lowest cut on ties
    best_score = score.gather(0, best[None])[0]
    # Threshold of cut k: below min (k = 0), at max (k = N), else the midpoint of its neighbours.
    lo = vals.gather(0, (best - 1).clamp(min=0)[None])[0]
    hi = vals.gather(0, best.clamp(max=n - 1)[None])[0]
    interior = _midpoint_cut(lo, torch.maximum(hi, lo))  # (hi = lo where best is 0 or N)
    cut = torch.where(best == 0, _below_all(vals[0], from_logits),
                      torch.where(best == n, _above_all(vals[-1], from_logits), interior))
    counts = torch.stack([tp.gather(0, best[None])[0], fp.gather(0, best[None])[0],
                          fn.gather(0, best[None])[0]])
    return cut, best_score, counts


def _finish(cut: Tensor, score: Tensor, counts: Tensor, from_logits: bool) -> TunedThresholds:
    if from_logits:
        logit_t = cut
        prob_t = torch.sigmoid(cut.to(torch.float64)).to(cut.dtype)
    else:
        prob_t = cut
        logit_t = _logit(cut).to(cut.dtype)
    return TunedThresholds(logit_t, prob_t, score, counts)


def tune_thresholds(scores: Tensor, targets: Tensor, metric: str = "f1", *, beta: float = 1.0,
                    min_recall: float | None = None, from_logits: bool = True,
                    average: str = "per_class") -> TunedThresholds:
    """Per-class thresholds that maximise `metric` on (scores, targets), exactly.

    Args:
        scores: (..., C) logits (`from_logits=True`) or probabilities in [0, 1]; classes are
            the last dim, leading dims are samples. Any float dtype, any device; compared in
            float32 (float64 for float64 input), as the library's decoding does.
        targets: same shape; positive when > 0.5 (float, bool or integer).
        metric: "f1"; "fbeta" (uses `beta`); "precision_at_recall" (the highest precision
            among cuts with recall >= `min_recall`); "balanced_accuracy" ((TPR + TNR) / 2).
        average: "per_class" (one threshold per class, each maximising the class's metric) or
            "micro" (one threshold shared by all classes maximising the metric of the counts
            summed over classes, e.g. micro-F1).

    Returns `TunedThresholds(logit_threshold, threshold, score, counts)`: see its docstring and
    the module docstring for the tie, zero-division and cut-placement rules. Thresholds have
    the comparison dtype (float32, or float64 for float64 scores); decoding the tuning data
    with `x > logit_threshold` (or `p > threshold` when tuned from probabilities) gives
    exactly `counts` and `score`.

    Cost: one sort of the (N, C) scores plus O(N C) elementwise work, chunked over classes so
    the float64 work arrays stay under ~128 MiB each. Validation synchronises with the device.
    """
    _check_metric(metric, beta, min_recall, average)
    x, pos = _prepare(scores, targets, from_logits)
    n, c = x.shape
    if average == "micro":
        cut, score, counts = _tune_sorted(x.reshape(-1, 1), pos.reshape(-1, 1), metric, beta,
                                          min_recall, from_logits)
        tuned = _finish(cut, score, counts, from_logits)
        return TunedThresholds(tuned.logit_threshold.expand(c).clone(),
                               tuned.threshold.expand(c).clone(), tuned.score.expand(c).clone(),
                               _micro_counts_per_class(x, pos, cut))
    step = max(1, _CHUNK_ELEMENTS // (n + 1))
    parts = [_tune_sorted(x[:, i:i + step], pos[:, i:i + step], metric, beta, min_recall,
                          from_logits) for i in range(0, c, step)]
    cut = torch.cat([p[0] for p in parts])
    score = torch.cat([p[1] for p in parts])
    counts = torch.cat([p[2] for p in parts], 1)
    return _finish(cut, score, counts, from_logits)


def _micro_counts_per_class(x: Tensor, pos: Tensor, cut: Tensor) -> Tensor:
    """Per-class [TP, FP, FN] of the shared threshold (the micro counts are their sum)."""
    lab = x > cut
    return torch.stack([(lab & pos).sum(0), (lab & ~pos).sum(0), (~lab & pos).sum(0)])


class ThresholdHistogram:
    """Streaming per-class threshold tuning from histograms of logits split by target.

    `hist = ThresholdHistogram(C, bins=1024, range=(-16.0, 16.0))`, then per batch
    `hist.update(logits, targets)`; across processes `hist.all_reduce()`; finally
    `hist.tune("f1")` returns `TunedThresholds` like `tune_thresholds`.

    Bins: the edges e_0 < ... < e_B (B+1 values: `bins` equal-width bins over `range`, or a
    1-D tensor of increasing edges) in logit space. Bin 0 holds x <= e_0, bin j (1..B) holds
    e_{j-1} < x <= e_j, bin B+1 holds x > e_B. Right-closed bins match the strict decision rule:
    cutting at e_j labels exactly bins 0..j negative, so the counts at every edge are the exact
    confusion counts of the data seen, and `tune` returns the best edge (lowest on ties) with
    its exact score. Cuts are edges only: choose `range` to cover the logits (a class with no
    positives is then tuned to `e_B`, predicting only logits above the range).

    Gap to the exact optimum (`tune_thresholds` on the same data): the exact cut lies in some
    bin j; moving it to an edge of that bin changes TP/FP/FN/TN by at most m_j, the samples in
    bin j. For F-beta this gives, with P the class's positives,
        exact - histogram <= max( max_{j>=1} m_j / (beta^2 P + m_j),
                                  (1 + beta^2) m_0 / (beta^2 P) )
    (move down to e_{j-1} for j >= 1; bin 0 has no lower edge, move up to e_0), and for
    balanced accuracy, with positives / negatives m+_j / m-_j and totals P / Q,
        exact - histogram <= max_j (m+_j / P + m-_j / Q) / 2.
    `gap_bound(metric, beta)` returns these (capped at 1). For precision_at_recall there is no
    such additive bound (the recall constraint can exclude the neighbouring edges), but the
    returned cut meets the recall constraint exactly on the data seen; when no edge does
    (positives at or below e_0), the score is -inf and the cut is e_0.

    Counts are int64 on `device` (the device of the first update if None). `update` validates
    its input and so synchronises once per batch.
    """

    def __init__(self, num_classes: int, bins: int | Tensor = 1024,
                 range: tuple[float, float] = (-16.0, 16.0),  # noqa: A002 (numpy's name)
                 device: torch.device | str | None = None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(bins, Tensor):
            edges = bins.detach().to(torch.float64).flatten().cpu()
            if edges.numel() < 1 or not bool(torch.isfinite(edges).all()):
                raise ValueError("bins (edges) must be a non-empty 1-D tensor of finite values")
        else:
            if not isinstance(bins, int) or bins < 1:
                raise ValueError(f"bins must be a positive int or a tensor of edges, got {bins!r}")
            lo, hi = (float(v) for v in range)
            if not (lo < hi) or not all(map(lambda v: abs(v) < float("inf"), (lo, hi))):
                raise ValueError(f"range must be (lo, hi) with finite lo < hi, got {range!r}")
            edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        # Edges live in float32, the dtype the library compares logits in (float32 values are
        # exact in float64, so float64 logits compare against the same numbers).
        edges32 = edges.to(torch.float32)
        if edges32.numel() > 1 and not bool((edges32[1:] > edges32[:-1]).all()):
            raise ValueError("bin edges must be strictly increasing in float32 (too many bins "
                             "for the range?)")
        self.num_classes = num_classes
        self.edges = edges32 if device is None else edges32.to(device)
        self.num_bins = edges32.numel() + 1  # including the two open-ended bins
        self.counts: Tensor | None = None  # (2, C, num_bins) int64: [negatives, positives]
        if device is not None:
            self._alloc(torch.device(device))

    def _alloc(self, device: torch.device) -> None:
        self.edges = self.edges.to(device)
        self.counts = torch.zeros(2, self.num_classes, self.num_bins, dtype=torch.int64,
                                  device=device)

    def reset(self) -> ThresholdHistogram:
        if self.counts is not None:
            self.counts.zero_()
        return self

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor) -> ThresholdHistogram:
        """Add a batch: logits (..., C) and targets of the same shape (positive when > 0.5)."""
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise TypeError("logits must be a floating-point Tensor, got "
                            f"{getattr(logits, 'dtype', type(logits).__name__)}")
        if logits.dim() < 1 or logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits must have shape (..., {self.num_classes}), got "
                             f"{tuple(logits.shape)}")
        pos = _as_positive(targets, logits.shape)
        if self.counts is None:
            self._alloc(logits.device)
        if logits.device != self.counts.device or pos.device != self.counts.device:
            raise ValueError(f"logits ({logits.device}) and targets ({pos.device}) must be on the "
                             f"histogram's device {self.counts.device}")
        x = logits.detach().to(_score_dtype(logits.dtype)).reshape(-1, self.num_classes)
        if bool(torch.isnan(x).any()):
            raise ValueError("logits contains NaN")
        # Bin index = number of edges strictly below x (right-closed bins, see the docstring).
        b = torch.searchsorted(self.edges.to(x.dtype), x.contiguous(), right=False)
        cls = torch.arange(self.num_classes, device=x.device)
        flat = pos.reshape(-1, self.num_classes).to(torch.int64) * (self.num_classes *
                                                                     self.num_bins)
        flat = flat + cls * self.num_bins + b
        self.counts += torch.bincount(flat.flatten(), minlength=self.counts.numel()).view_as(
            self.counts)
        return self

    def merge(self, other: ThresholdHistogram) -> ThresholdHistogram:
        """Add another histogram with the same classes and edges (e.g. from another worker)."""
        if (other.num_classes != self.num_classes or other.edges.numel() != self.edges.numel()
                or not torch.equal(other.edges.cpu(), self.edges.cpu())):
            raise ValueError("merge needs histograms with the same num_classes and bin edges")
        if other.counts is not None:
            if self.counts is None:
                self._alloc(other.counts.device)
            self.counts += other.counts.to(self.counts.device)
        return self

    def all_reduce(self, group=None) -> ThresholdHistogram:
        """Sum the counts over the processes of `group` (torch.distributed must be initialised).

        Every process must call it, after allocating the counts (an update, or `device=`).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
        if self.counts is None:
            raise RuntimeError("all_reduce before any update: pass device= to the constructor "
                               "so every process has counts to reduce")
        dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
        return self

    def _cum(self):
        if self.counts is None:
            raise RuntimeError("the histogram is empty: call update() first")
        # Cut at edge e_j (j = 0..B) labels bins 0..j negative.
        below = self.counts.cumsum(-1)[..., :-1]  # (2, C, B + 1)
        total = self.counts.sum(-1, keepdim=True)  # (2, C, 1)
        return below, total

    def tune(self, metric: str = "f1", *, beta: float = 1.0, min_recall: float | None = None,
             average: str = "per_class") -> TunedThresholds:
        """The best bin edge per class (or one shared edge for average="micro")."""
        _check_metric(metric, beta, min_recall, average)
        below, total = self._cum()
        tn, fn = below[0], below[1]
        fp, tp = total[0] - tn, total[1] - fn  # each (C, B + 1)
        if average == "micro":
            tp, fp, fn, tn = (t.sum(0, keepdim=True) for t in (tp, fp, fn, tn))
        score = _metric(tp, fp, fn, tn, metric, beta, min_recall)
        best = score.argmax(-1)  # lowest edge on ties
        pick = lambda t: t.gather(-1, best[:, None])[:, 0]
        cut = self.edges[best]
        if average == "micro":
            below_c, total_c = below[:, :, best[0]], total[..., 0]
            counts = torch.stack([total_c[1] - below_c[1], total_c[0] - below_c[0], below_c[1]])
            c = self.num_classes
            return TunedThresholds(cut.expand(c).clone(),
                                   torch.sigmoid(cut.double()).float().expand(c).clone(),
                                   pick(score).expand(c).clone(), counts)
        counts = torch.stack([pick(tp), pick(fp), pick(fn)])
        return TunedThresholds(cut, torch.sigmoid(cut.double()).float(), pick(score), counts)

    def gap_bound(self, metric: str = "f1", *, beta: float = 1.0) -> Tensor:
        """(C,) float64 upper bound on exact optimum minus `tune(metric)` score (per class)."""
        if metric not in ("f1", "fbeta", "balanced_accuracy"):
            raise ValueError(f"gap_bound supports 'f1', 'fbeta', 'balanced_accuracy', got "
                             f"{metric!r}")
        _check_metric(metric, beta, None, "per_class")
        if self.counts is None:
            raise RuntimeError("the histogram is empty: call update() first")
        neg, pos = self.counts.to(torch.float64)
        p = pos.sum(-1)
        if metric == "balanced_accuracy":
            q = neg.sum(-1)
            frac = lambda m, tot: torch.where(tot[:, None] == 0, 0.0, m / tot.clamp(min=1)[:, None])
            bound = (0.5 * (frac(pos, p) + frac(neg, q))).amax(-1)
        else:
            b2 = float(beta) ** 2
            m = pos + neg
            inner = (m[:, 1:] / (b2 * p[:, None] + m[:, 1:]).clamp(min=1e-300)).amax(-1)
            first = torch.where(m[:, 0] == 0, 0.0,
                                (1 + b2) * m[:, 0] / (b2 * p).clamp(min=1e-300))
            bound = torch.maximum(inner, first)
        return bound.clamp(max=1.0)
