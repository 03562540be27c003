"""Vocabulary-parallel softmax cross-entropy over torch.distributed (tensor-parallel LM heads).

Each rank of `group` holds the logits of one contiguous slice of the classes,
`local_logits[..., c]` being global class `class_start + c` (shards may be uneven); every rank
holds the same global `target`. The loss, its gradient and the decodings equal those of
`torch.nn.functional.cross_entropy` on the gathered logits, without ever gathering them.

Math (z = logits of the whole row, C = num_classes, w = class weight, W = sum_c w_c,
eps = label_smoothing, s = lse_square_scale). Rank q computes on its slice, with the backend
op `softmax_ce_fwd` (one read of its logits):
    lse_q = log sum_{c in q} exp(z_c)                         (every row)
    A_q   = sum_{c in q} w_c (lse_q - z_c)                   (only when eps > 0; >= 0)
    (m_q, j_q) = max and first argmax of the slice           (only when decoding)
    z_t   = the target logit, where q owns the target
Every rank gathers these small (rows,) statistics of every rank (ONE all_gather of one packed
buffer) and combines them itself, identically:
    lse   = logsumexp_q lse_q
    sum_c w_c (lse - z_c) = sum_q [A_q + W_q (lse - lse_q)]   (a sum of non-negative terms)
    loss  = (1-eps) w_t (lse - z_t) + (eps/C) sum_c w_c (lse - z_c) + s lse^2   (0 if ignored)
    pred  = class_start[q*] + j_q*, q* = the first rank in class order with the largest m_q
            (torch.argmax's rule: lowest global index among equal maxima, first NaN wins)
    confidence = exp(m_q* - lse)
The gradient on rank q's slice needs nothing from the other ranks once lse is known:
    dloss/dz_c = p_c ((1-eps) w_t + (eps/C) W + 2 s lse) - (1-eps) w_t [c == t] - (eps/C) w_c,
    p_c = exp(z_c - lse),
so the backward runs NO collective. It is computed here with torch ops (on the CPU, torch's
softmax of the slice rescaled by exp(lse_q - lse): two passes; elsewhere three). The op
`softmax_ce_bwd` cannot be reused: for a row whose target lives on another rank it must give
`p_c * coef` without a one-hot term, and the op either zeroes such a row (ignored target) or
adds a one-hot term (any valid target); docs/distributed.md proposes the op that would make it
one pass.

Collectives per forward (all on `group`, nothing else is touched, so data parallelism over
other process groups (DDP, FSDP) composes):
  - validate=True (default): 2 all_gathers. (1) a fixed 16-int64 header per rank (batch shape,
    shard size and start, a checksum of target and weight, an options hash, local errors);
    every rank checks the gathered headers and raises the SAME error, so bad input on one rank
    cannot hang the others. Reading it back costs one host synchronisation.
    (2) the packed statistics: (2 + [eps>0] + 2*[decoding]) x rows floats + 16 bytes per rank.
  - validate=False: 1 all_gather (the statistics) when class_start is given, no host sync;
    when class_start is None, 1 more all_gather of the shard sizes (and one host sync) first:
    the module VocabParallelCrossEntropyLoss does that once and keeps the layout.
Collectives per backward: none.

Weights: pass the FULL (num_classes,) weight on every rank (it is small next to the logits);
each rank slices its part. Layout: classes are the LAST dim of local_logits (Megatron's
(batch, seq, vocab/tp) layout); target has local_logits' shape without it.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _backend
from . import reference as ref

try:  # share the public decoding type when the single-process layer provides it
    from .functional import CrossEntropyOutput
except ImportError:  # pragma: no cover - functional.py not present in this build
    class CrossEntropyOutput(NamedTuple):
        loss: Tensor
        pred: Tensor
        confidence: Tensor
        correct: Tensor | None

__all__ = ["cross_entropy", "VocabParallelCrossEntropyLoss", "shard_layout", "CrossEntropyOutput"]

_REDUCTIONS = ("none", "mean", "sum")
# Header slots (int64), one header per rank, gathered when validate=True.
_H_ERROR, _H_ROWS, _H_SHAPE, _H_SIZE, _H_START, _H_NCLS, _H_OPTS = range(7)
_H_TSUM, _H_TMIX, _H_TMIN, _H_TMAX, _H_WLEN, _H_WMIX, _H_WNAN = range(7, 14)
_HEADER_LEN = 16
# Position-mixing modulus for the checksums: products stay below 2^41, so a sum over up to
# 2^22 rows (or weight entries) cannot overflow int64.
_MIX = 1_000_003
# torch.argmax over int32 indices packed in float32 bits is exact; a shard wider than this
# cannot be indexed by int32.
_MAX_LOCAL_CLASSES = 2**31 - 1
# Backward on CPU tensors through torch.softmax (two passes, a free host check for masked
# slices) rather than the accelerator path exp(z - lse) (three passes, no host sync). The
# tests switch it off to run the accelerator path on the CPU.
_CPU_SOFTMAX_BACKWARD = True


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    """All ranks' `inp` stacked into `out` (world * inp.numel()). One collective."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _gather_rows(inp: Tensor, group, world: int) -> Tensor:
    out = inp.new_empty((world * inp.numel(),))
    _all_gather(out, inp.reshape(-1), group)
    return out.view(world, -1)


