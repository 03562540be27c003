"""The native CUDA ops on the op-contract edges (docs/OPS.md), against torch and the float64
reference (needs a GPU): the backward's recomputation is bitwise the fused forward gradient,
forward-gradient precision on confident rows, non-finite logits, side tensors of other dtypes
than the logits, and the cancellation-free BCE loss.
"""

import pytest
import torch
import torch.nn.functional as F

from fusedloss import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = torch.ops.fusedloss
DEV = "cuda"
NAN, INF = float("nan"), float("inf")


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


# (dtype, classes): warp rows, block rows, a cluster of 2 (bf16), fp64 block rows
LAYOUTS = [(torch.float32, 10), (torch.float32, 3001), (torch.bfloat16, 50257),
           (torch.float64, 777)]


@pytest.mark.parametrize("dtype,classes", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("opt", [dict(), dict(eps=0.1, zsq=1e-3, cap=20.0), dict(prob=True)],
                         ids=["plain", "smooth_zloss_softcap", "prob"])
def test_bwd_recompute_is_bitwise_the_fused_gradient(dtype, classes, opt):
    rows = 5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(rows, classes, generator=gen(0), device=DEV) * 4).to(dtype)
    if opt.get("prob"):
        t = torch.softmax(torch.randn(rows, classes, generator=gen(1), device=DEV), -1).to(dtype)
    else:
        t = torch.randint(0, classes, (rows,), generator=gen(1), device=DEV)
        t[2] = -100
    w = torch.rand(classes, generator=gen(2), device=DEV, dtype=acc) + 0.5
    eps, zsq, cap = opt.get("eps", 0.0), opt.get("zsq", 0.0), opt.get("cap", 0.0)
    g = torch.tensor(0.37, device=DEV, dtype=acc)
    _, _, grad, _, _ = OPS.softmax_ce_fwd(x, t, w, g, -100, eps, zsq, cap, True, False)
    again = OPS.softmax_ce_bwd(g.expand(rows), x, t, w, -100, eps, zsq, cap)
    assert torch.equal(again, grad)
    t64 = t.double() if t.dim() == 2 else t
    rgrad = ref.softmax_ce_grad(x.double(), t64, w.double(), g.double().expand(rows), -100, eps,
                                zsq, cap)
    tol = {torch.float64: dict(atol=1e-12, rtol=1e-9), torch.float32: dict(atol=1e-7, rtol=2e-5),
           torch.bfloat16: dict(atol=1e-6, rtol=1.6e-2)}[dtype]
    torch.testing.assert_close(grad.double(), rgrad, **tol)


def test_forward_gradient_precise_on_confident_rows():
    # Small C, large logits: the target's p is within ~1e-7 of 1, where exp(z - lse) with a
    # rounded fp32 lse is off by ~4e-7 absolute; exp(z - m) / s is not.
    x = torch.randn(4096, 10, generator=gen(3), device=DEV) * 12
    t = x.argmax(-1)
    _, _, grad, _, _ = OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True, False)
    xr = x.double().requires_grad_()
    F.cross_entropy(xr, t, reduction="sum").backward()
    torch.testing.assert_close(grad.double(), xr.grad, atol=1e-7, rtol=2e-5)


@pytest.mark.parametrize("classes", [10, 3001], ids=["warp_rows", "block_rows"])
def test_minus_inf_first_logit_with_smoothing_or_probabilities_gives_inf(classes):
    x = torch.randn(3, classes, generator=gen(4), device=DEV)
    x[:, 0] = -INF
    t = torch.randint(1, classes, (3,), generator=gen(5), device=DEV)
    loss, _, _, _, _ = OPS.softmax_ce_fwd(x, t, None, None, -100, 0.1, 0.0, 0.0, False, False)
    torch.testing.assert_close(loss, F.cross_entropy(x, t, label_smoothing=0.1, reduction="none"))
    assert torch.isposinf(loss).all()
    p = torch.softmax(torch.randn(3, classes, generator=gen(6), device=DEV), -1)
    loss, _, _, _, _ = OPS.softmax_ce_fwd(x, p, None, None, -100, 0.0, 0.0, 0.0, False, False)
    assert torch.isposinf(loss).all() and torch.isposinf(F.cross_entropy(x, p,
                                                                          reduction="none")).all()


@pytest.mark.parametrize("classes", [10, 3001], ids=["warp_rows", "block_rows"])
def test_plus_inf_logit_matches_torch(classes):
    x = torch.randn(3, classes, generator=gen(7), device=DEV)
    x[1, 5] = INF
    x[1, 7] = INF
    t = torch.tensor([1, 2, 3], device=DEV)
    loss, lse, grad, pred, conf = OPS.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True,
                                                     True)
    xr = x.clone().requires_grad_()
    rl = F.cross_entropy(xr, t, reduction="none")
    rl.sum().backward()
    torch.testing.assert_close(loss, rl.detach(), equal_nan=True)
    assert loss[1].isnan() and grad[1].isnan().all() and xr.grad[1].isnan().all()
    assert torch.isposinf(lse[1]) and torch.isposinf(torch.logsumexp(x[1], 0))
    assert torch.equal(pred, x.argmax(-1)) and pred[1].item() == 5 and conf[1].isnan()
    assert not grad[0].isnan().any() and not grad[2].isnan().any()


