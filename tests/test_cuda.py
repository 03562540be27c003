"""The native CUDA kernels (csrc/cuda/*.cu) against the float64 reference (reference.py).

Skipped when no GPU is visible. When a GPU is visible, the CUDA kernels must have been built
(`fusedloss._native.cuda_built`), otherwise every test fails: a GPU machine without them is a
build error, not a reason to skip. Run by scripts/gpu_check.sh on the GPU machine.

Shapes are chosen to hit each row layout of softmax_ce.cu (see its header): warp rows (small C),
block rows, clusters of 2/4/8 blocks, the streaming fallback, and rows that are not 16-byte
aligned (odd class counts, sliced logits) so the chunk phase logic runs.
"""

import pytest
import torch

import fusedloss
from fusedloss import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = torch.ops.fusedloss
DEV = "cuda"
LOWP = (torch.bfloat16, torch.float16)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Gradients are rounded to the logits dtype; everything else is computed in fp32 (fp64).
GRAD_TOL = {torch.float64: dict(atol=1e-12, rtol=1e-9), torch.float32: dict(atol=1e-7, rtol=2e-5),
            torch.bfloat16: dict(atol=1e-6, rtol=1.6e-2), torch.float16: dict(atol=1e-7, rtol=2e-3)}
# fp32 outputs (loss, lse, confidence): fp32 accumulation with the __expf/__logf intrinsics
# (ex2.approx/lg2.approx based); everything else IEEE (no --use_fast_math).
# loss/lse are stored in the accumulation dtype: fp64 logits get fp64 precision.
F32_TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9)}
F32_TOL_DEFAULT = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(autouse=True)
def _require_build():
    from fusedloss import _native
    assert _native.cuda_built, "a GPU is visible but fusedloss._C has no CUDA kernels: rebuild " \
        "with CUDA_HOME set (pip install --no-build-isolation --no-deps -e .)"
    yield
    # A test that fed an out-of-range target must have consumed its error.
    torch.cuda.synchronize()
    torch.ops.fusedloss_cuda.raise_pending_error()


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **tol)


def f32_tol(dtype):
    return F32_TOL.get(dtype, F32_TOL_DEFAULT)


def make_logits(rows, classes, dtype, seed=0, scale=4.0, pad=0):
    """Logits, optionally a column slice of a wider tensor (row stride > classes)."""
    x = torch.randn(rows, classes + pad, generator=gen(seed), device=DEV) * scale
    return x.to(dtype)[:, :classes]


def class_target(rows, classes, seed=1, ignore_rows=(), ignore_index=-100):
    t = torch.randint(0, classes, (rows,), generator=gen(seed), device=DEV)
    for r in ignore_rows:
        t[r] = ignore_index
    return t


def prob_target(rows, classes, dtype, seed=2):
    return torch.softmax(torch.randn(rows, classes, generator=gen(seed), device=DEV), -1).to(dtype)


# (rows, classes, pad, why)
CE_SHAPES = [
    (7, 10, 0, "warp rows, tiny classifier"),
    (33, 1000, 3, "ImageNet classes: warp rows (bf16/fp16), block rows (fp32/fp64); sliced "
                  "rows (stride 1003) are not 16-byte aligned"),
    (4, 50257, 0, "GPT-2 vocabulary: odd C; clusters of 2 (bf16/fp16), 4 (fp32), 8 (fp64)"),
    (3, 131072, 0, "Llama-3-sized vocabulary: clusters of 4 (bf16/fp16), 8 (fp32, fp64 at "
                   "128 KiB per block)"),
]

CE_OPTIONS = {
    "plain": dict(),
    "weight_ignore": dict(weight=True, ignore=True),
    "smooth": dict(eps=0.1),
    "smooth_weight_ignore": dict(eps=0.2, weight=True, ignore=True),
    "zloss_softcap": dict(zsq=1e-3, softcap=30.0),
    "prob": dict(prob=True),
    "prob_smooth_weight_softcap": dict(prob=True, eps=0.1, weight=True, softcap=20.0),
}