def _comm_device(local_logits, group) -> torch.device:
    if isinstance(local_logits, Tensor):
        return local_logits.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_layout(local_classes: int, group=None) -> tuple[int, int]:
    """(class_start, num_classes) for contiguous shards in rank order: the exclusive prefix sum
    of every rank's `local_classes` and their total. One all_gather and one host sync; call it
    once and pass the result to cross_entropy (the module does)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dev = _comm_device(None, group)
    sizes = _gather_rows(torch.tensor([int(local_classes)], dtype=torch.int64, device=dev),
                         group, world).reshape(-1).tolist()
    bad = [(r, s) for r, s in enumerate(sizes) if s <= 0]
    if bad:
        raise ValueError(f"every rank must hold at least one class; local_logits.shape[-1] "
                         f"is {bad[0][1]} on rank {bad[0][0]} (sizes {sizes})")
    return sum(sizes[:rank]), sum(sizes)


# ----------------------------------------------------------------------------- validation
def _local_problems(local_logits, target, weight, class_start, num_classes, ignore_index,
                    reduction, label_smoothing, lse_square_scale) -> list[str]:
    """Everything that can be checked on this rank alone, as messages (no raising yet)."""
    p = []
    if not isinstance(local_logits, Tensor):
        return [f"local_logits must be a Tensor, got {type(local_logits).__name__}"]
    if not isinstance(target, Tensor):
        return [f"target must be a Tensor, got {type(target).__name__}"]
    if not local_logits.is_floating_point():
        p.append(f"local_logits must be a floating point tensor, got {local_logits.dtype}")
    if local_logits.dim() == 0:
        p.append("local_logits must have a class dimension (the last), got a 0-d tensor")
    elif local_logits.shape[-1] == 0:
        p.append("local_logits has no classes on this rank (shape[-1] == 0); every rank "
                 "must hold at least one class")
    elif local_logits.shape[-1] > _MAX_LOCAL_CLASSES:
        p.append(f"local_logits has {local_logits.shape[-1]} classes; at most "
                 f"{_MAX_LOCAL_CLASSES} per rank are supported")
    elif tuple(target.shape) != tuple(local_logits.shape[:-1]):
        p.append(f"target.shape {tuple(target.shape)} must be local_logits.shape without the "
                 f"class (last) dim: {tuple(local_logits.shape[:-1])}")
    if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
        p.append(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.device != local_logits.device:
        p.append(f"target is on {target.device} but local_logits on {local_logits.device}")
    if weight is not None:
        if not isinstance(weight, Tensor):
            p.append(f"weight must be a Tensor or None, got {type(weight).__name__}")
        elif weight.dim() != 1:
            p.append(f"weight must be the full 1-D (num_classes,) weight, got shape "
                     f"{tuple(weight.shape)}")
        elif weight.dtype != local_logits.dtype:
            p.append(f"weight.dtype {weight.dtype} must match local_logits.dtype "
                     f"{local_logits.dtype}")
        elif weight.device != local_logits.device:
            p.append(f"weight is on {weight.device} but local_logits on {local_logits.device}")
    if class_start is not None and (isinstance(class_start, bool) or
                                    not isinstance(class_start, int) or class_start < 0):
        p.append(f"class_start must be a non-negative int or None, got {class_start!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or
                                    not isinstance(num_classes, int) or num_classes <= 0):
        p.append(f"num_classes must be a positive int or None, got {num_classes!r}")
    if reduction not in _REDUCTIONS:
        p.append(f"reduction={reduction!r} is not one of {_REDUCTIONS}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        p.append(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (isinstance(lse_square_scale, (int, float)) and lse_square_scale >= 0.0
            and math.isfinite(lse_square_scale)):
        p.append(f"lse_square_scale must be a finite number >= 0, got {lse_square_scale!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        p.append(f"ignore_index must be an int, got {ignore_index!r}")
    return p


def _mix(v: Tensor) -> tuple[Tensor, Tensor]:
    """(sum, position-mixed sum) of an int64 vector: equal vectors give equal pairs; a changed
    or swapped entry almost surely changes them. Device ops, no sync."""
    if v.numel() == 0:
        z = torch.zeros((), dtype=torch.int64, device=v.device)
        return z, z
    pos = torch.arange(v.numel(), device=v.device, dtype=torch.int64).remainder(_MIX) + 1
    return v.sum(), (v.remainder(_MIX) + 1).mul(pos).sum()


def _bits(t: Tensor) -> Tensor:
    """A float tensor's bit patterns as int64 (exact comparison, -0.0 != 0.0, NaN-safe)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(as_int).to(torch.int64)