def test_no_classes():
    x = torch.empty(3, 0, device=DEV)
    pred, conf = OPS.softmax_decode(x, 0.0)
    assert pred.tolist() == [0, 0, 0] and conf.tolist() == [0.0, 0.0, 0.0]
    loss, lse, _, pred, conf = OPS.softmax_ce_fwd(x, torch.softmax(x, -1), None, None, -100, 0.0,
                                                  0.0, 0.0, True, True)
    assert loss.tolist() == [0.0] * 3 and torch.isneginf(lse).all()
    assert pred.tolist() == [0] * 3 and conf.tolist() == [0.0] * 3


@pytest.mark.parametrize("softcap", [NAN, INF, -1.0])
def test_bad_softcap_raises_value_error(softcap):
    x = torch.randn(2, 10, device=DEV)
    with pytest.raises(ValueError, match="softcap"):
        OPS.softmax_decode(x, softcap)
    with pytest.raises(ValueError, match="softcap"):
        OPS.softmax_ce_fwd(x, torch.zeros(2, dtype=torch.long, device=DEV), None, None, -100, 0.0,
                           0.0, softcap, False, False)


def test_fp32_weight_and_target_with_bf16_logits_are_not_rounded():
    # 1 + 2^-10 and its neighbours are not bf16 values: rounding them would move the loss by
    # ~1e-3 relative, 50x the fp32 tolerance.
    rows, classes = 6, 3001
    x = torch.randn(rows, classes, generator=gen(8), device=DEV).bfloat16()
    w = 1 + torch.arange(classes, device=DEV, dtype=torch.float32) % 7 * 2.0 ** -10
    t = torch.randint(0, classes, (rows,), generator=gen(9), device=DEV)
    loss, _, _, _, _ = OPS.softmax_ce_fwd(x, t, w, None, -100, 0.1, 0.0, 0.0, False, False)
    rl, _ = ref.softmax_ce_rows(x.double(), t, w.double(), -100, 0.1, 0.0, 0.0)
    torch.testing.assert_close(loss.double(), rl, atol=2e-5, rtol=2e-5)
    p = torch.softmax(torch.randn(rows, classes, generator=gen(10), device=DEV), -1)
    loss, _, _, _, _ = OPS.softmax_ce_fwd(x, p, w, None, -100, 0.0, 0.0, 0.0, False, False)
    rl, _ = ref.softmax_ce_rows(x.double(), p.double(), w.double(), -100, 0.0, 0.0, 0.0)
    torch.testing.assert_close(loss.double(), rl, atol=2e-5, rtol=2e-5)


def test_bce_fp32_target_with_bf16_logits_gives_fp32_loss():
    x = torch.randn(5, 333, generator=gen(11), device=DEV).bfloat16()
    y = torch.rand(5, 333, generator=gen(12), device=DEV)  # fp32, not bf16 values
    w = (torch.rand(333, generator=gen(13), device=DEV, dtype=torch.float64) + 0.5).expand(5, 333)
    thr = torch.zeros(333, device=DEV, dtype=torch.bfloat16)
    loss, grad, labels, _, _ = OPS.sigmoid_bce_fwd(x, y, w, None, None, thr, False, True, False,
                                                   False)
    assert loss.dtype == torch.promote_types(x.dtype, y.dtype) == torch.float32
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref.sigmoid_bce_elem(x.double(), y.double(), w),
                               atol=1e-6, rtol=1e-5)
    assert torch.equal(labels, x > 0)


def test_bce_loss_has_no_cancellation_for_negative_logits():
    x = torch.tensor([[-30.0, -17.0, -5.0, 0.0, 5.0, 17.0, 30.0]], device=DEV)
    y = torch.tensor([[0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]], device=DEV)
    loss, _, _, _, _ = OPS.sigmoid_bce_fwd(x, y, None, None, None, None, False, False, False,
                                           False)
    exact = F.binary_cross_entropy_with_logits(x.double(), y.double(), reduction="none")
    # exp(-|x|) is the __expf intrinsic: at most (2 + 1.16 |x|) ulp, 37 ulp = 4.4e-6 at |x| = 30
    # (the old form lost everything there: -30 + (30 + 9.4e-14) = 0 in fp32).
    torch.testing.assert_close(loss.double(), exact, atol=0, rtol=5e-6)
