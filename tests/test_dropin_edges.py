"""Drop-in edges a user's existing code meets: soft labels with a negative ignore_index, modules
built on the meta device or under a FakeTensorMode, torch's loss base classes, empty shapes,
the deprecated reduction name, -inf logits with smoothed soft labels, and long BCE rows.
torch.nn / torch.nn.functional is the oracle (float64 where values are compared)."""

import warnings

import pytest
import torch
import torch.nn.functional as tF
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import fusedloss
from conftest import DEVICE_BACKENDS

CASES = [pytest.param(d, b, id=f"{d}-{b}") for d, b in DEVICE_BACKENDS]
F64 = torch.float64


@pytest.mark.parametrize("device,backend", CASES)
def test_soft_labels_with_a_negative_ignore_index(device, backend):
    # torch refuses only ignore_index >= 0 with probability targets (mixup + ignore_index=-1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=F64).to(device)
    p = torch.softmax(torch.randn(4, 3, generator=g, dtype=F64), 1).to(device)
    w = torch.randn(3, 5, generator=g, dtype=F64).to(device)
    h = torch.randn(4, 5, generator=g, dtype=F64).to(device)
    for ii in (-1, -7):
        torch.testing.assert_close(
            fusedloss.cross_entropy(x, p, ignore_index=ii, backend=backend),
            tF.cross_entropy(x, p, ignore_index=ii))
        torch.testing.assert_close(
            fusedloss.linear_cross_entropy(h, w, p, ignore_index=ii, backend=backend),
            tF.cross_entropy(tF.linear(h, w), p, ignore_index=ii))
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        tF.cross_entropy(x, p, ignore_index=0)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        fusedloss.cross_entropy(x, p, ignore_index=0, backend=backend)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        fusedloss.linear_cross_entropy(h, w, p, ignore_index=0, backend=backend)


