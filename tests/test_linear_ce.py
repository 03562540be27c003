"""fusedloss.linear_cross_entropy against cross_entropy(F.linear(...)) on materialised logits
(linear_oracle.py): the loss and every gradient (input, linear weight, bias, probability
target), every option and reduction, chunk sizes that do not divide the rows, edge cases."""

import pytest
import torch

import fusedloss
from conftest import DEVICE_BACKENDS, is_slow_backend
from helpers import assert_close, assert_no_worse_than_torch
from linear_oracle import ce_oracle, grads, leaves

F64 = torch.float64

# name -> (options, probability target?)
OPTIONS = {
    "plain": ({}, False),
    "weight_ignore": (dict(weight="w", ignore_index=4), False),
    "smooth_zloss_cap": (dict(label_smoothing=0.2, lse_square_scale=0.05, softcap=2.5), False),
    "all": (dict(weight="w", label_smoothing=0.1, lse_square_scale=0.01, softcap=4.0,
                 ignore_index=-100), False),
    "prob": ({}, True),
    "prob_all": (dict(weight="w", label_smoothing=0.15, lse_square_scale=0.02, softcap=3.0),
                 True),
}
FAST_OPTIONS = ("all", "prob_all")  # the Triton interpreter (slow) runs only these


def backend_cases(values, fast):
    """(device, backend, value) for every backend; slow backends get only `fast` values."""
    return [pytest.param(d, b, v, id=f"{d}-{b}-{v}") for d, b in DEVICE_BACKENDS
            for v in values if v in fast or not is_slow_backend(d, b)]


def make(n=13, h=8, c=11, dtype=F64, prob=False, bias=True, batch=None, seed=0, ignore=-100):
    g = torch.Generator().manual_seed(seed)
    shape = batch if batch is not None else (n,)
    x = torch.randn(*shape, h, generator=g, dtype=dtype)
    w = torch.randn(c, h, generator=g, dtype=dtype) / h ** 0.5 * 3
    b = torch.randn(c, generator=g, dtype=dtype) if bias else None
    if prob:
        t = torch.softmax(torch.randn(*shape, c, generator=g, dtype=dtype), -1)
    else:
        t = torch.randint(0, c, shape, generator=g)
        if t.numel() > 3:
            t.view(-1)[1] = ignore
            t.view(-1)[3] = ignore
    cw = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return x, w, b, t, cw


def run_both(backend, x, w, b, t, opts, reduction, chunk_size, grad_out=None):
    """(ours, oracle) as lists [loss, d input, d weight, d bias, d target]."""
    xs = leaves(x, w, b, t if t.is_floating_point() else None)
    ours = fusedloss.linear_cross_entropy(
        xs[0], xs[1], t if xs[3] is None else xs[3], linear_bias=xs[2], reduction=reduction,
        backend=backend, chunk_size=chunk_size, **opts)
    ys = leaves(x, w, b, t if t.is_floating_point() else None)
    ref = ce_oracle(ys[0], ys[1], ys[2], t if ys[3] is None else ys[3], reduction=reduction,
                    **opts)
    if grad_out is None and reduction == "none":
        grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7),
                               dtype=ref.dtype)
    g_ours = grads(ours, xs, grad_out)
    g_ref = grads(ref, ys, grad_out)
    return [ours, *g_ours], [ref, *g_ref]


