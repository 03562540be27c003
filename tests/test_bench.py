"""Smoke test of the benchmark program (benchmarks/run.py) and its checks.

The program runs in a subprocess, as `make bench` runs it, on the `smoke` profile (tiny
shapes, seconds); the JSON and Markdown it writes are checked: every case has its rows, every
provider passed the float64 check, and the numbers are positive and finite. The bytes model and
the correctness check are also tested directly against hand-derived values and float64
torch.nn.functional, including that a wrong result is caught.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import fusedloss  # noqa: E402
from bytes_model import op_bytes  # noqa: E402
from cases import PROFILES, Case, parse_case  # noqa: E402
from check import Reference  # noqa: E402
from providers import Out, make_inputs  # noqa: E402


def _run(*args: str, env: dict | None = None, timeout: float = 240):
    """Run the benchmark program. TRITON_INTERPRET (set by conftest.py on GPU-less machines)
    is not passed on unless `env` sets it: the interpreter takes seconds a call."""
    # One torch thread: on a loaded 2-core machine a 2-thread OpenMP region can stall for a
    # scheduler slice (~20 ms) per op, which makes the smoke run slow, not wrong.
    cmd = [sys.executable, str(BENCH / "run.py"), "--no-progress", "--threads", "1", *args]
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})}, cwd=REPO)


def _load(out_dir: Path) -> tuple[dict, str]:
    (jpath,) = out_dir.glob("*.json")
    (mpath,) = out_dir.glob("*.md")
    (png,) = out_dir.glob("*.png")  # the chart beside the tables
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    return json.loads(jpath.read_text()), mpath.read_text()


def _finite_pos(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _check_ok_row(r: dict, min_reps: int = PROFILES["smoke"].min_reps) -> None:
    assert r["status"] == "ok", (r["label"], r["reason"])
    for k in ("median_ms", "gbps", "copy_gbps", "pct_copy", "x_ideal", "speedup_vs_eager",
              "bytes", "first_call_s"):
        assert _finite_pos(r[k]), (r["label"], k, r[k])
    assert r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
    assert r["reps"] >= min_reps
    assert r["loss_err"] <= r["tol"][0]
    if r["pass"] == "fwd+bwd":
        assert r["grad_err"] <= r["tol"][1]
    assert r["peak_mem_bytes"] >= 0 and r["mem_method"]
    # GB/s is the bytes model over the median time.
    assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] / 1e3) / 1e9, rel=1e-9)
    # every row is tagged with where it ran
    for k in ("device_name", "torch", "git_commit", "thp", "cpu_isa", "timestamp"):
        assert k in r


def test_smoke_profile_writes_checked_rows(tmp_path):
    p = _run("--profile", "smoke", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    data, md = _load(tmp_path)
    rows = data["rows"]
    # triton runs on CPU only under the interpreter, which this run does not set
    backends = [b for b in fusedloss.available_backends("cpu") if b != "triton"]
    have_api = hasattr(fusedloss, "cross_entropy")
    for case in PROFILES["smoke"].cases:
        mine = [r for r in rows if (r["op"], r["rows"], r["classes"], r["dtype"], r["pass"],
                                    r["decode"]) == (case.op, case.rows, case.classes,
                                                     case.dtype, case.pass_, case.decode)]
        labels = {r["label"] for r in mine}
        assert "eager" in labels
        if have_api:
            for b in backends:
                assert f"fusedloss-{b}" in labels
                if case.op == "sigmoid_bce":
                    assert f"fusedloss-{b} [u8 target]" in labels
                if case.op == "softmax_ce" and case.backward:
                    assert f"fusedloss-{b} [inplace]" in labels
        assert "compile" not in labels  # smoke leaves torch.compile out unless asked
        for r in mine:
            _check_ok_row(r)
        assert f"### {case.op} {case.pass_} {case.dtype} {case.rows}x{case.classes}" in md
    assert data["environments"][0]["device"] == "cpu"
    # both training passes are measured and set side by side in the summary
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd", "fwd+autograd"}
    assert "| case | provider | fwd THP=0 | fwd+bwd THP=0 | fwd+autograd THP=0 |" in md
    # The Markdown tables are printed last, and match the file.
    assert p.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])
    assert "| eager |" in p.stdout


def test_compile_row_and_custom_case(tmp_path):
    p = _run("--cases", "ce:16x40:fp32:fwd+bwd", "--providers", "eager,compile",
             "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    data, _ = _load(tmp_path)
    by = {r["label"]: r for r in data["rows"]}
    assert set(by) == {"eager", "compile"}
    for r in by.values():
        _check_ok_row(r)
    assert by["compile"]["compile_s"] is not None and by["compile"]["compile_s"] >= 0
    assert by["eager"]["speedup_vs_eager"] == pytest.approx(1.0)


def test_interpreted_triton_and_liger_rows(tmp_path):
    # Under TRITON_INTERPRET=1 the triton backend and Liger run on CPU tensors (tiny cases
    # only): this checks their providers (Liger's input restore included) without a GPU.
    p = _run("--cases", "ce:8x40:fp32:fwd+bwd", "bce:8x16:fp32:fwd+bwd",
             "--providers", "eager,fusedloss-triton,liger", "--out", str(tmp_path),
             env={"TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    data, _ = _load(tmp_path)
    labels = sorted(r["label"] for r in data["rows"])
    assert labels == sorted(["eager", "liger", "fusedloss-triton", "fusedloss-triton [inplace]",
                             "eager", "fusedloss-triton", "fusedloss-triton [u8 target]"])
    for r in data["rows"]:
        _check_ok_row(r, min_reps=2)


def test_thp_both_runs_each_setting(tmp_path):
    p = _run("--cases", "bce:32x8:fp32:fwd", "--providers", "eager", "--thp", "both",
             "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    data, md = _load(tmp_path)
    assert sorted(r["thp"] for r in data["rows"]) == ["0", "1"]
    assert sorted(e["thp"] for e in data["environments"]) == ["0", "1"]
    assert "| THP |" in md


@pytest.mark.parametrize("bad, what", [
    ("ce:16x40:fp32", "expected OP:"),            # missing the pass
    ("xent:16x40:fp32:fwd", "op 'xent'"),
    ("ce:16by40:fp32:fwd", "shape '16by40'"),
    ("ce:0x40:fp32:fwd", "must be positive"),
    ("ce:16x40:int8:fwd", "dtype 'int8'"),
    ("ce:16x40:fp32:bwd", "pass 'bwd'"),
    ("ce:16x40:fp32:fwd+grad", "pass 'fwd\\+grad'"),
])
def test_bad_case_is_rejected_by_name(bad, what):
    with pytest.raises(ValueError, match=what.replace("(", r"\(")):
        parse_case(bad)


def test_bad_arguments_exit_with_the_message():
    p = _run("--cases", "ce:16by40:fp32:fwd")
    assert p.returncode == 2 and "shape '16by40' is not ROWSxCLASSES" in p.stderr
    p = _run("--min-reps", "0")
    assert p.returncode == 2 and "--min-reps must be >= 1, got 0" in p.stderr


@pytest.mark.parametrize("pass_", ["fwd+bwd", "fwd+autograd"])
def test_training_passes_return_torchs_gradient(pass_):
    # fwd+bwd goes through loss.backward() into the leaf and hands the gradient out of .grad;
    # fwd+autograd through torch.autograd.grad. Both give torch's gradient, computed apart.
    from providers import _run

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 9, generator=g, requires_grad=True)
    t = torch.randint(0, 9, (6,), generator=g)
    out = _run(lambda x, t: (F.cross_entropy(x, t), {}), x, t, pass_)()
    xr = x.detach().double().requires_grad_()
    F.cross_entropy(xr, t).backward()
    torch.testing.assert_close(out.grad.double(), xr.grad, rtol=1e-6, atol=1e-7)
    assert x.grad is None  # nothing accumulates between timed calls


def test_bytes_model_matches_hand_counts():
    # CE fwd: logits once + int64 targets; fwd+bwd: logits read + gradient written.
    assert op_bytes(Case("softmax_ce", 4096, 32000, "fp32", "fwd")) == 4096 * 32000 * 4 + 4096 * 8
    assert op_bytes(Case("softmax_ce", 4096, 32000, "bf16", "fwd+bwd")) == \
        2 * 4096 * 32000 * 2 + 4096 * 8
    # both training passes move the same bytes
    assert op_bytes(Case("softmax_ce", 4096, 32000, "bf16", "fwd+autograd")) == \
        2 * 4096 * 32000 * 2 + 4096 * 8
    # decodings: pred int64 + confidence fp32 + correct bool per row
    assert op_bytes(Case("softmax_ce", 10, 7, "fp32", "fwd", True)) == 10 * 7 * 4 + 10 * 8 + 10 * 13
    # BCE: logits + targets (+ gradient); uint8 targets are 1 byte.
    assert op_bytes(Case("sigmoid_bce", 65536, 256, "fp32", "fwd")) == 65536 * 256 * 8
    assert op_bytes(Case("sigmoid_bce", 65536, 1024, "bf16", "fwd+bwd"), 1) == 65536 * 1024 * 5
    # labels (bool per element) + counts (3 x C int64)
    assert op_bytes(Case("sigmoid_bce", 4, 3, "fp32", "fwd", True)) == 4 * 3 * 8 + 12 + 72


@pytest.mark.parametrize("spec", ["ce:33x50:fp32:fwd+bwd", "bce:20x9:fp32:fwd+autograd",
                                  "ce:40x70:bf16:fwd+bwd:decode", "bce:12x5:fp32:fwd:decode"])
def test_check_accepts_torch_and_rejects_wrong_results(spec):
    case = parse_case(spec)
    inp = make_inputs(case, torch.device("cpu"), seed=3)
    ref = Reference(inp)
    x, t = inp.x, inp.target
    if case.op == "softmax_ce":
        loss = F.cross_entropy(x, t)
        xd = x.detach()
        pred = xd.argmax(1)
        conf = torch.softmax(xd.double(), 1).max(1).values.float()
        dec = {"pred": pred, "confidence": conf, "correct": pred == t}
    else:
        loss = F.binary_cross_entropy_with_logits(x, t)
        labels = x.detach() > 0
        pos = t > 0.5
        dec = {"labels": labels, "counts": torch.stack(
            [(labels & pos).sum(0), (labels & ~pos).sum(0), (~labels & pos).sum(0)])}
    grad = torch.autograd.grad(loss, x)[0] if case.backward else None
    good = Out(loss.detach(), grad, dec if case.decode else {})
    assert ref.check(good, inp).ok
    # a loss 5% off is caught
    assert not ref.check(Out(good.loss * 1.05, grad, good.dec), inp).ok
    if case.backward:
        # one gradient entry 50% off is caught (bf16 tolerance: twice torch's own error)
        g = grad.clone()
        g[0, 1] *= 1.5
        v = ref.check(Out(good.loss, g, good.dec), inp)
        assert not v.ok and "gradient" in v.reason
    if case.decode:
        bad = dict(good.dec)
        if case.op == "softmax_ce":
            bad["pred"] = (good.dec["pred"] + 1) % case.classes
        else:
            bad["labels"] = ~good.dec["labels"]
        assert not ref.check(Out(good.loss, grad, bad), inp).ok


def test_summary_statistics_by_hand():
    from timing import summarize

    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median_s, s.p25_s, s.p75_s, s.iqr_s, s.min_s, s.reps) == (3.0, 2.0, 4.0, 2.0, 1.0, 5)
    one = summarize([0.5])
    assert (one.median_s, one.iqr_s, one.reps) == (0.5, 0.0, 1)
