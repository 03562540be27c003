"""nn.Module wrappers: hold the configuration, call the functional. Drop-in for torch.nn."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.loss import _Loss, _WeightedLoss

from . import functional as F
from ._checks import has_data, legacy_reduction


class _NotScriptable:
    """torch.jit.script of these modules fails with a clear error instead of a compiler error on
    the keyword-only arguments (TorchScript is deprecated; torch.compile supports them)."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fusedloss.{type(self).__name__} does not support TorchScript "
            "(torch.jit.script); TorchScript is deprecated in PyTorch. Use torch.compile, "
            "or torch.nn's loss for a scripted model.")


def _check_weight_once(name: str, value: Tensor | None) -> None:
    # One check at construction, on any device (a sync here is off the hot path); a meta or
    # fake weight (a model built on the meta device, then materialised) has no values to check
    if value is not None and not isinstance(value, Tensor):  # torch: TypeError from the buffer
        raise TypeError(f"{name} must be a Tensor or None, got {type(value).__name__}")
    if value is not None and value.numel() and has_data(value) \
            and bool(torch.isnan(value).any()):
        raise ValueError(f"{name} contains NaN")


class CrossEntropyLoss(_NotScriptable, _WeightedLoss):
    """torch.nn.CrossEntropyLoss with fused kernels; extras are keyword-only (docs/API.md)."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 backend: str = "auto", lse_square_scale: float = 0.0,
                 softcap: float | None = None, inplace_backward: bool = False,
                 return_decoding: bool = False):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = legacy_reduction(size_average, reduce)
        _check_weight_once("weight", weight)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.return_decoding = return_decoding

    def forward(self, input: Tensor, target: Tensor):
        return F.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            backend=self.backend, lse_square_scale=self.lse_square_scale, softcap=self.softcap,
            inplace_backward=self.inplace_backward, return_decoding=self.return_decoding)


class BCEWithLogitsLoss(_NotScriptable, _Loss):
    """torch.nn.BCEWithLogitsLoss with fused kernels; decodings by keyword (docs/API.md)."""

    def __init__(self, weight: Tensor | None = None, size_average=None, reduce=None,
                 reduction: str = "mean", pos_weight: Tensor | None = None, *,
                 backend: str = "auto", threshold=None, logit_threshold=None,
                 return_probs: bool = False, return_counts: bool = False, histogram=None):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = legacy_reduction(size_average, reduce)
        _check_weight_once("weight", weight)
        _check_weight_once("pos_weight", pos_weight)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction
        self.backend = backend
        self.threshold = threshold
        self.logit_threshold = logit_threshold
        self.return_probs = return_probs
        self.return_counts = return_counts
        self.histogram = histogram  # a ThresholdHistogram each forward adds to, or None

    def forward(self, input: Tensor, target: Tensor):
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction,
            backend=self.backend, threshold=self.threshold,
            logit_threshold=self.logit_threshold, return_probs=self.return_probs,
            return_counts=self.return_counts, histogram=self.histogram)
