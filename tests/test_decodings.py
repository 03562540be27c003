"""Decodings from the loss call and the decode-only functions, against torch.argmax /
torch.softmax / torch.sigmoid and hand-counted confusion counts, on every backend."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from helpers import assert_close


def test_softmax_decoding_with_loss(dev_backend):
    device, backend = dev_backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 3, generator=g).to(device)  # K-dim: classes on dim 1
    x[0, :, 0] = 1.0  # a tie across every class: argmax must pick index 0, like torch
    t = torch.randint(0, 11, (2, 3), generator=g).to(device)
    t[1, 2] = -100
    out = fusedloss.cross_entropy(x, t, return_decoding=True, backend=backend)
    assert_close(out.loss, F.cross_entropy(x, t), torch.float32)
    expected_pred = torch.argmax(x, dim=1)
    assert torch.equal(out.pred, expected_pred)
    assert out.pred[0, 0] == 0
    expected_conf = torch.softmax(x.double(), dim=1).max(dim=1).values
    assert out.confidence.dtype == torch.float32
    assert_close(out.confidence, expected_conf, torch.float32)
    assert torch.equal(out.correct, (expected_pred == t) & (t != -100))


def test_softmax_decoding_softcap_and_probs(dev_backend):
    device, backend = dev_backend
    x = torch.randn(5, 7, device=device) * 30
    y = torch.softmax(torch.randn(5, 7, device=device), 1)
    out = fusedloss.cross_entropy(x, y, softcap=15.0, return_decoding=True, backend=backend)
    z = 15.0 * torch.tanh(x.double() / 15.0)
    assert torch.equal(out.pred, z.argmax(1))
    assert_close(out.confidence, torch.softmax(z, 1).max(1).values, torch.float32)
    assert out.correct is None


def test_softmax_decode_only(dev_backend):
    device, backend = dev_backend
    x = torch.randn(3, 4, 9, device=device)
    x[1, 2, 4] = x[1, 2, 7] = 100.0  # tie at the max: lowest index
    dec = fusedloss.softmax_decode(x, backend=backend)
    assert torch.equal(dec.pred, torch.argmax(x, -1)) and dec.pred[1, 2] == 4
    assert_close(dec.confidence, torch.softmax(x.double(), -1).max(-1).values, torch.float32)


def test_softmax_decode_nan_row_follows_argmax(dev_backend):
    """torch.argmax treats NaN as the maximum (first NaN wins): so must pred."""
    device, backend = dev_backend
    x = torch.tensor([[0.0, float("nan"), 5.0, float("nan")], [1.0, 2.0, 3.0, 0.0]],
                     device=device)
    dec = fusedloss.softmax_decode(x, backend=backend)
    assert torch.equal(dec.pred, torch.argmax(x, -1))


def hand_counts(labels, target):
    """Loop-by-hand TP/FP/FN per class (independent of the vectorised reference)."""
    lab = labels.reshape(-1, labels.shape[-1]).tolist()
    tgt = target.reshape(-1, target.shape[-1]).tolist()
    c = len(lab[0]) if lab else labels.shape[-1]
    tp, fp, fn = [0] * c, [0] * c, [0] * c
    for row_l, row_t in zip(lab, tgt, strict=True):
        for j, (lv, tv) in enumerate(zip(row_l, row_t, strict=True)):
            pos = tv > 0.5
            tp[j] += int(lv and pos)
            fp[j] += int(lv and not pos)
            fn[j] += int((not lv) and pos)
    return torch.tensor([tp, fp, fn], dtype=torch.int64)


@pytest.mark.parametrize("target_kind", ["float", "bool", "uint8"])
def test_sigmoid_decoding_with_loss(dev_backend, target_kind):
    device, backend = dev_backend
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 5, generator=g).to(device)
    y = torch.rand(3, 6, 5, generator=g).to(device) > 0.6
    yt = {"float": y.float(), "bool": y, "uint8": y.to(torch.uint8)}[target_kind]
    thr = torch.tensor([0.5, 0.2, 0.8, 0.5, 0.99])
    out = fusedloss.binary_cross_entropy_with_logits(
        x, yt, threshold=thr, return_probs=True, return_counts=True, backend=backend)
    assert_close(out.loss, F.binary_cross_entropy_with_logits(x, y.float()), torch.float32)
    expected_labels = torch.sigmoid(x.double()).cpu() > thr.double()
    assert torch.equal(out.labels.cpu(), expected_labels)
    assert_close(out.probs, torch.sigmoid(x), torch.float32)
    assert torch.equal(out.counts.cpu(), hand_counts(expected_labels, y.float().cpu()))


def test_logit_threshold_tie_is_negative(dev_backend):
    """Decision rule is strict: x == logit_threshold is a negative."""
    device, backend = dev_backend
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]], device=device)
    dec = fusedloss.sigmoid_decode(x, logit_threshold=torch.tensor([-1.0, 0.0, 0.25, 2.0]),
                                   backend=backend)
    assert dec.labels.tolist() == [[False, False, True, False]]
    dec = fusedloss.sigmoid_decode(x, 0.5, return_probs=True, backend=backend)  # logit(.5)=0
    assert dec.labels.tolist() == [[False, False, True, True]]
    assert_close(dec.probs, torch.sigmoid(x), torch.float32)


def test_counts_soft_targets_and_empty(dev_backend):
    device, backend = dev_backend
    x = torch.tensor([[3.0, -3.0], [3.0, 3.0], [-3.0, -3.0]], device=device)
    y = torch.tensor([[0.9, 0.7], [0.2, 0.5], [0.6, 0.4]], device=device)
    out = fusedloss.binary_cross_entropy_with_logits(x, y, threshold=0.5, return_counts=True,
                                                     backend=backend)
    # by hand: class 0: TP row0, FP row1, FN row2; class 1: FN row0 (0.7), FP row1 (0.5 is not >0.5)
    assert out.counts.tolist() == [[1, 0], [1, 1], [1, 1]]
    empty = fusedloss.binary_cross_entropy_with_logits(
        torch.zeros(0, 3, device=device), torch.zeros(0, 3, device=device), threshold=0.5,
        return_counts=True, backend=backend)
    assert empty.counts.tolist() == [[0, 0, 0]] * 3 and torch.isnan(empty.loss)


def test_decode_only_outputs_carry_no_graph(dev_backend):
    device, backend = dev_backend
    x = torch.randn(3, 5, device=device, requires_grad=True)
    dec = fusedloss.softmax_decode(x, backend=backend)
    sig = fusedloss.sigmoid_decode(x, 0.5, return_probs=True, backend=backend)
    assert dec.confidence.grad_fn is None and sig.probs.grad_fn is None
    assert not dec.confidence.requires_grad and not sig.probs.requires_grad
