"""The 2-D (rows, classes) views the ops work on, built from torch's argument shapes, and the
shape checks torch makes on the way (same error types, the argument named).

Ops may assume unit stride along classes and rows that do not overlap (docs/OPS.md); a tensor
without them (transposed, sliced along classes, expanded) is copied once here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference as ref
from ._checks import (
    check_no_nan,
    check_same_device,
    check_tensor,
    dtype_name,
    eager,
    functorch_active,
)


def rows(x: Tensor) -> Tensor:
    """`x` (R, C) with unit class stride and non-overlapping rows, copied only when needed."""
    r, c = x.shape
    if (c <= 1 or x.stride(1) == 1) and (r <= 1 or x.stride(0) >= max(c, 1)):
        return x
    if x.numel() == 0:  # .contiguous() keeps an empty tensor's strides
        return x.new_empty((r, c))
    return x.contiguous()


def classes_last(x: Tensor) -> Tensor:
    """(..., C) as (R, C): reshape(-1, C) also when there are no classes (C = 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def ce_views(input: Tensor, target: Tensor, ignore_index: int):
    """(x2 (R, C), t2, output shape, is_probability_target) following torch's rules."""
    if input.shape == target.shape:  # class probabilities
        if not target.is_floating_point():
            raise RuntimeError("Expected floating point type for target with class "
                               f"probabilities, got {dtype_name(target.dtype)} (target)")
        if input.dim() == 0:
            raise IndexError("Dimension specified as 1 but tensor has no dimensions "
                             "(input must have a class dimension)")
        if ignore_index >= 0:  # torch's check: a negative one is simply unused
            raise RuntimeError("ignore_index is not supported for floating point target "
                               f"(ignore_index={ignore_index})")
        if input.dim() == 1:
            return rows(input.unsqueeze(0)), rows(target.unsqueeze(0)), (), True
        shape = input.shape[:1] + input.shape[2:]
        return (rows(classes_last(input.movedim(1, -1))),
                rows(classes_last(target.movedim(1, -1))), shape, True)
    # torch's order of checks (so the same bad call raises the same exception type): the batch
    # size first, then the dtype, then the target's rank.
    if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target "
                         f"batch_size ({target.shape[0]}) (target)")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError("expected target dtype to be Long or Byte, but got "
                           f"{dtype_name(target.dtype)} (target)")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension, got a 0-d tensor")
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported "
                               f"(target.shape={tuple(target.shape)})")
        if target.numel() != 1:
            raise ValueError(f"Expected input batch_size (1) to match target batch_size "
                             f"({target.numel()}) (input is a single (C,) sample)")
        # an unbatched (C,) input gives a 0-d loss, for a () or a (1,) target alike (as torch)
        return rows(input.unsqueeze(0)), target.reshape(1).long(), (), False
    _check_index_target_shape(input, target)
    if input.dim() > 2 and target.dtype != torch.int64:  # torch's spatial losses take Long only
        raise RuntimeError(f"expected scalar type Long but found {dtype_name(target.dtype)} "
                           "(target: class indices of a K-dim input (N, C, d1, ...))")
    x2 = input if input.dim() == 2 else classes_last(input.movedim(1, -1))
    return rows(x2), target.reshape(-1).long().contiguous(), target.shape, False


def _check_index_target_shape(input: Tensor, target: Tensor) -> None:
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


def check_class_weight(weight: Tensor | None, x2: Tensor) -> None:
    if weight is None:
        return
    check_tensor("weight", weight)
    c = x2.shape[-1]
    if weight.dim() != 1 or weight.numel() != c:
        raise RuntimeError(f"weight tensor should be defined either for all {c} classes or no "
                           f"classes but got weight tensor of shape: {list(weight.shape)}")
    check_same_device("weight", weight, x2)
    check_no_nan("weight", weight)


def bce_views(input: Tensor, target: Tensor):
    if target.shape != input.shape:
        raise ValueError(f"Target size ({target.shape}) must be the same as input size "
                         f"({input.shape})")
    if not (target.is_floating_point() or target.dtype in (torch.bool, torch.uint8)):
        raise RuntimeError(f"result type Float can't be cast to the desired output type "
                           f"{dtype_name(target.dtype)} (target must be floating point, bool "
                           "or uint8)")
    c = input.shape[-1] if input.dim() > 0 else 1
    r = input.numel() // c if c else 0
    return rows(input.reshape(r, c)), rows(target.reshape(r, c))


