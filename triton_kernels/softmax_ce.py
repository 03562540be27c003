"""Softmax cross-entropy in Triton: forward (+ gradient, + decoding), backward, decoding.

Semantics are docs/OPS.md's `softmax_ce_fwd`, `softmax_ce_fwd_inplace`, `softmax_ce_bwd` and
`softmax_decode`; the math is derived below, once.

Layout: one program per row, looping over the row in blocks of BLOCK columns, so any vocabulary
(256k classes and beyond) works with a bounded register tile. Pass 1 keeps an online
(max, sum-of-exp) pair plus the sums the loss needs; pass 2 (only when a gradient is wanted)
reads the row again and writes the gradient. Accumulation is fp32 (fp64 for fp64 logits); the
row offset is computed in int64 (program id cast before multiplying by the stride).

Math, per row with z = cap * tanh(x / cap) when soft-capping else z = x, and
lse_square_scale the z-loss coefficient:
    lse = m + log(s),  m = max_c z,  s = sum_c exp(z_c - m),  p_c = exp(z_c - m) * (1 / s)
(p is never exp(z_c - lse): lse rounded to fp32 is only good to ~1e-3 absolute at |z| ~ 1e4).
Loss sums are kept relative to the running reference r (the max so far), which avoids the
cancellation of W * lse - sum_c w_c z_c for large logits:
    A = sum_c v_c (z_c - r),  V = sum_c v_c   =>  sum_c v_c (lse - z_c) = V log(s) - A
(when r moves to r', A -= (r' - r) V), with v_c = w_c for the smoothing term of class-index
targets and v_c = w_c y'_c (y' = (1-eps) y + eps/C) for probability targets. So
    index:  loss = (1-eps) w_t (lse - z_t) + (eps/C) (W log s - A) + lse_square_scale lse^2
    probs:  loss = S log s - A + lse_square_scale lse^2,  S = sum_c w_c y'_c
and the gradient of the loss w.r.t. z (d lse / d z_c = p_c), with k = 2 lse_square_scale lse:
    index:  dz_c = p_c ((1-eps) w_t + (eps/C) W + k) - (1-eps) w_t [c == t] - (eps/C) w_c
    probs:  dz_c = p_c (S + k) - w_c y'_c
    softcap: dx_c = dz_c * dz/dx = dz_c sech(x_c / cap)^2 (= 1 - (z_c / cap)^2, no cancellation)
times g (grad_scale, or the per-row incoming gradient in backward). Ignored rows: loss 0,
gradient exactly 0 (a `where`, not a product, so an infinite g cannot make NaN). A row holding
+inf (softcap off) has a NaN loss, gradient and confidence, as torch's log_softmax gives.

Traffic: forward + gradient reads the logits twice and writes the gradient once (3x the logits'
bytes; the floor is 2x). The second read is an L2 hit while the rows in flight fit in L2
(~50 MB on H100, against up to 132 SMs x 6 resident programs x row bytes: rows up to ~64 KiB,
32k bf16 classes); for LLM vocabularies it comes from HBM. Keeping a whole 256k-class row on
chip needs a row split across a thread-block cluster (not done; see the launch table in
_common.py).
Forward without gradient and decoding read the logits once. The backward (reduction='none')
is the forward kernel with the gradient on and a per-row scale: pass 1 is recomputed by the same
code, so its gradient is bitwise the forward's fused one for equal scales.

Out-of-range class index t (not ignore_index, outside [0, C)): the kernel never dereferences
it; it writes loss = NaN and a NaN gradient row, because raising would need a host sync.
The launchers additionally raise IndexError("Target <v> is out of bounds.") when the
tensors are on the CPU (interpreter), where checking costs no device sync.

Compile-time switches (each value is one compiled specialisation; all are compiled ahead of
time by scripts/triton_aot_check.py): TARGET (0 none / 1 class index / 2 probabilities: they
are different pointer types; probabilities in the logits' or the accumulation dtype),
HAS_WEIGHT and SOFTCAP (change per-element work), GRAD (write the gradient), ACC (fp32 / fp64).
Scalars that only change per-row arithmetic or a uniform branch are runtime arguments and do
not multiply the specialisations: label smoothing, z-loss, decoding and the grad-scale pointer.
The class weight is passed contiguous in the accumulation dtype (C values, converted by the
launcher), so any weight dtype or stride (an expanded or sliced view) is read correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOGITS_DTYPES,
    acc_dtype,
    acc_torch,
    dummy,
    on_device,
    sech2,
    signature,
    softmax_config,
    softmax_configs,
    split_f64,
    tanh,
)

# Runtime switches are never specialised (Triton turns an int equal to 1 into a constant: one
# more compiled variant per switch). C and the strides are: their divisibility by 16 is what
# lets the masked row loads vectorise; the kernel is written so that a constant C = 1 or
# stride = 1 also compiles.
_NO_SPECIALIZE = ["ignore_index", "smooth", "need_v", "decode", "has_scale", "scale_stride"]
_INF = tl.constexpr(float("inf"))
_NAN = tl.constexpr(float("nan"))
_BIG = tl.constexpr(2147483647)  # "no index yet" for argmin-style reductions (C < 2^31)


@triton.jit
def _capped(x, cap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        return cap * tanh(x / cap)
    return x


@triton.jit
def _row_target(t_ptr, t_stride, row, C, ignore_index, TARGET: tl.constexpr):
    """(t, ignored, bad) of a class-index row; t is a safe index (0) when ignored or bad."""
    t = 0
    ignored = False
    bad = False
    if TARGET == 1:
        t = tl.load(t_ptr + row * t_stride)
        ignored = t == ignore_index
        bad = (t != ignore_index) & ((t < 0) | (t >= C))
        t = tl.where(ignored | bad, 0, t)  # never dereference an invalid target
    return t, ignored, bad


@triton.jit
def _row_stats(x_row, y_row, w_ptr, C, eps, inv_c, cap, need_v, decode,
               TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
               ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 over a row: (m, s, A, V, best, pred) with m the max of the non-NaN z,
    s = sum exp(z - r) (r = m when finite, else 0), A = sum v (z - r), V = sum v (need_v),
    best the largest non-NaN z and pred the argmax (the first NaN if any) when decoding."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([], -_INF, ACC)
    s = tl.zeros([], ACC)
    a = tl.zeros([], ACC)
    v_sum = tl.zeros([], ACC)
    best = tl.full([], -_INF, ACC)
    best_idx = tl.zeros([], tl.int32)
    nan_idx = tl.full([], _BIG, tl.int32)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
        z = tl.where(mask, _capped(x, cap, SOFTCAP), -_INF)
        is_nan = z != z
        z_num = tl.where(is_nan, -_INF, z)
        b_max = tl.max(z_num, axis=0)
        if decode != 0:
            nan_idx = tl.minimum(nan_idx, tl.min(tl.where(is_nan, cols, _BIG), axis=0))
            b_idx = tl.min(tl.where(z_num == b_max, cols, _BIG), axis=0)
            take = b_max > best  # strict: an earlier block wins a tie
            best_idx = tl.where(take, b_idx, best_idx)
            best = tl.where(take, b_max, best)
        m_new = tl.maximum(m, b_max)
        r_old = tl.where(tl.abs(m) < _INF, m, 0.0)
        r_new = tl.where(tl.abs(m_new) < _INF, m_new, 0.0)
        alpha = tl.exp(tl.where(m == -_INF, -_INF, r_old - r_new))  # 0 before any finite z
        s = s * alpha + tl.sum(tl.exp(z - r_new), axis=0)
        m = m_new
        if need_v != 0:  # probability targets, or label smoothing
            if HAS_WEIGHT:
                v = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
            else:
                v = tl.where(mask, 1.0, 0.0).to(ACC)
            if TARGET == 2:
                y = tl.load(y_row + cols, mask=mask, other=0.0).to(ACC)
                v = tl.where(mask, v * (y * (1.0 - eps) + eps * inv_c), 0.0)
            a = a - (r_new - r_old) * v_sum + tl.sum(v * tl.where(mask, z - r_new, 0.0), axis=0)
            v_sum += tl.sum(v, axis=0)
    pred = tl.where(nan_idx < _BIG, nan_idx, best_idx)
    return m, s, a, v_sum, best, pred


@triton.jit
def _row_grad(x_row, y_row, w_ptr, g_row, C, t, w_t, eps, inv_c, cap, r, p_mul, g, smooth,
              zero_row, TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: g * dx_c for the row, with p_c * coef = exp(z_c - r) * p_mul; exactly 0 for a
    `zero_row` (ignored: a `where`, not a product, so an infinite g cannot make NaN)."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
        z = _capped(x, cap, SOFTCAP)
        # masked lanes: exp(0), never stored (exp(0 - r) could overflow)
        dz = tl.exp(tl.where(mask, z - r, 0.0)) * p_mul
        if TARGET == 1:
            dz -= tl.where(cols == t, (1.0 - eps) * w_t, 0.0)
            if smooth != 0:
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
                    dz -= eps * inv_c * w
                else:
                    dz -= eps * inv_c
        else:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
            else:
                w = tl.full([BLOCK], 1.0, ACC)
            y = tl.load(y_row + cols, mask=mask, other=0.0).to(ACC)
            dz -= w * (y * (1.0 - eps) + eps * inv_c)
        if SOFTCAP:
            dz = dz * sech2(x / cap)
        out = tl.where(zero_row, 0.0, g * dz)
        tl.store(g_row + cols, out.to(g_row.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _softmax_ce_kernel(
    x_ptr, x_stride,            # logits (R, C), row stride (columns contiguous)
    t_ptr, t_stride,            # target: (R,) int64 or (R, C) probabilities; its row stride
    w_ptr,                      # class weight (C,) contiguous, ACC dtype (HAS_WEIGHT)
    scale_ptr, scale_stride,    # grad scale: 0-dim (stride 0) or per row (backward), ACC dtype
    lse_ptr, loss_ptr,          # (R,) ACC dtype
    grad_ptr, grad_stride,      # (R, C) gradient, may alias x_ptr (in-place) (GRAD)
    pred_ptr, conf_ptr,         # (R,) int64 / fp32 (decode)
    C, ignore_index,
    eps_hi, eps_lo, cap_hi, cap_lo,  # fp64 scalars as fp32 pairs (split_f64)
    lse_square_scale_hi, lse_square_scale_lo,
    smooth, need_v, decode, has_scale,  # runtime 0/1 switches
    TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    y_row = t_ptr + row * t_stride  # the probability row (TARGET == 2)
    inv_c = 1.0 / (tl.zeros([], ACC) + C)
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    lse_square_scale = (tl.zeros([], ACC) + lse_square_scale_hi) + lse_square_scale_lo
    cap = (tl.zeros([], ACC) + cap_hi) + cap_lo
    t, ignored, bad = _row_target(t_ptr, t_stride, row, C, ignore_index, TARGET)
    m, s, a, v_sum, best, pred = _row_stats(x_row, y_row, w_ptr, C, eps, inv_c, cap, need_v,
                                            decode, TARGET, HAS_WEIGHT, SOFTCAP, ACC, BLOCK)
    w_t = 1.0
    if TARGET == 1:
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + t).to(ACC)
    pos_inf = m == _INF  # a +inf logit: loss, gradient and confidence NaN (torch's log_softmax)
    r = tl.where(tl.abs(m) < _INF, m, 0.0)
    log_s = tl.log(s)
    lse = r + log_s
    tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))
    if TARGET == 1:
        z_t = _capped(tl.load(x_row + t).to(ACC), cap, SOFTCAP)
        loss = (1.0 - eps) * w_t * ((r - z_t) + log_s)  # = lse - z_t, without rounding lse
        if smooth != 0:
            # an infinite W gives its infinity (torch's sum of w_c * -log p_c), not inf - inf
            loss += eps * inv_c * tl.where(tl.abs(v_sum) == _INF, v_sum, v_sum * log_s - a)
        coef = (1.0 - eps) * w_t + 2.0 * lse_square_scale * lse
        if smooth != 0:
            coef += eps * inv_c * v_sum
    else:
        loss = v_sum * log_s - a
        coef = v_sum + 2.0 * lse_square_scale * lse
    if lse_square_scale != 0.0:
        loss += lse_square_scale * lse * lse
    if TARGET != 0:
        loss = tl.where(pos_inf | bad, _NAN, loss)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss).to(loss_ptr.dtype.element_ty))
    if decode != 0:
        tl.store(pred_ptr + row, pred.to(tl.int64))
        tl.store(conf_ptr + row, tl.where(pos_inf, _NAN, tl.exp(best - r) / s).to(tl.float32))
    if GRAD:
        # p_c = exp(z_c - r) * (1 / s): z - r is exact near the max, where exp(z - lse) would
        # carry lse's rounding (an ulp of |lse| ~ 1e-3 at |logits| ~ 1e4 in fp32).
        g = tl.full([], 1.0, ACC)
        if has_scale != 0:
            g = tl.load(scale_ptr + row * scale_stride).to(ACC)
        g = tl.where(pos_inf | bad, _NAN, g)
        _row_grad(x_row, y_row, w_ptr, grad_ptr + row * grad_stride, C, t, w_t, eps, inv_c, cap,
                  r, (1.0 / s) * coef, g, smooth, ignored, TARGET, HAS_WEIGHT, SOFTCAP, ACC,
                  BLOCK)


# --------------------------------------------------------------------------------------------
# Launchers (the op signatures of csrc/ops.cpp; the custom-op wrappers live in
# python/fusedloss/_triton.py).


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


def _check_targets_on_cpu(target, ignore_index: int, num_classes: int) -> None:
    """The interpreter runs on CPU tensors, where a range check needs no device sync."""
    if target.device.type != "cpu" or target.dim() != 1 or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def _constexprs(dtype, target_kind, has_weight, softcap, grad, block):
    """The compile-time switches of one launch; `specialisations()` enumerates the same."""
    return dict(TARGET=target_kind, HAS_WEIGHT=bool(has_weight), SOFTCAP=bool(softcap),
                GRAD=bool(grad), ACC=acc_dtype(dtype), BLOCK=block)


def _pointer_types(dtype, target_kind, target_dtype=None):
    acc = acc_torch(dtype)
    t_type = (target_dtype or dtype) if target_kind == 2 else torch.int64
    return dict(x_ptr=dtype, t_ptr=t_type, w_ptr=acc, scale_ptr=acc, lse_ptr=acc, loss_ptr=acc,
                grad_ptr=dtype, pred_ptr=torch.int64, conf_ptr=torch.float32)


_SCALARS = dict(x_stride="i32", t_stride="i32", scale_stride="i32", grad_stride="i32",
                **{f"{n}_{p}": "fp32" for n in ("eps", "cap", "lse_square_scale")
                   for p in ("hi", "lo")})


def _launch(logits, target, weight, scale, scale_stride, lse, loss, grad, pred, conf,
            ignore_index, label_smoothing, lse_square_scale, softcap, decode, *,
            target_kind, block=None):
    rows, classes = logits.shape
    if rows == 0:
        return
    if classes == 0:  # nothing to read: lse = -inf, loss 0 (empty sums), no gradient entries
        lse.fill_(float("-inf"))
        if loss is not None:
            loss.zero_()
        if decode:
            pred.zero_()
            conf.zero_()
        return
    blk, warps = softmax_config(classes, logits.element_size())
    if block is not None:
        blk = block
    # The kernel runs one program per row (the launcher passes the grid as a C int) and
    # indexes classes in int32 (its column loop counts to C + BLOCK): refuse beyond both.
    if rows > 2**31 - 1 or classes > 2**31 - 1 - blk:
        raise ValueError(f"the triton softmax cross-entropy takes fewer than 2^31 rows and "
                         f"2^31 - {blk + 1} classes, got logits of shape "
                         f"{tuple(logits.shape)}; use backend='native'")
    dev = logits.device
    types = _pointer_types(logits.dtype, target_kind,
                           target.dtype if target_kind == 2 else None)

    def ptr(t, name):  # absent arguments get a typed dummy: same specialisation either way
        return t if t is not None else dummy(dev, types[name])

    with on_device(logits):
        _softmax_ce_kernel[(rows,)](
            logits, logits.stride(0),
            ptr(target, "t_ptr"), target.stride(0) if target is not None else 0,
            ptr(weight, "w_ptr"),
            ptr(scale, "scale_ptr"), scale_stride,
            lse, ptr(loss, "loss_ptr"),
            ptr(grad, "grad_ptr"), grad.stride(0) if grad is not None else 0,
            ptr(pred if decode else None, "pred_ptr"), ptr(conf if decode else None, "conf_ptr"),
            classes, int(ignore_index), *split_f64(label_smoothing),
            *split_f64(softcap if softcap > 0 else 1.0), *split_f64(lse_square_scale),
            int(label_smoothing > 0), int(target_kind == 2 or label_smoothing > 0),
            int(bool(decode)), int(scale is not None),
            **_constexprs(logits.dtype, target_kind, weight is not None, softcap > 0,
                          grad is not None, blk),
            num_warps=warps,
        )


def specialisations():
    """Every (kernel, signature, constexprs, num_warps) the launchers can launch on a GPU."""
    for dtype in LOGITS_DTYPES:
        # probability targets in the logits' dtype or the accumulation dtype
        target_dtypes = sorted({dtype, acc_torch(dtype)}, key=str)
        for block, warps in softmax_configs(torch.empty(0, dtype=dtype).element_size()):
            modes = [(kind, grad, y) for kind in (1, 2) for grad in (False, True)
                     for y in (target_dtypes if kind == 2 else (None,))]
            modes.append((0, False, None))  # softmax_decode
            for kind, grad, y in modes:
                for has_weight in ((False, True) if kind else (False,)):
                    for softcap in (False, True):
                        switches = _constexprs(dtype, kind, has_weight, softcap, grad, block)
                        sig = signature(_softmax_ce_kernel, _pointer_types(dtype, kind, y),
                                        _SCALARS, switches)
                        yield _softmax_ce_kernel, sig, switches, warps


def _target_kind(target) -> int:
    return 2 if target.dim() == 2 else 1


def _class_weight(weight, logits):
    """(C,) weight of any float dtype and stride -> contiguous, accumulation dtype (C values)."""
    return None if weight is None else weight.to(acc_torch(logits.dtype)).contiguous()


def _run_rows(logits, target, weight, scale, scale_stride, ignore_index, label_smoothing,
              lse_square_scale, softcap, grad, decode, block):
    """Every op's row pass: returns (loss, lse, pred, conf); the gradient goes to `grad`."""
    rows, classes = logits.shape
    if target is not None and target.dim() == 1:
        _check_targets_on_cpu(target, ignore_index, classes)
    acc = dict(dtype=acc_torch(logits.dtype), device=logits.device)
    loss = torch.empty(rows, **acc)
    lse = torch.empty(rows, **acc)
    pred = torch.empty(rows, dtype=torch.int64, device=logits.device) if decode \
        else _empty(logits, torch.int64)
    conf = torch.empty(rows, dtype=torch.float32, device=logits.device) if decode \
        else _empty(logits, torch.float32)
    _launch(logits, target, _class_weight(weight, logits), scale, scale_stride, lse,
            loss if target is not None else None, grad, pred, conf, ignore_index,
            label_smoothing, lse_square_scale, softcap, decode,
            target_kind=0 if target is None else _target_kind(target), block=block)
    return loss, lse, pred, conf


