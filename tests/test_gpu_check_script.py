"""scripts/gpu_check.sh without a GPU: its step machinery (time limits, the summary written as
each step ends, the files it leaves) through its dry-run mode and stand-in steps
(GPU_CHECK_FAKE_STEPS), and its behaviour on a machine with no GPU."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["probe", "build", "sanitizer", "memcheck", "tests", "racecheck", "bench"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def run(tmp_path, **env):
    out = tmp_path / "out"
    e = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    e.update(GPU_CHECK_OUT=str(out), GPU_CHECK_WHEELS=str(tmp_path / "no-wheels"), **env)
    p = subprocess.run(["bash", str(SCRIPT)], env=e, capture_output=True, text=True,
                       timeout=120)
    return p, out


def step_lines(summary: str) -> dict:
    return {ln.split()[0]: ln for ln in summary.splitlines() if ln.split()[:1] and
            ln.split()[0] in STEPS}


def test_dry_run_lists_every_step_in_order(tmp_path):
    p, out = run(tmp_path, GPU_CHECK_DRY_RUN="1")
    assert p.returncode == 0, p.stderr
    summary = (out / "summary.txt").read_text()
    names = [ln.split()[0] for ln in summary.splitlines() if ln.split()[:1] and
             ln.split()[0] in STEPS]
    assert names == STEPS  # GPU-specific first, in the order the check needs
    assert all("dry-run" in ln for ln in step_lines(summary).values())
    assert sorted(f.name for f in out.iterdir()) == ["summary.txt"]


def test_stand_in_steps_timeouts_failures_and_summary(tmp_path):
    fake = tmp_path / "fake.sh"
    fake.write_text(
        "probe() { echo 'KEY gpu: pretend'; }\n"
        "build() { echo building; }\n"
        "sanitizer() { echo refused; return 77; }\n"
        "tests() { echo 'KEY cuda ops: 3 passed'; sleep 60; }\n"
        "bench() { return 3; }\n")
    p, out = run(tmp_path, GPU_CHECK_FAKE_STEPS=str(fake), GPU_CHECK_BUDGET="8")
    assert p.returncode == 1, p.stdout + p.stderr
    summary = (out / "summary.txt").read_text()
    lines = step_lines(summary)
    assert lines["probe"].split()[1] == "ok" and "KEY" not in summary
    assert "gpu: pretend" in summary and "cuda ops: 3 passed" in summary
    assert lines["build"].split()[1] == "ok"
    assert lines["sanitizer"].split()[1] == "unavailable"
    assert "skipped (no sanitizer)" in lines["memcheck"]
    assert "skipped (no sanitizer)" in lines["racecheck"]
    assert lines["tests"].split()[1] == "TIMEOUT"  # clipped to what was left of the 8 s budget
    assert "skipped (out of time)" in lines["bench"]
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and "summary.txt" in files and "tests.log" in files


def test_failing_step_is_reported_and_later_steps_still_run(tmp_path):
    fake = tmp_path / "fake.sh"
    fake.write_text(
        "probe() { :; }\nbuild() { :; }\nsanitizer() { :; }\nmemcheck() { return 9; }\n"
        "tests() { :; }\nracecheck() { :; }\nbench() { :; }\n")
    p, out = run(tmp_path, GPU_CHECK_FAKE_STEPS=str(fake))
    assert p.returncode == 1
    lines = step_lines((out / "summary.txt").read_text())
    assert lines["memcheck"].split()[1] == "FAIL(9)"
    for s in ("tests", "racecheck", "bench"):
        assert lines[s].split()[1] == "ok"


def test_no_gpu_checks_nothing_and_says_so(tmp_path):
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"],
                                                     capture_output=True).returncode == 0:
        pytest.skip("a GPU is present")
    p, out = run(tmp_path)
    assert p.returncode == 2
    summary = (out / "summary.txt").read_text()
    assert "no GPU" in summary
    assert all("skipped (no GPU)" in ln for ln in step_lines(summary).values())
