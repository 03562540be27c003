"""The collectives vocabulary-parallel cross-entropy uses: one all_gather primitive, and the
shard layout derived from it.

Every collective goes through `all_gather`, so the number of collectives per call can be
counted in one place (the tests do).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def all_gather(out: Tensor, inp: Tensor, group) -> None:
    """All ranks' `inp` stacked into `out` (world * inp.numel()). One collective."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def gather_rows(inp: Tensor, group, world: int) -> Tensor:
    """(world, inp.numel()): row r is rank r's `inp`."""
    out = inp.new_empty((world * inp.numel(),))
    all_gather(out, inp.reshape(-1), group)
    return out.view(world, -1)


def comm_device(local_logits, group) -> torch.device:
    """The device the collectives of `group` run on: the logits' own, else NCCL's or the CPU."""
    if isinstance(local_logits, Tensor):
        return local_logits.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_layout(local_classes: int, group=None) -> tuple[int, int]:
    """(class_start, num_classes) for contiguous shards in rank order: the exclusive prefix sum
    of every rank's `local_classes` and their total. One all_gather and one host sync; call it
    once and pass the result to cross_entropy (the module does)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dev = comm_device(None, group)
    sizes = gather_rows(torch.tensor([int(local_classes)], dtype=torch.int64, device=dev),
                        group, world).reshape(-1).tolist()
    bad = [(r, s) for r, s in enumerate(sizes) if s <= 0]
    if bad:
        raise ValueError(f"every rank must hold at least one class; local_logits.shape[-1] "
                         f"is {bad[0][1]} on rank {bad[0][0]} (sizes {sizes})")
    return sum(sizes[:rank]), sum(sizes)