def _header(problems, local_logits, target, weight, class_start, num_classes, ignore_index,
            reduction, label_smoothing, lse_square_scale, return_decoding, device) -> Tensor:
    h = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device)
    if problems:
        h[_H_ERROR] = 1
        return h
    batch = tuple(local_logits.shape[:-1])
    opts = repr((int(ignore_index), reduction, float(label_smoothing), float(lse_square_scale),
                 bool(return_decoding), str(local_logits.dtype), weight is None,
                 class_start is None, num_classes is None))
    host = [0, math.prod(batch), zlib.crc32(repr(batch).encode()), local_logits.shape[-1],
            -1 if class_start is None else class_start,
            -1 if num_classes is None else num_classes, zlib.crc32(opts.encode())]
    h[:len(host)] = torch.tensor(host, dtype=torch.int64, device=device)
    t = target.reshape(-1).to(torch.int64)
    h[_H_TSUM], h[_H_TMIX] = _mix(t)
    valid = t != ignore_index
    big = torch.iinfo(torch.int64).max
    if t.numel():
        h[_H_TMIN] = torch.where(valid, t, big).min()
        h[_H_TMAX] = torch.where(valid, t, -1).max()
    else:
        h[_H_TMIN], h[_H_TMAX] = big, -1
    h[_H_WLEN] = -1
    if weight is not None:
        h[_H_WLEN] = weight.numel()
        h[_H_WMIX] = _mix(_bits(weight))[1]
        h[_H_WNAN] = torch.isnan(weight).any().to(torch.int64)
    return h


def _fail(exc_type, msg: str):
    raise exc_type(f"fusedloss.distributed.cross_entropy: {msg}")


