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
its peak memory is measured on one more call (measure.py). Results go to bench_results/
(JSON, Markdown and a PNG chart of the times against the bytes model, chart.py) and the
Markdown tables are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import chart  # noqa: E402
import report  # noqa: E402
from cases import CASE_SYNTAX, PROFILES, Profile, parse_case  # noqa: E402
from measure import count_runs, run_case  # noqa: E402
from timing import Timer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    epilog = "profiles:\n" + "\n".join(
        f"  {name:12s} {prof.description}" for name, prof in PROFILES.items()) + (
        "\n  linear, hf, hist  separate benchmarks (fused linear + loss, transformers, the "
        "threshold histogram):\n  `--profile NAME --help` lists their own options"
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


def _profile(args) -> Profile:
    """The profile asked for, with --cases, --min-reps and --budget applied."""
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
    return prof


def _filters(args, prof: Profile) -> list[str]:
    filters = [f.strip() for f in args.providers.split(",") if f.strip()]
    if not filters and prof.skip:
        filters = [f for f in ("eager", "fusedloss", "liger", "quack", "compile")
                   if f not in prof.skip]
    return filters


def _progress_bar(args, total: int, env: dict):
    if args.no_progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"bench {args.profile} THP={env['thp']}", unit="run",
                file=sys.stderr, dynamic_ncols=True)


def measure(args) -> tuple[list[dict], dict, dict]:
    """Run every case of the profile in this process: (rows, environment, skipped per case)."""
    prof = _profile(args)
    filters = _filters(args, prof)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = report.environment(args.dev)
    timer = Timer(args.dev)
    progress = _progress_bar(args, count_runs(prof.cases, args.dev, filters), env)
    rows, skipped = [], {}
    for case in prof.cases:
        r, s = run_case(case, prof, timer, filters, args.seed, progress, env, len(rows))
        rows += r
        skipped[report.case_key_str(case.as_dict())] = s
    if progress is not None:
        progress.close()
    return rows, env, skipped


def _without_thp(argv: list[str]) -> list[str]:
    """argv without --thp and its value (the children are given their own)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--thp":
            skip = True
        elif not a.startswith("--thp="):
            out.append(a)
    return out


def run_thp_children(argv: list[str], settings: list[str]) -> tuple[list[dict], list[dict], dict]:
    """Re-run this program once per THP setting (PyTorch reads the variable at startup)."""
    rows, envs, skipped = [], [], {}
    clean = _without_thp(argv)
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
EXTERNAL_PROFILES = {"linear": "bench_linear", "hf": "bench_hf", "hist": "bench_hist"}


def _external_profile(argv: list[str]) -> int | None:
    """The exit status of an EXTERNAL_PROFILES module if --profile names one, else None."""
    if "--profile" not in argv[:-1]:
        return None
    i = argv.index("--profile")
    module = EXTERNAL_PROFILES.get(argv[i + 1])
    if module is None:
        return None
    import importlib

    return importlib.import_module(module).main(argv[:i] + argv[i + 2:])


def _write_results(args, argv, rows, envs, skipped) -> str:
    """JSON, Markdown and the PNG chart into --out; returns the Markdown."""
    name = args.profile if not args.case_list else "custom"
    title = f"{args.profile if not args.case_list else 'custom cases'} on {envs[0]['device']}"
    md = report.markdown(rows, envs, skipped, title)
    stem = f"{name}-{envs[0]['device']}-{time.strftime('%Y%m%d-%H%M%S')}"
    payload = {"title": title, "argv": argv, "environments": envs, "rows": rows,
               "skipped": skipped}
    jpath, mpath = report.write(Path(args.out), stem, payload, md)
    written = f"results: {jpath} and {mpath}"
    png, why = chart.write(rows, Path(args.out) / f"{stem}.png", title)
    written += f"; chart: {png}" if png else f"; no chart ({why})"
    print(written, file=sys.stderr)
    return md


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rc = _external_profile(argv)
    if rc is not None:
        return rc
    args = parse_args(argv)
    if args.thp == "both":
        rows, envs, skipped = run_thp_children(argv, ["0", "1"])
    elif args.thp in ("0", "1") and args.thp != report.thp_setting():
        rows, envs, skipped = run_thp_children(argv, [args.thp])
    else:
        rows, env, skipped = measure(args)
        envs = [env]
        if args.json_only:
            Path(args.json_only).write_text(json.dumps(
                {"env": env, "rows": rows, "skipped": skipped}, default=str))
            return 0
    print(_write_results(args, argv, rows, envs, skipped))
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
