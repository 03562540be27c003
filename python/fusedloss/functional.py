"""Drop-in functionals: validation (torch's error types, the argument named), 2-D views, reduction
denominators on the device (no host sync), and the decodings. Kernels live behind the backend
registry; the math is in docs/OPS.md.

Choices where torch is silent or where we extend it (also in README):
- label_smoothing < 0 raises (torch accepts it silently and computes a meaningless loss); > 1
  raises the same RuntimeError as torch.
- NaN in `weight`/`pos_weight` raises ValueError when the tensor is on the CPU (checking a CUDA
  tensor would synchronise; the nn.Modules check once, at construction, on any device).
- BCE targets may also be bool or uint8 (read by the kernels without a conversion copy; torch
  raises for them); the result then has the input's dtype. For float targets the result dtype is
  torch's (the target's dtype, by torch's type promotion).
- Decodings are extra outputs, requested by keyword; the default call returns exactly torch's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _backend, _promotion, _views
from . import reference as ref
from ._checks import (
    check_floating_input,
    check_int,
    check_number,
    check_reduction,
    check_same_device,
    check_tensor,
    dtype_name,
    functorch_active,
    is_symbolic,
    legacy_reduction,
)
from ._reduction import mean_denominator
from .autograd import BCEConfig, CEConfig, bce_apply, ce_apply
from .thresholds import ThresholdHistogram


class CrossEntropyOutput(NamedTuple):
    loss: Tensor
    pred: Tensor  # int64 argmax over classes, target's shape
    confidence: Tensor  # float32 probability of pred
    correct: Tensor | None  # bool, pred == target and not ignored; None for probability targets


class BCEOutput(NamedTuple):
    loss: Tensor
    labels: Tensor | None  # bool multi-hot, input's shape (None without a threshold)
    probs: Tensor | None  # sigmoid(input) when return_probs
    counts: Tensor | None  # (3, C) int64 [TP, FP, FN] per class (last dim) when return_counts


class SoftmaxDecoding(NamedTuple):
    pred: Tensor
    confidence: Tensor


class SigmoidDecoding(NamedTuple):
    labels: Tensor
    probs: Tensor | None


# ----------------------------------------------------------------------------- former names
# linear.py calls these helpers by the names they had here; they live in _checks/_views now.
_check_tensor = check_tensor
_check_floating_input = check_floating_input
_check_number = check_number
_check_reduction = check_reduction
_check_same_device = check_same_device
_logit_threshold = _views.logit_threshold
_rows = _views.rows


def _check_class_weight(weight: Tensor | None, x2: Tensor) -> None:
    """The class weight's shape, device, NaN, and dtype (that of `x2`) checks."""
    _views.check_class_weight(weight, x2)
    if weight is not None and weight.dtype != x2.dtype:
        raise RuntimeError(f"expected scalar type {dtype_name(x2.dtype)} but found "
                           f"{dtype_name(weight.dtype)} (weight.dtype must match input)")


def _broadcast_view(name: str, value: Tensor | None, input: Tensor, x2: Tensor):
    """weight/pos_weight as a (R, C) view in the dtype of `x2`."""
    return _views.broadcast_view(name, value, input, x2, dtype=x2.dtype)


# ----------------------------------------------------------------------------- shared checks
def _loss_args(op: str, input, target, size_average, reduce, reduction, backend):
    """The checks both losses start with; returns (reduction, backend object)."""
    check_tensor("input", input)
    check_tensor("target", target)
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce, stacklevel=4)
    reduction = check_reduction(reduction)
    check_floating_input("input", input, op)
    b = _backend.get(backend, input.device)
    check_same_device("target", target, input)
    return reduction, b


def _wants_fused_grad(reduction: str, input: Tensor, *others) -> bool:
    """Write the logits' gradient in the forward pass? Only when it is the one gradient
    backward needs and backward is a plain one (not inside torch.func transforms), and not for
    fp16 logits: pre-scaled by 1/denominator and stored in fp16 it would be rounded twice and
    fall into fp16's subnormals before a GradScaler's scale reaches it (autograd.py)."""
    return (reduction != "none" and torch.is_grad_enabled() and input.requires_grad
            and input.dtype != torch.float16
            and not any(t is not None and t.requires_grad for t in others)
            and not functorch_active())


# ----------------------------------------------------------------------------- cross-entropy
def _ce_numbers(ignore_index, label_smoothing, lse_square_scale, softcap):
    """Validated (ignore_index, label_smoothing, lse_square_scale, softcap (0 = off))."""
    ignore_index = check_int("ignore_index", ignore_index)
    ls = check_number("label_smoothing", label_smoothing)
    if not is_symbolic(ls) and not 0.0 <= ls <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {ls}")
    s = check_number("lse_square_scale", lse_square_scale, 0.0)
    return ignore_index, ls, s, _softcap(softcap)


