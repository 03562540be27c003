"""Result dtypes, autocast and class-weight gradients of the fused linear losses, against
torch's own composition `loss(F.linear(...))` run the same way (torch is the oracle: a drop-in
must give its dtypes, and its values within float tolerance)."""

import pytest
import torch
import torch.nn.functional as tF

import fusedloss
from conftest import DEVICE_BACKENDS

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
CASES = [pytest.param(d, b, id=f"{d}-{b}") for d, b in DEVICE_BACKENDS]


def _data(n=12, h=16, c=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(c, h, generator=g) / h ** 0.5 * 2
    b = torch.randn(c, generator=g)
    t = torch.randint(0, c, (n,), generator=g)
    t[2] = -100
    y = (torch.rand(n, c, generator=g) < 0.3).float()
    return x, w, b, t, y


def _leaves(device, *ts):
    return [t.to(device).requires_grad_() for t in ts]


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("hidden_dtype", [F32, BF16], ids=str)
def test_ce_under_autocast_matches_torch(device, backend, hidden_dtype):
    # autocast runs F.linear in bf16 and cross_entropy in fp32: the same casts, an fp32 loss.
    x, w, b, t, _ = _data()
    t = t.to(device)
    ours_in = _leaves(device, x.to(hidden_dtype), w, b)
    ref_in = _leaves(device, x.to(hidden_dtype), w, b)
    with torch.autocast(device, dtype=BF16):
        ours = fusedloss.linear_cross_entropy(ours_in[0], ours_in[1], t,
                                              linear_bias=ours_in[2], backend=backend)
        ref = tF.cross_entropy(tF.linear(*ref_in), t)
    assert ours.dtype == ref.dtype == F32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for g, r, leaf in zip(_grads(ours, ours_in), _grads(ref, ref_in), ours_in, strict=True):
        assert g.dtype == r.dtype == leaf.dtype
        # bf16 matmul outputs: within two bf16 ulps of the gradients' scale
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2 * r.abs().max().item(),
                                   rtol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_bce_under_autocast_matches_torch(device, backend):
    x, w, b, _, y = _data()
    y = y.to(device)
    ours_in, ref_in = _leaves(device, x, w, b), _leaves(device, x, w, b)
    with torch.autocast(device, dtype=BF16):
        ours = fusedloss.linear_binary_cross_entropy_with_logits(
            ours_in[0], ours_in[1], y, linear_bias=ours_in[2], backend=backend)
        ref = tF.binary_cross_entropy_with_logits(tF.linear(*ref_in), y)
        ours_u8 = fusedloss.linear_binary_cross_entropy_with_logits(
            ours_in[0], ours_in[1], y.to(torch.uint8), linear_bias=ours_in[2], backend=backend)
    assert ours.dtype == ref.dtype == ours_u8.dtype == F32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_u8, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(_grads(ours, ours_in), _grads(ref, ref_in), strict=True):
        torch.testing.assert_close(g, r, atol=2e-2 * r.abs().max().item(), rtol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_ce_bf16_without_autocast_returns_bf16_as_torch(device, backend):
    x, w, b, t, _ = _data()
    args = (x.to(device, BF16), w.to(device, BF16), t.to(device))
    ours = fusedloss.linear_cross_entropy(*args, backend=backend)
    ref = tF.cross_entropy(tF.linear(args[0], args[1]), args[2])
    assert ours.dtype == ref.dtype == BF16
    exact = tF.cross_entropy(tF.linear(args[0].double(), args[1].double()), args[2])
    assert abs(ours.double() - exact) <= max(abs(ref.double() - exact), 2 ** -8 * exact)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("target_dtype,weight_dtype,want", [
    (F64, None, F64), (F32, F64, F64), (F64, F32, F64), (F32, None, F32)], ids=str)
def test_probability_target_promotes_as_torch(device, backend, target_dtype, weight_dtype,
                                              want):
    x, w, b, _, _ = _data()
    x, w = x.to(device), w.to(device)
    y = torch.softmax(torch.randn(12, 9, generator=torch.Generator().manual_seed(3)), -1)
    y = y.to(device, target_dtype)
    cw = None if weight_dtype is None else (torch.rand(9) + 0.5).to(device, weight_dtype)
    ours = fusedloss.linear_cross_entropy(x, w, y, weight=cw, backend=backend)
    ref = tF.cross_entropy(tF.linear(x, w), y, weight=cw)
    assert ours.dtype == ref.dtype == want
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_class_weight_gradient_with_probability_targets(device, backend):
    # torch differentiates the class weight for probability targets: so must we (never a
    # silently missing gradient).
    x, w, b, _, _ = _data()
    y = torch.softmax(torch.randn(12, 9, generator=torch.Generator().manual_seed(4)), -1)
    cw = torch.rand(9, generator=torch.Generator().manual_seed(5)) + 0.5
    ours_in, ref_in = _leaves(device, x, w, cw), _leaves(device, x, w, cw)
    y = y.to(device)
    ours = fusedloss.linear_cross_entropy(ours_in[0], ours_in[1], y, weight=ours_in[2],
                                          backend=backend, label_smoothing=0.1)
    ref = tF.cross_entropy(tF.linear(ref_in[0], ref_in[1]), y, weight=ref_in[2],
                           label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    for g, r in zip(_grads(ours, ours_in), _grads(ref, ref_in), strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
def test_class_weight_requires_grad_with_class_targets_raises_as_torch(device, backend):
    x, w, _, t, _ = _data()
    cw = (torch.rand(9) + 0.5).to(device).requires_grad_()
    x, w, t = x.to(device), w.to(device), t.to(device)
    with pytest.raises(RuntimeError, match="weight"):
        tF.cross_entropy(tF.linear(x, w), t, weight=cw)
    with pytest.raises(RuntimeError, match="'weight'"):
        fusedloss.linear_cross_entropy(x, w, t, weight=cw, backend=backend)
    with torch.no_grad():  # no gradient wanted: accepted, as torch does
        got = fusedloss.linear_cross_entropy(x, w, t, weight=cw, backend=backend)
        want = tF.cross_entropy(tF.linear(x, w), t, weight=cw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
