"""average="micro_per_class": one threshold per class, chosen jointly to maximise micro F-beta.

Why the answer is exact
-----------------------
Let P = sum_c P_c be the positives of all classes. A choice x picks one reachable cut per class
(the cuts of `_scan.py`: between two distinct scores, or below / above them all); with
TP = sum_c tp_c, K = sum_c (tp_c + fp_c) (predicted positives) and FN = P - TP,

    F(x) = (1 + b2) TP / ((1 + b2) TP + b2 FN + FP) = (1 + b2) TP / (b2 P + K),   b2 = beta^2.

1. P = 0: TP = 0, so F = 0 as soon as anything is predicted and F = 0/0 := 1 (the package's
   zero-division rule) when nothing is. The optimum is "predict none" in every class: no scan.
2. P > 0: D(x) = b2 P + K >= b2 P > 0 for every x. For a number lam let
   M(lam) = max_x N(x) - lam D(x), N = (1 + b2) TP. Then
   - N - lam D = sum_c [(1 + b2) tp_c - lam (tp_c + fp_c)] - lam b2 P is a sum of terms that
     each depend on one class's cut only. So M(lam) is the sum of per-class maxima, found by one
     scan of every class's sorted cuts, and the maximisers of N - lam D are exactly the
     choices that take a maximising cut in every class (a product set).
   - For lam = F(x_t), M(lam) >= N(x_t) - lam D(x_t) = 0, and M(lam) = 0 iff no choice has
     F > lam (D > 0), i.e. iff lam = F*, the optimum. Then N(x) - F* D(x) = 0 iff F(x) = F*:
     the maximisers at lam = F* are exactly the optimal choices.
   Dinkelbach's iteration: x_0 = predict everything in every class; x_{t+1} = the maximiser at
   lam_t = F(x_t) (per class, the lowest cut among the maximising ones). While M(lam_t) > 0,
   F(x_{t+1}) > lam_t strictly; F takes finitely many values, so the iteration stops, at the
   first t with F(x_{t+1}) = F(x_t) = F*. It converges superlinearly (Dinkelbach 1967).
3. The returned x_{t+1} is optimal and, since the optimal set is a product over classes, its
   per-class "lowest maximising cut" is the package's tie rule applied class by class: every
   class takes the lowest cut it has in any optimal choice (the most predicted positives).
   Its cut is placed by the same rule as every other average (`_scan._cut_at`), so decoding
   the data with the returned thresholds reproduces the chosen k_c, hence `counts`, hence
   `score` (the float64 metric of the summed counts, as average="micro" reports it).
4. Arithmetic. Write b2 = r / s exactly (Fraction of the float; beta = 1: 1/1, beta = 0.5:
   1/4, beta = 2: 4/1). Multiplying the per-class score by s D(x_t) / (1 + b2) > 0 changes
   no argmax and gives integers:
       h_c(k) = A tp_c(k) - B pred_c(k),   A = r P + s K_t,   B = s TP_t,
   with |h| <= (r + s) N^2 C. When that is below 2**62 (beta = 1: N^2 C up to 2.3e18, e.g.
   10^6 samples x 10^6 classes) h is computed in int64 and the stopping test
   F(x_{t+1}) > F(x_t) is a cross-multiplication of Python integers: every comparison is
   exact, ties included. Otherwise (a beta whose square is a long binary fraction, such as
   0.3, or a huge N^2 C) h is the float64 (1 + b2) tp - lam pred: ties closer than float64
   rounding may resolve either way, and the iteration stops at the first step that does not
   increase the float64 F, keeping the better of the last two choices.

Scans measured (each scan = one pass over every class's cuts; the count includes the last
scan, which confirms the optimum), from x_0 = predict everything, on random problems
(Gaussian scores shifted for positives, prevalences up to 30%, beta in {1, 0.5, 2}; 60 problems
per size): 12 samples x 3 classes: 2 to 4 scans; 100 x 5: 2 to 5; 1000 x 10: 3 to 5;
10^4 x 50: 4 to 6; 10^5 x 100: 4 to 6. `test_micro_per_class_scans` keeps it under 8.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

from ._core import TunedThresholds, _finish, _metric
from ._scan import _chunks, _curves, _cut_at, _gather_counts

# Float-path safety net only: the exact path stops by itself (point 2 above).
_MAX_FLOAT_SCANS = 100


def micro_per_class(x: Tensor, pos: Tensor, beta: float, from_logits: bool
                    ) -> tuple[TunedThresholds, int]:
    """Exact micro-F-beta-optimal per-class thresholds of validated (N, C) scores / positives.
    Returns (result, number of per-class scans)."""
    n, c = x.shape
    slices = _chunks(n, c)
    # One block of classes: sort once and keep it. Several: re-sort each block per scan, so
    # memory stays that of one block (the cost is one sort per block per scan).
    cached = [_curves(x[:, s], pos[:, s]) for s in slices] if len(slices) == 1 else None

    def blocks():
        return cached or (_curves(x[:, s], pos[:, s]) for s in slices)

    total_pos = int(pos.sum())
    if total_pos == 0:
        best = torch.full((c,), n, dtype=torch.int64, device=x.device)
        return _result(blocks(), slices, best, beta, from_logits), 0
    b2 = float(beta) ** 2
    r, s = Fraction(b2).as_integer_ratio()
    exact = (r + s) * n * n * c < 2**62
    best_t = torch.zeros(c, dtype=torch.int64, device=x.device)  # predict everything
    tp_t, k_t = total_pos, n * c
    scans = 0
    while exact or scans < _MAX_FLOAT_SCANS:
        scans += 1
        if exact:
            coef = (r * total_pos + s * k_t, s * tp_t)
        else:
            coef = (1.0 + b2, (1.0 + b2) * tp_t / (b2 * total_pos + k_t))
        best, tp_new, k_new = _scan_once(blocks(), slices, coef, n, c)
        d_t, d_new = r * total_pos + s * k_t, r * total_pos + s * k_new
        if tp_new * d_t > tp_t * d_new:  # F strictly increased: iterate
            best_t, tp_t, k_t = best, tp_new, k_new
            continue
        # F(x_{t+1}) == F(x_t) = F* (exact path); below only through float rounding.
        keep = best if tp_new * d_t == tp_t * d_new else best_t
        return _result(blocks(), slices, keep, beta, from_logits), scans
    return _result(blocks(), slices, best_t, beta, from_logits), _MAX_FLOAT_SCANS


def _scan_once(blocks, slices, coef, n: int, c: int) -> tuple[Tensor, int, int]:
    """Per class, the lowest cut maximising A tp - B pred; returns (cuts (C,), TP, K) with the
    summed true and predicted positives of that choice as Python ints."""
    a, b = coef
    best = None
    tp_sum = 0
    for curves, sl in zip(blocks, slices, strict=True):
        tp = curves.cum_pos[-1:] - curves.cum_pos  # (N + 1, c) TP of cut k
        k = torch.arange(n + 1, dtype=torch.int64, device=tp.device)[:, None]
        pred = n - k  # predicted positives of cut k, the same for every class
        if isinstance(a, int):
            h = a * tp - b * pred
            h = h.masked_fill(~curves.valid, torch.iinfo(torch.int64).min)
        else:
            h = a * tp.to(torch.float64) - b * pred.to(torch.float64)
            h = h.masked_fill(~curves.valid, -torch.inf)
        blk = h.argmax(0)  # first maximum = lowest cut on ties
        if best is None:
            best = torch.empty(c, dtype=torch.int64, device=blk.device)
        best[sl] = blk
        tp_sum += int(tp.gather(0, blk[None]).sum())
    return best, tp_sum, int((n - best).sum())


def _result(blocks, slices, best: Tensor, beta: float, from_logits: bool) -> TunedThresholds:
    cuts, counts = [], []
    for curves, sl in zip(blocks, slices, strict=True):
        cuts.append(_cut_at(curves.vals, best[sl], from_logits))
        counts.append(_gather_counts(curves, best[sl]))
    count = torch.cat(counts, 1)
    tp, fp, fn = count.sum(1)
    score = _metric(tp, fp, fn, torch.zeros_like(tp), "fbeta", beta, None)
    return _finish(torch.cat(cuts), score.expand(best.numel()).clone(), count, from_logits)