def ce_case(rows, classes, dtype, pad, opt):
    x = make_logits(rows, classes, dtype, pad=pad)
    ignore_index = -100
    if opt.get("prob"):
        t = prob_target(rows, classes, dtype)
    else:
        t = class_target(rows, classes, ignore_rows=(1,) if opt.get("ignore") else ())
    w = (torch.rand(classes, generator=gen(3), device=DEV) + 0.5).to(dtype) if opt.get("weight") \
        else None
    return x, t, w, ignore_index, opt.get("eps", 0.0), opt.get("zsq", 0.0), opt.get("softcap", 0.0)


def ce_reference(x, t, w, ignore_index, eps, zsq, cap, row_scale):
    x64 = x.double()
    t64 = t.double() if t.dim() == 2 else t
    w64 = w.double() if w is not None else None
    loss, lse = ref.softmax_ce_rows(x64, t64, w64, ignore_index, eps, zsq, cap)
    grad = ref.softmax_ce_grad(x64, t64, w64, row_scale.double(), ignore_index, eps, zsq, cap)
    pred, conf = ref.softmax_decode(x64, cap)
    return loss, lse, grad, pred, conf


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=["C10", "C1000_sliced", "C50257", "C131072"])
@pytest.mark.parametrize("opt", list(CE_OPTIONS), ids=list(CE_OPTIONS))
def test_softmax_ce_fwd(dtype, shape, opt):
    rows, classes, pad, _ = shape
    x, t, w, ii, eps, zsq, cap = ce_case(rows, classes, dtype, pad, CE_OPTIONS[opt])
    g = torch.tensor(0.37, device=DEV)
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, w, g, ii, eps, zsq, cap, True, True)
    rl, rlse, rgrad, rpred, rconf = ce_reference(x, t, w, ii, eps, zsq, cap,
                                                 g.double().expand(rows))
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # docs/OPS.md
    assert loss.dtype == lse.dtype == acc and conf.dtype == torch.float32 and grad.dtype == dtype
    assert grad.is_contiguous() and grad.shape == x.shape
    close(lse, rlse, **f32_tol(dtype))
    close(loss, rl, **f32_tol(dtype))
    close(grad, rgrad, **GRAD_TOL[dtype])
    # argmax ties are possible in bf16/fp16 after rounding: the reference sees the same values.
    assert torch.equal(pred, rpred)
    close(conf, rconf, **f32_tol(dtype))
    if CE_OPTIONS[opt].get("ignore"):
        assert loss[1].item() == 0.0 and (grad[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [262144], ids=["256k"])
def test_softmax_ce_cluster_of_8(dtype, classes):
    # 256k classes: 512 KiB bf16 rows = 8 blocks x 64 KiB; fp32 = 8 x 128 KiB (one block per SM).
    x, t, w, ii, eps, zsq, cap = ce_case(3, classes, dtype, 0, dict(eps=0.1, weight=True))
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, w, None, ii, eps, zsq, cap, True, True)
    rl, rlse, rgrad, rpred, rconf = ce_reference(x, t, w, ii, eps, zsq, cap,
                                                 torch.ones(3, device=DEV))
    close(loss, rl, **f32_tol(dtype))
    close(lse, rlse, **f32_tol(dtype))
    close(grad, rgrad, **GRAD_TOL[dtype])
    assert torch.equal(pred, rpred)


def test_softmax_ce_streaming_fallback():
    # fp64 with 262144 classes (2 MiB rows) does not fit in 8 blocks' shared memory: the row is
    # read a second time from global memory.
    x, t, w, ii, eps, zsq, cap = ce_case(2, 262144, torch.float64, 0, dict(zsq=1e-3))
    loss, lse, grad, _, _ = OPS.softmax_ce_fwd(x, t, w, None, ii, eps, zsq, cap, True, False)
    rl, rlse, rgrad, _, _ = ce_reference(x, t, w, ii, eps, zsq, cap, torch.ones(2, device=DEV))
    close(loss, rl, **f32_tol(torch.float64))
    close(grad, rgrad, **GRAD_TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [10, 1000, 50257], ids=["C10", "C1000", "C50257"])
