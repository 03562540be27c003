"""fusedloss.cross_entropy against torch.nn.functional.cross_entropy: values and gradients, on
every backend, over a random space of shapes and options (hypothesis) and named traps."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedloss
from conftest import example_budget
from helpers import assert_close, assert_no_worse_than_torch


@st.composite
def ce_cases(draw):
    kind = draw(st.sampled_from(["2d", "2d", "kdim", "nobatch"]))
    c = draw(st.integers(1, 9))
    if kind == "2d":
        shape = (draw(st.integers(0, 6)), c)
    elif kind == "kdim":
        shape = (draw(st.integers(1, 3)), c) + tuple(
            draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    else:
        shape = (c,)
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        prob=draw(st.booleans()),
        weight=draw(st.booleans()),
        ignore=draw(st.sampled_from(["default", "class", "other"])),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 0.7, 1.0])),
        scale=draw(st.sampled_from([1.0, 1.0, 2.5, 0.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_ce_inputs(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    c = shape[1] if len(shape) > 1 else shape[0]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    kw = {}
    if case["weight"]:
        kw["weight"] = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    if case["prob"]:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2,
                          dim=1 if len(shape) > 1 else 0).to(dtype)
    else:
        tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
        t = torch.randint(0, c, tshape, generator=g)
        ii = {"default": -100, "class": int(torch.randint(0, c, (), generator=g)),
              "other": 12345}[case["ignore"]]
        if case["ignore"] != "class":
            mask = torch.rand(tshape, generator=g) < case["ignore_frac"]
            t = torch.where(mask, torch.full_like(t, ii), t)
        if ii != -100:
            kw["ignore_index"] = ii
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    return x.to(device), t.to(device), kw


def check_ce(case, device, backend):
    x, t, kw = make_ce_inputs(case, device)
    kw.update(reduction=case["reduction"], label_smoothing=case["smoothing"])
    xr = x.detach().clone().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(xr, t, **kw)
    got = fusedloss.cross_entropy(xo, t, **kw, backend=backend)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert_close(got, expected, case["dtype"], f"loss {case}")
    if x.numel() == 0:
        return
    g = torch.full_like(expected, case["scale"]) if expected.dim() == 0 else \
        torch.rand(expected.shape, generator=torch.Generator().manual_seed(1),
                   dtype=expected.dtype).to(device) * case["scale"]
    (gr,) = torch.autograd.grad(expected, xr, g)
    (go,) = torch.autograd.grad(got, xo, g)
    assert_close(go, gr, case["dtype"], f"grad {case}")


def test_ce_parity_random(dev_backend):
    device, backend = dev_backend

    @settings(max_examples=example_budget(device, backend, 120))
    @given(case=ce_cases())
    def run(case):
        check_ce(case, device, backend)

    run()


# Named traps, each a reason to exist.
NAMED = [
    # all rows ignored: mean is 0/0 = NaN like torch; gradient exactly 0
    dict(shape=(4, 5), prob=False, weight=False, ignore="default", ignore_frac=1.0,
         reduction="mean", smoothing=0.0),
    # same with smoothing and weights (torch's smoothing path has its own denominator)
    dict(shape=(4, 5), prob=False, weight=True, ignore="default", ignore_frac=1.0,
         reduction="mean", smoothing=0.2),
    # ignore_index equal to a valid class
    dict(shape=(8, 6), prob=False, weight=True, ignore="class", ignore_frac=0.0,
         reduction="mean", smoothing=0.3),
    # empty batch: mean is NaN, sum 0, none empty
    dict(shape=(0, 5), prob=False, weight=False, ignore="default", ignore_frac=0.0,
         reduction="mean", smoothing=0.0),
    dict(shape=(0, 5), prob=True, weight=False, ignore="default", ignore_frac=0.0,
         reduction="mean", smoothing=0.0),
    # K-dim input, probability targets with weights and smoothing
    dict(shape=(2, 4, 3, 2), prob=True, weight=True, ignore="default", ignore_frac=0.0,
         reduction="mean", smoothing=0.2),
    # one class: log-softmax is 0 everywhere
    dict(shape=(5, 1), prob=False, weight=False, ignore="default", ignore_frac=0.0,
         reduction="sum", smoothing=0.5),
    # no-batch input (C,)
    dict(shape=(7,), prob=False, weight=True, ignore="default", ignore_frac=0.0,
         reduction="none", smoothing=0.1),
    # vocab larger than any single block a kernel might use (not a power of two)
    dict(shape=(3, 1537), prob=False, weight=True, ignore="default", ignore_frac=0.3,
         reduction="mean", smoothing=0.1),
]


@pytest.mark.parametrize("case", NAMED, ids=[str(i) for i in range(len(NAMED))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ce_parity_named(dev_backend, case, dtype):
    device, backend = dev_backend
    check_ce(dict(case, dtype=dtype, seed=7, scale=1.0), device, backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_low_precision(dev_backend, dtype, reduction):
    """bf16/fp16: no further from the float64 answer than torch's own low-precision result."""
    device, backend = dev_backend
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(16, 300, generator=g, dtype=torch.float64) * 4
    t = torch.randint(0, 300, (16,), generator=g)
    x = x64.to(dtype).to(device)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    x64 = x.double().requires_grad_(True)
    t = t.to(device)
    ref = F.cross_entropy(x64, t, reduction=reduction, label_smoothing=0.1)
    low = F.cross_entropy(xs[0], t, reduction=reduction, label_smoothing=0.1)
    ours = fusedloss.cross_entropy(xs[1], t, reduction=reduction, label_smoothing=0.1,
                                   backend=backend)
    assert ours.dtype == dtype
    assert_no_worse_than_torch(ours, low, ref, msg="loss")
    up = torch.ones_like(ref)
    (g64,) = torch.autograd.grad(ref, x64, up)
    (gl,) = torch.autograd.grad(low, xs[0], up.to(dtype))
    (go,) = torch.autograd.grad(ours, xs[1], up.to(dtype))
    assert go.dtype == dtype
    assert_no_worse_than_torch(go, gl, g64, msg="grad")


