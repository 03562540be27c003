"""Row-chunked linear + loss: the chunk-size rule and the per-chunk matmuls that the fused
linear cross-entropy (linear_ce.py) and linear BCE (linear_bce.py) share.

A chunk of rows [i, j) of the (N, H) input gets its logits `x[i:j] @ W^T (+ b)` in one reused
(rows, C) buffer; the loss op turns the buffer into d(loss)/d(logits) (in place for softmax
CE, block by block for BCE); then `grad_input[i:j] = G @ W`, `grad_W += G^T @ x[i:j]`,
`grad_b += G.sum(0)`.
Matmuls run in the input dtype (BLAS accumulates in fp32); grad_W and grad_b are accumulated
across chunks in the accumulation dtype (fp32 for bf16/fp16), so a low-precision grad_W is
rounded once, as torch's unchunked matmul rounds it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref

# chunk_size=None rule. Each chunk re-reads (and BLAS re-packs) all of W for each of its three
# matmuls, a cost independent of the chunk's rows, so small chunks are slow; the chunk's
# buffers are the only memory beyond the gradients, so big chunks are fat.
# Measured on the 2-core x86_64 CPU of the build machine under heavy load (fp32, N=2048,
# H=1024, C=32000, fwd+bwd into leaves, side by side): 64 rows 2.1x, 128 rows 1.5x, 256 rows
# 1.25x, 512 rows 1.0x the time of eager (unchunked) PyTorch.
# The rule: the chunk's buffers (`buffers` (rows, C) buffers: 1 for softmax CE, whose gradient
# overwrites the logits; 1 + 1/BCE_SUB_BLOCKS for BCE, see sub_blocks) may take `fraction` of
# the gradients' own bytes (grad_W + grad_input), at least MIN_CHUNK_BYTES, rounded down to a
# multiple of CHUNK_ROW_MULTIPLE rows (at least one multiple, at most all rows).
# CE takes CHUNK_MEMORY_FRACTION = 20%, a compromise towards speed (docs/linear.md: at the
# benchmark shapes 1.1-1.2x the gradients and within 10% of the fastest provider); BCE takes
# BCE_CHUNK_MEMORY_FRACTION = 10%, towards memory (1.09x at 4096 x 768 x 131072, where its
# matmuls leave it 1.5x faster than eager at that budget).
CHUNK_MEMORY_FRACTION = 0.2
BCE_CHUNK_MEMORY_FRACTION = 0.1
MIN_CHUNK_BYTES = 8 << 20
CHUNK_ROW_MULTIPLE = {"cpu": 32, "cuda": 256}
# The BCE op writes its gradient to a new tensor; the chunk loops call it on BCE_SUB_BLOCKS
# row blocks of the chunk's logits buffer and copy each block's gradient back over the logits
# it came from, so the op's output is one block, not a second (rows, C) buffer. Blocks have at
# least BCE_MIN_SUB_BLOCK elements (a small chunk is one block: one op call).
BCE_SUB_BLOCKS = 8
BCE_MIN_SUB_BLOCK = 1 << 16


def default_chunk_rows(rows: int, hidden: int, classes: int, dtype: torch.dtype,
                       device: torch.device, buffers: float = 1.0,
                       fraction: float = CHUNK_MEMORY_FRACTION) -> int:
    """Rows per chunk for chunk_size=None (the rule above); >= 1."""
    if rows <= 0:
        return 1
    esize = torch.empty((), dtype=dtype).element_size()
    grad_bytes = (classes + rows) * hidden * esize
    budget = max(fraction * grad_bytes, MIN_CHUNK_BYTES)
    mult = CHUNK_ROW_MULTIPLE.get(device.type, 128)
    per_row = max(classes, 1) * esize * buffers
    chunk = int(budget // per_row) // mult * mult
    return max(1, min(rows, max(chunk, mult)))


def sub_blocks(rows: int, classes: int) -> list[tuple[int, int]]:
    """(a, b) row ranges of the (at most BCE_SUB_BLOCKS) blocks of a chunk of (rows, classes),
    in order."""
    step = max(1, -(-rows // BCE_SUB_BLOCKS), -(-BCE_MIN_SUB_BLOCK // max(classes, 1)))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


def grad_fakes(x, w, b, target, need_input, need_weight, need_bias, need_target):
    """Fake (meta) gradients of the linear ops: input, weight, bias, target, or empty ones."""
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_input
            else empty(x),
            torch.empty_like(w, memory_format=torch.contiguous_format) if need_weight
            else empty(w),
            w.new_empty((w.shape[0],)) if need_bias and b is not None else empty(w),
            torch.empty_like(target, memory_format=torch.contiguous_format) if need_target
            else empty(target))


def chunk_logits(x: Tensor, w: Tensor, b: Tensor | None, buf: Tensor) -> Tensor:
    """`x @ w^T + b` into the first x.shape[0] rows of buf (contiguous), returned."""
    out = buf[: x.shape[0]]
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)
    return out


class LinearGrads:
    """grad_input (N, H), grad_W (C, H), grad_b (C,) filled chunk by chunk.

    Only the gradients asked for are allocated. grad_W of fp32/fp64 inputs is accumulated in
    place in its final buffer (the first chunk writes it, the others add); a bf16/fp16 grad_W
    split over several chunks goes through an fp32 accumulator.
    """

    def __init__(self, x: Tensor, w: Tensor, b: Tensor | None, need_x: bool, need_w: bool,
                 need_b: bool, chunks: int):
        self.w = w
        self.acc = ref.compute_dtype(x.dtype)
        self.gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x \
            else empty(x)
        self.lowp_w = need_w and self.acc != x.dtype and chunks > 1
        if need_w:  # the first chunk overwrites an fp32/fp64 grad_W: no zero fill
            make = w.new_zeros if self.lowp_w or chunks == 0 else w.new_empty
            self.gw = make(w.shape, dtype=self.acc if self.lowp_w else w.dtype)
        else:
            self.gw = empty(w)
        self.gb = w.new_zeros((w.shape[0],), dtype=self.acc) if need_b and b is not None \
            else empty(w)
        self.need = (need_x, need_w, need_b and b is not None)
        self.first = True

    def add(self, i: int, j: int, g: Tensor, x: Tensor, buf: Tensor | None = None) -> None:
        """Accumulate the chunk rows [i, j): g = d(loss)/d(logits) (rows, C), x its inputs;
        `buf`: the buffer g is the first rows of, if it is."""
        need_x, need_w, need_b = self.need
        if need_x:
            _rows_mm(g, self.w, self.gx[i:j], buf)
        if need_w:
            if self.lowp_w:
                self.gw.add_(torch.mm(g.t(), x))
            elif self.first:
                torch.mm(g.t(), x, out=self.gw)
            else:
                self.gw.addmm_(g.t(), x)
        if need_b:
            self.gb.add_(g.sum(0, dtype=self.acc))
        self.first = False

    def result(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(grad_input, grad_W, grad_b) in `dtype` (the unneeded ones empty)."""
        gw = self.gw.to(dtype) if self.need[1] else self.gw
        gb = self.gb.to(dtype) if self.need[2] else self.gb
        return self.gx, gw, gb