def test_modules_are_torch_losses_and_build_on_meta():
    # trainers check isinstance(criterion, nn.modules.loss._Loss); models built on the meta
    # device (then materialised) construct their loss with a meta weight
    meta = torch.ones(3, device="meta")
    ce = fusedloss.CrossEntropyLoss(weight=meta)
    bce = fusedloss.BCEWithLogitsLoss(weight=meta, pos_weight=meta)
    torch.nn.CrossEntropyLoss(weight=meta)  # torch accepts it too
    assert isinstance(ce, torch.nn.modules.loss._WeightedLoss)
    assert isinstance(bce, torch.nn.modules.loss._Loss)
    assert ce.weight.device.type == "meta" and ce.reduction == "mean"
    ce.to_empty(device="cpu")
    assert ce.weight.device.type == "cpu" and list(ce.state_dict()) == ["weight"]
    lin = fusedloss.LinearCrossEntropyLoss(weight=meta)
    assert lin.weight.device.type == "meta"
    with pytest.raises(ValueError, match="NaN"):  # a real weight is still checked
        fusedloss.CrossEntropyLoss(weight=torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_fake_tensor_mode_propagates_shapes(backend):
    # FakeTensorMode (torch.export, FSDP's tracing) has no data: the value checks step aside
    with FakeTensorMode():
        x = torch.randn(4, 3)
        t = torch.randint(0, 3, (4,))
        w = torch.ones(3)
        ce = fusedloss.cross_entropy(x, t, weight=w, backend=backend)
        ce_none = fusedloss.CrossEntropyLoss(weight=w, reduction="none", backend=backend)(x, t)
        bce = fusedloss.binary_cross_entropy_with_logits(x, torch.rand(4, 3), pos_weight=w,
                                                         backend=backend)
        want = tF.cross_entropy(x, t, weight=w, reduction="none")
    assert ce.shape == () and bce.shape == () and ce.dtype == torch.float32
    assert ce_none.shape == want.shape == (4,)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_shapes_as_torch(device, backend):
    # an empty strided view and soft labels over zero classes gave internal errors
    x = torch.randn(0, 10, device=device)[:, ::2]
    t = torch.zeros(0, dtype=torch.long, device=device)
    torch.testing.assert_close(fusedloss.cross_entropy(x, t, backend=backend),
                               tF.cross_entropy(x, t), equal_nan=True)
    x = torch.randn(2, 0, device=device, dtype=F64, requires_grad=True)
    p = torch.randn(2, 0, device=device, dtype=F64)
    for red in ("none", "sum"):
        got = fusedloss.cross_entropy(x, p, reduction=red, backend=backend)
        torch.testing.assert_close(got, tF.cross_entropy(x, p, reduction=red))
    assert torch.autograd.grad(got, x)[0].shape == (2, 0)


@pytest.mark.parametrize("device,backend", CASES)
def test_elementwise_mean_is_mean_with_torchs_warning(device, backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g).to(device)
    t = torch.randint(0, 4, (5,), generator=g).to(device)
    for fn, tfn, tgt in ((fusedloss.cross_entropy, tF.cross_entropy, t),
                         (fusedloss.binary_cross_entropy_with_logits,
                          tF.binary_cross_entropy_with_logits, torch.rand(5, 4).to(device))):
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            got = fn(x, tgt, reduction="elementwise_mean", backend=backend)
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            want = tfn(x, tgt, reduction="elementwise_mean")
        torch.testing.assert_close(got, want)
        assert {str(w.message) for w in theirs} <= {str(w.message) for w in ours}
    with pytest.raises(ValueError, match="reduction"):
        fusedloss.cross_entropy(x, t, reduction="elementwise_sum", backend=backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_minus_inf_logit_with_soft_labels(device, backend, smoothing):
    # a masked class (-inf logit, target 0): torch's loss is +inf with smoothing (every class
    # then has a positive target) and NaN without (0 * -inf); the gradient is finite
    x = torch.tensor([[-float("inf"), 0.0, 1.0], [0.5, -float("inf"), 2.0]], device=device)
    p = torch.tensor([[0.0, 0.5, 0.5], [0.25, 0.0, 0.75]], device=device)
    for red in ("none", "mean"):
        xs = x.clone().requires_grad_()
        xt = x.clone().requires_grad_()
        got = fusedloss.cross_entropy(xs, p, label_smoothing=smoothing, reduction=red,
                                      backend=backend)
        want = tF.cross_entropy(xt, p, label_smoothing=smoothing, reduction=red)
        torch.testing.assert_close(got, want, equal_nan=True)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(xs.grad, xt.grad)


@pytest.mark.parametrize("device,backend", CASES)
def test_bce_sum_over_a_long_row_is_accurate(device, backend):
    # extreme multi-label rows: the fp32 row sum stays within a few 1e-7 of float64. One
    # vector accumulator per row (8 lanes of 65536 sequential fp32 adds) gives 6.4e-6 on this
    # data (emulated in numpy); torch's cascade sum and the per-block double sum 1.8e-8
    g = torch.Generator().manual_seed(4)
    n = 1 << 19
    z = (torch.randn(1, n, generator=g) * 3).to(device)
    y = (torch.rand(1, n, generator=g) < 0.01).float().to(device)
    want = tF.binary_cross_entropy_with_logits(z.to(F64), y.to(F64), reduction="sum")
    got = fusedloss.binary_cross_entropy_with_logits(z, y, reduction="sum", backend=backend)
    assert abs(got.item() / want.item() - 1) < 3e-7


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_weights_are_differentiable_under_torch_func(device, backend, reduction):
    # torch.func differentiates torch's BCE in weight and pos_weight (eager torch refuses):
    # the jvp along them was silently 0 here, and grad / jacrev raised
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 5, generator=g, dtype=F64).to(device)
    y = torch.rand(4, 5, generator=g, dtype=F64).to(device)
    p = (torch.rand(5, generator=g, dtype=F64) + 0.5).to(device)
    v = torch.randn(5, generator=g, dtype=F64).to(device)

    def ours(q):
        return fusedloss.binary_cross_entropy_with_logits(
            x, y, weight=2 * q, pos_weight=q + 1, reduction=reduction, backend=backend)

    def theirs(q):
        return tF.binary_cross_entropy_with_logits(x, y, weight=2 * q, pos_weight=q + 1,
                                                   reduction=reduction)

    torch.testing.assert_close(torch.func.jvp(ours, (p,), (v,))[1],
                               torch.func.jvp(theirs, (p,), (v,))[1])
    torch.testing.assert_close(torch.func.jacrev(ours)(p), torch.func.jacrev(theirs)(p))
    torch.testing.assert_close(torch.func.jacfwd(ours)(p), torch.func.jacfwd(theirs)(p))
    with pytest.raises(RuntimeError, match="not differentiable"):  # eager: as torch
        ours(p.clone().requires_grad_())


@pytest.mark.parametrize("device,backend", CASES)
def test_linearize_and_make_fx_with_a_class_weight(device, backend):
    # make_fx tracing (torch.func.linearize) has no data: the NaN and target-range checks
    # used to read it ("trying to get value out of a tracing tensor")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 5, generator=g, dtype=F64).to(device)
    t = torch.randint(0, 5, (4,), generator=g).to(device)
    w = (torch.rand(5, generator=g, dtype=F64) + 0.5).to(device)
    v = torch.randn(4, 5, generator=g, dtype=F64).to(device)
    out, f = torch.func.linearize(
        lambda z: fusedloss.cross_entropy(z, t, weight=w, backend=backend), x)
    out2, f2 = torch.func.linearize(lambda z: tF.cross_entropy(z, t, weight=w), x)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(f(v), f2(v))
    gm = make_fx(lambda z: fusedloss.binary_cross_entropy_with_logits(
        z, torch.sigmoid(z.detach()), pos_weight=w, backend=backend))(x)
    torch.testing.assert_close(gm(x), tF.binary_cross_entropy_with_logits(
        x, torch.sigmoid(x), pos_weight=w))


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("inf"), float("nan")])
def test_softcap_must_be_finite_and_positive(bad):
    # one rule, one message: -1 was told "[0.0, inf]", then inf "must be finite"
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="softcap must be a"):
        fusedloss.cross_entropy(x, t, softcap=bad)
    with pytest.raises(ValueError, match="softcap must be a"):
        fusedloss.linear_cross_entropy(x, torch.randn(4, 3), t, softcap=bad)


