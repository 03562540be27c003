"""The public functional and nn.Module of vocabulary-parallel cross-entropy."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import CrossEntropyOutput
from .._reduction import mean_denominator
from . import _collectives, _validation
from ._function import VocabParallelCE


def _layout(local_logits, target, weight, class_start, num_classes, ignore_index, reduction,
            label_smoothing, lse_square_scale, return_decoding, validate, group) -> int:
    """Check the inputs (on every rank together when `validate`) and return this rank's
    class_start."""
    problems = _validation.local_problems(local_logits, target, weight, class_start,
                                          num_classes, ignore_index, reduction,
                                          label_smoothing, lse_square_scale)
    if problems and not validate:
        _validation.fail(ValueError, problems[0])
    if validate:
        dev = _collectives.comm_device(local_logits, group)
        h = _validation.header(problems, local_logits, target, weight, class_start,
                               num_classes, ignore_index, reduction, label_smoothing,
                               lse_square_scale, return_decoding, dev)
        world = dist.get_world_size(group)
        hs = _collectives.gather_rows(h, group, world).tolist()  # validation's one host sync
        class_start, _ = _validation.check_headers(hs, dist.get_rank(group), problems, group)
    elif class_start is None:
        class_start, total = _collectives.shard_layout(local_logits.shape[-1], group)
        if num_classes is not None and num_classes != total:
            _validation.fail(ValueError, f"the local shard sizes add up to {total}, not "
                             f"num_classes={num_classes}")
    return int(class_start)


def cross_entropy(local_logits: Tensor, target: Tensor, *, group=None,
                  class_start: int | None = None, num_classes: int | None = None,
                  weight: Tensor | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  lse_square_scale: float = 0.0, backend: str = "auto",
                  return_decoding: bool = False, validate: bool = True):
    """Softmax cross-entropy over classes sharded across the ranks of `group`.

    local_logits: (*, C_local), this rank's classes [class_start, class_start + C_local) in the
        last dim; shards may be uneven but each rank needs at least one class.
    target: (*) global class indices (or ignore_index), IDENTICAL on every rank.
    class_start: this rank's first class; default: the exclusive prefix sum of the shard sizes
        in rank order (one extra all_gather; see shard_layout). num_classes: checked if given.
    weight: the FULL (num_classes,) class weight, the same on every rank.
    reduction, ignore_index, label_smoothing: as torch.nn.functional.cross_entropy (the mean is
        torch's weighted mean: divided by the sum of w[target] over non-ignored rows).
    lse_square_scale: z-loss, adds `lse_square_scale * lse^2` per non-ignored row (global lse).
    return_decoding: also return pred (global argmax, lowest index on ties), confidence
        (its softmax probability, fp32) and correct, as a CrossEntropyOutput.
    validate: exchange a 16-int64 header first and raise the same clear error on EVERY rank
        for inputs that differ across ranks or do not fit together (shard sizes vs
        num_classes, gaps/overlaps in class_start, different targets (checksum), batch shapes,
        options or weights, out-of-range targets). Costs one extra small all_gather and one
        host sync per call; with validate=False a bad input on one rank may hang or fail the
        collective on the others, and an out-of-range target gives a NaN loss.

    Collectives: forward 1 all_gather of (2 + [smoothing] + 2*[decoding]) * rows floats per
    rank, plus 1 header all_gather when validate (which also yields the default class_start),
    or, without validate, 1 sizes all_gather when class_start is None; backward none.
    Returns a Tensor in local_logits' dtype (shape target.shape for reduction='none'), or
    CrossEntropyOutput(loss, pred, confidence, correct) with return_decoding.
    """
    class_start = _layout(local_logits, target, weight, class_start, num_classes, ignore_index,
                          reduction, label_smoothing, lse_square_scale, return_decoding,
                          validate, group)
    cls = local_logits.shape[-1]
    batch = local_logits.shape[:-1]
    x2 = local_logits.reshape(-1, cls)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    t = target.reshape(-1).to(torch.int64)
    loss_rows, pred, conf = VocabParallelCE.apply(
        x2, t, weight, class_start, float(label_smoothing), float(lse_square_scale),
        int(ignore_index), bool(return_decoding), backend, group)

    if reduction == "none":
        loss = loss_rows.reshape(batch)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / mean_denominator(t, ignore_index, weight, loss_rows.dtype)
    loss = loss.to(local_logits.dtype)
    if not return_decoding:
        return loss
    pred = pred.reshape(batch)
    conf = conf.reshape(batch)
    correct = (pred == target) & (target != ignore_index)
    return CrossEntropyOutput(loss, pred, conf, correct)


class VocabParallelCrossEntropyLoss(torch.nn.Module):
    """nn.Module form of cross_entropy: holds the options and, when class_start is not given,
    computes the shard layout once (one all_gather on the first call) and keeps it, so each
    later forward with validate=False is a single all_gather."""

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, group=None,
                 class_start: int | None = None, num_classes: int | None = None,
                 lse_square_scale: float = 0.0, backend: str = "auto",
                 return_decoding: bool = False, validate: bool = True):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.group = group
        self.class_start = class_start
        self.num_classes = num_classes
        self.lse_square_scale = lse_square_scale
        self.backend = backend
        self.return_decoding = return_decoding
        self.validate = validate

    def forward(self, local_logits: Tensor, target: Tensor):
        if self.class_start is None:
            self.class_start, total = _collectives.shard_layout(local_logits.shape[-1],
                                                                self.group)
            if self.num_classes is None:
                self.num_classes = total
        return cross_entropy(
            local_logits, target, group=self.group, class_start=self.class_start,
            num_classes=self.num_classes, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale, backend=self.backend,
            return_decoding=self.return_decoding, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, class_start={self.class_start}, "
                f"num_classes={self.num_classes}, lse_square_scale={self.lse_square_scale}, "
                f"backend={self.backend!r}")
