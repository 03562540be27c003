"""Fused linear + softmax cross-entropy: row-chunked ops and their autograd.

Two ops in the namespace `fusedloss_linear` (torch.library.custom_op, with fake kernels, so
torch.compile(fullgraph=True) traces them as opaque calls and nothing syncs with the host):
- `ce_fwd`: per chunk, logits = x @ W^T (+ b) in a reused buffer; the backend's
  softmax_ce_fwd_inplace writes loss/lse/decodings and overwrites the buffer with
  d(loss)/d(logits) (pre-scaled by grad_scale = 1/denominator for 'mean'); the chunk's share of
  grad_input / grad_W / grad_b follows (linear_chunks.LinearGrads). With mean/sum, all gradients
  are done when the forward returns; backward only multiplies them by the incoming gradient.
- `ce_bwd_rows` (reduction='none'): the incoming gradient differs per row, so backward redoes
  each chunk's logits and the op's unscaled gradient (grad_scale=None), scales the rows, and
  accumulates as above. The forward saves nothing but its inputs.
Probability targets that require grad: d(loss)/d(y_c) = (1 - eps) w_c (lse - z_c), from the
chunk's logits before they are overwritten (the non-in-place op keeps them).
"""


import torch
from torch import Tensor

from . import _backend
from . import reference as ref
from ._checks import functorch_active
from .autograd import _legacy_batched
from .linear_chunks import LinearGrads, chunk_bounds, chunk_logits, empty, grad_fakes

_NS = "fusedloss_linear"


def _soft_target_grad(z: Tensor, lse: Tensor, weight: Tensor | None, eps: float,
                      softcap: float, scale: Tensor) -> Tensor:
    """(1 - eps) * w_c * (lse - z_c) * scale (rows, C), in the accumulation dtype."""
    zz = ref.apply_softcap(z.to(lse.dtype), softcap)
    g = (1 - eps) * (lse.unsqueeze(-1) - zz)
    if weight is not None:
        g = g * weight.to(g.dtype)
    return g * scale.to(g.dtype)


def _chunk_grad(ops, z, tc, weight, grad_scale, args, decode, need_op_grad, need_soft):
    """The loss op on one chunk of logits z: (loss, lse, grad or None, pred, conf).

    The gradient overwrites z unless the logits are still needed (probability-target grad)."""
    if need_soft:
        loss, lse, grad, pred, conf = ops.softmax_ce_fwd(z, tc, weight, grad_scale, *args,
                                                         need_op_grad, decode)
        return loss, lse, grad if need_op_grad else None, pred, conf
    if need_op_grad:
        loss, lse, pred, conf = ops.softmax_ce_fwd_inplace(z, tc, weight, grad_scale, *args,
                                                           decode)
        return loss, lse, z, pred, conf
    loss, lse, _, pred, conf = ops.softmax_ce_fwd(z, tc, weight, grad_scale, *args, False,
                                                  decode)
    return loss, lse, None, pred, conf


