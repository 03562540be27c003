"""Pure-PyTorch math of every fusedloss op: the fallback backend's core and the test oracle.

Everything here works on the 2-D (rows, classes) view and returns per-row (or per-element)
values; reductions live in functional.py. The functions are written with differentiable
torch ops so `torch.autograd.gradcheck` can check the closed-form gradients below against
autograd. Semantics (and the derivation of each gradient) are in docs/OPS.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import no_data
from ._dtypes import acc_dtype as compute_dtype  # the accumulation dtype (one rule, _dtypes.py)


def apply_softcap(x: Tensor, softcap: float) -> Tensor:
    """`cap * tanh(x / cap)` (Gemma-2 style logit soft-capping); identity when softcap == 0."""
    return x if softcap == 0.0 else softcap * torch.tanh(x / softcap)


def _class_weight(weight: Tensor | None, num_classes: int, like: Tensor) -> Tensor:
    if weight is None:
        return torch.ones(num_classes, dtype=like.dtype, device=like.device)
    return weight.to(like.dtype)


def _target_parts(target: Tensor, ignore_index: int, num_classes: int):
    """(ignored mask, safe target index) for class-index targets."""
    ignored = target == ignore_index
    safe = target.masked_fill(ignored, 0)
    return ignored, safe


def check_target_range(target: Tensor, ignore_index: int, num_classes: int) -> None:
    """Raise IndexError (as torch's nll_loss does) for a class index outside [0, C).

    This is the reference backend: it may synchronise to raise a host exception. Under
    torch.compile the check is skipped (a data-dependent branch cannot be traced), and so it is
    for meta and fake tensors (no data: shape propagation, as torch's loss runs there).
    """
    if target.numel() == 0 or torch.compiler.is_compiling() or no_data(target):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"Target {value} is out of bounds.")


def softmax_ce_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-row softmax cross-entropy and log-sum-exp, in the accumulation dtype.

    `target` is (R,) class indices or (R, C) probabilities. Returns (loss (R,), lse (R,)).
    Ignored rows have loss 0.
    """
    x = logits.to(compute_dtype(logits.dtype))
    num_classes = x.shape[-1]
    z = apply_softcap(x, softcap)
    lse = torch.logsumexp(z, dim=-1)
    # -log p = -log_softmax(z) = lse - z, formed as (m - z) + log(s) by torch: no cancellation
    # at large logits, and a row holding +inf is NaN (as torch's cross_entropy gives).
    nll = -torch.log_softmax(z, dim=-1)
    w = _class_weight(weight, num_classes, x)
    eps = label_smoothing
    eps_c = eps / num_classes if num_classes else 0.0  # C = 0: no classes to smooth over
    if target.dim() == logits.dim():  # probability targets
        y = target.to(x.dtype)
        if eps > 0:
            y = y * (1 - eps) + eps_c
        loss = (nll * w * y).sum(-1)
        if lse_square_scale:
            loss = loss + lse_square_scale * lse.square()
        return loss, lse
    ignored, safe = _target_parts(target, ignore_index, num_classes)
    if num_classes == 0:  # every row is ignored (any other target is out of range)
        return torch.zeros_like(lse), lse
    loss = (1 - eps) * w[safe] * nll.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if eps > 0:
        loss = loss + eps_c * (nll * w).sum(-1)
    if lse_square_scale:
        loss = loss + lse_square_scale * lse.square()
    return loss.masked_fill(ignored, 0.0), lse


def softmax_ce_grad(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    row_scale: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float = 0.0,
) -> Tensor:
    """Closed-form d(sum_r row_scale[r] * loss[r]) / d logits, in the accumulation dtype.

    With z the (soft-capped) logits, p = softmax(z) = exp(z - m) / s (computed from z, never
    from a rounded lse), k = 2 lse_square_scale lse, for a class-index row with target t:
        dloss/dz_c = p_c * ((1-eps) w_t + (eps/C) W + k) - (1-eps) w_t [c==t] - (eps/C) w_c
    where W = sum_c w_c. For probability targets y' = (1-eps) y + eps/C, S = sum_c w_c y'_c:
        dloss/dz_c = p_c * (S + k) - w_c y'_c
    and soft-capping multiplies by dz/dx = 1 - (z/cap)^2. Ignored rows get exactly 0; a row
    holding +inf is NaN (softmax of it is).
    """
    x = logits.to(compute_dtype(logits.dtype))
    num_classes = x.shape[-1]
    z = apply_softcap(x, softcap)
    p = torch.softmax(z, dim=-1)
    w = _class_weight(weight, num_classes, x)
    eps = label_smoothing
    eps_c = eps / num_classes if num_classes else 0.0  # C = 0: no classes to smooth over
    lse_term = 2 * lse_square_scale * torch.logsumexp(z, dim=-1) if lse_square_scale else 0.0
    if target.dim() == logits.dim():
        y = target.to(x.dtype) * (1 - eps) + eps_c
        wy = w * y
        coef = wy.sum(-1) + lse_term
        dz = p * (coef.unsqueeze(-1) if isinstance(coef, Tensor) else coef) - wy
        ignored = None
    else:
        ignored, safe = _target_parts(target, ignore_index, num_classes)
        if num_classes == 0:
            return torch.zeros_like(x)
        wt = (1 - eps) * w[safe]
        if eps > 0:
            coef = wt + eps_c * w.sum() + lse_term
            dz = p * coef.unsqueeze(-1) - eps_c * w
        else:  # no 0 * inf from an infinite weight of another class
            dz = p * (wt + lse_term).unsqueeze(-1)
        dz = dz.scatter_add(-1, safe.unsqueeze(-1), -wt.unsqueeze(-1))
    if softcap:  # sech(x/cap)^2 = 1 - (z/cap)^2, without the cancellation where |x| >> cap
        dz = dz * torch.cosh(x / softcap).pow(-2)
    grad = dz * row_scale.to(x.dtype).reshape(-1, 1)
    if ignored is not None:
        grad = grad.masked_fill(ignored.unsqueeze(-1), 0.0)
    return grad


def softmax_decode(logits: Tensor, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """(argmax with torch's tie rule, probability of the argmax class as fp32; C = 0 gives
    pred 0 and confidence 0)."""
    x = logits.to(compute_dtype(logits.dtype))
    if x.shape[-1] == 0:
        zeros = torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)
        return zeros, zeros.float()
    z = apply_softcap(x, softcap)
    pred = torch.argmax(z, dim=-1)
    conf = torch.softmax(z, dim=-1).gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    return pred, conf.float()


def sigmoid_bce_elem(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, pos_weight: Tensor | None = None
) -> Tensor:
    """Elementwise BCE-with-logits in the accumulation dtype, cancellation-free:
    w ((1-y) max(x,0) - p y min(x,0) + (1 + (p-1) y) log1p(exp(-|x|))).
    Equal to w ((1-y) x + (1 + (p-1) y) softplus(-x)), but for x << 0, y = 0 the loss (about
    e^x) is not formed as x + (-x + log1p(e^x)), which loses about half an ulp of |x|."""
    x = logits.to(compute_dtype(logits.dtype))
    y = target.to(x.dtype)
    log1p_e = torch.log1p(torch.exp(-x.abs()))
    pos, neg = x.clamp(min=0), x.clamp(max=0)
    if pos_weight is None:
        loss = (1 - y) * pos - y * neg + log1p_e
    else:
        p = pos_weight.to(x.dtype)
        # p y min(x, 0) is 0 for x >= 0 even for an infinite pos_weight (no inf * 0); an
        # infinite coefficient of softplus(-x) > 0 gives its infinity, also where log1p(e)
        # has rounded to 0 (no inf * 0)
        coef = 1 + (p - 1) * y
        soft = torch.where(torch.isinf(coef), coef, coef * log1p_e)
        loss = (1 - y) * pos - torch.where(x < 0, p * y * neg, 0.0) + soft
    if weight is not None:
        loss = loss * weight.to(x.dtype)
    return loss


def sigmoid_bce_grad(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    grad_loss: Tensor,
) -> Tensor:
    """d(sum grad_loss * loss)/dx = grad_loss * w * ((p y + 1 - y) sigmoid(x) - p y)."""
    x = logits.to(compute_dtype(logits.dtype))
    y = target.to(x.dtype)
    sig = torch.sigmoid(x)
    if pos_weight is None:
        dx = sig - y
    else:
        py = pos_weight.to(x.dtype) * y
        dx = (py + 1 - y) * sig - py
    if weight is not None:
        dx = dx * weight.to(x.dtype)
    return dx * grad_loss.to(x.dtype)


def logit_threshold(threshold: Tensor | float) -> Tensor | float:
    """Probability threshold -> the logit-space threshold the decoding compares against."""
    if isinstance(threshold, Tensor):
        return torch.logit(threshold.to(torch.float64)).float()
    # a Python float in Python arithmetic, as torch.logit computes it (log(t / (1 - t)) in
    # float64, -inf at 0, inf at 1, NaN outside [0, 1]): no tensor for torch.compile to break on
    t = float(threshold)
    if not 0.0 < t < 1.0:
        return -math.inf if t == 0.0 else math.inf if t == 1.0 else math.nan
    return math.log(t / (1.0 - t))


def sigmoid_decode(logits: Tensor, threshold: Tensor) -> Tensor:
    """Multi-hot labels: x > threshold (logit space, strict: a tie is negative)."""
    return logits.to(compute_dtype(logits.dtype)) > threshold.to(compute_dtype(logits.dtype))


def confusion_counts(labels: Tensor, target: Tensor) -> Tensor:
    """Per-class (last dim) [TP, FP, FN] as (3, C) int64; a target is positive when > 0.5."""
    pos = target.to(torch.float64) > 0.5 if target.dtype != torch.bool else target
    rows = math.prod(labels.shape[:-1]) if labels.dim() else 1  # also for C = 0
    lab = labels.reshape(rows, labels.shape[-1] if labels.dim() else 1)
    pos = pos.reshape(lab.shape)
    tp = (lab & pos).sum(0)
    fp = (lab & ~pos).sum(0)
    fn = (~lab & pos).sum(0)
    return torch.stack([tp, fp, fn]).to(torch.int64)


def threshold_histogram_(counts: Tensor, edges: Tensor, logits: Tensor, target: Tensor) -> None:
    """Adds the (2, C, B + 2) threshold histogram of (R, C) logits to `counts` in place: bin b
    of class c counts the logits with exactly b edges strictly below them, split by target > 0.5
    (docs/OPS.md, sigmoid_bce_fwd); NaN logits are left out."""
    x = logits.to(compute_dtype(logits.dtype))
    classes, bins = counts.shape[1], counts.shape[2]
    b = torch.searchsorted(edges.to(x.dtype), x.contiguous(), right=False)
    pos = (target.to(torch.float64) > 0.5 if target.dtype != torch.bool else target)
    cls = torch.arange(classes, device=x.device)
    flat = pos.to(torch.int64) * (classes * bins) + cls * bins + b
    flat = flat[~torch.isnan(x)]
    counts += torch.bincount(flat, minlength=counts.numel()).view_as(counts)
