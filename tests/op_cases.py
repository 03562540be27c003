"""One source of op-level test inputs for every backend and device: named sample inputs per op,
their float64 expected outputs (python/fusedloss/reference.py), and one tolerance table.

`samples(op, device, backend, dtype)` gives the named cases of an op; the value, opcheck and
compile tests of tests/test_ops.py all draw from it, so a backend is tested by registering it.
The column counts are chosen per backend (`SIZES`) to cross the blocks its kernels walk a row
in; everything else is the same for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fusedloss import _contract
from fusedloss import reference as ref
from fusedloss._dtypes import acc_dtype

F64 = torch.float64
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------- tolerances
# Outputs are compared with the float64 reference on the same (rounded) inputs, by the output's
# dtype and kind. Measured: the largest errors of every sample of every op on the CPU backends
# (native, Triton under its interpreter, torch), against these tolerances.
# - "row": per-row values accumulated and stored in the accumulation dtype (loss, lse,
#   confidence, BCE row sums). fp32: measured at most 4.9e-7 relative and 1.2e-7 absolute (rows
#   of up to 4099 classes); 2e-6 leaves room for the longest rows of the CUDA samples (131072
#   classes), whose tree sums of exps are good to about log2(C) ulp (1e-6) before the log.
#   fp64: 1e-10, within C * 2^-53 (1.5e-11 at C = 131072) times a margin; measured 1.3e-15.
# - "elem": (R, C) values computed in fp32 (fp64) and rounded ONCE to the output dtype
#   (gradient, probs, elementwise BCE loss): at most one ulp of the dtype relative to the value
#   (rtol 2^-7 bf16, 2^-10 fp16), which covers round-to-nearest (half an ulp) plus the fp32
#   error, and the round-toward-zero of Triton's CPU interpreter (measured: up to 0.92 of the
#   bf16 tolerance, on Triton). fp32: measured at most 4.8e-7 absolute for values below 1 and
#   3.7e-7 relative above (BCE gradients with weight, pos_weight and a transposed incoming
#   gradient: several fp32 products of values up to ~10), hence atol 1e-6, rtol 1e-5 (at most
#   half used). atol covers entries near zero, where the error of the unrounded value dominates.
# - "bce_loss": the elementwise BCE loss, formed without cancellation from exp and log1p that
#   are good to a few ulp: relative only in fp32/fp64 (a form that cancels, x + softplus(-x),
#   is 2.4e-7..4.8e-7 off in absolute terms at x in [-18, -6], y = 0, and fails it); measured
#   at most 1.8e-7 relative in fp32; bf16/fp16 as "elem".
# The measurement: tests/op_tolerance_probe.py prints these maxima per backend, dtype and kind.
TOL = {
    torch.float64: {"row": dict(atol=1e-10, rtol=1e-10), "elem": dict(atol=1e-12, rtol=1e-10),
                    "bce_loss": dict(atol=1e-15, rtol=1e-12)},
    torch.float32: {"row": dict(atol=2e-6, rtol=2e-6), "elem": dict(atol=1e-6, rtol=1e-5),
                    "bce_loss": dict(atol=1e-9, rtol=5e-6)},
    torch.bfloat16: {"elem": dict(atol=2e-3, rtol=2**-7), "bce_loss": dict(atol=2e-3, rtol=2**-7)},
    torch.float16: {"elem": dict(atol=2e-4, rtol=2**-10),
                    "bce_loss": dict(atol=2e-4, rtol=2**-10)},
}


def tol(dtype: torch.dtype, kind: str) -> dict:
    """The tolerance of an output of `dtype` and kind "row", "elem" or "bce_loss"."""
    return TOL[dtype][kind]


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """(rows, classes, why) shapes of the option grid, and extra CE column counts run with the
    plain options only. Chosen per backend from the block its kernels walk a row in."""
    grid: tuple
    extra_classes: tuple = ()
    bce: tuple = ()


SIZES = {
    # native CPU: rows are walked in 2048-column blocks (csrc/cpu), vectors of 8/16 floats.
    ("cpu", "native"): Sizes(
        grid=((13, 37, "not a multiple of any vector width"),
              (5, 2053, "one 2048-column block and a tail"),
              (3, 4099, "two blocks and a tail")),
        extra_classes=((6, 1, "a single class"),),
        bce=((9, 1, "a single class"), (11, 37, "a vector tail"),
             (3, 2053, "a block and a tail"))),
    # Triton under its CPU interpreter: 128-column blocks (triton_kernels/_common.py
    # INTERPRET_BLOCK), BCE tiles of 4 rows x 64 columns. Small: the interpreter runs in numpy.
    ("cpu", "triton"): Sizes(
        grid=((8, 300, "three 128-column blocks, the last partial"),),
        extra_classes=((5, 1, "a single class"), (5, 127, "one partial block"),
                       (5, 129, "a one-column last block")),
        bce=((6, 150, "two 64-column tiles and a partial one; 4 + 2 rows"),)),
    # the pure-PyTorch backend: no blocks; small shapes.
    ("cpu", "torch"): Sizes(
        grid=((8, 37, "small"),),
        extra_classes=((5, 1, "a single class"),),
        bce=((6, 37, "small"),)),
}
# CUDA (native and Triton): warp rows, block rows and clusters of blocks (csrc/cuda/softmax_ce.cu).
CUDA_SIZES = Sizes(
    grid=((7, 10, "warp rows"), (33, 1000, "ImageNet classes: warp or block rows"),
          (4, 50257, "GPT-2 vocabulary: odd C, clusters of 2 (bf16/fp16), 4 (fp32), 8 (fp64)"),
          (3, 131072, "Llama-3 vocabulary: clusters of 4 (bf16/fp16), 8 (fp32/fp64)")),
    extra_classes=((6, 1, "a single class"),),
    bce=((9, 1, "a single class"), (11, 1000, "ImageNet classes"),
         (3, 3001, "odd C, several tiles"), (3, 70000, "many tiles: the reduce_rows workspace")))


def sizes(device: str, backend: str) -> Sizes:
    if device == "cuda":
        return CUDA_SIZES
    return SIZES.get((device, backend), SIZES[("cpu", "torch")])


# ----------------------------------------------------------------------------- samples
@dataclass
class Sample:
    name: str
    op: str
    args: tuple                    # in the schema's order
    kwargs: dict = field(default_factory=dict)

    @property
    def arg(self) -> dict:
        return _contract.OPS[self.op].bind(self.args)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(rows, classes, dtype, device, seed=0, scale=3.0):
    x = torch.randn(rows, classes, generator=_gen(seed), dtype=F64) * scale
    return x.to(dtype).to(device)


def sliced(x, pad=3):
    """The same values as `x`, as a column slice of a wider tensor: row stride C + pad, rows
    not 16-byte aligned (the op contract allows any row stride)."""
    wide = torch.full((x.shape[0], x.shape[1] + pad), float("nan"), dtype=x.dtype,
                      device=x.device)
    wide[:, :x.shape[1]] = x
    return wide[:, :x.shape[1]]


def class_target(rows, classes, device, seed=1, ignore=(), ignore_index=-100):
    t = torch.randint(0, max(classes, 1), (rows,), generator=_gen(seed))
    for r in ignore:
        if r < rows:
            t[r] = ignore_index
    return t.to(device)


def prob_target(rows, classes, dtype, device, seed=2):
    y = torch.softmax(torch.randn(rows, classes, generator=_gen(seed), dtype=F64), -1)
    return y.to(dtype).to(device)


def class_weight(classes, dtype, device, seed=5):
    return (torch.rand(classes, generator=_gen(seed), dtype=F64) + 0.5).to(dtype).to(device)


# (name, target kind, weight, ignore_index, label_smoothing, lse_square_scale, softcap,
#  grad_scale): every option alone, then combined.
CE_OPTIONS = (
    ("plain", "index", False, -100, 0.0, 0.0, 0.0, None),
    ("weight", "index", True, -100, 0.0, 0.0, 0.0, 0.5),
    ("smooth", "index", False, -100, 0.1, 0.0, 0.0, None),
    ("weight_smooth", "index", True, -100, 0.3, 0.0, 0.0, 2.0),
    ("zloss", "index", False, -100, 0.0, 1e-3, 0.0, None),
    ("softcap", "index", False, -100, 0.0, 0.0, 2.5, 0.25),
    ("ignore_valid_class", "index", True, 0, 0.05, 1e-4, 0.0, None),  # ignore_index is a class
    ("all", "index", True, 3, 0.2, 1e-2, 4.0, 3.0),
    ("probs", "probs", False, -100, 0.0, 0.0, 0.0, None),
    ("probs_all", "probs", True, -100, 0.1, 1e-2, 5.0, 0.5),
)


def _ce_operands(opt, rows, classes, dtype, device):
    _, kind, use_w, ii, eps, s, cap, gs = opt
    x = logits(rows, classes, dtype, device, seed=rows * 1000 + classes)
    if kind == "index":
        t = class_target(rows, classes, device, ignore=(1,), ignore_index=ii)
        if ii >= 0 and rows > 0:
            t[0] = ii  # row 0 is ignored because its target is the ignored class
    else:
        t = prob_target(rows, classes, dtype, device)
    w = class_weight(classes, dtype, device) if use_w else None
    acc = acc_dtype(dtype)
    g = None if gs is None else torch.tensor(gs, dtype=acc, device=device)
    return x, t, w, g, ii, eps, s, cap


def _grid(device, backend):
    s = sizes(device, backend)
    for rows, classes, _ in s.grid:
        for opt in CE_OPTIONS:
            yield f"{opt[0]}-{rows}x{classes}", opt, rows, classes
    for rows, classes, _ in s.extra_classes:
        yield f"plain-{rows}x{classes}", CE_OPTIONS[0], rows, classes


def ce_fwd_samples(device, backend, dtype) -> list[Sample]:
    out = []
    for name, opt, rows, classes in _grid(device, backend):
        x, t, w, g, ii, eps, s, cap = _ce_operands(opt, rows, classes, dtype, device)
        out.append(Sample(name, "softmax_ce_fwd", (x, t, w, g, ii, eps, s, cap, True, True)))
    rows, classes, _ = sizes(device, backend).grid[-1]
    for opt in (CE_OPTIONS[7], CE_OPTIONS[9]):  # "all", "probs_all"
        x, t, w, g, ii, eps, s, cap = _ce_operands(opt, rows, classes, dtype, device)
        t = sliced(t) if t.dim() == 2 else t
        out.append(Sample(f"{opt[0]}-sliced-{rows}x{classes}", "softmax_ce_fwd",
                          (sliced(x), t, w, g, ii, eps, s, cap, True, True)))
    x, t, *_ = _ce_operands(CE_OPTIONS[0], 8, 37, dtype, device)
    out.append(Sample("no_grad_no_decode", "softmax_ce_fwd",
                      (x, t, None, None, -100, 0.0, 0.0, 0.0, False, False)))
    out.append(Sample("zero_rows", "softmax_ce_fwd",
                      (x[:0], t[:0], None, None, -100, 0.0, 0.0, 0.0, True, True)))
    return out


def ce_bwd_samples(device, backend, dtype) -> list[Sample]:
    out = []
    keep = ("plain", "weight_smooth", "softcap", "ignore_valid_class", "all", "probs_all")
    for name, opt, rows, classes in _grid(device, backend):
        if opt[0] not in keep:
            continue
        x, t, w, _, ii, eps, s, cap = _ce_operands(opt, rows, classes, dtype, device)
        gl = logits(rows, 1, dtype, device, seed=9, scale=1.0).reshape(rows)
        out.append(Sample(name, "softmax_ce_bwd", (gl, x, t, w, ii, eps, s, cap)))
        g0 = torch.tensor(0.7, dtype=dtype, device=device).expand(rows)  # a mean's backward
        out.append(Sample(name + "-stride0", "softmax_ce_bwd", (g0, x, t, w, ii, eps, s, cap)))
    return out


def softmax_decode_samples(device, backend, dtype) -> list[Sample]:
    rows, classes, _ = sizes(device, backend).grid[-1]
    x = logits(rows, classes, dtype, device, scale=2.0)
    return [Sample("plain", "softmax_decode", (x, 0.0)),
            Sample("softcap", "softmax_decode", (x, 3.0))]


# BCE weights and targets in the layouts the functional layer produces (broadcast by expand)
def _bce_operand(kind, rows, classes, dtype, device, seed):
    if kind is None:
        return None
    if kind == "per_class":   # (C,) expanded: strides (0, 1)
        v = torch.rand(classes, generator=_gen(seed), dtype=F64) + 0.5
        return v.to(dtype).to(device).expand(rows, classes)
    if kind == "per_row":     # (R, 1) expanded: strides (1, 0)
        v = torch.rand(rows, 1, generator=_gen(seed), dtype=F64) + 0.5
        return v.to(dtype).to(device).expand(rows, classes)
    v = torch.rand(classes, rows, generator=_gen(seed), dtype=F64) + 0.5  # "transposed"
    return v.to(dtype).to(device).t()


def _bce_target(kind, rows, classes, dtype, device, seed):
    pos = (torch.rand(rows, classes, generator=_gen(seed)) < 0.3).to(device)
    if kind == "float":       # soft labels in [0, 1]
        return torch.rand(rows, classes, generator=_gen(seed + 1), dtype=F64).to(dtype).to(device)
    if kind == "bool":
        return pos
    if kind == "uint8":
        return pos.to(torch.uint8)
    return pos.to(dtype).t().contiguous().t()  # "float_transposed"


BCE_OPTIONS = (("float", None, None), ("bool", "per_class", None), ("uint8", None, "per_class"),
               ("float_transposed", "per_row", "transposed"), ("bool", "transposed", "per_row"))


def _bce_operands(opt, rows, classes, dtype, device):
    tkind, wkind, pkind = opt
    x = logits(rows, classes, dtype, device, seed=rows * 100 + classes, scale=4.0)
    if rows > 0 and classes > 2:
        x[0, 0], x[0, 1], x[0, 2] = 1e4, -1e4, 0.0  # extreme logits; 0 sits on threshold 0
    y = _bce_target(tkind, rows, classes, dtype, device, seed=3)
    if rows > 1 and classes > 8:  # loss ~ e^x for x << 0, y = 0: a cancelling form loses digits
        x[1, 3:8] = torch.tensor([-6.0, -9.0, -12.0, -15.0, -18.0]).to(dtype)
        y[1, 3:8] = 0
    w = _bce_operand(wkind, rows, classes, dtype, device, seed=4)
    pw = _bce_operand(pkind, rows, classes, dtype, device, seed=5)
    thr = torch.randn(classes, generator=_gen(6)).to(device)
    if classes > 2:
        thr[2] = 0.0
    return x, y, w, pw, thr


def bce_fwd_samples(device, backend, dtype) -> list[Sample]:
    out = []
    acc = acc_dtype(dtype)
    for rows, classes, _ in sizes(device, backend).bce:
        for opt in BCE_OPTIONS:
            x, y, w, pw, thr = _bce_operands(opt, rows, classes, dtype, device)
            name = "-".join(str(o) for o in opt) + f"-{rows}x{classes}"
            gs = torch.tensor(0.75, dtype=acc, device=device)
            out.append(Sample(name + "-rows", "sigmoid_bce_fwd",
                              (x, y, w, pw, gs, thr, True, True, True, True)))
            out.append(Sample(name + "-elem", "sigmoid_bce_fwd",
                              (x, y, w, pw, None, None, False, False, False, False)))
    rows, classes, _ = sizes(device, backend).bce[-1]
    x, y, w, pw, thr = _bce_operands(BCE_OPTIONS[3], rows, classes, dtype, device)
    out.append(Sample(f"sliced-{rows}x{classes}", "sigmoid_bce_fwd",
                      (sliced(x), sliced(y), w, pw, None, thr, True, True, True, True)))
    x, y, *_ = _bce_operands(BCE_OPTIONS[1], 4, 7, dtype, device)
    out.append(Sample("zero_rows", "sigmoid_bce_fwd",
                      (x[:0], y[:0], None, None, None, torch.zeros(7, device=device), True, True,
                       True, True)))
    return out


def bce_bwd_samples(device, backend, dtype) -> list[Sample]:
    rows, classes, _ = sizes(device, backend).bce[-1]
    out = []
    for opt in BCE_OPTIONS[1:4]:
        x, y, w, pw, _ = _bce_operands(opt, rows, classes, dtype, device)
        name = "-".join(str(o) for o in opt)
        g = logits(classes, rows, dtype, device, seed=3, scale=1.0).t()  # transposed
        out.append(Sample(name, "sigmoid_bce_bwd", (g, x, y, w, pw)))
    x, y, w, pw, _ = _bce_operands(BCE_OPTIONS[1], rows, classes, dtype, device)
    g = torch.tensor(2.0, dtype=F64, device=device).expand(rows, classes)  # fp64, stride 0
    out.append(Sample("stride0_fp64_grad", "sigmoid_bce_bwd", (g, x, y, w, pw)))
    return out


def sigmoid_decode_samples(device, backend, dtype) -> list[Sample]:
    rows, classes, _ = sizes(device, backend).bce[-1]
    x = logits(rows, classes, dtype, device)
    thr = torch.randn(classes, generator=_gen(10)).to(device)
    x[0] = thr.to(dtype)  # exactly at the threshold (where representable): negative
    return [Sample("probs", "sigmoid_decode", (x, thr, True)),
            Sample("labels_only", "sigmoid_decode", (x, thr, False)),
            Sample("sliced", "sigmoid_decode", (sliced(x), thr, True))]


def scale_grad_samples(device, backend, dtype) -> list[Sample]:
    g = logits(7, 300, dtype, device)
    return [Sample("scale", "scale_grad_", (g, torch.tensor(-2.5, dtype=F64, device=device))),
            Sample("one", "scale_grad_", (g.clone(), torch.tensor(1.0, device=device))),
            Sample("transposed", "scale_grad_",
                   (logits(50, 4, dtype, device).t(), torch.tensor(0.5, device=device)))]


SAMPLES = {
    "softmax_ce_fwd": ce_fwd_samples,
    "softmax_ce_bwd": ce_bwd_samples,
    "softmax_decode": softmax_decode_samples,
    "sigmoid_bce_fwd": bce_fwd_samples,
    "sigmoid_bce_bwd": bce_bwd_samples,
    "sigmoid_decode": sigmoid_decode_samples,
    "scale_grad_": scale_grad_samples,
}


def samples(op: str, device: str, backend: str, dtype: torch.dtype) -> list[Sample]:
    return SAMPLES[op](device, backend, dtype)


# ----------------------------------------------------------------------------- expectations
def _f64(t):
    return None if t is None else t.detach().cpu().to(F64)


def _ce_target64(t):
    return t.cpu() if t.dim() == 1 else _f64(t)


def _row_scale(g, rows):
    return torch.ones(rows, dtype=F64) if g is None else _f64(g).expand(rows)


def expected(sample: Sample) -> tuple:
    """The float64 outputs the op must produce (None for an output that must be empty)."""
    a = sample.arg
    op = sample.op
    if op == "softmax_ce_fwd":
        x, t, w = _f64(a["logits"]), _ce_target64(a["target"]), _f64(a["weight"])
        opts = (a["ignore_index"], a["label_smoothing"], a["lse_square_scale"], a["softcap"])
        loss, lse = ref.softmax_ce_rows(x, t, w, *opts)
        grad = ref.softmax_ce_grad(x, t, w, _row_scale(a["grad_scale"], x.shape[0]),
                                   *opts) if a["compute_grad"] else None
        pred, conf = ref.softmax_decode(x, a["softcap"]) if a["decode"] else (None, None)
        return loss, lse, grad, pred, conf
    if op == "softmax_ce_bwd":
        x, t, w = _f64(a["logits"]), _ce_target64(a["target"]), _f64(a["weight"])
        opts = (a["ignore_index"], a["label_smoothing"], a["lse_square_scale"], a["softcap"])
        return (ref.softmax_ce_grad(x, t, w, _f64(a["grad_loss"]), *opts),)
    if op == "softmax_decode":
        return ref.softmax_decode(_f64(a["logits"]), a["softcap"])
    if op in ("sigmoid_bce_fwd", "sigmoid_bce_bwd"):
        return _bce_expected(op, a)
    if op == "sigmoid_decode":
        x = a["logits"].cpu()
        labels = ref.sigmoid_decode(x, a["threshold"].cpu())
        return labels, torch.sigmoid(_f64(x)) if a["return_probs"] else None
    if op == "scale_grad_":
        return ()
    raise KeyError(op)


def _bce_expected(op, a) -> tuple:
    x, y, w, pw = _f64(a["logits"]), a["target"].cpu(), _f64(a["weight"]), _f64(a["pos_weight"])
    y64 = y.to(F64)
    if op == "sigmoid_bce_bwd":
        return (ref.sigmoid_bce_grad(x, y64, w, pw, _f64(a["grad_loss"])),)
    elem = ref.sigmoid_bce_elem(x, y64, w, pw)
    loss = elem.sum(-1) if a["reduce_rows"] else elem
    gs = torch.ones((), dtype=F64) if a["grad_scale"] is None else _f64(a["grad_scale"])
    grad = ref.sigmoid_bce_grad(x, y64, w, pw, gs) if a["compute_grad"] else None
    labels = None
    if a["threshold"] is not None:
        labels = ref.sigmoid_decode(a["logits"].cpu(), a["threshold"].cpu())
    probs = torch.sigmoid(x) if a["return_probs"] else None
    counts = ref.confusion_counts(labels, y) if a["count"] else None
    return loss, grad, labels, probs, counts
