"""What to measure: benchmark cases, the named profiles, and the `--cases` syntax.

A case is one (op, rows, classes, dtype, pass, decode) point; every provider is timed on the
same inputs for it. `pass` is one of
  fwd           the loss only; the logits do not require grad (evaluation);
  fwd+bwd       the loss, then `loss.backward()` into the logits, a leaf tensor: the gradient
                lands in `logits.grad`, as in a training loop (the default training mode);
  fwd+autograd  the loss, then `torch.autograd.grad(loss, logits)`: a fresh gradient handed
                on, as for logits inside a network (nothing is accumulated into `.grad`).
The two training passes move the same bytes; autograd may copy the gradient on the way into
`.grad` when the op still holds a reference to it, which only the fwd+bwd pass shows.
`decode` adds the decodings
fusedloss produces in the same pass (softmax: pred/confidence/correct; sigmoid: labels at
threshold 0.5 and per-class TP/FP/FN counts); the other providers compute them with eager ops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

OPS = ("softmax_ce", "sigmoid_bce")
PASSES = ("fwd", "fwd+bwd", "fwd+autograd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
_OP_ALIASES = {"ce": "softmax_ce", "softmax_ce": "softmax_ce",
               "bce": "sigmoid_bce", "sigmoid_bce": "sigmoid_bce"}
_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "f32": "fp32",
                  "bf16": "bf16", "bfloat16": "bf16",
                  "fp16": "fp16", "float16": "fp16", "half": "fp16",
                  "fp64": "fp64", "float64": "fp64", "double": "fp64"}


@dataclass(frozen=True)
class Case:
    op: str
    rows: int
    classes: int
    dtype: str
    pass_: str
    decode: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def backward(self) -> bool:
        """Whether the gradient w.r.t. the logits is computed (either training pass)."""
        return self.pass_ != "fwd"

    @property
    def numel(self) -> int:
        return self.rows * self.classes

    @property
    def title(self) -> str:
        dec = "decode on" if self.decode else "decode off"
        return f"{self.op} {self.pass_} {self.dtype} {self.rows}x{self.classes} ({dec})"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


CASE_SYNTAX = ("OP:ROWSxCLASSES:DTYPE:PASS[:decode], e.g. ce:4096x32000:fp32:fwd+bwd or "
               "bce:65536x1024:bf16:fwd:decode (OP ce|bce, DTYPE fp32|bf16|fp16|fp64, "
               "PASS fwd|fwd+bwd|fwd+autograd)")


def parse_case(text: str) -> Case:
    """Parse one `--cases` entry (CASE_SYNTAX); raise ValueError naming the bad part."""
    parts = text.strip().split(":")
    if len(parts) not in (4, 5):
        raise ValueError(f"--cases entry {text!r}: expected {CASE_SYNTAX}")
    op, shape, dtype, pass_ = parts[:4]
    if op.lower() not in _OP_ALIASES:
        raise ValueError(f"--cases entry {text!r}: op {op!r} is not one of ce, bce")
    try:
        rows, classes = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise ValueError(f"--cases entry {text!r}: shape {shape!r} is not ROWSxCLASSES") from None
    if rows <= 0 or classes <= 0:
        raise ValueError(f"--cases entry {text!r}: rows and classes must be positive, "
                         f"got {rows}x{classes}")
    if dtype.lower() not in _DTYPE_ALIASES:
        raise ValueError(f"--cases entry {text!r}: dtype {dtype!r} is not one of "
                         f"{sorted(set(_DTYPE_ALIASES.values()))}")
    if pass_ not in PASSES:
        raise ValueError(f"--cases entry {text!r}: pass {pass_!r} is not one of {PASSES}")
    decode = False
    if len(parts) == 5:
        if parts[4] not in ("decode", "nodecode"):
            raise ValueError(f"--cases entry {text!r}: 5th field {parts[4]!r} must be "
                             f"'decode' or 'nodecode'")
        decode = parts[4] == "decode"
    return Case(_OP_ALIASES[op.lower()], rows, classes, _DTYPE_ALIASES[dtype.lower()], pass_,
                decode)


@dataclass(frozen=True)
class Profile:
    cases: tuple
    warmup: int          # untimed calls before timing (the first also compiles torch.compile)
    min_reps: int        # timed calls at least ...
    max_reps: int        # ... and at most,
    budget_s: float      # stopping after min_reps once a provider has used this much time
    description: str
    skip: tuple = ()     # providers left out unless --providers names them


def _cases(*specs: str) -> tuple:
    return tuple(parse_case(s) for s in specs)


PROFILES = {
    # Seconds: what tests/test_bench.py runs. Tiny shapes, every pass, decodings once each.
    "smoke": Profile(
        _cases("ce:64x1000:fp32:fwd", "ce:64x1000:fp32:fwd+bwd", "ce:64x1000:fp32:fwd+autograd",
               "ce:64x1000:fp32:fwd+bwd:decode",
               "bce:128x64:fp32:fwd", "bce:128x64:fp32:fwd+bwd", "bce:128x64:fp32:fwd+autograd",
               "bce:128x64:fp32:fwd+bwd:decode"),
        warmup=1, min_reps=5, max_reps=20, budget_s=0.05,
        description="tiny shapes for the smoke test (seconds); torch.compile only on request "
                    "(its first call takes seconds per case)",
        skip=("compile",)),
    # The default (`make bench`): about a minute on a 2-core CPU.
    "quick": Profile(
        _cases("ce:1024x8192:fp32:fwd+bwd", "ce:1024x8192:fp32:fwd+autograd",
               "bce:8192x256:fp32:fwd+bwd", "bce:8192x256:fp32:fwd+autograd"),
        warmup=2, min_reps=5, max_reps=30, budget_s=1.0,
        description="CE 1024x8192 and BCE 8192x256 fp32, both training passes (about a minute "
                    "on 2 cores)"),
    # The CPU performance targets (minutes on a 2-core CPU).
    "cpu-targets": Profile(
        _cases("ce:4096x32000:fp32:fwd+bwd", "ce:4096x32000:fp32:fwd+autograd",
               "ce:2048x128256:fp32:fwd+bwd", "ce:2048x128256:fp32:fwd+autograd",
               "bce:65536x256:fp32:fwd+bwd", "bce:65536x256:fp32:fwd+autograd"),
        warmup=2, min_reps=5, max_reps=15, budget_s=6.0,
        description="CPU targets: CE fp32 4096x32000 (Llama-2 vocab) and 2048x128256 "
                    "(Llama-3 vocab), BCE fp32 65536x256; both training passes"),
    # The GPU targets; BCE fusedloss rows also run with uint8 targets.
    "gpu": Profile(
        _cases("ce:8192x32768:bf16:fwd+bwd", "ce:8192x32768:bf16:fwd+bwd:decode",
               "ce:8192x131072:bf16:fwd+bwd", "ce:8192x131072:bf16:fwd+bwd:decode",
               "ce:8192x131072:bf16:fwd+autograd",
               "ce:4096x262144:bf16:fwd+bwd", "ce:4096x262144:bf16:fwd+bwd:decode",
               "ce:8192x131072:bf16:fwd",
               "bce:65536x1024:bf16:fwd+bwd", "bce:65536x1024:bf16:fwd+bwd:decode",
               "bce:65536x1024:bf16:fwd+autograd", "bce:65536x1024:bf16:fwd"),
        warmup=3, min_reps=10, max_reps=100, budget_s=2.0,
        description="GPU targets: CE bf16 8192x32768/8192x131072/4096x262144, BCE bf16 "
                    "65536x1024 (uint8 targets for fusedloss), decodings off vs on"),
}
