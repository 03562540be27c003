"""The autograd Function of vocabulary-parallel cross-entropy: per-shard statistics from the
backend op, ONE all_gather, the combined per-row loss and decodings; a local backward.

Math (z = logits of the whole row, C = num_classes, w = class weight, W = sum_c w_c,
eps = label_smoothing, s = lse_square_scale). Rank q computes on its slice, with the backend
op `softmax_ce_fwd` (one read of its logits, decoding on):
    (m_q, j_q) = max and first argmax of the slice
    l_q   = log sum_{c in q} exp(z_c - m_q) = lse_q - m_q, in [0, log C_q]
    A_q   = sum_{c in q} w_c (lse_q - z_c)                   (only when eps > 0; >= 0)
    z_t   = the target logit, where q owns the target
l_q comes from the op's confidence, exp(m_q - lse_q) = 1 / sum_c exp(z_c - m_q), which the
kernels form without the absolute lse: in fp32, lse_q itself is rounded to ulp(|lse_q|), which
at logits ~1e4 was an error of 4e-4 in the loss (torch: 4e-9). The maximum and the log-sum
travel apart, and every difference below is of numbers of like size.
Every rank gathers these small (rows,) statistics of every rank (one all_gather of one packed
buffer) and combines them itself, identically:
    M     = max_q m_q,  L = logsumexp_q ((m_q - M) + l_q),  lse = M + L
    lse - lse_q = (M - m_q) + (L - l_q)
    sum_c w_c (lse - z_c) = sum_q [A_q + W_q (lse - lse_q)]   (a sum of non-negative terms)
    loss  = (1-eps) w_t ((M - z_t) + L) + (eps/C) sum_c w_c (lse - z_c) + s lse^2 (0 if ignored)
    pred  = class_start[q*] + j_q*, q* = the first rank in class order with the largest m_q
            (torch.argmax's rule: lowest global index among equal maxima, first NaN wins)
    confidence = exp(-L)
The gradient on rank q's slice needs nothing from the other ranks once M and L are known:
    dloss/dz_c = p_c ((1-eps) w_t + (eps/C) W + 2 s lse) - (1-eps) w_t [c == t] - (eps/C) w_c,
    p_c = exp((z_c - M) - L) = softmax_q(z)_c exp((m_q - M) + (l_q - L)),
so the backward runs no collective. It is computed with torch ops: the op `softmax_ce_bwd`
cannot be reused, because for a row whose target lives on another rank it must give
`p_c * coef` without a one-hot term, and the op either zeroes such a row (ignored target) or
adds a one-hot term (any valid target); docs/distributed.md proposes the op that would make it
one pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _backend
from .. import reference as ref
from .._reduction import target_weight
from . import _collectives


class _Local(NamedTuple):
    """This rank's statistics, (rows,) each, in the accumulation dtype."""
    logsum: Tensor            # l_q = lse_q - m_q
    smooth: Tensor | None     # A_q, only with label smoothing
    max: Tensor               # m_q
    pred: Tensor | None       # j_q (int64), only when decoding
    target_logit: Tensor      # z_t where this rank owns the target, else 0


class _Gathered(NamedTuple):
    """Every rank's statistics after the all_gather."""
    stats: Tensor     # (world, k, rows): l_q, z_t, [A_q], m_q, [j_q bits]
    starts: Tensor    # (world,) int64 class_start of each rank
    sizes: Tensor     # (world,) int64 classes of each rank
    i_max: int        # the slot of m_q (j_q follows it when decoding)


class _Targets(NamedTuple):
    valid: Tensor     # target != ignore_index
    owner: Tensor     # valid and in this rank's classes
    local: Tensor     # target - class_start where owned, else 0


