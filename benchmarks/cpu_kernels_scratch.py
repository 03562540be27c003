"""Scratch timing of the native CPU kernels against eager PyTorch and torch.compile.

Forward+backward, fp32, side by side in one process, median of --reps timed runs after warm-up,
providers interleaved within each repetition.
fused = softmax_ce_fwd(compute_grad=True) + scale_grad_(1.0) (what the autograd layer does for
reduction='mean'/'sum' with loss.backward()); eager = F.cross_entropy(x, t).backward().
Every provider allocates its outputs fresh each run (page faults included, see ENVIRONMENT.md);
run once plain and once with THP_MEM_ALLOC_ENABLE=1 to see both allocator settings.

    python benchmarks/cpu_kernels_scratch.py [--case ce|ce_llama|bce|all] [--reps 5]
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fusedloss  # noqa: F401
from fusedloss import _native

ops = torch.ops.fusedloss


def time_interleaved(fns, reps, warmup=2):
    """Median seconds per provider; the providers take turns in every repetition so that load
    from other processes on a shared machine hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in ts.items()}


def ce_case(R, C, reps):
    x0 = torch.randn(R, C)
    t = torch.randint(0, C, (R,))
    one = torch.ones(())

    def fused():
        loss, lse, grad, _, _ = ops.softmax_ce_fwd(x0, t, None, None, -100, 0.0, 0.0, 0.0,
                                                   True, False)
        loss.sum()
        ops.scale_grad_(grad, one)
        return grad

    def fused_nograd():
        return ops.softmax_ce_fwd(x0, t, None, None, -100, 0.0, 0.0, 0.0, False, False)

    xi = x0.clone()

    def fused_inplace():  # inplace_backward=True: the gradient overwrites the logits (no
        # allocation; after the first call the buffer holds gradients, same cost per call)
        ops.softmax_ce_fwd_inplace(xi, t, None, None, -100, 0.0, 0.0, 0.0, False)
        ops.scale_grad_(xi, one)

    x = x0.clone().requires_grad_(True)

    def eager():
        x.grad = None
        F.cross_entropy(x, t).backward()

    cfn = torch.compile(lambda a, b: F.cross_entropy(a, b))

    def compiled():
        x.grad = None
        cfn(x, t).backward()

    copy_dst = torch.empty_like(x0)

    def copy():
        copy_dst.copy_(x0)

    return {"fused": fused, "fused fwd only": fused_nograd, "fused inplace": fused_inplace,
            "eager": eager,
            "torch.compile": compiled, "copy (reused dst)": copy}


def bce_case(R, C, reps):
    x0 = torch.randn(R, C)
    y = (torch.rand(R, C) < 0.1).float()
    one = torch.ones(())

    def fused():
        loss, grad, *_ = ops.sigmoid_bce_fwd(x0, y, None, None, None, None, True, True, False,
                                             False)
        loss.sum()
        ops.scale_grad_(grad, one)

    x = x0.clone().requires_grad_(True)

    def eager():
        x.grad = None
        F.binary_cross_entropy_with_logits(x, y).backward()

    cfn = torch.compile(lambda a, b: F.binary_cross_entropy_with_logits(a, b))

    def compiled():
        x.grad = None
        cfn(x, y).backward()

    return {"fused": fused, "eager": eager, "torch.compile": compiled}


CASES = {"ce": ("CE 4096x32000", lambda r: ce_case(4096, 32000, r)),
         "ce_llama": ("CE 2048x128256", lambda r: ce_case(2048, 128256, r)),
         "bce": ("BCE 65536x256", lambda r: bce_case(65536, 256, r))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="all", choices=[*CASES, "all"])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu isa "
          f"{_native.loaded_cpu_isa}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}")
    for key in (CASES if args.case == "all" else [args.case]):
        title, make = CASES[key]
        fns = make(args.reps)
        times = time_interleaved(fns, args.reps)
        print(title)
        for name, t in times.items():
            print(f"  {name:20s} {t * 1e3:8.1f} ms   eager/this {times['eager'] / t:5.2f}x")


if __name__ == "__main__":
    main()
