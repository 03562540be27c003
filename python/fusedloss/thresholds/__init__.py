"""Per-class decision thresholds for multi-label (sigmoid) classifiers.

A multi-label classifier decodes each class c by `x[:, c] > t[c]` in logit space (strict:
a logit exactly at the threshold is negative), the rule of `fusedloss.sigmoid_decode` and of
`binary_cross_entropy_with_logits(..., logit_threshold=...)`. A fixed `t = logit(0.5) = 0`
is rarely the best choice: a rare class whose scores never pass 0.5 is never predicted. This
package chooses `t` per class to maximise a metric on held-out data.

Tools:
- `tune_thresholds(scores, targets, metric, average=...)` (`_exact.py`): the exact optimum on
  the given data, from one sort per class and a scan of every cut (`_scan.py`). Averages:
  "per_class" (each class its own metric), "micro" (one shared threshold for the pooled
  metric) and "micro_per_class" (one threshold per class, jointly maximising micro F-beta,
  exact by Dinkelbach's iteration over the same scan: `_dinkelbach.py`).
- `bootstrap_thresholds` (`_resample.py`): percentile-bootstrap intervals of every class's
  tuned threshold and score, so the classes whose thresholds are noise (few positives) show.
- `cross_validate_thresholds` (`_resample.py`): tune on each fold's complement, score the
  fold, pool: the held-out score of tuning, in one call.
- `ThresholdHistogram` (`_histogram.py`): a streaming approximation for data that does not
  fit in memory or lives on several processes: per-class histograms of logits split by
  target, summed batch by batch and across processes, then tuned with the bin edges as the
  candidate cuts. The counts at an edge are the exact confusion counts of the data seen, so
  the answer is exact among edge cuts; its gap to the exact optimum is bounded by the samples
  of the bin that holds the exact cut (`ThresholdHistogram.gap_bound`).

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
  highest recall) is returned; for "micro_per_class", where the optimal choices form a
  product over classes, every class gets the lowest cut it has in any optimal choice.
- Cut placement: between two adjacent distinct scores a < b the threshold is their midpoint,
  rounded into [a, b) in the result dtype so that `x > t` reproduces the cut exactly. The end
  cuts keep a margin so that they survive conversion between logit and probability space:
  for logits, "predict all" is the minimum minus 1 and "predict none" the maximum plus 1; for
  probabilities they are the midpoints with the outer bounds 0 and 1 (minimum / 2 and
  (maximum + 1) / 2). Where the margin is lost to rounding the cut is the next float below
  the minimum (a minimum probability of 0 gives a negative cut, logit -inf) or the maximum
  itself (a maximum probability of 1 gives the cut 1, logit +inf).
"""

from ._core import AVERAGES, METRICS, TunedThresholds
from ._exact import tune_thresholds
from ._histogram import ThresholdHistogram
from ._resample import (
    CrossValidatedThresholds,
    ThresholdIntervals,
    bootstrap_thresholds,
    cross_validate_thresholds,
)

__all__ = [
    "AVERAGES",
    "METRICS",
    "CrossValidatedThresholds",
    "ThresholdHistogram",
    "ThresholdIntervals",
    "TunedThresholds",
    "bootstrap_thresholds",
    "cross_validate_thresholds",
    "tune_thresholds",
]