def _local_stats(x2: Tensor, w_local: Tensor | None, eps: float,
                 backend: str) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(l_q, A_q or None, m_q, argmax) of this rank's slice, in the accumulation dtype."""
    rows, cls = x2.shape
    cdt = ref.compute_dtype(x2.dtype)
    smooth = eps > 0
    # A valid dummy target with label_smoothing=1 makes the op's row loss exactly
    # (1/C_q) sum_c w_c (lse_q - z_c); without smoothing every row is "ignored" and the op
    # only returns lse (and the decoding).
    tgt = torch.full((rows,), 0 if smooth else -1, dtype=torch.int64, device=x2.device)
    # The op returns loss/lse in the accumulation dtype (fp64 for fp64 logits, docs/OPS.md).
    ops = _backend.get(backend, x2.device).ops
    loss, lse, _, pred, conf = ops.softmax_ce_fwd(
        x2, tgt, w_local, None, -1, 1.0 if smooth else 0.0, 0.0, 0.0, False, True)
    a_q = loss.to(cdt) * cls if smooth else None
    if cls == 0:  # no classes here: contributes exp(-inf)
        return (torch.zeros(rows, dtype=cdt, device=x2.device), a_q,
                torch.full((rows,), -math.inf, dtype=cdt, device=x2.device), pred)
    m_q = x2.gather(1, pred.unsqueeze(1)).squeeze(1).to(cdt)
    # fp64: lse_q is fp64, so lse_q - m_q is precise; below, the fp32 confidence 1 / sum
    # gives l_q to fp32 precision (lse_q - m_q would carry ulp(|lse_q|))
    l_q = lse.to(cdt) - m_q if cdt == torch.float64 else -torch.log(conf.to(cdt))
    # an infinite maximum (all -inf, or a +inf logit): l_q = 0, so that lse_q = m_q
    l_q = torch.where(torch.isinf(m_q), 0.0, l_q)
    return l_q, a_q, m_q, pred


def _local_weight(weight: Tensor | None, start: int, cls: int) -> Tensor | None:
    if weight is None:
        return None
    w_local = weight[start:start + cls]
    if w_local.numel() != cls:
        raise ValueError(f"weight has {weight.numel()} entries but this rank's classes "
                         f"end at {start + cls}; pass the full (num_classes,) weight")
    return w_local


def _targets(t: Tensor, ignore_index: int, start: int, cls: int) -> _Targets:
    valid = t != ignore_index
    owner = valid & (t >= start) & (t < start + cls)
    return _Targets(valid, owner, torch.where(owner, t - start, 0))


def _index_dtype(cdt: torch.dtype) -> torch.dtype:
    """Integers travel in the float buffer as bit patterns of the same width (exact)."""
    return torch.int32 if cdt == torch.float32 else torch.int64


def _exchange(x2: Tensor, local: _Local, start: int, group) -> _Gathered:
    """One all_gather of one packed buffer: [l_q | z_t | A_q | m_q | j_q] x rows, then
    (start, size) as int64 bits."""
    rows, cls = x2.shape
    cdt = local.logsum.dtype
    parts = [local.logsum, local.target_logit]
    if local.smooth is not None:
        parts.append(local.smooth)
    i_max = len(parts)
    parts.append(local.max)
    if local.pred is not None:
        parts.append(local.pred.to(_index_dtype(cdt)).view(cdt))
    tail = torch.tensor([start, cls], dtype=torch.int64, device=x2.device).view(cdt)
    buf = torch.cat([torch.stack(parts).reshape(-1), tail]) if rows else tail
    k = len(parts)
    world = dist.get_world_size(group)
    g = _collectives.gather_rows(buf, group, world)
    stats = g[:, :k * rows].reshape(world, k, rows)
    # (world, 2) int64 start, size; the copy gives the int64 view an aligned offset
    layout = g[:, k * rows:].reshape(-1).clone().view(torch.int64).view(world, 2)
    return _Gathered(stats, layout[:, 0], layout[:, 1], i_max)


