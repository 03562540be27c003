"""Short training loops with fusedloss in place of torch.nn's loss, compared with the same loop on
torch.nn parameter by parameter after every step (every backend)."""

import pytest
import torch

import fusedloss

D, C, N, STEPS = 6, 5, 8, 4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, C)

    def forward(self, h):
        return self.head(self.body(h))


def _loop(loss_fn, device, opt_name, batches, accumulate=1):
    torch.manual_seed(0)
    net = Net().to(device)
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
           "adamw": lambda p: torch.optim.AdamW(p, lr=0.05)}[opt_name](net.parameters())
    history = []
    for step, (h, t) in enumerate(batches):
        loss = loss_fn(net(h), t) / accumulate
        loss.backward()
        if (step + 1) % accumulate == 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=step % 2 == 0)
        history.append([p.detach().clone() for p in net.parameters()])
    return history


def _batches(device, multilabel):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        h = torch.randn(N, D, generator=g).to(device)
        t = (torch.rand(N, C, generator=g) > 0.6).float() if multilabel else \
            torch.randint(0, C, (N,), generator=g)
        out.append((h, t.to(device)))
    return out


def _assert_same_trajectory(ours, theirs):
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for i, (pa, pb) in enumerate(zip(a, b, strict=True)):
            torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, s=step, j=i: f"step {s} param {j}: {m}")


@pytest.mark.parametrize("opt_name,accumulate", [("sgd", 1), ("adamw", 2)])
def test_classifier_training_matches_torch(dev_backend, opt_name, accumulate):
    device, backend = dev_backend
    w = torch.linspace(0.5, 1.5, C, device=device)
    kw = dict(weight=w, label_smoothing=0.1, ignore_index=3)
    batches = _batches(device, multilabel=False)
    ours = _loop(fusedloss.CrossEntropyLoss(**kw, backend=backend), device, opt_name, batches,
                 accumulate)
    theirs = _loop(torch.nn.CrossEntropyLoss(**kw), device, opt_name, batches, accumulate)
    _assert_same_trajectory(ours, theirs)


def test_multilabel_training_matches_torch(dev_backend):
    device, backend = dev_backend
    pw = torch.linspace(0.5, 3.0, C, device=device)
    batches = _batches(device, multilabel=True)
    ours = _loop(fusedloss.BCEWithLogitsLoss(pos_weight=pw, backend=backend), device, "adamw",
                 batches)
    theirs = _loop(torch.nn.BCEWithLogitsLoss(pos_weight=pw), device, "adamw", batches)
    _assert_same_trajectory(ours, theirs)


def test_sequence_model_training_matches_torch(dev_backend):
    """K-dim logits (N, C, L) and the functional form, as token classifiers call it."""
    device, backend = dev_backend
    g = torch.Generator().manual_seed(2)
    seqs = [(torch.randn(2, 3, D, generator=g).to(device),
             torch.randint(0, C, (2, 3), generator=g).to(device)) for _ in range(STEPS)]

    def ours(logits, t):
        return fusedloss.cross_entropy(logits.transpose(1, 2), t, backend=backend)

    def theirs(logits, t):
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), t)

    _assert_same_trajectory(_loop(ours, device, "sgd", seqs), _loop(theirs, device, "sgd", seqs))