@pytest.mark.parametrize("device,backend", CASES)
def test_complex_and_bool_weights_raise_as_torch(device, backend):
    # torch refuses a complex BCE weight / pos_weight (RuntimeError) and a bool pos_weight
    # (NotImplementedError: pos_weight - 1); a cast would silently drop the imaginary part
    x = torch.randn(2, 3, device=device)
    y = torch.rand(2, 3, device=device)
    bad = {"weight": torch.tensor([1 + 5j, 2, 3]), "pos_weight": torch.tensor([1 + 5j, 2, 3])}
    for name, value in bad.items():
        with pytest.raises(RuntimeError):
            tF.binary_cross_entropy_with_logits(x, y, **{name: value.to(device)})
        with pytest.raises(RuntimeError, match=name):
            fusedloss.binary_cross_entropy_with_logits(x, y, backend=backend,
                                                       **{name: value.to(device)})
    pw = torch.tensor([True, False, True], device=device)
    with pytest.raises(NotImplementedError):
        tF.binary_cross_entropy_with_logits(x, y, pos_weight=pw)
    with pytest.raises(NotImplementedError, match="pos_weight"):
        fusedloss.binary_cross_entropy_with_logits(x, y, pos_weight=pw, backend=backend)
    h, head = torch.randn(2, 4, device=device), torch.randn(3, 4, device=device)
    with pytest.raises(NotImplementedError, match="pos_weight"):
        fusedloss.linear_binary_cross_entropy_with_logits(h, head, y, pos_weight=pw,
                                                          backend=backend)
    # a bool weight is a 0/1 mask in both
    wb = torch.tensor([True, False, True], device=device)
    torch.testing.assert_close(
        fusedloss.binary_cross_entropy_with_logits(x, y, weight=wb, backend=backend),
        tF.binary_cross_entropy_with_logits(x, y, weight=wb))
    # cross_entropy with probability targets and a complex class weight: torch returns a
    # complex loss, the kernels are real; ours raises instead of dropping the imaginary part
    with pytest.raises(NotImplementedError, match="complex class weight"):
        fusedloss.cross_entropy(x, y, weight=torch.tensor([1 + 5j, 2, 3], device=device),
                                backend=backend)


