"""The accumulation dtype rule of every fusedloss op, in one place.

Losses, row sums and statistics are accumulated in fp32 for fp16/bf16/fp32 inputs and in fp64
for fp64 inputs; side tensors (weights, thresholds, scales) are read in the same dtype.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a logits dtype: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
