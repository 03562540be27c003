"""Every registered backend's ops agree on edge cases and on bad arguments (docs/OPS.md).

The same cases go through `_backend.get(name, device).ops` for every backend that
`fusedloss.available_backends(device)` lists (cpu; cuda too when present). Results are checked
against the float64 reference (python/fusedloss/reference.py) or hand-derived values, so the
backends agree with each other by agreeing with the oracle; bad arguments must raise the same
exception type with a message naming the same argument ("<op>: <argument>").
Sizes are small: the triton backend runs under its interpreter on CPU.
"""

import math
import re

import pytest
import torch

import fusedloss
from conftest import is_slow_backend
from fusedloss import _backend
from fusedloss import reference as ref
from op_cases import tol

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
ROW = tol(torch.float32, "row")    # fp32 per-row values (loss, lse, confidence) vs fp64
GRAD = tol(torch.float32, "elem")  # fp32 gradients vs fp64


def _pairs():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(d, b) for d in devices for b in fusedloss.available_backends(d)]


PAIRS = _pairs()
pytestmark = pytest.mark.parametrize("device,backend", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])


def ops_of(backend, device):
    return _backend.get(backend, device).ops


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.cpu().to(F64), expected.cpu().to(F64), equal_nan=True,
                               **tol)


def ce_ref(x, t, w=None, g=1.0, ii=-100, eps=0.0, lse_square_scale=0.0, cap=0.0):
    x64, w64 = x.cpu().to(F64), None if w is None else w.cpu().to(F64)
    t64 = t.cpu() if t.dim() == 1 else t.cpu().to(F64)
    loss, lse = ref.softmax_ce_rows(x64, t64, w64, ii, eps, lse_square_scale, cap)
    grad = ref.softmax_ce_grad(x64, t64, w64, torch.full((x.shape[0],), g, dtype=F64), ii, eps,
                               lse_square_scale, cap)
    return loss, lse, grad


# ---- edge cases: the same result on every backend ------------------------------------------

def test_zero_classes_decode_gives_pred_0_confidence_0(device, backend):
    pred, conf = ops_of(backend, device).softmax_decode(torch.empty(3, 0, device=device), 0.0)
    assert pred.tolist() == [0, 0, 0] and conf.tolist() == [0.0, 0.0, 0.0]
    x, t = torch.empty(2, 0, device=device), torch.full((2,), -100, device=device)
    loss, lse, grad, pred, conf = ops_of(backend, device).softmax_ce_fwd(
        x, t, None, None, -100, 0.0, 0.0, 0.0, True, True)
    assert loss.tolist() == [0.0, 0.0] and lse.tolist() == [-INF, -INF] and grad.shape == (2, 0)
    assert pred.tolist() == [0, 0] and conf.tolist() == [0.0, 0.0]


def test_empty_batch_shapes_and_dtypes(device, backend):
    ops = ops_of(backend, device)
    x = torch.empty(0, 5, device=device, dtype=torch.bfloat16)
    t = torch.empty(0, dtype=torch.int64, device=device)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0,
                                                     True, True)
    assert loss.dtype == lse.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert loss.shape == lse.shape == pred.shape == conf.shape == (0,) and grad.shape == (0, 5)


@pytest.mark.parametrize("target_kind", ["index", "probs"])
def test_pos_inf_logit_makes_the_row_nan_as_torch(device, backend, target_kind):
    ops = ops_of(backend, device)
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(0)).to(device)
    x[1, 5] = x[1, 30] = INF  # not the target: torch's cross_entropy gives NaN
    t = torch.tensor([2, 7, 9], device=device) if target_kind == "index" \
        else torch.softmax(torch.randn(3, 37, generator=torch.Generator().manual_seed(1)),
                           -1).to(device)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0,
                                                     True, True)
    expected = torch.nn.functional.cross_entropy(x.cpu().double(), t.cpu() if t.dim() == 1
                                                 else t.cpu().double(), reduction="none")
    assert math.isnan(expected[1]) and math.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert lse[1] == INF and pred[1] == 5 and math.isnan(conf[1])
    rloss, _, rgrad = ce_ref(x, t)
    close(loss[[0, 2]], rloss[[0, 2]], **ROW)
    close(grad[[0, 2]], rgrad[[0, 2]], **GRAD)
    bwd = ops.softmax_ce_bwd(torch.ones(3, device=device), x, t, None, -100, 0.0, 0.0, 0.0)
    assert torch.isnan(bwd[1]).all() and not torch.isnan(bwd[[0, 2]]).any()


