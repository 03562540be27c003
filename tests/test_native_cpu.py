"""Op-level tests of the native CPU kernels (csrc/cpu/*.cpp): torch.ops.fusedloss.* called
directly, checked against the float64 math of python/fusedloss/reference.py (docs/OPS.md).

The op-level suite (tests/test_ops.py) runs every op, option, dtype and edge case on `native`
as on every backend; this file keeps what only the native CPU build has: its argument-check
messages and the agreement of its ISA builds.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import fusedloss  # noqa: F401
from fusedloss import _native

ops = torch.ops.fusedloss
F64 = torch.float64

# The CPU kernels are built by setup.py with the package: a missing build is a failure here.
assert _native.loaded_cpu_isa is not None, "native CPU kernels not built: pip install -e ."


def test_bad_arguments_name_the_argument():
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    cases = [
        (lambda: ops.softmax_ce_fwd(x, t.int(), None, None, -100, 0.0, 0.0, 0.0, False, False),
         "target .class indices. must be int64"),
        (lambda: ops.softmax_ce_fwd(x, t[:2], None, None, -100, 0.0, 0.0, 0.0, False, False),
         "target must have shape"),
        (lambda: ops.softmax_ce_fwd(x, t, torch.ones(4), None, -100, 0.0, 0.0, 0.0, False, False),
         "weight must have shape"),
        (lambda: ops.softmax_ce_fwd(x, t, None, torch.ones(2), -100, 0.0, 0.0, 0.0, True, False),
         "grad_scale must be a 0-dim"),
        (lambda: ops.softmax_ce_fwd(x[0], t, None, None, -100, 0.0, 0.0, 0.0, False, False),
         "logits must be 2-D"),
        (lambda: ops.softmax_ce_fwd(x.t(), t, None, None, -100, 0.0, 0.0, 0.0, False, False),
         "stride"),
        (lambda: ops.softmax_ce_fwd(x.long(), t, None, None, -100, 0.0, 0.0, 0.0, False, False),
         "logits must be float16"),
        (lambda: ops.sigmoid_bce_fwd(x, x[:2], None, None, None, None, True, True, False, False),
         "target must have the logits' shape"),
        (lambda: ops.sigmoid_decode(x, torch.zeros(4), False), "threshold must have shape"),
        (lambda: ops.softmax_ce_bwd(torch.ones(2), x, t, None, -100, 0.0, 0.0, 0.0),
         "grad_loss must have shape"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()
    value_cases = [
        (lambda: ops.softmax_ce_fwd(x, t, None, None, -100, 1.5, 0.0, 0.0, False, False),
         "label_smoothing"),
        (lambda: ops.sigmoid_bce_fwd(x, x, None, None, None, None, True, True, False, True),
         "count=True needs a threshold"),
    ]
    for fn, msg in value_cases:
        with pytest.raises(ValueError, match=msg):
            fn()


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("C", [256, 37, 3000])
def test_bce_plain_loop_matches_general_loop_and_torch(dt, C):
    # Without weight/pos_weight the CPU forward takes a loop with no per-element options
    # (bce_block_plain); a weight of ones takes the general loop, which multiplies by 1.0
    # exactly, so loss and gradient must be bitwise the same. C = 37 and 3000 cover the masked
    # tail and a row of several column blocks. Both are also checked against float64 torch.
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(67, C, generator=g) * 5).to(dt)
    y = torch.rand(67, C, generator=g) < 0.2
    gs = torch.tensor(1.0 / x.numel(), dtype=F64)
    for grad in (True, False):
        plain = ops.sigmoid_bce_fwd(x, y, None, None, gs, None, True, grad, False, False)
        general = ops.sigmoid_bce_fwd(x, y, torch.ones(1, C, dtype=dt).expand(67, C), None, gs,
                                      None, True, grad, False, False)
        assert torch.equal(plain[0], general[0])
        if grad:
            assert torch.equal(plain[1], general[1])
    xd = x.to(F64, copy=True).requires_grad_()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(xd, y.double(), reduction="none")
    ref_grad, = torch.autograd.grad(ref.sum() * gs, xd)
    loss_rows, grad = ops.sigmoid_bce_fwd(x, y, None, None, gs, None, True, True, False, False)[:2]
    tol = dict(atol=2e-2, rtol=1e-2) if dt == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_rows.double(), ref.sum(1), **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


# ---------------------------------------------------------------------------------------------
# ISA builds agree: each build runs in a subprocess (only one can register the CPU kernels).

_ISA_SCRIPT = r"""
import json, torch, fusedloss
from fusedloss import _native
assert _native.loaded_cpu_isa == {isa!r}, _native.loaded_cpu_isa
ops = torch.ops.fusedloss
g = torch.Generator().manual_seed(12)
out = {{}}
for dt in (torch.float32, torch.bfloat16, torch.float64):
    x = (torch.randn(5, 2100, generator=g) * 3).to(dt)
    t = torch.randint(0, 2100, (5,), generator=g)
    w = torch.rand(2100, generator=g).to(dt)
    l, s, gr, p, c = ops.softmax_ce_fwd(x, t, w, None, -100, 0.1, 1e-3, 2.0, True, True)
    bl, bg, lab, pr, cn = ops.sigmoid_bce_fwd(x, t.unsqueeze(1).eq(torch.arange(2100)), None,
                                              None, None, torch.zeros(2100), True, True, True, True)
    out[str(dt)] = [v.double().flatten().tolist() for v in (l, s, gr, p, c, bl, bg, lab, pr, cn)]