# The op takes every option and gradient flag as an argument (torch.library schemas have no
# keyword bundles); the body is the chunk loop.
@torch.library.custom_op(f"{_NS}::ce_fwd", mutates_args=())
def ce_fwd(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor,
           weight: Tensor | None, grad_scale: Tensor | None, backend: str,
           ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
           chunk_size: int, need_input: bool, need_weight: bool, need_bias: bool,
           need_target: bool, decode: bool
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ops = _backend.get(backend, input.device).ops
    x, w, b = input, linear_weight, linear_bias
    rows, classes = x.shape[0], w.shape[0]
    acc = ref.compute_dtype(x.dtype)
    bounds = chunk_bounds(rows, chunk_size)
    loss, lse = x.new_empty((rows,), dtype=acc), x.new_empty((rows,), dtype=acc)
    pred = x.new_empty((rows,), dtype=torch.int64) if decode else empty(x, torch.int64)
    conf = x.new_empty((rows,), dtype=torch.float32) if decode else empty(x, torch.float32)
    grads = LinearGrads(x, w, b, need_input, need_weight, need_bias, len(bounds))
    need_op_grad = need_input or need_weight or need_bias
    g_target = torch.empty_like(target) if need_target else empty(target)
    scale = grad_scale if grad_scale is not None else x.new_ones((), dtype=acc)
    buf = x.new_empty((min(chunk_size, rows), classes))
    args = (ignore_index, label_smoothing, lse_square_scale, softcap)
    for i, j in bounds:
        z = chunk_logits(x[i:j], w, b, buf)
        lc, sc, g, pc, cc = _chunk_grad(ops, z, target[i:j], weight, grad_scale, args, decode,
                                        need_op_grad, need_target)
        loss[i:j], lse[i:j] = lc, sc
        if decode:
            pred[i:j], conf[i:j] = pc, cc
        if need_target:
            g_target[i:j] = _soft_target_grad(z, sc, weight, label_smoothing, softcap, scale)
        if g is not None:
            grads.add(i, j, g, x[i:j], buf)
        del g  # with probability targets g is the op's own buffer: free it before the next
    gx, gw, gb = grads.result(x.dtype)
    return loss, lse, gx, gw, gb, pred, conf, g_target


@ce_fwd.register_fake
def _ce_fwd_fake(input, linear_weight, linear_bias, target, weight, grad_scale, backend,
                 ignore_index, label_smoothing, lse_square_scale, softcap, chunk_size,
                 need_input, need_weight, need_bias, need_target, decode):
    x, w = input, linear_weight
    rows = x.shape[0]
    acc = ref.compute_dtype(x.dtype)
    return (x.new_empty((rows,), dtype=acc), x.new_empty((rows,), dtype=acc),
            *grad_fakes(x, w, linear_bias, target, need_input, need_weight, need_bias,
                         need_target)[:3],
            x.new_empty((rows,), dtype=torch.int64) if decode else empty(x, torch.int64),
            x.new_empty((rows,), dtype=torch.float32) if decode else empty(x, torch.float32),
            grad_fakes(x, w, linear_bias, target, False, False, False, need_target)[3])


@torch.library.custom_op(f"{_NS}::ce_bwd_rows", mutates_args=())
def ce_bwd_rows(grad_loss: Tensor, input: Tensor, linear_weight: Tensor,
                linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
                backend: str, ignore_index: int, label_smoothing: float,
                lse_square_scale: float, softcap: float, chunk_size: int, need_input: bool,
                need_weight: bool, need_bias: bool, need_target: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ops = _backend.get(backend, input.device).ops
    x, w, b = input, linear_weight, linear_bias
    rows, classes = x.shape[0], w.shape[0]
    acc = ref.compute_dtype(x.dtype)
    bounds = chunk_bounds(rows, chunk_size)
    grads = LinearGrads(x, w, b, need_input, need_weight, need_bias, len(bounds))
    need_op_grad = need_input or need_weight or need_bias
    g_target = torch.empty_like(target) if need_target else empty(target)
    buf = x.new_empty((min(chunk_size, rows), classes))
    args = (ignore_index, label_smoothing, lse_square_scale, softcap)
    prob = target.dim() == 2
    # a 0-dim grad_loss is one scale for every row (mean/sum of fp16 inputs): the op applies
    # it (ignored rows get 0) and rounds the gradient once
    whole = grad_loss.dim() == 0
    if whole:
        grad_loss = grad_loss.to(acc)
    for i, j in bounds:
        g_rows = grad_loss if whole else grad_loss[i:j].to(acc)
        if not prob and not whole:  # an ignored row's gradient is 0 whatever comes in
            g_rows = g_rows.masked_fill(target[i:j] == ignore_index, 0)
        z = chunk_logits(x[i:j], w, b, buf)
        _, sc, g, _, _ = _chunk_grad(ops, z, target[i:j], weight, g_rows if whole else None,
                                     args, False, need_op_grad, need_target)
        if need_target:
            g_target[i:j] = _soft_target_grad(z, sc, weight, label_smoothing, softcap,
                                              g_rows if whole else g_rows.unsqueeze(-1))
        if g is not None:
            if not whole:
                g.mul_(g_rows.unsqueeze(-1))
            grads.add(i, j, g, x[i:j], buf)
        del g
    return (*grads.result(x.dtype), g_target)


@ce_bwd_rows.register_fake
def _ce_bwd_rows_fake(grad_loss, input, linear_weight, linear_bias, target, weight, backend,
                      ignore_index, label_smoothing, lse_square_scale, softcap, chunk_size,
                      need_input, need_weight, need_bias, need_target):
    return grad_fakes(input, linear_weight, linear_bias, target, need_input, need_weight,
                       need_bias, need_target)


def _per_row_backward(reduction: str, x: Tensor) -> bool:
    """Does backward recompute the chunks with the incoming gradient (rather than scale what
    the forward computed)? For 'none', and for fp16 inputs: a gradient pre-scaled by
    1/denominator and kept in fp16 would be rounded twice and lose a GradScaler's small
    values to fp16's subnormals (autograd.py); recomputed, it is rounded once."""
    return reduction == "none" or x.dtype == torch.float16


def _rows_grad(grad_out: Tensor, grad_scale: Tensor | None, reduction: str,
               dtype: torch.dtype) -> Tensor:
    """The incoming gradient of each row's loss: grad_out itself for 'none', else the whole
    scale (times 1/denominator for 'mean'), 0-dim in the accumulation dtype."""
    if reduction == "none":
        return grad_out
    g = grad_out.to(ref.compute_dtype(dtype))
    return g if grad_scale is None else g * grad_scale


def _scale_(ops, grads, grad_out: Tensor) -> tuple:
    """The forward's gradients times the incoming gradient: in place, except for a batched
    incoming gradient (torch.autograd.functional.jacobian(vectorize=True), vmap over backward),
    which the in-place op has no batching rule for."""
    if functorch_active() or _legacy_batched(grad_out):
        return tuple(None if g is None else
                     (g.to(ref.compute_dtype(g.dtype)) * grad_out).to(g.dtype) for g in grads)
    for g in grads:
        if g is not None:
            ops.scale_grad_(g, grad_out)
    return grads


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over ce_fwd / ce_bwd_rows; returns (loss reduced as asked, pred, conf).

    mean/sum: the gradients computed by the forward are kept on ctx (not save_for_backward:
    backward scales them in place) and handed to autograd by the first backward, which drops
    its reference so that a leaf's .grad takes the buffer without a copy. A second backward
    through the same graph (retain_graph=True) recomputes them from the saved inputs.
    """

    @staticmethod
    def forward(ctx, x, w, b, target, weight, grad_scale, backend: str, ignore_index: int,
                label_smoothing: float, lse_square_scale: float, softcap: float, chunk: int,
                reduction: str, need_x: bool, need_w: bool, need_b: bool, need_t: bool,
                decode: bool, out_dtype: torch.dtype):
        ctx.opts = (backend, ignore_index, label_smoothing, lse_square_scale, softcap, chunk)
        ctx.reduction = reduction
        ctx.needs = (need_x, need_w, need_b, need_t)
        ctx.per_row = _per_row_backward(reduction, x)
        fused = not ctx.per_row and any(ctx.needs)
        needs = ctx.needs if fused else (False,) * 4
        loss, _, gx, gw, gb, pred, conf, gt = torch.ops.fusedloss_linear.ce_fwd(
            x, w, b, target, weight, grad_scale, *ctx.opts, *needs, decode)
        ctx.fused = (gx, gw, gb, gt) if fused else None
        ctx.save_for_backward(x, w, b, target, weight, grad_scale)
        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        else:  # mean: grad_scale holds 1/denominator on the device
            out = loss.sum() * grad_scale
        ctx.mark_non_differentiable(pred, conf)
        return out.to(out_dtype), pred, conf

    @staticmethod
    def backward(ctx, grad_out, _gpred, _gconf):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                "fusedloss.linear_cross_entropy does not support double backward "
                "(create_graph=True): its gradients are computed by fused kernels")
        x, w, b, target, weight, grad_scale = ctx.saved_tensors
        if ctx.per_row:
            grads = torch.ops.fusedloss_linear.ce_bwd_rows(
                _rows_grad(grad_out, grad_scale, ctx.reduction, x.dtype),
                x, w, b, target, weight, *ctx.opts, *ctx.needs)
        else:
            if ctx.fused is not None:
                grads, ctx.fused = ctx.fused, None
            else:  # second backward (retain_graph=True): recompute as the forward did
                grads = torch.ops.fusedloss_linear.ce_fwd(
                    x, w, b, target, weight, grad_scale, *ctx.opts, *ctx.needs, False)
                grads = (grads[2], grads[3], grads[4], grads[7])
            grads = tuple(g if n else None for g, n in zip(grads, ctx.needs, strict=True))
            grads = _scale_(_backend.get(ctx.opts[0], x.device).ops, grads, grad_out)
        gx, gw, gb, gt = (g if n else None for g, n in zip(grads, ctx.needs, strict=True))
        return (gx, gw, gb, gt) + (None,) * 15