def _softcap(softcap) -> float:
    """The validated soft cap, 0.0 for None (off)."""
    if softcap is None:
        return 0.0
    cap = check_number("softcap", softcap)
    if not is_symbolic(cap) and not 0.0 < cap < math.inf:
        raise ValueError(f"softcap must be a finite number > 0 (or None to disable), got {cap}")
    return cap


def _ce_grad_scale(x2: Tensor, t2: Tensor, weight: Tensor | None, prob: bool,
                   ignore_index: int) -> Tensor:
    """1 / torch's "mean" denominator, on the device (no sync)."""
    acc = ref.compute_dtype(x2.dtype)
    if prob:
        denom = torch.full((), float(x2.shape[0]), device=x2.device, dtype=acc)
    else:
        denom = mean_denominator(t2, ignore_index,
                                 None if weight is None else weight.detach(), acc)
    return 1.0 / denom


def _check_inplace_logits(input: Tensor) -> None:
    """torch's rule for in-place ops: never on a leaf that requires grad, or a view of one. The
    overwrite would replace a parameter's values with its gradient, silently."""
    if not (torch.is_grad_enabled() and input.requires_grad):
        return
    base = input._base if input._is_view() else input
    if base.is_leaf:
        raise RuntimeError(
            f"a {'view of a ' if base is not input else ''}leaf Variable that requires grad "
            "is being used in an in-place operation: inplace_backward=True overwrites the "
            "logits (input) with their gradient; pass logits computed by a layer, or use the "
            "default inplace_backward=False")


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *,
                  backend: str = "auto", lse_square_scale: float = 0.0,
                  softcap: float | None = None, inplace_backward: bool = False,
                  return_decoding: bool = False):
    """torch.nn.functional.cross_entropy, fused; see docs/API.md for the keyword-only extras.

    lse_square_scale: z-loss, adds `lse_square_scale * logsumexp(z)^2` per non-ignored row.
    softcap: logits become `softcap * tanh(x / softcap)` before the softmax.
    inplace_backward: the gradient overwrites `input` (saves one logits-sized buffer).
    return_decoding: also return pred/confidence/correct (CrossEntropyOutput).
    """
    reduction, b = _loss_args("cross_entropy", input, target, size_average, reduce, reduction,
                              backend)
    ignore_index, ls, s, cap = _ce_numbers(ignore_index, label_smoothing, lse_square_scale,
                                           softcap)
    if inplace_backward:
        _check_inplace_logits(input)
    x2, t2, shape, prob = _views.ce_views(input, target, ignore_index)
    if x2.shape[1] == 0:  # no classes: the reference's empty sums (a kernel's lse is -inf)
        b = _backend.get("torch", input.device)
    _views.check_class_weight(weight, x2)
    if weight is not None and not prob and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("cross_entropy is not differentiable with respect to argument "
                           "'weight' for class-index targets (as in torch): weight cannot "
                           "have requires_grad=True; detach it")
    x2, t2, w2, out_dtype = _promotion.ce_dtypes(x2, t2, weight, prob)
    w2 = None if w2 is None else w2.contiguous()
    grad_scale = _ce_grad_scale(x2, t2, w2, prob, ignore_index) if reduction == "mean" else None
    cfg = CEConfig(backend=b.name, ignore_index=ignore_index, label_smoothing=ls,
                   lse_square_scale=s, softcap=cap, reduction=reduction,
                   fused_grad=_wants_fused_grad(reduction, x2, t2, w2),
                   inplace=bool(inplace_backward), decode=bool(return_decoding),
                   out_dtype=out_dtype)
    # inplace_backward on a K-dim or non-contiguous input overwrites the 2-D copy: correct,
    # it just saves no memory. [:3] drops the fused gradient, so only autograd holds it.
    loss, pred, conf = ce_apply(x2, t2, w2, grad_scale, cfg)[:3]
    if reduction == "none":
        loss = loss.reshape(shape)
    if not return_decoding:
        return loss
    pred = pred.reshape(shape)
    conf = conf.reshape(shape)
    correct = None
    if not prob:
        t_shaped = t2.reshape(shape)
        correct = (pred == t_shaped) & (t_shaped != ignore_index)
    return CrossEntropyOutput(loss, pred, conf, correct)


