"""fusedloss.linear_binary_cross_entropy_with_logits against
binary_cross_entropy_with_logits(F.linear(...)) on materialised logits: loss and gradients
(input, linear weight, bias, float target), weight/pos_weight, every reduction, bool/uint8
targets, labels and per-class counts from the thresholded logits."""

import pytest
import torch
import torch.nn.functional as tF

import fusedloss
from conftest import DEVICE_BACKENDS, is_slow_backend
from fusedloss import _backend
from helpers import assert_close, assert_no_worse_than_torch
from linear_oracle import bce_oracle, grads, leaves

F64 = torch.float64
OPTIONS = ("plain", "weights", "float_target_grad", "bool", "uint8")
FAST_OPTIONS = ("weights", "uint8")  # the Triton interpreter (slow) runs only these


def backend_cases(values, fast):
    return [pytest.param(d, b, v, id=f"{d}-{b}-{v}") for d, b in DEVICE_BACKENDS
            for v in values if v in fast or not is_slow_backend(d, b)]


def make(n=13, h=8, c=10, dtype=F64, bias=True, batch=None, seed=0, target="float"):
    g = torch.Generator().manual_seed(seed)
    shape = batch if batch is not None else (n,)
    x = torch.randn(*shape, h, generator=g, dtype=dtype)
    w = torch.randn(c, h, generator=g, dtype=dtype) / h ** 0.5 * 3
    b = torch.randn(c, generator=g, dtype=dtype) if bias else None
    y = torch.rand(*shape, c, generator=g, dtype=dtype)
    if target in ("bool", "uint8"):
        y = (y > 0.6).to(getattr(torch, target))
    return x, w, b, y


def run_both(backend, x, w, b, y, opts, reduction, chunk_size, target_grad=False):
    """(ours, oracle) as [loss, d input, d weight, d bias, d target]."""
    xs = leaves(x, w, b, y if target_grad else None)
    ours = fusedloss.linear_binary_cross_entropy_with_logits(
        xs[0], xs[1], xs[3] if target_grad else y, linear_bias=xs[2], reduction=reduction,
        backend=backend, chunk_size=chunk_size, **opts)
    ys = leaves(x, w, b, y if target_grad else None)
    ref = bce_oracle(ys[0], ys[1], ys[2], ys[3] if target_grad else y, reduction=reduction,
                     **opts)
    grad_out = None
    if reduction == "none":
        grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7),
                               dtype=ref.dtype)
    return [ours, *grads(ours, xs, grad_out)], [ref, *grads(ref, ys, grad_out)]