def test_neg_inf_target_logit_gives_inf_loss(device, backend):
    x = torch.zeros(2, 5, device=device)
    x[0, 3] = -INF
    loss = ops_of(backend, device).softmax_ce_fwd(x, torch.tensor([3, 1], device=device), None,
                                                  None, -100, 0.0, 0.0, 0.0, False, False)[0]
    assert loss[0] == INF and torch.isclose(loss[1].cpu().double(), torch.tensor(math.log(5.0),
                                                                                 dtype=F64))


def test_ignored_rows_are_exact_zero_under_infinite_scale(device, backend):
    ops = ops_of(backend, device)
    x = torch.randn(4, 37, device=device)
    t = torch.tensor([1, -100, 3, -100], device=device)
    inf = torch.tensor(INF, device=device)
    _, _, grad, _, _ = ops.softmax_ce_fwd(x, t, None, inf, -100, 0.1, 0.0, 0.0, True, False)
    assert (grad[1] == 0).all() and (grad[3] == 0).all()
    bwd = ops.softmax_ce_bwd(torch.full((4,), INF, device=device), x, t, None, -100, 0.1, 0.0,
                             0.0)
    assert (bwd[1] == 0).all() and (bwd[3] == 0).all()


def _weights(C, device):
    base = torch.rand(2 * C, generator=torch.Generator().manual_seed(3)) + 0.5
    return {"sliced": base[1::2].to(device), "expanded": torch.tensor(1.7).expand(C).to(device),
            "fp64": base[:C].double().to(device)}


@pytest.mark.parametrize("layout", ["sliced", "expanded", "fp64"])
def test_class_weight_any_stride_and_dtype(device, backend, layout):
    R, C = 5, 37
    x = torch.randn(R, C, generator=torch.Generator().manual_seed(4)).to(device)
    t = torch.tensor([0, 5, 36, 7, 9], device=device)
    w = _weights(C, device)[layout]
    loss, _, grad, _, _ = ops_of(backend, device).softmax_ce_fwd(x, t, w, None, -100, 0.1, 0.0,
                                                                 0.0, True, False)
    rloss, _, rgrad = ce_ref(x, t, w.contiguous(), eps=0.1)
    close(loss, rloss, **ROW)
    close(grad, rgrad, **GRAD)


def test_every_tensor_argument_is_read_through_its_strides(device, backend):
    ops = ops_of(backend, device)
    g = torch.Generator().manual_seed(9)
    R, C = 4, 37
    x = torch.randn(R, C + 5, generator=g).to(device)[:, :C]  # row stride C + 5
    t = torch.randint(0, C, (2 * R,), generator=g).to(device)[::2]
    w = (torch.rand(2 * C, generator=g) + 0.5).to(device)[1::2]
    y = torch.softmax(torch.randn(R, C + 3, generator=g), -1).to(device)[:, :C]
    gl = torch.rand(2 * R, generator=g).to(device)[::2]
    for tt in (t, y):
        loss, _, grad, _, _ = ops.softmax_ce_fwd(x, tt, w, None, -100, 0.1, 0.0, 0.0, True, False)
        rloss, _, rgrad = ce_ref(x, tt, w, eps=0.1)
        close(loss, rloss, **ROW)
        close(grad, rgrad, **GRAD)
        bwd = ops.softmax_ce_bwd(gl, x, tt, w, -100, 0.1, 0.0, 0.0)
        close(bwd, rgrad * gl.cpu().double()[:, None], **GRAD)
    # BCE: column-major logits and target, a broadcast weight, strided thresholds and grad_loss
    bx = torch.randn(C, R, generator=g).to(device).t()
    by = torch.rand(C, R, generator=g).to(device).t()
    bw = torch.rand(C, generator=g).to(device).expand(R, C)
    thr = torch.randn(2 * C, generator=g).to(device)[::2]
    loss, _, labels, _, _ = ops.sigmoid_bce_fwd(bx, by, bw, None, None, thr, False, False, False,
                                                False)
    x64, y64, w64 = bx.cpu().double(), by.cpu().double(), bw.cpu().double()
    close(loss, ref.sigmoid_bce_elem(x64, y64, w64), atol=1e-9, rtol=5e-6)
    assert torch.equal(labels.cpu(), x64 > thr.cpu().double())
    bgl = torch.rand(C, R, generator=g).to(device).t()
    grad = ops.sigmoid_bce_bwd(bgl, bx, by, bw, None)
    close(grad, ref.sigmoid_bce_grad(x64, y64, w64, None, bgl.cpu().double()), **GRAD)


