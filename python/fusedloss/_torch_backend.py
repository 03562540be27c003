"""The `torch` backend: the op signatures of docs/OPS.md in pure PyTorch (reference.py math).

It runs anywhere, is the fallback when nothing faster is built, and is what the test suite
checks against torch.nn and gradcheck. It is not fast: it materialises several (R, C) temporaries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from . import _op_checks as checks
from . import reference as ref


def _empty(like: Tensor, dtype=None) -> Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


def _scale(grad_scale: Tensor | None, rows: int, like: Tensor) -> Tensor:
    if grad_scale is None:
        return torch.ones(rows, dtype=torch.float32, device=like.device)
    return grad_scale.reshape(1).expand(rows)


def _ce_loss_grad(logits, target, weight, row_scale, ignore_index, label_smoothing,
                  lse_square_scale, softcap, compute_grad):
    """(loss, lse, grad) of the softmax-CE ops; grad = row_scale[r] * d loss[r] / d logits."""
    if target.dim() == 1:  # the reference may sync (on CUDA too) to raise IndexError
        ref.check_target_range(target, ignore_index, logits.shape[-1])
    args = (ignore_index, label_smoothing, lse_square_scale, softcap)
    loss, lse = ref.softmax_ce_rows(logits, target, weight, *args)
    grad = _empty(logits)
    if compute_grad:
        grad = ref.softmax_ce_grad(logits, target, weight, row_scale, *args).to(logits.dtype)
    return loss, lse, grad


def _bce_loss_dtype(logits: Tensor, target: Tensor) -> torch.dtype:
    """reduce_rows=False loss dtype: promote(logits, target) for float targets."""
    return torch.promote_types(logits.dtype, target.dtype) if target.is_floating_point() \
        else logits.dtype


class TorchOps:
    @staticmethod
    def softmax_ce_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                       lse_square_scale, softcap, compute_grad, decode,
                       op: str = "softmax_ce_fwd"):
        checks.softmax_ce(op, logits, target, weight, grad_scale, ignore_index, label_smoothing,
                          lse_square_scale, softcap)
        loss, lse, grad = _ce_loss_grad(
            logits, target, weight, _scale(grad_scale, logits.shape[0], logits),
            ignore_index, label_smoothing, lse_square_scale, softcap, compute_grad)
        pred, conf = _empty(logits, torch.int64), _empty(logits, torch.float32)
        if decode:
            pred, conf = ref.softmax_decode(logits, softcap)
        return loss, lse, grad, pred, conf

    @staticmethod
    def softmax_ce_fwd_inplace(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                               lse_square_scale, softcap, decode):
        loss, lse, grad, pred, conf = TorchOps.softmax_ce_fwd(
            logits, target, weight, grad_scale, ignore_index, label_smoothing, lse_square_scale,
            softcap, True, decode, op="softmax_ce_fwd_inplace")
        logits.copy_(grad)
        return loss, lse, pred, conf

    @staticmethod
    def softmax_ce_bwd(grad_loss, logits, target, weight, ignore_index, label_smoothing,
                       lse_square_scale, softcap):
        # The forward's gradient code with the per-row incoming gradient as the scale: bitwise
        # the forward's fused gradient for equal scales.
        checks.softmax_ce_bwd(grad_loss, logits, target, weight, ignore_index, label_smoothing,
                              lse_square_scale, softcap)
        return _ce_loss_grad(logits, target, weight, grad_loss, ignore_index, label_smoothing,
                             lse_square_scale, softcap, True)[2]

    @staticmethod
    def softmax_decode(logits, softcap):
        checks.softmax_decode(logits, softcap)
        return ref.softmax_decode(logits, softcap)

    @staticmethod
    def sigmoid_bce_fwd(logits, target, weight, pos_weight, grad_scale, threshold, reduce_rows,
                        compute_grad, return_probs, count, hist_edges=None, hist_counts=None):
        checks.sigmoid_bce("sigmoid_bce_fwd", logits, target, weight, pos_weight, grad_scale,
                           threshold, count, hist_edges=hist_edges, hist_counts=hist_counts)
        elem = ref.sigmoid_bce_elem(logits, target, weight, pos_weight)
        loss = elem.sum(-1) if reduce_rows else elem.to(_bce_loss_dtype(logits, target))
        grad = _empty(logits)
        if compute_grad:
            g = torch.ones((), dtype=torch.float32, device=logits.device) if grad_scale is None \
                else grad_scale
            grad = ref.sigmoid_bce_grad(logits, target, weight, pos_weight, g).to(logits.dtype)
        labels = _empty(logits, torch.bool)
        if threshold is not None:
            labels = ref.sigmoid_decode(logits, threshold)
        probs = torch.sigmoid(logits) if return_probs else _empty(logits)
        counts = ref.confusion_counts(labels, target) if count else _empty(logits, torch.int64)
        if hist_counts is not None:
            ref.threshold_histogram_(hist_counts, hist_edges, logits, target)
        return loss, grad, labels, probs, counts

    @staticmethod
    def sigmoid_bce_bwd(grad_loss, logits, target, weight, pos_weight):
        checks.sigmoid_bce("sigmoid_bce_bwd", logits, target, weight, pos_weight,
                           grad_loss=grad_loss)
        return ref.sigmoid_bce_grad(logits, target, weight, pos_weight, grad_loss).to(logits.dtype)

    @staticmethod
    def sigmoid_decode(logits, threshold, return_probs):
        checks.sigmoid_decode(logits, threshold)
        labels = ref.sigmoid_decode(logits, threshold)
        probs = torch.sigmoid(logits) if return_probs else _empty(logits)
        return labels, probs

    @staticmethod
    def scale_grad_(grad, scale):
        checks.scale_grad_(grad, scale)
        acc = ref.compute_dtype(grad.dtype)
        if acc == grad.dtype:
            grad.mul_(scale.to(grad.dtype))
        else:  # in fp32, rounded once: a GradScaler's 65536 is inf in fp16
            grad.copy_(grad.to(acc) * scale.to(acc))


_backend.register(_backend.Backend(
    name="torch",
    ops=TorchOps,
    supports=lambda device: True,
    priority={"cpu": 100, "cuda": 100},
    build_hint="",
))