def compare(ours, ref, dtype, what=""):
    names = ["loss", "grad input", "grad linear_weight", "grad linear_bias", "grad target"]
    for name, a, e in zip(names, ours, ref, strict=True):
        assert (a is None) == (e is None), f"{what} {name}: presence differs"
        if a is not None:
            assert a.shape == e.shape and a.dtype == e.dtype, f"{what} {name}"
            assert_close(a, e, dtype, msg=f"{what} {name}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("device", "backend", "option"), backend_cases(OPTIONS, FAST_OPTIONS))
def test_parity_fp64(device, backend, option, reduction):
    kind = option if option in ("bool", "uint8") else "float"
    x, w, b, y = make(target=kind)
    g = torch.Generator().manual_seed(3)
    opts = {}
    if option in ("weights", "uint8"):
        opts = dict(weight=torch.rand(13, 1, generator=g, dtype=F64) + 0.5,
                    pos_weight=torch.rand(10, generator=g, dtype=F64) * 3)
    ours, ref = run_both(backend, x, w, b, y, opts, reduction, chunk_size=5,
                         target_grad=option == "float_target_grad")
    compare(ours, ref, F64, f"{option}/{reduction}")


@pytest.mark.parametrize(("device", "backend", "chunk_size"),
                         backend_cases([1, 4, 13, None], (4, None)))
def test_chunks_kdim_no_bias(device, backend, chunk_size):
    x, w, b, y = make(batch=(3, 5), bias=False, target="uint8")
    for reduction in ("mean", "none"):
        ours, ref = run_both(backend, x, w, b, y, {}, reduction, chunk_size)
        compare(ours, ref, F64, f"chunk_size={chunk_size}/{reduction}")


@pytest.mark.parametrize("n", [0, 1])
def test_edges(dev_backend, n):
    _, backend = dev_backend
    x, w, b, y = make(n=n)
    for reduction in ("mean", "sum", "none"):
        ours, ref = run_both(backend, x, w, b, y, {}, reduction, chunk_size=4)
        compare(ours, ref, F64, f"n={n}/{reduction}")


def test_bf16_no_worse_than_torch(dev_backend):
    device, backend = dev_backend
    n, c = (24, 40) if is_slow_backend(device, backend) else (200, 300)
    x, w, b, y = make(n=n, h=32, c=c, target="bool")
    _, ref64 = run_both(backend, x, w, b, y, {}, "mean", chunk_size=64)
    lp = [v.to(torch.bfloat16) for v in (x, w, b)]
    ours, torch_bf16 = run_both(backend, *lp, y, {}, "mean", chunk_size=64)
    for name, a, tb, e in zip(["loss", "input", "weight", "bias"], ours[:4], torch_bf16[:4],
                                  ref64[:4], strict=True):
        assert a.dtype == torch.bfloat16
        assert_no_worse_than_torch(a, tb, e, msg=name)


@pytest.mark.parametrize("how", ["threshold", "logit_threshold", "per_class"])
def test_labels_and_counts(dev_backend, how):
    _, backend = dev_backend
    x, w, b, y = make(n=17, c=9, dtype=torch.float32, target="uint8")
    z = tF.linear(x, w, b)
    kw = {"threshold": dict(threshold=0.7), "logit_threshold": dict(logit_threshold=-0.3),
          "per_class": dict(logit_threshold=torch.linspace(-1, 1, 9))}[how]
    thr = {"threshold": torch.logit(torch.tensor(0.7, dtype=F64)).float(),
           "logit_threshold": torch.tensor(-0.3), "per_class": torch.linspace(-1, 1, 9)}[how]
    out = fusedloss.linear_binary_cross_entropy_with_logits(
        x, w, y, linear_bias=b, backend=backend, return_counts=True, chunk_size=5, **kw)
    labels = z > thr
    assert torch.equal(out.labels, labels)
    pos = y.bool()
    expected = torch.stack([(labels & pos).sum(0), (labels & ~pos).sum(0),
                            (~labels & pos).sum(0)])
    assert torch.equal(out.counts, expected)
    assert out.probs is None
    assert_close(out.loss, bce_oracle(x, w, b, y), torch.float32)


def test_uint8_target_reaches_the_op_as_uint8(dev_backend, monkeypatch):
    """The uint8 multi-hot target is handed to the backend's loss op as uint8 row slices of
    the caller's tensor (no float copy of it), in forward and in the 'none' backward."""
    _, backend = dev_backend
    if backend == "torch":  # the reference path hands it to the torch backend's loss
        return
    import fusedloss.linear_bce as lb

    real_get = lb._backend.get
    seen = []

    class Spy:
        def __init__(self, ops):
            self.ops = ops

        def __getattr__(self, name):
            return getattr(self.ops, name)

        def sigmoid_bce_fwd(self, logits, target, *args):
            seen.append((target.dtype, target.untyped_storage().data_ptr()))
            return self.ops.sigmoid_bce_fwd(logits, target, *args)

    class B:
        def __init__(self, b):
            self.name, self.ops = b.name, Spy(b.ops)

    monkeypatch.setattr(lb._backend, "get", lambda name, dev: B(real_get(name, dev)))
    x, w, b, y = make(target="uint8", dtype=torch.float32)
    for reduction in ("mean", "none"):
        xs = leaves(x, w, b)
        loss = fusedloss.linear_binary_cross_entropy_with_logits(
            xs[0], xs[1], y, linear_bias=xs[2], backend=backend, chunk_size=4,
            reduction=reduction)
        loss.sum().backward()
        assert_close(loss, bce_oracle(x, w, b, y, reduction=reduction), torch.float32)
    assert len(seen) == 4 + 8 and all(s == (torch.uint8, y.untyped_storage().data_ptr())
                                      for s in seen)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("device", "backend", "option"),
                         backend_cases(("weights", "float_target_grad", "uint8"), ("uint8",)))
def test_sub_blocks_write_the_gradient_over_the_logits(device, backend, option, reduction,
                                                       monkeypatch):
    """Each chunk's loss op runs on row blocks of the logits buffer and each block's gradient
    is copied back over its logits (one block of op output alive, not a second (rows, C)
    buffer). Forced to 1-row blocks here: loss, every gradient, labels and counts equal the
    oracle on the materialised logits, and the op's outputs are one block each."""
    import fusedloss.linear_bce as lb
    import fusedloss.linear_chunks as lc
    monkeypatch.setattr(lc, "BCE_MIN_SUB_BLOCK", 1)
    ops = _backend.get(backend, torch.device(device)).ops
    real, shapes = ops.sigmoid_bce_fwd, []

    class Spy:
        def __getattr__(self, name):
            return getattr(ops, name)

        def sigmoid_bce_fwd(self, logits, *args):
            shapes.append(logits.shape[0])
            return real(logits, *args)

    class B:
        name = backend

    B.ops = Spy()
    monkeypatch.setattr(lb._backend, "get", lambda name, dev: B)
    kind = option if option == "uint8" else "float"
    x, w, b, y = make(n=13, target=kind)
    g = torch.Generator().manual_seed(3)
    opts = dict(weight=torch.rand(13, 1, generator=g, dtype=F64) + 0.5,
                pos_weight=torch.rand(10, generator=g, dtype=F64) * 3)
    ours, ref = run_both(backend, x, w, b, y, opts, reduction, chunk_size=8,
                         target_grad=option == "float_target_grad")
    compare(ours, ref, F64, f"{option}/{reduction}")
    if backend != "torch":  # the torch backend computes the loss of F.linear (no chunks)
        assert shapes and max(shapes) == 1  # chunks of 8 and 5 rows went in blocks of 1
    out = fusedloss.linear_binary_cross_entropy_with_logits(
        x, w, y, linear_bias=b, backend=backend, chunk_size=8, logit_threshold=0.1,
        return_counts=True)
    labels, pos = tF.linear(x, w, b) > 0.1, y > 0.5
    assert torch.equal(out.labels, labels)
    assert torch.equal(out.counts, torch.stack([(labels & pos).sum(0), (labels & ~pos).sum(0),
                                                (~labels & pos).sum(0)]))
