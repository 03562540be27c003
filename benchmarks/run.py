#!/usr/bin/env python
"""Benchmark every fusedloss backend against the alternatives on this machine.

    python benchmarks/run.py                       # quick profile, GPU if present else CPU
    python benchmarks/run.py --profile cpu-targets --thp both
    python benchmarks/run.py --device cuda --profile gpu
    python benchmarks/run.py --cases ce:4096x32000:fp32:fwd+bwd bce:8192x256:bf16:fwd:decode \
        --providers eager,compile,fusedloss

For each case: inputs are made once; the copy bandwidth is measured on a buffer of the logits'
size; every provider is run once and checked against float64 torch.nn.functional (check.py;
a provider that fails is reported FAILED and not timed), then warmed up and timed (timing.py);
its peak memory is measured on one more call. Results go to bench_results/ (JSON + Markdown)
and the Markdown tables are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import report  # noqa: E402
from bytes_model import op_bytes  # noqa: E402
from cases import CASE_SYNTAX, PROFILES, Case, Profile, parse_case  # noqa: E402
from check import Reference  # noqa: E402
from providers import make_inputs, providers_for  # noqa: E402
from timing import Timer, copy_bandwidth, peak_memory  # noqa: E402

BYTES_FORMULA = {
    ("softmax_ce", "fwd"): "R*C*isz + R*8",
    ("softmax_ce", "fwd+bwd"): "2*R*C*isz + R*8",
    ("sigmoid_bce", "fwd"): "R*C*(isz + target isz)",
    ("sigmoid_bce", "fwd+bwd"): "R*C*(2*isz + target isz)",
}


# The copy is short (tens of microseconds for the small cases); on a shared machine a few ms
# of preemption would swamp a small sample, so it gets many repetitions, and it is measured
# before the providers and after each one, keeping the fastest median (the copy is the best
# case: noise only ever slows it down).
COPY_REPS = dict(warmup=3, min_reps=20, max_reps=5000, budget_s=0.3)
TIMING_CUDA = ("cuda events per call after a 2 ms GPU spin (host launch overhead hidden), "
               "L2 flushed before each")
TIMING_CPU = "time.perf_counter per call"
INTERPRETER_REPS = dict(warmup=0, min_reps=2, max_reps=2, budget_s=0.0)


def parse_args(argv=None) -> argparse.Namespace:
    epilog = "profiles:\n" + "\n".join(
        f"  {name:12s} {prof.description}" for name, prof in PROFILES.items()) + (
        "\n\nexit status: 0 when every provider passed its check, 1 when one FAILED or "
        "raised (ERROR), 2 for bad arguments")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="named set of cases and repetitions (default: quick)")
    p.add_argument("--cases", nargs="+", metavar="CASE",
                   help=f"custom cases instead of the profile's: {CASE_SYNTAX}")
    p.add_argument("--providers", default="",
                   help="comma-separated names or prefixes to run (eager, compile, fusedloss, "
                        "fusedloss-native, liger, quack); default: all available")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--thp", choices=("inherit", "0", "1", "both"), default="inherit",
                   help="THP_MEM_ALLOC_ENABLE for the measurement: inherit the environment's, "
                        "force 0 or 1, or run everything under both (in subprocesses: PyTorch "
                        "reads it at startup)")
    p.add_argument("--out", default=str(report.REPO / "bench_results"),
                   help="directory for the JSON and Markdown results (default: bench_results/)")
    p.add_argument("--min-reps", type=int, help="override the profile's minimum timed calls")
    p.add_argument("--budget", type=float, help="override the profile's seconds per provider")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads for the run (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json-only", metavar="PATH", help=argparse.SUPPRESS)  # --thp children
    args = p.parse_args(argv)
    try:
        args.case_list = [parse_case(c) for c in args.cases] if args.cases else None
    except ValueError as e:
        p.error(str(e))
    if args.min_reps is not None and args.min_reps < 1:
        p.error(f"--min-reps must be >= 1, got {args.min_reps}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.budget is not None and args.budget < 0:
        p.error(f"--budget must be >= 0, got {args.budget}")
    try:
        args.dev = _device(args.device)
    except (RuntimeError, ValueError) as e:
        p.error(f"--device {args.device!r}: {e}")
    return args


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError("only cpu and cuda are supported")
    return dev


def _selected(name: str, filters: list[str]) -> bool:
    return not filters or any(name == f or name.startswith(f + "-") for f in filters)


def run_case(case: Case, prof: Profile, dev: torch.device, timer: Timer, filters: list[str],
             seed: int, progress, env: dict, order0: int) -> tuple[list[dict], list]:
    provs, skipped = providers_for(case, dev)
    provs = [p for p in provs if _selected(p.name, filters)]
    skipped = [s for s in skipped if _selected(s[0], filters)]
    reps = dict(warmup=prof.warmup, min_reps=prof.min_reps, max_reps=prof.max_reps,
                budget_s=prof.budget_s)
    inp = make_inputs(case, dev, seed)
    copies = [copy_bandwidth(timer, inp.x, **COPY_REPS)[0]]
    ref = Reference(inp, seed)
    rows: list[dict] = []
    for i, prov in enumerate(provs):
        if progress is not None:
            progress.set_postfix_str(f"{case.op} {case.rows}x{case.classes} {prov.label}")
        nbytes = op_bytes(case, 1 if prov.target == "uint8" else None)
        row = {**case.as_dict(), "provider": prov.name, "label": prov.label,
               "target": prov.target if case.op == "sigmoid_bce" else "int64",
               "status": "ok", "reason": "", "note": prov.note, "order": order0 + i,
               "bytes": nbytes, "bytes_formula": BYTES_FORMULA[(case.op, case.pass_)]
               + (" + decodings" if case.decode else ""),
               "copy_gbps": None, "median_ms": None, "p25_ms": None, "p75_ms": None,
               "iqr_ms": None, "reps": 0, "gbps": None, "pct_copy": None, "x_ideal": None,
               "speedup_vs_eager": None, "peak_mem_bytes": None, "mem_method": "",
               "compile_s": None, "first_call_s": None, "loss_err": None, "grad_err": None,
               "tol": ref.tol,
               "timing": TIMING_CUDA if timer.cuda else TIMING_CPU,
               **env}
        rows.append(row)
        try:
            runner = prov.make(inp)
            row["note"] = "; ".join(n for n in (prov.note, runner.note) if n)
            if runner.setup is not None:
                runner.setup()
            timer.sync()
            t0 = time.perf_counter()
            out = runner.fn()
            timer.sync()
            row["first_call_s"] = time.perf_counter() - t0
            verdict = ref.check(out, inp)
            del out
            row["loss_err"], row["grad_err"] = verdict.loss_err, verdict.grad_err
            if not verdict.ok:
                row["status"], row["reason"] = "FAILED", verdict.reason
                continue
            interp = dev.type == "cpu" and prov.name in ("fusedloss-triton", "liger")
            if interp:  # the Triton interpreter takes seconds a call: its time means little
                row["note"] = "; ".join(filter(None, [row["note"], "Triton interpreter"]))
            stats = timer.measure(runner.fn, runner.setup,
                                  **(INTERPRETER_REPS if interp else reps))
            copies.append(copy_bandwidth(timer, inp.x, **COPY_REPS)[0])
            if runner.setup is not None:
                runner.setup()
            row["peak_mem_bytes"], row["mem_method"] = peak_memory(timer, runner.fn)
        except Exception as e:  # noqa: BLE001  (one provider's failure must not stop the rest)
            row["status"] = "ERROR"
            row["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            row["traceback"] = traceback.format_exc(limit=6)
            continue
        finally:
            runner = None  # free its buffers (Liger's/in-place input copy) before the next
            if progress is not None:
                progress.update(1)
        med = stats.median_s
        row.update(median_ms=med * 1e3, p25_ms=stats.p25_s * 1e3, p75_ms=stats.p75_s * 1e3,
                   iqr_ms=stats.iqr_s * 1e3, min_ms=stats.min_s * 1e3, reps=stats.reps,
                   gbps=nbytes / med / 1e9)
        if prov.name == "compile":
            row["compile_s"] = max(0.0, row["first_call_s"] - med)
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
    return rows, skipped


def measure(args) -> tuple[list[dict], dict, dict]:
    prof = PROFILES[args.profile]
    if args.case_list:
        prof = Profile(tuple(args.case_list), prof.warmup, prof.min_reps, prof.max_reps,
                       prof.budget_s, "custom cases", prof.skip)
    if args.min_reps is not None or args.budget is not None:
        prof = Profile(prof.cases, prof.warmup,
                       args.min_reps if args.min_reps is not None else prof.min_reps,
                       max(prof.max_reps, args.min_reps or 0),
                       args.budget if args.budget is not None else prof.budget_s,
                       prof.description, prof.skip)
    filters = [f.strip() for f in args.providers.split(",") if f.strip()]
    if not filters and prof.skip:
        filters = ["eager", "fusedloss", "liger", "quack", "compile"]
        filters = [f for f in filters if f not in prof.skip]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dev = args.dev
    env = report.environment(dev)
    timer = Timer(dev)
    total = sum(sum(_selected(p.name, filters) for p in providers_for(c, dev)[0])
                for c in prof.cases)
    progress = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            progress = tqdm(total=total, desc=f"bench {args.profile} THP={env['thp']}",
                            unit="run", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            progress = None
    rows, skipped = [], {}
    for case in prof.cases:
        r, s = run_case(case, prof, dev, timer, filters, args.seed, progress, env, len(rows))
        rows += r
        skipped[report.case_key_str(case.as_dict())] = s
    if progress is not None:
        progress.close()
    return rows, env, skipped


def run_thp_children(args, settings: list[str]) -> tuple[list[dict], list[dict], dict]:
    """Re-run this program once per THP setting (PyTorch reads the variable at startup)."""
    rows, envs, skipped = [], [], {}
    argv = [a for a in sys.argv[1:]]
    # drop --thp and its value; children inherit everything else
    clean = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--thp":
            skip = True
            continue
        if a.startswith("--thp="):
            continue
        clean.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        for s in settings:
            path = Path(tmp) / f"thp{s}.json"
            env = {**os.environ, report.THP_VAR: s}
            cmd = [sys.executable, str(Path(__file__).resolve()), *clean, "--thp", "inherit",
                   "--json-only", str(path)]
            rc = subprocess.run(cmd, env=env).returncode
            if rc != 0:
                raise SystemExit(f"the THP={s} run failed (exit {rc}): {' '.join(cmd)}")
            data = json.loads(path.read_text())
            rows += data["rows"]
            envs.append(data["env"])
            for k, v in data["skipped"].items():
                skipped.setdefault(k, [])
                skipped[k] += [tuple(x) for x in v if tuple(x) not in skipped[k]]
    return rows, envs, skipped


# Profiles that measure whole training steps rather than one loss op live in their own modules
# (each exposes main(argv) -> int); run.py hands them the remaining arguments.
EXTERNAL_PROFILES = {"linear": "bench_linear", "hf": "bench_hf"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--profile" in argv[:-1]:
        i = argv.index("--profile")
        module = EXTERNAL_PROFILES.get(argv[i + 1])
        if module is not None:
            import importlib

            return importlib.import_module(module).main(argv[:i] + argv[i + 2:])
    args = parse_args(argv)
    cur = report.thp_setting()
    if args.thp == "both":
        rows, envs, skipped = run_thp_children(args, ["0", "1"])
    elif args.thp in ("0", "1") and args.thp != cur:
        rows, envs, skipped = run_thp_children(args, [args.thp])
    else:
        rows, env, skipped = measure(args)
        envs = [env]
        if args.json_only:
            Path(args.json_only).write_text(json.dumps(
                {"env": env, "rows": rows, "skipped": skipped}, default=str))
            return 0
    title = f"{args.profile if not args.case_list else 'custom cases'} on {envs[0]['device']}"
    md = report.markdown(rows, envs, skipped, title)
    stem = f"{args.profile if not args.case_list else 'custom'}-{envs[0]['device']}-" \
           f"{time.strftime('%Y%m%d-%H%M%S')}"
    payload = {"title": title, "argv": sys.argv[1:], "environments": envs, "rows": rows,
               "skipped": skipped}
    jpath, mpath = report.write(Path(args.out), stem, payload, md)
    print(f"results: {jpath} and {mpath}", file=sys.stderr)
    print(md)
    bad = [r for r in rows if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
