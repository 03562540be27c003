"""Threshold tuning (fusedloss.thresholds) against a brute-force search over every cut.

Oracle: for each class, every threshold that can change the labels (below all scores, the
midpoint of each pair of adjacent distinct scores computed in Python float64, at the maximum)
is applied with the library's strict rule `x > t`, the confusion counts are taken by Python
loops and the metric by its textbook formula with 0/0 := 1 (the module's documented
convention). Independent of the sort / cumsum implementation under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedloss
from fusedloss import reference
from fusedloss.thresholds import TunedThresholds, tune_thresholds

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are small: on the shared 2-core test machine, under load, two OpenMP
    threads cost 20x the CPU time of one (100 bootstrap tunings of 200 x 200 scores: 18.5 s
    vs 0.84 s CPU, measured). The other threshold test modules import this fixture."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------- the oracle
def _div(a, b):
    return 1.0 if b == 0 else a / b


def oracle_metric(tp, fp, fn, tn, metric, beta=1.0, min_recall=None):
    if metric in ("f1", "fbeta"):
        b2 = beta * beta
        return _div((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)
    if metric == "balanced_accuracy":
        return 0.5 * (_div(tp, tp + fn) + _div(tn, tn + fp))
    assert metric == "precision_at_recall"
    return _div(tp, tp + fp) if _div(tp, tp + fn) >= min_recall else -math.inf


def oracle_counts(values, positives, t):
    tp = sum(1 for v, y in zip(values, positives, strict=True) if v > t and y)
    fp = sum(1 for v, y in zip(values, positives, strict=True) if v > t and not y)
    fn = sum(1 for v, y in zip(values, positives, strict=True) if not v > t and y)
    tn = sum(1 for v, y in zip(values, positives, strict=True) if not v > t and not y)
    return tp, fp, fn, tn


def oracle_candidates(values):
    u = sorted(set(values))
    return [u[0] - 1.0] + [(a + b) / 2 for a, b in zip(u, u[1:], strict=False)] + [u[-1]]


def oracle_best(values, positives, metric, **kw):
    """(best metric, max #predicted among the cuts reaching it) over every cut."""
    results = []
    for t in oracle_candidates(values):
        tp, fp, fn, tn = oracle_counts(values, positives, t)
        results.append((oracle_metric(tp, fp, fn, tn, metric, **kw), tp + fp))
    best = max(r[0] for r in results)
    return best, max(n for s, n in results if s == best)


def columns(x: torch.Tensor, y: torch.Tensor):
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.reshape(-1, y.shape[-1]) > 0.5
    for c in range(x2.shape[1]):
        yield x2[:, c].tolist(), y2[:, c].tolist()


# ----------------------------------------------------------------------------- strategies
METRIC_KW = [
    ("f1", {}),
    ("fbeta", {"beta": 0.5}),
    ("fbeta", {"beta": 2.0}),
    ("balanced_accuracy", {}),
    ("precision_at_recall", {"min_recall": 0.5}),
    ("precision_at_recall", {"min_recall": 0.8}),
    ("precision_at_recall", {"min_recall": 1.0}),
]
# Exact ties are decidable only when the float metric is a single correctly rounded division
# of integers (F1, precision): for those the lowest-cut tie rule is checked too.
EXACT_TIES = {"f1", "precision_at_recall"}


@st.composite
def scored(draw, max_n=40, max_c=4):
    """(scores (N, C) float32 with many ties, targets (N, C) float with degenerate columns)."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    # Few distinct values -> many ties; quarter steps are exact in float32.
    vals = draw(st.lists(st.integers(-6, 6), min_size=n * c, max_size=n * c))
    kind = draw(st.sampled_from(["random", "none_pos", "all_pos", "rare"]))
    if kind == "random":
        ys = draw(st.lists(st.booleans(), min_size=n * c, max_size=n * c))
    elif kind == "none_pos":
        ys = [False] * (n * c)
    elif kind == "all_pos":
        ys = [True] * (n * c)
    else:
        ys = [i % 7 == 3 for i in range(n * c)]
    x = torch.tensor(vals, dtype=torch.float32).reshape(n, c) * 0.25
    y = torch.tensor(ys, dtype=torch.float32).reshape(n, c)
    return x, y


# ----------------------------------------------------------------------------- exact tuning
@pytest.mark.parametrize("metric,kw", METRIC_KW, ids=[f"{m}-{kw}" for m, kw in METRIC_KW])
@SETTINGS
@given(data=scored())
def test_matches_brute_force(metric, kw, data):
    x, y = data
    r = tune_thresholds(x, y, metric, **kw)
    assert isinstance(r, TunedThresholds)
    assert r.logit_threshold.shape == r.threshold.shape == r.score.shape == (x.shape[1],)
    assert r.logit_threshold.dtype == torch.float32 and r.counts.shape == (3, x.shape[1])
    for c, (vals, pos) in enumerate(columns(x, y)):
        best, most_predicted = oracle_best(vals, pos, metric, **kw)
        assert r.score[c].item() == pytest.approx(best, abs=1e-12)
        # The returned cut, applied with the library's rule, reaches exactly that score.
        t = r.logit_threshold[c].item()
        tp, fp, fn, tn = oracle_counts(vals, pos, t)
        assert r.counts[:, c].tolist() == [tp, fp, fn]
        assert oracle_metric(tp, fp, fn, tn, metric, **kw) == pytest.approx(best, abs=1e-12)
        if metric in EXACT_TIES:
            assert tp + fp == most_predicted, "ties go to the lowest cut"


@SETTINGS
@given(data=scored(max_n=30, max_c=3),
       metric_kw=st.sampled_from(METRIC_KW))
def test_micro_matches_brute_force(data, metric_kw):
    metric, kw = metric_kw
    x, y = data
    r = tune_thresholds(x, y, metric, average="micro", **kw)
    vals, pos = x.flatten().tolist(), (y.flatten() > 0.5).tolist()
    best, _ = oracle_best(vals, pos, metric, **kw)
    assert torch.all(r.logit_threshold == r.logit_threshold[0])
    assert r.score.tolist() == pytest.approx([best] * x.shape[1], abs=1e-12)
    t = r.logit_threshold[0].item()
    for c, (cv, cp) in enumerate(columns(x, y)):
        assert r.counts[:, c].tolist() == list(oracle_counts(cv, cp, t)[:3])


def test_hand_derived_example():
    # scores 0.1, 0.4, 0.35, 0.8 with targets 0, 0, 1, 1: predicting {0.35, 0.4, 0.8} gives
    # TP=2, FP=1, FN=0, F1 = 4/5, better than every other cut (all: 2/3, {0.4, 0.8}: 1/2,
    # {0.8}: 2/3, none: 0). The cut is the midpoint of 0.1 and 0.35.
    p = torch.tensor([[0.1], [0.4], [0.35], [0.8]], dtype=torch.float64)
    y = torch.tensor([[0], [0], [1], [1]])
    r = tune_thresholds(p, y, from_logits=False)
    assert r.score.item() == pytest.approx(0.8, abs=0)
    assert r.threshold.item() == pytest.approx(0.225, abs=1e-15)
    assert r.logit_threshold.item() == pytest.approx(math.log(0.225 / 0.775), abs=1e-12)
    assert r.counts[:, 0].tolist() == [2, 1, 0]
    # Balanced accuracy: the same cut gives TPR 1, TNR 1/2 -> 3/4; cut {0.8} gives 1/2 + ... =
    # (1/2 + 1)/2 = 3/4 too: the tie goes to the lower cut.
    r = tune_thresholds(p, y, "balanced_accuracy", from_logits=False)
    assert r.score.item() == 0.75 and r.threshold.item() == pytest.approx(0.225)
    # Precision at recall >= 1: keep both positives, drop as many negatives as possible.
    r = tune_thresholds(p, y, "precision_at_recall", min_recall=1.0, from_logits=False)
    assert r.score.item() == pytest.approx(2 / 3) and r.counts[:, 0].tolist() == [2, 1, 0]


def test_degenerate_classes():
    x = torch.tensor([[0.0, -1.0, 2.0, 0.5],
                      [1.0, 3.0, 2.0, 0.5],
                      [-2.0, 0.0, 2.0, 0.5]])
    # class 0: no positives; class 1: all positive; class 2: all scores equal, mixed targets;
    # class 3: all equal, no positives.
    y = torch.tensor([[0, 1, 1, 0],
                      [0, 1, 0, 0],
                      [0, 1, 1, 0]], dtype=torch.float32)
    r = tune_thresholds(x, y)
    # No positives: predict nothing (F1 = 0/0 := 1), the threshold is 1 above the maximum.
    assert r.logit_threshold[0].item() == 2.0 and r.score[0].item() == 1.0
    assert r.counts[:, 0].tolist() == [0, 0, 0]
    # All positive: predict everything, the threshold is 1 below the minimum logit.
    assert r.logit_threshold[1].item() == -2.0 and r.score[1].item() == 1.0
    # All equal, 2 of 3 positive: only "all" (F1 = 4/5) or "none" (F1 = 0) are possible.
    assert r.score[2].item() == pytest.approx(0.8) and r.counts[:, 2].tolist() == [2, 1, 0]
    assert r.logit_threshold[2].item() == 1.0
    assert r.score[3].item() == 1.0 and r.counts[:, 3].tolist() == [0, 0, 0]
    assert r.logit_threshold[3].item() == 1.5
    # The thresholds decode the data to exactly the reported counts (library reference rule).
    labels = reference.sigmoid_decode(x, r.logit_threshold)
    assert torch.equal(reference.confusion_counts(labels, y), r.counts)


def test_predict_all_margin_survives_huge_logits():
    # min - 1 == min in float32 for |min| >= 2**25: the cut falls back to the next float down.
    x = torch.tensor([[-1e8], [0.0]])
    r = tune_thresholds(x, torch.ones(2, 1))
    assert r.logit_threshold.item() < -1e8 and r.counts[:, 0].tolist() == [2, 0, 0]
    r = tune_thresholds(torch.tensor([[0.2], [0.6]]), torch.ones(2, 1), from_logits=False)
    assert r.threshold.item() == pytest.approx(0.1)
    r = tune_thresholds(torch.tensor([[0.2], [0.6]]), torch.zeros(2, 1), from_logits=False)
    assert r.threshold.item() == pytest.approx(0.8)
    r = tune_thresholds(torch.tensor([[1e8], [0.0]]), torch.zeros(2, 1))
    assert r.logit_threshold.item() == 1e8 and r.counts[:, 0].tolist() == [0, 0, 0]


def test_adjacent_floats_cut_exactly():
    # Two scores one float32 ulp apart: the midpoint rounds onto one of them; the cut must
    # still separate them under the strict rule.
    a = torch.tensor(1.0)
    b = torch.nextafter(a, torch.tensor(2.0))
    x = torch.stack([a, b, a, b])[:, None]
    y = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    r = tune_thresholds(x, y)
    assert r.score.item() == 1.0
    assert torch.equal(x[:, 0] > r.logit_threshold, y[:, 0] > 0.5)
    x64 = x.double()
    b64 = torch.nextafter(x64[0, 0], torch.tensor(2.0, dtype=torch.float64))
    x64 = torch.tensor([[1.0], [b64.item()], [1.0], [b64.item()]], dtype=torch.float64)
    r = tune_thresholds(x64, y)
    assert r.logit_threshold.dtype == torch.float64 and r.score.item() == 1.0
    assert torch.equal(x64[:, 0] > r.logit_threshold, y[:, 0] > 0.5)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 60), c=st.integers(1, 4),
       metric_kw=st.sampled_from(METRIC_KW), average=st.sampled_from(["per_class", "micro"]))
def test_logits_and_probabilities_agree(seed, n, c, metric_kw, average):
    # float64 logits in a range where sigmoid is strictly increasing in float64, so logits
    # and probabilities order (and tie) the samples identically.
    metric, kw = metric_kw
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-20, 21, (n, c), generator=g).double() * 0.37)
    y = torch.rand(n, c, generator=g) < 0.4
    p = torch.sigmoid(x)
    rl = tune_thresholds(x, y, metric, average=average, **kw)
    rp = tune_thresholds(p, y, metric, average=average, from_logits=False, **kw)
    torch.testing.assert_close(rl.score, rp.score, rtol=0, atol=1e-12)
    assert torch.equal(rl.counts, rp.counts)
    assert torch.equal(x > rl.logit_threshold, p > rp.threshold)
    # Each result's other representation decides the same way (cuts are midpoints or a
    # margin away from the data, and sigmoid does not saturate in this range).
    assert torch.equal(p > rl.threshold, x > rl.logit_threshold)
    finite = torch.isfinite(rp.logit_threshold)
    assert torch.equal((x > rp.logit_threshold)[:, finite], (p > rp.threshold)[:, finite])


def test_probability_end_cuts():
    p = torch.tensor([[0.0, 1.0], [0.5, 1.0]])
    y = torch.tensor([[1, 0], [1, 0]])
    r = tune_thresholds(p, y, from_logits=False)
    # class 0 all positive with a zero probability: the cut is below 0, logit -inf (with a
    # positive minimum it would be half the minimum).
    assert r.threshold[0].item() < 0 and r.logit_threshold[0].item() == -math.inf
    # class 1 no positives, scores at 1.0: the cut is 1.0, logit +inf; nothing is predicted
    # (with a maximum below 1 it would be midway between the maximum and 1).
    assert r.threshold[1].item() == 1.0 and r.logit_threshold[1].item() == math.inf
    assert r.score.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes_and_shapes(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 3, generator=g)
    y = (torch.rand(4, 5, 3, generator=g) < 0.5).to(torch.uint8)
    r = tune_thresholds(x.to(dtype), y)
    # K-dim input = the flattened (N, C) problem; half inputs are compared in float32.
    r2 = tune_thresholds(x.to(dtype).reshape(20, 3).float(), y.reshape(20, 3).bool())
    assert torch.equal(r.counts, r2.counts)
    torch.testing.assert_close(r.score, r2.score, rtol=0, atol=0)
    assert r.logit_threshold.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_scores_that_require_grad_give_plain_tensors():
    x = torch.randn(10, 2, requires_grad=True)
    r = tune_thresholds(x, torch.rand(10, 2) < 0.5)
    assert not any(t.requires_grad for t in r)


def test_chunked_classes_match(monkeypatch):
    import fusedloss.thresholds._scan as th

    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 7, generator=g)
    y = torch.rand(50, 7, generator=g) < 0.3
    full = tune_thresholds(x, y, "balanced_accuracy")
    monkeypatch.setattr(th, "_CHUNK_ELEMENTS", 2 * 51)  # two classes per chunk
    chunked = tune_thresholds(x, y, "balanced_accuracy")
    for a, b in zip(full, chunked, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(metric="accuracy"), "metric must be one of"),
    (dict(metric="f1", beta=2.0), "beta is only used"),
    (dict(metric="fbeta", beta=0.0), "beta must be"),
    (dict(metric="precision_at_recall"), "min_recall"),
    (dict(metric="precision_at_recall", min_recall=1.5), "min_recall"),
    (dict(metric="f1", min_recall=0.5), "min_recall is only used"),
    (dict(average="macro"), "average must be"),
    # beta^2 overflowed (OverflowError from the tuner's arithmetic)
    (dict(metric="fbeta", beta=1e200), "beta must be"),
    (dict(metric="fbeta", beta=1e200, average="micro_per_class"), "beta must be"),
])
def test_bad_arguments(kwargs, match):
    x, y = torch.zeros(3, 2), torch.zeros(3, 2)
    with pytest.raises(ValueError, match=match):
        tune_thresholds(x, y, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(metric="fbeta", beta="2"), "beta must be a number"),  # was accepted as 2
    (dict(from_logits="no"), "from_logits must be a bool"),     # was taken as true
])
def test_argument_types(kwargs, match):
    x, y = torch.zeros(3, 2), torch.zeros(3, 2)
    with pytest.raises(TypeError, match=match):
        tune_thresholds(x, y, **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="scores must have shape"):
        tune_thresholds(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="targets must have the scores' shape"):
        tune_thresholds(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least one sample"):
        tune_thresholds(torch.zeros(0, 2), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="finite"):
        tune_thresholds(torch.tensor([[0.0], [math.nan]]), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tune_thresholds(torch.tensor([[0.5], [1.5]]), torch.zeros(2, 1), from_logits=False)
    with pytest.raises(TypeError, match="floating-point"):
        tune_thresholds(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="targets contains NaN"):
        tune_thresholds(torch.zeros(2, 1), torch.tensor([[0.0], [math.nan]]))


# ----------------------------------------------------------------------------- library rule
@pytest.mark.parametrize("backend", fusedloss.available_backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("average", ["per_class", "micro_per_class"])
def test_thresholds_feed_the_library_decoding(backend, dtype, average):
    """The tuned logit thresholds reproduce their counts through the public decoding API
    (every CPU backend built here): the cut and the decoding agree on the strict rule."""
    g = torch.Generator().manual_seed(6)
    # Quantised logits: many ties and adjacent distinct values, the cases a sloppy cut breaks.
    x = (torch.randn(300, 6, generator=g) * 8).round().div(8).to(dtype)
    y = (torch.rand(300, 6, generator=g) < 0.25).float()
    r = tune_thresholds(x, y, average=average)
    out = fusedloss.binary_cross_entropy_with_logits(
        x, y.to(dtype), logit_threshold=r.logit_threshold, return_counts=True, backend=backend)
    assert torch.equal(out.counts, r.counts)
    dec = fusedloss.sigmoid_decode(x, logit_threshold=r.logit_threshold, backend=backend)
    assert torch.equal(dec.labels, x.float() > r.logit_threshold)
