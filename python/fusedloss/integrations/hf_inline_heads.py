"""Heads whose forward computes its loss inline with torch.nn losses instead of `loss_function`.

BERT-style models build `CrossEntropyLoss()` / `BCEWithLogitsLoss()` inside `forward`, so
setting `model.loss_function` does nothing for them. For the classes listed here (forwards read
in transformers 5.24.0) the inline loss is exactly the `LOSS_MAPPING` function named below,
called without `num_items_in_batch` (these forwards ignore it), so the wrapper runs the forward
without labels and computes that loss with fusedloss from the returned logits:
  * masked LM: mean cross-entropy of logits.view(-1, vocab_size) vs labels.view(-1), -100 ignored;
  * sequence classification: problem_type inferred as transformers does; single-label ->
    cross-entropy, multi-label -> BCE with logits, regression -> torch's MSELoss;
  * token classification: mean cross-entropy of logits.view(-1, num_labels), -100 ignored.

This module imports torch and fusedloss only, never transformers.
"""

from __future__ import annotations

from .hf_forward import WrapState, run_unlabelled
from .hf_losses import ForMaskedLMLoss, ForSequenceClassificationLoss, ForTokenClassification

_MODELS = ("Bert", "Roberta", "DistilBert")
_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")
# class name -> head kind (the LOSS_MAPPING key of the loss its forward computes inline)
INLINE_HEADS = {m + h: h for m in _MODELS for h in _HEADS}


def _head_loss(kind: str, model, logits, labels, backend: str):
    config = model.config
    if kind == "ForMaskedLM":
        return ForMaskedLMLoss(logits, labels, logits.shape[-1], backend=backend)
    if kind == "ForSequenceClassification":
        return ForSequenceClassificationLoss(labels, logits, config, backend=backend)
    return ForTokenClassification(logits, labels, config, backend=backend)


def loss_from_logits(model, labels, args: tuple, kwargs: dict, state: WrapState):
    """WrapState.loss_from for inline heads: (loss, output with its logits)."""
    out = run_unlabelled(model, state, args, kwargs)
    loss = _head_loss(state.options["kind"], model, out["logits"], labels,
                      state.options["backend"])
    return loss, out
