"""Helpers shared by the Triton kernels: launch configuration tables and small math functions.

Launch configurations
---------------------
Every kernel here is memory-bound, so the configuration only has to keep enough bytes in flight
per SM and keep the per-program register tile small enough not to spill. The tables below are a
*starting point* written for sm_90 (H100/H200) and have NOT been measured on a GPU in this
session (none was lent to it); each entry says what it assumes. They are kept small on purpose:
every (block, warps) pair is one more compiled specialisation (see scripts/triton_aot_check.py).

Under TRITON_INTERPRET=1 (CPU, tests only) there is one configuration per kernel and no
autotuning: `@triton.autotune` with several configs fails under the interpreter, and small
blocks make multi-block rows cheap to test (a 300-class row spans three 128-wide blocks).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (read when @triton.jit decorates)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Interpreter block sizes (one config; small so that tests cross block boundaries cheaply).
INTERPRET_BLOCK = 128
INTERPRET_BCE_TILE = (4, 64)  # (rows, columns)

# Softmax-CE column block per logits element size, on sm_90. One program owns one row and
# loops over it in blocks of BLOCK columns twice (statistics, then gradient), so the row's
# second read is an L2 hit for rows up to ~L2/programs-in-flight. Assumption: 16 KiB of
# logits per block iteration (4096 fp32 / 8192 bf16) keeps 8 warps at 16 B loads per thread
# with 4 loads in flight, the regime where H100 HBM saturates; larger blocks only add registers.
SOFTMAX_BLOCK = {2: 8192, 4: 4096, 8: 2048}
SOFTMAX_WARPS = 8
# A row shorter than the block gets a block of next_power_of_2(C) (fewer idle lanes), but never
# below this, so at most log2(max/min)+1 block sizes ship per dtype.
SOFTMAX_MIN_BLOCK = 1024

# BCE tile: rows x columns per loop step. Elementwise; assumption: 4 KiB of logits in flight
# per warp-group (1024 fp32 columns x 4 rows over 4 warps) as for the torch elementwise kernels.
BCE_TILE = (4, 1024)
BCE_WARPS = 4

# scale_grad_: a flat elementwise multiply. Assumption: 4096 elements x 4 warps per program.
SCALE_BLOCK = 4096
SCALE_WARPS = 4
INTERPRET_SCALE_BLOCK = 1024


def softmax_config(num_classes: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a softmax-CE row of `num_classes` logits of `itemsize` bytes."""
    if interpreting():
        return INTERPRET_BLOCK, 1
    block = min(SOFTMAX_BLOCK[itemsize], max(SOFTMAX_MIN_BLOCK, triton.next_power_of_2(num_classes)))
    return block, SOFTMAX_WARPS


def softmax_blocks(itemsize: int) -> list[int]:
    """Every BLOCK `softmax_config` can return for this element size on a GPU (AOT check)."""
    out, b = [], SOFTMAX_MIN_BLOCK
    while b <= SOFTMAX_BLOCK[itemsize]:
        out.append(b)
        b *= 2
    return out


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
    """Accumulation type: fp64 for fp64 inputs, fp32 otherwise (docs/OPS.md)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def tanh(a):
    """tanh without libdevice (the interpreter has none): sign(a) (1 - e) / (1 + e), e = exp(-2|a|).

    Absolute error ~1 ulp of 1 near 0, which is what soft-capping needs (cap * tanh(x / cap)
    is then accurate to ~cap * 6e-8 in fp32)."""
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0, -t, t)


@triton.jit
def log1p_small(e):
    """log(1 + e) for e in [0, 1]: the series e - e^2/2 + e^3/3 where 1 + e rounds to 1."""
    return tl.where(e < 1e-4, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))