# CPU BLAS multiplies a matrix of few rows, not a multiple of 4, by another path that sums the
# C products of each output in a long chain: at C = 32000, 1-3 rows had 10x the error of the
# same rows inside a bigger product (3.5e-6 against 3.3e-7 relative), 5-9 rows 3-7x. A chunk
# (the last one, or an explicit small chunk_size) of fewer than PAD_ROWS_BELOW rows is
# multiplied padded to a multiple of 4 rows.
PAD_ROWS_BELOW = 16


def _rows_mm(g: Tensor, w: Tensor, out: Tensor, buf: Tensor | None) -> None:
    """out = g @ w, the rows of g padded as above when they are few (rows beyond g's are taken
    from `buf`, whose first rows g is, when it has them: each output row depends only on its
    own input row)."""
    rows = g.shape[0]
    padded = -(-rows // 4) * 4
    if rows % 4 == 0 or rows >= PAD_ROWS_BELOW or g.device.type != "cpu":
        torch.mm(g, w, out=out)
        return
    if buf is not None and buf.shape[0] >= padded and g.data_ptr() == buf.data_ptr():
        src = buf[:padded]
    else:
        src = g.new_zeros((padded, g.shape[1]))
        src[:rows] = g
    out.copy_(torch.mm(src, w)[:rows])


def chunk_bounds(rows: int, chunk: int):
    """(i, j) row ranges of the chunks, in order."""
    return [(i, min(i + chunk, rows)) for i in range(0, rows, chunk)]
