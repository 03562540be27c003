"""Keyword-only extras and autograd plumbing: z-loss, softcap, inplace_backward, retain_graph,
incoming gradients that are not 1, stride-0 incoming gradients, extreme logits."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from helpers import assert_close


def zloss_softcap_oracle(x, t, weight, reduction, smoothing, s, cap, ignore_index=-100):
    """Composed from torch.nn: CE of the capped logits plus s * lse^2 over non-ignored rows,
    reduced with torch's CE denominator (sum of target weights)."""
    z = cap * torch.tanh(x / cap) if cap else x
    ce = F.cross_entropy(z, t, weight, ignore_index=ignore_index, reduction="none",
                         label_smoothing=smoothing)
    valid = t != ignore_index
    extra = s * torch.logsumexp(z, 1).square() * valid
    rows = ce + extra
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    w_t = (weight[t.clamp(min=0)] if weight is not None else torch.ones_like(rows)) * valid
    return rows.sum() / w_t.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("s,cap", [(1e-3, None), (0.0, 5.0), (1e-2, 3.0)])
def test_zloss_and_softcap(dev_backend, reduction, s, cap):
    device, backend = dev_backend
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(9, 13, generator=g, dtype=torch.float64) * 6).to(device)
    t = torch.randint(0, 13, (9,), generator=g).to(device)
    t[3] = -100
    w = (torch.rand(13, generator=g, dtype=torch.float64) + 0.2).to(device)
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected = zloss_softcap_oracle(xr, t, w, reduction, 0.1, s, cap or 0.0)
    got = fusedloss.cross_entropy(xo, t, w, reduction=reduction, label_smoothing=0.1,
                                  lse_square_scale=s, softcap=cap, backend=backend)
    assert_close(got, expected, torch.float64)
    up = torch.rand(expected.shape, dtype=torch.float64, generator=g).to(device)
    assert_close(torch.autograd.grad(got, xo, up)[0], torch.autograd.grad(expected, xr, up)[0],
                 torch.float64)


def test_incoming_gradient_not_one_and_retain_graph(dev_backend):
    """backward scales the fused gradient by the incoming gradient; a second backward through
    the same graph (retain_graph=True) must give the same answer, not a doubly scaled one."""
    device, backend = dev_backend
    x = torch.randn(6, 10, device=device, requires_grad=True)
    t = torch.randint(0, 10, (6,), device=device)
    xr = x.detach().clone().requires_grad_(True)
    loss = fusedloss.cross_entropy(x, t, backend=backend) * 3.0
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward()
    (F.cross_entropy(xr, t) * 3.0).backward()
    assert_close(first, xr.grad, torch.float32)
    assert_close(x.grad, xr.grad, torch.float32)


def test_bce_retain_graph(dev_backend):
    device, backend = dev_backend
    x = torch.randn(5, 4, device=device, requires_grad=True)
    y = torch.rand(5, 4, device=device)
    loss = fusedloss.binary_cross_entropy_with_logits(x, y, backend=backend) * 0.5
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1 = g1.clone()
    (g2,) = torch.autograd.grad(loss, x)
    xr = x.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(xr, y) * 0.5, xr)
    assert_close(g1, gr, torch.float32)
    assert_close(g2, gr, torch.float32)


def test_stride_zero_incoming_gradient(dev_backend):
    """reduction='none' followed by .sum() sends an expanded (stride-0) gradient."""
    device, backend = dev_backend
    x = torch.randn(7, 5, device=device, requires_grad=True)
    t = torch.randint(0, 5, (7,), device=device)
    fusedloss.cross_entropy(x, t, reduction="none", backend=backend).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    F.cross_entropy(xr, t, reduction="none").sum().backward()
    assert_close(x.grad, xr.grad, torch.float32)
    xb = torch.randn(3, 4, device=device, requires_grad=True)
    y = torch.rand(3, 4, device=device)
    fusedloss.binary_cross_entropy_with_logits(xb, y, reduction="none", backend=backend) \
        .sum().backward()
    xbr = xb.detach().clone().requires_grad_(True)
    F.binary_cross_entropy_with_logits(xbr, y, reduction="none").sum().backward()
    assert_close(xb.grad, xbr.grad, torch.float32)


def test_inplace_backward(dev_backend):
    """The gradient overwrites the logits: same gradient, and the write is visible to
    autograd's version counter so a later use of the stale logits raises."""
    device, backend = dev_backend
    w = torch.randn(8, 16, device=device, requires_grad=True)
    h = torch.randn(4, 8, device=device)
    t = torch.randint(0, 16, (4,), device=device)
    logits = h @ w
    loss = fusedloss.cross_entropy(logits, t, inplace_backward=True, backend=backend)
    loss.backward()
    wr = w.detach().clone().requires_grad_(True)
    F.cross_entropy(h @ wr, t).backward()
    assert_close(w.grad, wr.grad, torch.float32)

    # misuse: something else saved the logits for its backward -> error, not a wrong gradient
    leaf = torch.randn(4, 16, device=device, requires_grad=True)
    logits = leaf * 1.0
    other = (logits * logits).sum()  # saves `logits`
    loss = fusedloss.cross_entropy(logits, t, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_backward_refuses_leaf_logits_as_torch(dev_backend):
    # the forward writes the gradient over the logits: on a parameter (or a view of one) it
    # silently replaced the values an optimizer then stepped from; torch's in-place ops raise
    device, backend = dev_backend
    p = torch.nn.Parameter(torch.randn(4, 16, device=device))
    t = torch.randint(0, 16, (4,), device=device)
    for x in (p, p[:2], p.view(4, 16)):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad") as ours:
            fusedloss.cross_entropy(x, t[: x.shape[0]], inplace_backward=True, backend=backend)
        with pytest.raises(RuntimeError) as theirs:
            x.relu_()
        assert str(theirs.value).rstrip(".") in str(ours.value)
    kept = p.detach().clone()
    assert torch.equal(p.detach(), kept)
    with torch.no_grad():  # no gradient written: allowed, as torch allows it
        assert_close(fusedloss.cross_entropy(p, t, inplace_backward=True, backend=backend),
                     F.cross_entropy(kept, t), torch.float32)
    assert torch.equal(p.detach(), kept)


def test_soft_target_gradient(dev_backend):
    """Probability targets that require grad (distillation) get torch's gradient."""
    device, backend = dev_backend
    x = torch.randn(4, 6, device=device, dtype=torch.float64)
    y = torch.softmax(torch.randn(4, 6, device=device, dtype=torch.float64), 1)
    yo, yr = y.clone().requires_grad_(True), y.clone().requires_grad_(True)
    w = torch.rand(6, device=device, dtype=torch.float64)
    got = fusedloss.cross_entropy(x, yo, w, label_smoothing=0.2, backend=backend)
    expected = F.cross_entropy(x, yr, w, label_smoothing=0.2)
    assert_close(torch.autograd.grad(got, yo)[0], torch.autograd.grad(expected, yr)[0],
                 torch.float64)


def test_extreme_logits_ce(dev_backend):
    device, backend = dev_backend
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [0.0, float("-inf"), 1.0]],
                     device=device, requires_grad=True)
    t = torch.tensor([1, 2, 0], device=device)
    xr = x.detach().double().requires_grad_(True)
    got = fusedloss.cross_entropy(x, t, reduction="none", backend=backend)
    expected = F.cross_entropy(xr, t, reduction="none")
    assert_close(got, expected, torch.float32)
    got.sum().backward()
    expected.sum().backward()
    assert_close(x.grad, xr.grad, torch.float32)
