#!/usr/bin/env python
"""Fused linear + loss benchmark (`python benchmarks/run.py --profile linear [options]`).

A training step's loss head, forward + backward into leaf tensors (`.backward()`, gradients in
`.grad`), for each provider side by side:
  CE:  eager (F.linear then F.cross_entropy), torch.compile of that, torch's chunked
       F.linear_cross_entropy(options=LinearCrossEntropyOptions()), fusedloss; on CUDA also
       Liger's fused linear cross-entropy and Cut Cross-Entropy when importable.
  BCE: eager (F.linear then binary_cross_entropy_with_logits on the target as float; torch
       has no uint8 target), torch.compile of that, fusedloss (the uint8 target as it is).
Time: rounds in which every provider runs once, in turn (so machine noise hits all alike);
the median per provider and its ratio to the fastest. Memory: each provider in its own
subprocess (glibc MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave RSS; CUDA:
max_memory_allocated): the peak beyond what was resident before one call (after a warm-up
call), the gradients it returns included, next to the gradients' own bytes.
Each provider's loss and gradients are first checked against eager's (fp32: 1e-3 relative).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as tF  # noqa: E402

from timing import Timer, peak_memory  # noqa: E402

SHAPES = {
    ("cpu", False): ["ce:4096x1024x32000", "ce:2048x1024x128256", "bce:4096x768x131072"],
    ("cpu", True): ["ce:1024x256x32000", "ce:512x256x128256", "bce:1024x256x32768"],
    ("cuda", False): ["ce:16384x4096x131072", "ce:16384x4096x256000"],
    ("cuda", True): ["ce:4096x4096x131072"],
}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def parse_case(text: str):
    kind, dims = text.split(":")
    n, h, c = (int(v) for v in dims.split("x"))
    if kind not in ("ce", "bce"):
        raise ValueError(f"case kind must be ce or bce, got {kind!r}")
    return kind, n, h, c


def make_inputs(kind, n, h, c, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(n, h, generator=g, dtype=torch.float32)).to(device, dtype)
    w = (torch.randn(c, h, generator=g, dtype=torch.float32) / h ** 0.5).to(device, dtype)
    if kind == "ce":
        t = torch.randint(0, c, (n,), generator=g).to(device)
    else:  # multi-hot, ~8 positives per row
        t = (torch.rand(n, c, generator=g) < 8.0 / c).to(torch.uint8).to(device)
    return x.requires_grad_(True), w.requires_grad_(True), t


def _eager_ce(x, w, t):
    return tF.cross_entropy(tF.linear(x, w), t)


def _eager_bce(x, w, y):
    return tF.binary_cross_entropy_with_logits(tF.linear(x, w), y.to(x.dtype))


def providers(kind: str, device: str, chunk_sizes=()) -> dict:
    """name -> loss function of (x, w, t), for what is importable here; fusedloss-c<k> for
    each explicit chunk size asked for (fusedloss alone: chunk_size=None)."""
    import fusedloss

    fused = {"ce": fusedloss.linear_cross_entropy,
             "bce": fusedloss.linear_binary_cross_entropy_with_logits}[kind]
    extra = {f"fusedloss-c{k}": (lambda x, w, t, k=k: fused(x, w, t, chunk_size=k))
             for k in chunk_sizes}

    if kind == "bce":
        return {"eager": _eager_bce, "compile": torch.compile(_eager_bce), "fusedloss": fused,
                **extra}
    out = {"eager": _eager_ce, "compile": torch.compile(_eager_ce)}
    opts = torch.nn.LinearCrossEntropyOptions()
    out["torch-chunked"] = lambda x, w, t: tF.linear_cross_entropy(x, w, t, options=opts)
    out["fusedloss"] = fused
    out.update(extra)
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            out["liger"] = lambda x, w, t: liger(w, x, t)
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            out["cce"] = lambda x, w, t: cce(x, w, t)
        except ImportError:
            pass
    return out


def step(fn, x, w, t):
    x.grad = w.grad = None
    loss = fn(x, w, t)
    loss.backward()
    return loss


def check(provs, x, w, t) -> dict:
    """Relative max error of each provider's loss / grad x / grad W against eager's."""
    ref = step(provs["eager"], x, w, t).detach().float()
    rgx, rgw = x.grad.float(), w.grad.float()
    errs = {}
    for name, fn in provs.items():
        if name == "eager":
            continue
        loss = step(fn, x, w, t).detach().float()
        errs[name] = max(((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                         for a, e in ((loss, ref), (x.grad.float(), rgx), (w.grad.float(), rgw)))
    x.grad = w.grad = None
    return errs


def time_rounds(provs, x, w, t, rounds: int, timer: Timer) -> dict:
    calls = {name: (lambda fn=fn: step(fn, x, w, t)) for name, fn in provs.items()}
    times = timer.round_robin(calls, rounds)  # the warm-up call compiles and first-touches
    x.grad = w.grad = None
    return times


def _chunk_sizes(name: str) -> tuple:
    return (int(name.split("-c")[1]),) if name.startswith("fusedloss-c") else ()


def child_memory(case: str, name: str, device: str) -> int:
    """In a fresh process: bytes one fwd+bwd call of provider `name` needs at its peak."""
    kind, n, h, c = parse_case(case)
    dev = torch.device(device)
    x, w, t = make_inputs(kind, n, h, c, dev, DTYPE[dev.type])
    fn = providers(kind, dev.type, _chunk_sizes(name))[name]
    step(fn, x, w, t)  # warm-up: compilation, lazy initialisation
    x.grad = w.grad = None
    nbytes, _ = peak_memory(Timer(dev), lambda: step(fn, x, w, t))
    return nbytes


def memory_in_subprocess(case: str, name: str, device: str) -> int | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", case, name,
           "--device", device]
    res = subprocess.run(cmd, env={**os.environ, **MMAP_ENV}, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"memory of {name} on {case} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(json.loads(res.stdout.strip().splitlines()[-1])["bytes"])


def run_case(case: str, args) -> list[dict]:
    kind, n, h, c = parse_case(case)
    dev = torch.device(args.device)
    dtype = DTYPE[dev.type]
    x, w, t = make_inputs(kind, n, h, c, dev, dtype)
    provs = providers(kind, dev.type, args.chunk_sizes)
    if args.providers:
        keep = set(args.providers.split(",")) | {"eager"}
        provs = {k: v for k, v in provs.items() if k in keep}
    errs = check(provs, x, w, t)
    times = time_rounds(provs, x, w, t, args.rounds, Timer(dev))
    grad_bytes = (x.numel() + w.numel()) * x.element_size()
    fastest = min(times.values())
    rows = []
    for name in provs:
        mem = None if args.no_memory else memory_in_subprocess(case, name, args.device)
        rows.append(dict(case=case, dtype=str(dtype).replace("torch.", ""), provider=name,
                         time_s=times[name], time_vs_fastest=times[name] / fastest,
                         extra_peak_bytes=mem, grad_bytes=grad_bytes,
                         mem_vs_grads=None if mem is None else mem / grad_bytes,
                         max_rel_err_vs_eager=errs.get(name, 0.0)))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | dtype | provider | median s | vs fastest | extra peak MiB | vs grads "
             "| rel err vs eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem, ratio = r["extra_peak_bytes"], r["mem_vs_grads"]
        mib = "-" if mem is None else f"{mem / 2**20:.0f}"
        vs = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['provider']} | {r['time_s']:.3f} | "
            f"{r['time_vs_fastest']:.2f}x | {mib} | {vs} | {r['max_rel_err_vs_eager']:.1e} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run.py --profile linear", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (fp32 cases) or cuda (bf16 cases)")
    p.add_argument("--quick", action="store_true", help="smaller shapes, for iterating")
    p.add_argument("--cases", nargs="+", help="ce:NxHxV / bce:NxHxL instead of the defaults")
    p.add_argument("--providers", default="", help="comma-separated subset (eager always runs)")
    p.add_argument("--chunk-sizes", type=lambda v: tuple(int(k) for k in v.split(",")),
                   default=(), help="also run fusedloss with these explicit chunk sizes")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--child-memory", nargs=2, metavar=("CASE", "PROVIDER"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child_memory:
        print(json.dumps({"bytes": child_memory(*args.child_memory, args.device)}))
        return 0
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    cases = args.cases or SHAPES[(dev.type, args.quick)]
    rows = [r for case in cases for r in run_case(case, args)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; "
          f"{args.rounds} interleaved rounds")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
