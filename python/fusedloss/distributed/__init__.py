"""Vocabulary-parallel softmax cross-entropy over torch.distributed (tensor-parallel LM heads).

Each rank of `group` holds the logits of one contiguous slice of the classes,
`local_logits[..., c]` being global class `class_start + c` (shards may be uneven); every rank
holds the same global `target`. The loss, its gradient and the decodings equal those of
`torch.nn.functional.cross_entropy` on the gathered logits, without ever gathering them: each
rank reduces its slice to a few (rows,) statistics, one all_gather exchanges them, and every
rank combines them identically (the math: `_function.py`).

Modules, in the order a call uses them:
    loss.py          cross_entropy and VocabParallelCrossEntropyLoss (the public API)
    _validation.py   checks that raise the same error on every rank (one header all_gather)
    _function.py     the autograd Function: local statistics, the exchange, the combination,
                     the local backward
    _collectives.py  the one all_gather primitive and the shard layout

Collectives per forward (all on `group`, nothing else is touched, so data parallelism over
other process groups (DDP, FSDP) composes):
  - validate=True (default): 2 all_gathers. (1) a fixed 16-int64 header per rank (batch shape,
    shard size and start, a checksum of target and weight, an options hash, local errors);
    every rank checks the gathered headers and raises the SAME error, so bad input on one rank
    cannot hang the others. Reading it back costs one host synchronisation.
    (2) the packed statistics: (2 + [eps>0] + 2*[decoding]) x rows floats + 16 bytes per rank.
  - validate=False: 1 all_gather (the statistics) when class_start is given, no host sync;
    when class_start is None, 1 more all_gather of the shard sizes (and one host sync) first:
    the module VocabParallelCrossEntropyLoss does that once and keeps the layout.
Collectives per backward: none.

Weights: pass the FULL (num_classes,) weight on every rank (it is small next to the logits);
each rank slices its part. Layout: classes are the LAST dim of local_logits (Megatron's
(batch, seq, vocab/tp) layout); target has local_logits' shape without it.
"""

from .. import CrossEntropyOutput
from ._collectives import shard_layout
from .loss import VocabParallelCrossEntropyLoss, cross_entropy

__all__ = ["cross_entropy", "VocabParallelCrossEntropyLoss", "shard_layout", "CrossEntropyOutput"]
