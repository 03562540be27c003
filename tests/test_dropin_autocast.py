"""torch.autocast: torch runs both losses in fp32 and returns fp32; so do we (on every backend),
with the same values and gradients, an fp32 class weight / target accepted as they are, and
no fp32 copy of the fp16/bf16 logits (the kernels upcast while reading)."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from helpers import assert_close, assert_no_worse_than_torch

R, C = 6, 9
LOW = [torch.bfloat16, torch.float16]
# Under autocast both sides compute in fp32 from the same fp16/bf16 logits: the losses agree to
# fp32 accuracy; gradients are rounded once to the logits' dtype, so they may differ by one ulp
# of that dtype where the fp32 values straddle a rounding boundary.
GRAD_TOL = {torch.bfloat16: dict(atol=1e-5, rtol=2 ** -7), torch.float16: dict(atol=1e-6,
                                                                              rtol=2 ** -10)}


def _logits(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(R, C, generator=g)).to(device, dtype).requires_grad_()


def _run(fn, x, device, dtype):
    with torch.autocast(device, dtype=dtype):
        loss = fn(x)
    (loss if loss.dim() == 0 else loss.sum()).backward()
    return loss, x.grad


def _compare(ours, theirs, device, dtype):
    if device == "cpu" and dtype == torch.float16 and not _cpu_autocast_fp16():
        pytest.skip("this torch build has no CPU autocast for float16")
    x1, x2 = _logits(device, dtype), _logits(device, dtype)
    loss, g = _run(ours, x1, device, dtype)
    want, want_g = _run(theirs, x2, device, dtype)
    assert loss.dtype == want.dtype == torch.float32
    assert_close(loss, want, torch.float32)
    assert g.dtype == want_g.dtype == dtype
    torch.testing.assert_close(g.float(), want_g.float(), **GRAD_TOL[dtype])


def _cpu_autocast_fp16():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return F.cross_entropy(torch.randn(2, 3, dtype=torch.float16),
                                   torch.tensor([0, 1])).dtype == torch.float32
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["plain", "fp32_weight", "smooth_none", "fp32_prob_target"])
def test_cross_entropy_under_autocast(dev_backend, dtype, kind):
    device, backend = dev_backend
    t = torch.randint(0, C, (R,), device=device)
    w = torch.linspace(0.5, 2.0, C, device=device)
    y = torch.softmax(torch.randn(R, C, device=device), -1)
    kw, tgt = {"plain": ({}, t), "fp32_weight": ({"weight": w}, t),
               "smooth_none": ({"label_smoothing": 0.1, "reduction": "none"}, t),
               "fp32_prob_target": ({"weight": w}, y)}[kind]
    _compare(lambda x: fusedloss.cross_entropy(x, tgt, **kw, backend=backend),
             lambda x: F.cross_entropy(x, tgt, **kw), device, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["fp32_target_pos_weight", "low_target_none", "weight_sum"])
def test_bce_under_autocast(dev_backend, dtype, kind):
    device, backend = dev_backend
    y = torch.rand(R, C, device=device)
    pw = torch.linspace(0.5, 2.0, C, device=device)
    kw, tgt = {"fp32_target_pos_weight": ({"pos_weight": pw}, y),
               "low_target_none": ({"reduction": "none"}, y.to(dtype)),
               "weight_sum": ({"weight": pw, "reduction": "sum"}, y)}[kind]
    _compare(lambda x: fusedloss.binary_cross_entropy_with_logits(x, tgt, **kw, backend=backend),
             lambda x: F.binary_cross_entropy_with_logits(x, tgt, **kw), device, dtype)


def test_autocast_mixed_precision_step_matches_torch(dev_backend):
    """The standard recipe: a Linear under autocast, an fp32 class weight, loss.backward().
    Parameter gradients are as close to the float64 computation as torch's own."""
    device, backend = dev_backend
    runs = {}
    for name, fn, cast in (
            ("ours", lambda o, t, w: fusedloss.CrossEntropyLoss(w, backend=backend)(o, t), True),
            ("torch", lambda o, t, w: torch.nn.CrossEntropyLoss(w)(o, t), True),
            ("fp64", lambda o, t, w: torch.nn.CrossEntropyLoss(w.double())(o, t), False)):
        torch.manual_seed(0)
        lin = torch.nn.Linear(8, C).to(device)
        h = torch.randn(R, 8, device=device)
        t = torch.randint(0, C, (R,), device=device)
        w = torch.rand(C, device=device) + 0.5
        if not cast:
            lin, h = lin.double(), h.double()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cast):
            loss = fn(lin(h), t, w)
        loss.backward()
        runs[name] = (loss.detach(), lin.weight.grad, lin.bias.grad)
    assert runs["ours"][0].dtype == runs["torch"][0].dtype == torch.float32
    for ours, theirs, ref in zip(runs["ours"], runs["torch"], runs["fp64"], strict=True):
        assert_no_worse_than_torch(ours, theirs, ref, floor=1e-4)


def test_no_fp32_copy_of_the_logits(dev_backend):
    """The op receives the bf16 logits themselves (same storage), not an upcast copy."""
    device, backend = dev_backend
    from fusedloss import _backend
    ops = _backend.get(backend, torch.device(device)).ops
    seen = []
    original = ops.softmax_ce_fwd

    def spy(logits, *a):
        seen.append((logits.dtype, logits.data_ptr()))
        return original(logits, *a)

    x = _logits(device, torch.bfloat16)
    t = torch.randint(0, C, (R,), device=device)
    ops.softmax_ce_fwd = spy
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = fusedloss.cross_entropy(x, t, torch.ones(C, device=device), backend=backend)
    finally:
        ops.softmax_ce_fwd = original
    assert loss.dtype == torch.float32
    assert seen == [(torch.bfloat16, x.data_ptr())]
