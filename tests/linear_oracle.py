"""Independent oracles for the fused linear losses: torch.nn.functional on materialised logits.

softcap and lse_square_scale (z-loss) have no torch.nn counterpart; they are written out with
torch ops here as docs/OPS.md defines them (z = cap * tanh(x / cap); z-loss s * lse(z)^2 per
non-ignored row, divided by the same 'mean' denominator as the cross-entropy).
"""

import torch
import torch.nn.functional as tF


def ce_oracle(x, w, b, target, *, weight=None, reduction="mean", ignore_index=-100,
              label_smoothing=0.0, lse_square_scale=0.0, softcap=None):
    z = tF.linear(x, w, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    c = z.shape[-1]
    z2 = z.reshape(-1, c)
    prob = target.is_floating_point()
    t2 = target.reshape(-1, c) if prob else target.reshape(-1)
    rows = tF.cross_entropy(z2, t2, weight, ignore_index=ignore_index, reduction="none",
                            label_smoothing=label_smoothing)
    valid = torch.ones_like(rows) if prob else (t2 != ignore_index).to(rows.dtype)
    if lse_square_scale:
        rows = rows + lse_square_scale * torch.logsumexp(z2, -1).square() * valid
    if reduction == "none":
        return rows.reshape(target.shape[:-1] if prob else target.shape)
    if reduction == "sum":
        return rows.sum()
    if prob:
        return rows.sum() / z2.shape[0]
    if weight is None:
        return rows.sum() / valid.sum()
    return rows.sum() / (weight[t2.clamp(0, c - 1)] * valid).sum()


def bce_oracle(x, w, b, target, *, weight=None, pos_weight=None, reduction="mean"):
    z = tF.linear(x, w, b)
    t = target if target.is_floating_point() else target.to(z.dtype)
    return tF.binary_cross_entropy_with_logits(z, t, weight, reduction=reduction,
                                               pos_weight=pos_weight)


def grads(out, inputs, grad_out=None):
    """d(out)/d(inputs) (None where an input does not require grad)."""
    req = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, req, grad_out, allow_unused=True))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def leaves(*tensors):
    """Fresh leaf copies that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