def test_softmax_ce_inplace_equals_out_of_place(dtype, classes):
    x, t, w, ii, eps, zsq, cap = ce_case(5, classes, dtype, 0, dict(eps=0.1, weight=True,
                                                                    ignore=True, softcap=15.0))
    g = torch.tensor(2.0, device=DEV)
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, w, g, ii, eps, zsq, cap, True, True)
    y = x.clone()
    loss2, lse2, pred2, conf2 = OPS.softmax_ce_fwd_inplace(y, t, w, g, ii, eps, zsq, cap, True)
    assert torch.equal(y, grad)  # same kernel and layout: bitwise equal
    for a, b in ((loss, loss2), (lse, lse2), (pred, pred2), (conf, conf2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", ["plain", "smooth_weight_ignore", "prob_smooth_weight_softcap"])
@pytest.mark.parametrize("stride0", [False, True], ids=["grad_loss", "expanded_grad_loss"])
def test_softmax_ce_bwd(dtype, opt, stride0):
    rows, classes = 6, 3001
    x, t, w, ii, eps, zsq, cap = ce_case(rows, classes, dtype, 0, CE_OPTIONS[opt])
    gl = torch.tensor(1.5, device=DEV).expand(rows) if stride0 else \
        torch.randn(rows, generator=gen(9), device=DEV)
    grad = OPS.softmax_ce_bwd(gl, x, t, w, ii, eps, zsq, cap)
    t64 = t.double() if t.dim() == 2 else t
    rgrad = ref.softmax_ce_grad(x.double(), t64, w.double() if w is not None else None,
                                gl.double(), ii, eps, zsq, cap)
    close(grad, rgrad, **GRAD_TOL[dtype])


def test_softmax_ce_ignored_rows_are_exact_zero_with_infinite_scale():
    x = make_logits(4, 300, torch.float32)
    t = torch.full((4,), -100, device=DEV)
    loss, _, grad, _, _ = OPS.softmax_ce_fwd(x, t, None, torch.tensor(float("inf"), device=DEV),
                                             -100, 0.1, 1e-3, 0.0, True, False)
    assert (loss == 0).all() and (grad == 0).all() and not grad.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [5, 1000, 50257], ids=["C5", "C1000", "C50257"])
def test_softmax_decode_ties_and_nan(dtype, classes):
    # Integer-valued logits in a small range: many ties; torch.argmax takes the lowest index.
    x = torch.randint(-3, 4, (9, classes), generator=gen(4), device=DEV).to(dtype)
    x[2, classes // 2] = float("nan")
    x[2, classes - 1] = float("nan")  # the first NaN wins
    x[3] = float("-inf")
    pred, conf = OPS.softmax_decode(x, 0.0)
    assert torch.equal(pred, torch.argmax(x.double(), -1))
    rpred, rconf = ref.softmax_decode(x.double())
    close(conf, rconf, **f32_tol(dtype))
    assert pred[2].item() == classes // 2 and conf[2].isnan()


@pytest.mark.parametrize("bad", [1000, -5], ids=["too_large", "negative"])
def test_out_of_range_target_poisons_row_and_raises_later(bad):
    x = make_logits(4, 1000, torch.float32)
    t = class_target(4, 1000)
    t[2] = bad
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True,
                                                     True)
    assert loss[2].isnan() and grad[2].isnan().all()
    good = torch.tensor([0, 1, 3], device=DEV)
    rl, rlse, rgrad, _, _ = ce_reference(x[good], t[good], None, -100, 0.0, 0.0, 0.0,
                                         torch.ones(3, device=DEV))
    close(loss[good], rl, **F32_TOL_DEFAULT)
    close(grad[good], rgrad, **GRAD_TOL[torch.float32])
    assert not lse.isnan().any()
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        torch.ops.fusedloss_cuda.raise_pending_error()
    # reported once, then cleared: the next call works
    OPS.softmax_ce_fwd(x, class_target(4, 1000), None, None, -100, 0.0, 0.0, 0.0, False, False)
    torch.cuda.synchronize()
    torch.ops.fusedloss_cuda.raise_pending_error()


def test_out_of_range_target_raises_at_next_op():
    x = make_logits(2, 64, torch.float32)
    t = torch.tensor([0, 64], device=DEV)
    OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True, False)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="Target 64 is out of bounds"):
        OPS.softmax_decode(x, 0.0)


