"""Argument checks shared by the functionals and modules: torch's error types, the argument named.

Checks that read data (NaN, ranges) run only in eager mode outside torch.func transforms: under
torch.compile they cannot be traced without a graph break, and under vmap a batched tensor
cannot be read on the host. Python numbers may arrive as symbolic ints/floats under
torch.compile(dynamic=True); they are passed through unchecked (the eager call checks them).
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor

from ._reduction import REDUCTIONS

_DTYPE_NAMES = {torch.int32: "Int", torch.float32: "Float", torch.float64: "Double",
                torch.int64: "Long", torch.int16: "Short", torch.bool: "Bool",
                torch.float16: "Half", torch.bfloat16: "BFloat16", torch.int8: "Char",
                torch.uint8: "Byte"}


def dtype_name(dtype: torch.dtype) -> str:
    """torch's short name of a dtype, as its error messages spell it."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


def functorch_active() -> bool:
    """True inside torch.func.grad / vmap / jacrev / ...: tensors may be wrapped or batched."""
    return torch._C._are_functorch_transforms_active()


def exporting() -> bool:
    """True while torch.export traces (strict or not). The exported graph must then hold
    differentiable torch ops: an autograd.Function's forward is captured under no_grad (strict:
    the loss silently dropped out of the gradients) and the fused ops have no autograd formula
    (non-strict: backward of the exported module raised)."""
    return torch.compiler.is_exporting()


def forward_ad_active() -> bool:
    """Inside torch.autograd.forward_ad.dual_level() (dual tensors may flow in)."""
    return torch.autograd.forward_ad._current_level >= 0


def eager() -> bool:
    """May a check read tensor data (host sync, data-dependent branch)? Not while tracing:
    torch.compile, torch.func transforms, or a FakeTensorMode (tensors with no data)."""
    return not torch.compiler.is_compiling() and not functorch_active() \
        and not _fake_mode_active()


def has_data(t: Tensor) -> bool:
    """Can `t`'s values be read now (not a meta or fake tensor, not while tracing)?"""
    return eager() and not no_data(t)


def no_data(t: Tensor) -> bool:
    """A meta or fake tensor, or any tensor under an active FakeTensorMode: no values."""
    return t.device.type == "meta" or _fake_mode_active() or _is_fake(t)


def _fake_mode_active() -> bool:
    """A FakeTensorMode, or make_fx's proxy tracing (torch.func.linearize, export): the
    tensors seen may have no data to read."""
    keys = torch._C._TorchDispatchModeKey
    return torch._C._get_dispatch_mode(keys.FAKE) is not None or \
        torch._C._get_dispatch_mode(keys.PROXY) is not None


def _is_fake(t: Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return is_fake(t)


def is_symbolic(value) -> bool:
    """A number that may be traced (symbolic) rather than known: under torch.compile every
    Python number is treated so (dynamic=True makes floats and ints symbolic); the ops check
    their scalar arguments again."""
    return torch.compiler.is_compiling() or \
        isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


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


def check_reduction(reduction) -> str:
    """The reduction, validated; torch's deprecated 'elementwise_mean' is 'mean', with torch's
    warning."""
    if reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' "
                      "instead.", stacklevel=3)
        return "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction "
                         f"(reduction={reduction!r}; expected one of {REDUCTIONS})")
    return reduction


def check_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")


def check_floating_input(name: str, x: Tensor, op: str) -> None:
    if not x.is_floating_point():
        raise NotImplementedError(f"{op}: {name} must be a floating point tensor, got dtype "
                                  f"{x.dtype}")


def check_same_device(name: str, t: Tensor | None, x: Tensor) -> None:
    if t is not None and t.device != x.device:
        raise RuntimeError(f"{name} is on device {t.device} but input is on {x.device}; "
                           "move them to the same device")


def check_no_nan(name: str, t: Tensor | None) -> None:
    if t is not None and t.device.type == "cpu" and t.numel() and eager() \
            and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN: {t.tolist() if t.numel() <= 8 else '...'}")


def check_number(name: str, value, lo=-math.inf, hi=math.inf):
    """A real number in [lo, hi] (NaN rejected); a 0-dim real tensor is read like torch does."""
    if is_symbolic(value) and not isinstance(value, (bool, str, Tensor)):
        return value
    if isinstance(value, Tensor) and value.dim() == 0 and value.dtype != torch.bool \
            and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number (float), got {type(value).__name__}: "
                        f"{value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_int(name: str, value):
    """An int like torch's `int` arguments: bool and float raise TypeError; a 0-dim integer
    tensor (or numpy integer) is read."""
    if is_symbolic(value) and not isinstance(value, (bool, float, str, Tensor)):
        return value
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool and not value.is_complex():
        return int(value.item())
    if isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be int, not {type(value).__name__} ({name}={value!r})")
    if not -2**63 <= int(value) < 2**63:  # torch's int arguments are int64
        raise ValueError(f"{name} must fit in int64, got {name}={int(value)} (overflow when "
                         "unpacking long long)")
    return int(value)
