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
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from . import _backend
from . import reference as ref
from .autograd import SigmoidBCEFunction, SoftmaxCrossEntropyFunction

_REDUCTIONS = ("none", "mean", "sum")


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


# ----------------------------------------------------------------------------- validation
def legacy_reduction(size_average, reduce, emit_warning: bool = True, stacklevel: int = 3) -> str:
    """torch's mapping of the deprecated size_average/reduce pair to a reduction string."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if emit_warning:
        warnings.warn("size_average and reduce args will be deprecated, please use "
                      "reduction='none' instead." if not reduce else
                      "size_average and reduce args will be deprecated, please use "
                      f"reduction='{'mean' if size_average else 'sum'}' instead.",
                      stacklevel=stacklevel)
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def _check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction "
                         f"(reduction={reduction!r}; expected one of {_REDUCTIONS})")


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")


def _check_floating_input(name: str, x: Tensor, op: str) -> None:
    if not x.is_floating_point():
        raise NotImplementedError(f"{op}: {name} must be a floating point tensor, got dtype "
                                  f"{x.dtype}")


def _check_same_device(name: str, t: Tensor | None, x: Tensor) -> None:
    if t is not None and t.device != x.device:
        raise RuntimeError(f"{name} is on device {t.device} but input is on {x.device}; "
                           "move them to the same device")


def _eager() -> bool:
    """Value checks (NaN, range) read data; under torch.compile they are not traced."""
    return not torch.compiler.is_compiling()


def _check_no_nan(name: str, t: Tensor | None) -> None:
    if t is not None and t.device.type == "cpu" and t.numel() and _eager() \
            and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN: {t.tolist() if t.numel() <= 8 else '...'}")


def _check_number(name: str, value, lo=-math.inf, hi=math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (lo <= value <= hi) or math.isnan(value):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _loss_args(op: str, input, target, size_average, reduce, reduction, backend):
    """The checks both losses start with; returns (reduction, backend object)."""
    _check_tensor("input", input)
    _check_tensor("target", target)
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce, stacklevel=4)
    _check_reduction(reduction)
    _check_floating_input("input", input, op)
    b = _backend.get(backend, input.device)
    _check_same_device("target", target, input)
    return reduction, b


def _rows(x: Tensor) -> Tensor:
    """The kernels need unit stride along classes; anything else is copied once."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


# ----------------------------------------------------------------------------- cross-entropy
def _ce_views(input: Tensor, target: Tensor, ignore_index: int):
    """(x2 (R, C), t2, output shape, is_probability_target) following torch's rules."""
    if input.shape == target.shape:  # class probabilities
        if not target.is_floating_point():
            raise RuntimeError("Expected floating point type for target with class "
                               f"probabilities, got {_dtype_name(target.dtype)} (target)")
        if input.dim() == 0:
            raise IndexError("Dimension specified as 1 but tensor has no dimensions "
                             "(input must have a class dimension)")
        if ignore_index != -100:
            raise RuntimeError("ignore_index is not supported for floating point target "
                               f"(ignore_index={ignore_index})")
        common = torch.promote_types(input.dtype, target.dtype)
        x, t = input.to(common), target.to(common)
        if x.dim() == 1:
            return x.unsqueeze(0), t.unsqueeze(0), (), True
        c = x.shape[1]
        shape = x.shape[:1] + x.shape[2:]
        return (_rows(x.movedim(1, -1).reshape(-1, c)),
                _rows(t.movedim(1, -1).reshape(-1, c)), shape, True)
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError("expected target dtype to be Long or Byte, but got "
                           f"{_dtype_name(target.dtype)} (target)")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension, got a 0-d tensor")
    if input.dim() == 1:
        if target.dim() > 1 or target.numel() != 1:
            raise ValueError(f"Expected input batch_size (1) to match target batch_size "
                             f"({target.numel()}) (input is a single (C,) sample)")
        return input.unsqueeze(0), target.reshape(1).long(), target.shape, False
    if input.dim() == 2:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported "
                               f"(target.shape={tuple(target.shape)})")
    elif target.dim() != input.dim() - 1:
        raise RuntimeError("only batches of spatial targets supported "
                           f"({input.dim() - 1}D tensors) but got targets of dimension: "
                           f"{target.dim()}")
    batch_t = target.shape[0] if target.dim() > 0 else 0
    if batch_t != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target "
                         f"batch_size ({batch_t}).")
    if input.dim() > 2 and target.shape[1:] != input.shape[2:]:
        raise RuntimeError(f"size mismatch (got input: {list(input.shape)} , target: "
                           f"{list(target.shape)})")
    c = input.shape[1]
    x2 = input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, c)
    return _rows(x2), target.reshape(-1).long().contiguous(), target.shape, False


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.int32: "Int", torch.float32: "Float", torch.float64: "Double",
            torch.int64: "Long", torch.int16: "Short", torch.bool: "Bool",
            torch.float16: "Half", torch.bfloat16: "BFloat16", torch.int8: "Char",
            torch.uint8: "Byte"}.get(dtype, str(dtype))


