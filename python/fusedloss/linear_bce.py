"""Fused linear + sigmoid BCE with logits: row-chunked ops and their autograd.

Same structure as linear_ce.py, with the backend's sigmoid_bce_fwd as the loss op:
- `bce_fwd`: per chunk, logits = x @ W^T (+ b); the op gives the row sums of the loss (or the
  elementwise loss for reduction='none'), d(loss)/d(logits) pre-scaled by grad_scale, the
  thresholded labels and the per-class [TP, FP, FN] counts, which are summed over chunks.
  The op runs on row blocks of the chunk (linear_chunks.sub_blocks), and each block's
  gradient is copied back over its logits: the buffer then holds the chunk's gradient.
  A bool/uint8 multi-hot target is read by the op as it is, chunk by chunk (never converted).
- `bce_bwd_elems` (reduction='none'): redoes each chunk's logits and unscaled gradient, then
  multiplies by the incoming (rows, C) gradient.
A float target that requires grad: d(loss)/d(y) = w (-x + (p - 1) softplus(-x)).
`weight` / `pos_weight` arrive as (N, C) views (broadcast by expand, strides may be 0).
"""


import torch
from torch import Tensor

from . import _backend
from . import reference as ref
from .linear_ce import _per_row_backward, _rows_grad, _scale_
from .linear_chunks import LinearGrads, chunk_bounds, chunk_logits, empty, grad_fakes, sub_blocks

_NS = "fusedloss_linear"


def _bce_target_grad(z: Tensor, weight, pos_weight, scale: Tensor) -> Tensor:
    x = z.to(ref.compute_dtype(z.dtype))
    g = -x if pos_weight is None else \
        -x + (pos_weight.to(x.dtype) - 1) * torch.nn.functional.softplus(-x)
    if weight is not None:
        g = g * weight.to(x.dtype)
    return g * scale.to(x.dtype)


def _none_loss_dtype(x: Tensor, target: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, target.dtype) if target.is_floating_point() \
        else x.dtype


def _rows(t: Tensor | None, i: int, j: int) -> Tensor | None:
    return None if t is None else t[i:j]