def test_ce_legacy_args(dev_backend):
    device, backend = dev_backend
    x = torch.randn(4, 5, device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    for sa, rd in [(False, None), (None, False), (True, True)]:
        with pytest.warns(UserWarning):
            expected = F.cross_entropy(x, t, size_average=sa, reduce=rd)
        with pytest.warns(UserWarning):
            got = fusedloss.cross_entropy(x, t, size_average=sa, reduce=rd, backend=backend)
        assert_close(got, expected, torch.float32)


def test_ce_uint8_target(dev_backend):
    device, backend = dev_backend
    x = torch.randn(6, 5, device=device)
    t = torch.tensor([0, 1, 2, 3, 4, 0], dtype=torch.uint8, device=device)
    assert_close(fusedloss.cross_entropy(x, t, backend=backend), F.cross_entropy(x, t),
                 torch.float32)


def test_ce_prob_target_mixed_dtype(dev_backend):
    """torch promotes input and probability target: float32 input, float64 target -> float64."""
    device, backend = dev_backend
    x = torch.randn(3, 4, device=device)
    y = torch.softmax(torch.randn(3, 4, dtype=torch.float64, device=device), 1)
    got = fusedloss.cross_entropy(x, y, backend=backend)
    expected = F.cross_entropy(x, y)
    assert got.dtype == expected.dtype == torch.float64
    assert_close(got, expected, torch.float32)


def test_ce_noncontiguous_and_module(dev_backend):
    device, backend = dev_backend
    base = torch.randn(5, 12, device=device)
    x = base[:, ::2]  # class stride 2
    t = torch.tensor([0, 5, 3, 1, 2], device=device)
    w = torch.rand(6, device=device)
    mod = fusedloss.CrossEntropyLoss(w, label_smoothing=0.2, backend=backend)
    ref = torch.nn.CrossEntropyLoss(w, label_smoothing=0.2)
    assert_close(mod(x, t), ref(x, t), torch.float32)
    xt = base.t()  # row stride 1, class stride 12 -> copied once
    t2 = torch.randint(0, 5, (12,), device=device)
    assert_close(fusedloss.cross_entropy(xt, t2, backend=backend), F.cross_entropy(xt, t2),
                 torch.float32)
