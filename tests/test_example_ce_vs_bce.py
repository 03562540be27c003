"""examples/ce_vs_bce.py runs end to end in --quick mode, and its helpers are right."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "ce_vs_bce.py")


def _load():
    spec = importlib.util.spec_from_file_location("ce_vs_bce", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_mode_end_to_end(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, EXAMPLE, "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"
    out = proc.stdout
    for needle in ("softmax CE", "sigmoid BCE", "tuned per-class", "micro F1", "macro F1",
                   "tuned micro-per-class", "5-fold CV", "90% interval"):
        assert needle in out
    for name in ("ce_vs_bce.png", "thresholds.png"):
        png = tmp_path / name
        assert png.stat().st_size > 10_000
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "results.json").read_text())
    for run in res["multiclass"]:
        for name in ("ce", "bce"):
            r = run[name]
            assert 0.5 < r["accuracy"] <= 1.0  # 10 classes: chance is 0.1
            assert 0 < r["nll"] < math.log(10) + 1 and 0 <= r["ece"] <= 1
        assert run["ce"]["one_label"] == 1.0
    # Two label distributions x two training budgets, each with every decoding.
    assert len(res["multilabel"]) == 4
    for runs in res["multilabel"].values():
        assert len(runs) == res["seeds"]
        for run in runs:
            assert {"0.5", "tuned per-class", "tuned micro", "tuned micro-per-class",
                    "val, 5-fold CV: tuned per-class"} <= set(run)
            for v in run.values():
                assert 0 <= v["micro_f1"] <= 1 and 0 <= v["macro_f1"] <= 1
    # In-sample, the tuned per-class thresholds can only match or beat 0.5 on macro F1 (each
    # class's F1 is maximised exactly on that data).
    # Likewise the jointly tuned per-class thresholds maximise micro F1 over every choice of
    # per-class thresholds on that data: the per-class tuned ones and 0.5 included.
    for runs in res["multilabel"].values():
        for run in runs:
            prefix = "val, in-sample: "
            val = {k[len(prefix):]: v for k, v in run.items() if k.startswith(prefix)}
            assert val["tuned per-class"]["macro_f1"] >= val["0.5"]["macro_f1"] - 1e-12
            for other in ("tuned per-class", "0.5"):
                assert val["tuned micro-per-class"]["micro_f1"] >= val[other]["micro_f1"] - 1e-12
    # Bootstrap intervals: ordered, within [0, 1] in probability, one per class.
    for runs in res["multilabel_classes"].values():
        for run in runs:
            lo, hi = torch.tensor(run["threshold_lo"]), torch.tensor(run["threshold_hi"])
            assert lo.shape == (10,) and bool(((0 <= lo) & (lo <= hi) & (hi <= 1)).all())
            assert bool((torch.tensor(run["val_f1_lo"]) <= torch.tensor(run["val_f1_hi"])).all())
            assert sum(run["positives"]) > 0


def test_multilabel_data_labels_match_the_images():
    ex = _load()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 64) + 0.01  # no all-zero image: a blank slot is recognisable
    y = torch.arange(50) % 10
    feats, labels = ex.make_multilabel(x, y, 400, None, g)
    assert feats.shape == (400, 64 * ex.SLOTS) and labels.shape == (400, 10)
    slots = feats.view(400, ex.SLOTS, 64)
    counts = torch.zeros(ex.SLOTS + 1, dtype=torch.int64)
    for i in range(400):
        present = set()
        n = 0
        for s in slots[i]:
            if s.abs().sum() == 0:
                continue
            j = int(torch.nonzero((x == s).all(1))[0])  # which source image
            present.add(int(y[j]))
            n += 1
        counts[n] += 1
        assert present == set(torch.nonzero(labels[i]).flatten().tolist())
    assert (counts > 50).all(), "0..3 images per sample, each count common"


def test_ece_and_f1_helpers():
    ex = _load()
    # Two bins: confidences 0.95 (4 samples, 3 correct) and 0.55 (2 samples, 2 correct):
    # ECE = 4/6 * |0.75 - 0.95| + 2/6 * |1 - 0.55| = 0.1333... + 0.15.
    conf = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55], dtype=torch.float64)
    correct = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert ex.ece(conf, correct) == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.45)
    # F1 per class: class 0 TP 2 FP 1 FN 1 -> 4/6; class 1 nothing to find or found -> 1.
    counts = torch.tensor([[2, 0], [1, 0], [1, 0]])
    micro, macro = ex.f1s(counts)
    assert micro == pytest.approx(4 / 6) and macro == pytest.approx((4 / 6 + 1) / 2)
