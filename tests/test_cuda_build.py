"""The CUDA build, checked without a GPU: the machine code inside fusedloss._C (read with
cuobjdump, which ships in triton's wheel) and the choice of backend from the architectures the
build holds. The architecture rules the oracle uses are CUDA's: sm_XY machine code runs on
compute capability X.Y' with Y' >= Y; compute_XY PTX is compiled by the driver for any
capability >= X.Y.
"""

import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch

import fusedloss
from fusedloss import _backend, _native

needs_cuda_build = pytest.mark.skipif(
    not _native.cuda_built,
    reason="fusedloss._C was built without CUDA kernels (no CUDA toolkit, or a CPU-only torch, "
           "at build time): there is no machine code to inspect")


def _so_path() -> str:
    return importlib.util.find_spec("fusedloss._C").origin


def _cuobjdump() -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
    path = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    assert path, "cuobjdump not found (neither in triton's wheel nor on PATH)"
    return path


def _cuobjdump_out(*args) -> str:
    return subprocess.run([_cuobjdump(), *args, _so_path()], check=True, capture_output=True,
                          text=True).stdout


@needs_cuda_build
def test_sass_has_no_fast_math_tanh():
    # --use_fast_math turns tanhf (softcap) into tanh.approx.f32 = MUFU.TANH, relative error
    # ~1e-5; the kernels must use the accurate tanhf. MUFU.EX2 (the __expf intrinsic the
    # kernels call on purpose) shows the SASS of the kernels was read.
    sass = _cuobjdump_out("-sass")
    assert "MUFU.EX2" in sass
    assert "MUFU.TANH" not in sass


@needs_cuda_build
def test_reported_archs_are_the_machine_code_and_ptx_in_the_library():
    cubins = set(re.findall(r"\.(sm_\d+[af]?)\.cubin", _cuobjdump_out("--list-elf")))
    ptx_files = _cuobjdump_out("--list-ptx")
    ptx = {"compute_" + m for m in re.findall(r"\.sm_(\d+[af]?)\.ptx", ptx_files)}
    assert _native.cuda_archs is not None, "this build does not record its architectures"
    reported = set(_native.cuda_archs)
    assert cubins, "no machine code in fusedloss._C"
    assert cubins == {a for a in reported if a.startswith("sm_")}
    assert ptx == {a for a in reported if a.startswith("compute_")}


# (archs in the build, device capability, can it run) -- from CUDA's compatibility rules.
ARCH_CASES = [
    (("sm_80", "sm_90", "compute_90"), (8, 0), True),    # A100: sm_80 machine code
    (("sm_80", "sm_90", "compute_90"), (8, 6), True),    # A10 / 3090: sm_80 runs on 8.6
    (("sm_80", "sm_90", "compute_90"), (8, 9), True),    # L40S / 4090
    (("sm_80", "sm_90", "compute_90"), (9, 0), True),    # H100 / H200
    (("sm_80", "sm_90", "compute_90"), (10, 0), True),   # B200: the compute_90 PTX
    (("sm_80", "sm_90", "compute_90"), (12, 0), True),   # RTX 50xx: PTX too
    (("sm_80", "sm_90", "compute_90"), (7, 5), False),   # T4: nothing older than 8.0
    (("sm_90",), (8, 0), False),                         # machine code never runs on older GPUs
    (("sm_90",), (10, 0), False),                        # nor on a newer major without PTX
    (("sm_86",), (8, 0), False),                         # nor on a lower minor
    (("sm_90a",), (9, 0), True),
    (("compute_90a",), (10, 0), False),                  # arch-specific PTX: exactly 9.0
    ((), (9, 0), False),
]


@pytest.mark.parametrize("archs,cap,runs", ARCH_CASES,
                         ids=[f"{'+'.join(a) or 'none'}-on-{c[0]}.{c[1]}"
                              for a, c, _ in ARCH_CASES])
def test_arch_runs_on(archs, cap, runs):
    assert _native.arch_runs_on(archs, cap) is runs


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a GPU of a chosen capability is present, with CUDA kernels built for sm_80/sm_90."""
    if _native._BACKEND is None:
        pytest.skip(f"the native backend is not built here: {_backend.KNOWN.get('native')}")

    def install(cap, name):
        monkeypatch.setattr(_native, "cuda_built", True)
        monkeypatch.setattr(_native, "cuda_archs", ("sm_80", "sm_90", "compute_90"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: name)
        _native._ARCH_MISMATCH.clear()

    yield install
    _native._ARCH_MISMATCH.clear()


def test_auto_never_picks_native_cuda_kernels_built_for_another_arch(fake_gpu):
    fake_gpu((7, 5), "Tesla T4")
    assert "native" not in fusedloss.available_backends("cuda")
    assert fusedloss.resolve_backend("auto", "cuda:0") != "native"
    with pytest.raises(RuntimeError, match=r"sm_75.*TORCH_CUDA_ARCH_LIST=\"7\.5\" pip install"):
        fusedloss.resolve_backend("native", "cuda:0")


@pytest.mark.parametrize("cap", [(8, 9), (9, 0), (10, 0)], ids=["8.9", "9.0", "10.0"])
def test_auto_picks_native_cuda_kernels_the_gpu_runs(fake_gpu, cap):
    fake_gpu(cap, "some GPU")
    assert fusedloss.resolve_backend("auto", "cuda:0") == "native"
    assert fusedloss.resolve_backend("native", "cuda:0") == "native"
