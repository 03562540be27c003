"""What only the Triton backend (fusedloss_triton::*) has: its launchers' block override, the
interpreter's tiling, the in-kernel handling of a bad target, its registration and launch
tables. Every op, option, dtype and edge case runs on it in the op-level suite (tests/test_ops.py).

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


def ref_ce(x, t, w, eps, lse_square_scale, cap, row_scale, ignore_index=-100):
    x64, w64 = x.to(F64).cpu(), None if w is None else w.to(F64).cpu()
    t64 = t.cpu() if t.dim() == 1 else t.to(F64).cpu()
    loss, lse = ref.softmax_ce_rows(x64, t64, w64, ignore_index, eps, lse_square_scale, cap)
    grad = ref.softmax_ce_grad(x64, t64, w64, row_scale.to(F64).cpu().expand(x.shape[0]),
                               ignore_index, eps, lse_square_scale, cap)
    return loss, lse, grad


# ------------------------------------------------------------------------------------------
# softmax cross-entropy


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


# ------------------------------------------------------------------------------------------
# registration and launch tables


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


class _GridSpy:
    """Stands in for a @triton.jit kernel: records the launch grid, runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("rows,classes", [(1, 65535 * 512 + 1), (65535 * 64 + 1, 1)],
                         ids=["33.5M-classes", "4.2M-rows"])
def test_bce_grid_within_cuda_limits(monkeypatch, rows, classes):
    # gridDim.y is at most 65535 on CUDA (x: 2^31 - 1). Column tiles on y failed to launch
    # beyond 65535 * 512 classes, which a flattened 33.5M-element BCE input reaches.
    spy = _GridSpy()
    monkeypatch.setattr(bce_k, "_sigmoid_bce_kernel", spy)
    monkeypatch.setattr(bce_k, "interpreting", lambda: False)  # the GPU's row tiling
    x = torch.zeros(rows, classes, dtype=torch.bfloat16)
    bce_k._launch(x, None, None, None, None, None, None, None, None, None, None, loss_mode=0,
                  tile=(2, 512))
    (gx, gy), = spy.grids
    assert gx <= 2**31 - 1 and gy <= 65535
    assert gx * 512 >= classes  # every column tile, and every row, has a program
    rows_per_prog = -(-rows // gy)
    assert gy * rows_per_prog >= rows


def test_softmax_refuses_beyond_int32_classes():
    x = torch.zeros(1, 1).expand(1, 2**31 - 1)  # no memory: a stride-0 view
    with pytest.raises(ValueError, match="2\\^31"):
        ce_k._launch(x, None, None, None, 0, torch.empty(1), None, None, None, None, -100,
                     0.0, 0.0, 0.0, False, target_kind=0)
