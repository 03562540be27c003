"""fusedloss.distributed.cross_entropy on real process groups (gloo, CPU, spawned processes).

Oracle: torch.nn.functional.cross_entropy (and autograd through it) on the FULL logits, which
every rank builds from the same seed and then slices to its shard; the z-loss term against its
formula `s * logsumexp(z)^2` per non-ignored row, reduced with torch's weighted-mean denominator.

Cost: spawning a process group is ~2 s of imports, so the harness (distributed_harness.py)
starts ONE group per (backend, world size) and runs every case inside it, those here and the
bad-input ones of distributed_bad_cases.py; each case is a separate pytest item that reads the
result its group recorded. A case must raise (or pass) on every rank; a group that hangs fails
its items after GROUP_TIMEOUT instead of blocking the suite.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import distributed_bad_cases  # noqa: F401  (registers the bad-input cases)
from distributed_harness import (
    BACKENDS,
    CASES,
    COLLECTIVE_TIMEOUT,
    F32,
    IGNORE,
    LAYOUTS,
    C,
    N,
    _data,
    _grid_case,
    _group_results,
    _layout,
    _oracle,
    _run_case,
    case,
)
from fusedloss import distributed as D
from fusedloss.distributed import _collectives, _function

# Every combination of the options that change the math: weight x smoothing x z-loss x reduction.
for _w in (False, True):
    for _eps in (0.0, 0.1):
        for _s in (0.0, 1e-2):
            for _red in ("none", "mean", "sum"):
                CASES[f"grid-w{int(_w)}-eps{_eps}-z{_s}-{_red}"] = _grid_case(_w, _eps, _s, _red)



@case
def random_layouts(rank, world, backend):
    # property check: random class counts, random uneven splits in a random class order,
    # random options and values with ties (integer logits), against torch on the full logits
    for seed in range(8):
        g = torch.Generator().manual_seed(1000 + seed)
        c = int(torch.randint(world, 40, (1,), generator=g))
        cuts = sorted(torch.randperm(c - 1, generator=g)[:world - 1].add(1).tolist())
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, c], strict=True)]
        order = torch.randperm(world, generator=g).tolist()  # order[i]: rank holding shard i
        starts = {order[i]: sum(sizes[:i]) for i in range(world)}
        size = sizes[order.index(rank)]
        rows = int(torch.randint(1, 20, (1,), generator=g))
        x = torch.randint(-3, 4, (rows, c), generator=g).float()  # many exact ties
        t = torch.randint(0, c, (rows,), generator=g)
        t[torch.rand(rows, generator=g) < 0.2] = IGNORE
        w = torch.rand(c, generator=g) + 0.1 if seed % 2 else None
        eps = (0.0, 0.3)[seed % 3 == 0]
        zs = (0.0, 1e-2)[seed % 4 < 2]
        red = ("none", "mean", "sum")[seed % 3]
        start = starts[rank]
        local = x[:, start:start + size].clone().requires_grad_()
        out = D.cross_entropy(local, t, class_start=start, weight=w, ignore_index=IGNORE,
                              reduction=red, label_smoothing=eps, lse_square_scale=zs,
                              backend=backend, return_decoding=True)
        up = torch.randn(out.loss.shape, generator=g, dtype=torch.float64)
        out.loss.backward(up.float())
        ref_loss, ref_grad = _oracle(x, t, w, red, eps, zs, up)
        what = f"seed {seed}: C={c} sizes={sizes} order={order} rows={rows}"
        torch.testing.assert_close(out.loss.double(), ref_loss, **F32,
                                   msg=lambda m, what=what: f"{what}\n{m}")
        torch.testing.assert_close(local.grad.double(), ref_grad[:, start:start + size],
                                   **F32, msg=lambda m, what=what: f"{what}\n{m}")
        assert torch.equal(out.pred, torch.argmax(x, -1)), what


@case
def large_logits_keep_fp32_precision(rank, world, backend):
    # logits around 1e4 (a 0.5 gap between classes): an fp32 lse exchanged as an absolute
    # value carried ulp(1e4) = 1e-3 into the loss (measured 4.4e-4) and the gradient (2.8e-4);
    # torch and the single-process kernels stay near 1e-8. The max and the log-sum travel apart.
    g = torch.Generator().manual_seed(11)
    x64 = 1e4 + 0.5 * torch.randint(-4, 5, (N, C), generator=g).to(torch.float64)
    x64[:, 5] += 3.0  # a clear maximum in one rank's slice for every layout
    t = torch.randint(0, C, (N,), generator=g)
    x = x64.float()
    start, size = _layout(rank, world)
    local = x[:, start:start + size].clone().requires_grad_()
    out = D.cross_entropy(local, t, reduction="sum", label_smoothing=0.1, backend=backend,
                          return_decoding=True)
    ref = x.to(torch.float64).requires_grad_()
    want = F.cross_entropy(ref, t, reduction="sum", label_smoothing=0.1)
    want.backward()
    assert abs(out.loss.item() - want.item()) < 1e-5 * N
    out.loss.backward()
    err = (local.grad.double() - ref.grad[:, start:start + size]).abs().max().item()
    assert err < 1e-6, err
    conf = torch.softmax(ref.detach(), -1).amax(-1)
    torch.testing.assert_close(out.confidence.double(), conf, rtol=1e-6, atol=1e-7)


@case
def infinite_logits_as_torch(rank, world, backend):
    # +inf anywhere in a row: torch's loss and whole gradient row are NaN (here the ranks
    # without the +inf had finite, wrong gradients); a shard whose row is all -inf, with label
    # smoothing: torch's loss is +inf (it was NaN from -inf - -inf)
    x, t, _ = _data(torch.float64)
    x[2, C - 1] = math.inf           # the last rank's shard
    x[4, :LAYOUTS[world][0]] = -math.inf  # all of rank 0's shard
    t[2], t[4] = 0, C - 1
    start, size = _layout(rank, world)
    for red in ("none", "sum"):
        local = x[:, start:start + size].clone().requires_grad_()
        full = x.clone().requires_grad_()
        loss = D.cross_entropy(local, t, label_smoothing=0.1, ignore_index=IGNORE,
                               reduction=red, backend=backend)
        want = F.cross_entropy(full, t, label_smoothing=0.1, ignore_index=IGNORE,
                               reduction=red)
        torch.testing.assert_close(loss, want, equal_nan=True)
        loss.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(local.grad, full.grad[:, start:start + size],
                                   equal_nan=True)


@case
def decode_ties_and_confidence(rank, world, backend):
    _run_case(rank, world, backend, weight=True, eps=0.1, s=0.0, reduction="mean", decode=True)


@case
def lm_layout_batch_seq(rank, world, backend):
    # (B, T, C_local) logits and (B, T) target, as a tensor-parallel LM head produces them.
    # Flush-to-zero on: the argmax indices travel as int32 bit patterns inside the float32
    # buffer (small ints are denormals); only copies touch them, so nothing may flush them.
    flush = torch.set_flush_denormal(True)
    try:
        _run_case(rank, world, backend, weight=False, eps=0.0, s=1e-2, reduction="none",
                  decode=True, batch=(1, N))
    finally:
        torch.set_flush_denormal(False)
    assert flush, "this CPU cannot flush denormals: the case checks nothing extra"


@case
def accelerator_backward_path(rank, world, backend):
    # the backward used for CUDA tensors (exp(z - lse), no host sync), run on the CPU
    cpu = _function.PROBS_BY_DEVICE.pop("cpu")
    try:
        for red in ("none", "mean"):
            _run_case(rank, world, backend, weight=True, eps=0.1, s=1e-2, reduction=red)
    finally:
        _function.PROBS_BY_DEVICE["cpu"] = cpu


@case
def fp64_path(rank, world, backend):
    _run_case(rank, world, backend, weight=True, eps=0.1, s=1e-2, reduction="mean",
              dtype=torch.float64, decode=True)


@case
def one_collective_without_validation(rank, world, backend, monkeypatch=None):
    # validate=False with the layout given: exactly 1 all_gather forward, none backward
    calls = []
    orig = _collectives.all_gather

    def counting(out, inp, group):
        calls.append(inp.numel())
        orig(out, inp, group)

    _collectives.all_gather = counting
    try:
        _run_case(rank, world, backend, weight=True, eps=0.1, s=1e-2, reduction="sum",
                  decode=True, validate=False, pass_layout=True)
    finally:
        _collectives.all_gather = orig
    # the packed statistics: 5 rows of N floats + (start, size) as int64 bits (4 floats)
    assert calls == [5 * N + 4], calls


@case
def reversed_layout_and_ties(rank, world, backend):
    # rank 0 holds the LAST classes: the tie rule must follow class order, not rank order
    sizes = LAYOUTS[world]
    order = list(reversed(range(world)))
    starts = {r: sum(sizes[q] for q in order[:order.index(r)]) for r in range(world)}
    x, t, w = _data()
    start, size = starts[rank], sizes[rank]
    local = x[:, start:start + size].clone().requires_grad_()
    out = D.cross_entropy(local, t, class_start=start, weight=w, ignore_index=IGNORE,
                          return_decoding=True, backend=backend)
    out.loss.backward()
    ref_loss, ref_grad = _oracle(x, t, w, "mean", 0.0, 0.0, torch.tensor(1.0))
    torch.testing.assert_close(out.loss.double(), ref_loss, **F32)
    torch.testing.assert_close(local.grad.double(), ref_grad[:, start:start + size], **F32)
    assert torch.equal(out.pred, torch.argmax(x, -1))


@case
def all_rows_ignored(rank, world, backend):
    # torch: mean over zero rows is NaN (0/0), sum is 0, gradient exactly 0
    x, _, _ = _data()
    t = torch.full((N,), IGNORE)
    start, size = _layout(rank, world)
    local = x[:, start:start + size].clone().requires_grad_()
    mean = D.cross_entropy(local, t, ignore_index=IGNORE, backend=backend)
    total = D.cross_entropy(local, t, ignore_index=IGNORE, reduction="sum", backend=backend)
    total.backward()
    assert torch.isnan(mean) and torch.isnan(F.cross_entropy(x, t, ignore_index=IGNORE))
    assert total.item() == 0.0
    assert torch.equal(local.grad, torch.zeros_like(local))
    # the mean's backward divides by 0: the gradient is still exactly 0 (torch's), not NaN
    w = torch.linspace(0.5, 2.0, x.shape[1])
    for kw in ({}, dict(weight=w), dict(label_smoothing=0.1)):
        local.grad = None
        D.cross_entropy(local, t, ignore_index=IGNORE, backend=backend, **kw).backward()
        assert torch.equal(local.grad, torch.zeros_like(local)), kw


@case
def extreme_logits(rank, world, backend):
    # |x| up to ~1000: exp overflows fp32 (above 88) unless every rank shifts by its max.
    # p = exp(x - lse) with lse rounded to fp32 (the op contract saves an fp32 lse) is off by
    # up to ~2 ulp(|lse|) relative, hence the gradient tolerance scales with max|x|.
    x, t, _ = _data()
    x = x * 100
    start, size = _layout(rank, world)
    local = x[:, start:start + size].clone().requires_grad_()
    loss = D.cross_entropy(local, t, ignore_index=IGNORE, reduction="sum", backend=backend)
    loss.backward()
    ref_loss, ref_grad = _oracle(x, t, None, "sum", 0.0, 0.0, torch.tensor(1.0))
    ulp = torch.finfo(torch.float32).eps * x.abs().max().item()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=4 * ulp)
    torch.testing.assert_close(local.grad.double(), ref_grad[:, start:start + size],
                               rtol=0, atol=4 * ulp)


@case
def subgroup_only(rank, world, backend):
    # tensor parallelism over a sub-group (ranks 0 and world-1), as beside data parallelism:
    # every collective must use that group; the rank outside it takes no part
    members = [0, world - 1]
    sub = dist.new_group(members)  # collective over the default group: every rank calls it
    if rank not in members:
        return
    seen = []
    orig = _collectives.all_gather

    def recording(out, inp, group):
        seen.append(group)
        orig(out, inp, group)

    _collectives.all_gather = recording
    try:
        sub_rank = members.index(rank)
        x, t, w = _data()
        start, size = _layout(sub_rank, 2)
        local = x[:, start:start + size].clone().requires_grad_()
        out = D.cross_entropy(local, t, group=sub, weight=w, ignore_index=IGNORE,
                              label_smoothing=0.1, backend=backend, return_decoding=True)
        out.loss.backward()
    finally:
        _collectives.all_gather = orig
    assert seen and all(g is sub for g in seen), seen
    ref_loss, ref_grad = _oracle(x, t, w, "mean", 0.1, 0.0, torch.tensor(1.0))
    torch.testing.assert_close(out.loss.double(), ref_loss, **F32)
    torch.testing.assert_close(local.grad.double(), ref_grad[:, start:start + size], **F32)
    assert torch.equal(out.pred, torch.argmax(x, -1))


@case
def empty_batch(rank, world, backend):
    # zero rows: torch gives NaN for mean, 0 for sum, an empty tensor for none
    x = torch.empty(0, C)
    t = torch.empty(0, dtype=torch.int64)
    start, size = _layout(rank, world)
    local = x[:, start:start + size].clone().requires_grad_()
    outs = {red: D.cross_entropy(local, t, reduction=red, backend=backend,
                                 return_decoding=True)
            for red in ("none", "mean", "sum")}
    outs["sum"].loss.backward()
    assert outs["none"].loss.shape == (0,) and outs["none"].pred.shape == (0,)
    assert torch.isnan(outs["mean"].loss) and torch.isnan(F.cross_entropy(x, t))
    assert outs["sum"].loss.item() == 0.0
    assert local.grad.shape == local.shape


@case
def masked_vocabulary_slice(rank, world, backend):
    # rows whose whole slice on rank 0 is -inf (a masked / padded part of the vocabulary):
    # p = 0 there, and the other ranks' gradients are unaffected
    x, t, w = _data()
    size0 = LAYOUTS[world][0]
    x[4:6, :size0] = -math.inf
    t[4:6] = C - 1  # a target outside the masked slice
    start, size = _layout(rank, world)
    local = x[:, start:start + size].clone().requires_grad_()
    loss = D.cross_entropy(local, t, weight=w, ignore_index=IGNORE, lse_square_scale=1e-2,
                           reduction="sum", backend=backend)
    loss.backward()
    ref_loss, ref_grad = _oracle(x, t, w, "sum", 0.0, 1e-2, torch.tensor(1.0))
    torch.testing.assert_close(loss.double(), ref_loss, **F32)
    torch.testing.assert_close(local.grad.double(), ref_grad[:, start:start + size], **F32)


@case
def bf16_no_worse_than_torch(rank, world, backend):
    x, t, w = _data(torch.bfloat16)
    start, size = _layout(rank, world)
    local = x[:, start:start + size].clone().requires_grad_()
    loss = D.cross_entropy(local, t, weight=w, ignore_index=IGNORE, label_smoothing=0.1,
                           backend=backend)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and local.grad.dtype == torch.bfloat16
    ref_loss, ref_grad = _oracle(x, t, w, "mean", 0.1, 0.0, torch.tensor(1.0))
    xt = x.clone().requires_grad_()
    tl = F.cross_entropy(xt, t, weight=w, ignore_index=IGNORE, label_smoothing=0.1)
    tl.backward()
    for ours, theirs, exact in ((loss, tl, ref_loss),
                                (local.grad, xt.grad[:, start:start + size],
                                 ref_grad[:, start:start + size])):
        e_ours = (ours.double() - exact).abs().max().item()
        e_torch = (theirs.double() - exact).abs().max().item()
        assert e_ours <= 2 * e_torch + 4e-3 * max(exact.abs().max().item(), 1.0), \
            (e_ours, e_torch)


@case
def module_caches_layout(rank, world, backend):
    x, t, w = _data()
    start, size = _layout(rank, world)
    mod = D.VocabParallelCrossEntropyLoss(weight=w, ignore_index=IGNORE, label_smoothing=0.1,
                                          backend=backend, validate=False)
    losses = []
    for _ in range(2):
        local = x[:, start:start + size].clone().requires_grad_()
        losses.append(mod(local, t))
    assert (mod.class_start, mod.num_classes) == (start, C)
    ref_loss, _ = _oracle(x, t, w, "mean", 0.1, 0.0, torch.tensor(1.0))
    for loss in losses:
        torch.testing.assert_close(loss.double(), ref_loss, **F32)




@pytest.mark.parametrize("world", sorted(LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_case(name, backend, world):
    results, error = _group_results(backend, world)
    assert len(results) == world, f"only {len(results)} of {world} ranks reported: {error}"
    failures = {r: res.get(name, "not run") for r, res in results.items()
                if res.get(name) != "ok"}
    assert not failures, "\n".join(f"--- rank {r}:\n{msg}" for r, msg in failures.items())


def test_single_rank_group_matches_torch():
    """A world of 1 (no spawn: an in-process gloo group) is plain cross-entropy."""
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0,
                                world_size=1, timeout=COLLECTIVE_TIMEOUT)
        try:
            x, t, w = _data()
            xl = x.clone().requires_grad_()
            out = D.cross_entropy(xl, t, weight=w, ignore_index=IGNORE, label_smoothing=0.2,
                                  backend=BACKENDS[-1], return_decoding=True)
            out.loss.backward()
            ref_loss, ref_grad = _oracle(x, t, w, "mean", 0.2, 0.0, torch.tensor(1.0))
            torch.testing.assert_close(out.loss.double(), ref_loss, **F32)
            torch.testing.assert_close(xl.grad.double(), ref_grad, **F32)
            assert torch.equal(out.pred, torch.argmax(x, -1))
        finally:
            dist.destroy_process_group()
