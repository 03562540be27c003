"""torch.func transforms over the losses, on every backend, against the same transforms over
torch.nn.functional: grad, vmap, per-sample gradients (vmap(grad(...)), as Opacus and
meta-learning code use them), jacrev."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

import fusedloss
from helpers import assert_close

B, R, C = 3, 2, 5
F32 = torch.float32


def _data(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, R, C, generator=g).to(device)
    t = torch.randint(0, C, (B, R), generator=g).to(device)
    y = torch.rand(B, R, C, generator=g).to(device)
    w = torch.linspace(0.5, 2.0, C).to(device)
    return x, t, y, w


# (id, ours(x, t_index, y_prob, w, backend), torch's(x, t, y, w)) on one sample (R, C)
LOSSES = [
    ("ce_mean_weight", lambda x, t, y, w, b: fusedloss.cross_entropy(x, t, w, backend=b),
     lambda x, t, y, w: F.cross_entropy(x, t, w)),
    ("ce_sum_smooth", lambda x, t, y, w, b: fusedloss.cross_entropy(
        x, t, reduction="sum", label_smoothing=0.1, backend=b),
     lambda x, t, y, w: F.cross_entropy(x, t, reduction="sum", label_smoothing=0.1)),
    ("ce_prob", lambda x, t, y, w, b: fusedloss.cross_entropy(x, y.softmax(-1), backend=b),
     lambda x, t, y, w: F.cross_entropy(x, y.softmax(-1))),
    ("bce_mean_pos_weight", lambda x, t, y, w, b: fusedloss.binary_cross_entropy_with_logits(
        x, y, pos_weight=w, backend=b),
     lambda x, t, y, w: F.binary_cross_entropy_with_logits(x, y, pos_weight=w)),
]
IDS = [c[0] for c in LOSSES]


@pytest.mark.parametrize("case", LOSSES, ids=IDS)
def test_func_grad(dev_backend, case):
    device, backend = dev_backend
    _, ours, theirs, = case
    x, t, y, w = _data(device)
    got = grad(lambda a: ours(a, t[0], y[0], w, backend))(x[0])
    want = grad(lambda a: theirs(a, t[0], y[0], w))(x[0])
    assert_close(got, want, F32)


@pytest.mark.parametrize("case", LOSSES, ids=IDS)
def test_vmap_forward(dev_backend, case):
    device, backend = dev_backend
    _, ours, theirs = case
    x, t, y, w = _data(device)
    got = vmap(lambda a, b, c: ours(a, b, c, w, backend))(x, t, y)
    want = torch.stack([theirs(x[i], t[i], y[i], w) for i in range(B)])
    assert got.dtype == want.dtype
    assert_close(got, want, F32)


@pytest.mark.parametrize("case", LOSSES, ids=IDS)
def test_per_sample_gradients(dev_backend, case):
    device, backend = dev_backend
    _, ours, theirs = case
    x, t, y, w = _data(device)
    got = vmap(grad(lambda a, b, c: ours(a, b, c, w, backend)))(x, t, y)
    want = vmap(grad(lambda a, b, c: theirs(a, b, c, w)))(x, t, y)
    assert_close(got, want, F32)


def test_per_sample_parameter_gradients(dev_backend):
    """The Opacus recipe: functional_call + vmap(grad) over the model's parameters."""
    device, backend = dev_backend
    torch.manual_seed(0)
    model = torch.nn.Linear(4, C).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    h = torch.randn(B, 4, device=device)
    t = torch.randint(0, C, (B,), device=device)

    def per_sample(loss_fn):
        def loss_of(p, hi, ti):
            out = functional_call(model, p, (hi.unsqueeze(0),))
            return loss_fn(out, ti.unsqueeze(0))
        return vmap(grad(loss_of), in_dims=(None, 0, 0))(params, h, t)

    got = per_sample(lambda o, ti: fusedloss.cross_entropy(o, ti, backend=backend))
    want = per_sample(F.cross_entropy)
    for k in want:
        assert_close(got[k], want[k], F32, msg=k)


def test_vmap_none_reduction_and_decoding(dev_backend):
    device, backend = dev_backend
    x, t, _, _ = _data(device)
    out = vmap(lambda a, b: fusedloss.cross_entropy(a, b, reduction="none", backend=backend,
                                                    return_decoding=True))(x, t)
    assert_close(out.loss, F.cross_entropy(x.transpose(1, 2), t, reduction="none"), F32)
    assert torch.equal(out.pred, x.argmax(-1))


def test_jacrev_of_bce_none(dev_backend):
    device, backend = dev_backend
    _, _, y, w = _data(device)
    x = torch.randn(R, C, device=device)
    got = jacrev(lambda a: fusedloss.binary_cross_entropy_with_logits(
        a, y[0], w, reduction="none", backend=backend))(x)
    want = jacrev(lambda a: F.binary_cross_entropy_with_logits(a, y[0], w, reduction="none"))(x)
    assert_close(got, want, F32)


