"""The op-level suite: every op of the contract (python/fusedloss/_contract.py) on every
registered backend and device, against the float64 reference (python/fusedloss/reference.py).

Every test takes the `dev_backend` fixture (tests/conftest.py), so a backend is tested here by
being registered. The inputs come from tests/op_cases.py (named samples per op, column counts
per backend, one tolerance table); output dtypes and shapes are the contract's.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE_BACKENDS
from fusedloss import _backend, _contract
from op_cases import DTYPES, F64, SAMPLES, Sample, expected, logits, samples, sizes, tol


def _ops(device: str, backend: str):
    return _backend.get(backend, device).ops


# Backends whose ops are registered with the dispatcher (torch.library), which opcheck checks;
# the torch backend's ops are plain Python functions.
DISPATCHER_BACKENDS = [(d, b) for d, b in DEVICE_BACKENDS
                       if hasattr(_ops(d, b).softmax_ce_fwd, "default")]
CPU_BACKENDS = [(d, b) for d, b in DEVICE_BACKENDS if d == "cpu"]


def _kind(sample: Sample, out: _contract.Out) -> str:
    if sample.op == "sigmoid_bce_fwd" and out.name == "loss":
        return "row" if sample.arg["reduce_rows"] else "bce_loss"
    return "row" if out.dtype in ("acc", "float32") else "elem"


def _outputs(op: str, result) -> tuple:
    if result is None:
        return ()
    return result if isinstance(result, tuple) else (result,)


def check_outputs(sample: Sample, result, want: tuple) -> None:
    """Every output: the contract's dtype and shape, then the value (exact for integer and
    bool outputs, within `tol` for floating ones); an output not asked for is empty."""
    op = _contract.OPS[sample.op]
    a = sample.arg
    got = _outputs(sample.op, result)
    assert len(got) == len(op.outs), (sample.name, len(got))
    for out, actual, exp in zip(op.outs, got, want, strict=True):
        what = f"{sample.op}[{sample.name}].{out.name}"
        assert actual.dtype == _contract._DTYPE_OF[out.dtype](a), (what, actual.dtype)
        if exp is None:
            assert actual.shape == (0,), (what, actual.shape)
            continue
        assert actual.shape == exp.shape, (what, actual.shape, exp.shape)
        if not actual.is_floating_point():
            assert torch.equal(actual.cpu().to(exp.dtype), exp), what
            continue
        torch.testing.assert_close(actual.detach().cpu().to(F64), exp.to(F64), equal_nan=True,
                                   **tol(actual.dtype, _kind(sample, out)),
                                   msg=lambda m, what=what: f"{what}\n{m}")


def run_sample(ops, sample: Sample):
    want = expected(sample)
    before = sample.args[0].clone() if sample.op == "scale_grad_" else None
    result = getattr(ops, sample.op)(*sample.args)
    if sample.op == "scale_grad_":
        g, scale = sample.args
        exp = before.cpu().to(F64) * scale.cpu().to(F64)
        torch.testing.assert_close(g.cpu().to(F64), exp, **tol(g.dtype, "elem"))
        return
    check_outputs(sample, result, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(SAMPLES))
def test_op_matches_float64_reference(dev_backend, op, dtype):
    device, backend = dev_backend
    ops = _ops(device, backend)
    for sample in samples(op, device, backend, dtype):
        run_sample(ops, sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_ce_fwd_inplace_equals_out_of_place(dev_backend, dtype):
    # The same numbers as softmax_ce_fwd, the gradient written over the logits.
    device, backend = dev_backend
    ops = _ops(device, backend)
    for s in samples("softmax_ce_fwd", device, backend, dtype):
        a = s.arg
        if not a["compute_grad"]:
            continue
        loss, lse, grad, pred, conf = ops.softmax_ce_fwd(*s.args)
        xi = a["logits"].clone()
        args = (xi, *s.args[1:8], a["decode"])
        loss_i, lse_i, pred_i, conf_i = ops.softmax_ce_fwd_inplace(*args)
        assert torch.equal(loss_i, loss) and torch.equal(lse_i, lse), s.name
        assert torch.equal(pred_i, pred) and torch.equal(conf_i, conf), s.name
        assert torch.equal(xi, grad), s.name


# ----------------------------------------------------------------------------- opcheck, compile
def _opcheck_samples(device: str, backend: str) -> list[Sample]:
    """The first samples of every op in fp32, plus fp64 (outputs in the accumulation dtype,
    which the fake kernels must agree with) and the in-place op."""
    out = []
    for op in SAMPLES:
        out += samples(op, device, backend, torch.float32)[:2]
    out += samples("softmax_ce_fwd", device, backend, torch.float64)[:1]
    out += samples("sigmoid_bce_fwd", device, backend, torch.float64)[:1]
    s = samples("softmax_ce_fwd", device, backend, torch.float32)[7]  # "all" options
    out.append(Sample("all", "softmax_ce_fwd_inplace", (s.args[0].clone(), *s.args[1:8], True)))
    return out


@pytest.mark.parametrize("device,backend", DISPATCHER_BACKENDS,
                         ids=[f"{d}-{b}" for d, b in DISPATCHER_BACKENDS])
def test_opcheck(device, backend):
    # Schema (mutation, aliasing), fake kernels, autograd registration, AOT dispatch.
    ops = _ops(device, backend)
    for s in _opcheck_samples(device, backend):
        torch.library.opcheck(getattr(ops, s.op), s.args)


def test_torch_compile_fullgraph(dev_backend):
    # Every op traced in one graph (through the fake kernels) gives the eager values.
    device, backend = dev_backend
    ops = _ops(device, backend)
    x = logits(4, 37, torch.float32, device)
    t = torch.tensor([3, -100, 36, 0], device=device)
    bx = logits(4, 37, torch.float32, device, seed=1)
    by = bx > 0.5
    thr = torch.zeros(37, device=device)

    def f(x, t, bx, by):
        loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, None, None, -100, 0.1, 1e-3, 0.0,
                                                         True, True)
        g_none = ops.softmax_ce_bwd(lse.new_ones(4), x, t, None, -100, 0.1, 1e-3, 0.0)
        dpred, dconf = ops.softmax_decode(x, 2.0)
        bloss, bgrad, labels, probs, counts = ops.sigmoid_bce_fwd(
            bx, by, None, None, None, thr, True, True, True, True)
        bg_none = ops.sigmoid_bce_bwd(torch.ones_like(bx), bx, by, None, None)
        dlabels, dprobs = ops.sigmoid_decode(bx, thr, True)
        ops.scale_grad_(grad, lse.new_tensor(2.0))
        return (loss.sum(), grad, pred, conf, g_none, dpred, dconf, bloss.sum(), bgrad, labels,
                probs, counts, bg_none, dlabels, dprobs)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, t, bx, by)
    want = f(x, t, bx, by)
    for a, b in zip(got, want, strict=True):  # inductor may sum in another order
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got[0].to(F64), torch.nn.functional.cross_entropy(
        x.to(F64), t, reduction="sum", label_smoothing=0.1) + 1e-3 * (
        torch.logsumexp(x.to(F64), -1)[t != -100] ** 2).sum(), **tol(torch.float32, "row"))


# ----------------------------------------------------------------------------- named edge cases
def _classes(device: str, backend: str) -> int:
    """The widest column count of the backend's grid: crosses its blocks."""
    return sizes(device, backend).grid[-1][1]


