"""Vocabulary-parallel cross-entropy for a tensor-parallel LM head, with torch.distributed.

    torchrun --nproc-per-node 2 examples/distributed_ce.py          # CPU: gloo
    python examples/distributed_ce.py --nproc 2                     # same, spawns the ranks itself

Each rank holds a slice of the LM head (vocab/world rows of the (vocab, hidden) matrix, the
last rank a smaller one: shards may be uneven), so each computes only its slice of the logits.
fusedloss.distributed.cross_entropy turns those slices into the loss, the gradient and the
argmax decoding of the full softmax with one all_gather of a few numbers per token; the logits
are never gathered. The script trains the head for a few steps on a toy next-token task, checks
step 0 against torch.nn.functional.cross_entropy on the gathered logits, and times both.
On CUDA (one GPU per rank) it uses NCCL.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fusedloss import distributed as fd


def shard_sizes(vocab: int, world: int) -> list[int]:
    """ceil(vocab / world) per rank, the remainder on the last one (uneven on purpose)."""
    per = -(-vocab // world)
    sizes = [min(per, vocab - r * per) for r in range(world)]
    assert all(s > 0 for s in sizes), f"vocab {vocab} too small for {world} ranks"
    return sizes


def gathered_reference(local_logits, target, label_smoothing=0.0, group=None):
    """The baseline: all_gather the logits (vocab-sized per token), run torch on the full
    logits, keep this rank's slice of the gradient. Returns (loss, local grad, full logits)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [None] * world
    dist.all_gather_object(sizes, local_logits.shape[-1], group=group)
    width = max(sizes)
    padded = F.pad(local_logits.detach(), (0, width - local_logits.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    full = torch.cat([p[:, :s] for p, s in zip(parts, sizes, strict=True)], dim=-1).requires_grad_()
    loss = F.cross_entropy(full, target, label_smoothing=label_smoothing)
    loss.backward()
    start = sum(sizes[:rank])
    return loss.detach(), full.grad[:, start:start + sizes[rank]], full.detach()


def _setup(args):
    """Process group, device, and this rank's slice of the head; the data on every rank."""
    cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    sizes = shard_sizes(args.vocab, world)
    start = sum(sizes[:rank])
    # Same seed everywhere: every rank builds the same full head and data, keeps its slice.
    g = torch.Generator().manual_seed(0)
    head = torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5
    hidden = torch.randn(args.tokens, args.hidden, generator=g)
    # toy task: learn to map each (fixed) hidden state to its random next token
    target = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    target[:: args.tokens // 8] = -100  # a few padded positions
    w_local = head[start:start + sizes[rank]].clone().to(device).requires_grad_()
    return cuda, rank, world, w_local, hidden.to(device), target.to(device)


def _check_step0(loss_fn, hidden, w_local, target, rank) -> None:
    """Same loss and head gradient as torch on the gathered logits."""
    logits = hidden @ w_local.T
    out = loss_fn(logits, target)
    (gw,) = torch.autograd.grad(out.loss, w_local)
    ref, ref_glogits, full = gathered_reference(logits, target)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref_glogits.T @ hidden, rtol=1e-4, atol=1e-6)
    assert torch.equal(out.pred, full.argmax(-1))
    if rank == 0:
        print(f"step 0 matches torch on the gathered logits: loss {out.loss.item():.5f}")


def _time(args, loss_fn, hidden, w_local, target, cuda, rank, world) -> None:
    """fwd+bwd of the loss alone, ours vs all_gather(logits) + torch."""
    logits = (hidden @ w_local.T).detach()

    def ours():
        x = logits.detach().requires_grad_()  # a fresh leaf, no copy
        loss_fn(x, target).loss.backward()

    def gathered():
        gathered_reference(logits, target, args.label_smoothing)  # (no z-loss term)

    for name, fn in (("fusedloss.distributed", ours), ("all_gather + F.cross_entropy", gathered)):
        fn()
        dist.barrier()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        times.sort()
        if rank == 0:
            print(f"{name:30s} median {1e3 * times[len(times) // 2]:8.2f} ms  "
                  f"({args.tokens} tokens x {args.vocab} vocab, {world} ranks, "
                  f"{'cuda/nccl' if cuda else 'cpu/gloo'})")


def run(args) -> None:
    cuda, rank, world, w_local, hidden, target = _setup(args)
    loss_fn = fd.VocabParallelCrossEntropyLoss(label_smoothing=args.label_smoothing,
                                               lse_square_scale=args.z_loss,
                                               return_decoding=True, validate=False)
    opt = torch.optim.SGD([w_local], lr=args.lr)
    if args.label_smoothing == 0 and args.z_loss == 0:
        _check_step0(loss_fn, hidden, w_local, target, rank)
    for step in range(args.steps):
        logits = hidden @ w_local.T  # (tokens, vocab_local): column-parallel LM head
        out = loss_fn(logits, target)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        acc = out.correct.sum() / (target != -100).sum()
        if rank == 0 and (step % max(1, args.steps // 5) == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {out.loss.item():.4f}  token accuracy {acc.item():.3f}")
    _time(args, loss_fn, hidden, w_local, target, cuda, rank, world)
    dist.destroy_process_group()


def _spawned(rank, world, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    run(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32_003, help="classes (uneven shards)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=5.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--z-loss", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even if CUDA is present")
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn without torchrun")
    p.add_argument("--port", type=int, default=29511)
    args = p.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        run(args)
    else:
        torch.multiprocessing.spawn(_spawned, args=(args.nproc, args), nprocs=args.nproc)


if __name__ == "__main__":
    main()
