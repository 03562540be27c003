"""Edges of the multi-label decisions: exact ties of balanced accuracy, fp32 thresholds that
must not flip the fp32 logit just above them, a bootstrap with nothing out of bag, and the
decoding arguments. Oracles: exact fractions, float64 comparisons, hand counts."""

from fractions import Fraction

import pytest
import torch

import fusedloss
from conftest import DEVICE_BACKENDS

BACKENDS = sorted({b for d, b in DEVICE_BACKENDS if d == "cpu"})


def _balanced_accuracy(x, y, cut):
    pred = [v > cut for v in x]
    tp = sum(p and t for p, t in zip(pred, y, strict=True))
    fp = sum(p and not t for p, t in zip(pred, y, strict=True))
    pos, neg = sum(y), len(y) - sum(y)
    return (Fraction(tp, pos) + Fraction(neg - fp, neg)) / 2


def test_balanced_accuracy_ties_go_to_the_lowest_cut():
    # 2/3 at cut 1.5 and at cut 5.5; summed as two rounded float64 ratios the second scored
    # one ulp higher and won
    x = [float(v) for v in range(8)]
    y = [False, False, True, False, False, False, True, False]
    cuts = [-0.5] + [v + 0.5 for v in x]
    best = max(_balanced_accuracy(x, y, c) for c in cuts)
    lowest = min(c for c in cuts if _balanced_accuracy(x, y, c) == best)
    xt, yt = torch.tensor(x)[:, None], torch.tensor(y)[:, None]
    got = fusedloss.tune_thresholds(xt, yt, "balanced_accuracy")
    assert got.logit_threshold.item() == lowest == 1.5
    assert got.score.item() == float(best)
    micro = fusedloss.tune_thresholds(xt.repeat(1, 2), yt.repeat(1, 2), "balanced_accuracy",
                                      average="micro")
    assert micro.logit_threshold.tolist() == [1.5, 1.5]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.3, 0.9])
def test_probability_threshold_keeps_the_next_fp32_logit_positive(backend, p):
    # logit(p) rounded to the nearest fp32 lands above logit(p) for these p; the smallest fp32
    # above logit(p) then equalled the threshold and was labelled negative
    t = torch.logit(torch.tensor(p, dtype=torch.float64))
    above = torch.nextafter(t.float(), torch.tensor(float("inf")))
    if above.double() <= t:
        above = torch.nextafter(above, torch.tensor(float("inf")))
    below = torch.nextafter(above, torch.tensor(-float("inf")))
    x = torch.stack([above, below])[None, :]
    want = (x.double() > t).tolist()
    assert want == [[True, below.double() > t]]
    got = fusedloss.sigmoid_decode(x, p, backend=backend).labels
    assert got.tolist() == want
    bce = fusedloss.binary_cross_entropy_with_logits(x, torch.ones_like(x), threshold=p,
                                                     return_counts=True, backend=backend)
    assert bce.labels.tolist() == want
    assert bce.counts[0].tolist() == [int(v) for v in want[0]]  # TP per class
    lt = fusedloss.sigmoid_decode(x, logit_threshold=t.item(), backend=backend).labels
    assert lt.tolist() == want


def test_bootstrap_with_nothing_out_of_bag_has_no_score():
    x, y = torch.randn(1, 2), torch.tensor([[True, False]])
    got = fusedloss.bootstrap_thresholds(x, y, resamples=3)
    assert torch.isnan(got.out_of_bag_score).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_arguments(backend):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="threshold"):
        fusedloss.sigmoid_decode(x, threshold=None, backend=backend)
    with pytest.raises(ValueError, match="not both"):
        fusedloss.sigmoid_decode(x, 0.3, logit_threshold=1.0, backend=backend)
    # the default threshold with a logit_threshold: the logit one decides
    got = fusedloss.sigmoid_decode(x, logit_threshold=0.2, backend=backend).labels
    assert torch.equal(got, x > 0.2)
    # no classes: counts of shape (3, 0), as for any C
    out = fusedloss.binary_cross_entropy_with_logits(
        torch.zeros(3, 0), torch.zeros(3, 0), threshold=0.5, return_counts=True,
        backend=backend)
    assert out.counts.shape == (3, 0) and out.labels.shape == (3, 0)


def test_histogram_constructor_arguments():
    # bools are not counts; an edge finite only in float64 is not a float32 edge; a range is
    # two numbers
    for bad in (dict(num_classes=True), dict(num_classes=2, bins=True),
                dict(num_classes=2, bins=torch.tensor([0.0, 1e39], dtype=torch.float64)),
                dict(num_classes=2, range=(0.0, 1.0, 2.0))):
        name = [k for k in bad if k != "num_classes"] or ["num_classes"]
        with pytest.raises(ValueError, match=name[0]):
            fusedloss.ThresholdHistogram(**bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_python_float_logit_threshold_at_fp32_edges(backend):
    # A Python-float logit_threshold becomes the largest fp32 at or below it in Python
    # arithmetic (no tensor); near fp32's range ends and in the subnormals that floor is easy to
    # get wrong. For each cut, the fp32 values next to it decode as the float64 comparison says.
    f32 = torch.float32
    cuts = [0.1, -1 / 3, 1e-40, -1e-40, 7e-46, -7e-46, -1e-45, 1.5e-45, 3.4028234663852886e38,
            3.5e38, 1e300, -3.5e38, -1e300, 2.0 ** -126 * (1 - 2 ** -30)]
    for cut in cuts:
        c = torch.tensor(cut, dtype=torch.float64)
        near = c.float()  # nearest fp32 (or +-inf), then its neighbours on both sides
        x = torch.stack([torch.nextafter(near, torch.tensor(-float("inf"))), near,
                         torch.nextafter(near, torch.tensor(float("inf")))])
        x = x[torch.isfinite(x)].to(f32)[None, :]
        want = (x.double() > cut).tolist()
        got = fusedloss.sigmoid_decode(x, logit_threshold=cut, backend=backend).labels
        assert got.tolist() == want, cut
