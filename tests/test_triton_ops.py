"""Op-level tests of the Triton backend (fusedloss_triton::*) against the float64 reference.

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before fusedloss is imported). The interpreter runs each program in numpy, so every case is
tiny; its block is 128 columns (triton_kernels/_common.py INTERPRET_BLOCK), so C = 300 spans
three blocks, the last one partial, which exercises the online max/sum across blocks.
"""

import os

import pytest
import torch

from fusedloss import _backend
from fusedloss import reference as ref

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET != 1: the triton backend is not usable here",
                allow_module_level=True)

if "triton" not in _backend.available_backends("cuda" if torch.cuda.is_available() else "cpu"):
    # triton is installed with every CUDA build of torch, which the project requires: a missing
    # backend here is an import failure to surface, not to skip.
    raise RuntimeError(f"triton backend not registered: {_backend.KNOWN.get('triton')}")

from fusedloss.triton_kernels import sigmoid_bce as bce_k  # noqa: E402
from fusedloss.triton_kernels import softmax_ce as ce_k  # noqa: E402
from fusedloss.triton_kernels._common import INTERPRET_BLOCK  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.fusedloss_triton
F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
R, C = 8, 300  # C: three interpreter blocks of 128, the last partial (not a multiple)

# The interpreter rounds fp32 -> bf16 toward zero (GPUs: to nearest), so bf16 outputs may be one
# bf16 ulp (2^-7 relative) off the correctly rounded value under it.
# Loss/lse are accumulated in fp32 from the (rounded) inputs, so they are compared with fp32
# tolerances against the reference computed from the same rounded inputs; the gradient is
# additionally rounded to the logits dtype on output (half an ulp of values up to ~1).
LOSS_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-5, rtol=2e-5),
            torch.float16: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=4e-3, rtol=8e-3),
            torch.float16: dict(atol=5e-4, rtol=1e-3), torch.float64: dict(atol=1e-12, rtol=1e-10)}


def close(actual, expected, tol, msg=""):
    torch.testing.assert_close(actual.cpu().to(F64), expected.cpu().to(F64), **tol,
                               equal_nan=True, msg=lambda m: f"{msg}\n{m}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def logits(rows, classes, dtype, seed=0, scale=3.0):
    return (torch.randn(rows, classes, generator=gen(seed), dtype=F64) * scale).to(dtype).to(DEV)


def class_targets(rows, classes, seed=1, ignore=()):
    t = torch.randint(0, classes, (rows,), generator=gen(seed))
    for r in ignore:
        t[r] = -100
    return t.to(DEV)


def prob_targets(rows, classes, dtype, seed=2):
    return torch.softmax(torch.randn(rows, classes, generator=gen(seed), dtype=F64), -1) \
        .to(dtype).to(DEV)


def ref_ce(x, t, w, eps, lse_square_scale, cap, row_scale, ignore_index=-100):
    x64, w64 = x.to(F64).cpu(), None if w is None else w.to(F64).cpu()
    t64 = t.cpu() if t.dim() == 1 else t.to(F64).cpu()
    loss, lse = ref.softmax_ce_rows(x64, t64, w64, ignore_index, eps, lse_square_scale, cap)
    grad = ref.softmax_ce_grad(x64, t64, w64, row_scale.to(F64).cpu().expand(x.shape[0]),
                               ignore_index, eps, lse_square_scale, cap)
    return loss, lse, grad


# ------------------------------------------------------------------------------------------
# softmax cross-entropy

# (name, target kind, weight, label_smoothing, lse_square_scale, softcap): every option alone,
# then combined.
CE_CASES = [
    ("plain", "index", False, 0.0, 0.0, 0.0),
    ("weight", "index", True, 0.0, 0.0, 0.0),
    ("smoothing", "index", False, 0.1, 0.0, 0.0),
    ("weight+smoothing", "index", True, 0.2, 0.0, 0.0),
    ("zloss", "index", False, 0.0, 1e-3, 0.0),
    ("softcap", "index", False, 0.0, 0.0, 4.0),
    ("all", "index", True, 0.1, 1e-2, 5.0),
    ("probs", "probs", False, 0.0, 0.0, 0.0),
    ("probs+all", "probs", True, 0.1, 1e-2, 5.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CE_CASES, ids=[c[0] for c in CE_CASES])
def test_softmax_ce_fwd_matches_reference(case, dtype):
    _, kind, has_w, eps, lse_square_scale, cap = case
    x = logits(R, C, dtype)
    t = class_targets(R, C, ignore=(3,)) if kind == "index" else prob_targets(R, C, dtype)
    w = (torch.rand(C, generator=gen(5), dtype=F64) + 0.5).to(dtype).to(DEV) if has_w else None
    scale = torch.tensor(0.25, device=DEV)
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, w, scale, -100, eps, lse_square_scale,
                                                     cap, True, True)
    rloss, rlse, rgrad = ref_ce(x, t, w, eps, lse_square_scale, cap, scale)
    acc = F64 if dtype == F64 else torch.float32
    assert loss.dtype == lse.dtype == acc and grad.dtype == dtype and pred.dtype == torch.int64
    close(loss, rloss, LOSS_TOL[dtype], "loss")
    close(lse, rlse, LOSS_TOL[dtype], "lse")
    close(grad, rgrad, GRAD_TOL[dtype], "grad")
    rpred, rconf = ref.softmax_decode(x.to(F64).cpu(), cap)
    assert torch.equal(pred.cpu(), rpred)
    close(conf, rconf, LOSS_TOL[torch.float32], "confidence")
    if kind == "index":  # the ignored row: loss 0, gradient exactly 0
        assert loss[3].item() == 0.0 and not grad[3].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_ce_no_grad_no_decode_returns_empties(dtype):
    x, t = logits(R, C, dtype), class_targets(R, C)
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0,
                                                     False, False)
    assert grad.shape == (0,) and grad.dtype == dtype
    assert pred.shape == (0,) and pred.dtype == torch.int64 and conf.shape == (0,)
    close(loss, ref_ce(x, t, None, 0.0, 0.0, 0.0, torch.ones(()))[0], LOSS_TOL[dtype])


