"""Helpers shared by the Triton kernels: launch configuration tables and small math functions.

Launch configurations
---------------------
Every kernel here is memory-bound, so the configuration only has to keep enough bytes in flight
per SM and keep the per-program register tile small enough not to spill. The tables below are a
*starting point* for sm_90 (H100/H200), derived from `ptxas -v` register counts and not from
GPU timings; each entry says what it assumes or what was measured. They are kept small on purpose:
every (block, warps) pair is one more compiled specialisation (see scripts/triton_aot_check.py).

Under TRITON_INTERPRET=1 (CPU, tests only) there is one configuration per kernel and no
autotuning: `@triton.autotune` with several configs fails under the interpreter, and small
blocks make multi-block rows cheap to test (a 300-class row spans three 128-wide blocks).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype as acc_torch  # noqa: F401  (re-exported for the kernel modules)


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (read when @triton.jit decorates)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Interpreter block sizes (one config; small so that tests cross block boundaries cheaply).
INTERPRET_BLOCK = 128
INTERPRET_BCE_TILE = (4, 64)  # (rows, columns)

# Softmax-CE column block per logits element size, on sm_90. One program owns one row and
# loops over it in blocks of BLOCK columns twice (statistics, then gradient), so the row's
# second read is an L2 hit for rows up to ~L2/programs-in-flight. Chosen from `ptxas -v`
# register counts for sm_90a (fwd + grad + weight + softcap, aligned operands), not from
# GPU timings: 8 elements per thread keeps every 16/32-bit config at
# 40 registers with no spills and 16-byte vector loads, so registers allow 6 CTAs of 8 warps
# per SM (48 of 64 warps), i.e. 24 KiB (bf16) to 48 KiB (fp32) of logits per SM per block
# step. 16 elements per thread (4096 x 8 warps) took 80-118 registers; 32 (8192 x 8 warps,
# bf16) took 246.
# Shorter rows use smaller blocks so that a classifier with few classes does not spend its time
# on masked lanes (a 10-class row in a 2048-wide block would use 0.5% of them): up to 1024
# classes one block of 1024 over 4 warps, up to 128 classes one block of 128 over 1 warp (both
# 8 elements per thread). Each tier is one more set of compiled specialisations, hence three.
SOFTMAX_BLOCK = {2: 2048, 4: 2048, 8: 1024}
SOFTMAX_WARPS = 8
SOFTMAX_SHORT_ROWS = ((128, 1), (1024, 4))  # (BLOCK = the longest row it serves, num_warps)

# BCE tile (rows, columns) per loop step with 4 warps: 8 elements per thread, so bf16 operands
# load as 16-byte vectors. Measured with `ptxas -v` for sm_90a (bf16, row-sum loss + gradient,
# aligned operands), not timed on a GPU: (2, 512) x 4 warps uses 128 registers,
# no spills (4 CTAs = 16 warps per SM); (1, 512) uses 72 but loads 8-byte vectors; (4, 1024)
# needs 255 and spills. Each program walks BCE_ROW_TILES_PER_PROGRAM tiles down its column
# tile, so per-class counts are flushed with one integer atomic per class per 64 rows.
BCE_TILE = (2, 512)
BCE_WARPS = 4
BCE_ROW_TILES_PER_PROGRAM = 32
# CUDA's limit on gridDim.y (and z); x allows 2^31 - 1.
MAX_GRID_Y = 65535

# scale_grad_: a flat elementwise multiply. Not measured: 4096 elements x 4 warps per program
# (32 per thread, only two live values each), assumed enough bytes in flight for a
# memory-bound multiply.
SCALE_BLOCK = 4096
SCALE_WARPS = 4
INTERPRET_SCALE_BLOCK = 1024


def softmax_config(num_classes: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a softmax-CE row of `num_classes` logits of `itemsize` bytes."""
    if interpreting():
        return INTERPRET_BLOCK, 1
    for block, warps in SOFTMAX_SHORT_ROWS:
        if num_classes <= block:
            return block, warps
    return SOFTMAX_BLOCK[itemsize], SOFTMAX_WARPS


def softmax_configs(itemsize: int) -> list[tuple[int, int]]:
    """Every (BLOCK, num_warps) `softmax_config` returns on a GPU (for the AOT check)."""
    return [*SOFTMAX_SHORT_ROWS, (SOFTMAX_BLOCK[itemsize], SOFTMAX_WARPS)]


