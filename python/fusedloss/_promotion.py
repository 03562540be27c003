"""Result dtypes and the dtypes the ops receive: torch's type promotion and autocast rules,
without an upcast copy of the logits.

torch.autocast (CPU and CUDA) runs cross_entropy and binary_cross_entropy_with_logits in fp32:
fp16/bf16 tensors are cast to fp32 and the result is fp32. Here the logits stay as they are (the
kernels accumulate in fp32 anyway, and an fp16/bf16 -> fp32 cast is exact, so the values are
those of torch's fp32 computation); the small side tensors (class weight, pos_weight) and the
targets are passed in the accumulation dtype and the result is fp32 (docs/OPS.md: side tensors
and probability/float targets may come in the accumulation dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref
from ._checks import dtype_name

_LOW = (torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for a device autocast does not know
    (meta: shape propagation), where torch's own query raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_dtype(t: Tensor | None, device_type: str) -> torch.dtype | None:
    """The dtype torch's autocast fp32 policy gives `t` (fp16/bf16 -> fp32 when autocast is on
    for its device; other dtypes are left alone)."""
    if t is None:
        return None
    if t.dtype in _LOW and autocast_enabled(device_type):
        return torch.float32
    return t.dtype


def accumulation_dtype(logits: Tensor) -> torch.dtype:
    return ref.compute_dtype(logits.dtype)


def side_tensor(t: Tensor | None, logits: Tensor) -> Tensor | None:
    """A weight-like tensor in the accumulation dtype of `logits` (never rounded down)."""
    return None if t is None else t.to(accumulation_dtype(logits))


def float_target(t: Tensor, logits: Tensor) -> Tensor:
    """A float target in the logits' dtype or their accumulation dtype."""
    if t.dtype in (logits.dtype, accumulation_dtype(logits)):
        return t
    return t.to(accumulation_dtype(logits))


def ce_result_dtype(x_dtype: torch.dtype, device_type: str, t2: Tensor,
                    weight: Tensor | None, prob: bool) -> torch.dtype:
    """cross_entropy's result dtype for logits of `x_dtype` (torch's promotion and autocast).

    Class-index targets: the input's (autocast) dtype, and the weight must have it too, as
    torch requires. Probability targets: input, target and weight promoted together.
    """
    x_dt = torch.float32 if (x_dtype in _LOW and autocast_enabled(device_type)) \
        else x_dtype
    w_dt = autocast_dtype(weight, device_type)
    if not prob:
        if weight is not None and w_dt != x_dt:
            raise RuntimeError(f"expected scalar type {dtype_name(x_dt)} but found "
                               f"{dtype_name(w_dt)} (weight.dtype must match input)")
        return x_dt
    if w_dt is not None and w_dt.is_complex:  # torch gives a complex loss; the kernels are real
        raise NotImplementedError(f"cross_entropy with a complex class weight ({w_dt}) is not "
                                  "supported; give a real floating-point weight")
    out = torch.promote_types(x_dt, autocast_dtype(t2, device_type))
    return out if w_dt is None else torch.promote_types(out, w_dt)


def ce_dtypes(x2: Tensor, t2: Tensor, weight: Tensor | None, prob: bool):
    """(logits, target, weight, result dtype) for cross_entropy (`ce_result_dtype`); only a
    promotion to fp64 of non-fp64 logits costs a copy (torch makes it too)."""
    out = ce_result_dtype(x2.dtype, x2.device.type, t2, weight, prob)
    if not prob:
        return x2, t2, side_tensor(weight, x2), out
    if out == torch.float64 and x2.dtype != torch.float64:
        x2 = x2.to(torch.float64)
    return x2, float_target(t2, x2), side_tensor(weight, x2), out


def autocast_linear(*tensors):
    """Cast (input, weight, bias) as F.linear is cast under an enabled autocast: floating
    tensors other than fp64 go to the autocast dtype (None stays None)."""
    dev = tensors[0].device.type
    if not autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


def bce_dtypes(x2: Tensor, t2: Tensor):
    """(logits, target, result dtype) for binary_cross_entropy_with_logits.

    torch's result has the target's dtype (computed in the promoted dtype); bool/uint8 targets
    (an extension) give the input's dtype and are read as they are.
    """
    dev = x2.device.type
    x_dt = autocast_dtype(x2, dev)
    if t2.dtype in (torch.bool, torch.uint8):
        return x2, t2, x_dt
    t_dt = autocast_dtype(t2, dev)
    if t_dt != t2.dtype:  # autocast: an fp16/bf16 target is read as fp32, as torch casts it
        t2 = t2.to(t_dt)
    common = torch.promote_types(x_dt, t_dt)
    if common == torch.float64 and x2.dtype != torch.float64:
        x2 = x2.to(torch.float64)
    return x2, float_target(t2, x2), t_dt
