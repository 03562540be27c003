"""Small calls of every CUDA op reaching every row layout of ce_kernel, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_cases.py [--quick]

Layouts (csrc/cuda/ce_launch.cuh, choose_layout; bytes = 16-byte chunks x 16 on an sm_90 GPU):
  bf16 C=1000         warp rows (126 chunks <= 128), staged per warp
  fp32 C=3001         block rows, the row staged in one block (12 KB)
  bf16 C=50257        cluster of 2 (100 KB row > 64 KB: two 50 KB slices)
  bf16 C=131072       cluster of 4 (256 KB row: four 64 KB slices)
  bf16 C=262144       cluster of 8 (512 KB row: eight 64 KB slices)
  fp64 C=262144       streaming (2 MB row > 8 x 223 KB): the gradient re-reads the row
  decode only         one pass, no staging
plus odd row strides (rows not 16-byte aligned), probability targets in both dtypes, BCE with
counts and several column tiles, scale_grad_ and an out-of-range target (raised afterwards).
--quick (racecheck: shared-memory hazards only exist in the staged layouts) runs one dtype of
the block/cluster layouts. Run it without the caching allocator
(PYTORCH_NO_CUDA_MEMORY_CACHING=1) so an out-of-bounds access cannot land in a neighbour.
"""

import sys

import torch

import fusedloss  # noqa: F401  (loads the ops)

OPS, DEV = torch.ops.fusedloss, "cuda"
G = torch.Generator(device=DEV).manual_seed(0)

CE_CASES = [  # (dtype, rows, classes, row padding)
    (torch.bfloat16, 3, 1000, 3),
    (torch.float32, 2, 3001, 1),
    (torch.bfloat16, 2, 50257, 0),
    (torch.bfloat16, 2, 131072, 0),
    (torch.bfloat16, 2, 262144, 0),
    (torch.float64, 1, 262144, 0),
    (torch.float16, 9, 77, 1),
]
QUICK = [CE_CASES[1], CE_CASES[2], CE_CASES[3], CE_CASES[4]]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ce_calls(dtype, rows, classes, pad):
    x = (torch.randn(rows, classes + pad, generator=G, device=DEV) * 3).to(dtype)[:, :classes]
    t = torch.randint(0, classes, (rows,), generator=G, device=DEV)
    t[0] = -100
    w = torch.rand(classes, generator=G, device=DEV, dtype=acc(dtype)) + 0.5
    s = torch.tensor(0.5, device=DEV, dtype=acc(dtype))
    OPS.softmax_ce_fwd(x, t, w, s, -100, 0.1, 1e-3, 10.0, True, True)
    p = torch.softmax(torch.randn(rows, classes, generator=G, device=DEV), -1)
    OPS.softmax_ce_fwd(x, p.to(dtype), w, None, -100, 0.1, 0.0, 0.0, True, False)
    OPS.softmax_ce_fwd(x, p.to(acc(dtype)), None, None, -100, 0.0, 0.0, 0.0, True, False)
    OPS.softmax_ce_fwd_inplace(x.clone(), t, None, s, -100, 0.0, 0.0, 0.0, True)
    OPS.softmax_ce_bwd(torch.ones(rows, device=DEV), x, t, w, -100, 0.1, 1e-3, 10.0)
    OPS.softmax_decode(x, 0.0)


def bce_calls(dtype, rows, classes, pad):
    x = (torch.randn(rows, classes + pad, generator=G, device=DEV) * 3).to(dtype)[:, :classes]
    y = torch.rand(rows, classes, generator=G, device=DEV) > 0.5
    w = torch.rand(classes, generator=G, device=DEV, dtype=acc(dtype)).expand(rows, classes)
    thr = torch.zeros(classes, device=DEV)
    s = torch.tensor(0.5, device=DEV, dtype=acc(dtype))
    OPS.sigmoid_bce_fwd(x, y, w, None, s, thr, True, True, True, True)
    OPS.sigmoid_bce_fwd(x, y.to(acc(dtype)), None, w, None, None, False, False, False, False)
    OPS.sigmoid_bce_bwd(torch.randn(classes, rows, device=DEV).t(), x, y, None, None)
    OPS.sigmoid_decode(x, thr, True)
    g = x.contiguous()
    OPS.scale_grad_(g, s)
    OPS.scale_grad_(g, torch.ones((), device=DEV))


def bad_target():
    t = torch.tensor([0, 10], device=DEV)
    OPS.softmax_ce_fwd(torch.randn(2, 10, device=DEV), t, None, None, -100, 0.0, 0.0, 0.0, True,
                       False)
    torch.cuda.synchronize()
    try:
        torch.ops.fusedloss_cuda.raise_pending_error()
    except IndexError as e:
        print("bad target reported:", e)
        return
    raise SystemExit("expected IndexError for target 10")


def main(argv):
    cases = QUICK if "--quick" in argv else CE_CASES
    for case in cases:
        ce_calls(*case)
        print("ce", case[0], case[1:], "done", flush=True)
    if "--quick" not in argv:
        for case in [(torch.bfloat16, 5, 70000, 0), (torch.float32, 7, 10, 1)]:
            bce_calls(*case)
            print("bce", case[0], case[1:], "done", flush=True)
        bad_target()
    torch.cuda.synchronize()
    print("sanitize cases done")


if __name__ == "__main__":
    main(sys.argv[1:])