def _check_headers(hs: list[list[int]], rank: int, problems: list[str], group):
    """Raise the same error on every rank (they all see the same gathered headers).
    Returns (class_start of this rank, num_classes)."""
    world = len(hs)
    errs = [r for r in range(world) if hs[r][_H_ERROR]]
    if errs:
        msgs = [None] * world
        dist.all_gather_object(msgs, problems, group=group)  # all ranks are here: no hang
        text = "; ".join(f"rank {r}: {' / '.join(msgs[r])}" for r in errs)
        _fail(ValueError, f"bad input on {len(errs)} of {world} ranks: {text}")

    def differs(slot, what):
        vals = [h[slot] for h in hs]
        if len(set(vals)) > 1:
            _fail(ValueError, f"{what} differs across ranks: "
                  + ", ".join(f"rank {r}: {v}" for r, v in enumerate(vals)))

    differs(_H_ROWS, "the number of rows (local_logits.shape[:-1] numel)")
    differs(_H_SHAPE, "the batch shape (local_logits.shape[:-1]) hash")
    differs(_H_OPTS, "the options hash (ignore_index, reduction, label_smoothing, "
            "lse_square_scale, return_decoding, dtype, whether weight/class_start/num_classes "
            "are given)")
    if len({(h[_H_TSUM], h[_H_TMIX]) for h in hs}) > 1:
        _fail(ValueError, "target differs across ranks (checksums "
              + ", ".join(f"rank {r}: {h[_H_TSUM]}/{h[_H_TMIX]}" for r, h in enumerate(hs))
              + "); every rank must hold the same global class indices")
    sizes = [h[_H_SIZE] for h in hs]
    total = sum(sizes)
    ncls = hs[0][_H_NCLS]
    differs(_H_NCLS, "num_classes")
    if ncls != -1 and ncls != total:
        _fail(ValueError, f"the local shard sizes {sizes} add up to {total}, not "
              f"num_classes={ncls}")
    if hs[0][_H_START] == -1:
        starts = [sum(sizes[:r]) for r in range(world)]
    else:
        starts = [h[_H_START] for h in hs]
        order = sorted(range(world), key=lambda r: starts[r])
        pos = 0
        for r in order:
            if starts[r] != pos:
                _fail(ValueError, f"shards must tile [0, {total}) without gaps or overlap: "
                      f"rank {r} has class_start={starts[r]} but the classes before it end at "
                      f"{pos} (class_start {starts}, sizes {sizes})")
            pos += sizes[r]
    if hs[0][_H_WLEN] != -1:
        lens = [h[_H_WLEN] for h in hs]
        if any(n != total for n in lens):
            _fail(ValueError, f"weight must be the full (num_classes,) = ({total},) weight on "
                  f"every rank, not this rank's slice; got {lens} entries on ranks 0..{world-1}")
        differs(_H_WMIX, "weight (checksum)")
        if hs[0][_H_WNAN]:
            _fail(ValueError, "weight contains NaN")
    tmin, tmax = hs[0][_H_TMIN], hs[0][_H_TMAX]
    if tmin < 0:
        _fail(IndexError, f"Target {tmin} is out of bounds (num_classes={total}).")
    if tmax >= total:
        _fail(IndexError, f"Target {tmax} is out of bounds (num_classes={total}).")
    return starts[rank], total


# ----------------------------------------------------------------------------- local stats
def _local_stats(x2: Tensor, w_local: Tensor | None, eps: float, decode: bool, backend: str):
    """(lse_q, A_q or None, argmax or None) of this rank's slice, in the accumulation dtype."""
    rows, cls = x2.shape
    cdt = ref.compute_dtype(x2.dtype)
    smooth = eps > 0
    # A valid dummy target with label_smoothing=1 makes the op's row loss exactly
    # (1/C_q) sum_c w_c (lse_q - z_c); without smoothing every row is "ignored" and the op
    # only returns lse (and the decoding).
    tgt = torch.full((rows,), 0 if smooth else -1, dtype=torch.int64, device=x2.device)
    # The op returns loss/lse in the accumulation dtype (fp64 for fp64 logits, docs/OPS.md).
    ops = _backend.get(backend, x2.device).ops
    loss, lse, _, pred, _ = ops.softmax_ce_fwd(
        x2, tgt, w_local, None, -1, 1.0 if smooth else 0.0, 0.0, 0.0, False, decode)
    pred = pred if decode else None
    return lse.to(cdt), (loss.to(cdt) * cls if smooth else None), pred


