"""The native CPU kernels' one-slot output cache (csrc/cpu/common.cpp, new_2d_output).

A large output buffer is handed out again only once nothing references it. Each test keeps a
reference of one kind to an earlier output, runs the op again, and checks that the earlier
values are untouched and the new result equals torch's own gradient: a buffer reused while still
referenced would fail both. Sizes are just above the cache's 16 MiB floor.
"""

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

import fusedloss
from fusedloss import _native

ops = torch.ops.fusedloss
R, C = 520, 8192  # 16.25 MiB in fp32: above the 16 MiB floor

assert _native.loaded_cpu_isa is not None, "native CPU kernels not built: pip install -e ."


def _ce_grad(x, t):
    """The native fused gradient of mean CE (the op's own output buffer)."""
    scale = torch.tensor(1.0 / x.shape[0], dtype=torch.float64)
    return ops.softmax_ce_fwd(x, t, None, scale, -100, 0.0, 0.0, 0.0, True, False)[2]


def _torch_ce_grad(x, t):
    x = x.detach().double().requires_grad_()
    F.cross_entropy(x, t).backward()
    return x.grad.float()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, C, generator=g), torch.randint(0, C, (R,), generator=g)


@pytest.fixture(autouse=True)
def _empty():
    fusedloss.empty_cache()
    yield
    fusedloss.empty_cache()


def _second_call_keeps(holder_of_first):
    """Run once, keep what `holder_of_first(grad)` returns, drop the grad, run again."""
    x1, t1 = _inputs(1)
    x2, t2 = _inputs(2)
    g1 = _ce_grad(x1, t1)
    want1 = g1.clone()
    held = holder_of_first(g1)
    del g1
    gc.collect()
    g2 = _ce_grad(x2, t2)
    torch.testing.assert_close(g2, _torch_ce_grad(x2, t2), atol=1e-6, rtol=1e-5)
    return held, want1, g2


def test_unreferenced_buffer_is_reused_and_right():
    x1, t1 = _inputs(1)
    g1 = _ce_grad(x1, t1)
    ptr = g1.data_ptr()
    del g1
    x2, t2 = _inputs(2)
    g2 = _ce_grad(x2, t2)
    assert g2.data_ptr() == ptr  # the point of the cache
    torch.testing.assert_close(g2, _torch_ce_grad(x2, t2), atol=1e-6, rtol=1e-5)
    assert fusedloss.empty_cache() == 0  # g2 still holds it: forgotten, not freed
    del g2
    assert fusedloss.empty_cache() == 0  # already forgotten


def test_empty_cache_releases_the_unreferenced_buffer():
    g = _ce_grad(*_inputs(1))
    nbytes = g.numel() * 4
    del g
    assert fusedloss.empty_cache() == nbytes


@pytest.mark.parametrize("kind", ["tensor", "view", "storage", "weakref", "numpy"])
def test_referenced_buffer_is_never_reused(kind):
    holders = {
        "tensor": lambda g: g,
        "view": lambda g: g[3:, 5:],
        "storage": lambda g: g.untyped_storage(),
        "weakref": lambda g: StorageWeakRef(g.untyped_storage()),
        "numpy": lambda g: g.numpy(),
    }
    held, want1, g2 = _second_call_keeps(holders[kind])
    if kind == "tensor":
        assert held.data_ptr() != g2.data_ptr()
        torch.testing.assert_close(held, want1, atol=0, rtol=0)
    elif kind == "view":
        torch.testing.assert_close(held, want1[3:, 5:], atol=0, rtol=0)
    elif kind == "storage":
        assert held.data_ptr() != g2.data_ptr()
        got = torch.empty(0).set_(held, 0, (R, C), (C, 1))
        torch.testing.assert_close(got, want1, atol=0, rtol=0)
    elif kind == "weakref":
        # torch's own idiom for "is this storage gone": the weak reference must not see the
        # storage alive again with someone else's data.
        assert held.expired()
    else:
        np.testing.assert_array_equal(held, want1.numpy())


def test_bigger_request_does_not_reuse_a_smaller_buffer():
    g1 = _ce_grad(*_inputs(1))
    del g1
    x = torch.randn(2 * R, C)
    t = torch.randint(0, C, (2 * R,))
    g = _ce_grad(x, t)
    torch.testing.assert_close(g, _torch_ce_grad(x, t), atol=1e-6, rtol=1e-5)


def test_training_loop_grads_accumulate_as_torch():
    """`.backward()` into a leaf twice without zeroing: .grad holds the first buffer while the
    second call runs, and the sum must be torch's."""
    x1, t1 = _inputs(1)
    x = x1.clone().requires_grad_()
    ref = x1.clone().requires_grad_()
    for seed in (2, 3, 4):
        t = _inputs(seed)[1]
        fusedloss.cross_entropy(x, t, backend="native").backward()
        F.cross_entropy(ref, t).backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=3e-6, rtol=1e-5)
    for step in range(3):  # the usual loop: grads dropped between steps, buffer reused
        x.grad = None
        ref.grad = None
        t = _inputs(10 + step)[1]
        fusedloss.cross_entropy(x, t, backend="native").backward()
        F.cross_entropy(ref, t).backward()
        torch.testing.assert_close(x.grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_bce_outputs_in_one_call_are_distinct():
    """BCE can allocate a gradient and a probabilities buffer in the same call."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(R, C, generator=g)
    y = torch.rand(R, C, generator=g)
    for _ in range(2):
        out = ops.sigmoid_bce_fwd(x, y, None, None, None, None, False, True, True, False)
        grad, probs = out[1], out[3]
        assert grad.data_ptr() != probs.data_ptr()
        torch.testing.assert_close(probs, torch.sigmoid(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, torch.sigmoid(x) - y, atol=1e-6, rtol=1e-5)
