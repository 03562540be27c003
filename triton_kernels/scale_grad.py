"""`scale_grad_` in Triton: grad *= scale in place, scale read on the device (docs/OPS.md).

The usual `loss.backward()` passes a scale of exactly 1; the kernel reads the scale and masks
every load and store off when it is 1, so the launch costs no memory traffic and the host never
looks at the value (no synchronisation, CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOGITS_DTYPES,
    SCALE_BLOCK,
    SCALE_WARPS,
    acc_dtype,
    acc_torch,
    on_device,
    scale_config,
    signature,
)


@triton.jit(do_not_specialize=["n"])
def _scale_grad_kernel(g_ptr, s_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(s_ptr).to(ACC)
    n_live = tl.where(scale != 1.0, n, 0)  # scale == 1: touch nothing
    mask = offs < n_live
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(g_ptr + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


def scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    n = grad.numel()
    if n == 0:
        return
    if not grad.is_contiguous():  # not produced by the fused ops; same result, eager kernel
        grad.mul_(scale.to(grad.dtype))
        return
    # The kernel reads the scale in the accumulation type; converting a 0-dim tensor is a tiny
    # device op, not a sync.
    s = scale.to(acc_torch(grad.dtype))
    block, warps = scale_config()
    with on_device(grad):
        _scale_grad_kernel[(triton.cdiv(n, block),)](grad, s, n, ACC=acc_dtype(grad.dtype),
                                                     BLOCK=block, num_warps=warps)


def specialisations():
    """Every (kernel, signature, constexprs, num_warps) the launcher can launch on a GPU."""
    for dtype in LOGITS_DTYPES:
        switches = dict(ACC=acc_dtype(dtype), BLOCK=SCALE_BLOCK)
        sig = signature(_scale_grad_kernel, dict(g_ptr=dtype, s_ptr=acc_torch(dtype)), {},
                        switches)
        yield _scale_grad_kernel, sig, switches, SCALE_WARPS
