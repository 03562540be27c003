#!/usr/bin/env python
"""Profile `hf`: one training step of a Hugging Face Llama-style causal LM, stock vs fusedloss.

    python benchmarks/run.py --profile hf                     # GPU if present, else CPU
    python benchmarks/run.py --profile hf --device cpu --vocab 128256 --tokens 2x512

Variants, each in its own process (so one's allocations cannot hide in another's peak):
  stock             transformers as installed: logits = lm_head(h), ForCausalLMLoss upcasts
                    them to fp32, torch cross_entropy;
  fusedloss-logits  fusedloss.integrations.transformers.apply(model, linear=False): the same
                    logits, fusedloss cross-entropy on them;
  fusedloss         apply(model) (linear=True): linear_cross_entropy on the last hidden state
                    and lm_head.weight, no logits.
A step is forward with labels, backward, SGD step, zero_grad(set_to_none=True) (so every step
allocates its gradients). Time: median over the timed steps after warm-up. Peak memory: what
one step needs beyond what is resident before it (parameters, optimizer state, inputs); on CPU
the process's peak RSS during the step (glibc MALLOC_MMAP_THRESHOLD_=65536 so freed buffers
leave RSS), on CUDA torch.cuda.max_memory_allocated. The logits' share is the bytes of one fp32
logits tensor (tokens x vocab x 4) over the stock step's peak: the target is a fused peak at
least that much lower than stock's, at no more time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import report  # noqa: E402
from timing import Timer, peak_memory, summarize  # noqa: E402

VARIANTS = ("stock", "fusedloss-logits", "fusedloss")
DEFAULTS = {  # device type -> model and batch size of the profile
    "cpu": dict(hidden=128, layers=2, tokens="2x512", dtype="fp32", steps=5),
    "cuda": dict(hidden=2048, layers=4, tokens="4x2048", dtype="bf16", steps=20),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, help="hidden size (default: 128 CPU, 2048 CUDA)")
    p.add_argument("--layers", type=int, help="decoder layers (default: 2 CPU, 4 CUDA)")
    p.add_argument("--tokens", help="BATCHxSEQ per step (default: 2x512 CPU, 4x2048 CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="fp32 (CPU default) or bf16")
    p.add_argument("--steps", type=int, help="timed steps (default: 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--backend", default="auto", help="fusedloss backend")
    p.add_argument("--out", default=str(report.REPO / "bench_results"))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for k, v in DEFAULTS[torch.device(args.device).type].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    batch, seq = (int(v) for v in args.tokens.lower().split("x"))
    args.batch, args.seq = batch, seq
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    return args


def build(args, variant: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    import fusedloss.integrations.transformers as flt

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128),
                      max_position_embeddings=max(args.seq, 64), attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=DTYPES[args.dtype]).train()
    if variant != "stock":
        flt.apply(model, linear=variant == "fusedloss", backend=args.backend)
    return model


def run_child(args) -> dict:
    """One variant in this process: warm-up steps, timed steps, one step's peak memory."""
    device = torch.device(args.device)
    model = build(args, args.child)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 8] = -100  # an ignored prompt
    batch = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                 labels=labels.to(device))
    losses = []

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    timer = Timer(device)
    for _ in range(args.warmup):
        step()
    times = [timer.once(step) for _ in range(args.steps)]
    peak, method = peak_memory(timer, step)
    s = summarize(times)
    return dict(variant=args.child, median_ms=s.median_s * 1e3, iqr_ms=s.iqr_s * 1e3,
                peak_bytes=peak, mem_method=method, first_loss=losses[0], losses=losses,
                env=report.environment(device))


def run_variant(args, variant: str, argv) -> dict:
    env = dict(os.environ)
    if torch.device(args.device).type == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return dict(variant=variant, error=proc.stderr.strip().splitlines()[-1:] or ["?"])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(args, rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    env = ok[0]["env"] if ok else {}
    tokens = args.batch * args.seq
    logits_mb = tokens * args.vocab * 4 / 2**20
    stock = next((r for r in ok if r["variant"] == "stock"), None)
    lines = [f"# hf training step: Llama-style, vocab {args.vocab}, hidden {args.hidden}, "
             f"{args.layers} layers, {args.batch}x{args.seq} tokens, {args.dtype}", "",
             f"- device: {env.get('device_name')}; torch {env.get('torch')}, commit "
             f"{env.get('git_commit')}, fusedloss backends {env.get('fusedloss_backends')}",
             f"- memory: {ok[0]['mem_method'] if ok else '-'}",
             f"- one fp32 logits tensor: {logits_mb:.1f} MiB"
             + (f" = {100 * logits_mb * 2**20 / stock['peak_bytes']:.0f}% of the stock "
                f"step's peak (the logits' share)" if stock and stock["peak_bytes"] else ""),
             "", "| variant | median step ms | IQR ms | step peak MiB | time vs stock | "
             "peak vs stock | peak saved / logits | first loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | ERROR: {r['error'][0]} | | | | | | |")
            continue
        mb = r["peak_bytes"] / 2**20
        rel = ["-", "-", "-"]
        if stock:
            rel = [f"{r['median_ms'] / stock['median_ms']:.2f}x",
                   f"{r['peak_bytes'] / max(stock['peak_bytes'], 1):.2f}x",
                   f"{(stock['peak_bytes'] - r['peak_bytes']) / 2**20 / logits_mb:.2f}"]
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {mb:.1f} | "
                     + " | ".join(rel) + f" | {r['first_loss']:.6f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    rows = [run_variant(args, v, argv) for v in args.variants.split(",")]
    md = markdown(args, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"hf-{torch.device(args.device).type}-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps(dict(argv=argv, rows=rows), indent=1))
    (out / f"{stem}.md").write_text(md + "\n")
    print(md)
    firsts = [r["first_loss"] for r in rows if "error" not in r]
    agree = all(abs(f - firsts[0]) <= 1e-3 * abs(firsts[0]) for f in firsts)
    if not agree:
        print(f"first-step losses disagree: {firsts}", file=sys.stderr)
    return 0 if agree and len(firsts) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
