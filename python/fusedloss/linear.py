"""Fused linear + loss: `loss(F.linear(input, linear_weight, linear_bias), target)` without the
(rows, classes) logits ever existing in full (docs/linear.md).

The "native" and "triton" backends (and "auto") run the row-chunked ops of linear_ce.py /
linear_bce.py: torch matmuls plus that backend's fused loss kernel. backend="torch" is the
reference: the logits are materialised and handed to the torch backend's loss.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from . import _backend, _promotion, _views
from . import functional as F
from . import reference as ref
from ._checks import exporting, forward_ad_active, functorch_active, has_data
from ._reduction import mean_denominator
from .linear_bce import LinearBCEFunction
from .linear_ce import LinearCrossEntropyFunction
from .linear_chunks import BCE_CHUNK_MEMORY_FRACTION, BCE_SUB_BLOCKS, default_chunk_rows


def _check_linear(input, linear_weight, linear_bias):
    """Shapes/dtypes/devices of the linear layer, cast as F.linear is under autocast; returns
    (x2 (N, H), linear_weight, linear_bias, batch shape, C)."""
    F._check_tensor("input", input)
    F._check_tensor("linear_weight", linear_weight)
    if linear_bias is not None:
        F._check_tensor("linear_bias", linear_bias)
    F._check_floating_input("input", input, "linear loss")
    input, linear_weight, linear_bias = _promotion.autocast_linear(input, linear_weight,
                                                                   linear_bias)
    if input.dim() == 0:
        raise ValueError("input must have a hidden dimension (the last), got a 0-d tensor")
    if linear_weight.dim() != 2:
        raise RuntimeError(f"linear_weight must be 2-D (classes, hidden), got shape "
                           f"{list(linear_weight.shape)}")
    hidden = input.shape[-1]
    if linear_weight.shape[1] != hidden:
        raise RuntimeError(f"hidden size mismatch: input.shape[-1] = {hidden} but "
                           f"linear_weight.shape[1] = {linear_weight.shape[1]} "
                           f"(linear_weight is (classes, hidden))")
    if linear_weight.dtype != input.dtype:
        raise RuntimeError(f"linear_weight.dtype ({linear_weight.dtype}) must match "
                           f"input.dtype ({input.dtype})")
    F._check_same_device("linear_weight", linear_weight, input)
    classes = linear_weight.shape[0]
    if linear_bias is not None:
        if tuple(linear_bias.shape) != (classes,):
            raise RuntimeError(f"linear_bias must have shape ({classes},) (one value per class "
                               f"of linear_weight), got {list(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise RuntimeError(f"linear_bias.dtype ({linear_bias.dtype}) must match "
                               f"input.dtype ({input.dtype})")
        F._check_same_device("linear_bias", linear_bias, input)
    return _views.classes_last(input), linear_weight, linear_bias, input.shape[:-1], classes


def _chunk_rows(chunk_size, x2: Tensor, classes: int, bce: bool = False) -> int:
    if chunk_size is None:
        if bce:  # the logits buffer and one sub-block's op gradient
            return default_chunk_rows(x2.shape[0], x2.shape[1], classes, x2.dtype, x2.device,
                                      1 + 1 / BCE_SUB_BLOCKS, BCE_CHUNK_MEMORY_FRACTION)
        return default_chunk_rows(x2.shape[0], x2.shape[1], classes, x2.dtype, x2.device)
    if isinstance(chunk_size, bool) or (isinstance(chunk_size, Tensor)
                                        and chunk_size.dtype == torch.bool):
        raise TypeError(f"chunk_size must be a positive int or None, got "
                        f"{type(chunk_size).__name__} ({chunk_size!r})")
    try:
        chunk_size = operator.index(chunk_size)
    except TypeError:
        raise TypeError(f"chunk_size must be a positive int or None, got "
                        f"{type(chunk_size).__name__} ({chunk_size!r})") from None
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return chunk_size


def _ce_target(target, batch_shape, classes: int, ignore_index: int, dtype):
    """(t2, is_probability): (N,) int64 class indices or (N, C) probabilities."""
    F._check_tensor("target", target)
    if target.is_floating_point():
        if tuple(target.shape) != (*batch_shape, classes):
            raise RuntimeError(f"probability target must have shape input.shape[:-1] + "
                               f"(classes,) = {[*batch_shape, classes]}, got "
                               f"{list(target.shape)}")
        if ignore_index >= 0:  # torch's check: a negative one is simply unused
            raise RuntimeError("ignore_index is not supported for floating point target "
                               f"(ignore_index={ignore_index})")
        t2 = _views.classes_last(target)
        # the ops read a probability target in the logits' or the accumulation dtype, with
        # unit stride along the classes
        if t2.dtype not in (dtype, ref.compute_dtype(dtype)):
            t2 = t2.to(ref.compute_dtype(dtype))
        return F._rows(t2), True
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError("expected target dtype to be Long or Byte (class indices) or "
                           f"floating point (probabilities), got {target.dtype} (target)")
    if target.shape != batch_shape:
        raise ValueError(f"class-index target must have shape input.shape[:-1] = "
                           f"{list(batch_shape)}, got {list(target.shape)}")
    return target.reshape(-1).long().contiguous(), False


def _ce_mean_scale(t2: Tensor, weight: Tensor | None, prob: bool, ignore_index: int,
                   classes: int, acc: torch.dtype) -> Tensor:
    """1 / torch's 'mean' denominator, on the device (no sync): rows for probabilities, else
    the summed class weight of the non-ignored rows."""
    if prob:
        return 1.0 / torch.full((), float(t2.shape[0]), device=t2.device, dtype=acc)
    return 1.0 / mean_denominator(t2, ignore_index, weight, acc)


def _ce_options(reduction, ignore_index, label_smoothing, lse_square_scale, softcap):
    """Validated (ignore_index, label_smoothing, lse_square_scale, softcap (0 = off)), with
    cross_entropy's checks and error types (torch's)."""
    return (F._check_reduction(reduction),
            *F._ce_numbers(ignore_index, label_smoothing, lse_square_scale, softcap))


def _materialise(b) -> bool:
    """Whether the linear losses take the reference path, F.linear then the backend's loss."""
    return b.name == "torch" or functorch_active() or forward_ad_active() or exporting()


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = -100,
                         label_smoothing: float = 0.0, backend: str = "auto",
                         lse_square_scale: float = 0.0, softcap: float | None = None,
                         return_decoding: bool = False, chunk_size: int | None = None):
    """`cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`, fused.

    input (..., H), linear_weight (C, H), target (...) class indices or (..., C)
    probabilities. Options as fusedloss.cross_entropy; chunk_size: rows per chunk (None: the
    rule in docs/linear.md). Returns the loss, or a CrossEntropyOutput with return_decoding.
    ignore_index=None means -100, as in torch's F.linear_cross_entropy.
    """
    if ignore_index is None:
        ignore_index = -100
    x2, linear_weight, linear_bias, batch_shape, classes = _check_linear(
        input, linear_weight, linear_bias)
    reduction, ignore_index, ls, s, cap = _ce_options(reduction, ignore_index,
                                                      label_smoothing, lse_square_scale,
                                                      softcap)
    b = _backend.get(backend, input.device)
    F._check_same_device("target", target, input)
    t2, prob = _ce_target(target, batch_shape, classes, ignore_index, x2.dtype)
    _views.check_class_weight(weight, linear_weight.t())  # .t(): (H, C), classes last
    out_dtype = _promotion.ce_result_dtype(x2.dtype, x2.device.type, target, weight, prob)
    chunk = _chunk_rows(chunk_size, x2, classes)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled() and not prob:
        raise RuntimeError("cross_entropy is not differentiable with respect to argument "
                           "'weight' for class-index targets (as in torch): weight cannot "
                           "have requires_grad=True; detach it")
    # A class weight that needs its gradient (probability targets) takes the reference path:
    # the chunked ops compute no gradient for it, and autograd would silently give none.
    # So do torch.func transforms (grad, vmap, jacrev...): the chunked autograd.Function has
    # no vmap rule, while the backend's cross_entropy on the materialised logits has one; and
    # forward-mode AD (no jvp) and torch.export (see _checks.exporting).
    if _materialise(b) or (weight is not None and weight.requires_grad
                           and torch.is_grad_enabled()):
        logits = tF.linear(x2, linear_weight, linear_bias)
        res = F.cross_entropy(logits, target.reshape(t2.shape) if prob else t2, weight,
                              ignore_index=ignore_index,
                              reduction=reduction, label_smoothing=ls, backend=b.name,
                              lse_square_scale=s, softcap=softcap,
                              return_decoding=return_decoding)
        loss, pred, conf = (res, None, None) if not return_decoding else res[:3]
    else:
        acc = ref.compute_dtype(x2.dtype)
        grad_scale = _ce_mean_scale(t2, weight, prob, ignore_index, classes, acc) \
            if reduction == "mean" else None
        on = torch.is_grad_enabled()
        loss, pred, conf = LinearCrossEntropyFunction.apply(
            x2, linear_weight, linear_bias, t2, None if weight is None else weight.to(acc),
            grad_scale, b.name, ignore_index, ls, s, cap, chunk, reduction,
            on and x2.requires_grad, on and linear_weight.requires_grad,
            on and linear_bias is not None and linear_bias.requires_grad,
            on and prob and target.requires_grad, bool(return_decoding), out_dtype)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    if not return_decoding:
        return loss
    pred, conf = pred.reshape(batch_shape), conf.reshape(batch_shape)
    correct = None
    if not prob:
        t = t2.reshape(batch_shape)
        correct = (pred == t) & (t != ignore_index)
    return F.CrossEntropyOutput(loss, pred, conf, correct)


