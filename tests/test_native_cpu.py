"""Op-level tests of the native CPU kernels (csrc/cpu/*.cpp): torch.ops.fusedloss.* called
directly, checked against the float64 math of python/fusedloss/reference.py (docs/OPS.md).

The public layer's backend-parametrized suite also runs on `native`; this file covers what only
the ops see: every option, dtype, odd shapes, extreme logits, strides, the ISA builds.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import fusedloss  # noqa: F401
from fusedloss import _native
from fusedloss import reference as ref

ops = torch.ops.fusedloss
F64 = torch.float64

# The CPU kernels are built by setup.py with the package: a missing build is a failure here.
assert _native.loaded_cpu_isa is not None, "native CPU kernels not built: pip install -e ."

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Tolerances of the (R, C) outputs (gradient, probs, elementwise loss): they are rounded once to
# the logits dtype from fp32/fp64, so the error is half an ulp of the dtype at the value's size.
GRAD_TOL = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.float64: dict(atol=1e-12, rtol=1e-10),
            torch.bfloat16: dict(atol=2e-3, rtol=8e-3), torch.float16: dict(atol=2e-4, rtol=1e-3)}
# Per-row fp32 outputs (loss, lse, confidence): fp32 accumulation over C terms in every dtype.
ROW_TOL = dict(atol=2e-5, rtol=2e-5)

# Shapes and why: C=1 (single class), C=37 (not a multiple of any vector width), 2053 and 4099
# (cross the 2048-column block of the kernels with a tail), R=0 (empty batch).
CE_SHAPES = [(6, 1), (13, 37), (5, 2053), (3, 4099), (0, 11)]


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), equal_nan=True, **tol)


def _targets(R, C, ignore_index, gen):
    t = torch.randint(0, C, (R,), generator=gen)
    if R > 2:
        t[1] = ignore_index  # one ignored row
    return t


def _ce_expect(x, target, weight, gscale, ii, eps, lse_square_scale, cap):
    xd = x.to(F64)
    w = None if weight is None else weight.to(F64)
    tt = target if target.dim() == 1 else target.to(F64)
    loss, lse = ref.softmax_ce_rows(xd, tt, w, ii, eps, lse_square_scale, cap)
    g = torch.full((x.shape[0],), 1.0 if gscale is None else float(gscale), dtype=F64)
    grad = ref.softmax_ce_grad(xd, tt, w, g, ii, eps, lse_square_scale, cap)
    pred, conf = ref.softmax_decode(xd, cap) if x.shape[1] > 0 else (None, None)
    return loss, lse, grad, pred, conf


# (name, weight?, ignore_index, label_smoothing, lse_square_scale, softcap, grad_scale)
CE_OPTIONS = [
    ("plain", False, -100, 0.0, 0.0, 0.0, None),
    ("weight", True, -100, 0.0, 0.0, 0.0, 0.5),
    ("smooth", False, -100, 0.1, 0.0, 0.0, None),
    ("weight_smooth", True, -100, 0.3, 0.0, 0.0, 2.0),
    ("zloss", False, -100, 0.0, 1e-3, 0.0, None),
    ("softcap", False, -100, 0.0, 0.0, 2.5, 0.25),
    ("ignore_valid_class", True, 0, 0.05, 1e-4, 0.0, None),  # ignore_index is a real class
    ("all", True, 3, 0.2, 1e-2, 4.0, 3.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("opt", CE_OPTIONS, ids=lambda o: o[0])
def test_softmax_ce_fwd_class_targets(dtype, shape, opt):
    _, use_w, ii, eps, lse_square_scale, cap, gs = opt
    R, C = shape
    gen = torch.Generator().manual_seed(R * 1000 + C)
    x = (torch.randn(R, C, generator=gen) * 3).to(dtype)
    t = _targets(R, C, ii, gen)
    if ii >= 0 and R > 0:
        t[0] = 0  # row 0 ignored (class 0 == ignore_index) when ii is a class
    w = (torch.rand(C, generator=gen) + 0.5).to(dtype) if use_w else None
    gst = None if gs is None else torch.tensor(gs, dtype=torch.float32)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, w, gst, ii, eps, lse_square_scale, cap,
                                                     True, True)
    el, els, eg, ep, ec = _ce_expect(x, t, w, gs, ii, eps, lse_square_scale, cap)
    acc = F64 if dtype == F64 else torch.float32  # loss/lse in the accumulation dtype
    assert loss.dtype == lse.dtype == acc and conf.dtype == torch.float32 and grad.dtype == dtype
    _close(loss, el, **ROW_TOL)
    _close(lse, els, **ROW_TOL)
    _close(grad, eg, **GRAD_TOL[dtype])
    assert torch.equal(pred, ep)
    _close(conf, ec, **ROW_TOL)
    ignored = t == ii
    assert (grad[ignored] == 0).all() and (loss[ignored] == 0).all()
    # compute_grad / decode off: the same per-row values, empty extra outputs.
    loss2, lse2, grad2, pred2, conf2 = ops.softmax_ce_fwd(x, t, w, gst, ii, eps, lse_square_scale,
                                                          cap, False, False)
    assert torch.equal(loss2, loss) and torch.equal(lse2, lse)
    assert grad2.shape == (0,) and pred2.shape == (0,) and conf2.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", [o for o in CE_OPTIONS if o[0] in ("plain", "weight_smooth",
                                                                    "all")], ids=lambda o: o[0])
def test_softmax_ce_fwd_prob_targets(dtype, opt):
    _, use_w, _, eps, lse_square_scale, cap, gs = opt
    gen = torch.Generator().manual_seed(7)
    R, C = 9, 2061  # a block boundary plus a tail
    x = (torch.randn(R, C, generator=gen) * 2).to(dtype)
    y = torch.softmax(torch.randn(R, C, generator=gen), -1).to(dtype)
    w = (torch.rand(C, generator=gen) + 0.5).to(dtype) if use_w else None
    gst = None if gs is None else torch.tensor(gs)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, y, w, gst, -100, eps, lse_square_scale,
                                                     cap, True, True)
    el, els, eg, ep, ec = _ce_expect(x, y, w, gs, -100, eps, lse_square_scale, cap)
    _close(loss, el, **ROW_TOL)
    _close(lse, els, **ROW_TOL)
    _close(grad, eg, **GRAD_TOL[dtype])
    assert torch.equal(pred, ep)


def test_softmax_ce_zero_classes():
    # C = 0: every target must be ignore_index; lse = logsumexp(empty) = -inf, loss 0.
    x = torch.empty(3, 0)
    t = torch.full((3,), -100)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True,
                                                     True)
    assert torch.equal(loss, torch.zeros(3)) and torch.equal(lse, torch.full((3,), -float("inf")))
    assert grad.shape == (3, 0) and torch.equal(pred, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_ce_extreme_logits(dtype, eps):
    # +-1e4 (exp overflows without the max shift), -inf in some (non-target) classes, and a row of
    # logits around a large common offset (cancellation in lse - z).
    gen = torch.Generator().manual_seed(3)
    R, C = 6, 2100
    x = torch.randn(R, C, generator=gen)
    x[0, ::7] = 1e4
    x[1, ::5] = -1e4
    x[2] += 1e4
    x[3, 100:2100:3] = -float("inf")
    x[4, :2050] = -float("inf")  # first block all -inf: the running max starts at -inf
    x = x.to(dtype)
    t = torch.tensor([0, 1, 2, 4, 2060, 5])
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, None, None, -100, eps, 0.0, 0.0, True,
                                                     True)
    el, els, eg, ep, ec = _ce_expect(x, t, None, None, -100, eps, 0.0, 0.0)
    if eps > 0:  # smoothing over a -inf class is +inf, as in torch
        assert torch.isinf(loss[3]) and torch.isinf(el[3])
    _close(loss, el, atol=2e-5, rtol=2e-5)
    _close(lse, els, atol=0, rtol=2e-6)
    _close(grad, eg, **GRAD_TOL[dtype])
    assert torch.equal(pred, ep)
    assert torch.isfinite(grad).all()


def test_softmax_ce_row_stride_and_target_stride():
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(10, 3000, generator=gen)
    x = big[::2, 5:2105]  # row stride 6000, stride(1) == 1
    tt = torch.randint(0, 2100, (10,), generator=gen)
    t = tt[::2]
    w = torch.rand(2100, generator=gen)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, w, None, -100, 0.1, 0.0, 0.0, True, True)
    el, els, eg, ep, ec = _ce_expect(x, t, w, None, -100, 0.1, 0.0, 0.0)
    _close(loss, el, **ROW_TOL)
    _close(grad, eg, **GRAD_TOL[torch.float32])
    assert grad.is_contiguous()
    y = torch.softmax(big, -1)[::2, 5:2105]  # probability target with a row stride
    loss, _, grad, _, _ = ops.softmax_ce_fwd(x, y, None, None, -100, 0.0, 0.0, 0.0, True, False)
    el, _, eg, _, _ = _ce_expect(x, y, None, None, -100, 0.0, 0.0, 0.0)
    _close(loss, el, **ROW_TOL)
    _close(grad, eg, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("soft", [False, True])
def test_softmax_ce_fwd_inplace(dtype, soft):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 2500, generator=gen) * 2).to(dtype)
    t = _targets(7, 2500, -100, gen)
    if soft:
        t = torch.softmax(torch.randn(7, 2500, generator=gen), -1).to(dtype)
    w = torch.rand(2500, generator=gen).to(dtype)
    args = (t, w, torch.tensor(0.5), -100, 0.1, 1e-3, 3.0)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, *args, True, True)
    xi = x.clone()
    loss_i, lse_i, pred_i, conf_i = ops.softmax_ce_fwd_inplace(xi, *args, True)
    assert torch.equal(loss_i, loss) and torch.equal(lse_i, lse)
    assert torch.equal(pred_i, pred) and torch.equal(conf_i, conf)
    assert torch.equal(xi, grad)  # same numbers, written over the logits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", [o for o in CE_OPTIONS if o[0] in ("plain", "all", "softcap",
                                                                    "ignore_valid_class")],
                         ids=lambda o: o[0])
def test_softmax_ce_bwd(dtype, opt):
    _, use_w, ii, eps, lse_square_scale, cap, _ = opt
    gen = torch.Generator().manual_seed(6)
    R, C = 8, 2049
    x = (torch.randn(R, C, generator=gen) * 3).to(dtype)
    t = _targets(R, C, ii, gen)
    w = (torch.rand(C, generator=gen) + 0.5).to(dtype) if use_w else None
    for gl in (torch.randn(R, generator=gen).to(dtype), torch.tensor(0.7).expand(R)):  # stride 0
        grad = ops.softmax_ce_bwd(gl, x, t, w, ii, eps, lse_square_scale, cap)
        eg = ref.softmax_ce_grad(x.to(F64), t, None if w is None else w.to(F64), gl.to(F64), ii,
                                 eps, lse_square_scale, cap)
        assert grad.dtype == dtype and grad.shape == x.shape
        _close(grad, eg, **GRAD_TOL[dtype])
    # probability targets
    y = torch.softmax(torch.randn(R, C, generator=gen), -1).to(dtype)
    gl = torch.randn(R, generator=gen)
    grad = ops.softmax_ce_bwd(gl, x, y, None, ii, eps, lse_square_scale, cap)
    eg = ref.softmax_ce_grad(x.to(F64), y.to(F64), None, gl.to(F64), ii, eps, lse_square_scale, cap)
    _close(grad, eg, **GRAD_TOL[dtype])


def test_ignored_rows_are_exact_zero_under_infinite_grad_scale():
    x = torch.randn(4, 50)
    t = torch.tensor([1, -100, 3, -100])
    _, _, grad, _, _ = ops.softmax_ce_fwd(x, t, None, torch.tensor(float("inf")), -100, 0.0, 0.0,
                                          0.0, True, False)
    assert (grad[1] == 0).all() and (grad[3] == 0).all()
    assert not torch.isnan(grad[1]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_decode_ties_nan_softcap(dtype):
    x = torch.randn(5, 3000).to(dtype)
    x[0, 10] = x[0, 2500] = 50.0  # tie across blocks: the lowest index wins
    x[1, 7] = x[1, 8] = 50.0  # tie inside a block
    x[2, 2200] = float("nan")
    x[2, 2900] = float("nan")  # first NaN wins (torch.argmax)
    x[3, :] = -float("inf")  # all -inf: argmax 0 as torch
    pred, conf = ops.softmax_decode(x, 0.0)
    ep, ec = ref.softmax_decode(x.to(F64))
    assert torch.equal(pred, ep)
    _close(conf, ec, **ROW_TOL)
    # softcap: tanh saturates 1e4 and 2e4 to the same capped value -> a tie in z, lowest wins
    xc = torch.randn(2, 100).to(dtype)
    xc[0, 50], xc[0, 20] = 2e4, 1e4
    pred, conf = ops.softmax_decode(xc, 1.0)
    ep, ec = ref.softmax_decode(xc.to(F64), 1.0)
    assert torch.equal(pred, ep)
    _close(conf, ec, **ROW_TOL)


@pytest.mark.parametrize("bad", [7, -1, 1 << 40])
def test_out_of_range_target_raises_index_error(bad):
    x = torch.randn(3, 7)
    t = torch.tensor([0, bad, 2])
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
        ops.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True, False)
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
        ops.softmax_ce_fwd_inplace(x.clone(), t, None, None, -100, 0.0, 0.0, 0.0, False)
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
        ops.softmax_ce_bwd(torch.ones(3), x, t, None, -100, 0.0, 0.0, 0.0)
    # the same value as ignore_index is not an error
    loss = ops.softmax_ce_fwd(x, t, None, None, bad, 0.0, 0.0, 0.0, False, False)[0]
    assert loss[1] == 0


def test_bad_arguments_name_the_argument():
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    cases = [
        (lambda: ops.softmax_ce_fwd(x, t.int(), None, None, -100, 0.0, 0.0, 0.0, False, False),
         "target .class indices. must be int64"),
        (lambda: ops.softmax_ce_fwd(x, t[:2], None, None, -100, 0.0, 0.0, 0.0, False, False),
         "target must have shape"),
        (lambda: ops.softmax_ce_fwd(x, t, torch.ones(4), None, -100, 0.0, 0.0, 0.0, False, False),
         "weight must have shape"),
        (lambda: ops.softmax_ce_fwd(x, t, None, torch.ones(2), -100, 0.0, 0.0, 0.0, True, False),
         "grad_scale must be a 0-dim"),
        (lambda: ops.softmax_ce_fwd(x[0], t, None, None, -100, 0.0, 0.0, 0.0, False, False),
         "logits must be 2-D"),
        (lambda: ops.softmax_ce_fwd(x.t(), t, None, None, -100, 0.0, 0.0, 0.0, False, False),
         "stride"),
        (lambda: ops.softmax_ce_fwd(x.long(), t, None, None, -100, 0.0, 0.0, 0.0, False, False),
         "logits must be float16"),
        (lambda: ops.sigmoid_bce_fwd(x, x[:2], None, None, None, None, True, True, False, False),
         "target must have the logits' shape"),
        (lambda: ops.sigmoid_decode(x, torch.zeros(4), False), "threshold must have shape"),
        (lambda: ops.softmax_ce_bwd(torch.ones(2), x, t, None, -100, 0.0, 0.0, 0.0),
         "grad_loss must have shape"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()
    value_cases = [
        (lambda: ops.softmax_ce_fwd(x, t, None, None, -100, 1.5, 0.0, 0.0, False, False),
         "label_smoothing"),
        (lambda: ops.sigmoid_bce_fwd(x, x, None, None, None, None, True, True, False, True),
         "count=True needs a threshold"),
    ]
    for fn, msg in value_cases:
        with pytest.raises(ValueError, match=msg):
            fn()


# ---------------------------------------------------------------------------------------------
# Sigmoid BCE

def _bce_operand(kind, R, C, dtype, gen):
    """Weight / pos_weight layouts the functional layer produces (broadcast by expand)."""
    if kind is None:
        return None
    if kind == "per_class":  # (C,) expanded: stride (0, 1)
        return (torch.rand(C, generator=gen) + 0.5).to(dtype).expand(R, C)
    if kind == "per_row":  # (R, 1) expanded: stride (1, 0)
        return (torch.rand(R, 1, generator=gen) + 0.5).to(dtype).expand(R, C)
    if kind == "transposed":  # full, non-contiguous
        return (torch.rand(C, R, generator=gen) + 0.5).to(dtype).t()
    raise ValueError(kind)


def _bce_target(kind, R, C, dtype, gen):
    pos = torch.rand(R, C, generator=gen) < 0.3
    if kind == "float":
        return torch.rand(R, C, generator=gen).to(dtype)  # soft labels in [0, 1]
    if kind == "bool":
        return pos
    if kind == "uint8":
        return pos.to(torch.uint8)
    if kind == "float_transposed":
        return pos.to(dtype).t().contiguous().t()
    raise ValueError(kind)


# Elementwise BCE loss against fp64. fp32: the exp and log1p of the kernels are good to a few
# ulp (rtol), and no absolute slack is needed because the loss is formed without cancellation;
# the form (1-y) x + softplus(-x) had 2.4e-7..4.8e-7 absolute error at x in [-18, -6], y = 0.
BCE_ELEM_TOL = {**GRAD_TOL, torch.float32: dict(atol=1e-9, rtol=5e-6),
                F64: dict(atol=1e-15, rtol=1e-12)}

# Shapes: C=1, C=37 (vector tail), 2053 (a block and a tail), R=0.
BCE_SHAPES = [(9, 1), (11, 37), (3, 2053), (0, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BCE_SHAPES, ids=str)
@pytest.mark.parametrize("tkind,wkind,pkind", [
    ("float", None, None), ("bool", "per_class", None), ("uint8", None, "per_class"),
    ("float_transposed", "per_row", "transposed"), ("bool", "transposed", "per_row")])
def test_sigmoid_bce_fwd(dtype, shape, tkind, wkind, pkind):
    R, C = shape
    gen = torch.Generator().manual_seed(R * 100 + C)
    x = (torch.randn(R, C, generator=gen) * 4).to(dtype)
    if R > 0 and C > 2:
        x[0, 0], x[0, 1], x[0, 2] = 1e4, -1e4, 0.0  # extreme logits; the 0 sits on threshold 0
    y = _bce_target(tkind, R, C, dtype, gen)
    if R > 1 and C > 8:  # loss ~ e^x for x << 0, y = 0: where a cancelling form loses digits
        x[1, 3:8] = torch.tensor([-6.0, -9.0, -12.0, -15.0, -18.0]).to(dtype)
        y[1, 3:8] = 0
    w = _bce_operand(wkind, R, C, dtype, gen)
    pw = _bce_operand(pkind, R, C, dtype, gen)
    thr = torch.randn(C, generator=gen)
    if C > 2:
        thr[2] = 0.0
    gs = torch.tensor(0.75)
    el = ref.sigmoid_bce_elem(x.to(F64), y.to(F64), None if w is None else w.to(F64),
                              None if pw is None else pw.to(F64))
    eg = ref.sigmoid_bce_grad(x.to(F64), y.to(F64), None if w is None else w.to(F64),
                              None if pw is None else pw.to(F64), torch.tensor(0.75, dtype=F64))
    elab = ref.sigmoid_decode(x, thr)
    ecnt = ref.confusion_counts(elab, y)
    loss, grad, labels, probs, counts = ops.sigmoid_bce_fwd(x, y, w, pw, gs, thr, True, True,
                                                            True, True)
    assert loss.dtype == (F64 if dtype == F64 else torch.float32) and loss.shape == (R,)
    _close(loss, el.sum(-1), atol=1e-4, rtol=1e-5)
    _close(grad, eg, **GRAD_TOL[dtype])
    _close(probs, torch.sigmoid(x.to(F64)), **GRAD_TOL[dtype])
    assert torch.equal(labels, elab)
    assert counts.dtype == torch.int64 and torch.equal(counts, ecnt)
    # unreduced loss, nothing else
    loss_e, grad2, labels2, probs2, counts2 = ops.sigmoid_bce_fwd(x, y, w, pw, None, None, False,
                                                                  False, False, False)
    assert loss_e.dtype == dtype and loss_e.shape == (R, C)
    _close(loss_e, el, **BCE_ELEM_TOL[dtype])
    assert grad2.numel() == labels2.numel() == probs2.numel() == counts2.numel() == 0


def test_sigmoid_bce_counts_do_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1001, 70, generator=gen)
    y = torch.rand(1001, 70, generator=gen) < 0.4
    thr = torch.randn(70, generator=gen) * 0.1
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(ops.sigmoid_bce_fwd(x, y, None, None, None, thr, True, False, False,
                                            True)[4])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], ref.confusion_counts(ref.sigmoid_decode(x, thr), y))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sigmoid_bce_bwd(dtype):
    gen = torch.Generator().manual_seed(9)
    R, C = 6, 2077
    x = (torch.randn(R, C, generator=gen) * 4).to(dtype)
    y = torch.rand(R, C, generator=gen) < 0.5
    w = _bce_operand("per_class", R, C, dtype, gen)
    pw = _bce_operand("per_row", R, C, dtype, gen)
    gl = torch.randn(C, R, generator=gen).to(dtype).t()  # non-contiguous incoming gradient
    grad = ops.sigmoid_bce_bwd(gl, x, y, w, pw)
    eg = ref.sigmoid_bce_grad(x.to(F64), y.to(F64), w.to(F64), pw.to(F64), gl.to(F64))
    assert grad.dtype == dtype and grad.is_contiguous()
    _close(grad, eg, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sigmoid_decode(dtype):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(5, 40, generator=gen).to(dtype)
    thr = torch.randn(40, generator=gen)
    x[0] = thr.to(dtype)  # exactly at the threshold (where representable): negative
    labels, probs = ops.sigmoid_decode(x, thr, True)
    assert torch.equal(labels, x.to(F64) > thr.to(F64))
    _close(probs, torch.sigmoid(x.to(F64)), **GRAD_TOL[dtype])
    labels2, probs2 = ops.sigmoid_decode(x, thr, False)
    assert torch.equal(labels2, labels) and probs2.numel() == 0


# ---------------------------------------------------------------------------------------------
# scale_grad_

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad_(dtype):
    g = torch.randn(7, 1001).to(dtype)
    before = g.clone()
    ops.scale_grad_(g, torch.tensor(1.0))
    assert torch.equal(g, before)
    ops.scale_grad_(g, torch.tensor(-2.5, dtype=torch.float64))
    _close(g, before.to(F64) * -2.5, **GRAD_TOL[dtype])
    gt = before.clone().t()  # non-contiguous
    ops.scale_grad_(gt, torch.tensor(0.5))
    _close(gt, before.t().to(F64) * 0.5, **GRAD_TOL[dtype])


# ---------------------------------------------------------------------------------------------
# opcheck: schema (mutation/aliasing), fake kernels, autograd registration, AOT dispatch.

def _opcheck_samples():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 37, generator=gen)
    t = torch.tensor([1, -100, 36, 0])
    y = torch.softmax(torch.randn(4, 37, generator=gen), -1)
    w = torch.rand(37, generator=gen)
    yb = torch.rand(4, 37, generator=gen) < 0.5
    thr = torch.zeros(37)
    gs = torch.tensor(0.5)
    return [
        (ops.softmax_ce_fwd, (x, t, w, gs, -100, 0.1, 1e-3, 0.0, True, True)),
        (ops.softmax_ce_fwd, (x, y, None, None, -100, 0.0, 0.0, 3.0, False, False)),
        (ops.softmax_ce_fwd_inplace, (x.clone(), t, None, gs, -100, 0.0, 0.0, 0.0, True)),
        (ops.softmax_ce_bwd, (torch.rand(4), x, t, w, -100, 0.1, 0.0, 0.0)),
        (ops.softmax_decode, (x, 0.0)),
        (ops.sigmoid_bce_fwd, (x, yb, w.expand(4, 37), None, gs, thr, True, True, True, True)),
        (ops.sigmoid_bce_fwd, (x, yb.float(), None, w.expand(4, 37), None, None, False, False,
                               False, False)),
        (ops.sigmoid_bce_bwd, (torch.rand(4, 37), x, yb, None, None)),
        (ops.sigmoid_decode, (x, thr, True)),
        (ops.scale_grad_, (torch.randn(4, 37), torch.tensor(2.0))),
        # fp64: loss/lse/row sums come back in fp64 (the fake kernels must agree)
        (ops.softmax_ce_fwd, (x.double(), t, None, gs.double(), -100, 0.0, 0.0, 0.0, True, True)),
        (ops.sigmoid_bce_fwd, (x.double(), yb, None, None, None, None, True, True, False, False)),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    op, args = _opcheck_samples()[case]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# ISA builds agree: each build runs in a subprocess (only one can register the CPU kernels).

_ISA_SCRIPT = r"""
import json, torch, fusedloss
from fusedloss import _native
assert _native.loaded_cpu_isa == {isa!r}, _native.loaded_cpu_isa
ops = torch.ops.fusedloss
g = torch.Generator().manual_seed(12)
out = {{}}
for dt in (torch.float32, torch.bfloat16, torch.float64):
    x = (torch.randn(5, 2100, generator=g) * 3).to(dt)
    t = torch.randint(0, 2100, (5,), generator=g)
    w = torch.rand(2100, generator=g).to(dt)
    l, s, gr, p, c = ops.softmax_ce_fwd(x, t, w, None, -100, 0.1, 1e-3, 2.0, True, True)
    bl, bg, lab, pr, cn = ops.sigmoid_bce_fwd(x, t.unsqueeze(1).eq(torch.arange(2100)), None,
                                              None, None, torch.zeros(2100), True, True, True, True)
    out[str(dt)] = [v.double().flatten().tolist() for v in (l, s, gr, p, c, bl, bg, lab, pr, cn)]
print(json.dumps(out))
"""


def _cpu_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


def _isa_outputs(isa):
    env = dict(os.environ, FUSEDLOSS_CPU_ISA=isa, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(isa=isa)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_isa_builds_agree():
    isas = ["default"] + (["avx2"] if _cpu_has("avx2") else []) + \
        (["avx512"] if _cpu_has("avx512f") and _cpu_has("avx512bw") else [])
    if len(isas) == 1:
        pytest.skip("only the default build can run on this CPU")
    results = {isa: _isa_outputs(isa) for isa in isas}
    base = results["default"]
    for isa in isas[1:]:
        for dt, outs in results[isa].items():
            # Vectorized exp/tanh/log (Sleef) vs the scalar fallback differ by ~1 ulp, which the
            # bf16 rounding of the gradient can turn into one bf16 ulp.
            tol = dict(atol=4e-3, rtol=8e-3) if "bfloat16" in dt else dict(atol=1e-5, rtol=1e-5)
            for a, b in zip(outs, base[dt], strict=True):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), equal_nan=True,
                                           **tol)
