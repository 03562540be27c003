"""Incoming gradients other than 1: fp16 with a GradScaler's loss scale, batched incoming
gradients (autograd.grad(is_grads_batched=True)). torch is the oracle, float64 the truth."""

import pytest
import torch
import torch.nn.functional as tF

import fusedloss
from conftest import DEVICE_BACKENDS

CASES = [pytest.param(d, b, id=f"{d}-{b}") for d, b in DEVICE_BACKENDS]
F64 = torch.float64


def _rel_l2(a, b):
    return ((a.to(F64) - b).norm() / b.norm()).item()


def _losses(kind, backend):
    if kind == "ce":
        return (lambda z, t: fusedloss.cross_entropy(z, t, backend=backend),
                lambda z, t: tF.cross_entropy(z, t))
    return (lambda z, t: fusedloss.binary_cross_entropy_with_logits(z, t, backend=backend),
            lambda z, t: tF.binary_cross_entropy_with_logits(z, t))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["ce", "bce"])
@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
def test_fp16_gradient_with_a_loss_scale_rounds_once(device, backend, kind, linear):
    # GradScaler: (loss * 65536).backward() under fp16 autocast. The gradient must be the
    # whole scale times d(loss)/dz, rounded once to fp16 as torch does; pre-scaled by 1/N and
    # stored in fp16 before the 65536 came in, it fell into fp16's subnormals (BCE: relative
    # error 6.7e-2 against torch's 2e-4, thousands of entries flushed to 0).
    g = torch.Generator().manual_seed(0)
    n, h, c = 256, 32, 128
    x = torch.randn(n, h, generator=g).to(device)
    w = (torch.randn(c, h, generator=g) / h ** 0.5 * 3).to(device)
    if kind == "ce":
        t = torch.randint(0, c, (n,), generator=g).to(device)
    else:
        t = (torch.rand(n, c, generator=g) < 0.01).float().to(device)
    ours, theirs = _losses(kind, backend)
    scale = 65536.0

    def run(fn, linear_fn):
        xx = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.float16):
            loss = linear_fn(xx) if linear else fn(tF.linear(xx, w), t)
        (loss * scale).backward()
        return xx.grad

    if linear:
        lin = fusedloss.linear_cross_entropy if kind == "ce" else \
            fusedloss.linear_binary_cross_entropy_with_logits
        got = run(None, lambda xx: lin(xx, w, t, backend=backend, chunk_size=96))
    else:
        got = run(ours, None)
    want = run(theirs, lambda xx: theirs(tF.linear(xx, w), t))
    exact = x.to(F64).requires_grad_()
    (theirs(tF.linear(exact, w.half().to(F64)), t.to(F64) if kind == "bce" else t) * scale
     ).backward()
    err, torch_err = _rel_l2(got, exact.grad), _rel_l2(want, exact.grad)
    assert err <= 1.5 * torch_err + 1e-6, (err, torch_err)


@pytest.mark.parametrize("device,backend", CASES)
def test_torch_backend_scales_fp16_in_fp32(device, backend):
    # the reference's scale_grad_ cast 65536 to fp16 (inf): every gradient entry non-finite
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g).to(device)
    t = torch.randint(0, 6, (8,), generator=g).to(device)
    ops = fusedloss._backend.get(backend, torch.device(device)).ops
    grad = torch.full((8, 6), 1e-3, dtype=torch.float16, device=device)
    ops.scale_grad_(grad, torch.tensor(65536.0, device=device))
    torch.testing.assert_close(grad, torch.full_like(grad, 65.5625), rtol=0, atol=0)
    xx = x.half().requires_grad_()
    with torch.autocast(device, dtype=torch.float16):
        loss = fusedloss.cross_entropy(xx, t, backend=backend)
    (loss * 65536).backward()
    assert torch.isfinite(xx.grad).all()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["ce", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batched_incoming_gradients(device, backend, kind, reduction):
    # autograd.grad(is_grads_batched=True) / jacobian(vectorize=True): the fused gradient's
    # in-place scaling had no batching rule
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g, dtype=F64).to(device)
    t = torch.randint(0, 5, (4,), generator=g).to(device) if kind == "ce" else \
        torch.rand(4, 5, generator=g, dtype=F64).to(device)
    fn = fusedloss.cross_entropy if kind == "ce" else fusedloss.binary_cross_entropy_with_logits
    tfn = tF.cross_entropy if kind == "ce" else tF.binary_cross_entropy_with_logits
    v = torch.tensor([1.0, -2.0, 0.5], dtype=F64, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, = torch.autograd.grad(fn(xa, t, reduction=reduction, backend=backend), xa, v,
                               is_grads_batched=True)
    want, = torch.autograd.grad(tfn(xb, t, reduction=reduction), xb, v, is_grads_batched=True)
    torch.testing.assert_close(got, want)
