"""bootstrap_thresholds and cross_validate_thresholds.

Oracles: a population whose optimal F1 threshold is known in closed form (Gaussian scores per
target, so F1(t) is a formula of the normal CDF) for the coverage of the intervals; Python
loops re-doing the documented resampling / fold protocol, with the brute-force cut search and
counts of test_thresholds.py, for the plumbing; hand-derived values for degenerate classes.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import fusedloss
from fusedloss.thresholds import bootstrap_thresholds, cross_validate_thresholds, tune_thresholds
from test_thresholds import (
    oracle_counts,
    single_thread,  # noqa: F401  (autouse fixture)
)

PI, MU = 0.3, 1.5  # prevalence; positives ~ N(MU, 1), negatives ~ N(0, 1)


def population_f1(t: torch.Tensor) -> torch.Tensor:
    """F1 of the rule x > t in the population (expected counts per sample)."""
    tp = PI * torch.special.ndtr(MU - t)
    fp = (1 - PI) * torch.special.ndtr(-t)
    fn = PI * torch.special.ndtr(t - MU)
    return 2 * tp / (2 * tp + fp + fn)


def population_optimum() -> float:
    # F1(t) is unimodal here: a grid of step 1e-4, then golden-section refinement.
    t = torch.arange(-3.0, 5.0, 1e-4, dtype=torch.float64)
    c = t[population_f1(t).argmax()].item()
    lo, hi = c - 1e-4, c + 1e-4
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        fa, fb = population_f1(torch.tensor([a, b], dtype=torch.float64)).tolist()
        lo, hi = (a, hi) if fa < fb else (lo, b)
    return (lo + hi) / 2


def test_population_optimum_is_a_stationary_point():
    # The oracle itself: F1 at t* beats its neighbours, and t* is where the F1-optimality
    # condition of Lipton et al. holds (the calibrated posterior at t* equals F1* / 2).
    t = population_optimum()
    f = population_f1(torch.tensor([t - 1e-3, t, t + 1e-3], dtype=torch.float64)).tolist()
    assert f[1] > f[0] and f[1] > f[2]
    dens = lambda z: math.exp(-z * z / 2)  # noqa: E731
    posterior = PI * dens(t - MU) / (PI * dens(t - MU) + (1 - PI) * dens(t))
    assert posterior == pytest.approx(f[1] / 2, abs=1e-6)


def test_bootstrap_intervals_cover_the_population_optimum():
    # 200 independent data sets of 200 samples, one per column (the resampling draws rows, but
    # columns are independent, so each column is its own bootstrap). Measured here: 90%
    # intervals cover t* in 0.915 (n = 300, 400 sets) and 0.925 (n = 1000, 200 sets) of the
    # sets; the percentile bootstrap of an argmax is slightly conservative.
    t_star = population_optimum()
    g = torch.Generator().manual_seed(11)
    y = torch.rand(200, 200, generator=g) < PI
    x = torch.randn(200, 200, generator=g) + MU * y
    r = bootstrap_thresholds(x, y, resamples=100, level=0.9, seed=3)
    lo, hi = r.logit_threshold
    coverage = ((lo <= t_star) & (t_star <= hi)).double().mean().item()
    assert 0.82 <= coverage <= 0.99, coverage
    # 50% intervals are narrower and cover less.
    r50 = bootstrap_thresholds(x, y, resamples=100, level=0.5, seed=3)
    lo50, hi50 = r50.logit_threshold
    coverage50 = ((lo50 <= t_star) & (t_star <= hi50)).double().mean().item()
    assert 0.35 <= coverage50 <= 0.72, coverage50
    assert bool(((lo <= lo50) & (hi50 <= hi)).all())


def test_bootstrap_follows_its_documented_protocol():
    # Re-done by hand: resample i draws torch.randint(0, n, (n,)) from one CPU generator
    # seeded with `seed`; thresholds tuned on it; its out-of-bag rows decoded with them.
    g = torch.Generator().manual_seed(12)
    x = (torch.randint(-6, 7, (30, 3), generator=g) * 0.5).float()
    y = torch.rand(30, 3, generator=g) < torch.tensor([0.1, 0.4, 0.7])
    b, level = 25, 0.8
    r = bootstrap_thresholds(x, y, resamples=b, level=level, seed=9)
    draws = torch.Generator().manual_seed(9)
    cuts, oob = [], [[0, 0, 0] for _ in range(3)]
    for _ in range(b):
        idx = torch.randint(0, 30, (30,), generator=draws)
        t = tune_thresholds(x[idx], y[idx]).logit_threshold
        cuts.append(t.tolist())
        out = sorted(set(range(30)) - set(idx.tolist()))
        for c in range(3):
            cnt = oracle_counts(x[out, c].tolist(), y[out, c].tolist(), t[c].item())
            oob[c] = [a + v for a, v in zip(oob[c], cnt[:3], strict=True)]
    for c in range(3):
        col = sorted(row[c] for row in cuts)
        assert r.logit_threshold[0, c].item() == col[math.floor((1 - level) / 2 * (b - 1))]
        assert r.logit_threshold[1, c].item() == col[math.ceil((1 + level) / 2 * (b - 1))]
        tp, fp, fn = oob[c]
        want = 1.0 if 2 * tp + fp + fn == 0 else float(Fraction(2 * tp, 2 * tp + fp + fn))
        assert r.out_of_bag_score[c].item() == want
    assert r.positives.tolist() == y.sum(0).tolist()
    assert torch.equal(r.tuned.logit_threshold, tune_thresholds(x, y).logit_threshold)
    torch.testing.assert_close(r.threshold, torch.sigmoid(r.logit_threshold), rtol=0, atol=0)


def test_bootstrap_degenerate_classes():
    # Class 0: scores 0..9, no positives: every resample predicts nothing, its cut is the
    # largest score drawn plus 1 (9 + 1 when 9 was drawn), F1 = 0/0 := 1. Class 1: every score
    # 5, no positives: cut 6, and out of bag nothing is predicted either (F1 1). Class 2:
    # every score 2, all positive: every resample predicts all (cut 2 - 1 = 1, F1 = 1).
    x = torch.stack([torch.arange(10.0), torch.full((10,), 5.0), torch.full((10,), 2.0)], 1)
    y = torch.stack([torch.zeros(10), torch.zeros(10), torch.ones(10)], 1)
    r = bootstrap_thresholds(x, y, resamples=30, seed=1)
    assert r.score.tolist() == [[1.0] * 3, [1.0] * 3]
    assert r.logit_threshold[:, 1:].tolist() == [[6.0, 1.0], [6.0, 1.0]]
    lo, hi = r.logit_threshold[:, 0].tolist()
    assert 1.0 <= lo <= hi == 10.0
    assert r.out_of_bag_score[1:].tolist() == [1.0, 1.0]
    assert r.positives.tolist() == [0, 0, 10]


def test_bootstrap_micro_per_class_and_probabilities():
    g = torch.Generator().manual_seed(13)
    y = torch.rand(60, 3, generator=g) < 0.3
    p = torch.sigmoid(torch.randn(60, 3, generator=g) + 2 * y).double()
    r = bootstrap_thresholds(p, y, resamples=10, average="micro_per_class", from_logits=False)
    assert torch.equal(r.tuned.counts, tune_thresholds(p, y, average="micro_per_class",
                                                       from_logits=False).counts)
    assert bool((r.threshold[0] <= r.threshold[1]).all())
    assert bool((r.score[0] == r.score[0, 0]).all()), "micro: one score for every class"
    torch.testing.assert_close(r.logit_threshold, torch.logit(r.threshold), rtol=1e-12,
                               atol=0)


def oracle_tune_f1(vals, pos):
    """Lowest cut reaching the best F1 among every cut, placed by the documented rule (min - 1,
    midpoints, max + 1); exact with Fractions."""
    u = sorted(set(vals))
    cands = [u[0] - 1.0] + [(a + b) / 2 for a, b in zip(u, u[1:], strict=False)] + [u[-1] + 1.0]
    best, best_t = None, None
    for t in cands:
        tp, fp, fn, _ = oracle_counts(vals, pos, t)
        f = Fraction(1) if 2 * tp + fp + fn == 0 else Fraction(2 * tp, 2 * tp + fp + fn)
        if best is None or f > best:
            best, best_t = f, t
    return best_t


def test_cross_validation_against_a_by_hand_protocol():
    g = torch.Generator().manual_seed(14)
    x = (torch.randint(-8, 9, (40, 3), generator=g) * 0.25).float()
    y = torch.rand(40, 3, generator=g) < torch.tensor([0.05, 0.3, 0.6])
    folds = torch.arange(40) % 4
    r = cross_validate_thresholds(x, y, folds)
    tot = [[0, 0, 0] for _ in range(3)]
    fold_f1 = []
    for k in range(4):
        held = [i for i in range(40) if i % 4 == k]
        rest = [i for i in range(40) if i % 4 != k]
        row = []
        for c in range(3):
            t = oracle_tune_f1(x[rest, c].tolist(), y[rest, c].tolist())
            tp, fp, fn, _ = oracle_counts(x[held, c].tolist(), y[held, c].tolist(), t)
            tot[c] = [a + v for a, v in zip(tot[c], (tp, fp, fn), strict=True)]
            row.append(1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        fold_f1.append(row)
    assert r.counts.T.tolist() == tot
    f1 = lambda tp, fp, fn: 1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)  # noqa: E731
    assert r.score.tolist() == [f1(*t) for t in tot]
    assert r.fold_score.tolist() == fold_f1 and r.fold_ids.tolist() == [0, 1, 2, 3]
    at_half = [oracle_counts(x[:, c].tolist(), y[:, c].tolist(), 0.0)[:3] for c in range(3)]
    assert r.default_score.tolist() == [f1(*t) for t in at_half]
    assert torch.equal(r.tuned.logit_threshold, tune_thresholds(x, y).logit_threshold)


def test_cross_validation_micro_averages_and_shapes():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 30, 4, generator=g)
    y = torch.rand(2, 30, 4, generator=g) < 0.3
    folds = torch.randint(0, 3, (2, 30), generator=g)
    for average in ("micro", "micro_per_class"):
        r = cross_validate_thresholds(x, y, folds, average=average)
        flat_x, flat_y, flat_f = x.reshape(60, 4), y.reshape(60, 4), folds.reshape(60)
        counts = torch.zeros(3, 4, dtype=torch.int64)
        for k in range(3):
            t = tune_thresholds(flat_x[flat_f != k], flat_y[flat_f != k], average=average)
            lab = flat_x[flat_f == k] > t.logit_threshold
            yy = flat_y[flat_f == k]
            counts += torch.stack([(lab & yy).sum(0), (lab & ~yy).sum(0), (~lab & yy).sum(0)])
        assert torch.equal(r.counts, counts)
        tp, fp, fn = counts.sum(1).tolist()
        assert r.score.tolist() == [2 * tp / (2 * tp + fp + fn)] * 4
        assert len(r.fold_tuned) == 3 and r.fold_score.shape == (3, 4)


def test_resampling_bad_arguments():
    x, y = torch.zeros(6, 2), torch.zeros(6, 2)
    for kw, match in [({"resamples": 0}, "resamples"), ({"resamples": 2.0}, "resamples"),
                      ({"level": 1.0}, "level"), ({"seed": "a"}, "seed"),
                      ({"average": "macro"}, "average"), ({"seed": 2**70}, "seed")]:
        with pytest.raises(ValueError, match=match):
            bootstrap_thresholds(x, y, **kw)
    with pytest.raises(TypeError, match="level"):  # raised only after every resample
        bootstrap_thresholds(x, y, level="0.9", resamples=2)
    with pytest.raises(ValueError, match="at least 2 distinct fold ids"):
        cross_validate_thresholds(x, y, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"sample shape \(6,\)"):
        cross_validate_thresholds(x, y, torch.arange(5))
    with pytest.raises(TypeError, match="integer fold ids"):
        cross_validate_thresholds(x, y, torch.arange(6.0))
    with pytest.raises(TypeError, match="folds must be a Tensor"):
        cross_validate_thresholds(x, y, [0, 1, 0, 1, 0, 1])
    assert fusedloss.cross_validate_thresholds is cross_validate_thresholds
