"""Fake (meta) kernels for the fusedloss ops, so torch.compile can trace them.

Each is built from the op contract (`_contract.fake_kernel`): the outputs have the shapes and
dtypes `_contract.OPS` gives them (docs/OPS.md), an output not asked for is an empty (0,) tensor
of its dtype, and a fake kernel never reads data.
"""

from __future__ import annotations

import torch

from . import _contract

FAKES = {name: _contract.fake_kernel(op) for name, op in _contract.OPS.items()}


def register_fakes(namespace: str) -> None:
    """Register FAKES for `namespace::<op>` (_native.py: fusedloss, once the schemas are
    loaded; _triton.py: fusedloss_triton)."""
    for name, fn in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}")(fn)