@torch.library.custom_op(f"{_NS}::bce_fwd", mutates_args=("hist_counts",))
def bce_fwd(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None,
            target: Tensor, weight: Tensor | None, pos_weight: Tensor | None,
            grad_scale: Tensor | None, threshold: Tensor | None, backend: str,
            chunk_size: int, reduce_rows: bool, need_input: bool, need_weight: bool,
            need_bias: bool, need_target: bool, count: bool, hist_edges: Tensor | None = None,
            hist_counts: Tensor | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ops = _backend.get(backend, input.device).ops
    x, w, b = input, linear_weight, linear_bias
    rows, classes = x.shape[0], w.shape[0]
    acc = ref.compute_dtype(x.dtype)
    bounds = chunk_bounds(rows, chunk_size)
    loss = x.new_empty((rows,), dtype=acc) if reduce_rows \
        else x.new_empty((rows, classes), dtype=_none_loss_dtype(x, target))
    labels = x.new_empty((rows, classes), dtype=torch.bool) if threshold is not None \
        else empty(x, torch.bool)
    counts = x.new_zeros((3, classes), dtype=torch.int64) if count else empty(x, torch.int64)
    grads = LinearGrads(x, w, b, need_input, need_weight, need_bias, len(bounds))
    need_op_grad = need_input or need_weight or need_bias
    g_target = torch.empty_like(target) if need_target else empty(target)
    scale = grad_scale if grad_scale is not None else x.new_ones((), dtype=acc)
    buf = x.new_empty((min(chunk_size, rows), classes))
    for i, j in bounds:
        z = chunk_logits(x[i:j], w, b, buf)
        wc, pc = _rows(weight, i, j), _rows(pos_weight, i, j)
        if need_target:  # from the logits, before their gradient overwrites them
            g_target[i:j] = _bce_target_grad(z, wc, pc, scale)
        for a, c in sub_blocks(j - i, classes):
            lc, g, lab, _, cnt = ops.sigmoid_bce_fwd(
                z[a:c], target[i + a:i + c], _rows(wc, a, c), _rows(pc, a, c), grad_scale,
                threshold, reduce_rows, need_op_grad, False, count, hist_edges, hist_counts)
            loss[i + a:i + c] = lc
            if threshold is not None:
                labels[i + a:i + c] = lab
            if count:
                counts += cnt
            if need_op_grad:
                z[a:c].copy_(g)
            del g  # before the next op call allocates its own
        if need_op_grad:
            grads.add(i, j, z, x[i:j], buf)
    return (loss, *grads.result(x.dtype), g_target, labels, counts)


@bce_fwd.register_fake
def _bce_fwd_fake(input, linear_weight, linear_bias, target, weight, pos_weight, grad_scale,
                  threshold, backend, chunk_size, reduce_rows, need_input, need_weight,
                  need_bias, need_target, count, hist_edges=None, hist_counts=None):
    x, w = input, linear_weight
    rows, classes = x.shape[0], w.shape[0]
    loss = x.new_empty((rows,), dtype=ref.compute_dtype(x.dtype)) if reduce_rows \
        else x.new_empty((rows, classes), dtype=_none_loss_dtype(x, target))
    labels = x.new_empty((rows, classes), dtype=torch.bool) if threshold is not None \
        else empty(x, torch.bool)
    counts = x.new_empty((3, classes), dtype=torch.int64) if count else empty(x, torch.int64)
    return (loss, *grad_fakes(x, w, linear_bias, target, need_input, need_weight, need_bias,
                               need_target), labels, counts)


@torch.library.custom_op(f"{_NS}::bce_bwd_elems", mutates_args=())
def bce_bwd_elems(grad_loss: Tensor, input: Tensor, linear_weight: Tensor,
                  linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
                  pos_weight: Tensor | None, backend: str, chunk_size: int,
                  need_input: bool, need_weight: bool, need_bias: bool, need_target: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ops = _backend.get(backend, input.device).ops
    x, w, b = input, linear_weight, linear_bias
    rows, classes = x.shape[0], w.shape[0]
    bounds = chunk_bounds(rows, chunk_size)
    grads = LinearGrads(x, w, b, need_input, need_weight, need_bias, len(bounds))
    need_op_grad = need_input or need_weight or need_bias
    g_target = torch.empty_like(target) if need_target else empty(target)
    buf = x.new_empty((min(chunk_size, rows), classes))
    acc = ref.compute_dtype(x.dtype)
    # a 0-dim grad_loss is one scale for every element (mean/sum of fp16 inputs): the op
    # applies it and rounds the gradient once
    whole = grad_loss.dim() == 0
    if whole:
        grad_loss = grad_loss.to(acc)
    for i, j in bounds:
        z = chunk_logits(x[i:j], w, b, buf)
        wc, pc = _rows(weight, i, j), _rows(pos_weight, i, j)
        gl = grad_loss if whole else grad_loss[i:j]
        if need_target:
            g_target[i:j] = _bce_target_grad(z, wc, pc, gl)
        if need_op_grad:
            for a, c in sub_blocks(j - i, classes):
                g = ops.sigmoid_bce_fwd(z[a:c], target[i + a:i + c], _rows(wc, a, c),
                                        _rows(pc, a, c), gl if whole else None, None, True,
                                        True, False, False)[1]
                if whole:
                    z[a:c].copy_(g)
                else:
                    glc = gl[a:c]
                    torch.mul(g, glc if glc.dtype == g.dtype else glc.to(acc), out=z[a:c])
                del g  # before the next op call allocates its own
            grads.add(i, j, z, x[i:j], buf)
    return (*grads.result(x.dtype), g_target)


@bce_bwd_elems.register_fake
def _bce_bwd_elems_fake(grad_loss, input, linear_weight, linear_bias, target, weight,
                        pos_weight, backend, chunk_size, need_input, need_weight, need_bias,
                        need_target):
    return grad_fakes(input, linear_weight, linear_bias, target, need_input, need_weight,
                       need_bias, need_target)


class LinearBCEFunction(torch.autograd.Function):
    """Autograd over bce_fwd / bce_bwd_elems; returns (loss reduced as asked, labels, counts).
    Gradient handling as LinearCrossEntropyFunction (linear_ce.py)."""

    @staticmethod
    def forward(ctx, x, w, b, target, weight, pos_weight, grad_scale, threshold, backend: str,
                chunk: int, reduction: str, need_x: bool, need_w: bool, need_b: bool,
                need_t: bool, count: bool, hist=None):
        ctx.opts = (backend, chunk)
        ctx.reduction = reduction
        ctx.needs = (need_x, need_w, need_b, need_t)
        ctx.per_row = _per_row_backward(reduction, x)
        fused = not ctx.per_row and any(ctx.needs)
        needs = ctx.needs if fused else (False,) * 4
        loss, gx, gw, gb, gt, labels, counts = torch.ops.fusedloss_linear.bce_fwd(
            x, w, b, target, weight, pos_weight, grad_scale, threshold, backend, chunk,
            reduction != "none", *needs, count, *(hist or (None, None)))
        ctx.fused = (gx, gw, gb, gt) if fused else None
        ctx.save_for_backward(x, w, b, target, weight, pos_weight, grad_scale)
        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() * grad_scale
        ctx.mark_non_differentiable(labels, counts)
        return out, labels, counts

    @staticmethod
    def backward(ctx, grad_out, _glabels, _gcounts):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                "fusedloss.linear_binary_cross_entropy_with_logits does not support double "
                "backward (create_graph=True): its gradients are computed by fused kernels")
        x, w, b, target, weight, pos_weight, grad_scale = ctx.saved_tensors
        backend, chunk = ctx.opts
        if ctx.per_row:
            grads = torch.ops.fusedloss_linear.bce_bwd_elems(
                _rows_grad(grad_out, grad_scale, ctx.reduction, x.dtype), x, w, b, target,
                weight, pos_weight, backend, chunk, *ctx.needs)
        else:
            if ctx.fused is not None:
                grads, ctx.fused = ctx.fused, None
            else:  # second backward (retain_graph=True): recompute as the forward did
                grads = torch.ops.fusedloss_linear.bce_fwd(
                    x, w, b, target, weight, pos_weight, grad_scale, None, backend, chunk,
                    True, *ctx.needs, False)[1:5]
            grads = tuple(g if n else None for g, n in zip(grads, ctx.needs, strict=True))
            grads = _scale_(_backend.get(backend, x.device).ops, grads, grad_out)
        gx, gw, gb, gt = (g if n else None for g, n in zip(grads, ctx.needs, strict=True))
        return (gx, gw, gb, gt) + (None,) * 13
