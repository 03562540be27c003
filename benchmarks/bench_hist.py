#!/usr/bin/env python
"""Cost of the threshold histogram in the fused BCE pass (`python benchmarks/run.py --profile
hist [--cases R1xC1,R2xC2] [--bins N] [--rounds K] [--threads T] [--stat median|min]`).

For each (rows, classes) shape, fp32 logits and uint8 multi-hot targets, fusedloss's
binary_cross_entropy_with_logits is timed side by side, in rounds in which every variant runs
once in turn (so machine noise hits all alike):
  fwd          evaluation: the loss only (no gradient), as on a validation set;
  fwd+hist     the same with histogram=ThresholdHistogram(C, bins) (the same pass adds to it);
  fwd+update   the loss, then a separate ThresholdHistogram.update(logits, target) (what a
               user without the fused histogram does: a second pass over the logits);
  train, train+hist   the training forward (the fused gradient is computed too), without and
               with the histogram.
Reported: the median (or the fastest, `--stat min`: steadier on a shared machine) per variant
and the ratios fwd+hist / fwd and train+hist / train (the histogram's overhead; the target is
at most 1.15 on the CPU). `--threads` sets torch's CPU threads. The cost floor of counting
itself, one 16-bit increment per element, is measured by benchmarks/increment_floor.cpp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from timing import Timer  # noqa: E402

DEFAULT_CASES = {"cpu": ["65536x256", "4096x32768"], "cuda": ["65536x1024", "16384x131072"]}


def _inputs(rows, classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=g) * 3).to(device)
    y = (torch.rand(rows, classes, generator=g) < 0.1).to(torch.uint8).to(device)
    return x, y


def variants(x, y, bins: int) -> dict:
    """name -> a call of one variant on (x, y)."""
    import fusedloss as fl
    from fusedloss.thresholds import ThresholdHistogram

    classes = x.shape[-1]
    hist = ThresholdHistogram(classes, bins=bins, device=x.device)
    xg = x.clone().requires_grad_(True)
    bce = fl.binary_cross_entropy_with_logits

    def fwd(h=None):
        with torch.no_grad():
            return bce(x, y, histogram=h)

    def fwd_update():
        with torch.no_grad():
            out = bce(x, y)
        hist.update(x, y)
        return out

    return {"fwd": fwd, "fwd+hist": lambda: fwd(hist), "fwd+update": fwd_update,
            "train": lambda: bce(xg, y), "train+hist": lambda: bce(xg, y, histogram=hist)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", help="comma-separated ROWSxCLASSES shapes")
    p.add_argument("--bins", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own)")
    p.add_argument("--stat", choices=["median", "min"], default="median")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = args.cases.split(",") if args.cases else DEFAULT_CASES[device.type]
    print(f"histogram in the fused BCE pass, {device.type}, {torch.get_num_threads()} threads, "
          f"fp32 logits, uint8 targets, {args.bins} bins, {args.stat} of {args.rounds} rounds")
    print("| shape | fwd ms | fwd+hist ms | fwd+update ms | train ms | train+hist ms | "
          "fwd+hist / fwd | train+hist / train |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        rows, classes = (int(v) for v in case.split("x"))
        x, y = _inputs(rows, classes, device)
        t = Timer(device).round_robin(variants(x, y, args.bins), args.rounds,
                                      min if args.stat == "min" else statistics.median)
        ms = {k: v * 1e3 for k, v in t.items()}
        print(f"| {case} | {ms['fwd']:.2f} | {ms['fwd+hist']:.2f} | {ms['fwd+update']:.2f} | "
              f"{ms['train']:.2f} | {ms['train+hist']:.2f} | {t['fwd+hist'] / t['fwd']:.3f} | "
              f"{t['train+hist'] / t['train']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