def test_fp32_weight_and_target_with_bf16_logits_are_not_rounded(device, backend):
    # autocast: bf16 logits, fp32 class weight / probability target, read in fp32
    R, C = 4, 37
    g = torch.Generator().manual_seed(5)
    x = torch.randn(R, C, generator=g).to(torch.bfloat16).to(device)
    w = torch.full((C,), 1.7, device=device)  # bf16 would round it to 1.703125 (+0.18%)
    t = torch.tensor([1, 2, 3, 4], device=device)
    loss = ops_of(backend, device).softmax_ce_fwd(x, t, w, None, -100, 0.0, 0.0, 0.0, False,
                                                  False)[0]
    close(loss, ce_ref(x, t, w)[0], atol=1e-6, rtol=1e-5)
    y = torch.softmax(torch.randn(R, C, generator=g), -1).to(device) * 1.0001
    loss = ops_of(backend, device).softmax_ce_fwd(x, y, None, None, -100, 0.0, 0.0, 0.0, False,
                                                  False)[0]
    close(loss, ce_ref(x, y)[0], atol=1e-6, rtol=1e-5)


def test_bce_float32_target_with_bf16_logits_promotes_the_loss(device, backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 37, generator=g).to(torch.bfloat16).to(device)
    y = torch.rand(3, 37, generator=g).to(device)
    w = torch.rand(37, generator=g).double().to(device).expand(3, 37)  # fp64, broadcast
    thr = torch.zeros(37, dtype=F64, device=device)[::1]
    loss, _, labels, _, _ = ops_of(backend, device).sigmoid_bce_fwd(
        x, y, w, None, None, thr, False, False, False, False)
    assert loss.dtype == torch.float32
    expected = ref.sigmoid_bce_elem(x.cpu().double(), y.cpu().double(), w.cpu())
    close(loss, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(labels.cpu(), x.cpu().double() > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("target_kind", ["index", "probs"])
def test_recomputed_gradient_is_bitwise_the_fused_one(device, backend, dtype, target_kind):
    # autograd's second backward (retain_graph=True) recomputes with grad_scale expanded; the
    # result must equal the forward's fused gradient bit for bit (gradcheck's reentrancy check).
    R, C = 4, 300
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(R, C, generator=g) * 4).to(dtype).to(device)
    t = torch.tensor([1, -100, 299, 150], device=device) if target_kind == "index" \
        else torch.softmax(torch.randn(R, C, generator=g), -1).to(dtype).to(device)
    w = (torch.rand(C, generator=g) + 0.5).to(dtype).to(device)
    scale = torch.tensor(1.0 / 3.0, dtype=dtype, device=device)
    args = (-100, 0.1, 1e-3, 0.0)
    ops = ops_of(backend, device)
    fused = ops.softmax_ce_fwd(x, t, w, scale, *args, True, False)[2]
    again = ops.softmax_ce_bwd(scale.expand(R), x, t, w, *args)
    assert torch.equal(fused, again)


def test_none_backward_keeps_precision_at_large_logits(device, backend):
    # |z| ~ 1e4 in fp32: p from exp(z - m) / s, never from a rounded lse (which gave a relative
    # gradient error ~4e-4 here; torch's own fp32 gradient is ~3e-8)
    g = torch.Generator().manual_seed(8)
    x = (1e4 + torch.randn(4, 37, generator=g)).to(device)
    t = torch.tensor([3, 4, 5, 6], device=device)
    gl = torch.rand(4, generator=g).to(device) + 0.5
    grad = ops_of(backend, device).softmax_ce_bwd(gl, x, t, None, -100, 0.0, 0.0, 0.0)
    x64 = x.cpu().double().requires_grad_()
    (expected,) = torch.autograd.grad(torch.nn.functional.cross_entropy(
        x64, t.cpu(), reduction="none"), x64, gl.cpu().double())
    err = ((grad.cpu().double() - expected).abs() / expected.abs().clamp_min(1e-30)).max()
    assert err < 1e-6, float(err)  # measured 2.5e-7..3.6e-7 (torch eager fp32: 7.6e-7)


def test_bce_loss_is_cancellation_free_for_very_negative_logits(device, backend):
    # loss ~ e^x for x << 0, y = 0: the old form lost ~0.5 ulp of |x| (2.4e-7..4.8e-7 absolute)
    x = torch.linspace(-30.0, -8.0, 23, device=device).reshape(1, -1)
    y = torch.zeros_like(x)
    loss = ops_of(backend, device).sigmoid_bce_fwd(x, y, None, None, None, None, False, False,
                                                   False, False)[0]
    expected = torch.log1p(torch.exp(x.cpu().double()))
    close(loss, expected, atol=1e-12, rtol=2e-6)


def test_bce_loss_within_a_few_ulp_of_float64(device, backend):
    # every logit in [-80, 80] on a fine grid plus tiny magnitudes, y = 0 and y = 1: the fp32
    # elementwise loss against softplus in float64, in ulps of the fp32 answer (measured on
    # native CPU: max 4.4, mean 0.67; a log(1 + e) in place of log1p(e) fails by far)
    n = 2001 if is_slow_backend(device, backend) else 200_001
    tiny = torch.logspace(-8, 1.9, n // 100)
    x = torch.cat([torch.linspace(-80, 80, n), -tiny, tiny])
    x = torch.cat([x, x[: -x.numel() % 64]]).reshape(-1, 64)  # quick in Triton's interpreter
    for y_value in (0.0, 1.0):
        y = torch.full_like(x, y_value)
        loss = ops_of(backend, device).sigmoid_bce_fwd(
            x.to(device), y.to(device), None, None, None, None, False, False, False, False)[0]
        z = x.double() if y_value == 0 else -x.double()
        expected = z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))
        ulp = (torch.nextafter(expected.float(), torch.tensor(math.inf)) - expected.float())
        err = (loss.cpu().double() - expected).abs() / ulp.double()
        assert float(err.max()) <= 6 and float(err.mean()) <= 1, (y_value, float(err.max()),
                                                                   float(err.mean()))


