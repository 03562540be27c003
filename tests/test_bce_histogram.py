"""The threshold histogram accumulated by the fused BCE pass (`histogram=`), on every backend:
its counts equal the oracle below (searchsorted + bincount over the same logits and targets,
written here, apart from the library), the loss and gradient are those of the pass without it,
and tuning from it keeps the histogram's stated gap bound against the exact tuner."""

from __future__ import annotations

import pytest
import torch

import fusedloss as fl
from conftest import is_slow_backend
from fusedloss import _backend
from fusedloss.thresholds import ThresholdHistogram, tune_thresholds

F64 = torch.float64


def _data(rows, classes, dtype, target_kind, seed=0, scale=3.0, strided=False):
    g = torch.Generator().manual_seed(seed)
    wide = classes + 3 if strided else classes
    x = (torch.randn(rows, wide, generator=g, dtype=F64) * scale).to(dtype)[:, :classes]
    y = torch.rand(rows, wide, generator=g)[:, :classes] < 0.3
    if target_kind == "float":
        y = y.to(dtype)
    elif target_kind == "uint8":
        y = y.to(torch.uint8)
    return x, y


def _oracle(x, y, **kw):
    """(2, C, B + 2) counts: bin = number of edges strictly below the logit (compared in
    float32, float64 for float64 logits), split by target > 0.5; NaN logits left out."""
    classes = x.shape[-1]
    edges = ThresholdHistogram(classes, **kw).edges
    x = x.reshape(-1, classes)
    x = x.to(F64 if x.dtype == F64 else torch.float32)
    b = torch.searchsorted(edges.to(x.dtype), x.contiguous(), right=False)
    pos = (y.reshape(-1, classes).to(F64) > 0.5).to(torch.int64)
    bins = edges.numel() + 1
    flat = (pos * classes + torch.arange(classes)) * bins + b
    counts = torch.bincount(flat[~torch.isnan(x)], minlength=2 * classes * bins)
    return counts.view(2, classes, bins)


def _fused(ops, x, y, edges, counts, **kw):
    a = dict(weight=None, pos_weight=None, grad_scale=None, threshold=None, reduce_rows=True,
             compute_grad=True, return_probs=False, count=False)
    a.update(kw)
    return ops.sigmoid_bce_fwd(x, y, *a.values(), edges, counts)


