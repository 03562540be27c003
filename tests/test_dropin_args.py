"""Arguments as existing code passes them, on every backend, against torch.nn.functional: types
torch rejects (same exception type), mixed dtypes torch promotes, non-contiguous and expanded
tensors, module state (state_dict, deepcopy, pickle) and TorchScript."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from helpers import assert_close, assert_no_worse_than_torch

R, C = 4, 6


def _x(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(R, C, generator=g, dtype=torch.float64)).to(device, dtype)


def _t(device):
    return torch.tensor([0, 5, 2, 1], device=device)


@pytest.mark.parametrize("value", [1.5, True, "1", None], ids=["float", "bool", "str", "none"])
def test_ignore_index_must_be_int(dev_backend, value):
    device, backend = dev_backend
    x, t = _x(device), _t(device)
    with pytest.raises(TypeError):
        F.cross_entropy(x, t, ignore_index=value)
    with pytest.raises(TypeError, match="ignore_index"):
        fusedloss.cross_entropy(x, t, ignore_index=value, backend=backend)


def test_number_arguments_torch_accepts(dev_backend):
    """An int label_smoothing and 0-dim tensors for ignore_index/label_smoothing work in
    torch; they work here with the same values."""
    device, backend = dev_backend
    x, t = _x(device), _t(device)
    for kw in (dict(label_smoothing=1), dict(ignore_index=torch.tensor(5)),
               dict(label_smoothing=torch.tensor(0.25))):
        assert_close(fusedloss.cross_entropy(x, t, **kw, backend=backend),
                     F.cross_entropy(x, t, **kw), torch.float32, msg=str(kw))
    with pytest.raises(TypeError, match="label_smoothing"):
        fusedloss.cross_entropy(x, t, label_smoothing="0.1", backend=backend)


# (input dtype, target dtype, weight dtype): torch's result is the promoted dtype
MIXED = [(torch.bfloat16, torch.float32, None), (torch.float32, torch.float64, None),
         (torch.float32, torch.float32, torch.float64), (torch.bfloat16, torch.bfloat16,
                                                         torch.float32),
         (torch.float64, torch.float32, None)]


@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: str(d).replace("torch.", ""))
def test_probability_targets_with_mixed_dtypes_promote(dev_backend, dtypes):
    device, backend = dev_backend
    xd, td, wd = dtypes
    x = _x(device, xd)
    y = torch.softmax(_x(device, torch.float64, seed=1), -1).to(td)
    w = None if wd is None else torch.linspace(0.5, 2, C, device=device, dtype=wd)
    ours = fusedloss.cross_entropy(x, y, w, backend=backend)
    theirs = F.cross_entropy(x, y, w)
    assert ours.dtype == theirs.dtype
    ref = F.cross_entropy(x.double(), y.double(), None if w is None else w.double())
    assert_no_worse_than_torch(ours, theirs, ref, msg=str(dtypes))


def test_bce_mixed_target_dtype(dev_backend):
    """torch's result has the target's dtype (torch computes the bf16 input's part at bf16
    precision; we compute in fp32)."""
    device, backend = dev_backend
    x = _x(device, torch.bfloat16)
    y = torch.rand(R, C, device=device)
    ours = fusedloss.binary_cross_entropy_with_logits(x, y, reduction="none", backend=backend)
    theirs = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert ours.dtype == theirs.dtype == torch.float32
    ref = F.binary_cross_entropy_with_logits(x.double(), y.double(), reduction="none")
    assert_no_worse_than_torch(ours, theirs, ref)


def _strided(device, kind, n, dtype=torch.float32):
    """A (n,) tensor that is a slice with stride 2, or a stride-0 expansion of one value."""
    if kind == "sliced":
        return torch.linspace(0.5, 2.0, 2 * n, device=device, dtype=dtype)[1::2]
    return torch.tensor(1.7, device=device, dtype=dtype).expand(n)


@pytest.mark.parametrize("kind", ["sliced", "expanded"])
def test_strided_class_weight(dev_backend, kind):
    device, backend = dev_backend
    x, t = _x(device), _t(device)
    w = _strided(device, kind, C)
    for red in ("mean", "none"):
        assert_close(fusedloss.cross_entropy(x, t, w, reduction=red, backend=backend),
                     F.cross_entropy(x, t, w, reduction=red), torch.float32, msg=red)


@pytest.mark.parametrize("kind", ["sliced", "expanded"])
def test_strided_bce_weights_and_target(dev_backend, kind):
    device, backend = dev_backend
    x = _x(device).requires_grad_()
    w, pw = _strided(device, kind, C), _strided(device, kind, C)
    y = torch.rand(C, 2 * R, device=device).t()[::2] if kind == "sliced" else \
        torch.rand(1, C, device=device).expand(R, C)
    got = fusedloss.binary_cross_entropy_with_logits(x, y, w, pos_weight=pw, backend=backend)
    gx, = torch.autograd.grad(got, x)
    want = F.binary_cross_entropy_with_logits(x, y, w, pos_weight=pw)
    wx, = torch.autograd.grad(want, x)
    assert_close(got, want, torch.float32)
    assert_close(gx, wx, torch.float32)


def test_expanded_and_transposed_logits(dev_backend):
    device, backend = dev_backend
    t = _t(device)
    for x in (_x(device)[:1].expand(R, C), _x(device).t().contiguous().t(),
              torch.randn(C, R, device=device).t()):
        x = x.detach().requires_grad_()
        got = fusedloss.cross_entropy(x, t, backend=backend)
        gx, = torch.autograd.grad(got, x)
        want = F.cross_entropy(x, t)
        wx, = torch.autograd.grad(want, x)
        assert_close(got, want, torch.float32)
        assert_close(gx, wx, torch.float32)


def _modules(backend, device):
    w = torch.linspace(0.5, 2.0, C, device=device)
    return [(fusedloss.CrossEntropyLoss(w, label_smoothing=0.1, backend=backend),
             torch.nn.CrossEntropyLoss(w, label_smoothing=0.1), _t(device)),
            (fusedloss.BCEWithLogitsLoss(w, pos_weight=w.flip(0), backend=backend),
             torch.nn.BCEWithLogitsLoss(w, pos_weight=w.flip(0)),
             torch.rand(R, C, device=device))]


def test_module_state_dict_matches_torch(dev_backend):
    device, backend = dev_backend
    for ours, theirs, _ in _modules(backend, device):
        sd, td = ours.state_dict(), theirs.state_dict()
        assert list(sd) == list(td)
        for k in td:
            assert torch.equal(sd[k], td[k])
        fresh = type(ours)(backend=backend)
        fresh.load_state_dict(td, strict=False)  # torch's state loads into ours


def test_module_deepcopy_pickle_and_save(dev_backend):
    device, backend = dev_backend
    x = _x(device)
    for ours, theirs, tgt in _modules(backend, device):
        want = theirs(x, tgt)
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        copies = [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)),
                  torch.load(buf, weights_only=False)]
        for m in copies:
            assert m.weight is not ours.weight
            assert_close(m(x, tgt), want, torch.float32, msg=type(m).__name__)


def test_module_moves_with_to(dev_backend):
    device, backend = dev_backend
    for ours, theirs, tgt in _modules(backend, device):
        ours.double()
        theirs.double()
        assert ours.weight.dtype == theirs.weight.dtype == torch.float64
        x = _x(device, torch.float64)
        assert_close(ours(x, tgt.double() if tgt.is_floating_point() else tgt),
                     theirs(x, tgt.double() if tgt.is_floating_point() else tgt),
                     torch.float64)


def test_torchscript_gives_a_clear_error(dev_backend):
    device, backend = dev_backend
    for ours, _, _ in _modules(backend, device):
        with pytest.raises(RuntimeError, match="TorchScript"):
            torch.jit.script(ours)
        with pytest.raises(RuntimeError, match="TorchScript"):
            torch.jit.script(torch.nn.Sequential(torch.nn.Identity(), ours))


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (the type is what is compared)
        return type(e)
    return None


BAD_TARGETS = [  # (id, input, target): torch checks the batch size before the dtype and rank
    ("probability target, short batch", lambda x: x, lambda x: x.softmax(1)[:3]),
    ("index target (2, 2) for 4 rows", lambda x: x, lambda x: torch.zeros(2, 2, dtype=torch.long,
                                                                            device=x.device)),
    ("(C,) input, (1, 1) target", lambda x: x[0], lambda x: torch.ones(1, 1, dtype=torch.long,
                                                                        device=x.device)),
    ("(C,) input, 3 targets", lambda x: x[0], lambda x: torch.ones(3, dtype=torch.long,
                                                                   device=x.device)),
    # torch's spatial losses take Long targets only (uint8 works for (N, C) inputs alone)
    ("K-dim input, uint8 target", lambda x: x.reshape(2, 3, 4),
     lambda x: torch.ones(2, 4, dtype=torch.uint8, device=x.device)),
]


@pytest.mark.parametrize("case", BAD_TARGETS, ids=[c[0] for c in BAD_TARGETS])
def test_bad_target_raises_torchs_exception_type(dev_backend, case):
    device, backend = dev_backend
    _, make_x, make_t = case
    x = _x(device)
    want = _raised(lambda: F.cross_entropy(make_x(x), make_t(x)))
    assert want is not None
    assert _raised(lambda: fusedloss.cross_entropy(make_x(x), make_t(x), backend=backend)) is want


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_unbatched_input_with_one_element_target(dev_backend, reduction):
    # a (C,) input with a (1,) target gives a 0-d loss in torch, as with a () target
    device, backend = dev_backend
    x = _x(device)[0]
    t = torch.tensor([2], device=device)
    got = fusedloss.cross_entropy(x, t, reduction=reduction, backend=backend)
    want = F.cross_entropy(x, t, reduction=reduction)
    assert got.shape == want.shape == ()
    assert_close(got, want, torch.float32)


def test_module_weight_must_be_a_tensor():
    for cls, theirs in ((fusedloss.CrossEntropyLoss, torch.nn.CrossEntropyLoss),
                        (fusedloss.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss)):
        with pytest.raises(TypeError):
            theirs(weight=[1.0] * C)
        with pytest.raises(TypeError, match="weight must be a Tensor or None, got list"):
            cls(weight=[1.0] * C)
    with pytest.raises(TypeError):
        torch.nn.BCEWithLogitsLoss(pos_weight=[1.0] * C)
    with pytest.raises(TypeError, match="pos_weight must be a Tensor or None, got list"):
        fusedloss.BCEWithLogitsLoss(pos_weight=[1.0] * C)


@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"label_smoothing": 0.1},
                                {"weight": "w"}, {"probability_target": True}],
                         ids=["mean", "none", "smoothing", "weight", "probabilities"])
def test_meta_tensors_propagate_shapes(kw):
    # Shape propagation on the meta device (no data), as torch's loss does it: backend="auto"
    # resolves to the torch backend there, whose target-range check read the data (.item()).
    kw = dict(kw)
    x = torch.randn(R, C, device="meta", requires_grad=True)
    t = torch.randint(0, C, (R,)).to("meta")
    if kw.pop("probability_target", False):
        t = torch.rand(R, C, device="meta")
    if kw.get("weight") == "w":
        kw["weight"] = torch.ones(C, device="meta")
    got = fusedloss.cross_entropy(x, t, **kw)
    want = F.cross_entropy(x, t, **kw)
    assert (got.device.type, got.shape, got.dtype) == ("meta", want.shape, want.dtype)
    g, = torch.autograd.grad(got.sum(), x)
    assert (g.device.type, g.shape) == ("meta", x.shape)


def test_nan_label_smoothing_says_nan():
    with pytest.raises(ValueError, match="label_smoothing must be a number, got nan"):
        fusedloss.cross_entropy(_x("cpu"), _t("cpu"), label_smoothing=float("nan"))


def test_decoding_arguments_checked_as_the_losses_check_them(dev_backend):
    device, backend = dev_backend
    x = _x(device)
    for cap in (0.0, float("inf")):  # 0 was taken as "off" by softmax_decode alone
        with pytest.raises(ValueError, match="softcap"):
            fusedloss.softmax_decode(x, softcap=cap, backend=backend)
        with pytest.raises(ValueError, match="softcap"):
            fusedloss.cross_entropy(x, _t(device), softcap=cap, backend=backend)
    for kw in (dict(threshold=torch.full((C,), 0.5 + 0.1j)),  # the imaginary part was dropped
               dict(logit_threshold=torch.zeros(C, dtype=torch.complex64))):
        with pytest.raises(TypeError, match="must be real"):
            fusedloss.sigmoid_decode(x, backend=backend, **kw)
    with pytest.raises(RuntimeError, match="meta"):
        fusedloss.binary_cross_entropy_with_logits(
            x, torch.zeros_like(x), threshold=torch.full((C,), 0.5, device="meta"),
            backend=backend)