def softmax_ce_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                   lse_square_scale, softcap, compute_grad, decode, *, block=None):
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) \
        if compute_grad else None
    scale = None if grad_scale is None else grad_scale.to(acc_torch(logits.dtype))
    loss, lse, pred, conf = _run_rows(logits, target, weight, scale, 0, ignore_index,
                                      label_smoothing, lse_square_scale, softcap, grad, decode,
                                      block)
    return loss, lse, grad if compute_grad else _empty(logits), pred, conf


def softmax_ce_fwd_inplace(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                           lse_square_scale, softcap, decode, *, block=None):
    # Pass 2 loads each block of the row before it stores that block's gradient over it.
    scale = None if grad_scale is None else grad_scale.to(acc_torch(logits.dtype))
    return _run_rows(logits, target, weight, scale, 0, ignore_index, label_smoothing,
                     lse_square_scale, softcap, logits, decode, block)


def softmax_ce_bwd(grad_loss, logits, target, weight, ignore_index, label_smoothing,
                   lse_square_scale, softcap, *, block=None):
    # The forward's kernel with the gradient on and the (R,) incoming gradient as per-row scale
    # (any float dtype and stride, stride 0 included; converting R values is a tiny device op):
    # the same code on the same row, so the result is bitwise the forward's fused gradient for
    # equal scales. The loss and lse it also writes are dropped (R values each).
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    g = grad_loss.to(acc_torch(logits.dtype))
    _run_rows(logits, target, weight, g, g.stride(0), ignore_index, label_smoothing,
              lse_square_scale, softcap, grad, False, block)
    return grad


def softmax_decode(logits, softcap, *, block=None):
    _, _, pred, conf = _run_rows(logits, None, None, None, 0, -100, 0.0, 0.0, softcap, None,
                                 True, block)
    return pred, conf
