"""torch.compile(dynamic=True, fullgraph=True) of the modules: Python numbers become symbolic
while tracing, and validation must not break on them. Values and gradients against torch.nn over
several shapes through one compiled module."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from helpers import assert_close

SHAPES = [(4, 5), (3, 7)]


def _compile(module, device, backend, compiler):
    torch._dynamo.reset()
    if compiler == "inductor" and backend == "triton" and device == "cpu":
        compiler = "aot_eager"  # Triton kernels under the interpreter cannot be inlined
    return torch.compile(module, dynamic=True, fullgraph=True, backend=compiler)


def _check(fn, theirs, make, device):
    for rows, classes in SHAPES:
        x = torch.randn(rows, classes, device=device, requires_grad=True)
        t = make(rows, classes)
        loss = fn(x, t)
        loss.backward()
        xr = x.detach().clone().requires_grad_()
        want = theirs(xr, t)
        want.backward()
        assert_close(loss, want, torch.float32, msg=f"{rows}x{classes}")
        assert_close(x.grad, xr.grad, torch.float32, msg=f"{rows}x{classes}")


def test_ce_module_dynamic_fullgraph(dev_backend, request, compiler="aot_eager"):
    device, backend = dev_backend
    m = fusedloss.CrossEntropyLoss(label_smoothing=0.1, lse_square_scale=1e-3, ignore_index=1,
                                   backend=backend)
    fn = _compile(m, device, backend, compiler)

    def theirs(x, t):
        valid = (t != 1).sum()
        z = 1e-3 * (torch.logsumexp(x, 1) ** 2 * (t != 1)).sum() / valid
        return F.cross_entropy(x, t, label_smoothing=0.1, ignore_index=1) + z

    _check(fn, theirs, lambda r, c: torch.randint(0, c, (r,), device=device), device)


def test_bce_module_dynamic_fullgraph(dev_backend, compiler="aot_eager"):
    device, backend = dev_backend
    m = fusedloss.BCEWithLogitsLoss(reduction="sum", backend=backend)
    fn = _compile(m, device, backend, compiler)
    _check(fn, lambda x, t: F.binary_cross_entropy_with_logits(x, t, reduction="sum"),
           lambda r, c: torch.rand(r, c, device=device), device)


def test_functional_dynamic_with_python_float_arguments(dev_backend, request):
    """Floats passed per call (a schedule for label smoothing) are traced, not specialised
    into a failing check."""
    device, backend = dev_backend
    torch._dynamo.reset()

    def step(x, t, eps):
        return fusedloss.cross_entropy(x, t, label_smoothing=eps, backend=backend)

    fn = torch.compile(step, dynamic=True, fullgraph=True, backend="aot_eager")
    for eps, (rows, classes) in zip([0.05, 0.2], SHAPES, strict=True):
        x = torch.randn(rows, classes, device=device)
        t = torch.randint(0, classes, (rows,), device=device)
        assert_close(fn(x, t, eps), F.cross_entropy(x, t, label_smoothing=eps), torch.float32)


# Inductor (the default compiler) once, on the fastest backend: its C++ compile is slow here.
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_ce_module_dynamic_fullgraph_inductor(device, request):
    backend = fusedloss.available_backends(device)[0]
    test_ce_module_dynamic_fullgraph((device, backend), request, compiler="inductor")


@pytest.mark.parametrize("requires_grad", [False, True])
def test_bce_fullgraph_with_and_without_grad(dev_backend, requires_grad):
    # An evaluation loop: no input requires grad (fullgraph tracing of the BCE Function failed
    # there, AttributeError on its config, while CE and requires_grad=True worked).
    device, backend = dev_backend
    x = torch.randn(4, 5, device=device, requires_grad=requires_grad)
    y = torch.rand(4, 5, device=device)
    pw = torch.linspace(0.5, 2.0, 5, device=device)
    fn = _compile(lambda a, b: fusedloss.binary_cross_entropy_with_logits(
        a, b, pos_weight=pw, backend=backend), device, backend, "aot_eager")
    assert_close(fn(x, y), F.binary_cross_entropy_with_logits(x, y, pos_weight=pw),
                 torch.float32)
    with torch.no_grad():
        m = _compile(fusedloss.BCEWithLogitsLoss(backend=backend), device, backend, "aot_eager")
        assert_close(m(x, y), F.binary_cross_entropy_with_logits(x, y), torch.float32)


def test_python_float_thresholds_trace_without_graph_breaks(dev_backend):
    # Default torch.compile (not fullgraph) of a validation step with a Python-float threshold:
    # the threshold's conversion to logit space once went through a tensor and `.item()`, four
    # graph breaks per call. Each float value must still give its own labels (torch.logit of
    # the float, float64, then the largest fp32 at or below it).
    device, backend = dev_backend
    x = torch.randn(64, 5, device=device)
    y = (torch.rand(64, 5, device=device) > 0.5).float()

    def step(a, b, threshold=None, logit_threshold=None):
        o = fusedloss.binary_cross_entropy_with_logits(
            a, b, threshold=threshold, logit_threshold=logit_threshold, return_counts=True,
            backend=backend)
        return o.loss, o.labels, o.counts

    for kw in ({"threshold": 0.3}, {"logit_threshold": -0.25}):
        torch._dynamo.reset()
        assert torch._dynamo.explain(step)(x, y, **kw).graph_break_count == 0, kw
    torch._dynamo.reset()
    fn = torch.compile(step, backend="aot_eager")
    for t in (0.3, 0.7, 0.55):
        cut = torch.logit(torch.tensor(t, dtype=torch.float64)).item()
        assert torch.equal(fn(x, y, threshold=t)[1], x.double() > cut), t
        assert torch.equal(fn(x, y, logit_threshold=cut)[1], x.double() > cut), t
