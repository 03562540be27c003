"""torch.autograd.Functions over the backend ops: what each loss saves for backward.

Both Functions work on the 2-D (rows, classes) view built by functional.py and return the
loss already reduced ("mean"/"sum": a 0-dim tensor; "none": per row / per element), plus the
decodings as non-differentiable outputs.

Gradient strategy (docs/OPS.md, DESIGN.md "Kernel contract"):
- "mean"/"sum" with autograd on: the forward op writes d(loss)/d(logits) in the same pass that
  computes the loss (pre-scaled by 1/denominator for "mean", a device scalar: no sync). backward
  only multiplies it by the incoming gradient, in place, with `scale_grad_`, which does nothing
  when that gradient is 1 (the usual `loss.backward()`).
- A second backward through the same graph (retain_graph=True) must not scale the buffer twice:
  it recomputes the gradient from the saved logits and lse instead. The fused gradient buffer
  is kept on ctx, not in save_for_backward: backward scales it in place, which would otherwise
  trip the saved-tensor version check on that second backward.
- "none": the forward saves (logits, target, weight, lse) and backward recomputes the softmax
  from the saved lse (`*_bwd` ops), since the incoming gradient differs per row.
- inplace_backward=True: the gradient overwrites the logits (softmax_ce_fwd_inplace); the op is
  registered as mutating its input, so autograd's version counter sees the write and any other
  use of the overwritten logits in backward raises instead of silently using the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from . import reference as ref


def _ops(backend: str, device: torch.device):
    return _backend.get(backend, device).ops


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight, grad_scale, backend: str,
                ignore_index: int, label_smoothing: float, lse_square_scale: float,
                softcap: float, reduction: str, needs_grad: bool, inplace: bool, decode: bool):
        ops = _ops(backend, logits.device)
        args = (ignore_index, label_smoothing, lse_square_scale, softcap)
        fused_grad = needs_grad and reduction != "none"
        ctx.meta = (backend, args, reduction, inplace)
        ctx.consumed = False
        if fused_grad and inplace:
            loss, lse, pred, conf = ops.softmax_ce_fwd_inplace(
                logits, target, weight, grad_scale, *args, decode)
            if not torch.compiler.is_compiling():
                # A C++ op's (a!) annotation does not bump autograd's version counter in eager
                # mode (no ADInplaceOrView kernel); do it so stale uses of the logits raise.
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(logits, target, weight, lse, grad_scale)
            ctx.fused_grad = logits
        else:
            loss, lse, grad, pred, conf = ops.softmax_ce_fwd(
                logits, target, weight, grad_scale, *args, fused_grad, decode)
            if fused_grad:
                ctx.save_for_backward(logits, target, weight, lse, grad_scale)
                ctx.fused_grad = grad
            elif needs_grad:
                ctx.save_for_backward(logits, target, weight, lse)
        if reduction == "none":
            out = loss.to(logits.dtype)
        elif reduction == "sum":
            out = loss.sum().to(logits.dtype)
        else:  # mean: grad_scale holds 1/denominator on the device
            out = (loss.sum() * grad_scale).to(logits.dtype)
        ctx.mark_non_differentiable(pred, conf)
        return out, pred, conf

    @staticmethod
    def backward(ctx, grad_out, _gpred, _gconf):
        backend, args, reduction, inplace = ctx.meta
        saved = ctx.saved_tensors
        logits, target, weight, lse = saved[:4]
        ops = _ops(backend, logits.device)
        grad_logits = grad_target = None
        if reduction == "none":
            grad_logits = ops.softmax_ce_bwd(grad_out, logits, target, weight, *args)
        elif not ctx.consumed:
            grad_logits = ctx.fused_grad
            ops.scale_grad_(grad_logits, grad_out)
        elif inplace:
            raise RuntimeError(
                "fusedloss.cross_entropy(inplace_backward=True): the logits were overwritten "
                "by the gradient, so backward can run only once (retain_graph=True is not "
                "supported); use inplace_backward=False")
        else:  # second backward (retain_graph=True): recompute as the forward did, then scale
            grad_scale = saved[4]
            rows = torch.ones((), dtype=lse.dtype, device=lse.device) if grad_scale is None \
                else grad_scale
            grad_logits = ops.softmax_ce_bwd(rows.expand(logits.shape[0]), logits, target,
                                             weight, *args)
            ops.scale_grad_(grad_logits, grad_out)
        ctx.consumed = reduction != "none"
        if ctx.needs_input_grad[1]:  # probability targets that require grad (distillation)
            grad_target = _soft_target_grad(ctx, grad_out, logits, target, weight, lse, args,
                                            reduction, saved)
        return (grad_logits, grad_target) + (None,) * 11


def _soft_target_grad(ctx, grad_out, logits, target, weight, lse, args, reduction, saved):
    """d loss / d y_c = (1 - eps) * w_c * (lse - z_c), times the row's incoming gradient."""
    _, eps, _, softcap = args
    z = ref.apply_softcap(logits.to(ref.compute_dtype(logits.dtype)), softcap)
    g = (1 - eps) * (lse.to(z.dtype).unsqueeze(-1) - z)
    if weight is not None:
        g = g * weight.to(z.dtype)
    if reduction == "none":
        g = g * grad_out.to(z.dtype).unsqueeze(-1)
    else:
        g = g * grad_out.to(z.dtype)
        if reduction == "mean":
            g = g * saved[4].to(z.dtype)
    return g.to(target.dtype)


class SigmoidBCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight, pos_weight, grad_scale,
                threshold, backend: str, reduction: str, needs_grad: bool, return_probs: bool,
                count: bool):
        ops = _ops(backend, logits.device)
        reduce_rows = reduction != "none"
        fused_grad = needs_grad and reduce_rows
        loss, grad, labels, probs, counts = ops.sigmoid_bce_fwd(
            logits, target, weight, pos_weight, grad_scale, threshold, reduce_rows, fused_grad,
            return_probs, count)
        ctx.meta = (backend, reduction)
        ctx.consumed = False
        if fused_grad:
            ctx.save_for_backward(logits, target, weight, pos_weight, grad_scale)
            ctx.fused_grad = grad
        elif needs_grad:
            ctx.save_for_backward(logits, target, weight, pos_weight)
        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() * grad_scale
        out = out.to(logits.dtype)
        ctx.mark_non_differentiable(labels, probs, counts)
        return out, labels, probs, counts

    @staticmethod
    def backward(ctx, grad_out, _gl, _gp, _gc):
        backend, reduction = ctx.meta
        saved = ctx.saved_tensors
        logits, target, weight, pos_weight = saved[:4]
        ops = _ops(backend, logits.device)
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            if reduction == "none":
                grad_logits = ops.sigmoid_bce_bwd(grad_out, logits, target, weight, pos_weight)
            elif not ctx.consumed:
                grad_logits = ctx.fused_grad
                ops.scale_grad_(grad_logits, grad_out)
                ctx.consumed = True
            else:  # second backward (retain_graph=True): recompute as the forward did
                g = saved[4] if saved[4] is not None else \
                    torch.ones((), dtype=torch.float32, device=logits.device)
                grad_logits = ops.sigmoid_bce_bwd(g.expand(logits.shape), logits, target,
                                                  weight, pos_weight)
                ops.scale_grad_(grad_logits, grad_out)
        if ctx.needs_input_grad[1]:
            grad_target = _bce_target_grad(grad_out, logits, target, weight, pos_weight,
                                           reduction, saved)
        return (grad_logits, grad_target) + (None,) * 9


def _bce_target_grad(grad_out, logits, target, weight, pos_weight, reduction, saved):
    """d loss / d y = w * (-x + (p - 1) * softplus(-x)), times the incoming gradient."""
    x = logits.to(ref.compute_dtype(logits.dtype))
    sp = torch.nn.functional.softplus(-x)
    g = -x if pos_weight is None else -x + (pos_weight.to(x.dtype) - 1) * sp
    if weight is not None:
        g = g * weight.to(x.dtype)
    if reduction == "mean" and len(saved) > 4 and saved[4] is not None:
        g = g * saved[4].to(x.dtype)
    elif reduction == "mean":
        g = g / max(x.numel(), 1)
    return (g * grad_out.to(x.dtype)).to(target.dtype)
