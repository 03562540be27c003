"""Autograd as existing training code uses it, on every backend, against torch.nn.functional:
.backward() into a leaf, retain_graph, double backward (gradient penalties), gradcheck and
gradgradcheck, gradients of probability targets and class weights."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from helpers import assert_close

R, C = 5, 7
F64 = torch.float64


def _ce_inputs(device, prob=False, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(R, C, generator=g, dtype=dtype)).to(device).requires_grad_()
    if prob:
        t = torch.softmax(torch.randn(R, C, generator=g, dtype=dtype), -1).to(device)
    else:
        t = torch.randint(0, C, (R,), generator=g).to(device)
        t[1] = -100
    return x, t


# (id, ours(x, t, backend), torch's(x, t), probability target?)
def _w(like):
    return torch.linspace(0.5, 2.0, C, dtype=like.dtype, device=like.device)


CASES = [
    ("ce_mean", lambda x, t, b: fusedloss.cross_entropy(x, t, backend=b),
     lambda x, t: F.cross_entropy(x, t), False),
    ("ce_sum_weight_smooth", lambda x, t, b: fusedloss.cross_entropy(
        x, t, _w(x), reduction="sum", label_smoothing=0.2, backend=b),
     lambda x, t: F.cross_entropy(x, t, _w(x), reduction="sum", label_smoothing=0.2),
     False),
    ("ce_none", lambda x, t, b: fusedloss.cross_entropy(x, t, reduction="none", backend=b),
     lambda x, t: F.cross_entropy(x, t, reduction="none"), False),
    ("ce_prob_weight", lambda x, t, b: fusedloss.cross_entropy(x, t, _w(x), backend=b),
     lambda x, t: F.cross_entropy(x, t, _w(x)), True),
    ("bce_mean_pos_weight", lambda x, t, b: fusedloss.binary_cross_entropy_with_logits(
        x, t, pos_weight=_w(x), backend=b),
     lambda x, t: F.binary_cross_entropy_with_logits(x, t, pos_weight=_w(x)), True),
    ("bce_none_weight", lambda x, t, b: fusedloss.binary_cross_entropy_with_logits(
        x, t, _w(x), reduction="none", backend=b),
     lambda x, t: F.binary_cross_entropy_with_logits(x, t, _w(x), reduction="none"),
     True),
]
IDS = [c[0] for c in CASES]


def _scalar(loss):
    return loss if loss.dim() == 0 else (loss * torch.arange(1, loss.numel() + 1, dtype=loss.dtype,
                                                             device=loss.device)
                                         .reshape(loss.shape)).sum()


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:5], ids=IDS[:2] + IDS[4:5])
def test_backward_into_leaf_adopts_the_fused_gradient(dev_backend, case):
    """AccumulateGrad steals the gradient buffer only when nothing else references it; a
    reference kept on ctx makes it copy the whole logits-sized gradient."""
    device, backend = dev_backend
    _, ours, _, prob = case
    x, t = _ce_inputs(device, prob, torch.float32)
    arrived = []
    x.register_hook(lambda g: arrived.append(g.data_ptr()))
    ours(x, t, backend).backward()
    assert x.grad.data_ptr() == arrived[0], "x.grad is a copy of the gradient backward returned"


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:5], ids=IDS[:2] + IDS[4:5])
def test_fused_backward_creates_no_logits_sized_tensor(dev_backend, case):
    """For mean/sum the gradient exists after the forward; backward must not write another
    (R, C) tensor, e.g. the zero gradients autograd fills for the Function's other outputs
    unless it is told not to."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view or func._schema.is_mutable:  # an alias, or written in place
                return out
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.numel() >= R * C:
                    self.big.append(str(func))
            return out

    device, backend = dev_backend
    _, ours, _, prob = case
    x, t = _ce_inputs(device, prob, torch.float32)
    loss = ours(x, t, backend)
    with Sizes() as mode:
        loss.backward()
    assert mode.big == [], mode.big


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_retain_graph_second_backward(dev_backend, case):
    device, backend = dev_backend
    _, ours, theirs, prob = case
    x, t = _ce_inputs(device, prob)
    loss = _scalar(ours(x, t, backend))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    xr = x.detach().clone().requires_grad_()
    _scalar(theirs(xr, t)).backward()
    assert_close(first, xr.grad, F64)
    assert_close(x.grad, 2 * xr.grad, F64)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_penalty_double_backward(dev_backend, case):
    """loss + |d loss / d x|^2, differentiated again: the second-order term must be there."""
    device, backend = dev_backend
    _, ours, theirs, prob = case

    def penalty_grad(fn, x, t):
        loss = _scalar(fn(x, t))
        g, = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(loss + g.pow(2).sum(), x)[0]

    x, t = _ce_inputs(device, prob)
    got = penalty_grad(lambda a, b: ours(a, b, backend), x, t)
    want = penalty_grad(theirs, x, t)
    assert_close(got, want, F64)