# ---- bad arguments: the same exception type naming the same argument ------------------------

def _ce_call(ops, op, x, t, w=None, gs=None, ii=-100, eps=0.0, lse_square_scale=0.0, cap=0.0,
             gl=None):
    if op == "softmax_ce_fwd":
        return ops.softmax_ce_fwd(x, t, w, gs, ii, eps, lse_square_scale, cap, True, True)
    if op == "softmax_ce_fwd_inplace":
        return ops.softmax_ce_fwd_inplace(x.clone(), t, w, gs, ii, eps, lse_square_scale, cap,
                                          False)
    g = gl if gl is not None else torch.ones(x.shape[0], device=x.device)
    return ops.softmax_ce_bwd(g, x, t, w, ii, eps, lse_square_scale, cap)


CE_OPS = ["softmax_ce_fwd", "softmax_ce_fwd_inplace", "softmax_ce_bwd"]


def _bad_ce_cases(device):
    x = torch.randn(3, 5, device=device)
    t = torch.tensor([0, 1, 2], device=device)
    return [
        # (name, kwargs for _ce_call, exception type, argument named)
        ("softcap_nan", dict(cap=NAN), ValueError, "softcap"),
        ("softcap_inf", dict(cap=INF), ValueError, "softcap"),
        ("softcap_negative", dict(cap=-1.0), ValueError, "softcap"),
        ("smoothing_above_1", dict(eps=1.5), ValueError, "label_smoothing"),
        ("smoothing_negative", dict(eps=-0.1), ValueError, "label_smoothing"),
        ("lse_square_scale_negative", dict(lse_square_scale=-1e-3), ValueError, "lse_square_scale"),
        ("lse_square_scale_nan", dict(lse_square_scale=NAN), ValueError, "lse_square_scale"),
        ("target_int32", dict(t=t.int()), RuntimeError, "target"),
        ("target_short", dict(t=t[:2]), RuntimeError, "target"),
        ("target_3d", dict(t=x.unsqueeze(0)), RuntimeError, "target"),
        ("probs_fp16", dict(t=x.half()), RuntimeError, "target"),
        ("probs_shape", dict(t=x[:, :4]), RuntimeError, "target"),
        ("weight_shape", dict(w=torch.ones(6, device=device)), RuntimeError, "weight"),
        ("weight_int", dict(w=torch.ones(5, dtype=torch.int64, device=device)), RuntimeError,
         "weight"),
        ("logits_1d", dict(x=x[0], t=t[:1]), RuntimeError, "logits"),
        ("logits_int", dict(x=x.long()), RuntimeError, "logits"),
        ("logits_col_stride", dict(x=torch.randn(5, 3, device=device).t()), RuntimeError,
         "logits"),
    ]