# Column counts around the block: one class, block - 1, block + 1 (a one-element last block),
# and a row split into many blocks (launcher block override of 32 on 300 classes).
@pytest.mark.parametrize("classes,block", [(1, None), (INTERPRET_BLOCK - 1, None),
                                           (INTERPRET_BLOCK + 1, None), (300, 32)])
def test_softmax_ce_block_boundaries(classes, block):
    x = logits(5, classes, torch.float32, seed=classes)
    t = class_targets(5, classes, seed=classes)
    loss, lse, grad, pred, conf = ce_k.softmax_ce_fwd(x, t, None, None, -100, 0.1, 0.0, 0.0,
                                                      True, True, block=block)
    rloss, rlse, rgrad = ref_ce(x, t, None, 0.1, 0.0, 0.0, torch.ones(()))
    close(loss, rloss, LOSS_TOL[torch.float32])
    close(lse, rlse, LOSS_TOL[torch.float32])
    close(grad, rgrad, GRAD_TOL[torch.float32])
    assert torch.equal(pred.cpu(), x.cpu().argmax(-1))


def test_softmax_ce_large_vocab_one_row():
    # Llama-3's 128256-class vocabulary: the online max/sum over many blocks (block 16384 to
    # keep the interpreter fast; the kernel is the same at any block).
    classes = 128256
    x = logits(2, classes, torch.float32, seed=7, scale=4.0)
    t = torch.tensor([5, classes - 1], device=DEV)
    loss, lse, grad, pred, conf = ce_k.softmax_ce_fwd(x, t, None, None, -100, 0.0, 1e-4, 0.0,
                                                      True, True, block=16384)
    rloss, rlse, rgrad = ref_ce(x, t, None, 0.0, 1e-4, 0.0, torch.ones(()))
    close(loss, rloss, dict(atol=1e-4, rtol=1e-5))
    close(grad, rgrad, dict(atol=1e-7, rtol=1e-4))
    assert torch.equal(pred.cpu(), x.cpu().argmax(-1))