# ----------------------------------------------------------------------------- op level
CASES = [  # (rows, classes, dtype, target, strided, histogram options)
    (37, 2100, torch.float32, "uint8", False, dict(bins=64, range=(-4.0, 4.0))),
    (37, 2100, torch.float64, "bool", False, dict(bins=64, range=(-4.0, 4.0))),
    (29, 300, torch.bfloat16, "float", True, dict(bins=1024, range=(-16.0, 16.0))),
    # 1300 classes x 1024 bins: the native CPU pass's 16-bit table would pass 5 MiB, so it bins
    # strips of 256 classes over the rows (the last one 20 wide) instead of row by row
    (37, 1300, torch.float32, "uint8", True, dict(bins=1024, range=(-16.0, 16.0))),
    (40, 9, torch.float32, "float", True, dict(bins=torch.tensor([-3., -1, -.5, 0, .1, 2]))),
    (40, 9, torch.float16, "uint8", False, dict(bins=torch.tensor([0.25]))),  # one edge
    (0, 9, torch.float32, "uint8", False, dict(bins=8)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[3]}")
def test_fused_histogram_equals_oracle(dev_backend, case):
    device, backend = dev_backend
    rows, classes, dtype, kind, strided, opts = case
    if is_slow_backend(device, backend) and rows * classes > 20000:
        rows = 3  # the interpreter: fewer rows, every class
    x, y = _data(rows, classes, dtype, kind, strided=strided)
    x, y = x.to(device), y.to(device)
    expected = _oracle(x.cpu(), y.cpu(), **opts)
    ops = _backend.get(backend, device).ops
    h = ThresholdHistogram(classes, **opts, device=device)
    plain = _fused(ops, x, y, None, None)
    with_hist = _fused(ops, x, y, h.edges, h.counts)
    assert torch.equal(h.counts.cpu(), expected)
    for a, b in zip(plain, with_hist, strict=True):  # the other outputs do not change
        assert torch.equal(a, b)
    _fused(ops, x, y, h.edges, h.counts, compute_grad=False, reduce_rows=False)
    assert torch.equal(h.counts.cpu(), 2 * expected)  # it adds
    # the loss alone, summed per row (the native CPU pass's other inner loop)
    loss_only = _fused(ops, x, y, h.edges, h.counts, compute_grad=False)
    assert torch.equal(h.counts.cpu(), 3 * expected)
    assert torch.equal(loss_only[0], _fused(ops, x, y, None, None, compute_grad=False)[0])


# (-7.3, 5.1) / 1000 bins: widths that are not a power of two (the native CPU pass bins near
# an edge by a margin); (-16, 16) / 1024 and (-4, 4) / 64: widths of a power of two, where it
# maps every edge exactly onto an integer and takes the search only on an integer
EDGE_RANGES = [dict(bins=1000, range=(-7.3, 5.1)), dict(bins=1024, range=(-16.0, 16.0)),
               dict(bins=64, range=(-4.0, 4.0)),
               # wider than fp32's range: x - e_0 overflows for logits inside the edges
               dict(bins=4, range=(-3e38, 3e38)), dict(bins=torch.tensor([-3.4e38, 0.0, 3.4e38]))]


def _range_id(o):
    if isinstance(o["bins"], torch.Tensor):
        return f"{o['bins'].numel()}edges"
    return f"{o['bins']}bins-{o['range'][1]:g}"


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf logits: the loss is NaN
@pytest.mark.parametrize("opts", EDGE_RANGES, ids=_range_id)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "loss-only"])
def test_values_on_and_next_to_edges(dev_backend, opts, grad):
    """Right-closed bins: a logit equal to an edge is in the bin below it, its float32
    neighbours on either side; the equal-width guess must not round them into the wrong bin."""
    device, backend = dev_backend
    h = ThresholdHistogram(64, **opts, device=device)
    e = h.edges.cpu()
    x = torch.cat([e, torch.nextafter(e, torch.tensor(1e9)), torch.nextafter(e, torch.tensor(-1e9)),
                   torch.tensor([float("inf"), -float("inf"), 1e30, -1e30])])
    # wide rather than tall (few row tiles under the Triton interpreter): every class gets a
    # different slice of the values, the oracle bins each class on its own
    x = x.repeat(-(-64 // x.numel()))  # at least one row, with few edges too
    x = torch.cat([x, x[: (-x.numel()) % 64]]).reshape(-1, 64)
    y = (torch.arange(x.numel()).reshape(x.shape) % 3 == 0)
    x = torch.cat([x, x + 2.0 ** -12, x - 3.0 ** -9])  # off the grid, between two edges
    x = torch.cat([x, torch.linspace(-1.0, 1.0, x.shape[1])[None] * e[-1].clamp(max=3.4e38)])
    y = torch.cat([y, y, ~y, y[:1]])
    expected = _oracle(x, y, **opts)
    _fused(_backend.get(backend, device).ops, x.to(device), y.to(device), h.edges, h.counts,
           compute_grad=grad)
    assert torch.equal(h.counts.cpu(), expected)


def test_nan_logits_are_not_counted(dev_backend):
    device, backend = dev_backend
    x = torch.tensor([[0.5, float("nan")], [float("nan"), -2.0]])
    y = torch.tensor([[1, 0], [1, 1]], dtype=torch.uint8)
    h = ThresholdHistogram(2, bins=4, range=(-4.0, 4.0), device=device)
    _fused(_backend.get(backend, device).ops, x.to(device), y.to(device), h.edges, h.counts)
    # class 0: 0.5 positive -> bin 3 (edges -4, -2, 0, 2, 4); class 1: -2.0 positive -> bin 1
    expected = torch.zeros(2, 2, 6, dtype=torch.int64)
    expected[1, 0, 3] = 1
    expected[1, 1, 1] = 1
    assert torch.equal(h.counts.cpu(), expected)


BAD = [  # (what to break, exception, argument named)
    ("edges alone", ValueError, "hist_counts"),
    ("counts alone", ValueError, "hist_counts"),
    ("edges float64", RuntimeError, "hist_edges"),
    ("edges 2-D", RuntimeError, "hist_edges"),
    ("edges strided", RuntimeError, "hist_edges"),
    ("counts int32", RuntimeError, "hist_counts"),
    ("counts shape", RuntimeError, "hist_counts"),
    ("counts transposed", RuntimeError, "hist_counts"),
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b[0])
def test_bad_histogram_arguments(dev_backend, bad):
    device, backend = dev_backend
    what, exc, arg = bad
    x, y = _data(3, 5, torch.float32, "uint8")
    x, y = x.to(device), y.to(device)
    edges = torch.linspace(-1, 1, 5, device=device)
    counts = torch.zeros(2, 5, 6, dtype=torch.int64, device=device)
    edges, counts = {
        "edges alone": (edges, None),
        "counts alone": (None, counts),
        "edges float64": (edges.double(), counts),
        "edges 2-D": (edges[None], counts),
        "edges strided": (torch.linspace(-1, 1, 10, device=device)[::2], counts),
        "counts int32": (edges, counts.int()),
        "counts shape": (edges, counts[:, :, :5]),
        "counts transposed": (edges, torch.zeros(2, 6, 5, dtype=torch.int64,
                                                 device=device).transpose(1, 2)),
    }[what]
    with pytest.raises(exc, match=rf"sigmoid_bce_fwd: {arg}\b"):
        _fused(_backend.get(backend, device).ops, x, y, edges, counts)


# ----------------------------------------------------------------------------- functional
def test_functional_and_module(dev_backend):
    device, backend = dev_backend
    x, y = _data(6, 11, torch.float32, "uint8", seed=3)
    x, y = x.to(device).requires_grad_(), y.to(device)
    h = ThresholdHistogram(11, bins=32, range=(-6.0, 6.0))
    loss = fl.binary_cross_entropy_with_logits(x, y, backend=backend, histogram=h)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(x, y.float())
    torch.testing.assert_close(loss, ref)
    g, = torch.autograd.grad(loss, x)
    g_ref, = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g, g_ref)
    expected = _oracle(x.detach().cpu(), y.cpu(), bins=32, range=(-6.0, 6.0))
    assert torch.equal(h.counts.cpu(), expected)
    m = fl.BCEWithLogitsLoss(backend=backend, reduction="none", histogram=h)
    m(x.detach()[None], y[None])  # (1, 6, 11): classes are the last dim
    assert torch.equal(h.counts.cpu(), 2 * expected)


def test_functional_errors():
    x, y = _data(4, 3, torch.float32, "uint8")
    with pytest.raises(TypeError, match="histogram must be a fusedloss.ThresholdHistogram"):
        fl.binary_cross_entropy_with_logits(x, y, histogram=torch.zeros(3))
    with pytest.raises(ValueError, match="histogram has 5 classes, the logits have 3"):
        fl.binary_cross_entropy_with_logits(x, y, histogram=ThresholdHistogram(5))
    with pytest.raises(RuntimeError, match="histogram= is not supported under torch.func.vmap"):
        torch.func.vmap(lambda t: fl.binary_cross_entropy_with_logits(
            t, y, histogram=ThresholdHistogram(3)))(x[None])


def test_linear_bce_histogram(dev_backend):
    """The fused linear BCE adds each chunk's logits: equal to the oracle on the full logits."""
    device, backend = dev_backend
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 8, generator=g, dtype=F64).to(device)
    w = torch.randn(21, 8, generator=g, dtype=F64).to(device)
    y = (torch.rand(13, 21, generator=g) < 0.4).to(device)
    h = ThresholdHistogram(21, bins=16, range=(-5.0, 5.0))
    out = fl.linear_binary_cross_entropy_with_logits(x, w, y, backend=backend, chunk_size=4,
                                                     histogram=h)
    logits = x @ w.T
    torch.testing.assert_close(out, torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y.to(F64)))
    assert torch.equal(h.counts.cpu(), _oracle(logits.cpu(), y.cpu(), bins=16,
                                               range=(-5.0, 5.0)))


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_tuning_many_labels_without_the_logits(backend):
    """100k labels over a validation set streamed through the fused linear BCE in batches:
    the logits exist one chunk at a time, and the tuned per-class F1 is within the stated gap
    bound of the exact tuner run on the materialised logits (the oracle)."""
    labels, hidden, rows = 100_000, 16, 48
    g = torch.Generator().manual_seed(7)
    w = torch.randn(labels, hidden, generator=g) / hidden ** 0.5
    h = ThresholdHistogram(labels, bins=24, range=(-3.0, 3.0))
    xs, ys = [], []
    for _ in range(3):
        x = torch.randn(rows, hidden, generator=g)
        y = (torch.rand(rows, labels, generator=g) < 0.05).to(torch.uint8)
        with torch.no_grad():
            fl.linear_binary_cross_entropy_with_logits(x, w, y, backend=backend, chunk_size=16,
                                                       histogram=h)
        xs.append(x)
        ys.append(y)
    logits = torch.cat(xs) @ w.T
    target = torch.cat(ys)
    assert torch.equal(h.counts, _oracle(logits, target, bins=24, range=(-3.0, 3.0)))
    sub = torch.arange(0, labels, 997)  # the exact tuner on a sample of labels (it is O(N C))
    exact = tune_thresholds(logits[:, sub], target[:, sub], "f1")
    tuned = h.tune("f1")
    gap = exact.score.to(F64) - tuned.score[sub].to(F64)
    assert bool((gap >= -1e-12).all())
    assert bool((gap <= h.gap_bound("f1")[sub] + 1e-12).all())


