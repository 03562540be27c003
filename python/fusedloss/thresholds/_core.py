"""What every threshold tool shares: the result type, the metrics with their zero-division
rule, argument and input validation, and the placement of a cut between two scores.

The conventions themselves are stated once, in the package docstring (`fusedloss.thresholds`).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

METRICS = ("f1", "fbeta", "precision_at_recall", "balanced_accuracy")
AVERAGES = ("per_class", "micro", "micro_per_class")
# average="micro_per_class" maximises the micro F-beta (see _dinkelbach.py); the other metrics
# have no ratio-of-sums form that the per-class scan can split.
MICRO_PER_CLASS_METRICS = ("f1", "fbeta")


class TunedThresholds(NamedTuple):
    """Result of `tune_thresholds` / `ThresholdHistogram.tune`, one entry per class.

    logit_threshold: (C,) decision rule `x > logit_threshold` on logits (exact when tuned
        from logits: pass it as `logit_threshold=` to the library). Float32 for float32 /
        half logits; float64 for float64 logits, whose cut the library's decoding (float32
        thresholds, docs/OPS.md) reproduces only where it is representable in float32.
    threshold: (C,) the same cut in probability space, `p > threshold` (exact when tuned from
        probabilities; from logits it is `sigmoid(logit_threshold)`, which rounds to 0 or 1
        for |logit| beyond ~17 in float32).
    score: (C,) float64, the metric reached on the tuning data (for average="micro" and
        "micro_per_class" the micro metric, repeated for every class).
    counts: (3, C) int64 [TP, FP, FN] per class at the chosen cut, the layout of the
        library's `return_counts=True`.
    """

    logit_threshold: Tensor
    threshold: Tensor
    score: Tensor
    counts: Tensor


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 / 0 := 1 (see the package docstring)."""
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
        # (TPR + TNR) / 2 as one integer numerator over one denominator per class: positives p
        # and negatives q do not change with the cut, so equal scores compare equal (summed
        # as two rounded ratios, 2/3 came out as ...667 at one cut and ...666 at another, and
        # the tie went to the higher cut). Integers stay exact in float64 below 2^53.
        p, q = tp + fn, tn + fp
        num = torch.where(p == 0, q + tn, torch.where(q == 0, tp + p, tp * q + tn * p))
        den = torch.where(p == 0, 2 * q, torch.where(q == 0, 2 * p, 2 * p * q))
        return _ratio(num, den)
    # precision_at_recall: the best precision among cuts whose recall reaches min_recall.
    recall = _ratio(tp, tp + fn)
    precision = _ratio(tp, tp + fp)
    return torch.where(recall >= min_recall, precision, torch.full_like(precision, -torch.inf))


def _average_score(counts: Tensor, n: int, metric: str, beta: float,
                   min_recall: float | None, average: str) -> Tensor:
    """(C,) score of per-class [TP, FP, FN] counts of n samples per class: each class's metric
    (average="per_class"), or the metric of the summed counts repeated for every class."""
    tp, fp, fn = counts
    tn = n - tp - fp - fn
    if average == "per_class":
        return _metric(tp, fp, fn, tn, metric, beta, min_recall)
    pooled = _metric(tp.sum(), fp.sum(), fn.sum(), tn.sum(), metric, beta, min_recall)
    return pooled.expand(counts.shape[1]).clone()


def _check_metric(metric: str, beta: float, min_recall: float | None, average: str,
                  averages: tuple[str, ...] = AVERAGES) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if average not in averages:
        raise ValueError(f"average must be one of {averages}, got {average!r}")
    if average == "micro_per_class" and metric not in MICRO_PER_CLASS_METRICS:
        raise ValueError(f"average='micro_per_class' supports metric in "
                         f"{MICRO_PER_CLASS_METRICS}, got metric={metric!r}")
    if metric == "fbeta":
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"beta must be a number, got {type(beta).__name__}: {beta!r}")
        # beta^2 weighs recall: it must be finite too (1e200 ** 2 raised OverflowError later)
        if not (float(beta) > 0 and math.isfinite(float(beta) * float(beta))):
            raise ValueError(f"beta must be a positive number whose square is finite, got "
                             f"{beta!r}")
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


def _has_nan(x: Tensor) -> bool:
    """Whether a floating-point tensor holds a NaN: its max propagates NaN, a reduction with no
    bool tensor to write (4 ms against 22 ms for isnan().any() over 16.7M fp32 on one thread)."""
    return x.numel() > 0 and bool(torch.isnan(x.max()))


def _as_positive(targets: Tensor, shape: torch.Size, name: str = "targets",
                 keep_bytes: bool = False) -> Tensor:
    """Targets as positives (float: > 0.5, integer: > 0, bool as is), validated. With
    `keep_bytes`, uint8 targets are returned as they are and bool ones viewed as uint8, for the
    fused BCE pass, which reads them in place (y > 0.5, the same positives)."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(targets).__name__}")
    if targets.shape != shape:
        raise ValueError(f"{name} must have the scores' shape {tuple(shape)}, got "
                         f"{tuple(targets.shape)}")
    if targets.dtype == torch.bool:
        return targets.view(torch.uint8) if keep_bytes else targets
    if keep_bytes and targets.dtype == torch.uint8:
        return targets
    if targets.is_complex():
        raise TypeError(f"{name} must be real (float, bool or integer), got {targets.dtype}")
    if targets.is_floating_point():
        if _has_nan(targets):
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
    if not isinstance(from_logits, bool):
        raise TypeError(f"from_logits must be a bool, got {type(from_logits).__name__}: "
                        f"{from_logits!r}")
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


def _finish(cut: Tensor, score: Tensor, counts: Tensor, from_logits: bool) -> TunedThresholds:
    """Both representations of the cut (logit and probability) from the one that was tuned."""
    if from_logits:
        logit_t = cut
        prob_t = torch.sigmoid(cut.to(torch.float64)).to(cut.dtype)
    else:
        prob_t = cut
        logit_t = _logit(cut).to(cut.dtype)
    return TunedThresholds(logit_t, prob_t, score, counts)


def _decode_counts(x: Tensor, pos: Tensor, cut: Tensor) -> Tensor:
    """(3, C) int64 [TP, FP, FN] of the rule `x > cut` (cut (C,) broadcast over samples)."""
    lab = x > cut
    return torch.stack([(lab & pos).sum(0), (lab & ~pos).sum(0), (~lab & pos).sum(0)])
