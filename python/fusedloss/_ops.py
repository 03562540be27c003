"""Fake (meta) kernels for the fusedloss:: ops, so torch.compile can trace them.

Shapes and dtypes follow docs/OPS.md exactly; a fake kernel never reads data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dtypes import acc_dtype


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


def softmax_ce_fwd_fake(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                        lse_square_scale, softcap, compute_grad, decode):
    rows, classes = logits.shape
    f32 = torch.float32
    acc = acc_dtype(logits.dtype)
    loss = logits.new_empty((rows,), dtype=acc)
    lse = logits.new_empty((rows,), dtype=acc)
    grad = logits.new_empty((rows, classes)) if compute_grad else _empty(logits)
    pred = logits.new_empty((rows,), dtype=torch.int64) if decode else _empty(logits, torch.int64)
    conf = logits.new_empty((rows,), dtype=f32) if decode else _empty(logits, f32)
    return loss, lse, grad, pred, conf


def softmax_ce_fwd_inplace_fake(logits, target, weight, grad_scale, ignore_index,
                                label_smoothing, lse_square_scale, softcap, decode):
    loss, lse, _, pred, conf = softmax_ce_fwd_fake(
        logits, target, weight, grad_scale, ignore_index, label_smoothing, lse_square_scale,
        softcap, False, decode)
    return loss, lse, pred, conf


def softmax_ce_bwd_fake(grad_loss, logits, target, weight, ignore_index, label_smoothing,
                        lse_square_scale, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def softmax_decode_fake(logits, softcap):
    rows = logits.shape[0]
    return (logits.new_empty((rows,), dtype=torch.int64),
            logits.new_empty((rows,), dtype=torch.float32))


def sigmoid_bce_fwd_fake(logits, target, weight, pos_weight, grad_scale, threshold, reduce_rows,
                         compute_grad, return_probs, count):
    rows, classes = logits.shape
    if reduce_rows:
        loss = logits.new_empty((rows,), dtype=acc_dtype(logits.dtype))
    else:  # promote(logits, target) for a float target, the logits' dtype for bool/uint8
        dtype = torch.promote_types(logits.dtype, target.dtype) \
            if target.is_floating_point() else logits.dtype
        loss = logits.new_empty((rows, classes), dtype=dtype)
    grad = logits.new_empty((rows, classes)) if compute_grad else _empty(logits)
    labels = logits.new_empty((rows, classes), dtype=torch.bool) if threshold is not None \
        else _empty(logits, torch.bool)
    probs = logits.new_empty((rows, classes)) if return_probs else _empty(logits)
    counts = logits.new_empty((3, classes), dtype=torch.int64) if count \
        else _empty(logits, torch.int64)
    return loss, grad, labels, probs, counts


def sigmoid_bce_bwd_fake(grad_loss, logits, target, weight, pos_weight):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def sigmoid_decode_fake(logits, threshold, return_probs):
    labels = logits.new_empty(logits.shape, dtype=torch.bool)
    probs = logits.new_empty(logits.shape) if return_probs else _empty(logits)
    return labels, probs


def scale_grad__fake(grad, scale):
    return None


FAKES = {
    "softmax_ce_fwd": softmax_ce_fwd_fake,
    "softmax_ce_fwd_inplace": softmax_ce_fwd_inplace_fake,
    "softmax_ce_bwd": softmax_ce_bwd_fake,
    "softmax_decode": softmax_decode_fake,
    "sigmoid_bce_fwd": sigmoid_bce_fwd_fake,
    "sigmoid_bce_bwd": sigmoid_bce_bwd_fake,
    "sigmoid_decode": sigmoid_decode_fake,
    "scale_grad_": scale_grad__fake,
}


def register_fakes(namespace: str) -> None:
    """Register FAKES for `namespace::<op>` (_native.py: fusedloss, once the schemas are
    loaded; _triton.py: fusedloss_triton)."""
    for name, fn in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}")(fn)