def test_softmax_ce_zero_rows():
    x = torch.empty(0, C, device=DEV)
    t = torch.empty(0, dtype=torch.int64, device=DEV)
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0,
                                                     True, True)
    assert loss.shape == lse.shape == pred.shape == conf.shape == (0,) and grad.shape == (0, C)


def test_softmax_ce_all_rows_ignored_and_infinite_scale_give_exact_zeros():
    x, t = logits(4, C, torch.float32), torch.full((4,), -100, device=DEV)
    inf = torch.tensor(float("inf"), device=DEV)
    loss, lse, grad, _, _ = OPS.softmax_ce_fwd(x, t, None, inf, -100, 0.1, 0.0, 0.0, True, False)
    assert not loss.any() and not grad.any() and not grad.isnan().any()
    close(lse, torch.logsumexp(x.cpu().to(F64), -1), LOSS_TOL[torch.float32])


def test_softmax_ce_custom_ignore_index_and_strided_rows():
    wide = logits(R, C + 37, torch.float32)
    x = wide[:, :C]  # row stride C + 37: columns contiguous, rows not
    t = class_targets(R, C)
    t[0] = 7  # ignore_index=7 ignores the rows whose target is 7
    loss, lse, grad, _, _ = OPS.softmax_ce_fwd(x, t, None, None, 7, 0.0, 0.0, 0.0, True, False)
    rloss, rlse, rgrad = ref_ce(x, t, None, 0.0, 0.0, 0.0, torch.ones(()), ignore_index=7)
    close(loss, rloss, LOSS_TOL[torch.float32])
    close(grad, rgrad, GRAD_TOL[torch.float32])
    assert grad.is_contiguous() and loss[0].item() == 0.0


def test_softmax_ce_extreme_logits():
    # +-1e4 logits and -inf classes: no overflow, no NaN where the reference has none.
    x = logits(4, C, torch.float32) * 1e3
    x[0, 5] = 1e4
    x[1, :] = -1e4
    x[2, 100:] = float("-inf")
    t = torch.tensor([5, 3, 7, 250], device=DEV)
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0,
                                                     True, True)
    rloss, rlse, rgrad = ref_ce(x, t, None, 0.0, 0.0, 0.0, torch.ones(()))
    close(loss, rloss, dict(atol=1e-2, rtol=1e-6))
    close(lse, rlse, dict(atol=1e-2, rtol=1e-6))
    close(grad, rgrad, GRAD_TOL[torch.float32])
    assert torch.isfinite(loss).all()


def test_softmax_decode_ties_and_nan_follow_torch_argmax():
    x = torch.zeros(3, C, device=DEV)
    x[0, [40, 200, 290]] = 5.0  # tie across blocks 0, 1 and 2: the lowest index wins
    x[1, [250, 260]] = 5.0       # tie inside the last (partial) block
    x[2, 150] = 9.0
    x[2, [140, 210]] = float("nan")  # the first NaN wins, as in torch.argmax
    pred, conf = OPS.softmax_decode(x, 0.0)
    assert pred.tolist() == [40, 250, 140]
    rpred, rconf = ref.softmax_decode(x.cpu().to(F64))
    close(conf, rconf, LOSS_TOL[torch.float32])
    assert torch.isnan(conf[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_decode_with_softcap(dtype):
    # |x| / cap up to ~2: tanh is not saturated, so distinct logits stay distinct after capping
    x = logits(R, C, dtype, scale=2.0)
    pred, conf = OPS.softmax_decode(x, 3.0)
    rpred, rconf = ref.softmax_decode(x.to(F64).cpu(), 3.0)
    assert torch.equal(pred.cpu(), rpred)
    close(conf, rconf, LOSS_TOL[torch.float32])


def test_softmax_ce_out_of_range_target_raises_on_cpu():
    if DEV != "cpu":
        pytest.skip("the launcher validates only where it costs no device sync (CPU)")
    x, t = logits(R, C, torch.float32), class_targets(R, C)
    t[4] = C
    with pytest.raises(IndexError, match=f"Target {C} is out of bounds"):
        OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True, False)
    t[4] = -3
    with pytest.raises(IndexError, match="Target -3 is out of bounds"):
        OPS.softmax_ce_bwd(torch.ones(R, device=DEV), x, t, None, -100, 0.0, 0.0, 0.0)


def test_softmax_ce_out_of_range_target_marks_row_nan_in_kernel(monkeypatch):
    # What a GPU launch does (no host check there): the bad row's loss and gradient are NaN,
    # the other rows are unaffected and the bad index is never dereferenced.
    monkeypatch.setattr(ce_k, "_check_targets_on_cpu", lambda *a: None)
    x, t = logits(4, C, torch.float32), class_targets(4, C)
    t[1] = C + 1000
    loss, _, grad, _, _ = ce_k.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True, False)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    keep = [0, 2, 3]
    rloss, _, rgrad = ref_ce(x[keep], t[keep], None, 0.0, 0.0, 0.0, torch.ones(()))
    close(loss[keep], rloss, LOSS_TOL[torch.float32])
    close(grad[keep], rgrad, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CE_CASES[0], CE_CASES[6], CE_CASES[8]],
                         ids=["plain", "all", "probs+all"])