@pytest.mark.parametrize("module", [fusedloss.CrossEntropyLoss, fusedloss.BCEWithLogitsLoss])
def test_modules_check_reduction_at_forward_as_torch(module):
    # torch builds a loss with any reduction string and raises at forward: code that builds the
    # module and sets .reduction afterwards works
    x, t = torch.randn(3, 4), torch.rand(3, 4)
    ours, theirs = module(reduction="bogus"), getattr(torch.nn, module.__name__)(
        reduction="bogus")
    for m in (ours, theirs):
        with pytest.raises(ValueError):
            m(x, t)
        m.reduction = "sum"
    torch.testing.assert_close(ours(x, t), theirs(x, t))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
def test_an_infinite_class_weight_stays_in_its_class(device, backend, reduction):
    # ('mean': the ignored row, clamped onto class 0, added inf * 0 = NaN to the denominator)
    # without smoothing, a class weight reaches only the rows whose target it is: an infinite
    # weight of an ignored (or absent) class leaves the other rows' loss and gradient finite
    # (0 * inf in the smoothing terms made every row NaN); with smoothing the loss is +inf
    x0 = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -1.0]], dtype=F64)
    t = torch.tensor([-100, 1])
    w = torch.tensor([float("inf"), 0.5, 2.0], dtype=F64)
    gout = torch.tensor([0.7, 1.3], dtype=F64) if reduction == "none" else None
    for eps in (0.0, 0.1):
        got, want = [], []
        for fn, out in ((fusedloss.cross_entropy, got), (tF.cross_entropy, want)):
            x = x0.clone().to(device).requires_grad_()
            kw = dict(backend=backend) if fn is fusedloss.cross_entropy else {}
            loss = fn(x, t.to(device), weight=w.to(device), reduction=reduction,
                      label_smoothing=eps, **kw)
            out.append(loss.detach())
            if eps == 0:
                loss.backward(None if gout is None else gout.to(device))
                out.append(x.grad)
        torch.testing.assert_close(got, want, equal_nan=True)
        if eps == 0:
            assert torch.isfinite(got[1][1]).all()


@pytest.mark.parametrize("device,backend", CASES)
def test_an_infinite_pos_weight_as_torch(device, backend):
    # positive targets with an infinite pos_weight cost +inf (torch), not inf * 0 = NaN
    x = torch.tensor([[0.5, -0.5, 0.0, 2.0, -3.0]], dtype=F64, device=device)
    for y0 in (1.0, 0.0, 0.3):
        y = torch.full_like(x, y0)
        pw = torch.full((5,), float("inf"), dtype=F64, device=device)
        got = fusedloss.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="none",
                                                         backend=backend)
        torch.testing.assert_close(
            got, tF.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="none"),
            equal_nan=True)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("cap", [30.0, 1000.0, 1e5])
def test_softcap_keeps_relative_precision_when_cap_is_large(device, backend, cap):
    # z = cap * tanh(x / cap) ~ x when cap >> |x|: a tanh accurate only to ~1 ulp of 1 put an
    # error of cap * 6e-8 into z (the Triton kernel's: 1e-5 relative at cap = 1000)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 128, generator=g), torch.randint(0, 128, (16,), generator=g)
    exact = tF.cross_entropy(cap * torch.tanh(x.double() / cap), t, reduction="none")
    theirs = tF.cross_entropy(cap * torch.tanh(x / cap), t, reduction="none")
    ours = fusedloss.cross_entropy(x.to(device), t.to(device), reduction="none", softcap=cap,
                                   backend=backend).cpu()
    err = ((ours.double() - exact).abs() / exact).max().item()
    ref = ((theirs.double() - exact).abs() / exact).max().item()
    assert err <= 2 * ref + 1e-8, (err, ref)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("scale,cap", [(80.0, 20.0), (30.0, 5.0)])
