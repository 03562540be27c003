"""torch.autograd.Functions over the backend ops: what each loss saves for backward.

Both Functions work on the 2-D (rows, classes) view built by functional.py and return the
loss already reduced ("mean"/"sum": a 0-dim tensor; "none": per row / per element), the
decodings as non-differentiable outputs, and last the fused gradient (an internal output the
functional drops; empty when not computed). They use `setup_context` and have a vmap rule,
so torch.func.grad / vmap / jacrev compose with them.

Gradient strategy (docs/OPS.md):
- "mean"/"sum" with autograd on: the forward op writes d(loss)/d(logits) in the same pass that
  computes the loss (pre-scaled by 1/denominator for "mean", a device scalar: no sync). backward
  multiplies it by the incoming gradient in place (`scale_grad_`, a no-op when that gradient is
  1) and hands it to autograd: ctx drops its reference first, so AccumulateGrad can adopt the
  buffer as `.grad` instead of copying it.
- A second backward through the same graph (retain_graph=True) recomputes the gradient from the
  saved inputs with the backward op (bitwise equal to the fused one), then scales it.
- fp16 logits: no fused gradient. backward computes it with the backward op from the whole
  scale (incoming gradient x 1/denominator, in fp32), rounded once as torch rounds it: a
  GradScaler's 65536 times a gradient pre-scaled by 1/N and stored in fp16 had lost it to
  fp16's subnormals (BCE mean 4096x512: relative error 6.7e-2 against torch's 2e-4).
- "none": backward recomputes with the backward op, since the incoming gradient differs per row.
- backward under create_graph=True, inside torch.func transforms, or for gradients the kernels do
  not produce (probability targets, class weights) uses _diff_grads: differentiable torch ops.
- inplace_backward=True: the gradient overwrites the logits (softmax_ce_fwd_inplace); the op
  mutates its input, so autograd's version counter is bumped and any other use of the
  overwritten logits in backward raises instead of silently using the gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _backend, _diff_grads, _vmap_rules
from . import reference as ref
from ._checks import exporting, forward_ad_active, functorch_active


class CEConfig(NamedTuple):
    """Everything but the tensors that SoftmaxCrossEntropyFunction needs, by name."""
    backend: str
    ignore_index: int
    label_smoothing: float
    lse_square_scale: float
    softcap: float
    reduction: str
    fused_grad: bool  # write the gradient in the forward pass ("mean"/"sum" with autograd)
    inplace: bool  # ... into the logits
    decode: bool
    out_dtype: torch.dtype  # the loss's dtype (torch's result dtype)

    def op_args(self):
        return (self.ignore_index, self.label_smoothing, self.lse_square_scale, self.softcap)


class BCEConfig(NamedTuple):
    backend: str
    reduction: str
    fused_grad: bool
    return_probs: bool
    count: bool
    out_dtype: torch.dtype


def _ops(backend: str, device: torch.device):
    return _backend.get(backend, device).ops


def _reduce(loss: Tensor, reduction: str, grad_scale: Tensor | None, out_dtype) -> Tensor:
    if reduction == "none":
        return loss.to(out_dtype)
    if reduction == "sum":
        return loss.sum().to(out_dtype)
    return (loss.sum() * grad_scale).to(out_dtype)  # grad_scale = 1 / denominator on device


def _differentiable_backward(grad_out: Tensor) -> bool:
    """Must backward build a differentiable gradient (see _diff_grads)? Also for a batched
    incoming gradient (autograd.grad(is_grads_batched=True), gradcheck's batched check): the
    fused gradient's in-place scaling has no batching rule."""
    return torch.is_grad_enabled() or functorch_active() or _legacy_batched(grad_out)


def _legacy_batched(t: Tensor) -> bool:
    # (not while torch.compile traces backward: dynamo cannot trace the query, and the legacy
    # batching of is_grads_batched does not reach compiled code)
    check = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return check is not None and not torch.compiler.is_compiling() and check(t)


def _whole_scale(grad_out: Tensor, grad_scale: Tensor | None, logits: Tensor) -> Tensor:
    """The incoming gradient times 1/denominator ("mean"), 0-dim in the accumulation dtype."""
    g = grad_out.to(ref.compute_dtype(logits.dtype))
    return g if grad_scale is None else g * grad_scale


def _take_fused_grad(ctx) -> Tensor | None:
    """The forward's gradient buffer, once: ctx forgets it so autograd may adopt it."""
    grad, ctx.fused_grad = ctx.fused_grad, None
    return grad


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(logits: Tensor, target: Tensor, weight, grad_scale, cfg: CEConfig):
        ops = _ops(cfg.backend, logits.device)
        grad = logits.new_empty((0,))
        if cfg.fused_grad and cfg.inplace:
            loss, _lse, pred, conf = ops.softmax_ce_fwd_inplace(
                logits, target, weight, grad_scale, *cfg.op_args(), cfg.decode)
            if not torch.compiler.is_compiling():
                # A C++ op's (a!) annotation does not bump autograd's version counter in eager
                # mode (no ADInplaceOrView kernel); do it so stale uses of the logits raise.
                torch.autograd.graph.increment_version(logits)
        else:
            loss, _lse, fwd_grad, pred, conf = ops.softmax_ce_fwd(
                logits, target, weight, grad_scale, *cfg.op_args(), cfg.fused_grad, cfg.decode)
            if cfg.fused_grad:
                grad = fwd_grad
        return _reduce(loss, cfg.reduction, grad_scale, cfg.out_dtype), pred, conf, grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, grad_scale, cfg = inputs
        _, pred, conf, grad = output
        ctx.mark_non_differentiable(pred, conf, grad)
        ctx.cfg = cfg
        ctx.fused_grad = None
        if cfg.fused_grad:
            ctx.fused_grad = logits if cfg.inplace else grad
        ctx.save_for_backward(logits, target, weight, grad_scale)
        ctx.save_for_forward(logits, target, weight, grad_scale)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, _gpred, _gconf, _ggrad):
        if grad_out is None:  # grads are not materialised (for jvp's sake): nothing flows in
            return None, None, None, None, None
        logits, target, weight, grad_scale = ctx.saved_tensors
        cfg = ctx.cfg
        need = tuple(ctx.needs_input_grad[:3])
        if _differentiable_backward(grad_out) or need[1] or need[2]:
            _take_fused_grad(ctx)
            if cfg.inplace and cfg.fused_grad:  # the saved logits hold the gradient now
                _raise_inplace_twice()
            row_g = _diff_grads.ce_row_scale(grad_out, grad_scale, logits.shape[0],
                                             cfg.reduction, ref.compute_dtype(logits.dtype))
            grads = _diff_grads.ce_grads(logits, target, weight, row_g, cfg, need)
            return _cast_like(grads, (logits, target, weight)) + (None, None)
        return _ce_logits_grad(ctx, grad_out, logits, target, weight, grad_scale), \
            None, None, None, None

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, grad_scale, cfg):
        return _vmap_rules.ce_vmap(ce_apply, info, in_dims, logits, target, weight,
                                   grad_scale, cfg)


