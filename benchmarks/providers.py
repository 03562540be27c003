"""The implementations being compared (providers), their inputs, and the correctness check
each must pass before it is timed.

Every provider is a function of the same inputs returning `Out(loss, grad, decodings)`:
- fwd:          the loss (and decodings); the logits do not require grad.
- fwd+bwd:      the loss, then `loss.backward()` into the logits, a leaf whose `.grad` is None
                before the call (as after `optimizer.zero_grad()`): what a training loop does.
                The gradient is taken out of `.grad` and returned, so it is freed inside the
                timed call like every other output.
- fwd+autograd: the loss, then `torch.autograd.grad(loss, logits)`, as for logits inside a
                network: the gradient is a fresh tensor handed to the layer below.

Providers: each built fusedloss backend through the public API (docs/API.md), eager torch,
torch.compile of the eager function, Liger-Kernel's cross entropy and quack's (GPU only).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cases import Case

# Under TRITON_INTERPRET=1 the triton backend runs on CPU tensors, slowly (64x1000 fp32 takes
# 0.3-1.6 s a call on a 2-core x86_64 CPU): only cases this small are given to it.
TRITON_INTERPRET_MAX_NUMEL = 1 << 16


@dataclass
class Out:
    loss: torch.Tensor
    grad: torch.Tensor | None
    dec: dict = field(default_factory=dict)


@dataclass
class Inputs:
    case: Case
    x: torch.Tensor                 # (R, C) logits; requires grad for fwd+bwd
    target: torch.Tensor            # CE: (R,) int64; BCE: (R, C) 0/1 in the logits' dtype
    target_u8: torch.Tensor | None  # BCE: the same targets as uint8


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.rows, case.classes, generator=g, device=device,
                    dtype=torch.float32).to(case.torch_dtype)
    if case.op == "softmax_ce":
        t = torch.randint(0, case.classes, (case.rows,), generator=g, device=device)
        t_u8 = None
    else:
        # ~10% positives: multi-label targets are sparse.
        t_u8 = (torch.rand(case.rows, case.classes, generator=g, device=device) < 0.1) \
            .to(torch.uint8)
        t = t_u8.to(case.torch_dtype)
    x.requires_grad_(case.backward)
    return Inputs(case, x, t, t_u8)


# ---- the eager functions (also what torch.compile compiles) ---------------------------------

def ce_eager(x, t):
    return F.cross_entropy(x, t), {}


def ce_eager_decode(x, t):
    loss = F.cross_entropy(x, t)
    xd = x.detach()
    pred = xd.argmax(-1)
    lse = torch.logsumexp(xd.float(), -1)
    conf = torch.exp(xd.gather(-1, pred.unsqueeze(-1)).squeeze(-1).float() - lse)
    return loss, {"pred": pred, "confidence": conf, "correct": pred == t}


def bce_eager(x, y):
    return F.binary_cross_entropy_with_logits(x, y), {}


def _bce_counts(labels, pos):
    return torch.stack([(labels & pos).sum(0), (labels & ~pos).sum(0), (~labels & pos).sum(0)])


def bce_eager_decode(x, y):
    loss = F.binary_cross_entropy_with_logits(x, y)
    labels = x.detach() > 0  # threshold 0.5 <=> logit 0, strict as in fusedloss
    return loss, {"labels": labels, "counts": _bce_counts(labels, y > 0.5)}


def bce_eager_u8(x, y8):
    return bce_eager(x, y8.to(x.dtype))


def bce_eager_u8_decode(x, y8):
    return bce_eager_decode(x, y8.to(x.dtype))


# ---- providers ----------------------------------------------------------------------------

@dataclass
class Runner:
    fn: Callable[[], Out]
    setup: Callable[[], None] | None = None  # untimed, before each call
    note: str = ""


@dataclass
class Provider:
    name: str      # "eager", "compile", "fusedloss-native", "liger", "quack", ...
    target: str    # dtype of the targets it is given: "int64", "float", "uint8"
    make: Callable[[Inputs], Runner]
    note: str = ""
    variant: str = ""  # e.g. "inplace": a second row for the same provider

    @property
    def label(self) -> str:
        tags = [t for t in ("u8 target" if self.target == "uint8" else "", self.variant) if t]
        return self.name + "".join(f" [{t}]" for t in tags)


def _run(call, x, tgt, pass_: str, leaf=None) -> Callable[[], Out]:
    """The timed call; `.backward()` lands the gradient in `leaf` (default: x itself)."""
    leaf = x if leaf is None else leaf
    if pass_ == "fwd+bwd":
        def fn():
            loss, dec = call(x, tgt)
            loss.backward()
            grad, leaf.grad = leaf.grad, None
            return Out(loss.detach(), grad, dec)
    elif pass_ == "fwd+autograd":
        def fn():
            loss, dec = call(x, tgt)
            (grad,) = torch.autograd.grad(loss, x)
            return Out(loss.detach(), grad, dec)
    else:
        def fn():
            loss, dec = call(x, tgt)
            return Out(loss, None, dec)
    return fn


def _targets(inp: Inputs, kind: str) -> torch.Tensor:
    return inp.target_u8 if kind == "uint8" else inp.target


def _eager_fn(case: Case, kind: str):
    if case.op == "softmax_ce":
        return ce_eager_decode if case.decode else ce_eager
    if kind == "uint8":
        return bce_eager_u8_decode if case.decode else bce_eager_u8
    return bce_eager_decode if case.decode else bce_eager


def eager_provider(case: Case) -> Provider:
    kind = "int64" if case.op == "softmax_ce" else "float"

    def make(inp):
        return Runner(_run(_eager_fn(case, kind), inp.x, inp.target, case.pass_))
    return Provider("eager", kind, make)


def compile_provider(case: Case, kind: str) -> Provider:
    def make(inp):
        torch._dynamo.reset()  # a fresh cache per case: no recompile limits, no dynamic shapes
        compiled = torch.compile(_eager_fn(case, kind), dynamic=False)
        return Runner(_run(compiled, inp.x, _targets(inp, kind), case.pass_),
                      note="mode=default")
    return Provider("compile", kind, make)


def _restoring(case: Case, inp: Inputs, call, note: str) -> Runner:
    """A runner for a provider that overwrites its input logits with the gradient: it gets a
    copy, restored from the original before each call (untimed). The logits are `base + 0`, a
    non-leaf (in-place on a leaf that requires grad raises, as in torch) made untimed, whose
    backward hands the gradient on unchanged: `.backward()` lands it in base.grad."""
    base = inp.x.detach().clone().requires_grad_(case.backward)
    work = {}

    def restore():
        with torch.no_grad():
            base.copy_(inp.x)
        x = base + 0 if case.backward else base
        work["fn"] = _run(call, x, inp.target, case.pass_, leaf=base)

    return Runner(lambda: work["fn"](), setup=restore,
                  note="input restored before each call (untimed)" + note)


def fusedloss_provider(case: Case, backend: str, kind: str, inplace: bool = False) -> Provider:
    import fusedloss

    if case.op == "softmax_ce":
        def call(x, t):
            if not case.decode:
                return fusedloss.cross_entropy(x, t, backend=backend,
                                               inplace_backward=inplace), {}
            o = fusedloss.cross_entropy(x, t, backend=backend, return_decoding=True,
                                        inplace_backward=inplace)
            return o.loss, {"pred": o.pred, "confidence": o.confidence, "correct": o.correct}
    else:
        def call(x, y):
            if not case.decode:
                return fusedloss.binary_cross_entropy_with_logits(x, y, backend=backend), {}
            o = fusedloss.binary_cross_entropy_with_logits(x, y, backend=backend, threshold=0.5,
                                                           return_counts=True)
            return o.loss, {"labels": o.labels, "counts": o.counts}

    def make(inp):
        if inplace:  # the gradient overwrites the logits: no logits-sized allocation
            return _restoring(case, inp, call, "")
        return Runner(_run(call, inp.x, _targets(inp, kind), case.pass_))
    return Provider(f"fusedloss-{backend}", kind, make, variant="inplace" if inplace else "")


def liger_provider(case: Case) -> Provider:
    def make(inp):
        # Liger writes the gradient into its input (in forward, whether or not it is needed)
        return _restoring(case, inp, _liger_call(case),
                          "; decodes pred only" if case.decode else "")
    return Provider("liger", "int64", make)


def _liger_call(case: Case):
    from liger_kernel.transformers.functional import liger_cross_entropy

    def call(x, t):
        if case.decode:  # -> CrossEntropyOutput(loss, z_loss, token_accuracy, predicted_tokens)
            out = liger_cross_entropy(x, t, return_predicted_tokens=True)
            return out.loss, {"pred": out.predicted_tokens}
        return liger_cross_entropy(x, t), {}
    return call


def quack_provider(case: Case) -> Provider:
    from quack.cross_entropy import cross_entropy as quack_ce

    def make(inp):
        return Runner(_run(lambda x, t: (quack_ce(x, t, reduction="mean"), {}), inp.x,
                           inp.target, case.pass_))
    return Provider("quack", "int64", make)


def _importable(module: str) -> str:
    """'' if `module` imports, else the reason."""
    try:
        importlib.import_module(module)
        return ""
    except Exception as e:  # noqa: BLE001  (any import failure means: not available)
        return f"{type(e).__name__}: {e}".splitlines()[0][:120]


def _fusedloss_providers(case: Case, device: torch.device, interp: bool
                         ) -> tuple[list[Provider], list[tuple]]:
    """One provider per usable fusedloss backend (plus its in-place and uint8-target rows)."""
    import fusedloss

    provs: list[Provider] = []
    skipped: list[tuple] = []
    backends = fusedloss.available_backends(device)
    if device.type == "cpu" and interp and "triton" not in backends and "triton" in _registered():
        backends.append("triton")  # the interpreter runs it on CPU tensors
    kind = "int64" if case.op == "softmax_ce" else "float"
    for b in backends:
        name = f"fusedloss-{b}"
        if b == "triton" and device.type == "cpu":
            if not interp:
                skipped.append((name, "Triton on CPU needs TRITON_INTERPRET=1"))
                continue
            if case.numel > TRITON_INTERPRET_MAX_NUMEL:
                skipped.append((name, f"interpreter: only cases up to "
                                      f"{TRITON_INTERPRET_MAX_NUMEL} elements"))
                continue
        provs.append(fusedloss_provider(case, b, kind))
        if case.op == "softmax_ce" and case.backward:
            provs.append(fusedloss_provider(case, b, kind, inplace=True))
        if case.op == "sigmoid_bce":
            provs.append(fusedloss_provider(case, b, "uint8"))
    for name in ("native", "triton"):
        if name not in backends:
            skipped.append((f"fusedloss-{name}", _unavailable_reason(name, device)))
    return provs, skipped


_EXTERNAL = (("liger", "liger_kernel.transformers.functional", liger_provider),
             ("quack", "quack.cross_entropy", quack_provider))


def _external_providers(case: Case, device: torch.device, interp: bool
                        ) -> tuple[list[Provider], list[tuple]]:
    """Liger's and quack's cross entropy (softmax CE only), where they can run."""
    provs: list[Provider] = []
    skipped: list[tuple] = []
    if case.op != "softmax_ce":
        return provs, skipped
    for name, module, build in _EXTERNAL:
        if device.type != "cuda" and not (name == "liger" and interp
                                          and case.numel <= TRITON_INTERPRET_MAX_NUMEL):
            skipped.append((name, "GPU only (liger: or tiny cases under TRITON_INTERPRET=1)"
                             if name == "liger" else "GPU only"))
            continue
        if name == "quack" and case.decode:
            skipped.append((name, "computes no decodings"))
            continue
        why = _importable(module)
        if why:
            skipped.append((name, f"not importable ({why})"))
            continue
        provs.append(build(case))
    return provs, skipped


def providers_for(case: Case, device: torch.device) -> tuple[list[Provider], list[tuple]]:
    """The providers to run on `case`, and (name, reason) for those skipped."""
    provs: list[Provider] = [eager_provider(case)]
    provs.append(compile_provider(case, "int64" if case.op == "softmax_ce" else "float"))
    if case.op == "sigmoid_bce":
        provs.append(compile_provider(case, "uint8"))
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    ours, skipped = _fusedloss_providers(case, device, interp)
    theirs, skipped_theirs = _external_providers(case, device, interp)
    return provs + ours + theirs, skipped + skipped_theirs


def _registered() -> list[str]:
    from fusedloss import _backend

    return list(_backend._REGISTRY)


def _unavailable_reason(name: str, device: torch.device) -> str:
    from fusedloss import _backend

    if name in _backend._REGISTRY:
        if name == "triton" and device.type == "cpu":
            return "Triton on CPU needs TRITON_INTERPRET=1"
        return f"not available for {device.type}"
    return f"not built ({_backend.KNOWN.get(name) or 'not registered'})"