# ----------------------------------------------------------------------------- BCE
def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Tensor | None = None, size_average=None,
                                     reduce=None, reduction: str = "mean",
                                     pos_weight: Tensor | None = None, *, backend: str = "auto",
                                     threshold=None, logit_threshold=None,
                                     return_probs: bool = False, return_counts: bool = False,
                                     histogram=None):
    """torch.nn.functional.binary_cross_entropy_with_logits, fused; decodings by keyword.

    threshold / logit_threshold: multi-hot labels `input > logit(threshold)` (strict) per class
    (the last dim); return_probs: sigmoid(input); return_counts: (3, C) [TP, FP, FN].
    With any of them the result is a BCEOutput, else the plain loss tensor.
    histogram: a ThresholdHistogram the same pass adds these logits and targets to (as its
    `update` would), for threshold tuning without keeping the logits.
    """
    reduction, b = _loss_args("binary_cross_entropy_with_logits", input, target, size_average,
                              reduce, reduction, backend)
    x2, t2 = _views.bce_views(input, target)
    x2, t2, out_dtype = _promotion.bce_dtypes(x2, t2)
    if reduction == "none" and not t2.is_floating_point() and out_dtype != x2.dtype:
        # autocast runs the loss in fp32; for a bool/uint8 target the op's elementwise loss
        # is in the logits' dtype, so read that target as fp32 to compute and store it in fp32
        t2 = t2.to(out_dtype)
    w2 = _views.broadcast_view("weight", weight, input, x2)
    pw2 = _views.broadcast_view("pos_weight", pos_weight, input, x2)
    thr = _views.logit_threshold(threshold, logit_threshold, x2.shape[1], input.device)
    if return_counts and thr is None:
        raise ValueError("return_counts=True needs threshold= or logit_threshold=")
    grad_scale = None
    if reduction == "mean":
        grad_scale = torch.full((), 1.0 / input.numel() if input.numel() else math.nan,
                                dtype=ref.compute_dtype(x2.dtype), device=input.device)
    hist = histogram_tensors(histogram, x2.shape[1], input.device)
    cfg = BCEConfig(backend=b.name, reduction=reduction,
                    fused_grad=_wants_fused_grad(reduction, x2, t2, w2, pw2),
                    return_probs=bool(return_probs), count=bool(return_counts),
                    out_dtype=out_dtype)
    loss, labels, probs, counts = bce_apply(
        x2, t2, w2, pw2, grad_scale, thr, cfg, hist)[:4]
    if reduction == "none":
        loss = loss.reshape(input.shape)
    if thr is None and not return_probs:
        return loss
    return BCEOutput(loss,
                     labels.reshape(input.shape) if thr is not None else None,
                     probs.reshape(input.shape) if return_probs else None,
                     counts if return_counts else None)


def histogram_tensors(histogram, classes: int, device: torch.device):
    """None, or the (edges, counts) a fused BCE pass adds to, from a ThresholdHistogram."""
    if histogram is None:
        return None
    if not isinstance(histogram, ThresholdHistogram):
        raise TypeError("histogram must be a fusedloss.ThresholdHistogram or None, got "
                        f"{type(histogram).__name__}")
    return histogram._op_tensors(classes, device)


# ----------------------------------------------------------------------------- decoding only
def softmax_decode(logits: Tensor, *, softcap: float | None = None,
                   backend: str = "auto") -> SoftmaxDecoding:
    """Argmax over the last dim (lowest index on ties) and its softmax probability (fp32)."""
    check_tensor("logits", logits)
    check_floating_input("logits", logits, "softmax_decode")
    if logits.dim() == 0:
        raise ValueError("logits must have a class dimension (the last), got a 0-d tensor")
    cap = _softcap(softcap)  # cross_entropy's rule: 0 and inf raise, None is off
    b = _backend.get(backend, logits.device)
    x2 = _views.rows(_views.classes_last(logits.detach()))  # decodings: not differentiable
    pred, conf = b.ops.softmax_decode(x2, cap)
    return SoftmaxDecoding(pred.reshape(logits.shape[:-1]), conf.reshape(logits.shape[:-1]))


def sigmoid_decode(logits: Tensor, threshold=0.5, *, logit_threshold=None,
                   return_probs: bool = False, backend: str = "auto") -> SigmoidDecoding:
    """Multi-hot labels `logits > logit(threshold)` per class (last dim), optional sigmoids."""
    check_tensor("logits", logits)
    check_floating_input("logits", logits, "sigmoid_decode")
    b = _backend.get(backend, logits.device)
    c = logits.shape[-1] if logits.dim() > 0 else 1
    x = logits.detach()  # decodings are not differentiable; a 0-d logit is one class
    x2 = _views.rows(_views.classes_last(x.reshape(1) if x.dim() == 0 else x))
    if logit_threshold is not None and not (isinstance(threshold, float) and threshold == 0.5):
        # a threshold other than the default, given with logit_threshold: ambiguous (as in BCE)
        raise ValueError("give either threshold (probability) or logit_threshold, not both")
    if threshold is None and logit_threshold is None:
        raise ValueError("sigmoid_decode needs a threshold (probability, default 0.5) or a "
                         "logit_threshold; got threshold=None")
    thr = _views.logit_threshold(None if logit_threshold is not None else threshold,
                                 logit_threshold, c, logits.device)
    labels, probs = b.ops.sigmoid_decode(x2, thr, bool(return_probs))
    return SigmoidDecoding(labels.reshape(logits.shape),
                           probs.reshape(logits.shape) if return_probs else None)