def _cast_like(grads, inputs) -> tuple:
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs,
                                                                      strict=True))


def _raise_inplace_twice():
    raise RuntimeError(
        "fusedloss.cross_entropy(inplace_backward=True): the logits were overwritten by the "
        "gradient, so backward can run only once (retain_graph=True and create_graph=True are "
        "not supported); use inplace_backward=False")


def _ce_logits_grad(ctx, grad_out, logits, target, weight, grad_scale):
    cfg = ctx.cfg
    ops = _ops(cfg.backend, logits.device)
    if cfg.reduction == "none":
        return ops.softmax_ce_bwd(grad_out, logits, target, weight, *cfg.op_args())
    grad = _take_fused_grad(ctx)
    if grad is None and not cfg.fused_grad:  # fp16: the whole scale, one rounding
        return ops.softmax_ce_bwd(_whole_scale(grad_out, grad_scale, logits).expand(
            logits.shape[0]), logits, target, weight, *cfg.op_args())
    if grad is None:
        if cfg.inplace:
            _raise_inplace_twice()
        # retain_graph=True second backward: recompute exactly as the forward did, then scale
        rows = torch.ones((), dtype=ref.compute_dtype(logits.dtype), device=logits.device) \
            if grad_scale is None else grad_scale
        grad = ops.softmax_ce_bwd(rows.expand(logits.shape[0]), logits, target, weight,
                                  *cfg.op_args())
    ops.scale_grad_(grad, grad_out)
    return grad


class SigmoidBCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(logits: Tensor, target: Tensor, weight, pos_weight, grad_scale, threshold,
                cfg: BCEConfig, hist):
        # hist: None or (edges, counts) of a ThresholdHistogram, counts added to in place
        ops = _ops(cfg.backend, logits.device)
        loss, grad, labels, probs, counts = ops.sigmoid_bce_fwd(
            logits, target, weight, pos_weight, grad_scale, threshold, cfg.reduction != "none",
            cfg.fused_grad, cfg.return_probs, cfg.count, *(hist or (None, None)))
        if not cfg.fused_grad:
            grad = logits.new_empty((0,))
        return _reduce(loss, cfg.reduction, grad_scale, cfg.out_dtype), labels, probs, counts, \
            grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, pos_weight, grad_scale, _threshold, cfg = inputs[:7]
        _, labels, probs, counts, grad = output
        ctx.mark_non_differentiable(labels, probs, counts, grad)
        ctx.cfg = cfg
        ctx.fused_grad = grad if cfg.fused_grad else None
        ctx.save_for_backward(logits, target, weight, pos_weight, grad_scale)
        ctx.save_for_forward(logits, target, weight, pos_weight, grad_scale)
        # Without this, autograd fills a zero gradient for every other output before backward:
        # the fused-gradient output is logits-sized, so that was a full write of zeros.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, _gl, _gp, _gc, _gg):
        if grad_out is None:  # nothing flows into the loss
            return None, None, None, None, None, None, None, None
        logits, target, weight, pos_weight, grad_scale = ctx.saved_tensors
        cfg = ctx.cfg
        # weight / pos_weight need a gradient only inside torch.func transforms (eager torch
        # and fusedloss refuse them with requires_grad), as torch.func gives one
        need = tuple(ctx.needs_input_grad[:4])
        if _differentiable_backward(grad_out) or any(need[1:]):
            _take_fused_grad(ctx)
            g = grad_out if cfg.reduction != "mean" else grad_out * grad_scale
            grads = _cast_like(
                _diff_grads.bce_grads(logits, target, weight, pos_weight, g, need),
                (logits, target, weight, pos_weight))
            return *grads, None, None, None, None
        return _bce_logits_grad(ctx, grad_out, logits, target, weight, pos_weight,
                                grad_scale), None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, pos_weight, grad_scale, threshold, cfg,
             hist):
        if hist is not None:
            raise RuntimeError("histogram= is not supported under torch.func.vmap: the "
                               "histogram is state added to in place")
        return _vmap_rules.bce_vmap(bce_apply, info, in_dims[:7], logits, target, weight,
                                    pos_weight, grad_scale, threshold, cfg)


def _bce_logits_grad(ctx, grad_out, logits, target, weight, pos_weight, grad_scale):
    ops = _ops(ctx.cfg.backend, logits.device)
    if ctx.cfg.reduction == "none":
        return ops.sigmoid_bce_bwd(grad_out, logits, target, weight, pos_weight)
    grad = _take_fused_grad(ctx)
    if grad is None and not ctx.cfg.fused_grad:  # fp16: the whole scale, one rounding
        return ops.sigmoid_bce_bwd(_whole_scale(grad_out, grad_scale, logits).expand(
            logits.shape), logits, target, weight, pos_weight)
    if grad is None:  # retain_graph=True second backward: recompute as the forward did
        g = torch.ones((), dtype=ref.compute_dtype(logits.dtype), device=logits.device) \
            if grad_scale is None else grad_scale
        grad = ops.sigmoid_bce_bwd(g.expand(logits.shape), logits, target, weight, pos_weight)
    ops.scale_grad_(grad, grad_out)
    return grad