def broadcast_view(name: str, value: Tensor | None, input: Tensor, x2: Tensor,
                   dtype: torch.dtype | None = None):
    """Broadcast weight/pos_weight to input's shape as a (R, C) view (strides may be 0), in
    `dtype` (default: the accumulation dtype of the logits `x2`)."""
    if value is None:
        return None
    check_tensor(name, value)
    check_same_device(name, value, input)
    if value.requires_grad and torch.is_grad_enabled() and not functorch_active():
        # (torch.func differentiates torch's loss in weight / pos_weight, and so do we there)
        raise RuntimeError(f"binary_cross_entropy_with_logits is not differentiable with "
                           f"respect to argument '{name}' (as in torch): {name} cannot have "
                           "requires_grad=True; detach it")
    try:
        full = torch.broadcast_shapes(value.shape, input.shape)
    except RuntimeError as e:
        raise RuntimeError(f"{name} of shape {list(value.shape)} does not broadcast to input "
                           f"of shape {list(input.shape)}: {e}") from None
    if full != input.shape:
        raise RuntimeError(f"{name} of shape {list(value.shape)}: output with shape "
                           f"{list(input.shape)} doesn't match the broadcast shape {list(full)}")
    if value.is_complex():  # torch: the complex product cannot be stored in a real loss
        raise RuntimeError(f"{name}: result type {value.dtype} can't be cast to the desired "
                           f"output type {input.dtype} (a complex {name} is not supported)")
    if name == "pos_weight" and value.dtype == torch.bool:  # torch computes pos_weight - 1
        raise NotImplementedError("pos_weight: Subtraction, the `-` operator, with a bool "
                                  "tensor is not supported; give a floating-point pos_weight")
    check_no_nan(name, value)
    dtype = ref.compute_dtype(x2.dtype) if dtype is None else dtype
    return value.to(dtype).expand(input.shape).reshape(x2.shape)


def logit_threshold(threshold, logit_thr, num_classes: int, device) -> Tensor | None:
    """(C,) fp32 logit-space thresholds, validated; None when neither is given."""
    if threshold is not None and logit_thr is not None:
        raise ValueError("give either threshold (probability) or logit_threshold, not both")
    if threshold is None and logit_thr is None:
        return None
    name, value = ("threshold", threshold) if threshold is not None \
        else ("logit_threshold", logit_thr)
    if isinstance(value, Tensor):
        if value.is_complex():  # .to(float64) would drop the imaginary part
            raise TypeError(f"{name} must be real, got a {dtype_name(value.dtype)} tensor")
        if value.device.type == "meta" and torch.device(device).type != "meta":
            raise RuntimeError(f"{name} is a meta tensor (no data), while the logits are on "
                               f"{device}")
        if value.dim() > 1 or value.numel() not in (1, num_classes):
            raise ValueError(f"{name} must be a scalar or have one value per class "
                             f"({num_classes}), got shape {list(value.shape)}")
        v = value.detach().to(torch.float64)
        if name == "threshold":
            bad = ~((v > 0) & (v < 1))
            if eager() and bool(bad.any()):
                raise ValueError(f"threshold must be in (0, 1), got {v[bad][0].item()}")
            v = torch.logit(v)
        elif eager() and bool(torch.isnan(v).any()):
            raise ValueError("logit_threshold contains NaN")
        return fp32_floor(v).reshape(-1).expand(num_classes).to(device).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a Tensor, got {type(value).__name__}")
    if name == "threshold":
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {value}")
        value = ref.logit_threshold(float(value))
    elif math.isnan(float(value)):
        raise ValueError("logit_threshold is NaN")
    # the floor on the host number, then a fill on the device: no host-to-device copy (on
    # CUDA a pageable copy would synchronise the stream on every call)
    return torch.full((num_classes,), fp32_floor_number(float(value)), dtype=torch.float32,
                      device=device)


_FLT_MAX = 3.4028234663852886e38


def fp32_floor_number(v: float) -> float:
    """`fp32_floor` of one Python float, in float64 arithmetic that is exact: no tensor and no
    `.item()`, so nothing for torch.compile to break its graph on."""
    if math.isnan(v) or math.isinf(v):
        return v
    e = math.frexp(v)[1]  # |v| in [2^(e-1), 2^e), where fp32's spacing is 2^(e-24)
    q = 2.0 ** (max(e, -125) - 24)  # below 2^-126 the subnormals' spacing, 2^-149
    r = math.floor(v / q) * q
    if r > _FLT_MAX:  # between FLT_MAX and 2^128: FLT_MAX is the largest fp32 <= v
        return _FLT_MAX
    return -math.inf if r < -_FLT_MAX else r


def fp32_floor(t: Tensor) -> Tensor:
    """float64 thresholds -> the largest fp32 <= each. Then `x > t32` equals `x > t` for every
    fp32 (and so bf16/fp16) logit x; rounded to nearest, a t32 just above t labelled the one
    fp32 logit between them negative (logit(0.3): x = -0.84729785 has x > t but x == t32)."""
    t32 = t.float()
    up = t32.to(torch.float64) > t
    return torch.where(up, torch.nextafter(t32, torch.full_like(t32, -math.inf)), t32)