def test_native_cpu_counts_past_16_bits():
    """The native CPU pass bins into 16-bit tables flushed every 65535 rows: one task of 140000
    rows (one thread) must still count every row; class 0 holds one value, so its cell is 140000
    by hand, class 1 is checked against the oracle."""
    rows = 140_000
    g = torch.Generator().manual_seed(3)
    x = torch.stack([torch.full((rows,), 0.3), torch.randn(rows, generator=g) * 3], 1)
    y = torch.ones(rows, 2, dtype=torch.uint8)
    h = ThresholdHistogram(2, bins=64, range=(-4.0, 4.0), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fused(_backend.get("native", "cpu").ops, x, y, h.edges, h.counts)
    finally:
        torch.set_num_threads(threads)
    assert h.counts[1, 0].sum() == rows and h.counts[1, 0, 35] == rows  # 0.3 in (0.25, 0.375]
    assert torch.equal(h.counts, _oracle(x, y, bins=64, range=(-4.0, 4.0)))


def test_native_cpu_strips_count_past_16_bits():
    """Past 5 MiB of 16-bit table the native CPU pass bins strips of classes in a pass of its
    own (65536 bins: 256 KiB a class, so 21 classes are two strips of 16 and 5), flushing every
    65535 rows there too: 66000 rows must all be counted. Class 0 holds one value, so its cell
    is 66000 by hand; every class is checked against the oracle."""
    rows, classes = 66_000, 21
    g = torch.Generator().manual_seed(4)
    x = torch.randn(rows, classes, generator=g) * 3
    x[:, 0] = 0.3
    y = (torch.rand(rows, classes, generator=g) < 0.5).to(torch.uint8)
    y[:, 0] = 1
    opts = dict(bins=65536, range=(-16.0, 16.0))
    h = ThresholdHistogram(classes, **opts, device="cpu")
    _fused(_backend.get("native", "cpu").ops, x, y, h.edges, h.counts)
    # 0.3 = -16 + 16.3, bins of 1/2048: in (e_33382, e_33383], bin 33383 (exact in float32)
    assert h.counts[1, 0].sum() == rows and h.counts[1, 0, 33383] == rows
    assert torch.equal(h.counts, _oracle(x, y, **opts))