def test_int64_offsets_bf16_over_2_pow_31_elements():
    # 8193 x 262144 bf16 = 2^31 + 262144 elements (4.3 GB): the last row starts past 2^31.
    rows, classes = 8193, 262144
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs 16 GiB of GPU memory")
    x = torch.empty(rows, classes, dtype=torch.bfloat16, device=DEV)
    x.normal_(0, 3, generator=gen(5))
    t = class_target(rows, classes)
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True,
                                                     True)
    check = torch.tensor([0, 4095, rows - 2, rows - 1], device=DEV)
    rl, rlse, rgrad, rpred, _ = ce_reference(x[check], t[check], None, -100, 0.0, 0.0, 0.0,
                                             torch.ones(len(check), device=DEV))
    close(loss[check], rl, **F32_TOL_DEFAULT)
    close(grad[check], rgrad, **GRAD_TOL[torch.bfloat16])
    assert torch.equal(pred[check], rpred)
    del grad
    # BCE decode over the same 2^31+ elements: labels of the last row
    thr = torch.zeros(classes, device=DEV)
    labels, _ = OPS.sigmoid_decode(x, thr, False)
    assert torch.equal(labels[-1], x[-1] > 0)
    scale = torch.tensor(0.5, device=DEV)
    last = x[-1].clone()
    OPS.scale_grad_(x, scale)
    assert torch.equal(x[-1], (last.float() * 0.5).bfloat16())


def test_softmax_ce_deterministic():
    x, t, w, ii, eps, zsq, cap = ce_case(16, 131072, torch.bfloat16, 0,
                                         dict(eps=0.1, weight=True, zsq=1e-4))
    a = OPS.softmax_ce_fwd(x, t, w, None, ii, eps, zsq, cap, True, True)
    b = OPS.softmax_ce_fwd(x, t, w, None, ii, eps, zsq, cap, True, True)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------
# Sigmoid BCE

# (rows, classes, pad, why)
BCE_SHAPES = [
    (7, 10, 0, "tiny multi-label head: 4-lane rows"),
    (64, 1000, 0, "one column tile"),
    (5, 3001, 3, "odd C, sliced rows: unaligned chunks"),
    (3, 70000, 0, "many column tiles: reduce_rows workspace"),
]


def bce_case(rows, classes, dtype, pad, target_kind, weight_kind):
    x = make_logits(rows, classes, dtype, pad=pad)
    u = torch.rand(rows, classes, generator=gen(6), device=DEV)
    if target_kind == "float":
        y = u.to(dtype)
    elif target_kind == "bool":
        y = u > 0.5
    else:
        y = (u > 0.5).to(torch.uint8)
    w = pw = None
    if weight_kind == "col":  # (C,) broadcast by expand: strides (0, 1)
        w = (torch.rand(classes, generator=gen(7), device=DEV) + 0.5).to(dtype)
        w = w.expand(rows, classes)
        pw = (torch.rand(classes, generator=gen(8), device=DEV) * 3).to(dtype).expand(rows, classes)
    elif weight_kind == "row_t":  # (R, 1) broadcast + a transposed full tensor
        w = (torch.rand(rows, 1, generator=gen(7), device=DEV) + 0.5).to(dtype).expand(rows,
                                                                                       classes)
        pw = (torch.rand(classes, rows, generator=gen(8), device=DEV) * 3).to(dtype).t()
    return x, y, w, pw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BCE_SHAPES, ids=["C10", "C1000", "C3001_sliced", "C70000"])