def _check_class_weight(weight: Tensor | None, x2: Tensor) -> None:
    if weight is None:
        return
    _check_tensor("weight", weight)
    c = x2.shape[-1]
    if weight.dim() != 1 or weight.numel() != c:
        raise RuntimeError(f"weight tensor should be defined either for all {c} classes or no "
                           f"classes but got weight tensor of shape: {list(weight.shape)}")
    if weight.dtype != x2.dtype:
        raise RuntimeError(f"expected scalar type {_dtype_name(x2.dtype)} but found "
                           f"{_dtype_name(weight.dtype)} (weight.dtype must match input)")
    _check_same_device("weight", weight, x2)
    _check_no_nan("weight", weight)


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
    ls = float(label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {ls}")
    s = _check_number("lse_square_scale", lse_square_scale, 0.0)
    cap = 0.0 if softcap is None else _check_number("softcap", softcap, 0.0)
    if softcap is not None and cap == 0.0:
        raise ValueError("softcap must be > 0 (or None to disable), got 0.0")
    x2, t2, shape, prob = _ce_views(input, target, ignore_index)
    _check_class_weight(weight, x2)
    if prob and weight is not None and weight.dtype != x2.dtype:
        weight = weight.to(x2.dtype)

    needs_grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    grad_scale = None
    if reduction == "mean":  # 1 / torch's denominator, on the device (no sync)
        acc = ref.compute_dtype(x2.dtype)
        if prob:
            denom = torch.full((), float(x2.shape[0]), device=x2.device, dtype=acc)
        else:
            valid = t2 != ignore_index
            if weight is None:
                denom = valid.sum(dtype=acc)
            else:
                w_t = weight.to(acc)[t2.clamp(0, max(x2.shape[1] - 1, 0))] \
                    if x2.shape[1] else torch.zeros_like(t2, dtype=acc)
                denom = (w_t * valid).sum()
        grad_scale = 1.0 / denom
    # inplace_backward on a K-dim or non-contiguous input overwrites the 2-D copy: correct,
    # it just saves no memory.
    loss, pred, conf = SoftmaxCrossEntropyFunction.apply(
        x2, t2, weight, grad_scale, b.name, int(ignore_index), ls, s, cap, reduction,
        needs_grad, bool(inplace_backward), bool(return_decoding))
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
def _broadcast_view(name: str, value: Tensor | None, input: Tensor, x2: Tensor):
    """Broadcast weight/pos_weight to input's shape as a (R, C) view (strides may be 0)."""
    if value is None:
        return None
    _check_tensor(name, value)
    _check_same_device(name, value, input)
    try:
        full = torch.broadcast_shapes(value.shape, input.shape)
    except RuntimeError as e:
        raise RuntimeError(f"{name} of shape {list(value.shape)} does not broadcast to input "
                           f"of shape {list(input.shape)}: {e}") from None
    if full != input.shape:
        raise RuntimeError(f"{name} of shape {list(value.shape)}: output with shape "
                           f"{list(input.shape)} doesn't match the broadcast shape {list(full)}")
    _check_no_nan(name, value)
    v = value.to(x2.dtype).expand(input.shape).reshape(x2.shape)
    return v


def _logit_threshold(threshold, logit_threshold, num_classes: int, device) -> Tensor | None:
    """(C,) fp32 logit-space thresholds, validated; None when neither is given."""
    if threshold is not None and logit_threshold is not None:
        raise ValueError("give either threshold (probability) or logit_threshold, not both")
    if threshold is None and logit_threshold is None:
        return None
    name, value = ("threshold", threshold) if threshold is not None \
        else ("logit_threshold", logit_threshold)
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.numel() not in (1, num_classes):
            raise ValueError(f"{name} must be a scalar or have one value per class "
                             f"({num_classes}), got shape {list(value.shape)}")
        v = value.detach().to(torch.float64)
        if name == "threshold":
            bad = ~((v > 0) & (v < 1))
            if _eager() and bool(bad.any()):
                raise ValueError(f"threshold must be in (0, 1), got {v[bad][0].item()}")
            v = torch.logit(v)
        elif _eager() and bool(torch.isnan(v).any()):
            raise ValueError("logit_threshold contains NaN")
        return v.float().reshape(-1).expand(num_classes).to(device).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a Tensor, got {type(value).__name__}")
    if name == "threshold":
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {value}")
        value = ref.logit_threshold(float(value))
    elif math.isnan(float(value)):
        raise ValueError("logit_threshold is NaN")
    return torch.full((num_classes,), float(value), dtype=torch.float32, device=device)


def _bce_views(input: Tensor, target: Tensor):
    if target.shape != input.shape:
        raise ValueError(f"Target size ({target.shape}) must be the same as input size "
                         f"({input.shape})")
    if target.dtype in (torch.bool, torch.uint8):
        x, t, out_dtype = input, target, input.dtype
    elif target.is_floating_point():
        common = torch.promote_types(input.dtype, target.dtype)
        x, t, out_dtype = input.to(common), target.to(common), target.dtype
    else:
        raise RuntimeError(f"result type Float can't be cast to the desired output type "
                           f"{_dtype_name(target.dtype)} (target must be floating point, bool "
                           "or uint8)")
    c = x.shape[-1] if x.dim() > 0 else 1
    rows = x.numel() // c if c else 0
    x2 = _rows(x.reshape(rows, c))
    t2 = _rows(t.reshape(rows, c))
    return x2, t2, out_dtype


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Tensor | None = None, size_average=None,
                                     reduce=None, reduction: str = "mean",
                                     pos_weight: Tensor | None = None, *, backend: str = "auto",
                                     threshold=None, logit_threshold=None,
                                     return_probs: bool = False, return_counts: bool = False):
    """torch.nn.functional.binary_cross_entropy_with_logits, fused; decodings by keyword.

    threshold / logit_threshold: multi-hot labels `input > logit(threshold)` (strict) per class
    (the last dim); return_probs: sigmoid(input); return_counts: (3, C) [TP, FP, FN].
    With any of them the result is a BCEOutput, else the plain loss tensor.
    """
    reduction, b = _loss_args("binary_cross_entropy_with_logits", input, target, size_average,
                              reduce, reduction, backend)
    x2, t2, out_dtype = _bce_views(input, target)
    w2 = _broadcast_view("weight", weight, input, x2)
    pw2 = _broadcast_view("pos_weight", pos_weight, input, x2)
    thr = _logit_threshold(threshold, logit_threshold, x2.shape[1], input.device)
    if return_counts and thr is None:
        raise ValueError("return_counts=True needs threshold= or logit_threshold=")
    needs_grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    grad_scale = None
    if reduction == "mean":
        grad_scale = torch.full((), 1.0 / input.numel() if input.numel() else math.nan,
                                dtype=ref.compute_dtype(x2.dtype), device=input.device)
    loss, labels, probs, counts = SigmoidBCEFunction.apply(
        x2, t2, w2, pw2, grad_scale, thr, b.name, reduction, needs_grad, bool(return_probs),
        bool(return_counts))
    if reduction == "none":
        loss = loss.reshape(input.shape)
    loss = loss.to(out_dtype)
    if thr is None and not return_probs:
        return loss
    return BCEOutput(loss,
                     labels.reshape(input.shape) if thr is not None else None,
                     probs.reshape(input.shape) if return_probs else None,
                     counts if return_counts else None)