def test_softcap_gradient_where_the_cap_saturates(device, backend, scale, cap):
    # dz/dx = sech(x/cap)^2: taken as 1 - (z/cap)^2 from the rounded z it cancelled where
    # |x| >> cap (2-3x torch's error against float64); torch's own autograd rounds tanh once
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 200, generator=g) * scale
    t = torch.randint(0, 200, (16,), generator=g)

    def grad(fn, xx, **kw):
        xx = xx.clone().requires_grad_()
        return torch.autograd.grad(fn(xx, **kw), xx)[0].double().cpu()

    def capped(xx):
        return tF.cross_entropy(cap * torch.tanh(xx / cap), t.to(xx.device))

    exact = grad(capped, x.double())
    theirs = grad(capped, x)
    ours = grad(lambda xx: fusedloss.cross_entropy(xx, t.to(device), softcap=cap,
                                                   backend=backend), x.to(device))
    err = ((ours - exact).norm() / exact.norm()).item()
    ref = ((theirs - exact).norm() / exact.norm()).item()
    assert err <= 1.5 * ref, (err, ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 untaken
@pytest.mark.filterwarnings("ignore:overflow encountered")  # (Triton interpreter)
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_an_infinite_pos_weight_where_softplus_underflows(device, backend, dtype):
    # inf * softplus(-x), softplus(-x) > 0: +inf as torch gives, also where log1p(exp(-|x|))
    # rounds to 0 (x << 0) or exp flushes (x = 88 in fp32): inf * 0 made it NaN
    x = torch.tensor([[-1e4, -104.0, -5.0, 0.5, 88.0]], dtype=dtype, device=device)
    pw = torch.full((5,), float("inf"), dtype=dtype, device=device)
    for y0 in (1.0, 0.25):
        y = torch.full_like(x, y0)
        want = tF.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="none")
        assert torch.isposinf(want).all()  # the oracle
        for reduction in ("none", "mean"):
            got = fusedloss.binary_cross_entropy_with_logits(
                x, y, pos_weight=pw, reduction=reduction, backend=backend)
            assert torch.isposinf(got).all(), (y0, reduction, got)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 untaken
@pytest.mark.filterwarnings("ignore:overflow encountered")  # (Triton interpreter)
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (F64, 1.5e308)])
def test_smoothing_sums_over_logits_wider_than_the_range(device, backend, dtype, big):
    # the smoothing / soft-target sums were taken relative to the first logit: z - z_0
    # summed past the range for [0, big, big] (each term fits) and the loss came out -inf;
    # torch's is finite
    x = torch.tensor([[0.0, big, big], [big, big, 0.0], [-big / 8, 0.9 * big, 0.9 * big]],
                     dtype=dtype)
    t = torch.tensor([1, 0, 0])
    w = torch.tensor([0.5, 1.0, 2.0], dtype=dtype)
    p = torch.tensor([[0.2, 0.4, 0.4], [0.5, 0.25, 0.25], [0.6, 0.3, 0.1]], dtype=dtype)
    for target, kw in ((t, dict(label_smoothing=0.1)), (t, dict(label_smoothing=0.1, weight=w)),
                       (p, {}), (p, dict(label_smoothing=0.2))):
        want = tF.cross_entropy(x, target, reduction="none", **kw)
        # the oracle: finite except where torch's own weighted sum passes the range
        assert torch.isfinite(want).sum() >= 2
        got = fusedloss.cross_entropy(
            x.to(device), target.to(device), reduction="none", backend=backend,
            **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=0, msg=str(kw))
