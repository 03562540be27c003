"""ThresholdHistogram (streaming tuning) against the exact tuner and the brute-force oracle
of test_thresholds.py: the histogram's score is the exact metric of its edge cut, no better
than the exact optimum and within the stated gap bound of it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusedloss.thresholds import ThresholdHistogram, tune_thresholds
from test_thresholds import (
    METRIC_KW,
    SETTINGS,
    _div,
    columns,
    oracle_counts,
    oracle_metric,
    single_thread,  # noqa: F401  (autouse fixture)
)


# ----------------------------------------------------------------------------- streaming
@st.composite
def streamed(draw):
    n = draw(st.integers(1, 80))
    c = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    bins = draw(st.integers(1, 40))
    lo = draw(st.sampled_from([-4.0, -2.0, -1.0]))
    hi = draw(st.sampled_from([1.0, 2.0, 4.0]))
    spread = draw(st.sampled_from([0.5, 2.0, 6.0]))  # 6: many logits outside the range
    quantised = draw(st.booleans())  # logits on a grid that hits bin edges exactly
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * spread
    if quantised:
        x = torch.round(x * 4) / 4
    y = torch.rand(n, c, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    return x, y, bins, (lo, hi)


@pytest.mark.parametrize("metric,kw", [("f1", {}), ("fbeta", {"beta": 2.0}),
                                       ("fbeta", {"beta": 0.5}), ("balanced_accuracy", {})])
@SETTINGS
@given(data=streamed(), split=st.integers(0, 80))
def test_histogram_gap_to_exact(metric, kw, data, split):
    x, y, bins, rng = data
    h = ThresholdHistogram(x.shape[1], bins=bins, range=rng)
    h.update(x[:split], y[:split]).update(x[split:], y[split:])  # an empty batch included
    r = h.tune(metric, **kw)
    exact = tune_thresholds(x, y, metric, **kw)
    bound = h.gap_bound(metric, **kw)
    for c, (vals, pos) in enumerate(columns(x, y.float())):
        # The histogram score is the exact metric of its threshold on the data.
        tp, fp, fn, tn = oracle_counts(vals, pos, r.logit_threshold[c].item())
        assert r.counts[:, c].tolist() == [tp, fp, fn]
        at_hist = oracle_metric(tp, fp, fn, tn, metric, **kw)
        assert r.score[c].item() == pytest.approx(at_hist, abs=1e-12)
        # ... and is no better than the exact optimum, and no worse than the stated bound.
        assert at_hist <= exact.score[c].item() + 1e-12
        assert exact.score[c].item() - at_hist <= bound[c].item() + 1e-12
    # The threshold is a bin edge.
    assert torch.isin(r.logit_threshold, h.edges).all()


@SETTINGS
@given(data=streamed(), min_recall=st.sampled_from([0.3, 0.7, 1.0]))
def test_histogram_precision_at_recall_is_feasible(data, min_recall):
    x, y, bins, rng = data
    h = ThresholdHistogram(x.shape[1], bins=bins, range=rng).update(x, y)
    r = h.tune("precision_at_recall", min_recall=min_recall)
    exact = tune_thresholds(x, y, "precision_at_recall", min_recall=min_recall)
    for c, (vals, pos) in enumerate(columns(x, y.float())):
        tp, fp, fn, tn = oracle_counts(vals, pos, r.logit_threshold[c].item())
        if r.score[c].item() > -math.inf:  # a feasible edge exists (else every edge fails)
            assert _div(tp, tp + fn) >= min_recall
            assert r.score[c].item() == pytest.approx(_div(tp, tp + fp), abs=1e-12)
            assert r.score[c].item() <= exact.score[c].item() + 1e-12


def test_histogram_with_every_cut_as_an_edge_is_exact():
    # Logits on the quarter grid, edges at the eighth-offsets between them and around them:
    # every exact cut is an edge, so the histogram optimum equals the exact optimum.
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-8, 9, (200, 4), generator=g).float() * 0.25
    y = torch.rand(200, 4, generator=g) < 0.3
    edges = torch.arange(-8.5, 9.0, 1.0) * 0.25
    h = ThresholdHistogram(4, bins=edges).update(x, y)
    for metric, kw in METRIC_KW:
        r, e = h.tune(metric, **kw), tune_thresholds(x, y, metric, **kw)
        torch.testing.assert_close(r.score, e.score, rtol=0, atol=1e-12)
    r = h.tune("f1", average="micro")
    e = tune_thresholds(x, y, "f1", average="micro")
    torch.testing.assert_close(r.score, e.score, rtol=0, atol=1e-12)
    assert torch.equal(r.counts, e.counts)


def test_histogram_bins_are_right_closed():
    # A logit exactly on an edge belongs to the bin below it, so cutting at that edge labels
    # it negative, like the decoding's strict rule.
    h = ThresholdHistogram(1, bins=4, range=(-2.0, 2.0))
    x = torch.tensor([[-3.0], [-2.0], [-1.5], [-1.0], [0.0], [2.0], [2.5]])
    h.update(x, torch.zeros_like(x))
    assert h.counts[0, 0].tolist() == [2, 2, 1, 0, 1, 1]
    assert h.counts[1].sum().item() == 0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.float32])
def test_histogram_update_target_dtypes(dtype):
    # uint8 and bool targets reach the fused pass as bytes (no conversion pass); each dtype's
    # positives (integers > 0, floats > 0.5) are counted as such. One class, bins of width 1
    # over (-2, 2): edges -2, -1, 0, 1, 2.
    x = torch.tensor([[-1.5], [-0.5], [0.5], [0.5], [1.5], [3.0]])
    raw = {torch.uint8: [0, 1, 2, 255, 0, 1], torch.int64: [0, 1, 2, 7, 0, 1],
           torch.bool: [0, 1, 1, 1, 0, 1], torch.float32: [0.2, 0.7, 0.9, 1.0, 0.5, 0.51]}[dtype]
    y = torch.tensor(raw).to(dtype).reshape(-1, 1)
    h = ThresholdHistogram(1, bins=4, range=(-2.0, 2.0)).update(x, y)
    # bins: 0: x <= -2, 1: (-2, -1], 2: (-1, 0], 3: (0, 1], 4: (1, 2], 5: x > 2
    assert h.counts[0, 0].tolist() == [0, 1, 0, 0, 1, 0]  # -1.5 and 1.5 negative
    assert h.counts[1, 0].tolist() == [0, 0, 1, 2, 0, 1]  # -0.5, 0.5, 0.5 and 3.0 positive
    if dtype == torch.bool:  # a strided bool view is read in place too
        wide = torch.cat([y, ~y], dim=1)
        h2 = ThresholdHistogram(1, bins=4, range=(-2.0, 2.0)).update(x, wide[:, :1])
        assert torch.equal(h2.counts, h.counts)


def test_histogram_merge_and_dtypes():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 3, generator=g)
    y = torch.rand(64, 3, generator=g) < 0.5
    whole = ThresholdHistogram(3, bins=32, range=(-3, 3)).update(x, y)
    a = ThresholdHistogram(3, bins=32, range=(-3, 3)).update(x[:20].double(), y[:20])
    b = ThresholdHistogram(3, bins=32, range=(-3, 3)).update(x[20:].half().float(), y[20:])
    b2 = ThresholdHistogram(3, bins=32, range=(-3, 3)).update(x[20:], y[20:].float())
    assert torch.equal(a.merge(b2).counts, whole.counts)
    assert b.counts.sum() == b2.counts.sum()
    with pytest.raises(ValueError, match="same num_classes and bin edges"):
        a.merge(ThresholdHistogram(3, bins=16, range=(-3, 3)))


def test_histogram_numpy_integer_arguments():
    np = pytest.importorskip("numpy")
    h = ThresholdHistogram(np.int64(3), bins=np.int64(8), range=(-2.0, 2.0))
    assert (h.num_classes, h.edges.tolist()) == (3, [-2.0 + 0.5 * k for k in range(9)])


def test_histogram_bad_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        ThresholdHistogram(0)
    with pytest.raises(ValueError, match="range"):
        ThresholdHistogram(2, range=(1.0, 1.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        ThresholdHistogram(2, bins=torch.tensor([0.0, 0.0, 1.0]))
    for edges in (torch.tensor(64.0), torch.tensor([[0.0, 1.0], [2.0, 3.0]])):
        with pytest.raises(ValueError, match="1-D tensor"):  # were flattened silently
            ThresholdHistogram(2, bins=edges)
    h = ThresholdHistogram(2, bins=8)
    with pytest.raises(TypeError, match="ThresholdHistogram"):
        h.merge(5)
    with pytest.raises(RuntimeError, match="empty"):
        h.tune()
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        h.update(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        h.update(torch.tensor([[0.0, math.nan]]), torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="process group"):
        h.update(torch.zeros(1, 2), torch.zeros(1, 2)).all_reduce()


_DIST_WORKER = r"""
import sys, torch, torch.distributed as dist
from fusedloss.thresholds import ThresholdHistogram
rank, world, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=world)
g = torch.Generator().manual_seed(5)
x = torch.randn(90, 3, generator=g)
y = torch.rand(90, 3, generator=g) < 0.4
h = ThresholdHistogram(3, bins=20, range=(-2, 2), device="cpu")
h.update(x[rank::world], y[rank::world]).all_reduce()
ref = ThresholdHistogram(3, bins=20, range=(-2, 2)).update(x, y)
assert torch.equal(h.counts, ref.counts), "all_reduce != single-process histogram"
assert torch.equal(h.tune().counts, ref.tune().counts)
dist.destroy_process_group()
print("ok", rank)
"""


def test_histogram_all_reduce_two_processes():
    # Two gloo processes each see half the samples; after all_reduce both hold the histogram
    # of all of them (compared with a single-process histogram of the whole data).
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "worker.py")
        with open(script, "w") as f:
            f.write(_DIST_WORKER)
        store = os.path.join(d, "store")
        procs = [subprocess.Popen([sys.executable, script, str(r), "2", store],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, out
        assert f"ok {r}" in out