# Forward-mode AD (torch.func.jvp / jacfwd / hessian, torch.autograd.forward_ad) needs a jvp
# staticmethod, but torch.compile refuses to trace an autograd.Function that has one. So the
# jvp lives in subclasses, chosen only while forward AD or a torch.func transform is active.
class SoftmaxCrossEntropyJvpFunction(SoftmaxCrossEntropyFunction):
    @staticmethod
    def jvp(ctx, d_logits, d_target, d_weight, _d_scale, _d_cfg):
        logits, target, weight, grad_scale = ctx.saved_tensors
        if ctx.cfg.inplace and ctx.cfg.fused_grad:
            _raise_inplace_twice()
        out = _diff_grads.ce_jvp(logits, target, weight, grad_scale, ctx.cfg,
                                 (d_logits, d_target, d_weight))
        return out, None, None, None


class SigmoidBCEJvpFunction(SigmoidBCEFunction):
    @staticmethod
    def jvp(ctx, d_logits, d_target, d_weight, d_pos_weight, _ds, _dthr, _dcfg, _dhist=None):
        logits, target, weight, pos_weight, grad_scale = ctx.saved_tensors
        out = _diff_grads.bce_jvp(logits, target, weight, pos_weight, grad_scale, ctx.cfg,
                                  (d_logits, d_target, d_weight, d_pos_weight))
        return out, None, None, None, None


def _forward_ad_possible() -> bool:
    return not torch.compiler.is_compiling() and (functorch_active() or forward_ad_active())


def _forward_as_torch_ops() -> bool:
    """Must the forward run as plain torch-backend code, not through the Functions?
    torch.compile tracing a torch.func transform (compile(grad(f)), compile(vmap(grad(f)))):
    there dynamo inlined the Functions' forward and differentiated the ops it calls, so their
    backward was not used (the fused ops have no autograd formula: the gradient was silently
    zero; the ops' Autograd guard in csrc/ops.cpp now raises instead), and it could not vmap the
    Function it made of them. So the forward runs as plain code on the torch backend, whose ops
    are differentiable and batchable torch ops. The same for torch.export (_checks.exporting)."""
    return (torch.compiler.is_compiling() and functorch_active()) or exporting()


def ce_apply(logits, target, weight, grad_scale, cfg: CEConfig):
    """SoftmaxCrossEntropyFunction.apply, with forward-mode AD support where it may be used."""
    if _forward_as_torch_ops():
        cfg = cfg._replace(backend="torch", fused_grad=False, inplace=False)
        return SoftmaxCrossEntropyFunction.forward(logits, target, weight, grad_scale, cfg)
    fn = SoftmaxCrossEntropyJvpFunction if _forward_ad_possible() else \
        SoftmaxCrossEntropyFunction
    return fn.apply(logits, target, weight, grad_scale, cfg)


def bce_apply(logits, target, weight, pos_weight, grad_scale, threshold, cfg: BCEConfig,
              hist=None):
    """SigmoidBCEFunction.apply, with forward-mode AD support where it may be used; `hist`:
    None or a ThresholdHistogram's (edges, counts), added to by the same pass."""
    if _forward_as_torch_ops():
        cfg = cfg._replace(backend="torch", fused_grad=False)
        return SigmoidBCEFunction.forward(logits, target, weight, pos_weight, grad_scale,
                                          threshold, cfg, hist)
    fn = SigmoidBCEJvpFunction if _forward_ad_possible() else SigmoidBCEFunction
    # hist is always passed: while forward had it as a defaulted parameter, torch.compile
    # (fullgraph) failed to trace it when no input required grad (AttributeError on cfg.backend).
    return fn.apply(logits, target, weight, pos_weight, grad_scale, threshold, cfg, hist)