def test_optional_outputs_do_not_change_the_loss(dev_backend):
    # compute_grad / decode off: bitwise the same per-row values, empty extra outputs.
    device, backend = dev_backend
    ops = _ops(device, backend)
    for s in samples("softmax_ce_fwd", device, backend, torch.float32)[:10]:
        loss, lse, *_ = ops.softmax_ce_fwd(*s.args)
        loss2, lse2, grad2, pred2, conf2 = ops.softmax_ce_fwd(*s.args[:8], False, False)
        assert torch.equal(loss2, loss) and torch.equal(lse2, lse), s.name
        assert grad2.shape == pred2.shape == conf2.shape == (0,), s.name


def test_ignored_rows_are_exact_zeros_even_under_an_infinite_scale(dev_backend):
    # Ignored rows: loss and gradient exactly 0 (not 0 * inf = NaN); lse still computed.
    device, backend = dev_backend
    ops = _ops(device, backend)
    c = _classes(device, backend)
    x = logits(4, c, torch.float32, device)
    t = torch.tensor([1, -100, 3, -100], device=device)
    inf = torch.tensor(float("inf"), device=device)
    loss, lse, grad, _, _ = ops.softmax_ce_fwd(x, t, None, inf, -100, 0.1, 0.0, 0.0, True, False)
    assert (grad[1] == 0).all() and (grad[3] == 0).all() and not grad[[1, 3]].isnan().any()
    assert loss[1] == 0 and loss[3] == 0
    torch.testing.assert_close(lse.cpu().to(F64), torch.logsumexp(x.cpu().to(F64), -1),
                               **tol(torch.float32, "row"))
    g_inf = torch.full((4,), float("inf"), device=device)
    g = ops.softmax_ce_bwd(g_inf, x, t, None, -100, 0.0, 0.0, 0.0)
    assert not g[1].any() and not g[3].any()
    t_all = torch.full((4,), -100, device=device)
    loss, _, grad, _, _ = ops.softmax_ce_fwd(x, t_all, None, inf, -100, 0.1, 0.0, 0.0, True,
                                             False)
    assert not loss.any() and not grad.any() and not grad.isnan().any()


