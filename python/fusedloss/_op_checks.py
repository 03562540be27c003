"""Argument checks of the fusedloss ops for the Python backends (torch, triton).

The same checks, messages and exception types as csrc/op_checks.h (the native backend), so that
every backend rejects a bad argument the same way (tests/test_op_agreement.py):
- a tensor argument of the wrong rank, shape, dtype, stride or device: RuntimeError;
- a float argument out of its domain (label_smoothing, lse_square_scale, softcap) or
  count=True without a threshold, or one of hist_edges / hist_counts without the other:
  ValueError;
- a class index outside [0, C) that is not ignore_index: IndexError("Target <v> is out of
  bounds."), where reading the targets needs no device sync (CPU tensors).
Every message starts with "<op>: <argument>". Nothing here reads tensor data except the
class-index range check.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dtypes import acc_dtype
from .reference import check_target_range as check_range

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require(ok: bool, op: str, message: str) -> None:
    if not ok:
        raise RuntimeError(f"{op}: {message}")


def check_same_device(op: str, name: str, t: Tensor, logits: Tensor) -> None:
    _require(t.device == logits.device, op,
             f"{name} must be on the logits' device {logits.device}, got {t.device}")


def check_logits(op: str, logits: Tensor, unit_col_stride: bool) -> None:
    _require(logits.dim() == 2, op,
             f"logits must be 2-D (rows, classes), got shape {tuple(logits.shape)}")
    _require(logits.dtype in FLOAT_DTYPES, op,
             f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if unit_col_stride:
        _require(logits.shape[1] <= 1 or logits.stride(1) == 1, op,
                 "logits must have stride(1) == 1 (rows may be strided), got strides "
                 f"{logits.stride()}")


def check_ce_target(op: str, target: Tensor, logits: Tensor) -> bool:
    """(R,) int64 class indices, or (R, C) probabilities in the logits' dtype or the
    accumulation dtype with stride(1) == 1. Returns True for probabilities."""
    check_same_device(op, "target", target, logits)
    if target.dim() == 1:
        _require(target.dtype == torch.int64, op,
                 f"target (class indices) must be int64, got {target.dtype}")
        _require(target.shape[0] == logits.shape[0], op,
                 f"target must have shape ({logits.shape[0]},) for logits of shape "
                 f"{tuple(logits.shape)}, got {tuple(target.shape)}")
        return False
    _require(target.dim() == 2, op, "target must be (rows,) class indices or (rows, classes) "
             f"probabilities, got shape {tuple(target.shape)}")
    acc = acc_dtype(logits.dtype)
    _require(target.dtype in (logits.dtype, acc), op,
             f"target (probabilities) must have the logits' dtype {logits.dtype} or the "
             f"accumulation dtype {acc}, got {target.dtype}")
    _require(target.shape == logits.shape, op, "target (probabilities) must have the logits' "
             f"shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    _require(target.shape[1] <= 1 or target.stride(1) == 1, op,
             f"target (probabilities) must have stride(1) == 1, got strides {target.stride()}")
    return True


def check_class_vector(op: str, name: str, v: Tensor, logits: Tensor) -> None:
    """(C,) per-class vector (CE weight, BCE threshold) of any float dtype and stride."""
    check_same_device(op, name, v, logits)
    _require(v.dim() == 1 and v.shape[0] == logits.shape[1], op,
             f"{name} must have shape ({logits.shape[1]},), got {tuple(v.shape)}")
    _require(v.dtype in FLOAT_DTYPES, op, f"{name} must be floating, got {v.dtype}")


def check_elementwise_operand(op: str, name: str, t: Tensor, logits: Tensor,
                              allow_bytes: bool = False) -> None:
    """(R, C) operand of a sigmoid op, any strides; float (or bool/uint8 when allowed)."""
    check_same_device(op, name, t, logits)
    _require(t.shape == logits.shape, op,
             f"{name} must have the logits' shape {tuple(logits.shape)}, got {tuple(t.shape)}")
    ok = t.dtype in FLOAT_DTYPES or (allow_bytes and t.dtype in (torch.bool, torch.uint8))
    _require(ok, op, f"{name} must be floating{' (or bool/uint8)' if allow_bytes else ''}, "
             f"got {t.dtype}")


def check_bce_target(op: str, target: Tensor, logits: Tensor) -> None:
    check_elementwise_operand(op, "target", target, logits, allow_bytes=True)
    acc = acc_dtype(logits.dtype)
    _require(target.dtype not in FLOAT_DTYPES or target.dtype in (logits.dtype, acc), op,
             f"target must have the logits' dtype {logits.dtype}, the accumulation dtype "
             f"{acc}, bool or uint8, got {target.dtype}")


def check_scalar_tensor(op: str, name: str, t: Tensor, logits: Tensor) -> None:
    check_same_device(op, name, t, logits)
    _require(t.numel() == 1, op, f"{name} must be a 0-dim tensor, got shape {tuple(t.shape)}")
    _require(t.dtype in FLOAT_DTYPES, op, f"{name} must be floating, got {t.dtype}")


def check_row_vector(op: str, name: str, t: Tensor, logits: Tensor) -> None:
    check_same_device(op, name, t, logits)
    _require(t.dim() == 1 and t.shape[0] == logits.shape[0], op,
             f"{name} must have shape ({logits.shape[0]},), got {tuple(t.shape)}")
    _require(t.dtype in FLOAT_DTYPES, op, f"{name} must be floating, got {t.dtype}")


def _concrete(value) -> bool:
    """A plain number, checked here. Under torch.compile a Python float may be a symbolic value
    (dynamic=True) that math.isfinite cannot read: it is not checked here while compiling; the
    functional layer validates the user's values before the op is reached."""
    if torch.compiler.is_compiling():
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_softcap(op: str, softcap) -> None:
    if _concrete(softcap) and not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{op}: softcap must be finite and >= 0 (0 = off), got {softcap}")