def test_softmax_ce_inplace_equals_out_of_place(case, dtype):
    _, kind, has_w, eps, lse_square_scale, cap = case
    x = logits(R, C, dtype)
    t = class_targets(R, C, ignore=(2,)) if kind == "index" else prob_targets(R, C, dtype)
    w = (torch.rand(C, generator=gen(5)) + 0.5).to(dtype).to(DEV) if has_w else None
    scale = torch.tensor(2.0, device=DEV)
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, w, scale, -100, eps, lse_square_scale,
                                                     cap, True, True)
    y = x.clone()
    iloss, ilse, ipred, iconf = OPS.softmax_ce_fwd_inplace(y, t, w, scale, -100, eps,
                                                           lse_square_scale, cap, True)
    assert torch.equal(y, grad) and torch.equal(iloss, loss) and torch.equal(ilse, lse)
    assert torch.equal(ipred, pred) and torch.equal(iconf, conf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CE_CASES[0], CE_CASES[3], CE_CASES[6], CE_CASES[8]],
                         ids=["plain", "weight+smoothing", "all", "probs+all"])
def test_softmax_ce_bwd_matches_reference(case, dtype):
    _, kind, has_w, eps, lse_square_scale, cap = case
    x = logits(R, C, dtype)
    t = class_targets(R, C, ignore=(1,)) if kind == "index" else prob_targets(R, C, dtype)
    w = (torch.rand(C, generator=gen(5)) + 0.5).to(dtype).to(DEV) if has_w else None
    g = torch.randn(R, generator=gen(9), dtype=F64).to(dtype).to(DEV)
    grad = OPS.softmax_ce_bwd(g, x, t, w, -100, eps, lse_square_scale, cap)
    x64, w64 = x.to(F64).cpu(), None if w is None else w.to(F64).cpu()
    t64 = t.cpu() if t.dim() == 1 else t.to(F64).cpu()
    rgrad = ref.softmax_ce_grad(x64, t64, w64, g.to(F64).cpu(), -100, eps, lse_square_scale, cap)
    assert grad.dtype == dtype and grad.shape == x.shape
    close(grad, rgrad, GRAD_TOL[dtype])


def test_softmax_ce_bwd_stride0_and_infinite_grad_on_ignored_row():
    x, t = logits(R, C, torch.float32), class_targets(R, C, ignore=(0,))
    g = torch.tensor(3.0, device=DEV).expand(R)  # stride 0, as from a mean's backward
    grad = OPS.softmax_ce_bwd(g, x, t, None, -100, 0.0, 0.0, 0.0)
    _, _, rgrad = ref_ce(x, t, None, 0.0, 0.0, 0.0, torch.tensor(3.0))
    close(grad, rgrad, GRAD_TOL[torch.float32])
    g_inf = torch.full((R,), float("inf"), device=DEV)
    assert not OPS.softmax_ce_bwd(g_inf, x, t, None, -100, 0.0, 0.0, 0.0)[0].any()


# ------------------------------------------------------------------------------------------
# sigmoid BCE