def test_softmax_ce_zero_classes(dev_backend):
    # C = 0: every target must be ignore_index; lse = logsumexp(empty) = -inf, loss 0;
    # decoding pred 0, confidence 0.
    device, backend = dev_backend
    ops = _ops(device, backend)
    x = torch.empty(3, 0, device=device)
    t = torch.full((3,), -100, device=device)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True,
                                                     True)
    assert torch.equal(loss.cpu(), torch.zeros(3))
    assert torch.equal(lse.cpu(), torch.full((3,), -float("inf")))
    assert grad.shape == (3, 0) and torch.equal(pred.cpu(), torch.zeros(3, dtype=torch.long))
    assert torch.equal(conf.cpu(), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_ce_extreme_logits(dev_backend, dtype, eps):
    # +-1e4 (exp overflows without the max shift), -inf in some (non-target) classes, a row of
    # logits around a large common offset (cancellation in lse - z), a row whose first block is
    # all -inf (the running max starts at -inf), a row of -1e4 everywhere.
    device, backend = dev_backend
    ops = _ops(device, backend)
    c = _classes(device, backend)
    x = torch.randn(7, c, generator=torch.Generator().manual_seed(3))
    x[0, ::7] = 1e4
    x[1, ::5] = -1e4
    x[2] += 1e4
    x[3, c // 3:] = -float("inf")
    x[4, :c - 10] = -float("inf")
    x[5, :] = -1e4
    x = x.to(dtype).to(device)
    t = torch.tensor([0, 1, 2, 4, c - 5, 5, 3], device=device)
    s = Sample("extreme", "softmax_ce_fwd", (x, t, None, None, -100, eps, 0.0, 0.0, True, True))
    want = expected(s)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(*s.args)
    if eps > 0:  # smoothing over a -inf class is +inf, as in torch
        assert torch.isinf(loss[3]) and torch.isinf(want[0][3])
    torch.testing.assert_close(loss.cpu().to(F64), want[0], equal_nan=True,
                               **tol(torch.float32, "row"))
    torch.testing.assert_close(lse.cpu().to(F64), want[1], atol=0, rtol=2e-6)
    torch.testing.assert_close(grad.cpu().to(F64), want[2], **tol(dtype, "elem"))
    assert torch.equal(pred.cpu(), want[3]) and torch.isfinite(grad).all()


def test_softmax_ce_row_and_target_strides(dev_backend):
    # Rows with a stride larger than C (a column slice), a strided target, a strided
    # probability target, a custom ignore_index: the gradient comes back contiguous.
    device, backend = dev_backend
    ops = _ops(device, backend)
    c = _classes(device, backend)
    g = torch.Generator().manual_seed(4)
    big = torch.randn(10, c + 40, generator=g).to(device)
    x = big[::2, 5:c + 5]
    t = torch.randint(0, c, (10,), generator=g).to(device)[::2]
    t[0] = 7
    w = torch.rand(c, generator=g).to(device)
    for target, ii in ((t, -100), (t, 7), (torch.softmax(big, -1)[::2, 5:c + 5], -100)):
        s = Sample("strided", "softmax_ce_fwd", (x, target, w, None, ii, 0.1, 0.0, 0.0, True,
                                                 True))
        want = expected(s)
        loss, _, grad, _, _ = ops.softmax_ce_fwd(*s.args)
        torch.testing.assert_close(loss.cpu().to(F64), want[0], **tol(torch.float32, "row"))
        torch.testing.assert_close(grad.cpu().to(F64), want[2], **tol(torch.float32, "elem"))
        assert grad.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_decode_ties_nan_and_softcap_follow_torch_argmax(dev_backend, dtype):
    device, backend = dev_backend
    ops = _ops(device, backend)
    c = _classes(device, backend)
    x = torch.zeros(5, c)
    x[0, [10, c - 40, c - 10]] = 50.0  # a tie across blocks: the lowest index wins
    x[1, [7, 8]] = 50.0                # a tie inside a block
    x[2, c // 2] = 9.0
    x[2, [c // 3, c - 3]] = float("nan")  # the first NaN wins, as torch.argmax
    x[3, :] = -float("inf")            # all -inf: argmax 0, as torch
    x = x.to(dtype).to(device)
    pred, conf = ops.softmax_decode(x, 0.0)
    ep, ec = expected(Sample("ties", "softmax_decode", (x, 0.0)))
    assert pred.cpu().tolist()[:3] == [10, 7, c // 3] and torch.equal(pred.cpu(), ep)
    assert torch.isnan(conf[2])
    torch.testing.assert_close(conf.cpu().to(F64), ec.to(F64), equal_nan=True,
                               **tol(torch.float32, "row"))
    # softcap: tanh saturates 1e4 and 2e4 to the same capped value: a tie in z, lowest wins
    xc = torch.randn(2, 100).to(dtype).to(device)
    xc[0, 50], xc[0, 20] = 2e4, 1e4
    pred, conf = ops.softmax_decode(xc, 1.0)
    ep, ec = expected(Sample("softcap", "softmax_decode", (xc, 1.0)))
    assert torch.equal(pred.cpu(), ep) and pred[0] == 20
    torch.testing.assert_close(conf.cpu().to(F64), ec.to(F64), **tol(torch.float32, "row"))


@pytest.mark.parametrize("bad", [7, -1, 1 << 40])
@pytest.mark.parametrize("device,backend", CPU_BACKENDS, ids=[f"{d}-{b}" for d, b in CPU_BACKENDS])
def test_out_of_range_target_raises_index_error_on_cpu(device, backend, bad):
    # A host check costs nothing on the CPU; on CUDA the row is poisoned instead (test_cuda.py).
    ops = _ops(device, backend)
    x = torch.randn(3, 7)
    t = torch.tensor([0, bad, 2])
    msg = f"Target {bad} is out of bounds."
    with pytest.raises(IndexError, match=msg):
        ops.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True, False)
    with pytest.raises(IndexError, match=msg):
        ops.softmax_ce_fwd_inplace(x.clone(), t, None, None, -100, 0.0, 0.0, 0.0, False)
    with pytest.raises(IndexError, match=msg):
        ops.softmax_ce_bwd(torch.ones(3), x, t, None, -100, 0.0, 0.0, 0.0)
    # the same value as ignore_index is not an error
    assert ops.softmax_ce_fwd(x, t, None, None, bad, 0.0, 0.0, 0.0, False, False)[0][1] == 0


def test_sigmoid_bce_extreme_logits_are_stable(dev_backend):
    device, backend = dev_backend
    ops = _ops(device, backend)
    x = torch.tensor([[1e4, -1e4, 30.0, -30.0, 0.0, 20.0]], device=device)
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5, 1.0]], device=device)
    s = Sample("extreme", "sigmoid_bce_fwd", (x, y, None, None, None, None, False, True, False,
                                              False))
    want = expected(s)
    loss, grad, *_ = ops.sigmoid_bce_fwd(*s.args)
    torch.testing.assert_close(loss.cpu().to(F64), want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.cpu().to(F64), want[1], **tol(torch.float32, "elem"))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_sigmoid_bce_threshold_tie_is_negative_and_nan_targets_count_as_negative(dev_backend):
    device, backend = dev_backend
    ops = _ops(device, backend)
    x = torch.tensor([[0.5, 0.5, -1.0, 2.0]], device=device)
    thr = torch.tensor([0.5, 0.25, -2.0, 3.0], device=device)  # logit == threshold in column 0
    y = torch.tensor([[1.0, 0.0, float("nan"), 1.0]], device=device)
    _, _, labels, _, counts = ops.sigmoid_bce_fwd(x, y, None, None, None, thr, True, False,
                                                  False, True)
    assert labels.tolist() == [[False, True, True, False]]
    # TP, FP, FN per class: col0 FN, col1 FP, col2 FP (NaN target is not > 0.5), col3 FN
    assert counts.tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]]