# ----------------------------------------------------------------------------- autograd
class _VocabParallelCE(torch.autograd.Function):
    """Per-row loss (accumulation dtype) plus decodings; backward is local (no collective)."""

    @staticmethod
    def forward(ctx, x2, t, weight, start, eps, s, ignore_index, decode, backend, group):
        world = dist.get_world_size(group)
        rows, cls = x2.shape
        dev = x2.device
        cdt = ref.compute_dtype(x2.dtype)
        w_local = None if weight is None else weight[start:start + cls]
        if w_local is not None and w_local.numel() != cls:
            raise ValueError(f"weight has {weight.numel()} entries but this rank's classes "
                             f"end at {start + cls}; pass the full (num_classes,) weight")
        lse_q, a_q, pred_q = _local_stats(x2, w_local, eps, decode, backend)

        valid = t != ignore_index
        owner = valid & (t >= start) & (t < start + cls)
        t_local = torch.where(owner, t - start, 0)
        z_t = torch.where(owner, x2.gather(1, t_local.unsqueeze(1)).squeeze(1).to(cdt), 0.0)

        # One packed buffer: [lse_q | z_t | A_q | m_q | j_q] x rows, then (start, size) as
        # int64 bits. Integers travel as bit patterns (exact at any size).
        parts = [lse_q, z_t]
        if a_q is not None:
            parts.append(a_q)
        i_max = len(parts)  # rows i_max, i_max + 1: m_q, j_q
        if decode:
            itype = torch.int32 if cdt == torch.float32 else torch.int64
            parts.append(x2.gather(1, pred_q.unsqueeze(1)).squeeze(1).to(cdt))
            parts.append(pred_q.to(itype).view(cdt))
        tail = torch.tensor([start, cls], dtype=torch.int64, device=dev).view(cdt)
        buf = torch.cat([torch.stack(parts).reshape(-1), tail]) if rows else tail
        k = len(parts)
        g = _gather_rows(buf, group, world)
        stats = g[:, :k * rows].reshape(world, k, rows)
        # (world, 2) int64 start, size; the copy gives the int64 view an aligned offset
        layout = g[:, k * rows:].reshape(-1).clone().view(torch.int64).view(world, 2)
        starts, sizes = layout[:, 0], layout[:, 1]
        num_classes = sizes.sum()

        lse = torch.logsumexp(stats[:, 0], dim=0)
        zt = stats[:, 1].sum(0)  # exactly one rank contributes a non-zero (the owner)
        in_range = (t >= 0) & (t < num_classes)
        # Without validation a target outside [0, C) is not caught on the host: make it NaN.
        zt = torch.where(in_range | ~valid, zt, math.nan)
        w_t = torch.ones(rows, dtype=cdt, device=dev) if weight is None else \
            weight.to(cdt)[t.clamp(0, weight.numel() - 1)]
        w_t = w_t * valid
        loss = (1 - eps) * w_t * (lse - zt)
        coef_p = (1 - eps) * w_t
        eps_c = eps / num_classes.to(cdt)
        if eps > 0:
            if weight is None:
                w_q, w_sum = sizes.to(cdt), num_classes.to(cdt)
            else:
                cw = torch.cat([weight.new_zeros(1, dtype=torch.float64),
                                weight.to(torch.float64).cumsum(0)])
                w_q = (cw[(starts + sizes).clamp(max=weight.numel())] -
                       cw[starts.clamp(max=weight.numel())]).to(cdt)
                w_sum = weight.to(cdt).sum()
            smooth = (stats[:, 2] + w_q.unsqueeze(1) * (lse - stats[:, 0])).sum(0)
            loss = loss + eps_c * smooth
            coef_p = coef_p + eps_c * w_sum * valid
        if s > 0:
            loss = loss + s * lse.square()
            coef_p = coef_p + 2 * s * lse * valid
        loss = torch.where(valid, loss, 0.0)

        if decode:
            # torch.argmax over ranks sorted by class_start: lowest global index wins a tie.
            order = torch.argsort(starts)
            m_sorted = stats[:, i_max].index_select(0, order)
            win = order[torch.argmax(m_sorted, dim=0)]
            ar = torch.arange(rows, device=dev)
            itype = torch.int32 if cdt == torch.float32 else torch.int64
            j = stats[:, i_max + 1].contiguous().view(itype)[win, ar].to(torch.int64)
            pred = starts[win] + j
            conf = torch.exp(stats[:, i_max][win, ar] - lse).float()
        else:
            pred = torch.empty(0, dtype=torch.int64, device=dev)
            conf = torch.empty(0, dtype=torch.float32, device=dev)

        ctx.save_for_backward(x2, lse, lse_q, coef_p, t_local, (1 - eps) * w_t * owner,
                              eps_c * valid if eps > 0 else None,
                              w_local)
        ctx.mark_non_differentiable(pred, conf)
        return loss, pred, conf

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_pred, _grad_conf):
        # dloss_r/dz_c = p_c coef_p[r] - onehot[r] [c == t_local[r]] - eps_c[r] w_c
        x2, lse, lse_q, coef_p, t_local, onehot, eps_c, w_local = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 10
        cdt = lse.dtype
        g = grad_loss.to(cdt)
        if x2.device.type == "cpu" and _CPU_SOFTMAX_BACKWARD:
            # p = softmax_local(z) * exp(lse_q - lse): torch's softmax kernel keeps each row in
            # cache, so this is one read and one write of the slice, plus the scaling pass
            # (measured 51 ms against 79 ms for sub+exp+mul, 1024 x 32000 fp32, one thread).
            grad = torch.softmax(x2, dim=1, dtype=cdt)
            grad.mul_((g * coef_p * torch.exp(lse_q - lse)).unsqueeze(1))
            dead = torch.isneginf(lse_q)  # the whole local slice is -inf: softmax gave 0/0
            if bool(dead.any()):  # a host check, free on the CPU
                grad[dead] = 0.0
        else:  # no host sync on accelerators: exp(z - lse) directly (three passes)
            grad = torch.sub(x2.to(cdt), lse.unsqueeze(1))
            grad.exp_()
            grad.mul_((g * coef_p).unsqueeze(1))
        if eps_c is not None:
            w = torch.ones(x2.shape[1], dtype=cdt, device=x2.device) if w_local is None \
                else w_local.to(cdt)
            grad.addr_(g * eps_c, w, alpha=-1)
        grad.scatter_add_(1, t_local.unsqueeze(1), (-(g * onehot)).unsqueeze(1))
        return (grad.to(x2.dtype),) + (None,) * 9


