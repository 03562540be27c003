"""fusedloss: fused softmax cross-entropy and sigmoid BCE with decodings, drop-in for torch.nn.

Importing loads the built extensions (if any) and records which backends are usable; it
patches nothing.
"""

from . import (
    _backend,
    _native,  # noqa: F401  (registers "native" when built)
    _torch_backend,  # noqa: F401  (registers "torch")
)
from ._backend import available_backends, resolve_backend
from ._native import check_errors, empty_cache
from .functional import (
    BCEOutput,
    CrossEntropyOutput,
    SigmoidDecoding,
    SoftmaxDecoding,
    binary_cross_entropy_with_logits,
    cross_entropy,
    sigmoid_decode,
    softmax_decode,
)
from .linear import (
    LinearBCEWithLogitsLoss,
    LinearCrossEntropyLoss,
    linear_binary_cross_entropy_with_logits,
    linear_cross_entropy,
)
from .modules import BCEWithLogitsLoss, CrossEntropyLoss
from .thresholds import (
    CrossValidatedThresholds,
    ThresholdHistogram,
    ThresholdIntervals,
    TunedThresholds,
    bootstrap_thresholds,
    cross_validate_thresholds,
    tune_thresholds,
)

try:
    from . import _triton  # noqa: F401  (registers "triton" when usable)
except ImportError as e:  # triton is not installed
    _backend.mark_unavailable("triton", f"import failed: {e}")

__all__ = [
    "BCEOutput",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "CrossEntropyOutput",
    "LinearBCEWithLogitsLoss",
    "LinearCrossEntropyLoss",
    "CrossValidatedThresholds",
    "SigmoidDecoding",
    "SoftmaxDecoding",
    "ThresholdHistogram",
    "ThresholdIntervals",
    "TunedThresholds",
    "available_backends",
    "bootstrap_thresholds",
    "check_errors",
    "empty_cache",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_binary_cross_entropy_with_logits",
    "linear_cross_entropy",
    "cross_validate_thresholds",
    "resolve_backend",
    "sigmoid_decode",
    "softmax_decode",
    "tune_thresholds",
]
__version__ = "0.1.0"