BR, BC = 6, 150  # 150 columns: two interpreter tiles of 64 and a partial one; 6 rows: 4 + 2


def bce_inputs(dtype, target_kind="float", weight="none", pos_weight="none", seed=0):
    x = logits(BR, BC, dtype, seed=seed, scale=4.0)
    # loss ~ e^x for x << 0, y = 0: where a cancelling form of the loss loses digits
    x[0, :5] = torch.tensor([-6.0, -9.0, -12.0, -15.0, -18.0]).to(dtype)
    y01 = torch.rand(BR, BC, generator=gen(seed + 1)) > 0.6
    y01[0, :5] = False
    if target_kind == "bool":
        y = y01
    elif target_kind == "uint8":
        y = y01.to(torch.uint8)
    else:  # soft float targets in [0, 1]
        y = torch.rand(BR, BC, generator=gen(seed + 2), dtype=F64).to(dtype)
        y[0, :5] = 0
    shapes = {"none": None, "row": (1, BC), "col": (BR, 1), "full": (BR, BC)}

    def make(kind, s):
        if shapes[kind] is None:
            return None
        t = (torch.rand(*shapes[kind], generator=gen(s), dtype=F64) * 2).to(dtype).to(DEV)
        return t.expand(BR, BC)  # broadcast as the functional layer does: stride 0

    return x, y.to(DEV), make(weight, seed + 3), make(pos_weight, seed + 4)


def ref_bce(x, y, w, pw, scale):
    c = lambda t: None if t is None else t.to(F64).cpu()  # noqa: E731
    elem = ref.sigmoid_bce_elem(c(x), y.cpu(), c(w), c(pw))
    grad = ref.sigmoid_bce_grad(c(x), y.cpu(), c(w), c(pw), scale.to(F64).cpu())
    return elem, grad


# Elementwise BCE loss against fp64: relative only in fp32 (the loss is formed without
# cancellation; (1-y) x + softplus(-x) had 2.4e-7..4.8e-7 absolute error at x in [-18, -6]).
BCE_ELEM_TOL = {**GRAD_TOL, torch.float32: dict(atol=1e-9, rtol=5e-6),
                F64: dict(atol=1e-15, rtol=1e-12)}

BCE_CASES = [  # (target kind, weight, pos_weight)
    ("float", "none", "none"), ("bool", "row", "none"), ("uint8", "none", "col"),
    ("float", "full", "row"), ("bool", "col", "full"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BCE_CASES, ids=["-".join(c) for c in BCE_CASES])
@pytest.mark.parametrize("reduce_rows", [False, True], ids=["elem", "rows"])
def test_sigmoid_bce_fwd_matches_reference(case, dtype, reduce_rows):
    x, y, w, pw = bce_inputs(dtype, *case)
    scale = torch.tensor(0.5, device=DEV)
    thr = (torch.randn(BC, generator=gen(11)) * 0.5).to(DEV)
    loss, grad, labels, probs, counts = OPS.sigmoid_bce_fwd(x, y, w, pw, scale, thr, reduce_rows,
                                                            True, True, True)
    elem, rgrad = ref_bce(x, y, w, pw, scale)
    acc = F64 if dtype == F64 else torch.float32
    if reduce_rows:
        assert loss.shape == (BR,) and loss.dtype == acc
        close(loss, elem.sum(-1), dict(atol=1e-4, rtol=1e-5) if dtype != F64 else LOSS_TOL[F64])
    else:
        assert loss.shape == (BR, BC) and loss.dtype == dtype
        close(loss, elem, BCE_ELEM_TOL[dtype])
    close(grad, rgrad, GRAD_TOL[dtype])
    rlabels = ref.sigmoid_decode(x.cpu(), thr.cpu())
    assert labels.dtype == torch.bool and torch.equal(labels.cpu(), rlabels)
    close(probs, torch.sigmoid(x.to(F64)), GRAD_TOL[dtype])
    assert counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), ref.confusion_counts(rlabels, y.cpu()))