# ----------------------------------------------------------------------------- public API
def cross_entropy(local_logits: Tensor, target: Tensor, *, group=None,
                  class_start: int | None = None, num_classes: int | None = None,
                  weight: Tensor | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  lse_square_scale: float = 0.0, backend: str = "auto",
                  return_decoding: bool = False, validate: bool = True):
    """Softmax cross-entropy over classes sharded across the ranks of `group`.

    local_logits: (*, C_local), this rank's classes [class_start, class_start + C_local) in the
        last dim; shards may be uneven but each rank needs at least one class.
    target: (*) global class indices (or ignore_index), IDENTICAL on every rank.
    class_start: this rank's first class; default: the exclusive prefix sum of the shard sizes
        in rank order (one extra all_gather; see shard_layout). num_classes: checked if given.
    weight: the FULL (num_classes,) class weight, the same on every rank.
    reduction, ignore_index, label_smoothing: as torch.nn.functional.cross_entropy (the mean is
        torch's weighted mean: divided by the sum of w[target] over non-ignored rows).
    lse_square_scale: z-loss, adds `lse_square_scale * lse^2` per non-ignored row (global lse).
    return_decoding: also return pred (global argmax, lowest index on ties), confidence
        (its softmax probability, fp32) and correct, as a CrossEntropyOutput.
    validate: exchange a 16-int64 header first and raise the same clear error on EVERY rank
        for inputs that differ across ranks or do not fit together (shard sizes vs
        num_classes, gaps/overlaps in class_start, different targets (checksum), batch shapes,
        options or weights, out-of-range targets). Costs one extra small all_gather and one
        host sync per call; with validate=False a bad input on one rank may hang or fail the
        collective on the others, and an out-of-range target gives a NaN loss.

    Collectives: forward 1 all_gather of (2 + [smoothing] + 2*[decoding]) * rows floats per
    rank, plus 1 header all_gather when validate (which also yields the default class_start),
    or, without validate, 1 sizes all_gather when class_start is None; backward none.
    Returns a Tensor in local_logits' dtype (shape target.shape for reduction='none'), or
    CrossEntropyOutput(loss, pred, confidence, correct) with return_decoding.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    problems = _local_problems(local_logits, target, weight, class_start, num_classes,
                               ignore_index, reduction, label_smoothing, lse_square_scale)
    if problems and not validate:
        _fail(ValueError, problems[0])
    if validate:
        dev = _comm_device(local_logits, group)
        h = _header(problems, local_logits, target, weight, class_start, num_classes,
                    ignore_index, reduction, label_smoothing, lse_square_scale,
                    return_decoding, dev)
        hs = _gather_rows(h, group, world).tolist()  # the one host sync of validation
        class_start, num_classes = _check_headers(hs, rank, problems, group)
    elif class_start is None:
        class_start, total = shard_layout(local_logits.shape[-1], group)
        if num_classes is not None and num_classes != total:
            _fail(ValueError, f"the local shard sizes add up to {total}, not "
                  f"num_classes={num_classes}")

    cls = local_logits.shape[-1]
    batch = local_logits.shape[:-1]
    x2 = local_logits.reshape(-1, cls)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    t = target.reshape(-1).to(torch.int64)
    loss_rows, pred, conf = _VocabParallelCE.apply(
        x2, t, weight, int(class_start), float(label_smoothing), float(lse_square_scale),
        int(ignore_index), bool(return_decoding), backend, group)

    if reduction == "none":
        loss = loss_rows.reshape(batch)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        valid = t != ignore_index
        if weight is None:
            denom = valid.sum(dtype=loss_rows.dtype)
        else:
            w_t = weight.to(loss_rows.dtype)[t.clamp(0, weight.numel() - 1)]
            denom = (w_t * valid).sum()
        loss = loss_rows.sum() / denom
    loss = loss.to(local_logits.dtype)
    if not return_decoding:
        return loss
    pred = pred.reshape(batch)
    conf = conf.reshape(batch)
    correct = (pred == target) & (target != ignore_index)
    return CrossEntropyOutput(loss, pred, conf, correct)


class VocabParallelCrossEntropyLoss(torch.nn.Module):
    """nn.Module form of cross_entropy: holds the options and, when class_start is not given,
    computes the shard layout once (one all_gather on the first call) and keeps it, so each
    later forward with validate=False is a single all_gather."""

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, group=None,
                 class_start: int | None = None, num_classes: int | None = None,
                 lse_square_scale: float = 0.0, backend: str = "auto",
                 return_decoding: bool = False, validate: bool = True):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.group = group
        self.class_start = class_start
        self.num_classes = num_classes
        self.lse_square_scale = lse_square_scale
        self.backend = backend
        self.return_decoding = return_decoding
        self.validate = validate

    def forward(self, local_logits: Tensor, target: Tensor):
        if self.class_start is None:
            self.class_start, total = shard_layout(local_logits.shape[-1], self.group)
            if self.num_classes is None:
                self.num_classes = total
        return cross_entropy(
            local_logits, target, group=self.group, class_start=self.class_start,
            num_classes=self.num_classes, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale, backend=self.backend,
            return_decoding=self.return_decoding, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, class_start={self.class_start}, "
                f"num_classes={self.num_classes}, lse_square_scale={self.lse_square_scale}, "
                f"backend={self.backend!r}")
