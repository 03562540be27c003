"""The harness of tests/test_distributed.py: data, the torch oracle, the case registry, and
the spawned process groups that run every registered case (see that file's docstring).

The cases live in test_distributed.py (values) and distributed_bad_cases.py (bad input); each
rank imports both (CASE_MODULES) before it runs them, so parent and ranks see the same cases.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fusedloss
from fusedloss import distributed as D

GROUP_TIMEOUT = 90.0  # seconds for a whole group (all cases); a hang fails the items
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=20)  # gloo: a stuck collective raises
N, C = 13, 11  # 13 rows: not a multiple of any shard; 11 classes: prime, so shards are uneven
IGNORE = -100
# Uneven shard sizes per world size (in rank order); 3 ranks include a 1-class shard.
LAYOUTS = {2: [4, 7], 3: [5, 1, 5]}
BACKENDS = [b for b in fusedloss.available_backends("cpu") if b != "triton"]  # interpreter: slow
F32 = dict(atol=2e-6, rtol=2e-5)  # fp32 over 11 classes: a few ulp of the loss and gradient

CASE_MODULES = ("test_distributed", "distributed_bad_cases")


# ----------------------------------------------------------------------------- data and oracle
def _data(dtype=torch.float32, seed=0, rows=N):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, C, (rows,), generator=g)
    t[3] = IGNORE  # ignored rows
    t[7] = IGNORE
    # argmax ties across shards: the maximum in classes 2 and 9 (different ranks in every layout)
    x[0] = 0
    x[0, 2] = x[0, 9] = 5
    # a tie in classes 5 and 6: inside rank 1's shard for 2 ranks, across ranks 1, 2 for 3
    x[1, 5] = x[1, 6] = x[1].max() + 1
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, t, w


def _layout(rank, world):
    sizes = LAYOUTS[world]
    start = sum(sizes[:rank])
    return start, sizes[rank]


def _zloss_reference(x, t, w, reduction, s):
    lse = torch.logsumexp(x.double(), -1)
    valid = t != IGNORE
    z = s * lse.square() * valid
    if reduction == "none":
        return z
    if reduction == "sum":
        return z.sum()
    wt = torch.ones(len(t), dtype=torch.float64) if w is None else w.double()[t.clamp(min=0)]
    return z.sum() / (wt * valid).sum()


def _oracle(x, t, w, reduction, eps, s, upstream):
    """(loss, full gradient) from torch on the full logits."""
    xr = x.detach().double().requires_grad_()
    loss = F.cross_entropy(xr, t, weight=None if w is None else w.double(), ignore_index=IGNORE,
                           reduction=reduction, label_smoothing=eps)
    if s:
        loss = loss + _zloss_reference(xr, t, w, reduction, s)
    loss.backward(upstream.double())
    return loss.detach(), xr.grad


def _run_case(rank, world, backend, *, weight, eps, s, reduction, dtype=torch.float32,
              decode=False, validate=True, pass_layout=False, batch=None):
    x, t, w = _data(dtype)
    w = w if weight else None
    start, size = _layout(rank, world)
    local = x[:, start:start + size].clone()
    if batch is not None:  # (B, T, C_local) LM layout
        local, t_in = local.reshape(*batch, size), t.reshape(batch)
    else:
        t_in = t
    local.requires_grad_()
    kw = dict(class_start=start, num_classes=C) if pass_layout else {}
    out = D.cross_entropy(local, t_in, weight=w, ignore_index=IGNORE, reduction=reduction,
                          label_smoothing=eps, lse_square_scale=s, backend=backend,
                          return_decoding=decode, validate=validate, **kw)
    loss = out.loss if decode else out
    gen = torch.Generator().manual_seed(99)  # the same upstream gradient on every rank
    upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    loss.backward(upstream.to(loss.dtype))
    ref_loss, ref_grad = _oracle(x, t, w, reduction, eps, s, upstream.reshape(-1)
                                 if reduction == "none" else upstream)
    assert loss.dtype == dtype, (loss.dtype, dtype)
    assert loss.shape == (t_in.shape if reduction == "none" else ()), loss.shape
    tol = F32 if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(loss.double().reshape(-1), ref_loss.reshape(-1), **tol)
    torch.testing.assert_close(local.grad.double().reshape(-1, size),
                               ref_grad[:, start:start + size], **tol)
    if decode:
        xd = x.double()
        pred = torch.argmax(xd, -1)
        conf = torch.softmax(xd, -1).gather(1, pred[:, None]).squeeze(1)
        assert torch.equal(out.pred.reshape(-1), pred), (out.pred, pred)
        assert out.pred.reshape(-1)[0] == 2 and out.pred.reshape(-1)[1] == 5  # tie rules
        torch.testing.assert_close(out.confidence.reshape(-1).double(), conf, **F32)
        assert out.confidence.dtype == torch.float32
        assert torch.equal(out.correct.reshape(-1), (pred == t) & (t != IGNORE))


# ----------------------------------------------------------------------------- cases
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _grid_case(weight, eps, s, reduction):
    def fn(rank, world, backend):
        _run_case(rank, world, backend, weight=weight, eps=eps, s=s, reduction=reduction)
    return fn


# ----------------------------------------------------------------------------- harness
def _worker(rank, world, init_file, backend, out_dir):
    torch.set_num_threads(1)
    for module in CASE_MODULES:  # registers the cases in this rank's CASES
        importlib.import_module(module)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    results = {}
    try:
        for name, fn in CASES.items():
            try:
                fn(rank, world, backend)
                results[name] = "ok"
            except Exception:  # recorded; the item for this case fails with the traceback
                results[name] = traceback.format_exc()
            dist.barrier()  # keep the ranks in step between cases
    finally:
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


_GROUPS: dict = {}


def _group_results(backend, world):
    """Run every case in one spawned group of `world` ranks; {rank: {case: 'ok' | traceback}}."""
    key = (backend, world)
    if key not in _GROUPS:
        with tempfile.TemporaryDirectory() as tmp:
            init_file = os.path.join(tmp, "init")
            ctx = mp.start_processes(_worker, args=(world, init_file, backend, tmp),
                                     nprocs=world, join=False, start_method="spawn")
            deadline = time.monotonic() + GROUP_TIMEOUT
            error = None
            try:
                while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
                    if time.monotonic() > deadline:
                        error = f"group of {world} ranks timed out after {GROUP_TIMEOUT} s"
                        break
            except Exception as e:  # a rank died outside a case
                error = f"a rank failed: {e}"
            finally:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
            results = {}
            for r in range(world):
                path = os.path.join(tmp, f"{r}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        results[r] = json.load(f)
            _GROUPS[key] = (results, error)
    return _GROUPS[key]