def check_ce_scalars(op: str, label_smoothing, lse_square_scale, softcap) -> None:
    if _concrete(label_smoothing) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if _concrete(lse_square_scale) and not (math.isfinite(lse_square_scale)
                                            and lse_square_scale >= 0):
        raise ValueError(f"{op}: lse_square_scale must be finite and >= 0, got "
                         f"{lse_square_scale}")
    check_softcap(op, softcap)


def check_count(op: str, count: bool, has_threshold: bool) -> None:
    if count and not has_threshold:
        raise ValueError(f"{op}: count=True needs a threshold, got None")


def check_histogram(op: str, edges: Tensor | None, counts: Tensor | None,
                    logits: Tensor) -> None:
    """sigmoid_bce_fwd's threshold histogram: both or neither; edges (B + 1,) float32 contiguous,
    counts (2, C, B + 2) int64 contiguous, on the logits' device (order of edges not read)."""
    if (edges is None) != (counts is None):
        alone = "hist_counts" if edges is None else "hist_edges"
        raise ValueError(f"{op}: hist_counts and hist_edges must be given together, got {alone} "
                         "alone")
    if edges is None:
        return
    check_same_device(op, "hist_edges", edges, logits)
    _require(edges.dim() == 1 and edges.shape[0] >= 1 and edges.stride(0) == 1, op,
             "hist_edges must be a non-empty contiguous 1-D tensor, got shape "
             f"{tuple(edges.shape)} and strides {edges.stride()}")
    _require(edges.dtype == torch.float32, op, f"hist_edges must be float32, got {edges.dtype}")
    check_same_device(op, "hist_counts", counts, logits)
    _require(counts.dtype == torch.int64, op, f"hist_counts must be int64, got {counts.dtype}")
    want = (2, logits.shape[1], edges.shape[0] + 1)
    _require(tuple(counts.shape) == want and counts.is_contiguous(), op,
             f"hist_counts must be a contiguous {want} tensor, got shape {tuple(counts.shape)} "
             f"and strides {counts.stride()}")


def check_target_range(target: Tensor, ignore_index: int, num_classes: int) -> None:
    """IndexError (as torch's nll_loss) for a class index outside [0, C) on CPU tensors, where
    the check costs no device sync (the rule: reference.check_target_range)."""
    if target.device.type == "cpu":
        check_range(target, ignore_index, num_classes)


# ---- the checks of each op (shared by the torch and triton backends) -----------------------

def softmax_ce(op: str, logits: Tensor, target: Tensor, weight: Tensor | None,
               grad_scale: Tensor | None, ignore_index: int, label_smoothing, lse_square_scale,
               softcap) -> None:
    check_logits(op, logits, unit_col_stride=True)
    prob = check_ce_target(op, target, logits)
    if weight is not None:
        check_class_vector(op, "weight", weight, logits)
    if grad_scale is not None:
        check_scalar_tensor(op, "grad_scale", grad_scale, logits)
    check_ce_scalars(op, label_smoothing, lse_square_scale, softcap)
    if not prob:
        check_target_range(target, ignore_index, logits.shape[1])


def softmax_ce_bwd(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None,
                   ignore_index: int, label_smoothing, lse_square_scale, softcap) -> None:
    op = "softmax_ce_bwd"
    softmax_ce(op, logits, target, weight, None, ignore_index, label_smoothing,
               lse_square_scale, softcap)
    check_row_vector(op, "grad_loss", grad_loss, logits)


def softmax_decode(logits: Tensor, softcap) -> None:
    check_logits("softmax_decode", logits, unit_col_stride=True)
    check_softcap("softmax_decode", softcap)


def sigmoid_bce(op: str, logits: Tensor, target: Tensor, weight: Tensor | None,
                pos_weight: Tensor | None, grad_scale: Tensor | None = None,
                threshold: Tensor | None = None, count: bool = False,
                grad_loss: Tensor | None = None, hist_edges: Tensor | None = None,
                hist_counts: Tensor | None = None) -> None:
    check_logits(op, logits, unit_col_stride=False)
    if grad_loss is not None:
        check_elementwise_operand(op, "grad_loss", grad_loss, logits)
    check_bce_target(op, target, logits)
    if weight is not None:
        check_elementwise_operand(op, "weight", weight, logits)
    if pos_weight is not None:
        check_elementwise_operand(op, "pos_weight", pos_weight, logits)
    if grad_scale is not None:
        check_scalar_tensor(op, "grad_scale", grad_scale, logits)
    if threshold is not None:
        check_class_vector(op, "threshold", threshold, logits)
    check_count(op, count, threshold is not None)
    check_histogram(op, hist_edges, hist_counts, logits)


def sigmoid_decode(logits: Tensor, threshold: Tensor) -> None:
    check_logits("sigmoid_decode", logits, unit_col_stride=False)
    check_class_vector("sigmoid_decode", "threshold", threshold, logits)


def scale_grad_(grad: Tensor, scale: Tensor) -> None:
    _require(grad.dtype in FLOAT_DTYPES, "scale_grad_",
             f"grad must be float16, bfloat16, float32 or float64, got {grad.dtype}")
    check_scalar_tensor("scale_grad_", "scale", scale, grad)
