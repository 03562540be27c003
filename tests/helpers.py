"""Test helpers: tolerances per dtype and comparison against torch / the float64 reference."""

import torch

# fp32 kernels accumulate in fp32 over up to ~1e3 classes here: 1e-5 relative is ~100 ulp.
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-5)}


def assert_close(actual, expected, dtype, msg=""):
    torch.testing.assert_close(actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu(),
                               **TOL[dtype], equal_nan=True, msg=lambda m: f"{msg}\n{m}")


def assert_no_worse_than_torch(ours, torch_lowp, ref64, factor=4.0, floor=1e-3, msg=""):
    """bf16/fp16 rule: our error to the float64 reference is at most `factor` x torch's own
    low-precision error on the same input (plus a floor of a few ulp of the output), so a
    low-precision result is never much further from the exact answer than torch's."""
    ours, torch_lowp, ref64 = (t.detach().to(torch.float64).cpu() for t in
                               (ours, torch_lowp, ref64))
    e_ours = (ours - ref64).abs().max().item() if ref64.numel() else 0.0
    e_torch = (torch_lowp - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = factor * e_torch + floor * max(scale, 1.0)
    assert e_ours <= bound, f"{msg}: error {e_ours:.3g} > bound {bound:.3g} (torch {e_torch:.3g})"