GRADCHECK = [CASES[i] for i in (0, 1, 3, 4)]  # the reduced losses: first backward is fused


@pytest.mark.parametrize("case", GRADCHECK, ids=[c[0] for c in GRADCHECK])
def test_gradcheck_and_gradgradcheck(dev_backend, case):
    """torch.autograd.gradcheck with its defaults (nondet_tol=0: the reentrancy check wants a
    retain_graph backward bitwise equal to the first, fused one), then gradgradcheck."""
    device, backend = dev_backend
    _, ours, _, prob = case
    x, t = _ce_inputs(device, prob)
    x = x.detach()[:3].requires_grad_()
    t = t[:3]
    fn = lambda a: _scalar(ours(a, t, backend))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


def test_probability_target_and_weight_gradients(dev_backend):
    """torch differentiates cross_entropy with probability targets in the target and in the
    class weight; so do we."""
    device, backend = dev_backend
    x, t = _ce_inputs(device, prob=True)
    grads = []
    for fn in (lambda *a: fusedloss.cross_entropy(*a, label_smoothing=0.1, backend=backend),
               lambda *a: F.cross_entropy(*a, label_smoothing=0.1)):
        xi = x.detach().clone().requires_grad_()
        ti = t.clone().requires_grad_()
        wi = _w(x).requires_grad_()
        fn(xi, ti, wi).backward()
        grads.append((xi.grad, ti.grad, wi.grad))
    for got, want in zip(*grads, strict=True):
        assert_close(got, want, F64)


@pytest.mark.parametrize("kind", ["ce_index", "bce_weight", "bce_pos_weight"])
def test_weight_requiring_grad_raises_like_torch(dev_backend, kind):
    device, backend = dev_backend
    x, t = _ce_inputs(device, prob=kind != "ce_index")
    w = _w(x).requires_grad_()
    if kind == "ce_index":
        calls = [lambda m: m.cross_entropy(x, t, w)]
    else:
        key = "weight" if kind == "bce_weight" else "pos_weight"
        calls = [lambda m: m.binary_cross_entropy_with_logits(x, t, **{key: w})]
    with pytest.raises(RuntimeError):
        calls[0](F)
    with pytest.raises(RuntimeError, match="weight"):
        calls[0](_Ours(backend))
    with torch.no_grad():  # no graph, no error (torch neither)
        assert_close(calls[0](_Ours(backend)), calls[0](F), F64)


class _Ours:
    def __init__(self, backend):
        self.backend = backend

    def cross_entropy(self, *a, **k):
        return fusedloss.cross_entropy(*a, **k, backend=self.backend)

    def binary_cross_entropy_with_logits(self, *a, **k):
        return fusedloss.binary_cross_entropy_with_logits(*a, **k, backend=self.backend)


def test_inplace_backward_refuses_create_graph(dev_backend):
    """The logits were overwritten by the gradient: a differentiable backward cannot be formed
    from them, so it raises instead of differentiating the gradient's values."""
    device, backend = dev_backend
    x, t = _ce_inputs(device, dtype=torch.float32)
    h = x * 1.0
    loss = fusedloss.cross_entropy(h, t, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        torch.autograd.grad(loss, x, create_graph=True)