def _bce_target(target, out_shape, dtype, reduction: str):
    """(t2 (N, C) unit stride along classes, result dtype of the loss)."""
    F._check_tensor("target", target)
    if tuple(target.shape) != tuple(out_shape):
        raise ValueError(f"target must have shape input.shape[:-1] + (classes,) = "
                         f"{list(out_shape)}, got {list(target.shape)}")
    acc = ref.compute_dtype(dtype)
    if target.dtype in (torch.bool, torch.uint8):
        t, out_dtype = target, dtype
    elif target.is_floating_point():  # read in the logits' or the accumulation dtype
        t, out_dtype = target if target.dtype in (dtype, acc) else target.to(acc), target.dtype
    else:
        raise RuntimeError(f"target must be floating point, bool or uint8, got {target.dtype}")
    if out_dtype in (torch.float16, torch.bfloat16) and _promotion.autocast_enabled(
            target.device.type):
        out_dtype = torch.float32  # autocast runs the loss in fp32, as torch's does
        if reduction == "none" and not t.is_floating_point():
            # the op gives an elementwise loss in the logits' dtype for a bool/uint8 target:
            # read it as fp32, so that the loss is computed and stored in fp32
            t = t.to(torch.float32)
    return F._rows(_views.classes_last(t)), out_dtype


