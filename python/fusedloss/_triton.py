"""The `triton` backend: the ops of csrc/ops.cpp as torch.library custom ops around the Triton
launchers in fusedloss.triton_kernels, registered in the namespace `fusedloss_triton` with the
schemas and fake kernels of the op contract (`_contract.OPS`), so they are the native ops'.

Why custom_op and not torch.library.triton_op: under TRITON_INTERPRET=1 on CPU, triton_op /
wrap_triton fail in torch.compile and opcheck, while a custom_op with a fake kernel (the same
fakes as the native ops, python/fusedloss/_ops.py) traces with torch.compile(fullgraph=True)
on CPU and CUDA alike (checked with torch 2.14 and triton 3.8).

Devices: CUDA when triton imports and a GPU is present; CPU only under TRITON_INTERPRET=1
(tests). "auto" never picks the interpreter (no "cpu" entry in `priority`).
Importing this module raises ImportError when triton is missing; fusedloss/__init__.py turns
that into "triton backend unavailable".
"""
# ruff: noqa: UP007, UP045

from __future__ import annotations

import os
from typing import Optional  # the wrappers' annotations spell out the contract's types

import torch
import triton  # noqa: F401  (ImportError here = backend unavailable)
from torch import Tensor

from . import (
    _backend,
    _contract,
    _ops,  # fake kernels shared with the native ops
)
from . import _op_checks as checks
from .triton_kernels import scale_grad as _scale
from .triton_kernels import sigmoid_bce as _bce
from .triton_kernels import softmax_ce as _ce

NAMESPACE = "fusedloss_triton"


def _op(name: str):
    """A custom op with the contract's schema (not one inferred from the annotations)."""
    op = _contract.OPS[name]
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=op.mutated,
                                   schema=_contract.custom_op_schema(op))


@_op("softmax_ce_fwd")
def softmax_ce_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                   grad_scale: Optional[Tensor], ignore_index: int, label_smoothing: float,
                   lse_square_scale: float, softcap: float, compute_grad: bool,
                   decode: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    checks.softmax_ce("softmax_ce_fwd", logits, target, weight, grad_scale, ignore_index,
                      label_smoothing, lse_square_scale, softcap)
    return _ce.softmax_ce_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                              lse_square_scale, softcap, compute_grad, decode)


@_op("softmax_ce_fwd_inplace")
def softmax_ce_fwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                           grad_scale: Optional[Tensor], ignore_index: int,
                           label_smoothing: float, lse_square_scale: float, softcap: float,
                           decode: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    checks.softmax_ce("softmax_ce_fwd_inplace", logits, target, weight, grad_scale,
                      ignore_index, label_smoothing, lse_square_scale, softcap)
    return _ce.softmax_ce_fwd_inplace(logits, target, weight, grad_scale, ignore_index,
                                      label_smoothing, lse_square_scale, softcap, decode)


@_op("softmax_ce_bwd")
def softmax_ce_bwd(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                   ignore_index: int, label_smoothing: float, lse_square_scale: float,
                   softcap: float) -> Tensor:
    checks.softmax_ce_bwd(grad_loss, logits, target, weight, ignore_index, label_smoothing,
                          lse_square_scale, softcap)
    return _ce.softmax_ce_bwd(grad_loss, logits, target, weight, ignore_index,
                              label_smoothing, lse_square_scale, softcap)


@_op("softmax_decode")
def softmax_decode(logits: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    checks.softmax_decode(logits, softcap)
    return _ce.softmax_decode(logits, softcap)


@_op("sigmoid_bce_fwd")
def sigmoid_bce_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                    pos_weight: Optional[Tensor], grad_scale: Optional[Tensor],
                    threshold: Optional[Tensor], reduce_rows: bool, compute_grad: bool,
                    return_probs: bool, count: bool, hist_edges: Optional[Tensor] = None,
                    hist_counts: Optional[Tensor] = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    checks.sigmoid_bce("sigmoid_bce_fwd", logits, target, weight, pos_weight, grad_scale,
                       threshold, count, hist_edges=hist_edges, hist_counts=hist_counts)
    return _bce.sigmoid_bce_fwd(logits, target, weight, pos_weight, grad_scale, threshold,
                                reduce_rows, compute_grad, return_probs, count, hist_edges,
                                hist_counts)


@_op("sigmoid_bce_bwd")
def sigmoid_bce_bwd(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                    pos_weight: Optional[Tensor]) -> Tensor:
    checks.sigmoid_bce("sigmoid_bce_bwd", logits, target, weight, pos_weight,
                       grad_loss=grad_loss)
    return _bce.sigmoid_bce_bwd(grad_loss, logits, target, weight, pos_weight)


@_op("sigmoid_decode")
def sigmoid_decode(logits: Tensor, threshold: Tensor, return_probs: bool
                   ) -> tuple[Tensor, Tensor]:
    checks.sigmoid_decode(logits, threshold)
    return _bce.sigmoid_decode(logits, threshold, return_probs)


@_op("scale_grad_")
def scale_grad_(grad: Tensor, scale: Tensor) -> None:
    checks.scale_grad_(grad, scale)
    _scale.scale_grad_(grad, scale)


_ops.register_fakes(NAMESPACE)


def _supports(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return False


_backend.register(_backend.Backend(
    name="triton",
    ops=getattr(torch.ops, NAMESPACE),
    supports=_supports,
    # Below the native CUDA kernels (0), above the torch fallback (100); no "cpu" entry: the
    # interpreter is for tests and is never chosen by backend="auto".
    priority={"cuda": 1},
    build_hint="The triton backend runs on CUDA GPUs (triton ships with CUDA builds of torch); "
    "on CPU it runs only under TRITON_INTERPRET=1 (set before importing fusedloss), for tests.",
))
