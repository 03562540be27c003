"""vmap rules of the autograd Functions (torch.func.vmap, per-sample gradients).

A vmap rule receives the unbatched physical tensors and which dimension of each is the batch.
The common case (the per-row side tensors are shared by the whole batch) folds the batch into
the rows: one kernel call over B*R rows with reduction "none", then each sample's reduction in
torch ops. Anything else (a weight or threshold that differs per sample, per-class counts)
runs the Function once per sample and stacks the results. The calls go through
Function.apply, so transforms below this one (grad of vmap) still see a differentiable op.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _front(t: Tensor | None, dim: int | None, batch: int) -> Tensor | None:
    """The tensor with the batch first (expanded when it is not batched)."""
    if t is None:
        return None
    return t.expand(batch, *t.shape) if dim is None else t.movedim(dim, 0)


def _per_sample(t: Tensor | None, dim: int | None, i: int) -> Tensor | None:
    return t if t is None or dim is None else t.select(dim, i)


def _loop(fn, info, in_dims, tensors, cfg):
    """Run `fn` per sample and stack every output along dim 0."""
    dims = in_dims[:-1]  # the last argument is the config
    outs = [fn(*[_per_sample(t, d, i) for t, d in zip(tensors, dims, strict=True)], cfg)
            for i in range(info.batch_size)]
    stacked = tuple(torch.stack(parts) for parts in zip(*outs, strict=True))
    return stacked, (0,) * len(stacked)


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def ce_vmap(fn, info, in_dims, logits, target, weight, grad_scale, cfg):
    x_dim, t_dim, w_dim, s_dim = in_dims[:4]
    if w_dim is not None:
        return _loop(fn, info, in_dims, (logits, target, weight, grad_scale), cfg)
    b = info.batch_size
    x = _front(logits, x_dim, b)
    t = _front(target, t_dim, b)
    rows, classes = x.shape[1], x.shape[2]
    xf = _rows(x.reshape(b * rows, classes))
    tf = t.reshape(b * rows, *t.shape[2:])
    tf = _rows(tf) if tf.dim() == 2 else tf.contiguous()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    row_cfg = cfg._replace(reduction="none", fused_grad=False, inplace=False, out_dtype=acc)
    loss, pred, conf, grad = fn(xf, tf, weight, None, row_cfg)
    loss = loss.reshape(b, rows)
    if cfg.reduction == "none":
        out = loss.to(cfg.out_dtype)
    else:
        out = loss.sum(-1)
        if cfg.reduction == "mean":
            out = out * (grad_scale if s_dim is None else grad_scale.movedim(s_dim, 0))
        out = out.to(cfg.out_dtype)
    if cfg.decode:
        pred, conf = pred.reshape(b, rows), conf.reshape(b, rows)
        return (out, pred, conf, grad), (0, 0, 0, None)
    return (out, pred, conf, grad), (0, None, None, None)


def bce_vmap(fn, info, in_dims, logits, target, weight, pos_weight, grad_scale, threshold, cfg):
    tensors = (logits, target, weight, pos_weight, grad_scale, threshold)
    if in_dims[4] is not None or in_dims[5] is not None or cfg.count:
        return _loop(fn, info, in_dims, tensors, cfg)
    b = info.batch_size
    x = _front(logits, in_dims[0], b)
    rows, classes = x.shape[1], x.shape[2]

    def fold(t, d):
        return None if t is None else _front(t, d, b).reshape(b * rows, classes)

    xf, tf = _rows(fold(logits, in_dims[0])), _rows(fold(target, in_dims[1]))
    wf, pwf = fold(weight, in_dims[2]), fold(pos_weight, in_dims[3])
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    elem_dtype = torch.promote_types(cfg.out_dtype, acc) if cfg.reduction != "none" \
        else cfg.out_dtype
    elem_cfg = cfg._replace(reduction="none", fused_grad=False, out_dtype=elem_dtype)
    loss, labels, probs, counts, grad = fn(xf, tf, wf, pwf, None, threshold, elem_cfg)
    loss = loss.reshape(b, rows, classes)
    if cfg.reduction == "sum":
        loss = loss.sum((1, 2))
    elif cfg.reduction == "mean":
        loss = loss.sum((1, 2)) * grad_scale
    out = loss.to(cfg.out_dtype)
    labels_dim = 0 if threshold is not None else None
    probs_dim = 0 if cfg.return_probs else None
    if labels_dim == 0:
        labels = labels.reshape(b, rows, classes)
    if probs_dim == 0:
        probs = probs.reshape(b, rows, classes)
    return (out, labels, probs, counts, grad), (0, labels_dim, probs_dim, None, None)
