"""Resampling around the exact tuner: how sure the thresholds are, and what tuning earns.

- `bootstrap_thresholds`: resample the samples (rows, all classes together, so the joint
  structure that "micro" averages depend on is kept) with replacement, tune each resample, and
  report percentile intervals of every class's threshold and tuned score. A class with few
  positives gets a wide threshold interval: its tuned threshold is mostly noise.
- `cross_validate_thresholds`: given out-of-fold scores and fold ids, tune on each fold's
  complement and decode the fold with those thresholds; the pooled held-out counts give the
  score that tuning earns on data it was not tuned on, next to the fixed 0.5 rule's score on
  the same data.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from ._core import (
    TunedThresholds,
    _average_score,
    _check_metric,
    _decode_counts,
    _logit,
    _prepare,
)
from ._exact import _tune


class ThresholdIntervals(NamedTuple):
    """Result of `bootstrap_thresholds`; (2, C) tensors are [lower, upper] per class.

    tuned: `TunedThresholds` on all the data: the thresholds to use.
    logit_threshold: (2, C) float64 percentile interval of the thresholds tuned on the
        resamples, in logit space (+-inf where a resample was cut outside (0, 1) in
        probability space).
    threshold: (2, C) the same interval in probability space.
    score: (2, C) float64 interval of the tuned score on each resample. It is in-sample (each
        resample scores its own thresholds) and so carries the optimism of tuning: read it as
        spread, and take held-out figures from `out_of_bag_score` or
        `cross_validate_thresholds`.
    out_of_bag_score: (C,) float64 metric of the confusion counts pooled over resamples, each
        resample's thresholds decoding the samples it did not draw (about 37% of them); NaN
        when no resample left any sample out (one sample).
    positives: (C,) int64 positives of each class in the data.
    """

    tuned: TunedThresholds
    logit_threshold: Tensor
    threshold: Tensor
    score: Tensor
    out_of_bag_score: Tensor
    positives: Tensor


class CrossValidatedThresholds(NamedTuple):
    """Result of `cross_validate_thresholds` (C classes, K folds).

    score: (C,) float64 held-out metric: the counts of every fold decoded with the thresholds
        tuned on its complement, summed over folds (per class, or pooled over classes for the
        "micro" averages, repeated per class).
    counts: (3, C) int64 those summed held-out [TP, FP, FN].
    default_score: (C,) float64 the same metric of the fixed rule logit > 0 (probability >
        0.5) on the same data: what tuning has to beat.
    fold_score: (K, C) float64 held-out metric of each fold alone.
    fold_ids: (K,) int64 the fold ids, ascending (the order of fold_score and fold_tuned).
    fold_tuned: K `TunedThresholds`, each tuned on the complement of its fold.
    tuned: `TunedThresholds` on all the data: the thresholds to use.
    """

    score: Tensor
    counts: Tensor
    default_score: Tensor
    fold_score: Tensor
    fold_ids: Tensor
    fold_tuned: tuple[TunedThresholds, ...]
    tuned: TunedThresholds


def _pooled(average: str) -> str:
    return "per_class" if average == "per_class" else "micro"


def _check_bootstrap(resamples: int, level: float, seed: int) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise TypeError(f"level must be a number, got {type(level).__name__}: {level!r}")
    if not (0.0 < float(level) < 1.0):
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must fit in 64 bits, got {seed!r}")


def _interval(samples: Tensor, level: float) -> Tensor:
    """(2, C) percentile interval of (B, C) samples: the order statistics at (1 - level) / 2
    (rounded down) and (1 + level) / 2 (rounded up), so no value is interpolated (and +-inf
    cuts stay meaningful)."""
    lo = torch.quantile(samples, (1.0 - level) / 2, dim=0, interpolation="lower")
    hi = torch.quantile(samples, (1.0 + level) / 2, dim=0, interpolation="higher")
    return torch.stack([lo, hi])


def bootstrap_thresholds(scores: Tensor, targets: Tensor, metric: str = "f1", *,
                         resamples: int = 200, level: float = 0.9, seed: int = 0,
                         beta: float = 1.0, min_recall: float | None = None,
                         from_logits: bool = True, average: str = "per_class"
                         ) -> ThresholdIntervals:
    """Percentile-bootstrap intervals of the thresholds `tune_thresholds` picks.

    Same arguments as `tune_thresholds`, plus `resamples` (bootstrap replicates, each a draw
    of N samples with replacement), `level` (central coverage of the intervals) and `seed`
    (the draws come from a CPU `torch.Generator`, so they are the same on every device).
    Returns `ThresholdIntervals`. Cost: `resamples` + 1 tunings.

    What the level means: for one class whose scores are Gaussian per target (an F1 optimum
    that is well defined), 90% intervals covered the population-optimal threshold in 91.5% to
    95.5% of data sets of 100 to 2000 samples (measured with 200 to 400 data sets per size;
    tests/test_thresholds_resample.py checks it): the percentile bootstrap of a tuned
    threshold is slightly conservative there, not exact. The score interval covers the
    population-optimal score less often (80% to 84% in the same simulation): it is in-sample.
    """
    _check_metric(metric, beta, min_recall, average)
    _check_bootstrap(resamples, level, seed)
    x, pos = _prepare(scores, targets, from_logits)
    n, c = x.shape
    tune = lambda xs, ps: _tune(xs, ps, metric, beta, min_recall, from_logits, average)
    g = torch.Generator().manual_seed(seed)
    cuts, tuned_scores = [], []
    oob = torch.zeros(3, c, dtype=torch.int64, device=x.device)
    oob_n = 0
    for _ in range(resamples):
        idx = torch.randint(0, n, (n,), generator=g).to(x.device)
        r = tune(x[idx], pos[idx])
        cut = r.logit_threshold if from_logits else r.threshold
        cuts.append(cut.to(torch.float64))
        tuned_scores.append(r.score)
        out = torch.ones(n, dtype=torch.bool, device=x.device)
        out[idx] = False
        oob += _decode_counts(x[out], pos[out], cut)
        oob_n += int(out.sum())
    cut_iv = _interval(torch.stack(cuts), level)
    if from_logits:
        logit_iv, prob_iv = cut_iv, torch.sigmoid(cut_iv)
    else:
        logit_iv, prob_iv = _logit(cut_iv), cut_iv
    oob_score = _average_score(oob, oob_n, metric, beta, min_recall, _pooled(average))
    if oob_n == 0:  # every resample drew every sample: no held-out data, no held-out score
        oob_score = torch.full_like(oob_score, float("nan"))
    return ThresholdIntervals(tune(x, pos), logit_iv, prob_iv,
                              _interval(torch.stack(tuned_scores), level), oob_score,
                              pos.sum(0))


def _check_folds(folds: Tensor, shape: torch.Size, device: torch.device) -> Tensor:
    if not isinstance(folds, Tensor):
        raise TypeError(f"folds must be a Tensor of fold ids, got {type(folds).__name__}")
    if folds.is_floating_point() or folds.is_complex() or folds.dtype == torch.bool:
        raise TypeError(f"folds must hold integer fold ids, got {folds.dtype}")
    if folds.shape != shape:
        raise ValueError(f"folds must have the scores' sample shape {tuple(shape)} (scores "
                         f"without the class dim), got {tuple(folds.shape)}")
    if folds.device != device:
        raise ValueError(f"folds is on {folds.device} but scores is on {device}")
    f = folds.reshape(-1).to(torch.int64)
    if torch.unique(f).numel() < 2:
        raise ValueError("folds must hold at least 2 distinct fold ids (each fold is scored "
                         f"with thresholds tuned on the others), got {torch.unique(f).tolist()}")
    return f


def cross_validate_thresholds(scores: Tensor, targets: Tensor, folds: Tensor,
                              metric: str = "f1", *, beta: float = 1.0,
                              min_recall: float | None = None, from_logits: bool = True,
                              average: str = "per_class") -> CrossValidatedThresholds:
    """Held-out score of threshold tuning: tune on each fold's complement, score the fold.

    scores / targets as for `tune_thresholds`, normally out-of-fold scores (each sample scored
    by a model that did not train on it); folds: integer fold ids of the samples, the scores'
    shape without the class dim, at least 2 distinct ids. The other arguments are those of
    `tune_thresholds`. For metric "precision_at_recall" a fold whose held-out recall misses
    `min_recall` scores -inf, as the metric defines it.
    Returns `CrossValidatedThresholds`. Cost: one tuning per fold plus one on all the data.
    """
    _check_metric(metric, beta, min_recall, average)
    x, pos = _prepare(scores, targets, from_logits)
    f = _check_folds(folds, scores.shape[:-1], x.device)
    score_of = lambda cnt, m: _average_score(cnt, m, metric, beta, min_recall,
                                             _pooled(average))
    ids = torch.unique(f)
    fold_tuned, fold_counts, fold_scores = [], [], []
    for i in ids.tolist():
        held = f == i
        r = _tune(x[~held], pos[~held], metric, beta, min_recall, from_logits, average)
        cnt = _decode_counts(x[held], pos[held], r.logit_threshold if from_logits
                             else r.threshold)
        fold_tuned.append(r)
        fold_counts.append(cnt)
        fold_scores.append(score_of(cnt, int(held.sum())))
    counts = torch.stack(fold_counts).sum(0)
    n, c = x.shape
    default_cut = torch.full((c,), 0.0 if from_logits else 0.5, dtype=x.dtype, device=x.device)
    default = score_of(_decode_counts(x, pos, default_cut), n)
    return CrossValidatedThresholds(
        score_of(counts, n), counts, default, torch.stack(fold_scores), ids, tuple(fold_tuned),
        _tune(x, pos, metric, beta, min_recall, from_logits, average))
