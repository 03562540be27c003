"""What only the native CUDA kernels (csrc/cuda/*.cu) have, against the float64 reference
(reference.py): the row layouts of the largest vocabularies, the error mailbox, 64-bit offsets,
determinism and the vectorised scale. Every op's values, options, dtypes and opcheck run on CUDA
in the shared op suite (tests/test_ops.py, samples in tests/op_cases.py).

Skipped when no GPU is visible. When a GPU is visible, the CUDA kernels must have been built
(`fusedloss._native.cuda_built`), otherwise every test fails: a GPU machine without them is a
build error, not a reason to skip. Run by scripts/gpu_check.sh on the GPU machine.

Shapes here hit the row layouts of softmax_ce.cu the op suite's CUDA sizes leave out: clusters
of 8 blocks and the streaming fallback.
"""

import pytest
import torch

import fusedloss
from fusedloss import reference as ref
from fusedloss._dtypes import acc_dtype
from op_cases import tol

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = torch.ops.fusedloss
DEV = "cuda"
LOWP = (torch.bfloat16, torch.float16)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Tolerances: the op suite's one table (tests/op_cases.py): "elem" for values rounded once to
# the logits dtype (gradients, probabilities), "row" for values kept in the accumulation dtype.


def elem_tol(dtype):
    return tol(dtype, "elem")


def row_tol(dtype):
    return tol(acc_dtype(dtype), "row")


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [262144], ids=["256k"])
def test_softmax_ce_cluster_of_8(dtype, classes):
    # 256k classes: 512 KiB bf16 rows = 8 blocks x 64 KiB; fp32 = 8 x 128 KiB (one block per SM).
    x, t, w, ii, eps, zsq, cap = ce_case(3, classes, dtype, 0, dict(eps=0.1, weight=True))
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, w, None, ii, eps, zsq, cap, True, True)
    rl, rlse, rgrad, rpred, rconf = ce_reference(x, t, w, ii, eps, zsq, cap,
                                                 torch.ones(3, device=DEV))
    close(loss, rl, **row_tol(dtype))
    close(lse, rlse, **row_tol(dtype))
    close(grad, rgrad, **elem_tol(dtype))
    assert torch.equal(pred, rpred)


def test_softmax_ce_streaming_fallback():
    # fp64 with 262144 classes (2 MiB rows) does not fit in 8 blocks' shared memory: the row is
    # read a second time from global memory.
    x, t, w, ii, eps, zsq, cap = ce_case(2, 262144, torch.float64, 0, dict(zsq=1e-3))
    loss, lse, grad, _, _ = OPS.softmax_ce_fwd(x, t, w, None, ii, eps, zsq, cap, True, False)
    rl, rlse, rgrad, _, _ = ce_reference(x, t, w, ii, eps, zsq, cap, torch.ones(2, device=DEV))
    close(loss, rl, **row_tol(torch.float64))
    close(grad, rgrad, **elem_tol(torch.float64))


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
    close(conf, rconf, **row_tol(torch.float32))  # confidence is float32
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
    close(loss[good], rl, **row_tol(torch.float32))
    close(grad[good], rgrad, **elem_tol(torch.float32))
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
    close(loss[check], rl, **row_tol(torch.float32))
    close(grad[check], rgrad, **elem_tol(torch.bfloat16))
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
    close(grad, before.double() * -0.75, **elem_tol(dtype))
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


def test_native_is_auto_backend_on_cuda():
    assert "native" in fusedloss.available_backends("cuda")