print(json.dumps(out))
"""


def _cpu_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


def _isa_outputs(isa):
    env = dict(os.environ, FUSEDLOSS_CPU_ISA=isa, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(isa=isa)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_isa_builds_agree():
    isas = ["default"] + (["avx2"] if _cpu_has("avx2") else []) + \
        (["avx512"] if _cpu_has("avx512f") and _cpu_has("avx512bw") else [])
    if len(isas) == 1:
        pytest.skip("only the default build can run on this CPU")
    results = {isa: _isa_outputs(isa) for isa in isas}
    base = results["default"]
    for isa in isas[1:]:
        for dt, outs in results[isa].items():
            # Vectorized exp/tanh/log (Sleef) vs the scalar fallback differ by ~1 ulp, which the
            # bf16 rounding of the gradient can turn into one bf16 ulp.
            tol = dict(atol=4e-3, rtol=8e-3) if "bfloat16" in dt else dict(atol=1e-5, rtol=1e-5)
            for a, b in zip(outs, base[dt], strict=True):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), equal_nan=True,
                                           **tol)


def test_loss_ops_refuse_to_be_differentiated_directly():
    # The ops have no autograd formula (the Functions compute the gradient): with grad mode on
    # and an input that requires grad, autograd would give a zero gradient, so they raise.
    x = torch.randn(3, 5, requires_grad=True)
    t = torch.tensor([0, 4, 2])
    with pytest.raises(RuntimeError, match="softmax_ce_fwd: an input requires grad"):
        ops.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="sigmoid_bce_fwd: an input requires grad"):
        ops.sigmoid_bce_fwd(x, t[:, None] == torch.arange(5), None, None, None, None, True,
                            False, False, False)
    with pytest.raises(RuntimeError, match="softmax_ce_bwd: an input requires grad"):
        ops.softmax_ce_bwd(torch.ones(3), x, t, None, -100, 0.0, 0.0, 0.0)
    with torch.no_grad():  # the same calls are fine without grad mode
        loss = ops.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, False, False)[0]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x.detach(), t,
                                                                       reduction="none"))
    pred, _ = ops.softmax_decode(x, 0.0)  # decodings are not differentiable: not guarded
    assert torch.equal(pred, x.detach().argmax(1))
    loss = fusedloss.cross_entropy(x, t)  # the functional differentiates it
    g, = torch.autograd.grad(loss, x)
    xr = x.detach().requires_grad_()
    g_ref, = torch.autograd.grad(torch.nn.functional.cross_entropy(xr, t), xr)
    torch.testing.assert_close(g, g_ref)
