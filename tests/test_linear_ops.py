"""The fused linear losses as registered ops: torch.library.opcheck of the fusedloss_linear
ops, gradcheck in float64, torch.compile(fullgraph=True) against eager, the modules, and the
errors that name the bad argument."""

import pytest
import torch

import fusedloss
from conftest import DEVICE_BACKENDS, is_slow_backend
from helpers import assert_close
from linear_oracle import bce_oracle, ce_oracle

F64 = torch.float64
# opcheck and gradcheck call the ops hundreds of times; the chunk loop they check is the same
# for every backend, so the Triton interpreter (seconds per call) is left to the parity tests.
FAST = [pytest.param(d, b, id=f"{d}-{b}") for d, b in DEVICE_BACKENDS
        if not is_slow_backend(d, b)]


def _ce_inputs(n=7, h=5, c=6, dtype=F64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=dtype)
    w = torch.randn(c, h, generator=g, dtype=dtype)
    b = torch.randn(c, generator=g, dtype=dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[2] = -100
    return x.to(device), w.to(device), b.to(device), t.to(device)


@pytest.mark.parametrize(("device", "backend"), FAST)
def test_opcheck(device, backend):
    # backend="torch": the chunked ops run with the torch backend's loss (the public functions
    # materialise the logits for it instead)
    x, w, b, t = _ce_inputs(dtype=torch.float32, device=device)
    p = torch.softmax(torch.randn(7, 6, device=device), -1)
    ops = torch.ops.fusedloss_linear
    scale = torch.tensor(0.25, device=device)
    cw = torch.rand(6, device=device) + 0.5
    torch.library.opcheck(ops.ce_fwd, (x, w, b, t, cw, scale, backend, -100, 0.1, 0.01, 3.0,
                                       3, True, True, True, False, True))
    torch.library.opcheck(ops.ce_fwd, (x, w, None, p, None, None, backend, -100, 0.0, 0.0, 0.0,
                                       4, True, False, False, True, False))
    g_rows = torch.rand(7, device=device)
    torch.library.opcheck(ops.ce_bwd_rows, (g_rows, x, w, b, t, cw, backend, -100, 0.1, 0.0, 0.0,
                                            3, True, True, True, False))
    y = (torch.rand(7, 6, device=device) > 0.5).to(torch.uint8)
    thr = torch.zeros(6, device=device)
    torch.library.opcheck(ops.bce_fwd, (x, w, b, y, None, None, scale, thr, backend, 3, True,
                                        True, True, True, False, True))
    g_elems = torch.rand(7, 6, device=device)
    torch.library.opcheck(ops.bce_bwd_elems, (g_elems, x, w, b, y.float(), None, None, backend,
                                              3, True, True, True, True))


@pytest.mark.parametrize("loss", ["ce", "ce_prob", "bce"])
@pytest.mark.parametrize(("device", "backend"), FAST)
def test_gradcheck_fp64(device, backend, loss):
    x, w, b, t = _ce_inputs(n=5, h=3, c=4, device=device)
    if loss == "ce_prob":
        t = torch.softmax(torch.randn(5, 4, dtype=F64, device=device), -1)
    if loss == "bce":
        t = torch.rand(5, 4, dtype=F64, device=device)
    args = [v.clone().requires_grad_(True) for v in (x, w, b)]
    if loss != "ce":
        args.append(t.clone().requires_grad_(True))

    def f(x, w, b, *tt):
        target = tt[0] if tt else t
        if loss == "bce":
            return fusedloss.linear_binary_cross_entropy_with_logits(
                x, w, target, linear_bias=b, reduction="none", backend=backend, chunk_size=2,
                pos_weight=torch.full((4,), 1.5, dtype=F64, device=device))
        return fusedloss.linear_cross_entropy(
            x, w, target, linear_bias=b, reduction="none", backend=backend, chunk_size=2,
            label_smoothing=0.1, lse_square_scale=0.01, softcap=2.0)

    assert torch.autograd.gradcheck(f, args)


class Head(torch.nn.Module):
    def __init__(self, kind, backend):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 6)
        self.head = torch.nn.Linear(6, 12)
        if kind == "bce":
            self.loss = fusedloss.LinearBCEWithLogitsLoss(backend=backend, threshold=0.5,
                                                          return_counts=True, chunk_size=3)
        else:
            self.loss = fusedloss.LinearCrossEntropyLoss(
                label_smoothing=0.1, softcap=5.0, backend=backend, chunk_size=3,
                reduction="none" if kind == "ce_none" else "mean",
                return_decoding=kind == "ce_none")

    def forward(self, h, target):
        return self.loss(self.proj(h), self.head.weight, target, linear_bias=self.head.bias)


# Every kind on the chunked backends that run at full speed; one on the others (the Triton
# interpreter: the 'none' path that uses both ops; the torch reference: plain autograd).
COMPILE = [pytest.param(d, b, k, id=f"{d}-{b}-{k}") for d, b in DEVICE_BACKENDS
           for k in ("ce", "ce_none", "bce")
           if (b != "torch" and not is_slow_backend(d, b))
           or k == ("ce" if b == "torch" else "ce_none")]


