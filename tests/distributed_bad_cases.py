"""Bad input to fusedloss.distributed.cross_entropy, run by the process groups of
tests/distributed_harness.py: every rank must raise the same error (never hang)."""

from __future__ import annotations

import pytest

from distributed_harness import IGNORE, C, _data, _layout, case
from fusedloss import distributed as D


def _bad(rank, world, backend, exc, match, **over):
    x, t, w = _data()
    start, size = _layout(rank, world)
    args = dict(local_logits=x[:, start:start + size], target=t, weight=None, kw={})
    args.update({k: v(rank, args) for k, v in over.items()})
    with pytest.raises(exc, match=match):
        D.cross_entropy(args["local_logits"], args["target"], weight=args["weight"],
                        ignore_index=IGNORE, backend=backend, **args["kw"])


@case
def bad_num_classes(rank, world, backend):
    _bad(rank, world, backend, ValueError, r"add up to 11, not num_classes=12",
         kw=lambda r, a: dict(num_classes=C + 1))


@case
def bad_target_differs_on_one_rank(rank, world, backend):
    def tgt(r, a):
        t = a["target"].clone()
        if r == world - 1:
            t[5] = (t[5] + 1) % C
        return t
    _bad(rank, world, backend, ValueError, r"target differs across ranks", target=tgt)


@case
def bad_rows_differ(rank, world, backend):
    # rank 1 has one row fewer (self-consistent locally): caught only by comparing ranks
    def cut(r, a):
        return a["local_logits"][:-1] if r == 1 else a["local_logits"]

    def cut_t(r, a):
        return a["target"][:-1] if r == 1 else a["target"]
    _bad(rank, world, backend, ValueError, r"number of rows .* differs across ranks",
         local_logits=cut, target=cut_t)


@case
def bad_local_shape_on_one_rank(rank, world, backend):
    def tgt(r, a):
        return a["target"][:-1] if r == 0 else a["target"]
    _bad(rank, world, backend, ValueError, r"bad input on 1 of .*rank 0: target.shape \(12,\)",
         target=tgt)


@case
def bad_target_out_of_range(rank, world, backend):
    def tgt(r, a):
        t = a["target"].clone()
        t[4] = C
        return t
    _bad(rank, world, backend, IndexError, r"Target 11 is out of bounds", target=tgt)


@case
def bad_class_start_overlap(rank, world, backend):
    # every rank claims to start at 0: shards overlap
    _bad(rank, world, backend, ValueError, r"tile \[0, 11\)",
         kw=lambda r, a: dict(class_start=0))


@case
def bad_weight_dtype_raises_torchs_type(rank, world, backend):
    # torch: RuntimeError "expected scalar type Float but found Double" (was a ValueError here)
    _bad(rank, world, backend, RuntimeError, r"weight\.dtype torch\.float64 must match",
         weight=lambda r, a: _data()[2].double())


@case
def bad_weight_is_local_slice(rank, world, backend):
    def wl(r, a):
        start, size = _layout(r, world)
        return _data()[2][start:start + size]
    _bad(rank, world, backend, ValueError, r"full \(num_classes,\)", weight=wl)


@case
def bad_options_differ(rank, world, backend):
    def kw(r, a):
        return dict(label_smoothing=0.1 if r == 0 else 0.0)
    _bad(rank, world, backend, ValueError, r"options hash .* differs across ranks", kw=kw)




@case
def bad_target_differs_with_equal_moments(rank, world, backend):
    # +1, -2, +1 at positions 1, 2, 3 of the last rank's targets: the count, the sum and a
    # position-weighted sum all agree with the other ranks; a linear checksum let it through
    # and every rank returned a loss equal to neither rank's torch answer
    def tgt(r, a):
        t = a["target"].clone()
        t[1], t[2], t[3] = 3, 4, 3
        if r == world - 1:
            t[1], t[2], t[3] = 4, 2, 4
        return t
    _bad(rank, world, backend, ValueError, r"target differs across ranks", target=tgt)
