"""The native CUDA ops under CUDA-graph capture (needs a GPU).

Each case runs in a fresh process, so the first fusedloss op of the process (which allocates the
out-of-range-target mailbox and queries the device) runs under capture, the case a warm-up
would hide. Oracles: torch.nn.functional.cross_entropy and its autograd gradient.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASE = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import fusedloss
    ops = torch.ops.fusedloss
    R, C, dtype = {rows}, {classes}, {dtype}
    x = torch.randn(R, C, device="cuda").to(dtype)
    t = torch.randint(0, C, (R,), device="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # the first fusedloss op of this process
        loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0,
                                                         True, True)
    for _ in range(2):  # new inputs, replayed into the same buffers
        x.copy_(torch.randn(R, C, device="cuda") * 3)
        t.copy_(torch.randint(0, C, (R,), device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        xr = x.double().requires_grad_()
        ref = F.cross_entropy(xr, t, reduction="none")
        ref.sum().backward()
        torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(grad.double(), xr.grad, **{tol})
        assert torch.equal(pred, x.double().argmax(-1))
    # An out-of-range target seen only by a replay: the row is NaN at once, and the IndexError
    # surfaces at the next fusedloss op called eagerly after the replay finished.
    t[1] = C + 7
    g.replay()
    torch.cuda.synchronize()
    assert loss[1].isnan() and grad[1].isnan().all()
    try:
        ops.softmax_decode(x, 0.0)
    except IndexError as e:
        assert f"Target {{C + 7}} is out of bounds" in str(e), e
    else:
        raise SystemExit("no IndexError after the replay")
    torch.ops.fusedloss_cuda.raise_pending_error()  # reported once, then cleared
    print("graph case ok")
""")

# (rows, classes, dtype, gradient tolerance): warp rows, block rows, and a cluster of 4 blocks
# (bf16 131072 classes, whose first launch also probes cluster occupancy under capture).
GRAPH_CASES = [
    (8, 1000, "torch.bfloat16", dict(atol=1e-6, rtol=1.6e-2)),
    (4, 3001, "torch.float32", dict(atol=1e-7, rtol=2e-5)),
    (2, 131072, "torch.bfloat16", dict(atol=1e-6, rtol=1.6e-2)),
]


@pytest.mark.parametrize("rows,classes,dtype,tol", GRAPH_CASES,
                         ids=["warp_rows", "block_rows", "cluster_of_4"])
def test_first_op_under_graph_capture_then_replay(rows, classes, dtype, tol):
    code = CASE.format(rows=rows, classes=classes, dtype=dtype, tol=tol)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "graph case ok" in p.stdout, p.stdout + p.stderr
