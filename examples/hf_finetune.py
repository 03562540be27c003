"""Train a tiny Llama-style model with a 128k vocabulary on the CPU, stock vs fusedloss.

    python examples/hf_finetune.py              # 8 steps of 2x256 tokens, about a minute
    python examples/hf_finetune.py --steps 20 --tokens 4x256

The model is tiny (hidden 64, 2 layers) except for its Llama-3-sized vocabulary (128256), so
the loss is most of the work and the logits are most of the memory, as in a real fine-tune of
a small model. The data is a toy language (each token is followed by a fixed other one), so
the loss falls visibly within a few steps.

Each variant trains in its own process from the same initial weights on the same batches:
  stock      transformers as installed;
  fusedloss  fusedloss.integrations.transformers.apply(model): the loss comes from
             fusedloss.linear_cross_entropy on the last hidden state and lm_head.weight, and
             the training forward returns logits=None (the logits never exist).
It prints both loss curves (they agree to float tolerance) and each process's peak RSS (the
whole process: Python, torch, model, optimizer and the training steps), with
MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

VOCAB = 128256


def toy_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 0):
    """Sequences of a fixed successor map over 4096 tokens spread across the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randperm(vocab, generator=g)[:4096]
    successor = torch.randperm(4096, generator=g)
    for _ in range(steps):
        idx = torch.empty(batch, seq, dtype=torch.long)
        idx[:, 0] = torch.randint(0, 4096, (batch,), generator=g)
        for t in range(1, seq):
            idx[:, t] = successor[idx[:, t - 1]]
        ids = tokens[idx]
        labels = ids.clone()
        labels[:, :4] = -100  # a short ignored prompt
        yield ids, labels


def train(variant: str, steps: int, batch: int, seq: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max(seq, 64))
    model = LlamaForCausalLM(cfg).train()
    if variant == "fusedloss":
        import fusedloss.integrations.transformers as flt

        flt.apply(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, t0 = [], time.perf_counter()
    for ids, labels in toy_batches(steps, batch, seq, VOCAB):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if variant == "fusedloss":
            assert out.logits is None  # the fused linear path made no logits
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(variant=variant, losses=losses, seconds=seconds, peak_rss_mib=peak_mib)


def run_in_child(variant: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant,
           "--steps", str(args.steps), "--tokens", args.tokens]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--tokens", default="2x256", help="BATCHxSEQ per step")
    p.add_argument("--child", choices=("stock", "fusedloss"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batch, seq = (int(v) for v in args.tokens.lower().split("x"))
    if args.child:
        print(json.dumps(train(args.child, args.steps, batch, seq)))
        return 0
    runs = {v: run_in_child(v, args) for v in ("stock", "fusedloss")}
    logits_mib = batch * seq * VOCAB * 4 / 2**20
    print(f"tiny Llama, vocab {VOCAB}, {batch}x{seq} tokens/step; one fp32 logits tensor "
          f"is {logits_mib:.0f} MiB")
    print(f"{'step':>4}  {'stock loss':>12}  {'fusedloss loss':>14}")
    for i, (a, b) in enumerate(zip(runs["stock"]["losses"], runs["fusedloss"]["losses"],
                                   strict=True)):
        print(f"{i:>4}  {a:>12.5f}  {b:>14.5f}")
    for v, r in runs.items():
        print(f"{v:>10}: peak RSS {r['peak_rss_mib']:7.0f} MiB, "
              f"{r['seconds'] / args.steps:6.2f} s/step")
    saved = runs["stock"]["peak_rss_mib"] - runs["fusedloss"]["peak_rss_mib"]
    print(f"fusedloss saves {saved:.0f} MiB of peak RSS ({saved / logits_mib:.1f}x the logits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
