"""Measure what op_cases.TOL must cover: the largest error of every op output against the float64
reference, per (backend, output dtype, kind), over every sample of tests/op_cases.py.

    python tests/op_tolerance_probe.py

Prints, per key, the largest absolute error where |expected| < 1, the largest relative error
where |expected| >= 1, and the largest fraction of the tolerance used (with the sample).
Not a test: the tolerance table's comments quote its output.
"""

from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from conftest import DEVICE_BACKENDS  # noqa: E402  (sets TRITON_INTERPRET first)
from fusedloss import _backend, _contract  # noqa: E402
from op_cases import DTYPES, F64, SAMPLES, expected, samples, tol  # noqa: E402
from test_ops import _kind, _outputs  # noqa: E402


def _errors(a: torch.Tensor, b: torch.Tensor, t: dict):
    a64, b64 = a.detach().cpu().to(F64), b.to(F64)
    fin = torch.isfinite(b64) & torch.isfinite(a64)
    d, mag = (a64 - b64).abs()[fin], b64.abs()[fin]
    small = mag < 1
    abs_err = d[small].max().item() if small.any() else 0.0
    rel_err = (d[~small] / mag[~small]).max().item() if (~small).any() else 0.0
    used = (d / (t["atol"] + t["rtol"] * mag)).max().item() if d.numel() else 0.0
    return abs_err, rel_err, used


def main() -> None:
    worst = collections.defaultdict(lambda: [0.0, 0.0, 0.0, ""])
    for device, backend in DEVICE_BACKENDS:
        ops = _backend.get(backend, device).ops
        for op in SAMPLES:
            if op == "scale_grad_":
                continue
            for dtype in DTYPES:
                for s in samples(op, device, backend, dtype):
                    got = _outputs(s.op, getattr(ops, s.op)(*s.args))
                    outs = zip(_contract.OPS[s.op].outs, got, expected(s), strict=True)
                    for out, a, b in outs:
                        if b is None or not a.is_floating_point():
                            continue
                        kind = _kind(s, out)
                        abs_err, rel_err, used = _errors(a, b, tol(a.dtype, kind))
                        w = worst[(device, backend, str(a.dtype), kind)]
                        w[0], w[1] = max(w[0], abs_err), max(w[1], rel_err)
                        if used > w[2]:
                            w[2], w[3] = used, f"{s.op}[{s.name}].{out.name}"
    for key in sorted(worst):
        a, r, u, where = worst[key]
        print(f"{' '.join(key):44s} abs {a:.2e}  rel {r:.2e}  used {u:.3f}  at {where}")


if __name__ == "__main__":
    main()
