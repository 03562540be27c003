"""Where a result came from (device, versions, commit, allocator) and how it is written:
a JSON file (one flat record per provider and case, each tagged with the environment) and
Markdown (one table per case, providers as rows)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from cases import PASSES

REPO = Path(__file__).resolve().parent.parent
THP_VAR = "THP_MEM_ALLOC_ENABLE"


def thp_setting() -> str:
    """PyTorch's CPU allocator asks for transparent huge pages when THP_MEM_ALLOC_ENABLE=1
    (read once, at startup). It changes CPU timings several-fold: under the kernel's
    transparent_hugepage=madvise mode, a fresh logits-sized buffer is otherwise faulted in
    4 KiB page by page."""
    return "1" if os.environ.get(THP_VAR) == "1" else "0"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import fusedloss
    from fusedloss import _native

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"
    commit = _git("rev-parse", "--short=12", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "cpu_isa": _native.loaded_cpu_isa,  # which fusedloss._cpu_<isa> module is loaded
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "thp": thp_setting(),
        "fusedloss_backends": fusedloss.available_backends(device),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---- Markdown --------------------------------------------------------------------------------

def _f(v, fmt: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, fmt)


def _case_key(r: dict) -> tuple:
    return (r["op"], r["pass"], r["dtype"], r["rows"], r["classes"], r["decode"])


PASS_NOTE = ("fwd+bwd = loss, then loss.backward() into the logits (a leaf; the gradient "
             "lands in .grad, as in a training loop); fwd+autograd = loss, then "
             "torch.autograd.grad(loss, logits) (a fresh gradient, as for logits inside a "
             "network); x ideal = time / (bytes model at the copy bandwidth measured in this "
             "run); vs eager = eager time / time")


def _preamble(rows: list[dict], envs: list[dict], title: str) -> list[str]:
    env = envs[0] if envs else {}
    thps = sorted({e["thp"] for e in envs})
    lines = [f"# fusedloss benchmark: {title}", ""]
    lines.append(f"- device: {env.get('device_name')} ({env.get('device')})")
    lines.append(f"- torch {env.get('torch')}, triton {env.get('triton')}, python "
                 f"{env.get('python')}, commit {env.get('git_commit')}")
    lines.append(f"- fusedloss CPU ISA module: {env.get('cpu_isa')} (torch CPU capability "
                 f"{env.get('cpu_capability')}); backends: {env.get('fusedloss_backends')}")
    lines.append(f"- allocator: {THP_VAR}=" + " and ".join(thps)
                 + " (1: PyTorch asks for transparent huge pages; matters on CPU)")
    if rows:
        lines.append(f"- timing: {rows[0]['timing']}; memory: {rows[0]['mem_method']}")
    lines.append(f"- {PASS_NOTE}")
    lines.append("")
    return lines


_HEAD = ["median ms", "IQR ms", "GB/s", "% copy BW", "x ideal", "vs eager", "peak MB",
         "err loss/grad", "status / notes"]


def _row_cells(r: dict, thp_col: bool) -> list[str]:
    ok = r["status"] == "ok"
    note = "ok" if ok else f"**{r['status']}**: {r['reason']}"
    if r.get("compile_s") is not None:
        note += f"; first call {r['compile_s']:.1f} s (compile, excluded)"
    if r.get("note"):
        note += f"; {r['note']}"
    errs = f"{_f(r['loss_err'], '.0e')}/{_f(r['grad_err'], '.0e')}"
    return [r["label"], r["target"]] + ([r["thp"]] if thp_col else []) + [
        _f(r["median_ms"], ".3f") if ok else "-",
        _f(r["iqr_ms"], ".3f") if ok else "-",
        _f(r["gbps"], ".1f") if ok else "-",
        _f(r["pct_copy"], ".0f") if ok else "-",
        _f(r["x_ideal"], ".3g") if ok else "-",
        _f(r["speedup_vs_eager"], ".3g") if ok else "-",
        _f(None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 1e6, ".1f"),
        errs, note]


def _table(head: list[str], body: list[list]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            + ["| " + " | ".join(str(c) for c in cells) + " |" for cells in body])


def _case_section(rs: list[dict], thps: list[str], skipped: dict) -> list[str]:
    r0 = rs[0]
    dec = "decode on" if r0["decode"] else "decode off"
    lines = [f"### {r0['op']} {r0['pass']} {r0['dtype']} {r0['rows']}x{r0['classes']} ({dec})"]
    copies = ", ".join(f"{_f(r['copy_gbps'], '.1f')} GB/s"
                       + (f" (THP={r['thp']})" if len(thps) > 1 else "")
                       for r in {r["thp"]: r for r in rs}.values())
    lines += [f"bytes model {r0['bytes'] / 1e6:.1f} MB ({r0['bytes_formula']}); "
              f"copy bandwidth {copies}", ""]
    thp_col = len(thps) > 1
    head = ["provider", "target"] + (["THP"] if thp_col else []) + _HEAD
    body = [_row_cells(r, thp_col) for r in sorted(rs, key=lambda r: (r["order"], r["thp"]))]
    lines += _table(head, body)
    sk = skipped.get(" ".join(map(str, _case_key(r0))))
    if sk:
        lines += ["", "not run: " + "; ".join(f"{n} ({why})" for n, why in sk)]
    return lines + [""]


def summary(rows: list[dict]) -> list[str]:
    """Speed-up over eager of every provider, one row per (case, provider), one column per
    (pass, THP): the training passes side by side."""
    cols = sorted({(r["pass"], r["thp"]) for r in rows},
                  key=lambda c: (PASSES.index(c[0]), c[1]))
    if len(cols) < 2:
        return []
    table: dict[tuple, dict] = {}
    for r in rows:
        key = (r["op"], r["dtype"], r["rows"], r["classes"], r["decode"], r["label"])
        cell = _f(r["speedup_vs_eager"], ".2f") if r["status"] == "ok" else r["status"]
        table.setdefault(key, {})[(r["pass"], r["thp"])] = cell
    head = ["case", "provider"] + [f"{p} THP={t}" for p, t in cols]
    body = [[f"{k[0]} {k[1]} {k[2]}x{k[3]}" + (" decode" if k[4] else ""), k[5]]
            + [cells.get(c, "") for c in cols] for k, cells in table.items()]
    return ["## Speed-up over eager (eager time / time)", ""] + _table(head, body) + [""]


def markdown(rows: list[dict], envs: list[dict], skipped: dict, title: str) -> str:
    thps = sorted({e["thp"] for e in envs})
    lines = _preamble(rows, envs, title)
    by_case: dict[tuple, list[dict]] = {}
    for r in rows:
        by_case.setdefault(_case_key(r), []).append(r)
    for rs in by_case.values():
        lines += _case_section(rs, thps, skipped)
    lines += summary(rows)
    return "\n".join(lines)


def case_key_str(case_dict: dict) -> str:
    return " ".join(map(str, (case_dict["op"], case_dict["pass"], case_dict["dtype"],
                              case_dict["rows"], case_dict["classes"], case_dict["decode"])))


def write(out_dir: Path, stem: str, payload: dict, md: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    jpath.write_text(json.dumps(payload, indent=1, default=str))
    mpath.write_text(md + "\n")
    return jpath, mpath