@pytest.mark.parametrize("target_kind", ["float", "bool", "uint8"])
@pytest.mark.parametrize("weight_kind", ["none", "col", "row_t"])
def test_sigmoid_bce_fwd(dtype, shape, target_kind, weight_kind):
    rows, classes, pad, _ = shape
    x, y, w, pw = bce_case(rows, classes, dtype, pad, target_kind, weight_kind)
    g = torch.tensor(0.25, device=DEV)
    thr = torch.randn(classes, generator=gen(10), device=DEV)
    loss_e, grad, labels, probs, counts = OPS.sigmoid_bce_fwd(x, y, w, pw, g, thr, False, True,
                                                              True, True)
    loss_r, _, _, _, _ = OPS.sigmoid_bce_fwd(x, y, w, pw, None, None, True, False, False, False)
    x64 = x.double()
    w64 = w.double() if w is not None else None
    pw64 = pw.double() if pw is not None else None
    elem = ref.sigmoid_bce_elem(x64, y, w64, pw64)
    rgrad = ref.sigmoid_bce_grad(x64, y, w64, pw64, g.double())
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # docs/OPS.md
    assert loss_e.dtype == dtype and loss_r.dtype == acc
    close(loss_e, elem, **GRAD_TOL[dtype])
    close(loss_r, elem.sum(-1), atol=1e-4, rtol=1e-5)  # fp32 row sums
    close(grad, rgrad, **GRAD_TOL[dtype])
    rlabels = ref.sigmoid_decode(x, thr)
    assert torch.equal(labels, rlabels)
    close(probs, torch.sigmoid(x64), **GRAD_TOL[dtype])
    assert counts.dtype == torch.int64 and torch.equal(counts, ref.confusion_counts(rlabels, y))


