"""Hugging Face transformers: one call makes a model train with fusedloss.

    import fusedloss.integrations.transformers as flt
    model = flt.apply(model)                 # causal LMs: fused linear + CE, no logits
    model = flt.apply(model, linear=False)   # keep the logits, fused CE on them
    model.loss_function = functools.partial(flt.LOSSES["ForCausalLM"], backend="native")

Supported: transformers 5.x (tested with 5.24.0); older versions are refused, newer major
versions get a warning. Importing this module imports neither transformers nor anything that
needs it; `apply` does. See docs/transformers.md.

`apply(model, *, linear=True, backend="auto")` changes that model instance only and returns it:
  * causal LMs (LINEAR_CAUSAL_LMS: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2 with its
    final-logit softcap, GPT-2) with `linear=True`: a forward given labels computes the loss
    with `fusedloss.linear_cross_entropy` from lm_head's input and weight, and returns
    `logits=None` (the logits are never made). Without labels the stock forward runs;
  * any model whose forward calls `self.loss_function` with a LOSSES key (causal LMs with
    `linear=False`, the Generic sequence/token classification and QA heads of Llama & co.,
    ModernBERT's MLM...): `model.loss_function` becomes the fusedloss function;
  * BERT, RoBERTa and DistilBERT masked-LM / sequence / token classification heads, whose
    forward computes its loss inline (hf_inline_heads.py);
  * anything else: TypeError naming the model class.
"""

from __future__ import annotations

import functools
import inspect
import warnings

from .. import _backend
from . import hf_forward
from .hf_causal_lm import LINEAR_CAUSAL_LMS, loss_from_hidden
from .hf_inline_heads import INLINE_HEADS, loss_from_logits
from .hf_losses import CAUSAL_KEYS, LOSSES

__all__ = ["LOSSES", "SUPPORTED_TRANSFORMERS", "apply", "remove"]

SUPPORTED_TRANSFORMERS = ">=5.0,<6 (tested with 5.24.0)"


def _check_version() -> None:
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    if v.major < 5:
        raise RuntimeError(
            f"fusedloss.integrations.transformers supports transformers {SUPPORTED_TRANSFORMERS}"
            f"; found {transformers.__version__}")
    if v.major > 5:
        warnings.warn(f"fusedloss.integrations.transformers was tested with transformers "
                      f"5.x; found {transformers.__version__}", stacklevel=3)


def _library_class(model, names) -> type | None:
    """The transformers class in type(model)'s MRO whose name is in `names`, if any."""
    for cls in type(model).__mro__:
        if cls.__name__ in names and cls.__module__.startswith("transformers.models."):
            return cls
    return None


def _checked_class(model, names, what: str) -> type | None:
    """_library_class, refusing a subclass that overrides the forward we know."""
    cls = _library_class(model, names)
    if cls is not None and type(model).forward is not cls.forward:
        raise TypeError(
            f"{type(model).__name__} overrides {cls.__name__}.forward; fusedloss knows how "
            f"{cls.__name__}.forward {what} but not how the override does")
    return cls


def _loss_key(model) -> str:
    """The LOSS_MAPPING key `model.loss_function` resolves to (transformers' own fallback)."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    key = getattr(model, "loss_type", None)
    return key if key in LOSS_MAPPING else "ForCausalLM"


def _calls_loss_function(model) -> bool:
    """Does the model's forward compute its loss through `self.loss_function`?"""
    try:
        source = inspect.getsource(inspect.unwrap(type(model).forward))
    except (OSError, TypeError):
        return False
    return "self.loss_function(" in source


def _fused_loss_function(key: str, backend: str):
    fn = functools.partial(LOSSES[key], backend=backend)
    fn._fusedloss = True  # lets a second apply() recognise and replace it
    return fn


def _unrecognised(model, linear: bool) -> TypeError:
    name = type(model).__name__
    hint = (" (for a causal LM outside that list, linear=False fuses the loss on the "
            "logits if its forward calls self.loss_function)" if linear else "")
    return TypeError(
        f"fusedloss.integrations.transformers.apply does not recognise {name}: its forward "
        f"neither is one of the fused linear causal LMs ({', '.join(LINEAR_CAUSAL_LMS)}) nor "
        f"calls self.loss_function with a key of LOSSES, nor is one of the inline-loss heads "
        f"({', '.join(INLINE_HEADS)}){hint}")


def remove(model):
    """Undo `apply` on `model` (that instance): stock forward and loss again; returns it. A
    model never patched is returned unchanged."""
    hf_forward.uninstall(model)
    return model


def apply(model, *, linear: bool = True, backend: str = "auto"):
    """Make `model` (that instance) compute its training loss with fusedloss; returns it.

    linear: for the causal LMs of LINEAR_CAUSAL_LMS, compute the loss from the last hidden
        state and lm_head.weight with `fusedloss.linear_cross_entropy`; the output of a forward
        given labels then has `logits=None`. Ignored for other heads.
    backend: "auto", "native", "triton" or "torch", passed to every fusedloss call.
    """
    from transformers import PreTrainedModel

    _check_version()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(linear, bool):
        raise TypeError(f"linear must be True or False, got {linear!r}")
    if backend != "auto" and backend not in _backend.KNOWN:
        raise ValueError(f"backend must be one of {['auto', *_backend.KNOWN]}, got {backend!r}")

    hf_forward.uninstall(model)
    key = _loss_key(model)
    uses_loss_function = key in LOSSES and _calls_loss_function(model)
    causal = _library_class(model, LINEAR_CAUSAL_LMS) or key in CAUSAL_KEYS
    if linear and causal:
        cls = _checked_class(model, LINEAR_CAUSAL_LMS, "feeds lm_head")
        if cls is None:
            raise _unrecognised(model, linear)
        state = hf_forward.WrapState(cls.forward, loss_from_hidden, backend=backend,
                                     softcap_attr=LINEAR_CAUSAL_LMS[cls.__name__])
        hf_forward.install(model, state)
        model.loss_function = _fused_loss_function(key, backend)
        return model
    if uses_loss_function:
        model.loss_function = _fused_loss_function(key, backend)
        return model
    cls = _checked_class(model, INLINE_HEADS, "computes its loss")
    if cls is None:
        raise _unrecognised(model, linear)
    state = hf_forward.WrapState(cls.forward, loss_from_logits, backend=backend,
                                 kind=INLINE_HEADS[cls.__name__])
    hf_forward.install(model, state)
    return model