@pytest.mark.parametrize("op", CE_OPS)
def test_bad_softmax_ce_arguments(device, backend, op):
    ops = ops_of(backend, device)
    x = torch.randn(3, 5, device=device)
    t = torch.tensor([0, 1, 2], device=device)
    for _name, kw, exc, arg in _bad_ce_cases(device):
        kw = dict(kw)
        xx, tt = kw.pop("x", x), kw.pop("t", t)
        with pytest.raises(exc, match=rf"{op}: {arg}\b"):
            _ce_call(ops, op, xx, tt, **kw)
    if op != "softmax_ce_bwd":
        with pytest.raises(RuntimeError, match=rf"{op}: grad_scale\b"):
            _ce_call(ops, op, x, t, gs=torch.ones(2, device=device))
    else:
        with pytest.raises(RuntimeError, match=rf"{op}: grad_loss\b"):
            _ce_call(ops, op, x, t, gl=torch.ones(2, device=device))


@pytest.mark.parametrize("op", CE_OPS)
@pytest.mark.parametrize("bad", [5, -1, 1 << 40])
def test_out_of_range_class_index_raises_index_error(device, backend, op, bad):
    if device != "cpu":
        pytest.skip("CUDA kernels cannot raise without a sync: the row is NaN (docs/OPS.md)")
    x, t = torch.randn(3, 5), torch.tensor([0, bad, 2])
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
        _ce_call(ops_of(backend, device), op, x, t)
    loss = ops_of(backend, device).softmax_ce_fwd(x, t, None, None, bad, 0.0, 0.0, 0.0, False,
                                                  False)[0]
    assert loss[1] == 0  # the same value as ignore_index is not an error


def test_bad_decode_and_scale_arguments(device, backend):
    ops = ops_of(backend, device)
    x = torch.randn(3, 5, device=device)
    for cap in (NAN, INF, -2.0):
        with pytest.raises(ValueError, match=r"softmax_decode: softcap\b"):
            ops.softmax_decode(x, cap)
    with pytest.raises(RuntimeError, match=r"softmax_decode: logits\b"):
        ops.softmax_decode(x[0], 0.0)
    with pytest.raises(RuntimeError, match=r"sigmoid_decode: threshold\b"):
        ops.sigmoid_decode(x, torch.zeros(4, device=device), False)
    with pytest.raises(RuntimeError, match=r"sigmoid_decode: threshold\b"):
        ops.sigmoid_decode(x, torch.zeros(5, dtype=torch.int64, device=device), False)
    with pytest.raises(RuntimeError, match=r"scale_grad_: scale\b"):
        ops.scale_grad_(x.clone(), torch.ones(2, device=device))


def test_bad_sigmoid_bce_arguments(device, backend):
    ops = ops_of(backend, device)
    x = torch.randn(3, 5, device=device)
    y = torch.rand(3, 5, device=device)

    def fwd(**kw):
        a = dict(x=x, y=y, w=None, pw=None, gs=None, thr=None, count=False) | kw
        return ops.sigmoid_bce_fwd(a["x"], a["y"], a["w"], a["pw"], a["gs"], a["thr"], True,
                                   True, False, a["count"])

    cases = [
        (dict(y=y[:2]), RuntimeError, "target"),
        (dict(y=y.half()), RuntimeError, "target"),  # neither the logits' nor the acc dtype
        (dict(y=y.long()), RuntimeError, "target"),
        (dict(w=torch.ones(3, 4, device=device)), RuntimeError, "weight"),
        (dict(pw=torch.ones(3, 5, dtype=torch.int64, device=device)), RuntimeError,
         "pos_weight"),
        (dict(gs=torch.ones(2, device=device)), RuntimeError, "grad_scale"),
        (dict(thr=torch.zeros(4, device=device)), RuntimeError, "threshold"),
        (dict(x=x[0], y=y[0]), RuntimeError, "logits"),
        (dict(count=True), ValueError, "count"),
    ]
    for kw, exc, arg in cases:
        with pytest.raises(exc, match=rf"sigmoid_bce_fwd: {re.escape(arg)}\b"):
            fwd(**kw)
    with pytest.raises(RuntimeError, match=r"sigmoid_bce_bwd: grad_loss\b"):
        ops.sigmoid_bce_bwd(torch.ones(3, 4, device=device), x, y, None, None)
    with pytest.raises(RuntimeError, match=r"sigmoid_bce_bwd: target\b"):
        ops.sigmoid_bce_bwd(torch.ones(3, 5, device=device), x, y[:1], None, None)
