"""torch.export of a model whose forward ends in our losses, then trained: the exported module's
gradients must be torch's. Strict export once captured the loss's autograd.Function under
no_grad (the loss silently fell out of the parameters' gradients); non-strict export held the
fused ops, which have no autograd formula (backward raised). Oracle: the same model exported
with torch's own loss, from the same parameters."""

import copy

import pytest
import torch
import torch.nn.functional as tF

import fusedloss

ROWS, HIDDEN, CLASSES = 10, 6, 7


def _losses(backend):
    ce = (lambda z, t: fusedloss.cross_entropy(z, t, label_smoothing=0.1, backend=backend),
          lambda z, t: tF.cross_entropy(z, t, label_smoothing=0.1))
    bce = (lambda z, y: fusedloss.binary_cross_entropy_with_logits(z, y, backend=backend),
           tF.binary_cross_entropy_with_logits)
    lce = (lambda h, w, t: fusedloss.linear_cross_entropy(h, w, t, backend=backend),
           lambda h, w, t: tF.cross_entropy(tF.linear(h, w), t))
    lbce = (lambda h, w, y: fusedloss.linear_binary_cross_entropy_with_logits(
                h, w, y, backend=backend),
            lambda h, w, y: tF.binary_cross_entropy_with_logits(tF.linear(h, w), y))
    return {"ce": ce, "bce": bce, "linear_ce": lce, "linear_bce": lbce}


class Model(torch.nn.Module):
    def __init__(self, loss, linear: bool):
        super().__init__()
        self.body = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, CLASSES, bias=False)
        self.loss, self.linear = loss, linear

    def forward(self, x, t):
        h = torch.tanh(self.body(x))
        out = self.loss(h, self.head.weight, t) if self.linear else self.loss(self.head(h), t)
        # a second term: with the loss dropped from the graph, backward still ran
        return out + 1e-3 * self.body.weight.square().sum()


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "nonstrict"])
@pytest.mark.parametrize("kind", ["ce", "bce", "linear_ce", "linear_bce"])
def test_exported_model_trains_as_torch(dev_backend, kind, strict):
    device, backend = dev_backend
    if device != "cpu":
        pytest.skip("exported once on the CPU; the routing does not depend on the device")
    ours_loss, torch_loss = _losses(backend)[kind]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, HIDDEN, generator=g)
    t = (torch.rand(ROWS, CLASSES, generator=g) < 0.4).float() if kind.endswith("bce") \
        else torch.randint(0, CLASSES, (ROWS,), generator=g)
    ours = Model(ours_loss, kind.startswith("linear"))
    theirs = copy.deepcopy(ours)
    theirs.loss = torch_loss
    got = torch.export.export(ours, (x, t), strict=strict).module()
    want = torch.export.export(theirs, (x, t), strict=strict).module()
    lg, lw = got(x, t), want(x, t)
    torch.testing.assert_close(lg, lw)
    lg.backward()
    lw.backward()
    gp, wp = dict(got.named_parameters()), dict(want.named_parameters())
    assert gp.keys() == wp.keys()
    for name, p in wp.items():
        assert gp[name].grad is not None, name
        torch.testing.assert_close(gp[name].grad, p.grad, msg=name)
