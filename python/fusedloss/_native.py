"""The `native` backend: csrc/ ops loaded from the built extensions.

fusedloss._C holds the schemas (and the CUDA kernels when built with CUDA); one of
fusedloss._cpu_{avx512,avx2,default} holds the CPU kernels, chosen here from the CPU's
capability as torch reports it (override: FUSEDLOSS_CPU_ISA=default|avx2|avx512).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _backend

_ISA_ORDER = {"AVX512": ["avx512", "avx2", "default"], "AVX2": ["avx2", "default"]}
loaded_cpu_isa: str | None = None
cuda_built = False


def _origin(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _load() -> str:
    """Load the extensions; return '' on success or the reason for failure."""
    global loaded_cpu_isa, cuda_built
    path = _origin("fusedloss._C")
    if path is None:
        return "fusedloss._C was not found"
    torch.ops.load_library(path)
    cuda_built = torch._C._dispatch_has_kernel_for_dispatch_key(
        "fusedloss::softmax_ce_fwd", "CUDA")
    forced = os.environ.get("FUSEDLOSS_CPU_ISA")
    cap = torch.backends.cpu.get_cpu_capability()
    order = [forced] if forced else _ISA_ORDER.get(cap, ["default"])
    for isa in order:
        p = _origin(f"fusedloss._cpu_{isa}")
        if p is not None:
            torch.ops.load_library(p)
            loaded_cpu_isa = isa
            break
    return ""


def _supports(device: torch.device) -> bool:
    if device.type == "cpu":
        return loaded_cpu_isa is not None
    if device.type == "cuda":
        return cuda_built and torch.cuda.is_available()
    return False


try:
    _reason = _load()
except OSError as e:  # a stale or foreign build (e.g. built against another torch)
    _reason = f"loading the extension failed: {e}"

if _reason:
    _backend.mark_unavailable("native", _reason)
else:
    from . import _ops

    _ops.register_fakes("fusedloss")  # fake kernels for torch.compile

    _backend.register(_backend.Backend(
        name="native",
        ops=torch.ops.fusedloss,
        supports=_supports,
        priority={"cpu": 0, "cuda": 0},
        build_hint="CPU kernels: `pip install --no-build-isolation -e .`; CUDA kernels need "
        "CUDA_HOME and a CUDA build of torch at build time.",
    ))


def check_errors(device=None) -> None:
    """Raise the error a CUDA kernel recorded without synchronising (out-of-range class target).

    CUDA kernels cannot raise: they mark the row NaN and record the bad value on the device;
    every later fusedloss CUDA op raises it. Call this after a synchronisation point (it
    synchronises `device`) to surface it explicitly. No-op without CUDA kernels.
    """
    if not cuda_built or not torch.cuda.is_available():
        return
    torch.cuda.synchronize(device)
    torch.ops.fusedloss_cuda.raise_pending_error()
