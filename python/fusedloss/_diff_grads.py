"""Closed-form loss gradients written with differentiable torch ops.

The autograd Functions use these instead of the fused kernels when the gradient itself must be
differentiable or must run on wrapped tensors:
- backward under `create_graph=True` (gradient penalties, double backward): autograd
  differentiates these expressions, so second-order terms are right;
- backward inside torch.func transforms (grad, vmap(grad(...)), jacrev): plain torch ops have
  batching rules, the fused ops do not;
- gradients the kernels do not produce: probability targets and class weights that require
  grad (torch computes both for probability targets).

Formulas (z = softcap(x), p = softmax(z), lse = logsumexp(z), nll = lse - z, w class weight,
eps label smoothing, s lse_square_scale; each row scaled by its incoming gradient g_r):
- class index t: dz_c = p_c ((1-eps) w_t + (eps/C) W + 2 s lse) - (1-eps) w_t [c==t] - (eps/C) w_c
- probability y, y' = (1-eps) y + eps/C: dz_c = p_c (S + 2 s lse) - w_c y'_c, S = sum_c w_c y'_c;
  d/dy_c = (1-eps) w_c nll_c; d/dw_c = sum_r g_r y'_rc nll_rc
- softcap: dx = dz (1 - (z/cap)^2); ignored rows: 0.
- BCE, q = pos_weight: dx = w ((q y + 1 - y) sigmoid(x) - q y); dy = w (-x + (q - 1) softplus(-x)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference as ref


def ce_row_scale(grad_out: Tensor, grad_scale: Tensor | None, rows: int, reduction: str,
                 dtype: torch.dtype) -> Tensor:
    """(R, 1) multiplier of each row's gradient for the reduced loss's incoming gradient."""
    g = grad_out.to(dtype)
    if reduction == "none":
        return g.reshape(rows, 1)
    if reduction == "mean" and grad_scale is not None:
        g = g * grad_scale.to(dtype)
    return g.reshape(1, 1).expand(rows, 1)


def ce_grads(logits: Tensor, target: Tensor, weight: Tensor | None, row_g: Tensor, cfg,
             need: tuple[bool, bool, bool]):
    """(d logits, d target, d weight) of sum_r g_r loss_r in the accumulation dtype; None where
    `need` is False."""
    x = logits.to(ref.compute_dtype(logits.dtype))
    num_classes = x.shape[-1]
    z = ref.apply_softcap(x, cfg.softcap)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    eps = cfg.label_smoothing
    w = None if weight is None else weight.to(x.dtype)
    zsq = 2 * cfg.lse_square_scale * lse
    d_target = d_weight = None
    ignored = None
    if target.dim() == logits.dim():
        y = target.to(x.dtype) * (1 - eps) + eps / num_classes
        wy = y if w is None else w * y
        dz = p * (wy.sum(-1, keepdim=True) + zsq) - wy
        if need[1]:
            nll = (1 - eps) * (lse - z)
            d_target = row_g * (nll if w is None else w * nll)
        if need[2]:
            d_weight = (row_g * y * (lse - z)).sum(0)
    else:
        ignored = target == cfg.ignore_index
        safe = target.masked_fill(ignored, 0)
        onehot = torch.zeros_like(x).scatter(-1, safe.unsqueeze(-1), 1.0)
        w_t = (1 - eps) * (torch.ones_like(lse.squeeze(-1)) if w is None else w[safe])
        w_sum = num_classes if w is None else w.sum()
        smooth = eps / num_classes * (1.0 if w is None else w)
        dz = p * (w_t.unsqueeze(-1) + eps / num_classes * w_sum + zsq) \
            - w_t.unsqueeze(-1) * onehot - smooth
    if cfg.softcap:
        dz = dz * (1 - (z / cfg.softcap).square())
    if ignored is not None:
        # An ignored row's scale is 0, not the mean's 1/0 = NaN when every row is ignored: the
        # gradient is then 0 and so is its own gradient (0 * NaN would be NaN in both).
        dz = dz.masked_fill(ignored.unsqueeze(-1), 0.0)
        row_g = row_g.masked_fill(ignored.unsqueeze(-1), 0.0)
    d_logits = dz * row_g if need[0] else None
    return d_logits, d_target, d_weight


def bce_grads(logits: Tensor, target: Tensor, weight: Tensor | None,
              pos_weight: Tensor | None, g: Tensor, need: tuple[bool, bool, bool, bool]):
    """(d logits, d target, d weight, d pos_weight) of sum g * loss in the accumulation
    dtype, g broadcastable to logits' shape; None where not asked for (or, for the weights,
    absent)."""
    x = logits.to(ref.compute_dtype(logits.dtype))
    y = target.to(x.dtype)
    g = g.to(x.dtype)
    d_weight = d_pos_weight = None
    if need[2] and weight is not None:  # the unweighted elementwise loss
        d_weight = ref.sigmoid_bce_elem(x, y, None, pos_weight) * g
    if need[3] and pos_weight is not None:  # d/dp: w y softplus(-x)
        d_pos_weight = y * F.softplus(-x) * g
        if weight is not None:
            d_pos_weight = d_pos_weight * weight.to(x.dtype)
    if weight is not None:
        g = g * weight.to(x.dtype)
    d_logits = d_target = None
    if need[0]:
        if pos_weight is None:
            dx = torch.sigmoid(x) - y
        else:
            qy = pos_weight.to(x.dtype) * y
            dx = (qy + 1 - y) * torch.sigmoid(x) - qy
        d_logits = dx * g
    if need[1]:
        dy = -x if pos_weight is None else \
            -x + (pos_weight.to(x.dtype) - 1) * F.softplus(-x)
        d_target = dy * g
    return d_logits, d_target, d_weight, d_pos_weight


def _mul(a: Tensor | None, b: Tensor | None) -> Tensor | float:
    return 0.0 if a is None or b is None else a * b.to(a.dtype)


def ce_jvp(logits, target, weight, grad_scale, cfg, tangents) -> Tensor:
    """Forward-mode derivative of the Function's loss output along (d logits, d target,
    d weight): each row's gradient dotted with the tangents, reduced as the loss is."""
    dx, dt, dw = tangents
    if target.dim() != logits.dim():
        dw = None  # torch's forward AD ignores a class weight's tangent here as well
    ones = torch.ones(logits.shape[0], 1, dtype=ref.compute_dtype(logits.dtype),
                      device=logits.device)
    gx, gt, _ = ce_grads(logits, target, weight, ones, cfg, (dx is not None, dt is not None,
                                                               False))
    rows = _row_sum(_mul(gx, dx) + _mul(gt, dt))
    if dw is not None:  # d loss_r / d w_c = y'_rc nll_rc
        eps = cfg.label_smoothing
        y = target.to(ones.dtype) * (1 - eps) + eps / logits.shape[-1]
        rows = rows + (y * _nll(logits, cfg) * dw.to(ones.dtype)).sum(-1)
    return _reduce_tangent(torch.as_tensor(rows, device=logits.device).expand(
        logits.shape[0]), cfg.reduction, grad_scale).to(cfg.out_dtype)


def _row_sum(t):
    return t.sum(-1) if isinstance(t, Tensor) else t


def _nll(logits, cfg):
    z = ref.apply_softcap(logits.to(ref.compute_dtype(logits.dtype)), cfg.softcap)
    return torch.logsumexp(z, -1, keepdim=True) - z


def bce_jvp(logits, target, weight, pos_weight, grad_scale, cfg, tangents) -> Tensor:
    dx, dt, dw, dpw = tangents
    ones = torch.ones((), dtype=ref.compute_dtype(logits.dtype), device=logits.device)
    gx, gt, gw, gpw = bce_grads(logits, target, weight, pos_weight, ones,
                                (dx is not None, dt is not None, dw is not None,
                                 dpw is not None))
    elem = _mul(gx, dx) + _mul(gt, dt) + _mul(gw, dw) + _mul(gpw, dpw)
    elem = torch.as_tensor(elem, device=logits.device).expand(logits.shape)
    return _reduce_tangent(elem, cfg.reduction, grad_scale).to(cfg.out_dtype)


def _reduce_tangent(t: Tensor, reduction: str, grad_scale: Tensor | None) -> Tensor:
    if reduction == "none":
        return t
    return t.sum() if reduction == "sum" else t.sum() * grad_scale
