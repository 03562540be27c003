"""The op contract in code: every op of csrc/ops.cpp with its arguments and outputs, their
schema types, dtypes and shapes (the semantics are in docs/OPS.md).

Built from it: the schema strings (tests/test_contract.py checks them against the schemas the
C++ extension registers), the fake kernels torch.compile traces with (`fake_kernel`), the
Triton backend's custom ops (`custom_op_schema`), and the registry's check that a backend
implements every op with the schema's argument names in the schema's order (`mismatches`).

Notation: R rows, C classes of the (R, C) logits view; "acc" is the accumulation dtype
(float64 for float64 logits, float32 for float16/bfloat16/float32).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._dtypes import acc_dtype

# ----------------------------------------------------------------------------- dtypes
# What an argument's or output's dtype may be, by name (docs/OPS.md).
DTYPE_RULES = {
    "floating": "float16, bfloat16, float32 or float64",
    "logits": "the logits' dtype",
    "acc": "the accumulation dtype",
    "int64": "int64",
    "float32": "float32",
    "bool": "bool",
    "uint8": "uint8",
}


@dataclass(frozen=True)
class Arg:
    name: str
    type: str                 # schema type: Tensor, Tensor?, int, float, bool
    dtypes: tuple = ()        # tensors: DTYPE_RULES names it may have
    shape: str = ""           # tensors: e.g. "(R, C)"
    mutated: bool = False     # written in place: Tensor(a!), or Tensor(a!)? when optional
    default: str | None = None  # schema default ("None"): callers may leave it out

    @property
    def schema(self) -> str:
        kind = self.type
        if self.mutated:
            kind = "Tensor(a!)?" if self.type == "Tensor?" else "Tensor(a!)"
        return f"{kind} {self.name}" + ("" if self.default is None else f"={self.default}")


@dataclass(frozen=True)
class Out:
    name: str
    dtype: str                # a DTYPE_RULES name, or a name in _DTYPE_OF below
    shape: str                # "(R,)", "(R, C)", "(3, C)", or a name in _SHAPE_OF
    when: str | None = None   # the bool argument (or optional tensor) that asks for it;
    #                           without it the output is an empty (0,) tensor of its dtype


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple[Arg, ...]
    outs: tuple[Out, ...]

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def mutated(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if a.mutated)

    @property
    def returns(self) -> str:
        if not self.outs:
            return "()"
        if len(self.outs) == 1:
            return "Tensor"
        return "(" + ", ".join(f"Tensor {o.name}" for o in self.outs) + ")"

    def bind(self, args) -> dict:
        """{argument name: value} of a positional call; trailing arguments with a default
        (always None) that the call leaves out are filled in."""
        given = tuple(args)
        left = self.args[len(given):]
        if len(given) > len(self.args) or any(a.default is None for a in left):
            raise TypeError(f"{self.name}: {len(given)} positional arguments for "
                            f"{self.arg_names}")
        return dict(zip(self.arg_names, given + (None,) * len(left), strict=True))

    @property
    def schema(self) -> str:
        """The schema as csrc/ops.cpp declares it, without the namespace."""
        return f"{self.name}({', '.join(a.schema for a in self.args)}) -> {self.returns}"


# ----------------------------------------------------------------------------- the ops
def _logits(mutated=False):
    return Arg("logits", "Tensor", ("floating",), "(R, C)", mutated)


_CE_OPTIONS = (Arg("ignore_index", "int"), Arg("label_smoothing", "float"),
               Arg("lse_square_scale", "float"), Arg("softcap", "float"))
_CE_TARGET = Arg("target", "Tensor", ("int64", "logits", "acc"), "(R,) or (R, C)")
_CE_WEIGHT = Arg("weight", "Tensor?", ("floating",), "(C,)")
_GRAD_SCALE = Arg("grad_scale", "Tensor?", ("acc",), "()")
_BCE_TARGET = Arg("target", "Tensor", ("logits", "acc", "bool", "uint8"), "(R, C)")
_BCE_WEIGHTS = (Arg("weight", "Tensor?", ("floating",), "(R, C) view"),
                Arg("pos_weight", "Tensor?", ("floating",), "(R, C) view"))
_CE_STATS = (Out("loss", "acc", "(R,)"), Out("lse", "acc", "(R,)"))
_CE_DECODING = (Out("pred", "int64", "(R,)", "decode"),
                Out("confidence", "float32", "(R,)", "decode"))

OPS: dict[str, Op] = {op.name: op for op in (
    Op("softmax_ce_fwd",
       (_logits(), _CE_TARGET, _CE_WEIGHT, _GRAD_SCALE, *_CE_OPTIONS,
        Arg("compute_grad", "bool"), Arg("decode", "bool")),
       (*_CE_STATS, Out("grad", "logits", "(R, C)", "compute_grad"), *_CE_DECODING)),
    Op("softmax_ce_fwd_inplace",
       (_logits(mutated=True), _CE_TARGET, _CE_WEIGHT, _GRAD_SCALE, *_CE_OPTIONS,
        Arg("decode", "bool")),
       (*_CE_STATS, *_CE_DECODING)),
    Op("softmax_ce_bwd",
       (Arg("grad_loss", "Tensor", ("floating",), "(R,)"), _logits(), _CE_TARGET, _CE_WEIGHT,
        *_CE_OPTIONS),
       (Out("grad", "logits", "(R, C)"),)),
    Op("softmax_decode",
       (_logits(), Arg("softcap", "float")),
       (Out("pred", "int64", "(R,)"), Out("confidence", "float32", "(R,)"))),
    Op("sigmoid_bce_fwd",
       (_logits(), _BCE_TARGET, *_BCE_WEIGHTS, _GRAD_SCALE,
        Arg("threshold", "Tensor?", ("floating",), "(C,)"), Arg("reduce_rows", "bool"),
        Arg("compute_grad", "bool"), Arg("return_probs", "bool"), Arg("count", "bool"),
        Arg("hist_edges", "Tensor?", ("float32",), "(B + 1,)", default="None"),
        Arg("hist_counts", "Tensor?", ("int64",), "(2, C, B + 2)", mutated=True,
            default="None")),
       (Out("loss", "bce_loss", "bce_loss"), Out("grad", "logits", "(R, C)", "compute_grad"),
        Out("labels", "bool", "(R, C)", "threshold"),
        Out("probs", "logits", "(R, C)", "return_probs"),
        Out("counts", "int64", "(3, C)", "count"))),
    Op("sigmoid_bce_bwd",
       (Arg("grad_loss", "Tensor", ("floating",), "(R, C)"), _logits(), _BCE_TARGET,
        *_BCE_WEIGHTS),
       (Out("grad", "logits", "(R, C)"),)),
    Op("sigmoid_decode",
       (_logits(), Arg("threshold", "Tensor", ("floating",), "(C,)"),
        Arg("return_probs", "bool")),
       (Out("labels", "bool", "(R, C)"), Out("probs", "logits", "(R, C)", "return_probs"))),
    Op("scale_grad_",
       (Arg("grad", "Tensor", ("floating",), "(R, C)", mutated=True),
        Arg("scale", "Tensor", ("floating",), "()")),
       ()),
)}
OP_NAMES = tuple(OPS)


# ----------------------------------------------------------------------------- fake kernels
def _bce_loss_dtype(a: dict) -> torch.dtype:
    """(R,) sums in acc; the (R, C) loss in promote(logits, target) for a float target, else
    the logits' dtype."""
    logits, target = a["logits"], a["target"]
    if a["reduce_rows"]:
        return acc_dtype(logits.dtype)
    if target.is_floating_point():
        return torch.promote_types(logits.dtype, target.dtype)
    return logits.dtype