def compare(ours, ref, dtype, what=""):
    names = ["loss", "grad input", "grad linear_weight", "grad linear_bias", "grad target"]
    for name, a, e in zip(names, ours, ref, strict=True):
        assert (a is None) == (e is None), f"{what} {name}: presence differs"
        if a is not None:
            assert a.shape == e.shape, f"{what} {name}: shape {a.shape} vs {e.shape}"
            assert_close(a, e, dtype, msg=f"{what} {name}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("device", "backend", "option"), backend_cases(OPTIONS, FAST_OPTIONS))
def test_parity_fp64(device, backend, option, reduction):
    opts, prob = OPTIONS[option]
    x, w, b, t, cw = make(prob=prob, ignore=opts.get("ignore_index", -100))
    opts = {k: (cw if v == "w" else v) for k, v in opts.items()}
    ours, ref = run_both(backend, x, w, b, t, opts, reduction, chunk_size=5)
    compare(ours, ref, F64, f"{option}/{reduction}")


@pytest.mark.parametrize(("device", "backend", "chunk_size"),
                         backend_cases([1, 4, 13, 64, None], (4, None)))
def test_chunk_sizes_agree(device, backend, chunk_size):
    x, w, b, t, cw = make()
    opts = dict(weight=cw, label_smoothing=0.1)
    for reduction in ("mean", "none"):
        ours, ref = run_both(backend, x, w, b, t, opts, reduction, chunk_size)
        compare(ours, ref, F64, f"chunk_size={chunk_size}/{reduction}")


def test_no_bias_kdim_fp32(dev_backend):
    device, backend = dev_backend
    x, w, b, t, _ = make(batch=(3, 5), bias=False, dtype=torch.float32)
    for reduction in ("mean", "none"):
        ours, ref = run_both(backend, x, w, b, t, {}, reduction, chunk_size=4)
        compare(ours, ref, torch.float32, reduction)


@pytest.mark.parametrize("case", ["one_row", "empty", "all_ignored"])
def test_edges(dev_backend, case):
    _, backend = dev_backend
    n = {"one_row": 1, "empty": 0, "all_ignored": 6}[case]
    x, w, b, t, cw = make(n=n)
    if case == "all_ignored":
        t.fill_(-100)
    for reduction in ("mean", "sum", "none"):
        ours, ref = run_both(backend, x, w, b, t, dict(weight=cw), reduction, chunk_size=4)
        compare(ours, ref, F64, f"{case}/{reduction}")


def test_bf16_no_worse_than_torch(dev_backend):
    device, backend = dev_backend
    n, c = (24, 40) if is_slow_backend(device, backend) else (200, 300)
    x, w, b, t, _ = make(n=n, h=32, c=c, dtype=F64)
    opts = dict(label_smoothing=0.1)
    _, ref64 = run_both(backend, x, w, b, t, opts, "mean", chunk_size=64)
    lp = [v.to(torch.bfloat16) for v in (x, w, b)]
    ours, torch_bf16 = run_both(backend, *lp, t, opts, "mean", chunk_size=64)
    for name, a, tb, e in zip(["loss", "input", "weight", "bias"], ours[:4], torch_bf16[:4],
                                  ref64[:4], strict=True):
        assert a.dtype == torch.bfloat16
        assert_no_worse_than_torch(a, tb, e, msg=name)


def test_decoding_matches_materialised_logits(dev_backend):
    _, backend = dev_backend
    x, w, b, t, _ = make(n=17, c=9, dtype=torch.float32)
    out = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend, softcap=3.0,
                                         reduction="none", return_decoding=True, chunk_size=5)
    z = torch.nn.functional.linear(x, w, b)
    z = 3.0 * torch.tanh(z / 3.0)
    assert torch.equal(out.pred, z.argmax(-1))
    assert_close(out.confidence, torch.softmax(z.double(), -1).amax(-1), torch.float32)
    assert torch.equal(out.correct, (z.argmax(-1) == t) & (t != -100))
    assert_close(out.loss, ce_oracle(x, w, b, t, reduction="none", softcap=3.0), torch.float32)


def test_retain_graph_second_backward(dev_backend):
    _, backend = dev_backend
    x, w, b, t, cw = make()
    xs = leaves(x, w, b)
    loss = fusedloss.linear_cross_entropy(xs[0], xs[1], t, linear_bias=xs[2], weight=cw,
                                          backend=backend, chunk_size=4)
    first = torch.autograd.grad(loss * 2.0, xs, retain_graph=True)
    second = torch.autograd.grad(loss * 3.0, xs)
    ys = leaves(x, w, b)
    ref = grads(ce_oracle(ys[0], ys[1], ys[2], t, weight=cw) * 3.0, ys)
    for a, e, f in zip(second, ref, first, strict=True):
        assert_close(a, e, F64)
        assert_close(f * 1.5, e, F64)


def test_only_weight_requires_grad(dev_backend):
    _, backend = dev_backend
    x, w, b, t, _ = make()
    w1 = w.clone().requires_grad_(True)
    loss = fusedloss.linear_cross_entropy(x, w1, t, linear_bias=b, backend=backend,
                                          chunk_size=4)
    loss.backward()
    w2 = w.clone().requires_grad_(True)
    ce_oracle(x, w2, b, t).backward()
    assert_close(w1.grad, w2.grad, F64)


def test_double_backward_raises(dev_backend):
    _, backend = dev_backend
    x, w, b, t, _ = make()
    xs = leaves(x, w, b)
    if backend == "torch":  # the reference path is plain autograd: it supports it
        return
    loss = fusedloss.linear_cross_entropy(xs[0], xs[1], t, linear_bias=xs[2], backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, xs, create_graph=True)