def test_vmap_with_per_sample_weight_and_counts(dev_backend):
    """Side tensors that differ per sample (and per-sample counts) take the per-sample path."""
    device, backend = dev_backend
    x, t, y, _ = _data(device)
    ws = torch.rand(B, C, device=device) + 0.5
    got = vmap(lambda a, b, w: fusedloss.cross_entropy(a, b, w, backend=backend))(x, t, ws)
    want = torch.stack([F.cross_entropy(x[i], t[i], ws[i]) for i in range(B)])
    assert_close(got, want, F32)
    out = vmap(lambda a, b: fusedloss.binary_cross_entropy_with_logits(
        a, b, threshold=0.5, return_counts=True, backend=backend)[::3])(x, (y > 0.5).float())
    loss, counts = out[0], out[1]
    out = vmap(lambda a, b: fusedloss.binary_cross_entropy_with_logits(
        a, b, threshold=0.5, backend=backend).labels)(x, (y > 0.5).float())
    assert_close(loss, torch.stack([F.binary_cross_entropy_with_logits(
        x[i], (y[i] > 0.5).float()) for i in range(B)]), F32)
    labels = x > 0
    pos = y > 0.5
    assert torch.equal(out, labels)
    assert torch.equal(counts, torch.stack([(labels & pos).sum(1), (labels & ~pos).sum(1),
                                                (~labels & pos).sum(1)], 1))


@pytest.mark.parametrize("case", LOSSES, ids=IDS)
def test_jvp_and_hessian(dev_backend, case):
    """Forward mode (torch.func.jvp) and hessian = jacfwd(jacrev(...))."""
    device, backend = dev_backend
    _, ours, theirs = case
    x, t, y, w = _data(device)
    v = torch.randn_like(x[0])
    got = torch.func.jvp(lambda a: ours(a, t[0], y[0], w, backend), (x[0],), (v,))
    want = torch.func.jvp(lambda a: theirs(a, t[0], y[0], w), (x[0],), (v,))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, F32)
    got = torch.func.hessian(lambda a: ours(a, t[0], y[0], w, backend))(x[0])
    want = torch.func.hessian(lambda a: theirs(a, t[0], y[0], w))(x[0])
    assert_close(got, want, F32)


def test_forward_ad_in_target_and_weight(dev_backend):
    """torch.autograd.forward_ad through probability targets and the class weight."""
    import torch.autograd.forward_ad as fwAD
    device, backend = dev_backend
    x, _, y, w = _data(device)
    yt, wt = torch.rand_like(y[0]), torch.rand_like(w)
    results = []
    for fn in (lambda *a: fusedloss.cross_entropy(*a, label_smoothing=0.2, backend=backend),
               lambda *a: F.cross_entropy(*a, label_smoothing=0.2)):
        with fwAD.dual_level():
            out = fn(x[0], fwAD.make_dual(y[0], yt), fwAD.make_dual(w, wt))
            results.append(fwAD.unpack_dual(out).tangent)
    assert_close(results[0], results[1], F32)


@pytest.mark.parametrize("case", LOSSES, ids=IDS)
def test_compiled_func_grad_and_per_sample_gradients(dev_backend, case):
    # torch.compile inlines the Functions' forward inside torch.func transforms and
    # differentiates the ops it calls; with the fused ops that gradient was silently zero.
    device, backend = dev_backend
    _, ours, theirs, = case
    x, t, y, w = _data(device)
    torch._dynamo.reset()
    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    got = torch.compile(lambda a: grad(lambda s: ours(s, t[0], y[0], w, backend))(a),
                        backend=compiler)(x[0])
    want = grad(lambda a: theirs(a, t[0], y[0], w))(x[0])
    assert_close(got, want, F32)
    torch._dynamo.reset()
    got = torch.compile(lambda a: vmap(grad(lambda s, tt, yy: ours(s, tt, yy, w, backend)))(
        a, t, y), backend=compiler)(x)
    want = vmap(grad(lambda s, tt, yy: theirs(s, tt, yy, w)))(x, t, y)
    assert_close(got, want, F32)


def test_all_rows_ignored_gives_zero_gradient_in_transforms(dev_backend):
    # mean over no rows is NaN (as torch); its gradient is 0 in torch, also through the
    # differentiable backward used by create_graph=True and torch.func (it was NaN there).
    device, backend = dev_backend
    x, _, _, w = _data(device)
    ignored = torch.full((B, R), -100, device=device)
    ignored[0, 0] = 1  # sample 0 has one counted row, the others none

    def ours(s, tt):
        return fusedloss.cross_entropy(s, tt, w, label_smoothing=0.1, backend=backend)

    def theirs(s, tt):
        return F.cross_entropy(s, tt, w, label_smoothing=0.1)

    got = vmap(grad(ours))(x, ignored)
    want = vmap(grad(theirs))(x, ignored)
    assert bool(torch.isfinite(got).all())
    assert_close(got, want, F32)
    a = x[1].clone().requires_grad_()
    g, = torch.autograd.grad(ours(a, ignored[1]), a, create_graph=True)
    assert torch.equal(g.detach(), torch.zeros_like(g))
    (g.square().sum() + ours(a, ignored[1]).nan_to_num()).backward()
    assert torch.equal(a.grad, torch.zeros_like(a))
