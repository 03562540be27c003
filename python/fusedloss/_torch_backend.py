"""The `torch` backend: the op signatures of docs/OPS.md in pure PyTorch (reference.py math).

It runs anywhere, is the fallback when nothing faster is built, and is what the test suite
checks against torch.nn and gradcheck. It is not fast: it materialises several (R, C) temporaries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from . import reference as ref


def _empty(like: Tensor, dtype=None) -> Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


def _scale(grad_scale: Tensor | None, rows: int, like: Tensor) -> Tensor:
    if grad_scale is None:
        return torch.ones(rows, dtype=torch.float32, device=like.device)
    return grad_scale.reshape(1).expand(rows)


class TorchOps:
    @staticmethod
    def softmax_ce_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                       lse_square_scale, softcap, compute_grad, decode):
        if target.dim() == 1:
            ref.check_target_range(target, ignore_index, logits.shape[-1])
        loss, lse = ref.softmax_ce_rows(logits, target, weight, ignore_index, label_smoothing,
                                        lse_square_scale, softcap)
        grad = _empty(logits)
        if compute_grad:
            grad = ref.softmax_ce_grad(
                logits, target, weight, lse, _scale(grad_scale, logits.shape[0], logits),
                ignore_index, label_smoothing, lse_square_scale, softcap).to(logits.dtype)
        pred, conf = _empty(logits, torch.int64), _empty(logits, torch.float32)
        if decode:
            pred, conf = ref.softmax_decode(logits, softcap)
        return loss, lse, grad, pred, conf

    @staticmethod
    def softmax_ce_fwd_inplace(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                               lse_square_scale, softcap, decode):
        loss, lse, grad, pred, conf = TorchOps.softmax_ce_fwd(
            logits, target, weight, grad_scale, ignore_index, label_smoothing, lse_square_scale,
            softcap, True, decode)
        logits.copy_(grad)
        return loss, lse, pred, conf

    @staticmethod
    def softmax_ce_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing,
                       lse_square_scale, softcap):
        return ref.softmax_ce_grad(logits, target, weight, lse, grad_loss, ignore_index,
                                   label_smoothing, lse_square_scale, softcap).to(logits.dtype)

    @staticmethod
    def softmax_decode(logits, softcap):
        return ref.softmax_decode(logits, softcap)

    @staticmethod
    def sigmoid_bce_fwd(logits, target, weight, pos_weight, grad_scale, threshold, reduce_rows,
                        compute_grad, return_probs, count):
        elem = ref.sigmoid_bce_elem(logits, target, weight, pos_weight)
        loss = elem.sum(-1) if reduce_rows else elem.to(logits.dtype)
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
        return loss, grad, labels, probs, counts

    @staticmethod
    def sigmoid_bce_bwd(grad_loss, logits, target, weight, pos_weight):
        return ref.sigmoid_bce_grad(logits, target, weight, pos_weight, grad_loss).to(logits.dtype)

    @staticmethod
    def sigmoid_decode(logits, threshold, return_probs):
        labels = ref.sigmoid_decode(logits, threshold)
        probs = torch.sigmoid(logits) if return_probs else _empty(logits)
        return labels, probs

    @staticmethod
    def scale_grad_(grad, scale):
        grad.mul_(scale.to(grad.dtype))


_backend.register(_backend.Backend(
    name="torch",
    ops=TorchOps,
    supports=lambda device: True,
    priority={"cpu": 100, "cuda": 100},
    build_hint="",
))