def test_sigmoid_bce_extreme_logits():
    x = torch.tensor([[-1e4, -50.0, 0.0, 50.0, 1e4]], device=DEV)
    y = torch.tensor([[1.0, 0.0, 0.5, 1.0, 0.0]], device=DEV)
    loss, grad, _, _, _ = OPS.sigmoid_bce_fwd(x, y, None, None, None, None, False, True, False,
                                              False)
    close(loss, ref.sigmoid_bce_elem(x.double(), y), atol=1e-6, rtol=1e-6)
    close(grad, ref.sigmoid_bce_grad(x.double(), y, None, None, torch.ones((), device=DEV,
                                                                            dtype=torch.float64)),
          atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gl_kind", ["contiguous", "transposed", "expanded"])
def test_sigmoid_bce_bwd(dtype, gl_kind):
    rows, classes = 9, 777
    x, y, w, pw = bce_case(rows, classes, dtype, 0, "float", "col")
    if gl_kind == "contiguous":
        gl = torch.randn(rows, classes, generator=gen(11), device=DEV).to(dtype)
    elif gl_kind == "transposed":
        gl = torch.randn(classes, rows, generator=gen(11), device=DEV).to(dtype).t()
    else:
        gl = torch.tensor(0.5, device=DEV).to(dtype).expand(rows, classes)
    grad = OPS.sigmoid_bce_bwd(gl, x, y, w, pw)
    rgrad = ref.sigmoid_bce_grad(x.double(), y.double(), w.double(), pw.double(), gl.double())
    close(grad, rgrad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sigmoid_decode(dtype):
    x = make_logits(11, 2051, dtype, pad=1)
    thr = torch.randn(2051, generator=gen(12), device=DEV)
    x[0, :5] = thr[:5].to(dtype)  # ties: x == threshold exactly, which is negative
    thr[:5] = x[0, :5].float()
    labels, probs = OPS.sigmoid_decode(x, thr, True)
    assert torch.equal(labels, ref.sigmoid_decode(x, thr))
    assert not labels[0, :5].any()
    close(probs, torch.sigmoid(x.double()), **GRAD_TOL[dtype])
    labels2, probs2 = OPS.sigmoid_decode(x, thr, False)
    assert torch.equal(labels, labels2) and probs2.numel() == 0


def test_sigmoid_bce_deterministic():
    x, y, w, pw = bce_case(300, 70000, torch.bfloat16, 0, "bool", "col")
    thr = torch.zeros(70000, device=DEV)
    a = OPS.sigmoid_bce_fwd(x, y, w, pw, None, thr, True, True, False, True)
    b = OPS.sigmoid_bce_fwd(x, y, w, pw, None, thr, True, True, False, True)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------
# scale_grad_

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,offset", [(1, 0), (1001, 1), (1 << 20, 0)],
                         ids=["1", "odd_misaligned", "1M"])
def test_scale_grad(dtype, n, offset):
    buf = torch.randn(n + offset, generator=gen(13), device=DEV).to(dtype)
    grad = buf[offset:]  # offset 1: the data does not start 16-byte aligned
    before = grad.clone()
    head = buf[:offset].clone()
    OPS.scale_grad_(grad, torch.tensor(1.0, device=DEV))
    assert torch.equal(grad, before)  # untouched (bitwise)
    OPS.scale_grad_(grad, torch.tensor(-0.75, device=DEV, dtype=torch.float64))
    close(grad, before.double() * -0.75, **GRAD_TOL[dtype])
    assert torch.equal(buf[:offset], head)  # nothing before the tensor was written


def test_scale_grad_one_leaves_nan_and_inf_alone():
    grad = torch.tensor([float("nan"), float("inf"), 1.0], device=DEV)
    OPS.scale_grad_(grad, torch.ones((), device=DEV))
    assert grad[0].isnan() and grad[1].isinf() and grad[2] == 1.0


def test_scale_grad_non_contiguous_falls_back():
    grad = torch.randn(8, 6, generator=gen(14), device=DEV)[:, ::2]
    before = grad.clone()
    OPS.scale_grad_(grad, torch.tensor(3.0, device=DEV))
    close(grad, before.double() * 3, atol=0, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, dispatch) for every op on CUDA

def _opcheck_cases():
    x = make_logits(3, 70, torch.float32)
    t = class_target(3, 70, ignore_rows=(1,))
    p = prob_target(3, 70, torch.float32)
    w = torch.rand(70, generator=gen(3), device=DEV) + 0.5
    s = torch.tensor(0.5, device=DEV)
    _, lse, _, _, _ = OPS.softmax_ce_fwd(x, t, w, None, -100, 0.1, 1e-3, 3.0, False, False)
    y = torch.rand(3, 70, generator=gen(6), device=DEV) > 0.5
    bw = torch.rand(70, generator=gen(7), device=DEV).expand(3, 70)
    thr = torch.zeros(70, device=DEV)
    gl = torch.randn(3, generator=gen(9), device=DEV)
    return [
        (OPS.softmax_ce_fwd.default, (x, t, w, s, -100, 0.1, 1e-3, 3.0, True, True)),
        (OPS.softmax_ce_fwd.default, (x, p, None, None, -100, 0.0, 0.0, 0.0, True, False)),
        (OPS.softmax_ce_fwd_inplace.default, (x.clone(), t, w, s, -100, 0.1, 0.0, 0.0, True)),
        (OPS.softmax_ce_bwd.default, (gl, x, t, w, -100, 0.1, 1e-3, 3.0)),
        (OPS.softmax_decode.default, (x, 0.0)),
        (OPS.sigmoid_bce_fwd.default, (x, y, bw, None, s, thr, True, True, True, True)),
        (OPS.sigmoid_bce_fwd.default, (x, y.float(), None, bw, None, None, False, False, False,
                                       False)),
        (OPS.sigmoid_bce_bwd.default, (torch.randn(3, 70, device=DEV), x, y, bw, None)),
        (OPS.sigmoid_decode.default, (x, thr, True)),
        (OPS.scale_grad_.default, (x.clone(), s)),
    ]


@pytest.mark.parametrize("index", range(10))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_native_is_auto_backend_on_cuda():
    assert "native" in fusedloss.available_backends("cuda")