def test_sigmoid_bce_many_row_groups_and_column_tiles():
    # 19 rows: three interpreter row groups of 8 (4-row tiles, the last group partial) and 70
    # columns: two 64-wide tiles; counts and row sums combine across programs.
    x = logits(19, 70, torch.float32, seed=3)
    y = (torch.rand(19, 70, generator=gen(4)) > 0.5).to(DEV)
    thr = torch.zeros(70, device=DEV)
    loss, grad, labels, _, counts = OPS.sigmoid_bce_fwd(x, y, None, None, None, thr, True, True,
                                                        False, True)
    elem, rgrad = ref_bce(x, y, None, None, torch.ones(()))
    close(loss, elem.sum(-1), dict(atol=1e-4, rtol=1e-5))
    close(grad, rgrad, GRAD_TOL[torch.float32])
    assert torch.equal(counts.cpu(), ref.confusion_counts(x.cpu() > 0, y.cpu()))


def test_sigmoid_bce_optional_outputs_are_empty():
    x, y, _, _ = bce_inputs(torch.float32)
    loss, grad, labels, probs, counts = OPS.sigmoid_bce_fwd(x, y, None, None, None, None, False,
                                                            False, False, False)
    assert grad.shape == labels.shape == probs.shape == counts.shape == (0,)
    assert labels.dtype == torch.bool and counts.dtype == torch.int64
    close(loss, ref.sigmoid_bce_elem(x.cpu().to(F64), y.cpu()), BCE_ELEM_TOL[torch.float32])


def test_sigmoid_bce_extreme_logits_are_stable():
    x = torch.tensor([[1e4, -1e4, 30.0, -30.0, 0.0, 20.0]], device=DEV)
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5, 1.0]], device=DEV)
    loss, grad, *_ = OPS.sigmoid_bce_fwd(x, y, None, None, None, None, False, True, False, False)
    elem, rgrad = ref_bce(x, y, None, None, torch.ones(()))
    torch.testing.assert_close(loss.cpu().to(F64), elem, atol=1e-6, rtol=1e-6)
    close(grad, rgrad, GRAD_TOL[torch.float32])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_sigmoid_bce_threshold_tie_is_negative_and_nan_targets_count_as_negative():
    x = torch.tensor([[0.5, 0.5, -1.0, 2.0]], device=DEV)
    thr = torch.tensor([0.5, 0.25, -2.0, 3.0], device=DEV)  # logit == threshold in column 0
    y = torch.tensor([[1.0, 0.0, float("nan"), 1.0]], device=DEV)
    _, _, labels, _, counts = OPS.sigmoid_bce_fwd(x, y, None, None, None, thr, True, False,
                                                  False, True)
    assert labels.tolist() == [[False, True, True, False]]
    # TP, FP, FN per class: col0 FN, col1 FP, col2 FP (NaN target is not > 0.5), col3 FN
    assert counts.tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]]


def test_sigmoid_bce_zero_rows_and_count_needs_threshold():
    x = torch.empty(0, BC, device=DEV)
    y = torch.empty(0, BC, dtype=torch.bool, device=DEV)
    thr = torch.zeros(BC, device=DEV)
    loss, grad, labels, probs, counts = OPS.sigmoid_bce_fwd(x, y, None, None, None, thr, True,
                                                            True, True, True)
    assert loss.shape == (0,) and grad.shape == labels.shape == (0, BC)
    assert counts.shape == (3, BC) and not counts.any()
    with pytest.raises(ValueError, match="count=True needs a threshold"):
        OPS.sigmoid_bce_fwd(logits(2, 3, torch.float32), torch.ones(2, 3, device=DEV), None,
                            None, None, None, True, False, False, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BCE_CASES[1:4], ids=["-".join(c) for c in BCE_CASES[1:4]])
def test_sigmoid_bce_bwd_matches_reference(case, dtype):
    x, y, w, pw = bce_inputs(dtype, *case)
    g = torch.randn(BC, BR, generator=gen(3), dtype=F64).to(dtype).to(DEV).t()  # transposed
    grad = OPS.sigmoid_bce_bwd(g, x, y, w, pw)
    _, rgrad = ref_bce(x, y, w, pw, g)
    assert grad.dtype == dtype and grad.is_contiguous()
    close(grad, rgrad, GRAD_TOL[dtype])


