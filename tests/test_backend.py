"""Backend registry and choice: available_backends, backend="auto", FUSEDLOSS_BACKEND."""

import subprocess
import sys

import torch

import fusedloss
from fusedloss import _backend


def test_torch_backend_everywhere():
    assert "torch" in fusedloss.available_backends("cpu")
    assert "torch" in fusedloss.available_backends(torch.device("cpu"))


def test_auto_prefers_native_on_cpu_when_built():
    chosen = _backend.get("auto", torch.device("cpu")).name
    expected = "native" if "native" in fusedloss.available_backends("cpu") else "torch"
    assert chosen == expected
    # the Triton interpreter is for tests only: never chosen automatically on CPU
    assert chosen != "triton"


def test_env_override_applies_to_auto_only():
    code = ("import fusedloss, torch; from fusedloss import _backend; "
            "print(_backend.get('auto', torch.device('cpu')).name, "
            "_backend.get('torch', torch.device('cpu')).name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"FUSEDLOSS_BACKEND": "torch", "PATH": ""}, check=True)
    assert out.stdout.split() == ["torch", "torch"]
    bad = subprocess.run([sys.executable, "-c", "import fusedloss, torch; "
                          "fusedloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))"],
                         capture_output=True, text=True, env={"FUSEDLOSS_BACKEND": "nope"})
    # the message says where the name came from (the call passed no backend)
    assert bad.returncode != 0 and "FUSEDLOSS_BACKEND='nope'" in bad.stderr


def test_results_agree_across_backends():
    """Every CPU backend gives the same loss and gradient (each is also checked against torch)."""
    x = torch.randn(6, 40)
    t = torch.randint(0, 40, (6,))
    outs = {}
    for b in fusedloss.available_backends("cpu"):
        xi = x.clone().requires_grad_(True)
        loss = fusedloss.cross_entropy(xi, t, label_smoothing=0.1, backend=b)
        loss.backward()
        outs[b] = (loss.detach(), xi.grad)
    base = outs["torch"]
    for b, (loss, grad) in outs.items():
        torch.testing.assert_close(loss, base[0], msg=b)
        torch.testing.assert_close(grad, base[1], msg=b)


def test_import_has_no_side_effects():
    """Importing fusedloss patches nothing in torch."""
    code = ("import torch, torch.nn.functional as F; a = F.cross_entropy; "
            "b = torch.nn.CrossEntropyLoss; import fusedloss; "
            "assert F.cross_entropy is a and torch.nn.CrossEntropyLoss is b; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_resolve_backend_public():
    assert fusedloss.resolve_backend("torch", "cpu") == "torch"
    assert fusedloss.resolve_backend("auto", "cpu") == fusedloss.available_backends("cpu")[0]


def test_check_errors_is_safe_without_cuda_errors():
    """check_errors() is a no-op when nothing is pending (and on machines without CUDA)."""
    fusedloss.check_errors()
