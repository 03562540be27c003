"""Causal-LM training forward that never makes the logits: linear_cross_entropy on lm_head's input.

For the classes listed in LINEAR_CAUSAL_LMS, the stock forward is (read in transformers 5.24.0):
base model -> last hidden state -> `slice_logits_to_keep` -> `logits = self.lm_head(hidden)`
-> (Gemma-2/3 only) `logits = cap * tanh(logits / cap)` -> `self.loss_function(logits, labels,
vocab_size, **kwargs)`; nothing else touches the logits. So the loss equals
`ForCausalLMLoss(softcap(lm_head(h)), labels, **kwargs)`, where h is what the forward hands to
lm_head, and that is `linear_cross_entropy(h, lm_head.weight, shifted labels,
linear_bias=lm_head.bias, softcap=cap)`.

To get h without the matmul, lm_head's `forward` is replaced, for the duration of the call
only, by one that records its input and returns it unchanged (the forward's later use of that
"logits" costs a hidden-sized elementwise op at most; it is then dropped). The output carries
`logits=None`.

This module imports torch and fusedloss only, never transformers.
"""

from __future__ import annotations

import torch
from torch import nn

import fusedloss

from .hf_forward import WrapState, run_unlabelled
from .hf_losses import divide_by_items, shift_causal_labels

# class name -> the config attribute holding its final-logit softcap (None: it applies none).
LINEAR_CAUSAL_LMS = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "GemmaForCausalLM": None,
    "Gemma2ForCausalLM": "final_logit_softcapping",
    "GPT2LMHeadModel": None,
}


class _RecordInput(nn.Module):
    """Stands in for lm_head: records the hidden state, returns it (no matmul)."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, hidden):
        self.inputs.append(hidden)
        return hidden


def lm_head_input(model, state: WrapState, args: tuple, kwargs: dict):
    """Run the unlabelled forward with lm_head recording instead of projecting.

    Returns (hidden state lm_head was given, the forward's output)."""
    # The submodule is swapped, not its `forward` attribute: torch.compile traces a module
    # swap, while it replayed the set and `del` of an instance attribute onto a Linear that
    # no longer had it (AttributeError on the first compiled call).
    head = model.lm_head
    record = _RecordInput()
    model.lm_head = record
    try:
        out = run_unlabelled(model, state, args, kwargs)
    finally:
        model.lm_head = head
    if len(record.inputs) != 1:
        raise RuntimeError(
            f"{type(model).__name__}.forward called lm_head {len(record.inputs)} times, "
            "expected once; fusedloss cannot take the fused linear path for it "
            "(use fusedloss.integrations.transformers.apply(model, linear=False))")
    return record.inputs[0], out


def linear_causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, *,
                          softcap: float | None = None, num_items_in_batch=None,
                          ignore_index: int = -100, shift_labels: torch.Tensor | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """ForCausalLMLoss(softcap(head(hidden)), labels, ...) without making head(hidden)."""
    target = shift_causal_labels(labels, ignore_index, shift_labels)
    h = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1).to(h.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    # under autocast, linear_cross_entropy casts h, W, b as nn.Linear would
    loss = fusedloss.linear_cross_entropy(
        h, head.weight, target, linear_bias=head.bias, reduction=reduction,
        ignore_index=ignore_index, softcap=softcap, backend=backend)
    if reduction == "sum":
        loss = divide_by_items(loss, num_items_in_batch)
    return loss


def loss_from_hidden(model, labels, args: tuple, kwargs: dict, state: WrapState):
    """WrapState.loss_from for the fused linear path: (loss, output without logits)."""
    hidden, out = lm_head_input(model, state, args, kwargs)
    attr = state.options["softcap_attr"]
    softcap = getattr(model.config, attr) if attr is not None else None
    loss = linear_causal_lm_loss(
        hidden, model.lm_head, labels, softcap=softcap,
        num_items_in_batch=kwargs.get("num_items_in_batch"),
        ignore_index=kwargs.get("ignore_index", -100),
        shift_labels=kwargs.get("shift_labels"), backend=state.options["backend"])
    out["logits"] = None
    return loss, out
