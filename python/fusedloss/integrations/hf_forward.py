"""Wrapping one transformers model's `forward` (that instance only) so fusedloss computes the loss.

The wrapper is a bound method stored on the instance (`model.forward`), like Liger-Kernel's
and accelerate's patches: the class, other instances, the state dict and `save_pretrained`
are untouched, `copy.deepcopy` rebinds it to the copy, nn.DataParallel's replicas get it
bound to themselves (`_replicate_for_data_parallel`), and `inspect.signature(model.forward)`
is the original's (the Trainer reads it to keep dataset columns and to decide whether the model
takes `num_items_in_batch`).

Calls without labels go straight to the original forward, so generation and evaluation without
labels run exactly the stock code. With labels, the original forward runs with `labels=None`
(so it computes no loss) and `return_dict=True`, and the wrapper's `loss_from` computes the
loss from what it returned; the output is rebuilt with the loss in front, then turned into a
tuple if the caller asked for one, as `can_return_tuple` does.

This module imports torch only, never transformers.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable

STATE_ATTR = "_fusedloss_state"


class WrapState:
    """What the wrapper needs: the original (unbound) forward and where `labels` sits in it."""

    def __init__(self, forward: Callable, loss_from: Callable, **options):
        self.forward = forward
        self.loss_from = loss_from  # (model, labels, args, kwargs, state) -> (loss, out)
        self.options = options
        params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
        positional = [p.name for p in params
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if "labels" not in positional:
            raise TypeError(f"{forward.__qualname__} has no `labels` argument")
        self.labels_pos = positional.index("labels")


def take_labels(args: tuple, kwargs: dict, pos: int):
    """Remove `labels` from a call (keyword or positional); returns (args, labels)."""
    if "labels" in kwargs:
        return args, kwargs.pop("labels")
    if len(args) > pos:
        labels = args[pos]
        return args[:pos] + (None,) + args[pos + 1:], labels
    return args, None


def _wrapped_call(model, *args, **kwargs):
    state: WrapState = getattr(model, STATE_ATTR)
    args, labels = take_labels(args, kwargs, state.labels_pos)
    if labels is None:
        return state.forward(model, *args, **kwargs)
    return_dict = model.config.return_dict
    passed = kwargs.pop("return_dict", return_dict)
    if passed is not None:
        return_dict = passed
    loss, out = state.loss_from(model, labels, args, kwargs, state)
    fields = {k: v for k, v in out.items() if k != "loss"}
    out = type(out)(loss=loss, **fields)  # rebuilt, so that `loss` comes first in to_tuple()
    return out if return_dict else out.to_tuple()


def run_unlabelled(model, state: WrapState, args: tuple, kwargs: dict):
    """The original forward without labels, as a ModelOutput (return_dict=True)."""
    return state.forward(model, *args, return_dict=True, **kwargs)


def install(model, state: WrapState) -> None:
    """Make `model.forward` the fusedloss wrapper around `state.forward` (this instance only)."""
    @functools.wraps(state.forward)
    def forward(self, *args, **kwargs):
        return _wrapped_call(self, *args, **kwargs)

    setattr(model, STATE_ATTR, state)
    model.forward = types.MethodType(forward, model)
    model._replicate_for_data_parallel = types.MethodType(_replicate, model)


def _replicate(self):
    """nn.DataParallel's replica of a wrapped model: torch copies the instance's __dict__, and
    with it `forward` bound to the original model (each replica would run the original's
    weights on its device); rebind it to the replica."""
    replica = type(self)._replicate_for_data_parallel(self)
    replica.forward = types.MethodType(self.forward.__func__, replica)
    replica.__dict__.pop("_replicate_for_data_parallel", None)
    return replica


def uninstall(model) -> None:
    """Undo `install` and a fusedloss `loss_function` (no-op on a model never wrapped)."""
    if STATE_ATTR in model.__dict__:
        del model.__dict__[STATE_ATTR]
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_replicate_for_data_parallel", None)
    if getattr(model.__dict__.get("_loss_function"), "_fusedloss", False):
        del model.__dict__["_loss_function"]