def linear_binary_cross_entropy_with_logits(
        input: Tensor, linear_weight: Tensor, target: Tensor, *,
        linear_bias: Tensor | None = None, weight: Tensor | None = None,
        pos_weight: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
        threshold=None, logit_threshold=None, return_counts: bool = False,
        chunk_size: int | None = None, histogram=None):
    """`binary_cross_entropy_with_logits(F.linear(input, linear_weight, linear_bias), target)`,
    fused, for multi-label heads.

    input (..., H), linear_weight (L, H), target (..., L) float, bool or uint8 (read as is).
    weight / pos_weight broadcast to (..., L). threshold (probability) / logit_threshold give
    the multi-hot labels `logits > logit(threshold)`; return_counts the (3, L) [TP, FP, FN]
    per label. With either, the result is a BCEOutput (probs is None), else the loss.
    histogram: a ThresholdHistogram that the pass adds the logits and targets to, chunk by
    chunk (the logits never exist as a whole).
    """
    x2, linear_weight, linear_bias, batch_shape, classes = _check_linear(
        input, linear_weight, linear_bias)
    reduction = F._check_reduction(reduction)
    b = _backend.get(backend, input.device)
    F._check_same_device("target", target, input)
    out_shape = (*batch_shape, classes)
    t2, out_dtype = _bce_target(target, out_shape, x2.dtype, reduction)
    like = x2.new_empty(()).expand(out_shape)  # shape/dtype/device only, no memory
    # weight / pos_weight in the logits' dtype, as torch's loss rounds them; under autocast
    # torch runs the loss in fp32, so they stay fp32 (the accumulation dtype)
    side = _promotion.autocast_dtype(x2, x2.device.type)
    w2 = _views.broadcast_view("weight", weight, like, t2, dtype=side)
    pw2 = _views.broadcast_view("pos_weight", pos_weight, like, t2, dtype=side)
    thr = F._logit_threshold(threshold, logit_threshold, classes, input.device)
    if return_counts and thr is None:
        raise ValueError("return_counts=True needs threshold= or logit_threshold=")
    chunk = _chunk_rows(chunk_size, x2, classes, bce=True)
    if _materialise(b):  # as in linear_cross_entropy
        logits = tF.linear(x2, linear_weight, linear_bias).reshape(out_shape)
        res = F.binary_cross_entropy_with_logits(
            logits, target, weight, reduction=reduction, pos_weight=pos_weight,
            backend=b.name, threshold=threshold, logit_threshold=logit_threshold,
            return_counts=return_counts, histogram=histogram)
        return res
    acc = ref.compute_dtype(x2.dtype)
    grad_scale = None
    if reduction == "mean":
        n = x2.shape[0] * classes
        grad_scale = torch.full((), 1.0 / n if n else float("nan"), dtype=acc,
                                device=input.device)
    on = torch.is_grad_enabled()
    loss, labels, counts = LinearBCEFunction.apply(
        x2, linear_weight, linear_bias, t2, w2, pw2, grad_scale, thr, b.name, chunk, reduction,
        on and x2.requires_grad, on and linear_weight.requires_grad,
        on and linear_bias is not None and linear_bias.requires_grad,
        on and target.is_floating_point() and target.requires_grad, bool(return_counts),
        F.histogram_tensors(histogram, classes, input.device))
    if reduction == "none":
        loss = loss.reshape(out_shape)
    loss = loss.to(out_dtype)
    if thr is None:
        return loss
    return F.BCEOutput(loss, labels.reshape(out_shape), None,
                       counts if return_counts else None)