def test_sigmoid_bce_counts_do_not_depend_on_thread_count(dev_backend):
    device, backend = dev_backend
    ops = _ops(device, backend)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(101, 70, generator=g).to(device)
    y = (torch.rand(101, 70, generator=g) < 0.4).to(device)
    thr = (torch.randn(70, generator=g) * 0.1).to(device)
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
    s = Sample("counts", "sigmoid_bce_fwd", (x, y, None, None, None, thr, True, False, False,
                                             True))
    assert torch.equal(outs[0].cpu(), expected(s)[4])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad_is_one_rounding_and_one_touches_nothing(dev_backend, dtype):
    device, backend = dev_backend
    ops = _ops(device, backend)
    g = logits(7, 300, dtype, device)
    want = (g.to(F64) * 0.375).to(dtype)
    ops.scale_grad_(g, torch.tensor(0.375, device=device, dtype=F64))
    if dtype == torch.bfloat16 and device == "cpu" and backend == "triton":
        # The interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest even, and
        # `fp_downcast_rounding="rtne"` is ignored by the interpreter): allow that one ulp.
        torch.testing.assert_close(g, want, atol=0, rtol=2**-7)
    else:
        assert torch.equal(g, want)
    h = logits(4, 50, torch.float32, device)
    h[0, 0] = float("nan")
    before = h.clone()
    ops.scale_grad_(h, torch.tensor(1.0, device=device))
    assert torch.equal(h.view(torch.int32), before.view(torch.int32))  # bitwise untouched
    ht = logits(50, 4, torch.float32, device).t()  # not contiguous
    want = ht * 3.0
    ops.scale_grad_(ht, torch.tensor(3.0, device=device, dtype=torch.bfloat16))
    assert torch.equal(ht, want)
