"""The correctness check every provider passes before it is timed.

Oracle: torch.nn.functional in float64 on the same (upcast) inputs. The loss is checked on the
whole input (float64 in row chunks, so memory stays small); the gradient on a set of rows
(all rows of small cases; else the first and last rows and a random sample), in float64 via
autograd of the float64 loss with the same mean denominator.

Errors are relative: loss |l - r| / max(|r|, 1); gradient max_i |g_i - r_i| / (|r_i| + 1e-3
max|r|). fp32/fp64 must be within a fixed tolerance; bf16/fp16 within a fixed tolerance or
twice torch's own error on the same input, whichever is larger (torch's bf16 log_softmax
rounds its output, so its gradient is a few % off in relative terms: a low-precision result
must be no further from float64 than torch's, times a small factor).
Decodings: pred must hit a row maximum exactly (ties may go either way only if equal),
confidence within 1e-3 relative of exp(max - lse), correct == (pred == target), labels exactly
x > 0, counts exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cases import Case
from providers import Inputs, Out, _eager_fn

# (loss, gradient) relative tolerance per dtype; bf16/fp16 losses are rounded to the dtype
# (2^-8, 2^-11 relative), their gradients carry a rounded log-softmax in torch.
TOL = {"fp64": (1e-9, 1e-9), "fp32": (1e-4, 1e-4), "bf16": (1e-2, 2e-2), "fp16": (2e-3, 5e-3)}
LOW_PRECISION_FACTOR = 2.0
CONF_RTOL = 1e-3
CHUNK_ELEMS = 1 << 22     # float64 rows per reference chunk: 32 MB
FULL_CHECK_ELEMS = 1 << 20  # cases up to this size have every gradient row checked
SAMPLE_ROWS = 48


@dataclass
class Verdict:
    ok: bool
    loss_err: float
    grad_err: float | None
    tol: tuple[float, float]  # (loss, gradient)
    reason: str = ""


def _loss64(case: Case, x, t) -> torch.Tensor:
    if case.op == "softmax_ce":
        return F.cross_entropy(x, t, reduction="sum")
    return F.binary_cross_entropy_with_logits(x, t, reduction="sum")


class Reference:
    def __init__(self, inp: Inputs, seed: int = 0):
        case = self.case = inp.case
        x, t = inp.x.detach(), inp.target
        R, C = case.rows, case.classes
        self.denom = R if case.op == "softmax_ce" else R * C  # reduction="mean"
        step = max(1, CHUNK_ELEMS // max(C, 1))
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        lse = [] if case.op == "softmax_ce" else None
        for s in range(0, R, step):
            x64 = x[s:s + step].double()
            t64 = t[s:s + step] if case.op == "softmax_ce" else t[s:s + step].double()
            total += _loss64(case, x64, t64)
            if lse is not None:
                lse.append(torch.logsumexp(x64, -1))
        self.loss = total / self.denom
        self.lse = torch.cat(lse) if lse is not None else None
        if case.numel <= FULL_CHECK_ELEMS or R <= SAMPLE_ROWS:
            self.rows = torch.arange(R, device=x.device)
        else:
            g = torch.Generator().manual_seed(seed)
            mid = torch.randint(0, R, (SAMPLE_ROWS - 16,), generator=g).to(x.device)
            ends = torch.cat([torch.arange(8), torch.arange(R - 8, R)]).to(x.device)
            self.rows = torch.unique(torch.cat([ends, mid]))
        self.grad = None
        if case.backward:
            xr = x[self.rows].double().requires_grad_(True)
            tr = t[self.rows] if case.op == "softmax_ce" else t[self.rows].double()
            (self.grad,) = torch.autograd.grad(_loss64(case, xr, tr) / self.denom, xr)
        self.tol = TOL[case.dtype]
        if case.dtype in ("bf16", "fp16"):
            # torch's own error on this input sets the bar for low precision.
            kind = "int64" if case.op == "softmax_ce" else "float"
            call = _eager_fn(case, kind)
            loss, _ = call(inp.x, inp.target)
            grad = torch.autograd.grad(loss, inp.x)[0] if case.backward else None
            le, ge = self.errors(loss.detach(), grad)
            self.tol = (max(self.tol[0], LOW_PRECISION_FACTOR * le),
                        max(self.tol[1], LOW_PRECISION_FACTOR * (ge or 0.0)))

    def errors(self, loss, grad) -> tuple[float, float | None]:
        le = (loss.double() - self.loss).abs().item() / max(abs(self.loss.item()), 1.0)
        ge = None
        if self.grad is not None and grad is not None:
            g = grad[self.rows].double()
            r = self.grad
            floor = 1e-3 * r.abs().max().clamp_min(1e-30)
            ge = ((g - r).abs() / (r.abs() + floor)).max().item()
        return le, ge

    def check(self, out: Out, inp: Inputs) -> Verdict:
        case = self.case
        loss, grad = out.loss, out.grad
        if loss.dim() != 0:
            return Verdict(False, float("nan"), None, self.tol,
                           f"loss has shape {tuple(loss.shape)}, expected a scalar")
        if case.backward:
            if grad is None or grad.shape != inp.x.shape or grad.dtype != inp.x.dtype:
                return Verdict(False, float("nan"), None, self.tol,
                               "gradient missing or of the wrong shape/dtype")
            if not bool(torch.isfinite(grad).all()):
                return Verdict(False, float("nan"), float("nan"), self.tol,
                               "non-finite gradient")
        le, ge = self.errors(loss, grad)
        bad = []
        if not le <= self.tol[0]:
            bad.append(f"loss error {le:.2e} > {self.tol[0]:.1e}")
        if ge is not None and not ge <= self.tol[1]:
            bad.append(f"gradient error {ge:.2e} > {self.tol[1]:.1e}")
        if case.decode:
            bad += self._check_decodings(out.dec, inp)
        return Verdict(not bad, le, ge, self.tol, "; ".join(bad))

    def _check_decodings(self, dec: dict, inp: Inputs) -> list[str]:
        x = inp.x.detach()
        bad = []
        if self.case.op == "softmax_ce":
            pred = dec.get("pred")
            if pred is None or pred.shape != (self.case.rows,):
                return ["pred missing or of the wrong shape"]
            if not bool((x.gather(1, pred.long().unsqueeze(1)).squeeze(1)
                         == x.max(1).values).all()):
                bad.append("pred is not an argmax")
            conf = dec.get("confidence")
            if conf is not None:
                r = torch.exp(x.max(1).values.double() - self.lse)
                err = ((conf.double() - r).abs() / r).max().item()
                if not err <= CONF_RTOL:
                    bad.append(f"confidence error {err:.2e} > {CONF_RTOL:.0e}")
            correct = dec.get("correct")
            if correct is not None and not torch.equal(correct.bool(), pred == inp.target):
                bad.append("correct != (pred == target)")
            return bad
        labels, counts = dec.get("labels"), dec.get("counts")
        ref_labels = x > 0
        if labels is None or not torch.equal(labels.bool(), ref_labels):
            bad.append("labels != (logits > logit(0.5))")
        pos = inp.target > 0.5
        ref_counts = torch.stack([(ref_labels & pos).sum(0), (ref_labels & ~pos).sum(0),
                                  (~ref_labels & pos).sum(0)])
        if counts is None or not torch.equal(counts.long(), ref_counts):
            bad.append("TP/FP/FN counts differ")
        return bad