_DTYPE_OF: dict[str, Callable[[dict], torch.dtype]] = {
    "logits": lambda a: a["logits"].dtype,
    "acc": lambda a: acc_dtype(a["logits"].dtype),
    "int64": lambda a: torch.int64,
    "float32": lambda a: torch.float32,
    "bool": lambda a: torch.bool,
    "bce_loss": _bce_loss_dtype,
}
_SHAPE_OF: dict[str, Callable[[int, int, dict], tuple]] = {
    "(R,)": lambda r, c, a: (r,),
    "(R, C)": lambda r, c, a: (r, c),
    "(3, C)": lambda r, c, a: (3, c),
    "bce_loss": lambda r, c, a: (r,) if a["reduce_rows"] else (r, c),
}


def _fake_out(out: Out, a: dict) -> Tensor:
    logits = a["logits"]
    dtype = _DTYPE_OF[out.dtype](a)
    asked = a[out.when] if out.when is not None else True
    if asked is None or asked is False:
        return logits.new_empty((0,), dtype=dtype)
    rows, classes = logits.shape
    return logits.new_empty(_SHAPE_OF[out.shape](rows, classes, a), dtype=dtype)


def fake_kernel(op: Op) -> Callable:
    """The op's fake (meta) kernel: outputs of the contract's shapes and dtypes, no data read."""

    def fake(*args):
        a = op.bind(args)
        outs = tuple(_fake_out(o, a) for o in op.outs)
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else outs

    fake.__name__ = f"{op.name}_fake"
    return fake


def custom_op_schema(op: Op) -> str:
    """The schema for torch.library.custom_op: without the op name."""
    return op.schema[len(op.name):]


# ----------------------------------------------------------------------------- conformance
def _schema_of(fn) -> torch._C.FunctionSchema | None:
    overload = getattr(fn, "default", None)
    return getattr(overload, "_schema", None)


def mismatch(op: Op, fn) -> str:
    """'' if `fn` implements `op` with the contract's signature, else what differs.

    A registered torch op (an OpOverloadPacket) is compared schema to schema, types, alias
    annotations and return names included; a Python callable by the names of its parameters, in
    order. Extras a call by the schema never fills are allowed: keyword-only parameters (such
    as a launcher's block size) and trailing parameters with a default.
    """
    schema = _schema_of(fn)
    if schema is not None:
        ns = schema.name.split("::")[0]
        expected = torch._C.parse_schema(f"{ns}::{op.schema}")
        return "" if str(schema) == str(expected) else f"schema {schema} != {expected}"
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return f"{fn!r} has no inspectable signature"
    names = tuple(p.name for p in params[:len(op.args)])
    extra = [p.name for p in params[len(op.args):] if p.default is p.empty]
    if names != op.arg_names or extra:
        return f"parameters {tuple(p.name for p in params)} != {op.arg_names}"
    return ""


def mismatches(ops) -> dict[str, str]:
    """{op name: what is wrong} for every contract op that `ops` lacks or implements with
    another signature; empty when `ops` conforms."""
    bad = {}
    for op in OPS.values():
        fn = getattr(ops, op.name, None)
        why = "missing" if fn is None else mismatch(op, fn)
        if why:
            bad[op.name] = why
    return bad
