"""What the single-process and the vocabulary-parallel losses share about reductions.

torch.nn.functional.cross_entropy with class-index targets divides the summed loss by the sum
of the class weights of the non-ignored rows (their count without a weight); these helpers
compute that on the device, without a host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")


def target_weight(weight: Tensor | None, target: Tensor, dtype: torch.dtype) -> Tensor:
    """weight[target] per row in `dtype` (ones without a weight). Out-of-range and ignored
    targets are clamped into range here; the caller masks those rows, with a where (a weight
    may be infinite)."""
    if weight is None:
        return torch.ones(target.shape, dtype=dtype, device=target.device)
    if weight.numel() == 0:
        return torch.zeros(target.shape, dtype=dtype, device=target.device)
    return weight.to(dtype)[target.clamp(0, weight.numel() - 1)]


def mean_denominator(target: Tensor, ignore_index: int, weight: Tensor | None,
                     dtype: torch.dtype) -> Tensor:
    """torch's reduction='mean' denominator for class-index targets, a 0-dim `dtype` tensor:
    sum of weight[target] over the rows whose target is not ignore_index."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum(dtype=dtype)
    # a where, not a product: an ignored row clamped onto an infinite weight adds 0, not NaN
    return torch.where(valid, target_weight(weight, target, dtype), 0).sum()
