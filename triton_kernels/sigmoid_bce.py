"""Sigmoid binary cross-entropy with logits in Triton: forward (+ gradient, labels, probs,
confusion counts, threshold histogram), backward, decoding. Semantics: docs/OPS.md
`sigmoid_bce_fwd`, `sigmoid_bce_bwd`, `sigmoid_decode`.

Math, elementwise with x the logit, y the target, p = pos_weight (1 if absent), w = weight:
    loss = w ((1 - y) x + (1 + (p - 1) y) softplus(-x)),
    softplus(-x) = max(-x, 0) + log1p(exp(-|x|))            (no overflow for |x| up to 1e4)
computed cancellation-free as
    loss = w ((1 - y) max(x, 0) - p y min(x, 0) + (1 + (p - 1) y) log1p(exp(-|x|)))
(for x << 0, y = 0 the first form computes x + (-x + log1p(e^x)), losing about half an ulp of
|x| on a loss of about e^x), and
    d loss / dx = w ((p y + 1 - y) sigmoid(x) - p y)
because d softplus(-x)/dx = -(1 - sigmoid(x)), so
    d/dx = w ((1 - y) - (1 + (p - 1) y)(1 - sigmoid(x))) = w ((p y + 1 - y) sigmoid(x) - p y).
sigmoid(x) is computed from e = exp(-|x|) as 1/(1+e) or e/(1+e), never exp(+large).

Layout: a 2-D grid of (BLOCK_C column tile, row group) programs; each walks its row group in
(BLOCK_R, BLOCK_C) tiles, so per-class state (thresholds, TP/FP/FN counts) stays in registers
for the whole group and a wide row (256k classes) is still spread over C / BLOCK_C programs.
Row sums (reduce_rows) are written per column tile as (tiles, R) partials (fp64 for fp64
logits) that the launcher sums in a fixed order: deterministic, no float atomics. Confusion
counts are added with one integer atomic per class per program (deterministic).

Threshold histogram (HIST): bce_histogram.py.

Targets: the logits' float dtype or the accumulation dtype (autocast: fp32 targets with bf16
logits; the elementwise loss is then stored in the accumulation dtype, promote(logits, target)),
or bool / uint8 read as bytes (a bool tensor is viewed as uint8: no conversion copy). weight,
pos_weight and the backward's grad_loss are read through their own (row, column) strides, so
broadcast (stride-0) views cost no copy; weight and pos_weight are read in the accumulation
dtype (another float dtype is converted by the launcher on its compact, un-broadcast part).

Compile-time switches (one compiled specialisation each, all compiled by
scripts/triton_aot_check.py): TARGET (0 none / 1 float / 2 bytes: pointer types), LOSS (0 none
/ 1 elementwise / 2 row sums), GRAD, COLS_CONTIG (all operands have column stride 1), ACC,
HIST (threshold histogram; without it the kernel has no histogram code).
Runtime switches (uniform branches): weight, pos_weight, grad scale (none / scalar /
elementwise), labels, probs, counts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    BCE_ROW_TILES_PER_PROGRAM,
    BCE_TILE,
    BCE_WARPS,
    LOGITS_DTYPES,
    MAX_GRID_Y,
    acc_dtype,
    acc_torch,
    bce_config,
    dummy,
    interpreting,
    log1p_small,
    on_device,
    signature,
)
from .bce_histogram import histogram_add, histogram_scale

# Runtime switches and the operand column strides are never specialised by value (Triton turns
# an int equal to 1 into a constant: one more compiled kernel per combination). Instead
# COLS_CONTIG says "every operand read has column stride 1" (the common case: contiguous target,
# a (C,) weight expanded over rows), which lets those loads vectorise; otherwise the column
# strides are used as given. Sizes and row strides are left to Triton's specialisation: their
# divisibility by 16 is what lets the masked loads vectorise (they are only used in address
# arithmetic and masks, where a constant 1 compiles too).
_NO_SPECIALIZE = ["has_w", "has_pw", "has_scale", "labels", "probs", "count",
                  "sy_c", "sw_c", "sp_c", "sg_c", "n_edges"]


@triton.jit
def _offsets(r2, c2, s_r, s_c, COLS_CONTIG: tl.constexpr):
    """Element offsets of a strided (R, C) operand: int64 rows times the row stride, plus the
    columns (int32 when contiguous; widened before multiplying by a column stride)."""
    if COLS_CONTIG:
        return r2 * s_r + c2
    return r2 * s_r + c2.to(tl.int64) * s_c


# Longer than the other functions (~95 lines) on purpose: one loop over the program's row tiles
# produces every output of a tile from operands loaded once, and the per-class TP/FP/FN
# counters it carries across tiles are loop state; split into helpers, the counters and the
# loaded operands would have to cross function boundaries as tuples each iteration.
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _sigmoid_bce_kernel(
    x_ptr, sx_r,                 # logits (R, C), columns contiguous (the launcher ensures it)
    y_ptr, sy_r, sy_c,           # target (TARGET != 0)
    w_ptr, sw_r, sw_c,           # weight (has_w)
    pw_ptr, sp_r, sp_c,          # pos_weight (has_pw)
    g_ptr, sg_r, sg_c,           # has_scale 1: 0-dim grad scale; 2: grad_loss (R, C) (backward)
    thr_ptr,                     # (C,) logit-space thresholds, ACC dtype (labels / count)
    loss_ptr,                    # LOSS 1: (R, C) contiguous; LOSS 2: (column tiles, R) partials
    grad_ptr,                    # (R, C) contiguous (GRAD)
    labels_ptr, probs_ptr,       # (R, C) uint8 / logits dtype, contiguous
    counts_ptr,                  # (3, C) int64, zero-initialised: TP, FP, FN
    edges_ptr, hist_ptr,         # (HIST) (B + 1,) float32 edges, (2, C, B + 2) int64 counts
    R, C, rows_per_prog, n_edges,
    has_w, has_pw, has_scale, labels, probs, count,
    TARGET: tl.constexpr, LOSS: tl.constexpr, GRAD: tl.constexpr, COLS_CONTIG: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HIST: tl.constexpr,
):
    # Program (j, i): column tile j (grid x, up to 2^31 - 1 tiles), rows [i * rows_per_prog,
    # ...) in BLOCK_R-row steps (grid y, at most 65535: CUDA's limit there; the launcher
    # grows rows_per_prog to stay under it). Tiles on y capped C at 65535 * BLOCK_C (33.5M).
    tile = tl.program_id(0)
    cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)  # int32: C < 2^31
    c_ok = cols < C
    c2 = cols[None, :]
    row0 = tl.program_id(1).to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, R)
    g = tl.full([], 1.0, ACC)
    if has_scale == 1:
        g = tl.load(g_ptr).to(ACC)
    thr = tl.zeros([BLOCK_C], ACC)
    if labels != 0:
        thr = tl.load(thr_ptr + cols, mask=c_ok, other=0.0).to(ACC)
    tp = tl.zeros([BLOCK_C], tl.int32)
    fp = tl.zeros([BLOCK_C], tl.int32)
    fn = tl.zeros([BLOCK_C], tl.int32)
    if HIST:
        h_e0, h_scale = histogram_scale(edges_ptr, n_edges, ACC)
    for r_start in range(row0, row_end, BLOCK_R):
        rows = r_start + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = rows < row_end
        r2 = rows[:, None]
        mask = row_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + r2 * sx_r + c2, mask=mask, other=0.0).to(ACC)
        out = r2 * C + c2  # contiguous (R, C) outputs
        e = tl.exp(-tl.abs(x))
        sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        if TARGET != 0:
            y = tl.load(y_ptr + _offsets(r2, c2, sy_r, sy_c, COLS_CONTIG), mask=mask,
                        other=0).to(ACC)
            w = tl.full([BLOCK_R, BLOCK_C], 1.0, ACC)
            if has_w != 0:
                w = tl.load(w_ptr + _offsets(r2, c2, sw_r, sw_c, COLS_CONTIG), mask=mask,
                            other=0.0).to(ACC)
            py = y
            if has_pw != 0:
                py = y * tl.load(pw_ptr + _offsets(r2, c2, sp_r, sp_c, COLS_CONTIG), mask=mask,
                                 other=0.0).to(ACC)
            if LOSS != 0:
                # an infinite coefficient of softplus(-x) > 0 gives its infinity (no inf * 0
                # where log1p(e) has rounded to 0); a NaN x stays NaN through e (on GPUs
                # tl.maximum drops NaN)
                coef = 1.0 + py - y
                soft = tl.where((tl.abs(coef) == float("inf")) & (e == e), coef,
                                coef * log1p_small(e))
                loss = w * ((1.0 - y) * tl.maximum(x, 0.0) - tl.where(x < 0.0, py * x, 0.0)
                            + soft)
                if LOSS == 1:
                    tl.store(loss_ptr + out, loss.to(loss_ptr.dtype.element_ty), mask=mask)
                else:
                    row_sum = tl.sum(tl.where(mask, loss, 0.0), axis=1)
                    tl.store(loss_ptr + tile.to(tl.int64) * R + rows,
                             row_sum.to(loss_ptr.dtype.element_ty), mask=row_ok)
            if GRAD:
                # sig - y without a pos_weight: (y + 1 - y) rounds below 1 for soft targets
                if has_pw != 0:
                    d = (py + 1.0 - y) * sig - py
                else:
                    d = sig - y
                dx = w * d * g
                if has_scale == 2:
                    dx = dx * tl.load(g_ptr + _offsets(r2, c2, sg_r, sg_c, COLS_CONTIG),
                                      mask=mask, other=0.0).to(ACC)
                tl.store(grad_ptr + out, dx.to(grad_ptr.dtype.element_ty), mask=mask)
            if HIST:
                histogram_add(x, y, mask, c2, C, edges_ptr, hist_ptr, n_edges, h_e0, h_scale)
        if probs != 0:
            tl.store(probs_ptr + out, sig.to(probs_ptr.dtype.element_ty), mask=mask)
        if labels != 0:
            lab = x > thr[None, :]  # strict: a logit exactly at the threshold is negative
            tl.store(labels_ptr + out, lab.to(tl.uint8), mask=mask)
            if TARGET != 0:
                if count != 0:
                    # 0/1 integers, so the sums are exact and order-independent
                    m01 = mask.to(tl.int32)
                    lab01 = lab.to(tl.int32) * m01
                    pos01 = (y > 0.5).to(tl.int32) * m01
                    tp += tl.sum(lab01 * pos01, axis=0)
                    fp += tl.sum(lab01 * (m01 - pos01), axis=0)
                    fn += tl.sum((m01 - lab01) * pos01, axis=0)
    if TARGET != 0:
        if count != 0:  # one integer atomic per column per program: deterministic
            tl.atomic_add(counts_ptr + cols, tp.to(tl.int64), mask=c_ok)
            tl.atomic_add(counts_ptr + C + cols, fp.to(tl.int64), mask=c_ok)
            tl.atomic_add(counts_ptr + 2 * C + cols, fn.to(tl.int64), mask=c_ok)


# --------------------------------------------------------------------------------------------
# Launchers (op signatures of csrc/ops.cpp; custom-op wrappers in python/fusedloss/_triton.py).


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


def _as_kernel_target(target):
    """bool -> uint8 view (free); float targets (the logits' or the accumulation dtype) and
    uint8 pass through."""
    if target.dtype == torch.bool:
        return target.view(torch.uint8), 2
    if target.dtype == torch.uint8:
        return target, 2
    return target, 1


def _to_acc(t, logits):
    """weight / pos_weight in the accumulation dtype, keeping broadcast (stride-0) dimensions:
    only the compact part of an expanded view is converted."""
    acc = acc_torch(logits.dtype)
    if t is None or t.dtype == acc:
        return t
    compact = t[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]
    return compact.to(acc).expand(t.shape)


def _constexprs(dtype, target_kind, loss_mode, grad, cols_contig, block_r, block_c, hist=False):
    """The compile-time switches of one launch; `specialisations()` enumerates the same."""
    return dict(TARGET=target_kind, LOSS=loss_mode, GRAD=bool(grad),
                COLS_CONTIG=bool(cols_contig), ACC=acc_dtype(dtype), BLOCK_R=block_r,
                BLOCK_C=block_c, HIST=bool(hist))


def _pointer_types(dtype, target_kind, loss_mode, scale_dtype, target_dtype=None):
    acc = acc_torch(dtype)
    y_type = (target_dtype or dtype) if target_kind == 1 else torch.uint8
    # elementwise loss: promote(logits, target) = the target's dtype for a float target
    loss_type = (y_type if target_kind == 1 else dtype) if loss_mode == 1 else acc
    return dict(x_ptr=dtype, y_ptr=y_type, w_ptr=acc, pw_ptr=acc, g_ptr=scale_dtype,
                thr_ptr=acc, loss_ptr=loss_type, grad_ptr=dtype, labels_ptr=torch.uint8,
                probs_ptr=dtype, counts_ptr=torch.int64, edges_ptr=torch.float32,
                hist_ptr=torch.int64)


def _launch(logits, target, weight, pos_weight, scale, threshold, loss, grad, labels, probs,
            counts, *, loss_mode, tile=None, hist=None):
    """One kernel launch; `hist`: (edges, counts) of the threshold histogram, or None."""
    rows, classes = logits.shape
    if rows == 0 or classes == 0:
        return None
    if classes > 1 and logits.stride(1) != 1:  # the kernel reads logits rows as contiguous
        logits = logits.contiguous()
    block_r, block_c, warps = bce_config()
    if tile is not None:
        block_r, block_c = tile
    rows_per_prog = block_r * max(2 if interpreting() else BCE_ROW_TILES_PER_PROGRAM,
                                  triton.cdiv(triton.cdiv(rows, block_r), MAX_GRID_Y))
    grid = (triton.cdiv(classes, block_c), triton.cdiv(rows, rows_per_prog))
    if loss_mode == 2:  # per-column-tile row sums, added up by the caller in a fixed order
        loss = torch.empty((grid[0], rows), dtype=acc_torch(logits.dtype), device=logits.device)
    kind = 0
    if target is not None:
        target, kind = _as_kernel_target(target)
    scale_dtype = scale.dtype if scale is not None else acc_torch(logits.dtype)
    dev = logits.device
    types = _pointer_types(logits.dtype, kind, loss_mode, scale_dtype,
                           target.dtype if kind == 1 else None)
    elementwise_scale = scale is not None and scale.dim() == 2
    operands = [t for t in (target, weight, pos_weight) if t is not None]
    cols_contig = all(t.stride(1) == 1 for t in operands + ([scale] if elementwise_scale else []))

    def ptr(t, name):  # absent arguments get a typed dummy: same specialisation either way
        return t if t is not None else dummy(dev, types[name])

    def strides(t):
        return (t.stride(0), t.stride(1)) if t is not None and t.dim() == 2 else (0, 0)

    edges, hist_counts = hist if hist is not None else (None, None)
    _sigmoid_bce_kernel[grid](
        logits, logits.stride(0),
        ptr(target, "y_ptr"), *strides(target),
        ptr(weight, "w_ptr"), *strides(weight),
        ptr(pos_weight, "pw_ptr"), *strides(pos_weight),
        ptr(scale, "g_ptr"), *strides(scale),
        ptr(threshold, "thr_ptr"),
        ptr(loss, "loss_ptr"),
        ptr(grad, "grad_ptr"),
        ptr(labels.view(torch.uint8) if labels is not None else None, "labels_ptr"),
        ptr(probs, "probs_ptr"),
        ptr(counts, "counts_ptr"),
        ptr(edges, "edges_ptr"), ptr(hist_counts, "hist_ptr"),
        rows, classes, rows_per_prog, 0 if edges is None else edges.shape[0],
        int(weight is not None), int(pos_weight is not None),
        0 if scale is None else (2 if elementwise_scale else 1),
        int(labels is not None), int(probs is not None), int(counts is not None),
        **_constexprs(logits.dtype, kind, loss_mode, grad is not None, cols_contig, block_r,
                      block_c, edges is not None),
        num_warps=warps,
    )
    return loss if loss_mode == 2 else None


def specialisations():
    """Every (kernel, signature, constexprs, num_warps) the launchers can launch on a GPU."""
    block_r, block_c = BCE_TILE
    for dtype in LOGITS_DTYPES:
        acc = acc_torch(dtype)
        both = sorted({dtype, acc}, key=str)  # float targets / grad_loss: logits' or acc dtype
        targets = [(1, y) for y in both] + [(2, None)]
        modes = [(kind, y, loss, grad, acc, hist) for kind, y in targets for loss in (1, 2)
                 for grad in (False, True) for hist in (False, True)]              # forward
        modes += [(kind, y, 0, True, g, False) for kind, y in targets for g in both]  # backward
        modes.append((0, None, 0, False, acc, False))                              # decode
        for kind, y, loss, grad, scale_dtype, hist in modes:
            for contiguous in (False, True):
                switches = _constexprs(dtype, kind, loss, grad, contiguous, block_r, block_c,
                                       hist)
                types = _pointer_types(dtype, kind, loss, scale_dtype, y)
                yield (_sigmoid_bce_kernel,
                       signature(_sigmoid_bce_kernel, types, {}, switches), switches, BCE_WARPS)


def _thresholds(threshold, logits):
    """(C,) thresholds of any float dtype and stride -> contiguous, accumulation dtype."""
    return None if threshold is None else threshold.to(acc_torch(logits.dtype)).contiguous()


def _like(logits, dtype=None):
    return torch.empty(logits.shape, dtype=dtype or logits.dtype, device=logits.device)


def sigmoid_bce_fwd(logits, target, weight, pos_weight, grad_scale, threshold, reduce_rows,
                    compute_grad, return_probs, count, hist_edges=None, hist_counts=None, *,
                    tile=None):
    rows, classes = logits.shape
    weight, pos_weight = _to_acc(weight, logits), _to_acc(pos_weight, logits)
    thr = _thresholds(threshold, logits)
    if reduce_rows:  # replaced by the kernel's row sums unless the batch is empty
        loss = torch.zeros(rows, dtype=acc_torch(logits.dtype), device=logits.device)
    else:  # promote(logits, target): the target's dtype for a float target
        loss = _like(logits, target.dtype if target.is_floating_point() else None)
    grad = _like(logits) if compute_grad else None
    labels = _like(logits, torch.bool) if thr is not None else None
    probs = _like(logits) if return_probs else None
    counts = torch.zeros((3, classes), dtype=torch.int64, device=logits.device) if count else None
    scale = None if grad_scale is None else grad_scale.to(acc_torch(logits.dtype))
    with on_device(logits):
        partial = _launch(logits, target, weight, pos_weight, scale, thr, loss, grad, labels,
                          probs, counts, loss_mode=2 if reduce_rows else 1, tile=tile,
                          hist=None if hist_edges is None else (hist_edges, hist_counts))
    if partial is not None:
        loss = partial.sum(0) if partial.shape[0] > 1 else partial[0]
    return (loss,
            grad if grad is not None else _empty(logits),
            labels if labels is not None else _empty(logits, torch.bool),
            probs if probs is not None else _empty(logits),
            counts if counts is not None else _empty(logits, torch.int64))


def sigmoid_bce_bwd(grad_loss, logits, target, weight, pos_weight, *, tile=None):
    weight, pos_weight = _to_acc(weight, logits), _to_acc(pos_weight, logits)
    # grad_loss is read with its own strides; a dtype other than the logits' or the
    # accumulation dtype is converted to the latter (autograd passes the loss's dtype).
    if grad_loss.dtype != logits.dtype:
        grad_loss = _to_acc(grad_loss, logits)
    grad = _like(logits)
    with on_device(logits):
        _launch(logits, target, weight, pos_weight, grad_loss, None, None, grad, None, None,
                None, loss_mode=0, tile=tile)
    return grad


def sigmoid_decode(logits, threshold, return_probs, *, tile=None):
    thr = _thresholds(threshold, logits)
    labels = _like(logits, torch.bool)
    probs = _like(logits) if return_probs else None
    with on_device(logits):
        _launch(logits, None, None, None, None, thr, None, None, labels, probs, None,
                loss_mode=0, tile=tile)
    return labels, probs if probs is not None else _empty(logits)
