"""fusedloss.binary_cross_entropy_with_logits against torch: values and gradients, every backend."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedloss
from conftest import example_budget
from helpers import assert_close, assert_no_worse_than_torch


@st.composite
def bce_cases(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        weight=draw(st.sampled_from([None, "full", "last", "row"])),
        pos_weight=draw(st.sampled_from([None, "last", "full"])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        soft=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 3.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def _bshape(shape, kind):
    """A shape that broadcasts to `shape`: the full shape, the last dim only, or the rows."""
    if kind == "full" or not shape:
        return shape
    if kind == "last":
        return shape[-1:]
    return shape[:-1] + (1,)


def make_bce_inputs(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    y = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (y if case["soft"] else (y > 0.5).double()).to(dtype)
    kw = {}
    for name in ("weight", "pos_weight"):
        if case[name] is not None:
            kw[name] = (torch.rand(_bshape(shape, case[name]), generator=g,
                                   dtype=torch.float64) * 2).to(dtype).to(device)
    return x.to(device), y.to(device), kw


def check_bce(case, device, backend):
    x, y, kw = make_bce_inputs(case, device)
    xr = x.clone().requires_grad_(True)
    xo = x.clone().requires_grad_(True)
    expected = F.binary_cross_entropy_with_logits(xr, y, reduction=case["reduction"], **kw)
    got = fusedloss.binary_cross_entropy_with_logits(xo, y, reduction=case["reduction"], **kw,
                                                     backend=backend)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert_close(got, expected, case["dtype"], f"loss {case}")
    if x.numel() == 0:
        return
    up = torch.rand(expected.shape, generator=torch.Generator().manual_seed(2),
                    dtype=expected.dtype).to(device) * case["scale"]
    (gr,) = torch.autograd.grad(expected, xr, up)
    (go,) = torch.autograd.grad(got, xo, up)
    assert_close(go, gr, case["dtype"], f"grad {case}")


def test_bce_parity_random(dev_backend):
    device, backend = dev_backend

    @settings(max_examples=example_budget(device, backend, 120))
    @given(case=bce_cases())
    def run(case):
        check_bce(case, device, backend)

    run()


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8])
def test_bce_bool_uint8_targets(dev_backend, target_dtype):
    """Extension: bool/uint8 targets (torch rejects them) equal the float-target result."""
    device, backend = dev_backend
    x = torch.randn(7, 33, device=device, requires_grad=True)
    y = torch.rand(7, 33, device=device) > 0.4
    pw = torch.rand(33, device=device) + 0.5
    expected = F.binary_cross_entropy_with_logits(x, y.float(), pos_weight=pw)
    got = fusedloss.binary_cross_entropy_with_logits(x, y.to(target_dtype), pos_weight=pw,
                                                     backend=backend)
    assert got.dtype == torch.float32
    assert_close(got, expected, torch.float32)
    (ge,) = torch.autograd.grad(expected, x)
    (gg,) = torch.autograd.grad(got, x)
    assert_close(gg, ge, torch.float32)


def test_bce_extreme_logits(dev_backend):
    """Stable for |x| up to 1e4: no inf/NaN, equal to the float64 formula."""
    device, backend = dev_backend
    x = torch.tensor([[-1e4, -50.0, -1e-3, 0.0, 1e-3, 50.0, 1e4]], device=device,
                     requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0]], device=device)
    got = fusedloss.binary_cross_entropy_with_logits(x, y, reduction="none", backend=backend)
    expected = F.binary_cross_entropy_with_logits(x.double(), y.double(), reduction="none")
    assert torch.isfinite(got).all()
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bce_low_precision(dev_backend, dtype):
    device, backend = dev_backend
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 40, generator=g) * 3).to(dtype).to(device)
    y = (torch.rand(64, 40, generator=g) > 0.5).to(dtype).to(device)
    x64 = x.double().requires_grad_(True)
    xl, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = F.binary_cross_entropy_with_logits(x64, y.double())
    low = F.binary_cross_entropy_with_logits(xl, y)
    ours = fusedloss.binary_cross_entropy_with_logits(xo, y, backend=backend)
    assert ours.dtype == dtype
    assert_no_worse_than_torch(ours, low, ref, msg="loss")
    assert_no_worse_than_torch(torch.autograd.grad(ours, xo)[0], torch.autograd.grad(low, xl)[0],
                               torch.autograd.grad(ref, x64)[0], msg="grad")


def test_bce_module_and_legacy(dev_backend):
    device, backend = dev_backend
    x = torch.randn(4, 6, device=device)
    y = torch.rand(4, 6, device=device)
    w = torch.rand(6, device=device)
    pw = torch.rand(4, 1, device=device) + 0.5
    mod = fusedloss.BCEWithLogitsLoss(w, reduction="sum", pos_weight=pw, backend=backend)
    assert_close(mod(x, y), torch.nn.BCEWithLogitsLoss(w, reduction="sum", pos_weight=pw)(x, y),
                 torch.float32)
    with pytest.warns(UserWarning):
        got = fusedloss.binary_cross_entropy_with_logits(x, y, reduce=False, backend=backend)
    assert_close(got, F.binary_cross_entropy_with_logits(x, y, reduction="none"), torch.float32)


def test_bce_mixed_target_dtype(dev_backend):
    """torch's result dtype follows the target: bf16 logits + fp32 target -> fp32."""
    device, backend = dev_backend
    x = torch.randn(3, 5, device=device).bfloat16()
    y = torch.rand(3, 5, device=device)
    got = fusedloss.binary_cross_entropy_with_logits(x, y, backend=backend)
    expected = F.binary_cross_entropy_with_logits(x, y)
    assert got.dtype == expected.dtype
    # torch computes softplus of the bf16 input in bf16; compare both to float64
    ref = F.binary_cross_entropy_with_logits(x.double(), y.double())
    assert_no_worse_than_torch(got, expected, ref, factor=1.0, floor=1e-6)
