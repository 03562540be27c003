"""Ahead-of-time compilation of every shipped Triton specialisation for sm_90 (H100/H200).

The op tests run the kernels in Triton's interpreter, which accepts code the real compiler
rejects; this compiles each (kernel, dtype, compile-time switches, block) the launchers can
produce, with no GPU, in a subprocess without TRITON_INTERPRET (the variable is read when the
kernels are decorated, and tests/conftest.py sets it for this process).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # the project requires it (CUDA builds of torch ship it)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_aot_check.py"


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


JOBS = str(min(2, os.cpu_count() or 1))


@pytest.mark.slow  # ~300 compilations: 1-3 minutes on 2 cores (cached by Triton afterwards)
def test_every_triton_specialisation_compiles_for_sm90():
    proc = _run("--jobs", JOBS)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "specialisations compiled for sm_90 (generic)" in proc.stdout


@pytest.mark.slow  # ~160 compilations
def test_value_specialised_variants_compile_for_sm90():
    # What Triton's JIT does with integer arguments on top of the listed switches: constants
    # for values equal to 1, alignment attributes for multiples of 16. One dtype (bf16) covers
    # the code paths; the dtype only changes pointer element types.
    proc = _run("--jobs", JOBS, "--variants", "ones,aligned", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "compiled for sm_90 (ones,aligned)" in proc.stdout


def test_aot_check_refuses_to_run_under_the_interpreter():
    # Under TRITON_INTERPRET=1 the "compile" would not exercise the compiler at all.
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "scale_grad"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr


def test_aot_check_reports_a_kernel_the_compiler_rejects(tmp_path):
    # The check must be able to fail: a kernel whose loop-carried variable changes type runs
    # in the interpreter but is rejected by the compiler.
    mod = tmp_path / "bad_kernel_mod.py"
    mod.write_text(
        "import triton, triton.language as tl\n"
        "@triton.jit\n"
        "def bad(x_ptr, n):\n"
        "    acc = 0\n"
        "    for i in range(0, n):\n"
        "        acc = acc + tl.load(x_ptr + i)\n"
        "    tl.store(x_ptr, acc)\n"
        "def specialisations():\n"
        "    yield bad, {'x_ptr': '*fp32', 'n': 'i32'}, {}, 4\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "bad_kernel_mod"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "0/1 specialisations compiled" in proc.stdout