def test_sigmoid_bce_bwd_stride0_grad_and_other_dtype():
    x, y, w, pw = bce_inputs(torch.bfloat16, "bool", "row", "none")
    g = torch.tensor(2.0, device=DEV, dtype=F64).expand(BR, BC)  # fp64 grad for bf16 logits
    grad = OPS.sigmoid_bce_bwd(g, x, y, w, pw)
    _, rgrad = ref_bce(x, y, w, pw, torch.tensor(2.0))
    close(grad, rgrad, GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sigmoid_decode(dtype):
    x = logits(BR, BC, dtype)
    thr = torch.randn(BC, generator=gen(4)).to(DEV)
    labels, probs = OPS.sigmoid_decode(x, thr, True)
    assert torch.equal(labels.cpu(), x.cpu().to(torch.float32) > thr.cpu())
    close(probs, torch.sigmoid(x.to(F64)), GRAD_TOL[dtype])
    labels2, probs2 = OPS.sigmoid_decode(x, thr, False)
    assert torch.equal(labels2, labels) and probs2.shape == (0,)


# ------------------------------------------------------------------------------------------
# scale_grad_


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad(dtype):
    g = logits(7, 300, dtype)  # 2100 elements: three interpreter blocks of 1024, one partial
    expected = (g.to(F64) * 0.375).to(dtype)
    OPS.scale_grad_(g, torch.tensor(0.375, device=DEV, dtype=F64))
    if dtype == torch.bfloat16 and DEV == "cpu":
        # The interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest even, and
        # `fp_downcast_rounding="rtne"` is ignored by the interpreter): allow that one ulp.
        torch.testing.assert_close(g, expected, atol=0, rtol=2**-7)
    else:
        assert torch.equal(g, expected)


def test_scale_grad_one_touches_nothing_and_strided_grads_work():
    g = logits(4, 50, torch.float32)
    g[0, 0] = float("nan")
    before = g.clone()
    OPS.scale_grad_(g, torch.tensor(1.0, device=DEV))
    assert torch.equal(g.view(torch.int32), before.view(torch.int32))  # bitwise untouched
    gt = logits(50, 4, torch.float32).t()  # not contiguous: eager fallback, same result
    expected = gt * 3.0
    OPS.scale_grad_(gt, torch.tensor(3.0, device=DEV, dtype=torch.bfloat16))
    assert torch.equal(gt, expected)


# ------------------------------------------------------------------------------------------
# registration, opcheck, torch.compile


def test_backend_registration(monkeypatch):
    assert "triton" in _backend.available_backends(DEV)
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.get("auto", "cpu").name != "triton"  # "auto" never picks the interpreter
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available for device cuda"):
            _backend.get("triton", "cuda")
    schema = str(OPS.softmax_ce_fwd.default._schema)
    for arg in ("Tensor logits", "Tensor? weight", "Tensor? grad_scale", "bool decode"):
        assert arg in schema


def _opcheck_cases():
    x, t = logits(3, C, torch.float32), class_targets(3, C, ignore=(1,))
    p = prob_targets(3, C, torch.float32)
    w = torch.rand(C, generator=gen(1)).to(DEV) + 0.5
    s = torch.tensor(0.5, device=DEV)
    bx, by, bw, bpw = bce_inputs(torch.float32, "bool", "row", "col")
    thr = torch.zeros(BC, device=DEV)
    return [
        (OPS.softmax_ce_fwd, (x, t, w, s, -100, 0.1, 1e-3, 3.0, True, True)),
        (OPS.softmax_ce_fwd, (x, p, None, None, -100, 0.0, 0.0, 0.0, False, False)),
        (OPS.softmax_ce_fwd_inplace, (x.clone(), t, w, s, -100, 0.1, 1e-3, 3.0, True)),
        (OPS.softmax_ce_bwd, (torch.ones(3, device=DEV), x, t, w, -100, 0.1, 1e-3, 3.0)),
        (OPS.softmax_decode, (x, 0.0)),
        (OPS.sigmoid_bce_fwd, (bx, by, bw, bpw, s, thr, True, True, True, True)),
        (OPS.sigmoid_bce_fwd, (bx, by.float(), None, None, None, None, False, False, False,
                               False)),
        (OPS.sigmoid_bce_bwd, (torch.ones(BR, BC, device=DEV), bx, by, bw, bpw)),
        (OPS.sigmoid_decode, (bx, thr, True)),
        (OPS.scale_grad_, (x.clone(), torch.tensor(2.0, device=DEV))),
    ]


@pytest.mark.parametrize("index", range(10))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    x, t = logits(4, C, torch.float32), class_targets(4, C, ignore=(2,))
    bx, by, _, _ = bce_inputs(torch.float32, "bool")

    def f(x, t, bx, by):
        loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0,
                                                         True, True)
        bloss, bgrad, _, _, _ = OPS.sigmoid_bce_fwd(bx, by, None, None, None, None, True, True,
                                                    False, False)
        OPS.scale_grad_(grad, lse.new_tensor(2.0))
        return loss.sum(), grad, pred, bloss.sum(), bgrad

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, t, bx, by)
    want = f(x, t, bx, by)
    for a, b in zip(got, want, strict=True):  # the sums may be reduced in another order by inductor
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    close(got[0], torch.nn.functional.cross_entropy(x.to(F64), t, reduction="sum"),
          LOSS_TOL[torch.float32])


