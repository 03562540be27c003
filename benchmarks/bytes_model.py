"""The least data each op must move: every input read once, every output written once.

Time over these bytes at the copy bandwidth measured in the same run is the figure of merit
("x ideal" in the report: 1.0 would be a kernel as fast as a copy of the same bytes). Scalars
(the reduced loss) are ignored. Both training passes (fwd+bwd, fwd+autograd) move the same bytes.

softmax_ce  fwd      R*C*isz (logits) + R*8 (int64 targets)
            train    2*R*C*isz (logits read, gradient written) + R*8
            decode   + R*(8 + 4 + 1): pred int64, confidence fp32, correct bool
sigmoid_bce fwd      R*C*(isz + tsz) (logits, targets; tsz = 1 for uint8/bool targets)
            train    R*C*(2*isz + tsz)
            decode   + R*C (labels, bool) + 3*C*8 (TP/FP/FN counts, int64)
"""

from __future__ import annotations

from cases import Case

INT64 = 8


def op_bytes(case: Case, target_itemsize: int | None = None) -> int:
    """Bytes the op must move for `case`; `target_itemsize` is the BCE target's (default:
    the logits' dtype, as torch needs)."""
    isz = case.torch_dtype.itemsize
    R, C = case.rows, case.classes
    if case.op == "softmax_ce":
        n = (2 if case.backward else 1) * R * C * isz + R * INT64
        if case.decode:
            n += R * (8 + 4 + 1)
        return n
    tsz = isz if target_itemsize is None else target_itemsize
    n = R * C * ((2 if case.backward else 1) * isz + tsz)
    if case.decode:
        n += R * C + 3 * C * INT64
    return n


FORMULA = {
    ("softmax_ce", False): "R*C*isz + R*8",
    ("softmax_ce", True): "2*R*C*isz + R*8",
    ("sigmoid_bce", False): "R*C*(isz + target isz)",
    ("sigmoid_bce", True): "R*C*(2*isz + target isz)",
}


def formula(case: Case) -> str:
    """The bytes model of `case` as a formula, for the report."""
    return FORMULA[(case.op, case.backward)] + (" + decodings" if case.decode else "")


def copy_bytes(nbytes: int) -> int:
    """Bytes moved by copying an `nbytes` buffer: read once, written once."""
    return 2 * nbytes
