"""gradcheck / gradgradcheck of the float64 reference (the oracle itself is checked), and the
closed-form gradients the backends implement against autograd of the reference."""

import itertools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from fusedloss import reference as ref

OPTIONS = list(itertools.product(
    [False, True],  # probability targets
    [False, True],  # class weights
    [0.0, 0.3],  # label smoothing
    [0.0, 0.05],  # z-loss
    [0.0, 4.0],  # softcap
))


def _inputs(prob, weight, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(5, 6, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.softmax(torch.randn(5, 6, generator=g, dtype=torch.float64), 1) if prob else \
        torch.tensor([0, 5, -100, 2, 2])
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.1 if weight else None
    return x, t, w


@pytest.mark.parametrize("prob,weight,eps,s,cap", OPTIONS)
def test_reference_ce_gradcheck(prob, weight, eps, s, cap):
    x, t, w = _inputs(prob, weight)
    fn = lambda x: ref.softmax_ce_rows(x, t, w, -100, eps, s, cap)[0]  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("prob,weight,eps,s,cap", OPTIONS)
def test_closed_form_ce_gradient_matches_autograd(prob, weight, eps, s, cap):
    x, t, w = _inputs(prob, weight, seed=1)
    loss, lse = ref.softmax_ce_rows(x, t, w, -100, eps, s, cap)
    up = torch.rand(5, dtype=torch.float64)
    (auto,) = torch.autograd.grad(loss, x, up)
    closed = ref.softmax_ce_grad(x.detach(), t, w, up, -100, eps, s, cap)
    torch.testing.assert_close(closed, auto, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("weight,pos_weight", list(itertools.product([False, True], repeat=2)))
def test_reference_bce_gradcheck_and_closed_form(weight, pos_weight):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    y = torch.rand(4, 5, generator=g, dtype=torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64) if weight else None
    p = torch.rand(4, 1, generator=g, dtype=torch.float64) + 0.5 if pos_weight else None
    fn = lambda x: ref.sigmoid_bce_elem(x, y, w, p)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))
    up = torch.rand(4, 5, generator=g, dtype=torch.float64)
    (auto,) = torch.autograd.grad(fn(x), x, up)
    torch.testing.assert_close(ref.sigmoid_bce_grad(x.detach(), y, w, p, up), auto)


def test_public_function_gradcheck(dev_backend):
    """First-order gradcheck through the public functional on each backend (float64).

    nondet_tol: gradcheck runs backward twice on one graph; the second run recomputes the
    gradient from the saved lse instead of reusing the fused forward buffer, so the two agree to
    rounding (~1e-16), not bitwise."""
    import fusedloss

    device, backend = dev_backend
    x, t, w = _inputs(False, True, seed=3)
    x = x.detach().to(device).requires_grad_(True)
    t, w = t.to(device), w.to(device)
    for reduction in ("mean", "none"):
        assert gradcheck(lambda x, r=reduction: fusedloss.cross_entropy(
            x, t, w, reduction=r, label_smoothing=0.1, lse_square_scale=0.01,
            softcap=5.0, backend=backend), (x,), nondet_tol=1e-12)
    y = torch.rand(5, 6, dtype=torch.float64, device=device)
    assert gradcheck(lambda x: fusedloss.binary_cross_entropy_with_logits(
        x, y, pos_weight=w, backend=backend), (x,), nondet_tol=1e-12)