def test_gpu_launch_tables_match_the_ahead_of_time_list(monkeypatch):
    # Every configuration a GPU launch can pick must be one scripts/triton_aot_check.py
    # compiles (specialisations()), and the softmax block must cover short rows in one step.
    from fusedloss.triton_kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    aot_softmax = {(ce["BLOCK"], warps, sig["x_ptr"]) for _, sig, ce, warps in
                   ce_k.specialisations()}
    for dtype in DTYPES:
        ptr = "*" + _common.TL_NAMES[dtype]
        size = torch.empty(0, dtype=dtype).element_size()
        for classes in (1, 10, 128, 129, 1000, 1024, 1025, 32000, 128256, 262144):
            block, warps = _common.softmax_config(classes, size)
            assert (block, warps, ptr) in aot_softmax, (dtype, classes)
            if classes <= 1024:
                assert block >= classes  # one block per row
    block_r, block_c, warps = _common.bce_config()
    assert all((ce["BLOCK_R"], ce["BLOCK_C"], w) == (block_r, block_c, warps)
               for _, _, ce, w in bce_k.specialisations())


# ------------------------------------------------------------------------------------------
# device guard: every launch runs under its tensors' device

def test_on_device_selects_the_tensors_gpu():
    from types import SimpleNamespace

    from fusedloss.triton_kernels._common import on_device
    guard = on_device(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(on_device(torch.empty(1)), torch.cuda.device)


def test_every_launcher_launches_under_the_logits_device(monkeypatch):
    from contextlib import contextmanager

    from fusedloss.triton_kernels import scale_grad as scale_k
    seen = []

    @contextmanager
    def record(t):
        seen.append(t.device)
        yield

    for mod in (ce_k, bce_k, scale_k):
        monkeypatch.setattr(mod, "on_device", record)
    x, t = logits(3, C, torch.float32), class_targets(3, C)
    bx, by, _, _ = bce_inputs(torch.float32)
    thr = torch.zeros(BC, device=DEV)
    calls = [
        lambda: OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True, True),
        lambda: OPS.softmax_ce_fwd_inplace(x.clone(), t, None, None, -100, 0.0, 0.0, 0.0, False),
        lambda: OPS.softmax_ce_bwd(torch.ones(3, device=DEV), x, t, None, -100, 0.0, 0.0, 0.0),
        lambda: OPS.softmax_decode(x, 0.0),
        lambda: OPS.sigmoid_bce_fwd(bx, by, None, None, None, thr, True, True, True, True),
        lambda: OPS.sigmoid_bce_bwd(torch.ones_like(bx), bx, by, None, None),
        lambda: OPS.sigmoid_decode(bx, thr, True),
        lambda: OPS.scale_grad_(x.clone(), torch.tensor(2.0, device=DEV)),
    ]
    for call in calls:
        seen.clear()
        call()
        assert seen == [x.device], call
