"""Measuring one case: every provider checked against float64, then timed, then its peak memory
measured; and the figures derived per case (GB/s, % of the copy bandwidth, x ideal, vs eager).

One provider's failure (a wrong result or an exception) is recorded on its row and never stops
the others.
"""

from __future__ import annotations

import time
import traceback

import torch

from bytes_model import formula, op_bytes
from cases import Case, Profile
from check import Reference
from providers import Inputs, Provider, make_inputs, providers_for
from timing import Timer, copy_bandwidth, peak_memory

# The copy is short (tens of microseconds for the small cases); on a shared machine a few ms
# of preemption would swamp a small sample, so it gets many repetitions, and it is measured
# before the providers and after each one, keeping the fastest median (the copy is the best
# case: noise only ever slows it down).
COPY_REPS = dict(warmup=3, min_reps=20, max_reps=5000, budget_s=0.3)
TIMING_CUDA = ("cuda events per call after a 2 ms GPU spin (host launch overhead hidden), "
               "L2 flushed before each")
TIMING_CPU = "time.perf_counter per call"
# The Triton interpreter takes seconds a call: two timed calls, its time means little.
INTERPRETER_REPS = dict(warmup=0, min_reps=2, max_reps=2, budget_s=0.0)
INTERPRETED = ("fusedloss-triton", "liger")


def selected(name: str, filters: list[str]) -> bool:
    """Whether provider `name` is asked for by --providers (names or prefixes; none: all)."""
    return not filters or any(name == f or name.startswith(f + "-") for f in filters)


def _new_row(case: Case, prov: Provider, ref: Reference, timer: Timer, env: dict,
             order: int) -> dict:
    return {**case.as_dict(), "provider": prov.name, "label": prov.label,
            "target": prov.target if case.op == "sigmoid_bce" else "int64",
            "status": "ok", "reason": "", "note": prov.note, "order": order,
            "bytes": op_bytes(case, 1 if prov.target == "uint8" else None),
            "bytes_formula": formula(case),
            "copy_gbps": None, "median_ms": None, "p25_ms": None, "p75_ms": None,
            "iqr_ms": None, "reps": 0, "gbps": None, "pct_copy": None, "x_ideal": None,
            "speedup_vs_eager": None, "peak_mem_bytes": None, "mem_method": "",
            "compile_s": None, "first_call_s": None, "loss_err": None, "grad_err": None,
            "tol": ref.tol, "timing": TIMING_CUDA if timer.cuda else TIMING_CPU, **env}


def _first_call_checked(row: dict, runner, ref: Reference, inp: Inputs, timer: Timer) -> bool:
    """Run once (timed as the first call) and check the result; False if it is wrong."""
    if runner.setup is not None:
        runner.setup()
    timer.sync()
    t0 = time.perf_counter()
    out = runner.fn()
    timer.sync()
    row["first_call_s"] = time.perf_counter() - t0
    verdict = ref.check(out, inp)
    row["loss_err"], row["grad_err"] = verdict.loss_err, verdict.grad_err
    if not verdict.ok:
        row["status"], row["reason"] = "FAILED", verdict.reason
    return verdict.ok


def _time_provider(row: dict, prov: Provider, inp: Inputs, ref: Reference, timer: Timer,
                   reps: dict, copies: list[float]) -> None:
    """Check, time and measure the memory of one provider, filling `row`."""
    runner = prov.make(inp)
    row["note"] = "; ".join(n for n in (prov.note, runner.note) if n)
    if not _first_call_checked(row, runner, ref, inp, timer):
        return
    interp = inp.x.device.type == "cpu" and prov.name in INTERPRETED
    if interp:
        row["note"] = "; ".join(filter(None, [row["note"], "Triton interpreter"]))
    stats = timer.measure(runner.fn, runner.setup, **(INTERPRETER_REPS if interp else reps))
    copies.append(copy_bandwidth(timer, inp.x, **COPY_REPS)[0])
    if runner.setup is not None:
        runner.setup()
    row["peak_mem_bytes"], row["mem_method"] = peak_memory(timer, runner.fn)
    med = stats.median_s
    row.update(median_ms=med * 1e3, p25_ms=stats.p25_s * 1e3, p75_ms=stats.p75_s * 1e3,
               iqr_ms=stats.iqr_s * 1e3, min_ms=stats.min_s * 1e3, reps=stats.reps,
               gbps=row["bytes"] / med / 1e9)
    if prov.name == "compile":
        row["compile_s"] = max(0.0, row["first_call_s"] - med)


def _derive(rows: list[dict], copies: list[float]) -> None:
    """Figures relative to the best copy bandwidth of the case and to eager torch."""
    copy = max(copies)
    eager = [r["median_ms"] for r in rows if r["provider"] == "eager" and r["median_ms"]]
    for row in rows:
        row["copy_gbps"] = copy / 1e9
        row["copy_gbps_samples"] = [c / 1e9 for c in copies]
        if row["median_ms"] is None:
            continue
        med = row["median_ms"] / 1e3
        row["pct_copy"] = 100.0 * (row["bytes"] / med) / copy
        row["x_ideal"] = med / (row["bytes"] / copy)
        if eager:
            row["speedup_vs_eager"] = eager[0] / row["median_ms"]


def run_case(case: Case, prof: Profile, timer: Timer, filters: list[str], seed: int,
             progress, env: dict, order0: int) -> tuple[list[dict], list]:
    """Rows (one per provider) and the skipped providers, (name, reason), of one case."""
    dev = timer.device
    provs, skipped = providers_for(case, dev)
    provs = [p for p in provs if selected(p.name, filters)]
    skipped = [s for s in skipped if selected(s[0], filters)]
    reps = dict(warmup=prof.warmup, min_reps=prof.min_reps, max_reps=prof.max_reps,
                budget_s=prof.budget_s)
    inp = make_inputs(case, dev, seed)
    copies = [copy_bandwidth(timer, inp.x, **COPY_REPS)[0]]
    ref = Reference(inp, seed)
    rows: list[dict] = []
    for i, prov in enumerate(provs):
        if progress is not None:
            progress.set_postfix_str(f"{case.op} {case.rows}x{case.classes} {prov.label}")
        row = _new_row(case, prov, ref, timer, env, order0 + i)
        rows.append(row)
        try:
            _time_provider(row, prov, inp, ref, timer, reps, copies)
        except Exception as e:  # noqa: BLE001  (one provider's failure must not stop the rest)
            row["status"] = "ERROR"
            row["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            row["traceback"] = traceback.format_exc(limit=6)
        finally:
            if progress is not None:
                progress.update(1)
    _derive(rows, copies)
    return rows, skipped


def count_runs(cases, dev: torch.device, filters: list[str]) -> int:
    """How many provider runs the cases make (for the progress bar)."""
    return sum(sum(selected(p.name, filters) for p in providers_for(c, dev)[0]) for c in cases)