# ----------------------------------------------------------------------------- decoding only
def softmax_decode(logits: Tensor, *, softcap: float | None = None,
                   backend: str = "auto") -> SoftmaxDecoding:
    """Argmax over the last dim (lowest index on ties) and its softmax probability (fp32)."""
    _check_tensor("logits", logits)
    _check_floating_input("logits", logits, "softmax_decode")
    if logits.dim() == 0:
        raise ValueError("logits must have a class dimension (the last), got a 0-d tensor")
    cap = 0.0 if softcap is None else _check_number("softcap", softcap, 0.0)
    b = _backend.get(backend, logits.device)
    c = logits.shape[-1]
    x2 = _rows(logits.detach().reshape(-1, c))  # decodings are not differentiable
    pred, conf = b.ops.softmax_decode(x2, cap)
    return SoftmaxDecoding(pred.reshape(logits.shape[:-1]), conf.reshape(logits.shape[:-1]))


def sigmoid_decode(logits: Tensor, threshold=0.5, *, logit_threshold=None,
                   return_probs: bool = False, backend: str = "auto") -> SigmoidDecoding:
    """Multi-hot labels `logits > logit(threshold)` per class (last dim), optional sigmoids."""
    _check_tensor("logits", logits)
    _check_floating_input("logits", logits, "sigmoid_decode")
    b = _backend.get(backend, logits.device)
    c = logits.shape[-1] if logits.dim() > 0 else 1
    x2 = _rows(logits.detach().reshape(-1, c))  # decodings are not differentiable
    thr = _logit_threshold(None if logit_threshold is not None else threshold,
                           logit_threshold, c, logits.device)
    labels, probs = b.ops.sigmoid_decode(x2, thr, bool(return_probs))
    return SigmoidDecoding(labels.reshape(logits.shape),
                           probs.reshape(logits.shape) if return_probs else None)