@pytest.mark.parametrize(("device", "backend", "kind"), COMPILE)
def test_compile_fullgraph(device, backend, kind):
    torch._dynamo.reset()
    h = torch.randn(7, 8, device=device)
    target = torch.randint(0, 12, (7,), device=device) if kind != "bce" else \
        (torch.rand(7, 12, device=device) > 0.5)
    eager, compiled = Head(kind, backend).to(device), Head(kind, backend).to(device)
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    out_e, out_c = eager(h, target), fn(h, target)
    le = out_e if torch.is_tensor(out_e) else out_e[0]
    lc = out_c if torch.is_tensor(out_c) else out_c[0]
    assert_close(lc, le, torch.float32)
    if not torch.is_tensor(out_e):
        for a, e in zip(out_c[1:], out_e[1:], strict=True):
            if a is not None:
                assert_close(a, e, torch.float32) if a.is_floating_point() \
                    else torch.testing.assert_close(a, e)
    g = torch.linspace(0.5, 2.0, le.numel()).reshape(le.shape)
    (le * g).sum().backward()
    (lc * g).sum().backward()
    for pe, pc in zip(eager.parameters(), compiled.parameters(), strict=True):
        assert_close(pc.grad, pe.grad, torch.float32)


def test_modules_equal_functionals():
    x, w, b, t = _ce_inputs()
    cw = torch.rand(6, dtype=F64) + 0.5
    m = fusedloss.LinearCrossEntropyLoss(weight=cw, label_smoothing=0.1, chunk_size=3)
    assert_close(m(x, w, t, linear_bias=b),
                 ce_oracle(x, w, b, t, weight=cw, label_smoothing=0.1), F64)
    y = torch.rand(7, 6, dtype=F64)
    pw = torch.rand(6, dtype=F64) + 0.5
    m = fusedloss.LinearBCEWithLogitsLoss(pos_weight=pw, reduction="sum", chunk_size=3)
    assert_close(m(x, w, y, linear_bias=b), bce_oracle(x, w, b, y, pos_weight=pw,
                                                       reduction="sum"), F64)


BAD_CE = [
    (dict(w=torch.randn(6, 4)), RuntimeError, "hidden size mismatch.*input.shape\\[-1\\] = 5"),
    (dict(w=torch.randn(6)), RuntimeError, "linear_weight must be 2-D"),
    (dict(b=torch.randn(5)), RuntimeError, "linear_bias must have shape \\(6,\\)"),
    (dict(w=torch.randn(6, 5, dtype=torch.float32)), RuntimeError,
     "linear_weight.dtype .* must match input.dtype"),
    (dict(b=torch.randn(6, dtype=torch.float32)), RuntimeError, "linear_bias.dtype"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int or None, got 0"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be a positive int.*float"),
    (dict(chunk_size=True), TypeError, "chunk_size must be a positive int.*bool"),
    (dict(t=torch.zeros(6, dtype=torch.int64)), ValueError, "target must have shape"),
    (dict(t=torch.zeros(7, 5, dtype=F64)), RuntimeError, "probability target must have shape"),
    (dict(t=torch.zeros(7, dtype=torch.int32)), RuntimeError, "Long or Byte"),
    (dict(weight=torch.rand(5, dtype=F64)), RuntimeError, "all 6 classes"),
    (dict(label_smoothing=1.5), RuntimeError, "label_smoothing"),  # as torch
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(reduction="avg"), ValueError, "reduction"),
]


@pytest.mark.parametrize(("bad", "exc", "match"), BAD_CE)
def test_errors_name_the_argument(bad, exc, match):
    x, w, b, t = _ce_inputs()
    args = dict(w=w, b=b, t=t)
    kw = {k: v for k, v in bad.items() if k not in args}
    args.update({k: v for k, v in bad.items() if k in args})
    with pytest.raises(exc, match=match):
        fusedloss.linear_cross_entropy(x, args["w"], args["t"], linear_bias=args["b"], **kw)
    if set(bad) & {"w", "b", "chunk_size"}:  # the shared checks: BCE says the same
        y = torch.zeros(7, args["w"].shape[0] if args["w"].dim() == 2 else 6, dtype=F64)
        with pytest.raises(exc, match=match):
            fusedloss.linear_binary_cross_entropy_with_logits(x, args["w"], y,
                                                              linear_bias=args["b"], **kw)


def test_bce_errors():
    x, w, b, _ = _ce_inputs()
    with pytest.raises(ValueError, match="target must have shape"):
        fusedloss.linear_binary_cross_entropy_with_logits(x, w, torch.zeros(7, 5))
    with pytest.raises(RuntimeError, match="target must be floating point, bool or uint8"):
        fusedloss.linear_binary_cross_entropy_with_logits(x, w, torch.zeros(7, 6,
                                                                            dtype=torch.int64))
    with pytest.raises(ValueError, match="return_counts=True needs threshold"):
        fusedloss.linear_binary_cross_entropy_with_logits(x, w, torch.zeros(7, 6, dtype=F64),
                                                          return_counts=True)
    with pytest.raises(RuntimeError, match="pos_weight of shape"):
        fusedloss.linear_binary_cross_entropy_with_logits(x, w, torch.zeros(7, 6, dtype=F64),
                                                          pos_weight=torch.ones(5, dtype=F64))