def _smoothing(g: _Gathered, weight: Tensor | None, up: Tensor, num_classes: Tensor,
               cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """(sum_c w_c (lse - z_c) per row, W) from the shards' A_q."""
    if weight is None:
        w_q, w_sum = g.sizes.to(cdt), num_classes.to(cdt)
    else:
        cw = torch.cat([weight.new_zeros(1, dtype=torch.float64),
                        weight.to(torch.float64).cumsum(0)])
        ends = (g.starts + g.sizes).clamp(max=weight.numel())
        w_q = (cw[ends] - cw[g.starts.clamp(max=weight.numel())]).to(cdt)
        w_sum = weight.to(cdt).sum()
    # up: (world, rows) lse - lse_q
    term = g.stats[:, 2] + w_q.unsqueeze(1) * up
    # a shard whose row is all -inf: each of its classes adds w_c (lse - (-inf)) = +inf (torch's
    # smoothed loss is +inf), not the NaN of its A_q and of -inf - -inf
    dead = torch.isneginf(g.stats[:, g.i_max])
    term = torch.where(dead, torch.where(w_q.unsqueeze(1) != 0, math.inf, 0.0).to(cdt), term)
    smooth = term.sum(0)
    return smooth, w_sum


class _Rows(NamedTuple):
    """The combined per-row loss and what the local backward needs."""
    loss: Tensor            # 0 on ignored rows
    lse: Tensor             # global, M + L
    top: Tensor             # M, the row's maximum over all ranks
    logsum: Tensor          # L = lse - M
    up: Tensor              # (world, rows) lse - lse_q = (M - m_q) + (L - l_q)
    coef_p: Tensor          # dloss/dz_c = p_c coef_p - onehot [c == t] - eps_c w_c
    onehot: Tensor          # (1-eps) w_t where this rank owns the target, else 0
    eps_c: Tensor | None    # eps / C on valid rows, only with smoothing


def _combine(g: _Gathered, tg: _Targets, t: Tensor, weight: Tensor | None, eps: float,
             s: float, cdt: torch.dtype) -> _Rows:
    l_q, m_q = g.stats[:, 0], g.stats[:, g.i_max]
    top = m_q.amax(0)
    # m_q - M, with 0 where they are equal (both -inf or +inf: no NaN from inf - inf)
    below = torch.where(m_q == top, 0.0, m_q - top)
    logsum = torch.logsumexp(below + l_q, dim=0)
    lse = top + logsum
    up = (logsum - l_q) - below
    zt = g.stats[:, 1].sum(0)  # exactly one rank contributes a non-zero (the owner)
    num_classes = g.sizes.sum()
    in_range = (t >= 0) & (t < num_classes)
    # Without validation a target outside [0, C) is not caught on the host: make it NaN.
    zt = torch.where(in_range | ~tg.valid, zt, math.nan)
    w_t = torch.where(tg.valid, target_weight(weight, t, cdt), 0)  # no inf * 0 (see there)
    loss = (1 - eps) * w_t * ((top - zt) + logsum)
    coef_p = (1 - eps) * w_t
    eps_c = eps / num_classes.to(cdt)
    if eps > 0:
        smooth, w_sum = _smoothing(g, weight, up, num_classes, cdt)
        loss = loss + eps_c * smooth
        coef_p = coef_p + eps_c * w_sum * tg.valid
    if s > 0:
        loss = loss + s * lse.square()
        coef_p = coef_p + 2 * s * lse * tg.valid
    # a +inf logit on any shard: the row's loss is NaN, as torch's log_softmax makes it
    loss = torch.where(torch.isposinf(lse), math.nan, loss)
    loss = torch.where(tg.valid, loss, 0.0)
    return _Rows(loss, lse, top, logsum, up, coef_p, (1 - eps) * w_t * tg.owner,
                 eps_c * tg.valid if eps > 0 else None)


def _decode(g: _Gathered, r: _Rows, rows: int) -> tuple[Tensor, Tensor]:
    """Global (pred, confidence): torch.argmax over the ranks sorted by class_start, so the
    lowest global index wins a tie."""
    i_max = g.i_max
    cdt = g.stats.dtype
    order = torch.argsort(g.starts)
    m_sorted = g.stats[:, i_max].index_select(0, order)
    win = order[torch.argmax(m_sorted, dim=0)]
    ar = torch.arange(rows, device=r.lse.device)
    j = g.stats[:, i_max + 1].contiguous().view(_index_dtype(cdt))[win, ar].to(torch.int64)
    pred = g.starts[win] + j
    m_win = g.stats[:, i_max][win, ar]
    conf = torch.exp(torch.where(m_win == r.top, 0.0, m_win - r.top) - r.logsum)
    # a +inf logit: NaN, as torch's softmax
    conf = torch.where(torch.isposinf(r.top), math.nan, conf).float()
    return pred, conf


# ----------------------------------------------------------------------------- backward
def _probs_softmax(x2: Tensor, up: Tensor, top: Tensor, logsum: Tensor,
                   scale: Tensor) -> Tensor:
    """scale * p, p = softmax_local(z) * exp(-up), up = lse - lse_q: torch's softmax kernel
    keeps each row in cache, so this is one read and one write of the slice plus the scaling
    pass (measured 51 ms against 79 ms for sub+exp+mul, 1024 x 32000 fp32, one thread, 2-core
    x86 CPU). Needs a host check for slices that are entirely -inf (softmax gives 0/0 there),
    which is free on the CPU."""
    grad = torch.softmax(x2, dim=1, dtype=up.dtype)
    grad.mul_((scale * torch.exp(-up)).unsqueeze(1))
    dead = torch.isposinf(up) | torch.isneginf(top)  # this slice (or the row) all -inf
    if bool(dead.any()):
        grad[dead] = 0.0
    return grad


def _probs_exp(x2: Tensor, up: Tensor, top: Tensor, logsum: Tensor,
              scale: Tensor) -> Tensor:
    """scale * p, p = exp((z - M) - L) directly: three passes, no host synchronisation."""
    grad = torch.sub(x2.to(top.dtype), top.unsqueeze(1))
    grad.sub_(logsum.unsqueeze(1))
    grad.exp_()
    grad.mul_(scale.unsqueeze(1))
    return grad


# How the backward computes the scaled probabilities, per device type; other devices (CUDA)
# use _probs_exp, which needs no host synchronisation.
PROBS_BY_DEVICE = {"cpu": _probs_softmax}


class VocabParallelCE(torch.autograd.Function):
    """Per-row loss (accumulation dtype) plus decodings; backward is local (no collective)."""

    @staticmethod
    def forward(ctx, x2, t, weight, start, eps, s, ignore_index, decode, backend, group):
        rows, cls = x2.shape
        cdt = ref.compute_dtype(x2.dtype)
        w_local = _local_weight(weight, start, cls)
        l_q, a_q, m_q, pred_q = _local_stats(x2, w_local, eps, backend)
        tg = _targets(t, ignore_index, start, cls)
        z_t = torch.where(tg.owner, x2.gather(1, tg.local.unsqueeze(1)).squeeze(1).to(cdt), 0.0)
        g = _exchange(x2, _Local(l_q, a_q, m_q, pred_q if decode else None, z_t), start, group)
        r = _combine(g, tg, t, weight, eps, s, cdt)
        if decode:
            pred, conf = _decode(g, r, rows)
        else:
            pred = torch.empty(0, dtype=torch.int64, device=x2.device)
            conf = torch.empty(0, dtype=torch.float32, device=x2.device)
        rank = dist.get_rank(group)
        ctx.save_for_backward(x2, r.up[rank], r.top, r.logsum, r.coef_p, tg.local, r.onehot,
                              r.eps_c, w_local, tg.valid)
        ctx.mark_non_differentiable(pred, conf)
        return r.loss, pred, conf

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_pred, _grad_conf):
        # dloss_r/dz_c = p_c coef_p[r] - onehot[r] [c == t_local[r]] - eps_c[r] w_c
        x2, up, top, logsum, coef_p, t_local, onehot, eps_c, w_local, valid = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 10
        cdt = top.dtype
        # ignored rows: exactly 0, also for an infinite incoming gradient ('mean' of a batch
        # with every row ignored divides by 0; inf * 0 made every row NaN, torch gives 0)
        g = torch.where(valid, grad_loss.to(cdt), 0.0)
        probs = PROBS_BY_DEVICE.get(x2.device.type, _probs_exp)
        grad = probs(x2, up, top, logsum, g * coef_p)
        if eps_c is not None:
            w = torch.ones(x2.shape[1], dtype=cdt, device=x2.device) if w_local is None \
                else w_local.to(cdt)
            grad.addr_(g * eps_c, w, alpha=-1)
        grad.scatter_add_(1, t_local.unsqueeze(1), (-(g * onehot)).unsqueeze(1))
        # a +inf logit on any shard: the row's gradient is NaN on every rank, as torch's (here
        # the shards without it had finite, wrong values); ignored rows keep their 0
        inf_rows = torch.isposinf(top) & (coef_p != 0)
        grad.masked_fill_(inf_rows.unsqueeze(1), math.nan)
        return (grad.to(x2.dtype),) + (None,) * 9