class LinearCrossEntropyLoss(nn.Module):
    """Holds the options of linear_cross_entropy (not the classifier's weight):
    `loss_fn(hidden, lm_head.weight, target)` or with `linear_bias=lm_head.bias`."""

    def __init__(self, weight: Tensor | None = None, ignore_index: int | None = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 backend: str = "auto", lse_square_scale: float = 0.0,
                 softcap: float | None = None, return_decoding: bool = False,
                 chunk_size: int | None = None):
        super().__init__()
        _ce_options(reduction, -100, label_smoothing, lse_square_scale, softcap)
        if weight is not None:
            F._check_tensor("weight", weight)
            if weight.numel() and has_data(weight) and bool(torch.isnan(weight).any()):
                raise ValueError("weight contains NaN")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_decoding = return_decoding
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Tensor | None = None):
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, backend=self.backend,
            lse_square_scale=self.lse_square_scale, softcap=self.softcap,
            return_decoding=self.return_decoding, chunk_size=self.chunk_size)


class LinearBCEWithLogitsLoss(nn.Module):
    """Holds the options of linear_binary_cross_entropy_with_logits (not the classifier's
    weight): `loss_fn(hidden, head.weight, target)` or with `linear_bias=head.bias`."""

    def __init__(self, weight: Tensor | None = None, reduction: str = "mean",
                 pos_weight: Tensor | None = None, *, backend: str = "auto", threshold=None,
                 logit_threshold=None, return_counts: bool = False,
                 chunk_size: int | None = None, histogram=None):
        super().__init__()
        for name, value in (("weight", weight), ("pos_weight", pos_weight)):
            if value is not None:
                F._check_tensor(name, value)
                if value.numel() and has_data(value) and bool(torch.isnan(value).any()):
                    raise ValueError(f"{name} contains NaN")
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction
        self.backend = backend
        self.threshold = threshold
        self.logit_threshold = logit_threshold
        self.return_counts = return_counts
        self.chunk_size = chunk_size
        self.histogram = histogram  # a ThresholdHistogram each forward adds to, or None

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Tensor | None = None):
        return linear_binary_cross_entropy_with_logits(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            pos_weight=self.pos_weight, reduction=self.reduction, backend=self.backend,
            threshold=self.threshold, logit_threshold=self.logit_threshold,
            return_counts=self.return_counts, chunk_size=self.chunk_size,
            histogram=self.histogram)
