"""Exact threshold tuning: `tune_thresholds` over the per-class scan of `_scan.py`."""

from __future__ import annotations

import torch
from torch import Tensor

from ._core import TunedThresholds, _check_metric, _decode_counts, _finish, _metric, _prepare
from ._dinkelbach import micro_per_class
from ._scan import _chunks, _curves, _cut_at


def _tune_sorted(x: Tensor, pos: Tensor, metric: str, beta: float, min_recall: float | None,
                 from_logits: bool):
    """Exact tuning of every column of x (N, C). Returns (cut (C,), score (C,), counts (3, C))."""
    curves = _curves(x, pos)
    tp, fp, fn, tn = curves.counts()
    score = _metric(tp, fp, fn, tn, metric, beta, min_recall)
    score = torch.where(curves.valid, score, torch.full_like(score, -torch.inf))
    best = score.argmax(0)  # first maximum = lowest cut on ties
    pick = lambda t: t.gather(0, best[None])[0]
    counts = torch.stack([pick(tp), pick(fp), pick(fn)])
    return _cut_at(curves.vals, best, from_logits), pick(score), counts


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
        average: "per_class" (one threshold per class, each maximising the class's metric),
            "micro" (one threshold shared by all classes maximising the metric of the counts
            summed over classes, e.g. micro-F1), or "micro_per_class" (one threshold per
            class, chosen jointly to maximise the micro metric; "f1" and "fbeta" only, exact
            by Dinkelbach's iteration over the per-class scan, see `_dinkelbach.py`).

    Returns `TunedThresholds(logit_threshold, threshold, score, counts)`: see its docstring and
    the package docstring for the tie, zero-division and cut-placement rules. Thresholds have
    the comparison dtype (float32, or float64 for float64 scores); decoding the tuning data
    with `x > logit_threshold` (or `p > threshold` when tuned from probabilities) gives
    exactly `counts` and `score`.

    Cost: one sort of the (N, C) scores plus O(N C) elementwise work (times the number of
    Dinkelbach scans for "micro_per_class", a handful), chunked over classes so the float64
    work arrays stay under ~128 MiB each. Validation synchronises with the device.
    """
    _check_metric(metric, beta, min_recall, average)
    x, pos = _prepare(scores, targets, from_logits)
    return _tune(x, pos, metric, beta, min_recall, from_logits, average)


def _tune(x: Tensor, pos: Tensor, metric: str, beta: float, min_recall: float | None,
          from_logits: bool, average: str) -> TunedThresholds:
    """tune_thresholds on validated (N, C) scores and bool positives."""
    c = x.shape[1]
    if average == "micro":
        cut, score, _ = _tune_sorted(x.reshape(-1, 1), pos.reshape(-1, 1), metric, beta,
                                     min_recall, from_logits)
        tuned = _finish(cut, score, None, from_logits)
        return TunedThresholds(tuned.logit_threshold.expand(c).clone(),
                               tuned.threshold.expand(c).clone(), tuned.score.expand(c).clone(),
                               _decode_counts(x, pos, cut))
    if average == "micro_per_class":
        return micro_per_class(x, pos, beta, from_logits)[0]
    parts = [_tune_sorted(x[:, s], pos[:, s], metric, beta, min_recall, from_logits)
             for s in _chunks(*x.shape)]
    cut = torch.cat([p[0] for p in parts])
    score = torch.cat([p[1] for p in parts])
    counts = torch.cat([p[2] for p in parts], 1)
    return _finish(cut, score, counts, from_logits)
