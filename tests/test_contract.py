"""The op contract (python/fusedloss/_contract.py) against what is registered: the C++ schemas of
csrc/ops.cpp, the Triton custom ops, every registered backend; and the registry's refusal of a
backend that does not follow it."""

import inspect

import pytest
import torch

import fusedloss  # noqa: F401  (loads the extensions, registers the backends)
from fusedloss import _backend, _contract


def _expected(namespace: str, op: _contract.Op) -> str:
    return str(torch._C.parse_schema(f"{namespace}::{op.schema}"))


@pytest.mark.parametrize("name", _contract.OP_NAMES)
def test_cpp_schemas_are_the_contracts(name):
    # The schemas the extension registers (csrc/ops.cpp), argument types, alias annotations
    # and return names included.
    assert "native" in _backend._REGISTRY, _backend.KNOWN.get("native")
    packet = getattr(torch.ops.fusedloss, name)
    assert list(packet._schemas) == [""]  # one overload: the default
    assert str(packet.default._schema) == _expected("fusedloss", _contract.OPS[name])


@pytest.mark.parametrize("name", _contract.OP_NAMES)
def test_triton_custom_ops_are_the_contracts(name):
    assert "triton" in _backend._REGISTRY, _backend.KNOWN.get("triton")
    packet = getattr(torch.ops.fusedloss_triton, name)
    assert str(packet.default._schema) == _expected("fusedloss_triton", _contract.OPS[name])


def test_every_registered_backend_conforms():
    for name, backend in _backend._REGISTRY.items():
        assert _contract.mismatches(backend.ops) == {}, name


def test_schema_strings_by_hand():
    # Two schemas spelled out in full, as csrc/ops.cpp declares them.
    assert _contract.OPS["scale_grad_"].schema == \
        "scale_grad_(Tensor(a!) grad, Tensor scale) -> ()"
    assert _contract.OPS["softmax_decode"].schema == \
        "softmax_decode(Tensor logits, float softcap) -> (Tensor pred, Tensor confidence)"
    assert _contract.OPS["softmax_ce_fwd_inplace"].mutated == ("logits",)


def _conforming(op: _contract.Op):
    """A Python function with the op's parameters (what a Python backend writes)."""
    def fn(*args):
        return None
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in op.arg_names])
    return staticmethod(fn)


def _ops_class(skip=(), **override):
    members = {name: _conforming(op) for name, op in _contract.OPS.items() if name not in skip}
    return type("Ops", (), {**members, **override})


def _backend_with(ops, name):
    return _backend.Backend(name=name, ops=ops, supports=lambda d: False, priority={},
                            build_hint="")


def test_registry_accepts_a_conforming_backend_and_rejects_others():
    _backend.register(_backend_with(_ops_class(), "contract_test"))
    try:
        assert "contract_test" in _backend._REGISTRY
    finally:
        _backend._REGISTRY.pop("contract_test", None)
        _backend.KNOWN.pop("contract_test", None)

    def swapped(softcap, logits):  # the schema's arguments out of order
        return None

    for ops, what in ((_ops_class(skip=("sigmoid_decode",)), r"sigmoid_decode: missing"),
                      (_ops_class(softmax_decode=staticmethod(swapped)),
                       r"softmax_decode: parameters \('softcap', 'logits'\)")):
        with pytest.raises(TypeError, match=what):
            _backend.register(_backend_with(ops, "bad"))
        assert "bad" not in _backend._REGISTRY
