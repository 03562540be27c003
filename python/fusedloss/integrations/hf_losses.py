"""fusedloss versions of transformers' `LOSS_MAPPING` functions (same names, same call convention).

Each function takes the arguments transformers' function of the same key takes
(`transformers.loss.loss_utils`), plus a keyword-only `backend`, and returns the same loss:
  * the same shift (causal LM: the prediction at position i is scored against label i + 1, the
    last position against nothing), the same `ignore_index` (-100 unless given), the same
    flattening;
  * `num_items_in_batch` honoured as transformers does for gradient accumulation across steps
    and devices: the per-token losses are summed, then divided by it;
  * sequence classification infers `config.problem_type` exactly as transformers does (and
    writes it to the config, as transformers does): single-label -> cross-entropy,
    multi-label -> BCE with logits, regression -> torch's MSELoss, untouched.
The logits are not upcast to fp32 first (transformers does, which copies them): the fused
kernels already compute in fp32, and the loss comes back in the logits' dtype.

This module imports torch and fusedloss only, never transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as fl


def divide_by_items(loss: Tensor, num_items_in_batch) -> Tensor:
    """`loss / num_items_in_batch`, the tensor moved to the loss's device (as transformers does)."""
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def fixed_cross_entropy(source: Tensor, target: Tensor, num_items_in_batch=None,
                        ignore_index: int = -100, *, backend: str = "auto",
                        **kwargs) -> Tensor:
    """Mean cross-entropy over the non-ignored rows, or their sum / num_items_in_batch."""
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = fl.cross_entropy(source, target, ignore_index=ignore_index, reduction=reduction,
                            backend=backend)
    if reduction == "sum":
        loss = divide_by_items(loss, num_items_in_batch)
    return loss


def shift_causal_labels(labels: Tensor, ignore_index: int = -100,
                        shift_labels: Tensor | None = None) -> Tensor:
    """Labels one position to the left, the last position ignored; `shift_labels` if given."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def ForCausalLMLoss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                    ignore_index: int = -100, shift_labels: Tensor | None = None, *,
                    backend: str = "auto", **kwargs) -> Tensor:
    target = shift_causal_labels(labels, ignore_index, shift_labels)
    logits = logits.reshape(-1, vocab_size)
    target = target.reshape(-1).to(logits.device)
    return fixed_cross_entropy(logits, target, num_items_in_batch, ignore_index,
                               backend=backend)


def ForMaskedLMLoss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                    ignore_index: int = -100, *, backend: str = "auto", **kwargs) -> Tensor:
    logits = logits.reshape(-1, vocab_size)
    labels = labels.reshape(-1).to(logits.device)
    return fixed_cross_entropy(logits, labels, num_items_in_batch, ignore_index,
                               backend=backend)


def infer_problem_type(config, labels: Tensor) -> str:
    """transformers' rule: one label -> regression; integer labels -> single-label; else multi."""
    if config.problem_type is None:
        num_labels = config.num_labels
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    return config.problem_type


def ForSequenceClassificationLoss(labels: Tensor, pooled_logits: Tensor, config, *,
                                  backend: str = "auto", **kwargs) -> Tensor:
    num_labels = config.num_labels
    problem_type = infer_problem_type(config, labels)
    labels = labels.to(pooled_logits.device)
    if problem_type == "regression":  # not a classification loss: torch's, as transformers
        if num_labels == 1:
            return F.mse_loss(pooled_logits.squeeze(), labels.squeeze())
        return F.mse_loss(pooled_logits, labels)
    if problem_type == "single_label_classification":
        return fixed_cross_entropy(pooled_logits.reshape(-1, num_labels), labels.reshape(-1),
                                   backend=backend, **kwargs)
    if problem_type == "multi_label_classification":
        return fl.binary_cross_entropy_with_logits(pooled_logits, labels, backend=backend)
    raise RuntimeError(f"Invalid problem type: {problem_type}")


def ForTokenClassification(logits: Tensor, labels: Tensor, config, *, backend: str = "auto",
                           **kwargs) -> Tensor:
    logits = logits.reshape(-1, config.num_labels)
    labels = labels.reshape(-1).to(logits.device)
    return fixed_cross_entropy(logits, labels, backend=backend, **kwargs)


def ForQuestionAnsweringLoss(start_logits: Tensor, end_logits: Tensor, start_positions,
                             end_positions, *, backend: str = "auto", **kwargs):
    """Mean of the start and end losses; positions beyond the sequence are ignored."""
    if start_positions is None or end_positions is None:
        return None
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    start_positions = start_positions.to(start_logits.device)
    end_positions = end_positions.to(end_logits.device)
    ignored = start_logits.size(1)
    start_positions = start_positions.clamp(0, ignored)
    end_positions = end_positions.clamp(0, ignored)
    start = fixed_cross_entropy(start_logits, start_positions, ignore_index=ignored,
                                backend=backend, **kwargs)
    end = fixed_cross_entropy(end_logits, end_positions, ignore_index=ignored,
                              backend=backend, **kwargs)
    return (start + end) / 2


# Keys of transformers' LOSS_MAPPING whose loss is a softmax/sigmoid classification loss; the
# others (detection, segmentation masks, CTC, RNN-T, TTS) keep transformers' own functions.
LOSSES = {
    "ForCausalLM": ForCausalLMLoss,
    "ForConditionalGeneration": ForCausalLMLoss,
    "CsmForConditionalGeneration": ForCausalLMLoss,
    "ForMaskedLM": ForMaskedLMLoss,
    "ForQuestionAnswering": ForQuestionAnsweringLoss,
    "ForSequenceClassification": ForSequenceClassificationLoss,
    "ForImageClassification": ForSequenceClassificationLoss,
    "ForVideoClassification": ForSequenceClassificationLoss,
    "ForAudioClassification": ForSequenceClassificationLoss,
    "ForTokenClassification": ForTokenClassification,
}

CAUSAL_KEYS = frozenset(k for k, f in LOSSES.items() if f is ForCausalLMLoss)
