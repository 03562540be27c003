"""average="micro_per_class" against a brute force over every combination of per-class cuts.

Oracle: for each class every labeling a threshold can produce (the cuts of
`test_thresholds.oracle_candidates`, applied with the strict rule `x > t` by Python loops),
then every combination of one cut per class (at most 13**3 here); the micro F-beta of the
summed counts is a `fractions.Fraction`, so the optimum and its ties are exact. The tie rule
checked: each class's cut predicts as many positives as the most any optimal combination
gives that class (the optimal set is a product over classes, see `_dinkelbach.py`).
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusedloss
from fusedloss import reference
from fusedloss.thresholds import ThresholdHistogram, tune_thresholds
from fusedloss.thresholds._dinkelbach import micro_per_class
from test_thresholds import (
    SETTINGS,
    columns,
    oracle_candidates,
    oracle_counts,
    single_thread,  # noqa: F401  (autouse fixture)
)


def micro_f(tp, fp, fn, b2: Fraction) -> Fraction:
    den = (1 + b2) * tp + b2 * fn + fp
    return Fraction(1) if den == 0 else (1 + b2) * tp / den


def brute_micro(x: torch.Tensor, y: torch.Tensor, beta: float):
    """(optimal micro F-beta as a Fraction, per class the most predicted among optima)."""
    b2 = Fraction(beta) ** 2
    per_class = [[oracle_counts(vals, pos, t)[:3] for t in oracle_candidates(vals)]
                 for vals, pos in columns(x, y)]
    best, most = None, None
    for combo in itertools.product(*per_class):
        f = micro_f(*(sum(cnt[i] for cnt in combo) for i in range(3)), b2)
        pred = [tp + fp for tp, fp, _ in combo]
        if best is None or f > best:
            best, most = f, pred
        elif f == best:
            most = [max(a, b) for a, b in zip(most, pred, strict=True)]
    return best, most


@st.composite
def small_cases(draw):
    """Up to 12 samples x 3 classes on a coarse grid (many ties); one class may have no
    positives, and sometimes no class has any."""
    n = draw(st.integers(1, 12))
    c = draw(st.integers(1, 3))
    vals = draw(st.lists(st.integers(-4, 4), min_size=n * c, max_size=n * c))
    ys = draw(st.lists(st.booleans(), min_size=n * c, max_size=n * c))
    x = torch.tensor(vals, dtype=torch.float32).reshape(n, c) * 0.5
    y = torch.tensor(ys).reshape(n, c)
    kind = draw(st.sampled_from(["random", "one_empty", "all_empty"]))
    if kind == "one_empty":
        y[:, draw(st.integers(0, c - 1))] = False
    elif kind == "all_empty":
        y[:] = False
    return x, y


@SETTINGS
@given(data=small_cases(), beta=st.sampled_from([1.0, 0.5, 2.0]))
def test_micro_per_class_matches_brute_force(data, beta):
    x, y = data
    metric, kw = ("f1", {}) if beta == 1.0 else ("fbeta", {"beta": beta})
    r = tune_thresholds(x, y, metric, average="micro_per_class", **kw)
    best, most = brute_micro(x, y, beta)
    # b2 in {1, 1/4, 4}: every term of the float64 metric is exact, so it is float(best).
    assert r.score.tolist() == [float(best)] * x.shape[1]
    tot = [0, 0, 0]
    for c, (vals, pos) in enumerate(columns(x, y)):
        tp, fp, fn, _ = oracle_counts(vals, pos, r.logit_threshold[c].item())
        assert r.counts[:, c].tolist() == [tp, fp, fn], "decoding reproduces the counts"
        assert tp + fp == most[c], "each class takes its lowest cut among the optima"
        tot = [a + b for a, b in zip(tot, (tp, fp, fn), strict=True)]
    assert micro_f(*tot, Fraction(beta) ** 2) == best


def _check_against_brute(x, y, beta=1.0):
    r = tune_thresholds(x, y, "fbeta", beta=beta, average="micro_per_class")
    best, most = brute_micro(x, y, beta)
    assert r.score[0].item() == float(best)
    pred = r.counts[0] + r.counts[1]
    assert pred.tolist() == most, (x, y)


def test_micro_per_class_every_target_pattern():
    # Ties between cuts at the optimum are rare in random data: enumerate them instead. Every
    # target pattern of 1..7 distinct scores (one class, plus an all-negative class that must
    # predict nothing), and every pair of patterns of 4 samples on two classes.
    for n in range(1, 8):
        x = torch.stack([torch.arange(n, dtype=torch.float32),
                         torch.arange(n, dtype=torch.float32).flip(0)], 1)
        for bits in range(2 ** n):
            y = torch.tensor([[(bits >> i) & 1, 0] for i in range(n)], dtype=torch.bool)
            _check_against_brute(x, y)
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 3.0], [3.0, 2.0]])
    for bits in range(2 ** 8):
        y = torch.tensor([[(bits >> (2 * i + j)) & 1 for j in range(2)] for i in range(4)],
                         dtype=torch.bool)
        for beta in (1.0, 0.5, 2.0):
            _check_against_brute(x, y, beta)


def test_micro_per_class_tie_goes_to_the_lowest_cut():
    # Class 0, scores 0..3 with targets 1, 0, 0, 1 (P = 2): predicting the top score gives
    # F1 = 2 / (2 + 1) and predicting all four 4 / (2 + 4), both 2/3, the optimum; class 1
    # has no positives and predicts nothing. The tie goes to the lowest cut: predict all.
    x = torch.tensor([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    y = torch.tensor([[1, 0], [0, 0], [0, 0], [1, 0]])
    r = tune_thresholds(x, y, average="micro_per_class")
    assert r.score[0].item() == 2 / 3
    assert r.logit_threshold.tolist() == [-1.0, 6.0]
    assert r.counts.tolist() == [[2, 0], [2, 0], [0, 0]]


@SETTINGS
@given(data=small_cases())
def test_micro_per_class_float_path(data):
    # beta = 0.3: b2 is a long binary fraction, so the scan compares in float64. The score is
    # the optimum up to rounding and the thresholds reproduce the counts.
    x, y = data
    r = tune_thresholds(x, y, "fbeta", beta=0.3, average="micro_per_class")
    best, _ = brute_micro(x, y, 0.3)
    assert r.score[0].item() == pytest.approx(float(best), abs=1e-12)
    labels = reference.sigmoid_decode(x, r.logit_threshold)
    assert torch.equal(reference.confusion_counts(labels, y.float()), r.counts)


def test_micro_per_class_beats_shared_and_per_class():
    # A rare, well-separated class and a common, overlapping one: the jointly optimal cuts
    # reach a micro-F1 at least that of every other choice (shared cut, per-class optima).
    g = torch.Generator().manual_seed(5)
    y = torch.rand(400, 4, generator=g) < torch.tensor([0.02, 0.1, 0.3, 0.5])
    x = torch.randn(400, 4, generator=g) + y * torch.tensor([3.0, 1.0, 0.5, 2.0])
    joint = tune_thresholds(x, y, average="micro_per_class")
    for other in (tune_thresholds(x, y, average="micro"), tune_thresholds(x, y)):
        tp, fp, fn = other.counts.sum(1).double()
        assert joint.score[0].item() >= (2 * tp / (2 * tp + fp + fn)).item()
    # Hand-checked micro-F1 of the returned counts.
    tp, fp, fn = joint.counts.sum(1).tolist()
    assert joint.score[0].item() == 2 * tp / (2 * tp + fp + fn)


def test_micro_per_class_hand_derived():
    # Class 0: scores 0, 1, 2 with targets 0, 1, 1. Class 1: scores 0, 1, 2 with targets
    # 1, 0, 0 (its positive is the lowest score). Jointly: class 0 predicts {1, 2} (TP 2), and
    # class 1 either predicts nothing (micro F1 = 4 / (4 + 0 + 1) = 0.8) or everything
    # (TP 3, FP 2: 6 / 8 = 0.75): nothing wins, cut above its maximum (2 + 1).
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    y = torch.tensor([[0, 1], [1, 0], [1, 0]])
    r = tune_thresholds(x, y, average="micro_per_class")
    assert r.score.tolist() == [0.8, 0.8]
    assert r.logit_threshold.tolist() == [0.5, 3.0]
    assert r.counts.tolist() == [[2, 0], [0, 0], [0, 1]]


def test_no_positives_anywhere_predicts_nothing():
    x = torch.tensor([[0.3, -1.0], [2.0, 0.0]])
    r, scans = micro_per_class(x, torch.zeros(2, 2, dtype=torch.bool), 1.0, True)
    assert scans == 0 and r.score.tolist() == [1.0, 1.0]
    assert r.logit_threshold.tolist() == [3.0, 1.0] and r.counts.sum().item() == 0


def test_micro_per_class_scans():
    # Dinkelbach's iteration from "predict everything": the number of per-class scans
    # (including the last, which confirms the optimum) on random problems of growing size.
    g = torch.Generator().manual_seed(6)
    counts = []
    for n, c in [(12, 3), (200, 5), (2000, 20)]:
        for _ in range(5):
            y = torch.rand(n, c, generator=g) < torch.rand(c, generator=g) * 0.3
            x = torch.randn(n, c, generator=g) + 2 * torch.rand(c, generator=g) * y
            for beta in (1.0, 0.5, 2.0):
                r, scans = micro_per_class(x, y, beta, True)
                counts.append(scans)
    assert max(counts) <= 8, counts
    assert 2 <= min(counts)


def test_chunked_micro_per_class(monkeypatch):
    import fusedloss.thresholds._scan as scan

    g = torch.Generator().manual_seed(7)
    x = torch.randn(60, 7, generator=g)
    y = torch.rand(60, 7, generator=g) < 0.2
    whole = tune_thresholds(x, y, average="micro_per_class")
    monkeypatch.setattr(scan, "_CHUNK_ELEMENTS", 2 * 61)  # two classes per block
    chunked = tune_thresholds(x, y, average="micro_per_class")
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)


def test_micro_per_class_probabilities_and_library_decoding():
    g = torch.Generator().manual_seed(8)
    x = (torch.randint(-20, 21, (80, 3), generator=g) * 0.37).double()
    y = torch.rand(80, 3, generator=g) < 0.3
    rl = tune_thresholds(x.float(), y, average="micro_per_class")
    rp = tune_thresholds(torch.sigmoid(x), y, average="micro_per_class", from_logits=False)
    assert torch.equal(rl.counts, rp.counts) and torch.equal(rl.score, rp.score)
    # The library's decoding with the tuned thresholds gives the tuned counts.
    out = fusedloss.binary_cross_entropy_with_logits(
        x.float(), y.float(), logit_threshold=rl.logit_threshold, return_counts=True)
    assert torch.equal(out.counts, rl.counts)


@pytest.mark.parametrize("metric,kw", [("balanced_accuracy", {}),
                                       ("precision_at_recall", {"min_recall": 0.5})])
def test_micro_per_class_rejects_other_metrics(metric, kw):
    with pytest.raises(ValueError, match="micro_per_class"):
        tune_thresholds(torch.zeros(3, 2), torch.zeros(3, 2), metric,
                        average="micro_per_class", **kw)


def test_histogram_rejects_micro_per_class():
    h = ThresholdHistogram(2, bins=4).update(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="average must be one of"):
        h.tune("f1", average="micro_per_class")
