"""Backend registry: which implementations of the ops in csrc/ops.cpp exist, and which to use.

A backend is a name, a predicate saying which devices it serves, and an `ops` object with one
callable per op of the contract (`_contract.OPS`: the schemas of csrc/ops.cpp, semantics in
docs/OPS.md). `register` checks every op against the contract's signature: registered torch
ops schema to schema, Python functions by their parameter names in order. Backends register
themselves at import (`_torch_backend`, `_native`, `_triton`); the functional layer only ever
calls `get(name, device).ops.<op>(...)`, so a new backend plugs in without touching it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import _contract

ENV_VAR = "FUSEDLOSS_BACKEND"

OP_NAMES = _contract.OP_NAMES


@dataclass
class Backend:
    name: str
    ops: Any  # an object with one callable per op of _contract.OPS
    supports: Callable[[torch.device], bool]  # is it built/usable for this device?
    priority: dict  # device type -> rank for backend="auto" (lower first); absent: never auto
    build_hint: str  # what to do when it is asked for but not built


_REGISTRY: dict[str, Backend] = {}
# Names users may ask for, with the reason a known backend is not registered (import failed).
KNOWN = {"native": "", "triton": "", "torch": ""}


def register(backend: Backend) -> None:
    """Add `backend`, or raise TypeError naming every op it lacks or implements with another
    signature than the contract's."""
    bad = _contract.mismatches(backend.ops)
    if bad:
        raise TypeError(f"backend {backend.name!r} does not implement the op contract: "
                        + "; ".join(f"{op}: {why}" for op, why in bad.items()))
    _REGISTRY[backend.name] = backend
    KNOWN[backend.name] = ""


def mark_unavailable(name: str, reason: str) -> None:
    """Record why a known backend could not be registered (shown when it is asked for)."""
    if name not in _REGISTRY:
        KNOWN[name] = reason


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def available_backends(device="cpu") -> list[str]:
    """Names of the backends usable for tensors on `device`, fastest first."""
    dev = _device(device)
    usable = [b for b in _REGISTRY.values() if b.supports(dev)]
    usable.sort(key=lambda b: b.priority.get(dev.type, 1000))
    return [b.name for b in usable]


def resolve_backend(backend: str = "auto", device="cpu") -> str:
    """The backend name that `backend=` resolves to for tensors on `device` (or raise)."""
    return get(backend, device).name


def get(name: str, device) -> Backend:
    """Resolve `backend=` (or FUSEDLOSS_BACKEND for "auto") to a usable Backend, or raise."""
    dev = _device(device)
    source = "backend"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f"backend='auto' takes the environment's {ENV_VAR}, and {ENV_VAR}"
        if name == "auto":
            for b in sorted(_REGISTRY.values(), key=lambda b: b.priority.get(dev.type, 1000)):
                if dev.type in b.priority and b.supports(dev):
                    return b
            return _REGISTRY["torch"]
    if not isinstance(name, str) or name not in KNOWN:
        raise ValueError(
            f"{source}={name!r} is not a fusedloss backend; expected one of "
            f"{['auto', *KNOWN]}"
        )
    b = _REGISTRY.get(name)
    if b is None:
        raise RuntimeError(
            f"{source}={name!r} is not built in this installation ({KNOWN[name]}). "
            f"{_HINTS.get(name, '')}"
        )
    if not b.supports(dev):
        raise RuntimeError(
            f"{source}={name!r} is not available for device {dev}. {b.build_hint}"
        )
    return b


_HINTS = {
    "native": "Build it with `pip install --no-build-isolation -e .` (CUDA kernels need "
    "CUDA_HOME and a CUDA build of torch; see README).",
    "triton": "Install triton (it ships with CUDA builds of torch); on CPU it runs only "
    "under TRITON_INTERPRET=1, for tests.",
}