def bce_config() -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for the BCE kernels."""
    if interpreting():
        return (*INTERPRET_BCE_TILE, 1)
    return (*BCE_TILE, BCE_WARPS)


def scale_config() -> tuple[int, int]:
    if interpreting():
        return INTERPRET_SCALE_BLOCK, 1
    return SCALE_BLOCK, SCALE_WARPS


def acc_dtype(dtype: torch.dtype):
    """Accumulation type as a Triton type (the rule: fusedloss._dtypes.acc_dtype)."""
    return TL_TYPES[acc_torch(dtype)]


@triton.jit
def tanh(a):
    """tanh without libdevice (the interpreter has none), to a few ulp relative to its value.

    |a| >= 0.55 (and fp64): (1 - e) / (1 + e) with e = exp(-2|a|), whose error is ~1 ulp of 1:
    relative to the value only where tanh is not small (fp64's ulp keeps it small everywhere).
    fp32 |a| < 0.55: the Taylor series of tanh to a^17 (truncation below 3e-8 relative), so
    cap * tanh(x / cap) keeps x's relative precision when cap >> |x| (the exp form alone lost
    cap * 6e-8 absolute: 1e-5 relative at cap = 1000)."""
    ax = tl.abs(a)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    if not a.dtype.is_fp64():
        a2 = ax * ax
        p = -0.0014558343870513183 + a2 * 0.000590027440945586
        p = 0.003592128036572481 + a2 * p
        p = -0.008863235529902197 + a2 * p
        p = 0.021869488536155203 + a2 * p
        p = -0.05396825396825397 + a2 * p
        p = 0.13333333333333333 + a2 * p
        p = -0.3333333333333333 + a2 * p
        p = 1.0 + a2 * p
        t = tl.where(ax < 0.55, ax * p, t)
    return tl.where(a < 0, -t, t)


@triton.jit
def sech2(a):
    """d tanh(a) / da = sech(a)^2 = 4 e / (1 + e)^2 with e = exp(-2|a|): relative precision
    where 1 - tanh(a)^2 cancels (|a| >> 1, soft-capping's saturated logits)."""
    e = tl.exp(-2.0 * tl.abs(a))
    d = 1.0 + e
    return 4.0 * e / (d * d)


@triton.jit
def log1p_small(e):
    """log(1 + e) for e in [0, 1] from one log, within a few ulp: Goldberg's
    log(u) * e / (u - 1) with u = 1 + e (the rounding of u cancels in the ratio); u == 1 means
    e < ulp(1) / 2, where log1p(e) = e. (log(1 + e) alone has a relative error of ulp(1) / e.)"""
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


def split_f64(value: float) -> tuple[float, float]:
    """A Python float as two fp32 kernel arguments hi + lo (Triton passes float scalars as
    fp32): the kernel adds them in its accumulation type, so fp64 kernels see the value to
    ~2^-48 relative instead of fp32's 2^-24 (e.g. label_smoothing=0.1), fp32 kernels see hi."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


def on_device(t: torch.Tensor):
    """Context in which a launch goes to `t`'s GPU: Triton launches on torch's current CUDA
    device, which need not be the tensor's (tensors on cuda:1 with cuda:0 current)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_DUMMIES: dict = {}


def dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 1-element tensor passed for an absent pointer argument (never read: its runtime flag is
    off). It has the pointer's real dtype, so an absent argument compiles the same
    specialisation as a present one and the set of compiled kernels stays the one listed by
    each module's `specialisations()` (checked by scripts/triton_aot_check.py)."""
    key = (str(device), dtype)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


# Triton type names of the torch dtypes the kernels take (for ahead-of-time signatures).
TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
            torch.float64: "fp64", torch.int64: "i64", torch.uint8: "u8"}
TL_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)




def signature(fn, pointer_types: dict, scalar_types: dict, constexprs: dict) -> dict:
    """Full AOT signature of `fn`: pointers as '*<type>', scalars by type, the rest constexpr.

    Integer scalars are compiled as i32, what the JIT picks for values below 2^31 (it picks
    i64 above); the kernels cast program ids to int64 before multiplying by a stride, so the
    generated code is the same apart from the argument width."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = "*" + TL_NAMES[pointer_types[name]]
        else:
            sig[name] = scalar_types.get(name, "i32")
    return sig
