"""torch.compile(fullgraph=True) of a model ending in each loss: no graph break, same values and
gradients as eager, on every backend (the ops are traced through their fake kernels)."""

import pytest
import torch

import fusedloss
from helpers import assert_close


class Head(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 12)
        self.loss = loss

    def forward(self, h, target):
        return self.loss(self.proj(h), target)


@pytest.mark.parametrize("kind", ["ce", "ce_none_decode", "bce", "bce_decode"])
def test_compile_fullgraph(dev_backend, kind):
    device, backend = dev_backend
    torch._dynamo.reset()
    h = torch.randn(5, 8, device=device)
    if kind.startswith("ce"):
        target = torch.randint(0, 12, (5,), device=device)
        loss = fusedloss.CrossEntropyLoss(
            label_smoothing=0.1, lse_square_scale=1e-3, backend=backend,
            reduction="none" if kind == "ce_none_decode" else "mean",
            return_decoding=kind == "ce_none_decode")
    else:
        target = (torch.rand(5, 12, device=device) > 0.5).float()
        loss = fusedloss.BCEWithLogitsLoss(
            pos_weight=torch.rand(12, device=device) + 0.5, backend=backend,
            threshold=0.5 if kind == "bce_decode" else None,
            return_counts=kind == "bce_decode")
    eager = Head(loss).to(device)
    compiled = Head(loss).to(device)
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager" if device == "cpu" and
                       backend == "triton" else "inductor")
    out_e = eager(h, target)
    out_c = fn(h, target)
    le = out_e if torch.is_tensor(out_e) else out_e[0]
    lc = out_c if torch.is_tensor(out_c) else out_c[0]
    assert_close(lc, le, torch.float32)
    if not torch.is_tensor(out_e):
        for a, b in zip(out_c[1:], out_e[1:], strict=True):
            if a is not None:
                assert torch.equal(a, b) if not a.is_floating_point() else \
                    torch.allclose(a, b, atol=1e-6)
    le.sum().backward()
    lc.sum().backward()
    for pe, pc in zip(eager.parameters(), compiled.parameters(), strict=True):
        assert_close(pc.grad, pe.grad, torch.float32)
