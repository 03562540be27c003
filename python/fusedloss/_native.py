"""The `native` backend: csrc/ ops loaded from the built extensions.

fusedloss._C holds the schemas (and the CUDA kernels when built with CUDA); one of
fusedloss._cpu_{avx512,avx2,default} holds the CPU kernels, chosen here from the CPU's
capability as torch reports it (override: FUSEDLOSS_CPU_ISA=default|avx2|avx512).

CUDA kernels serve a GPU only if the build holds code it can run (`cuda_archs`, the list the
extension was compiled for, against torch.cuda.get_device_capability): backend="auto" then
moves on to the next backend, and backend="native" raises, naming the arch and how to rebuild.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _backend

_ISA_ORDER = {"AVX512": ["avx512", "avx2", "default"], "AVX2": ["avx2", "default"]}
loaded_cpu_isa: str | None = None
cuda_built = False
# e.g. ("sm_80", "sm_90", "compute_90"); () without CUDA; None: a build that does not record it
cuda_archs: tuple[str, ...] | None = ()


def _origin(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _load() -> str:
    """Load the extensions; return '' on success or the reason for failure."""
    global loaded_cpu_isa, cuda_built, cuda_archs
    path = _origin("fusedloss._C")
    if path is None:
        return "fusedloss._C was not found"
    torch.ops.load_library(path)
    cuda_built = torch._C._dispatch_has_kernel_for_dispatch_key(
        "fusedloss::softmax_ce_fwd", "CUDA")
    if cuda_built:
        try:
            cuda_archs = tuple(torch.ops.fusedloss_cuda.arch_list().split())
        except (AttributeError, RuntimeError):  # a build from before the list was recorded
            cuda_archs = None
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


def arch_runs_on(archs, capability: tuple[int, int]) -> bool:
    """Can a build holding `archs` (sm_XY machine code, compute_XY PTX) run on `capability`?

    CUDA's rules: sm_XY machine code runs on X.Y' for Y' >= Y (same major); compute_XY PTX is
    compiled by the driver for any capability >= X.Y. Arch-specific variants (sm_90a) run only
    on exactly X.Y.
    """
    major, minor = capability
    for a in archs:
        kind, _, num = a.partition("_")
        specific = num.endswith(("a", "f"))
        num = num.rstrip("af")
        if not num.isdigit() or len(num) < 2:
            continue
        am, an = int(num[:-1]), int(num[-1])
        if kind == "sm" and am == major and (an == minor if specific else an <= minor):
            return True
        if kind == "compute" and not specific and (am, an) <= (major, minor):
            return True
    return False


_BUILD_HINT = ("CPU kernels: `pip install --no-build-isolation -e .`; CUDA kernels need "
               "CUDA_HOME and a CUDA build of torch at build time.")


_ARCH_MISMATCH: dict[int, str] = {}  # device index -> _arch_mismatch (devices do not change)


def _arch_mismatch(device: torch.device) -> str:
    """'' if the CUDA kernels can run on `device`, else why not and how to rebuild."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH_MISMATCH:
        _ARCH_MISMATCH[index] = _arch_mismatch_uncached(index)
    return _ARCH_MISMATCH[index]


def _arch_mismatch_uncached(index: int) -> str:
    cap = torch.cuda.get_device_capability(index)
    if cuda_archs is None or arch_runs_on(cuda_archs, cap):  # None: unknown, let CUDA decide
        return ""
    name = torch.cuda.get_device_name(index)
    return (f"fusedloss's CUDA kernels were built for {' '.join(cuda_archs) or 'no arch'}, "
            f"which cannot run on cuda:{index} ({name}, compute capability {cap[0]}.{cap[1]}, "
            f"sm_{cap[0]}{cap[1]}). Rebuild for it: TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\" "
            f"pip install --no-build-isolation -e . (with the GPU visible and "
            f"TORCH_CUDA_ARCH_LIST unset, the build targets the GPUs present).")


def _supports(device: torch.device) -> bool:
    if device.type == "cpu":
        return loaded_cpu_isa is not None
    if device.type == "cuda":
        if not (cuda_built and torch.cuda.is_available()):
            return False
        why = _arch_mismatch(device)
        # backend="native" reports the hint of the device it was last refused for.
        _BACKEND.build_hint = why or _BUILD_HINT
        return not why
    return False


_BACKEND = None
try:
    _reason = _load()
except OSError as e:  # a stale or foreign build (e.g. built against another torch)
    _reason = f"loading the extension failed: {e}"

if _reason:
    _backend.mark_unavailable("native", _reason)
else:
    from . import _ops

    _ops.register_fakes("fusedloss")  # fake kernels for torch.compile

    _BACKEND = _backend.Backend(
        name="native",
        ops=torch.ops.fusedloss,
        supports=_supports,
        priority={"cpu": 0, "cuda": 0},
        build_hint=_BUILD_HINT,
    )
    _backend.register(_BACKEND)


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


def empty_cache() -> int:
    """Release the large CPU output buffer the native kernels keep for reuse; return its bytes.

    The native CPU ops keep their last gradient-sized output (16 MiB or more) in a one-slot cache
    and hand it to the next call of a size that fits, once nothing references it any more: a
    fresh buffer's pages are zeroed by the kernel first, which costs more than the fused pass
    itself writes. A call's peak memory is unchanged; between calls that one buffer stays
    resident. This frees it (0 when nothing is cached, or the buffer is still in use and is merely
    forgotten). Like torch.cuda.empty_cache, it is never needed for correctness.
    """
    if loaded_cpu_isa is None:
        return 0
    return int(torch.ops.fusedloss_cpu.empty_output_cache())
