"""Drop-in gaps of the fused linear losses that a user's existing code hits: autocast with
BCE weights and byte targets, probability targets of any strides, argument types, empty hidden
or class dims, torch.func, and the chunk loop's buffers. Oracles: torch's own
`loss(F.linear(...))`, in float64 where values are compared."""

import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as tF

import fusedloss
from conftest import DEVICE_BACKENDS
from fusedloss import _backend

CASES = [pytest.param(d, b, id=f"{d}-{b}") for d, b in DEVICE_BACKENDS]
F64 = torch.float64


def _head(n=6, h=16, c=13, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(device)
    w = (torch.randn(c, h, generator=g) / 4).to(device)
    return x, w, g


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bce_weights_stay_fp32_under_autocast(device, backend, reduction):
    # torch's autocast runs BCE in fp32: an fp32 weight / pos_weight is used as it is. Rounded
    # to bf16 (the linear's dtype) the elementwise loss was off by up to 2.7e-2.
    x, w, g = _head(device=device)
    wt = (torch.rand(13, generator=g) + 0.5).to(device)
    pw = (torch.rand(13, generator=g) * 3 + 0.5).to(device)
    y = torch.rand(6, 13, generator=g).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = fusedloss.linear_binary_cross_entropy_with_logits(
            x, w, y, weight=wt, pos_weight=pw, reduction=reduction, backend=backend)
        z = tF.linear(x, w)  # the same bf16 logits
    assert got.dtype == torch.float32
    want = tF.binary_cross_entropy_with_logits(z.to(F64), y.to(F64), weight=wt.to(F64),
                                               pos_weight=pw.to(F64), reduction=reduction)
    torch.testing.assert_close(got.to(F64), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
def test_byte_target_none_under_autocast_is_fp32_precise(device, backend, dtype, linear):
    # reduction='none' with a bool/uint8 target: the elementwise loss was computed in bf16 and
    # only then cast to fp32 (errors about 4e-3); torch computes it in fp32.
    x, w, g = _head(n=16, c=40, device=device)
    y = (torch.rand(16, 40, generator=g) < 0.3).to(dtype).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        z = tF.linear(x, w)
        got = fusedloss.linear_binary_cross_entropy_with_logits(
            x, w, y, reduction="none", backend=backend) if linear else \
            fusedloss.binary_cross_entropy_with_logits(z, y, reduction="none", backend=backend)
    assert got.dtype == torch.float32
    want = tF.binary_cross_entropy_with_logits(z.to(F64), y.to(F64), reduction="none")
    torch.testing.assert_close(got.to(F64), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted-3d"])
def test_probability_target_of_any_strides(device, backend, layout):
    # the ops read probabilities with unit class stride; a view without it once raised
    g = torch.Generator().manual_seed(1)
    c, h = 7, 5
    if layout == "permuted-3d":
        x = torch.randn(2, 3, h, generator=g, dtype=F64).to(device)
        p = torch.softmax(torch.randn(2, c, 3, generator=g, dtype=F64), 1).permute(0, 2, 1)
    else:
        x = torch.randn(4, h, generator=g, dtype=F64).to(device)
        p = torch.softmax(torch.randn(c, 4, generator=g, dtype=F64), 0).t() \
            if layout == "transposed" else \
            torch.softmax(torch.randn(4, 2 * c, generator=g, dtype=F64), 1)[:, ::2]
    p = p.to(device)
    w = torch.randn(c, h, generator=g, dtype=F64).to(device).requires_grad_()
    got = fusedloss.linear_cross_entropy(x, w, p, backend=backend, chunk_size=3)
    ref_w = w.detach().clone().requires_grad_()
    want = tF.cross_entropy(tF.linear(x, ref_w).movedim(-1, 1), p.movedim(-1, 1))
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(w.grad, ref_w.grad)


@pytest.mark.parametrize("device,backend", CASES)
def test_ignore_index_must_be_an_int64(device, backend):
    # torch: TypeError for a float or bool, ValueError for an int beyond int64; a float was
    # truncated to a class before
    x, w, _ = _head(device=device)
    t = torch.zeros(6, dtype=torch.long, device=device)
    for fn in (fusedloss.linear_cross_entropy,
               lambda a, b, c, **k: fusedloss.cross_entropy(tF.linear(a, b), c, **k)):
        for bad in (2.5, 2.0, True):
            with pytest.raises(TypeError, match="ignore_index"):
                fn(x, w, t, ignore_index=bad, backend=backend)
        with pytest.raises(ValueError, match="ignore_index"):
            fn(x, w, t, ignore_index=2 ** 63, backend=backend)
    with pytest.raises(TypeError):
        tF.cross_entropy(tF.linear(x, w), t, ignore_index=2.5)


@pytest.mark.parametrize("device,backend", CASES)
def test_chunk_size_of_any_integer_type(device, backend):
    x, w, g = _head(device=device)
    t = torch.randint(0, 13, (6,), generator=g).to(device)
    want = fusedloss.linear_cross_entropy(x, w, t, backend=backend, chunk_size=4)
    for k in (np.int64(4), np.int32(4), torch.tensor(4)):
        torch.testing.assert_close(
            fusedloss.linear_cross_entropy(x, w, t, backend=backend, chunk_size=k), want,
            rtol=0, atol=0)
    for bad in (torch.tensor(True), np.float32(4.0), torch.tensor(4.0)):
        with pytest.raises(TypeError, match="chunk_size"):
            fusedloss.linear_cross_entropy(x, w, t, backend=backend, chunk_size=bad)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_hidden_and_class_dims(device, backend):
    g = torch.Generator().manual_seed(2)
    # H = 0: every logit is the bias (or 0), so the CE is torch's on those logits
    x = torch.randn(3, 0, dtype=F64).to(device).requires_grad_()
    w = torch.randn(5, 0, dtype=F64).to(device).requires_grad_()
    b = torch.randn(5, generator=g, dtype=F64).to(device).requires_grad_()
    t = torch.tensor([0, 4, 2], device=device)
    got = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend)
    want = tF.cross_entropy(tF.linear(x, w, b), t)
    torch.testing.assert_close(got, want)
    gb, = torch.autograd.grad(got, b)
    wb, = torch.autograd.grad(want, b)
    torch.testing.assert_close(gb, wb)
    # C = 0 labels: torch's mean of nothing is NaN, its sum 0, 'none' an empty (N, 0)
    x = torch.randn(3, 4, generator=g, dtype=F64).to(device)
    w = torch.randn(0, 4, dtype=F64).to(device)
    y = torch.rand(3, 0, dtype=F64).to(device)
    for red in ("mean", "sum", "none"):
        got = fusedloss.linear_binary_cross_entropy_with_logits(x, w, y, reduction=red,
                                                                backend=backend)
        want = tF.binary_cross_entropy_with_logits(tF.linear(x, w), y, reduction=red)
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("device,backend", CASES)
def test_torch_func_grad_and_per_sample_grads(device, backend):
    # grad / vmap(grad) go through the backend's cross_entropy on the materialised logits
    # (the chunked Function has no vmap rule); they raised a generic setup_context error
    x, w, g = _head(n=5, h=4, c=7, device=device)
    x, w = x.to(F64), w.to(F64)
    t = torch.randint(0, 7, (5,), generator=g).to(device)
    y = torch.rand(5, 7, generator=g, dtype=F64).to(device)

    def ours_ce(w_, x_, t_):
        return fusedloss.linear_cross_entropy(x_, w_, t_, backend=backend, label_smoothing=0.1)

    def torch_ce(w_, x_, t_):
        return tF.cross_entropy(tF.linear(x_, w_), t_, label_smoothing=0.1)

    torch.testing.assert_close(torch.func.grad(ours_ce)(w, x, t),
                               torch.func.grad(torch_ce)(w, x, t))
    per = torch.func.vmap(torch.func.grad(ours_ce), in_dims=(None, 0, 0))
    want = torch.func.vmap(torch.func.grad(torch_ce), in_dims=(None, 0, 0))
    torch.testing.assert_close(per(w, x, t), want(w, x, t))

    def ours_bce(w_, x_, y_):
        return fusedloss.linear_binary_cross_entropy_with_logits(x_, w_, y_, backend=backend)

    def torch_bce(w_, x_, y_):
        return tF.binary_cross_entropy_with_logits(tF.linear(x_, w_), y_)

    per = torch.func.vmap(torch.func.grad(ours_bce), in_dims=(None, 0, 0))
    want = torch.func.vmap(torch.func.grad(torch_bce), in_dims=(None, 0, 0))
    torch.testing.assert_close(per(w, x, y), want(w, x, y))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bce_chunk_loop_frees_each_op_gradient(monkeypatch, reduction):
    # peak memory of the chunk loop: the logits buffer and one op gradient. Held over to the
    # next chunk's op call, the previous gradient was a third (rows, C) buffer (1.24x the
    # gradients' bytes instead of 1.16x at the benchmark's BCE shape).
    ops = _backend.get("native", torch.device("cpu")).ops
    real = ops.sigmoid_bce_fwd
    alive, seen = [], []

    def spy(*args, **kwargs):
        seen.append(sum(r() is not None for r in alive))
        out = real(*args, **kwargs)
        if out[1].numel():
            alive.append(weakref.ref(out[1]))
        return out

    monkeypatch.setattr(ops, "sigmoid_bce_fwd", spy)
    x, w, g = _head(n=40, h=8, c=30)
    x.requires_grad_()
    y = (torch.rand(40, 30, generator=g) < 0.2).to(torch.uint8)
    loss = fusedloss.linear_binary_cross_entropy_with_logits(x, w, y, reduction=reduction,
                                                             backend="native", chunk_size=8)
    loss.sum().backward()
    assert len(alive) == 5 and len(seen) >= 5 and not any(seen)


def test_meta_tensors_propagate_shapes():
    # torch's loss(F.linear(...)) runs on the meta device; the autocast query raised there
    x = torch.randn(6, 4, device="meta")
    w = torch.randn(5, 4, device="meta")
    t = torch.zeros(6, dtype=torch.long, device="meta")
    for backend in ("auto", "torch"):
        got = fusedloss.linear_cross_entropy(x, w, t, backend=backend, reduction="none")
        assert got.device.type == "meta" and got.shape == tF.cross_entropy(
            tF.linear(x, w), t, reduction="none").shape
    y = torch.zeros(6, 5, device="meta")
    got = fusedloss.linear_binary_cross_entropy_with_logits(x, w, y, reduction="none")
    assert got.device.type == "meta" and got.shape == (6, 5)


@pytest.mark.parametrize("kind", ["ce", "bce"])
@pytest.mark.parametrize("chunk_size", [None, 3, 9])
def test_small_chunks_grad_input_as_accurate_as_torch(kind, chunk_size):
    # CPU BLAS multiplies few rows (not a multiple of 4) by a path with ~10x the rounding error
    # over C = 32000 classes; the leftover chunk of the default rule (64 + 1 rows here) and
    # small explicit chunks must still give grad_input as close to float64 as torch's fp32
    g = torch.Generator().manual_seed(0)
    n, h, c = 65, 64, 32000
    x = torch.randn(n, h, generator=g)
    w = torch.randn(c, h, generator=g) / 8
    t = torch.randint(0, c, (n,), generator=g) if kind == "ce" \
        else (torch.rand(n, c, generator=g) < 0.01).to(torch.uint8)

    def loss(fn, xx, ww):
        if kind == "ce":
            return fn(xx, ww, t)
        return fn(xx, ww, t if fn is fusedloss.linear_binary_cross_entropy_with_logits
                  else t.to(xx.dtype))

    def grad_x(fn, dtype, **kw):
        xx = x.to(dtype, copy=True).requires_grad_()
        loss(lambda a, b, y: fn(a, b, y, **kw), xx, w.to(dtype)).backward()
        return xx.grad.double()

    ours_fn = fusedloss.linear_cross_entropy if kind == "ce" \
        else fusedloss.linear_binary_cross_entropy_with_logits
    torch_fn = (lambda a, b, y: tF.cross_entropy(tF.linear(a, b), y)) if kind == "ce" \
        else (lambda a, b, y: tF.binary_cross_entropy_with_logits(tF.linear(a, b), y))
    exact = grad_x(torch_fn, torch.float64)
    theirs = grad_x(torch_fn, torch.float32)
    ours = grad_x(ours_fn, torch.float32, backend="native", chunk_size=chunk_size)
    for rows in (slice(0, n), slice(n - 1, n)):  # all rows, and the last chunk's alone
        err = ((ours[rows] - exact[rows]).norm() / exact[rows].norm()).item()
        ref = ((theirs[rows] - exact[rows]).norm() / exact[rows].norm()).item()
        assert err <= 2 * ref + 1e-8, (rows, err, ref)


def _linear_pair(kind, backend):
    if kind == "ce":
        return (lambda x, w, t: fusedloss.linear_cross_entropy(x, w, t, backend=backend),
                lambda x, w, t: tF.cross_entropy(tF.linear(x, w), t))
    return (lambda x, w, y: fusedloss.linear_binary_cross_entropy_with_logits(
                x, w, y, backend=backend),
            lambda x, w, y: tF.binary_cross_entropy_with_logits(tF.linear(x, w), y))


def _linear_case(device, backend, kind):
    """fp64 (x, w, target) and the (ours, torch's) loss functions of (x, w, target)."""
    x, w, g = _head(device=device)
    if kind == "ce":
        t = torch.randint(0, 13, (6,), generator=g).to(device)
    else:
        t = (torch.rand(6, 13, generator=g) < 0.4).to(device, F64)
    return x.double(), w.double(), t, *_linear_pair(kind, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_jacobian_vectorized(device, backend, kind):
    # vectorize=True vmaps the backward over a batched incoming gradient, which the in-place
    # scaling of the forward's gradients had no batching rule for (RuntimeError)
    x, w, t, ours, theirs = _linear_case(device, backend, kind)
    for vec in (True, False):
        got = torch.autograd.functional.jacobian(lambda w_: ours(x, w_, t), w, vectorize=vec)
        want = torch.autograd.functional.jacobian(lambda w_: theirs(x, w_, t), w)
        torch.testing.assert_close(got, want, msg=f"vectorize={vec}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_forward_ad_dual_tensors(device, backend, kind):
    # torch.autograd.forward_ad through the linear losses: the chunked Function has no jvp
    # (NotImplementedError), so dual tensors take F.linear and the backend's loss, which has one
    import torch.autograd.forward_ad as fwAD

    x, w, t, ours, theirs = _linear_case(device, backend, kind)
    dx, dw = torch.randn_like(x), torch.randn_like(w)
    out = []
    for fn in (ours, theirs):
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, dx), fwAD.make_dual(w, dw), t)
            out.append(fwAD.unpack_dual(y))
    torch.testing.assert_close(out[0].primal, out[1].primal)
    torch.testing.assert_close(out[0].tangent, out[1].tangent)


def test_ignore_index_none_is_torchs_default():
    # torch's F.linear_cross_entropy takes ignore_index=None and means -100 by it
    x, w, g = _head()
    t = torch.randint(0, 13, (6,), generator=g)
    t[1] = -100
    want = tF.cross_entropy(tF.linear(x, w), t)
    torch.testing.assert_close(fusedloss.linear_cross_entropy(x, w, t, ignore_index=None), want)
    loss = fusedloss.LinearCrossEntropyLoss(ignore_index=None)
    torch.testing.assert_close(loss(x, w, t), want)
