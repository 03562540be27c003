"""Bad input: the same exception type torch raises (ValueError where torch has no opinion), with
a message naming the argument, on every backend."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss


def torch_error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e)
    return None


X = torch.randn(4, 5)
T = torch.tensor([0, 1, 2, 3])

# (case id, kwargs for both, words our message must contain)
CE_BAD = [
    ("target_out_of_range", dict(input=X, target=torch.tensor([0, 1, 2, 5])), "5"),
    ("negative_target", dict(input=X, target=torch.tensor([0, -1, 2, 3])), "-1"),
    ("negative_target_ignore_other", dict(input=X, target=torch.tensor([0, -2, 2, 3]),
                                          ignore_index=-1), "-2"),
    ("target_batch_mismatch", dict(input=X, target=torch.tensor([0, 1, 2])), "batch_size"),
    ("target_2d", dict(input=X, target=torch.zeros(4, 1, dtype=torch.long)), "target"),
    ("target_int32", dict(input=X, target=T.int()), "target"),
    ("target_float_1d", dict(input=X, target=T.float()), "target"),
    ("prob_target_wrong_shape", dict(input=X, target=torch.rand(4, 6)), "target"),
    ("kdim_size_mismatch", dict(input=torch.randn(2, 5, 3), target=torch.zeros(2, 4,
                                                                             dtype=torch.long)),
     "size mismatch"),
    ("weight_wrong_length", dict(input=X, target=T, weight=torch.ones(4)), "weight"),
    ("weight_2d", dict(input=X, target=T, weight=torch.ones(1, 5)), "weight"),
    ("weight_dtype", dict(input=X, target=T, weight=torch.ones(5, dtype=torch.float64)),
     "weight"),
    ("label_smoothing_above_1", dict(input=X, target=T, label_smoothing=1.5), "label_smoothing"),
    ("reduction_unknown", dict(input=X, target=T, reduction="avg"), "reduction"),
    ("input_integer", dict(input=X.long(), target=T), "input"),
    ("ignore_index_with_probs", dict(input=X, target=torch.rand(4, 5), ignore_index=1),
     "ignore_index"),
]


@pytest.mark.parametrize("case", CE_BAD, ids=[c[0] for c in CE_BAD])
def test_ce_bad_input_matches_torch(dev_backend, case):
    device, backend = dev_backend
    _, kw, word = case
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    expected = torch_error(lambda: F.cross_entropy(**kw))
    assert expected is not None, "torch accepts this input: the case is wrong"
    with pytest.raises(expected) as info:
        fusedloss.cross_entropy(**kw, backend=backend)
    assert word in str(info.value)


BCE_BAD = [
    ("target_shape", dict(input=X, target=torch.rand(4, 6)), "size"),
    ("target_broadcastable_only", dict(input=X, target=torch.rand(1, 5)), "size"),
    ("target_long", dict(input=X, target=torch.ones(4, 5, dtype=torch.long)), "target"),
    ("pos_weight_no_broadcast", dict(input=X, target=torch.rand(4, 5),
                                     pos_weight=torch.ones(4)), "pos_weight"),
    ("pos_weight_too_big", dict(input=X, target=torch.rand(4, 5),
                                pos_weight=torch.ones(3, 4, 5)), "pos_weight"),
    ("weight_no_broadcast", dict(input=X, target=torch.rand(4, 5), weight=torch.ones(4)),
     "weight"),
    ("reduction_unknown", dict(input=X, target=torch.rand(4, 5), reduction="x"), "reduction"),
    ("input_integer", dict(input=X.long(), target=torch.rand(4, 5)), "input"),
]


@pytest.mark.parametrize("case", BCE_BAD, ids=[c[0] for c in BCE_BAD])
def test_bce_bad_input_matches_torch(dev_backend, case):
    device, backend = dev_backend
    _, kw, word = case
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    expected = torch_error(lambda: F.binary_cross_entropy_with_logits(**kw))
    assert expected is not None
    with pytest.raises(expected) as info:
        fusedloss.binary_cross_entropy_with_logits(**kw, backend=backend)
    assert word in str(info.value)


# Inputs torch accepts but we reject (documented in functional.py): ValueError or torch's type.
OUR_BAD = [
    ("label_smoothing_negative", lambda b: fusedloss.cross_entropy(
        X, T, label_smoothing=-0.1, backend=b), RuntimeError, "label_smoothing"),
    ("weight_nan", lambda b: fusedloss.cross_entropy(
        X, T, weight=torch.tensor([1.0, float("nan"), 1, 1, 1]), backend=b), ValueError, "weight"),
    ("pos_weight_nan", lambda b: fusedloss.binary_cross_entropy_with_logits(
        X, torch.rand(4, 5), pos_weight=torch.full((5,), float("nan")), backend=b), ValueError,
     "pos_weight"),
    ("threshold_zero", lambda b: fusedloss.binary_cross_entropy_with_logits(
        X, torch.rand(4, 5), threshold=0.0, backend=b), ValueError, "threshold"),
    ("threshold_one", lambda b: fusedloss.sigmoid_decode(X, 1.0, backend=b), ValueError,
     "threshold"),
    ("threshold_tensor_outside", lambda b: fusedloss.binary_cross_entropy_with_logits(
        X, torch.rand(4, 5), threshold=torch.tensor([0.5, 0.5, 1.2, 0.5, 0.5]), backend=b),
     ValueError, "threshold"),
    ("threshold_wrong_length", lambda b: fusedloss.sigmoid_decode(
        X, torch.full((4,), 0.5), backend=b), ValueError, "threshold"),
    ("logit_threshold_nan", lambda b: fusedloss.sigmoid_decode(
        X, logit_threshold=float("nan"), backend=b), ValueError, "logit_threshold"),
    ("counts_without_threshold", lambda b: fusedloss.binary_cross_entropy_with_logits(
        X, torch.rand(4, 5), return_counts=True, backend=b), ValueError, "threshold"),
    ("lse_square_scale_negative", lambda b: fusedloss.cross_entropy(
        X, T, lse_square_scale=-1.0, backend=b), ValueError, "lse_square_scale"),
    ("softcap_zero", lambda b: fusedloss.cross_entropy(X, T, softcap=0.0, backend=b),
     ValueError, "softcap"),
    ("module_weight_nan", lambda b: fusedloss.CrossEntropyLoss(
        torch.tensor([float("nan")] * 5), backend=b), ValueError, "weight"),
]


@pytest.mark.parametrize("case", OUR_BAD, ids=[c[0] for c in OUR_BAD])
def test_rejected_extras(dev_backend, case):
    device, backend = dev_backend
    if device != "cpu":
        pytest.skip("these inputs are built on the CPU; the checks are device-independent")
    _, fn, exc, word = case
    with pytest.raises(exc) as info:
        fn(backend)
    assert word in str(info.value)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend='cudnn'"):
        fusedloss.cross_entropy(X, T, backend="cudnn")


def test_unavailable_backend_says_how_to_build():
    """An explicit backend that cannot serve the device raises and never falls back."""
    from fusedloss import _backend

    missing = [n for n in ("native", "triton") if n not in fusedloss.available_backends("cpu")]
    if not missing:  # every backend is built for CPU here; use a device none of them serves
        with pytest.raises(RuntimeError, match="not available for device meta"):
            _backend.get("native", torch.device("meta"))
        return
    with pytest.raises(RuntimeError, match=missing[0]):
        fusedloss.cross_entropy(X, T, backend=missing[0])
