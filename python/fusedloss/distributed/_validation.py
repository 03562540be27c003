"""Input validation for vocabulary-parallel cross-entropy that raises the SAME error on every
rank.

Each rank first checks what it can alone (`local_problems`), then summarises its inputs in a
fixed 16-int64 header (`header`: batch shape, shard size and start, checksums of target and
weight, a hash of the options, whether it found a problem). One all_gather gives every rank all
the headers, and `check_headers` raises from them identically on every rank, so bad input on
one rank cannot leave the others waiting in a collective.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from .._reduction import REDUCTIONS

# Header slots (int64), one header per rank.
_H_ERROR, _H_ROWS, _H_SHAPE, _H_SIZE, _H_START, _H_NCLS, _H_OPTS = range(7)
_H_TSUM, _H_TMIX, _H_TMIN, _H_TMAX, _H_WLEN, _H_WMIX, _H_WNAN = range(7, 14)
HEADER_LEN = 16
# Position-mixing modulus for the checksums: products stay below 2^41, so a sum over up to
# 2^22 rows (or weight entries) cannot overflow int64.
# torch.argmax over int32 indices packed in float32 bits is exact; a shard wider than this
# cannot be indexed by int32.
MAX_LOCAL_CLASSES = 2**31 - 1
_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8)


def fail(exc_type, msg: str):
    raise exc_type(f"fusedloss.distributed.cross_entropy: {msg}")


class RuntimeProblem(str):
    """A local problem torch reports as a RuntimeError (a dtype mismatch); the others are
    ValueErrors. Every rank raises RuntimeError when all the problems found are of this kind."""


# ----------------------------------------------------------------------------- this rank alone
def _tensor_problems(local_logits: Tensor, target: Tensor) -> list[str]:
    p = []
    if not local_logits.is_floating_point():
        p.append(f"local_logits must be a floating point tensor, got {local_logits.dtype}")
    if local_logits.dim() == 0:
        p.append("local_logits must have a class dimension (the last), got a 0-d tensor")
    elif local_logits.shape[-1] == 0:
        p.append("local_logits has no classes on this rank (shape[-1] == 0); every rank "
                 "must hold at least one class")
    elif local_logits.shape[-1] > MAX_LOCAL_CLASSES:
        p.append(f"local_logits has {local_logits.shape[-1]} classes; at most "
                 f"{MAX_LOCAL_CLASSES} per rank are supported")
    elif tuple(target.shape) != tuple(local_logits.shape[:-1]):
        p.append(f"target.shape {tuple(target.shape)} must be local_logits.shape without the "
                 f"class (last) dim: {tuple(local_logits.shape[:-1])}")
    if target.dtype not in _INDEX_DTYPES:
        p.append(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.device != local_logits.device:
        p.append(f"target is on {target.device} but local_logits on {local_logits.device}")
    return p


def _weight_problems(weight, local_logits: Tensor) -> list[str]:
    if weight is None:
        return []
    if not isinstance(weight, Tensor):
        return [f"weight must be a Tensor or None, got {type(weight).__name__}"]
    if weight.dim() != 1:
        return [f"weight must be the full 1-D (num_classes,) weight, got shape "
                f"{tuple(weight.shape)}"]
    if weight.dtype != local_logits.dtype:
        return [RuntimeProblem(f"weight.dtype {weight.dtype} must match local_logits.dtype "
                               f"{local_logits.dtype} (as torch: expected scalar type "
                               f"{local_logits.dtype} but found {weight.dtype})")]
    if weight.device != local_logits.device:
        return [f"weight is on {weight.device} but local_logits on {local_logits.device}"]
    return []


def _option_problems(class_start, num_classes, ignore_index, reduction, label_smoothing,
                     lse_square_scale) -> list[str]:
    p = []
    if class_start is not None and (isinstance(class_start, bool) or
                                    not isinstance(class_start, int) or class_start < 0):
        p.append(f"class_start must be a non-negative int or None, got {class_start!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or
                                    not isinstance(num_classes, int) or num_classes <= 0):
        p.append(f"num_classes must be a positive int or None, got {num_classes!r}")
    if reduction not in REDUCTIONS:
        p.append(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        p.append(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (isinstance(lse_square_scale, (int, float)) and lse_square_scale >= 0.0
            and math.isfinite(lse_square_scale)):
        p.append(f"lse_square_scale must be a finite number >= 0, got {lse_square_scale!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        p.append(f"ignore_index must be an int, got {ignore_index!r}")
    return p


def local_problems(local_logits, target, weight, class_start, num_classes, ignore_index,
                   reduction, label_smoothing, lse_square_scale) -> list[str]:
    """Everything that can be checked on this rank alone, as messages (no raising yet)."""
    if not isinstance(local_logits, Tensor):
        return [f"local_logits must be a Tensor, got {type(local_logits).__name__}"]
    if not isinstance(target, Tensor):
        return [f"target must be a Tensor, got {type(target).__name__}"]
    return (_tensor_problems(local_logits, target) + _weight_problems(weight, local_logits)
            + _option_problems(class_start, num_classes, ignore_index, reduction,
                               label_smoothing, lse_square_scale))


# ----------------------------------------------------------------------------- the header
def _mix(v: Tensor) -> tuple[Tensor, Tensor]:
    """(sum, hash) of an int64 vector: equal vectors give equal pairs. The hash sums a cubic
    of (value, position) modulo the prime 2^31 - 1, so a change passes only by a chance
    collision (a sum weighted by position, linear in both, let structured changes through:
    +d, -2d, +d at positions i, j = (i + k) / 2, k kept both sums). Device ops, no sync; every
    product stays below 2^62, every sum below 2^63 for up to 2^32 entries."""
    if v.numel() == 0:
        z = torch.zeros((), dtype=torch.int64, device=v.device)
        return z, z
    p = 2147483647
    pos = torch.arange(v.numel(), device=v.device, dtype=torch.int64)
    h = (v.remainder(p) * 48271 + pos.remainder(p) * 69621 + 12345).remainder(p)
    h = ((h * h).remainder(p) * h + pos.remainder(p)).remainder(p)
    h = (h * 16807 + 1).remainder(p)
    return v.sum(), h.sum()


def _bits(t: Tensor) -> Tensor:
    """A float tensor's bit patterns as int64 (exact comparison, -0.0 != 0.0, NaN-safe)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(as_int).to(torch.int64)


def _target_slots(h: Tensor, target: Tensor, ignore_index: int) -> None:
    """Checksums and the valid range of the targets, written into `h` on the device."""
    t = target.reshape(-1).to(torch.int64)
    h[_H_TSUM], h[_H_TMIX] = _mix(t)
    valid = t != ignore_index
    big = torch.iinfo(torch.int64).max
    if t.numel():
        h[_H_TMIN] = torch.where(valid, t, big).min()
        h[_H_TMAX] = torch.where(valid, t, -1).max()
    else:
        h[_H_TMIN], h[_H_TMAX] = big, -1


def header(problems, local_logits, target, weight, class_start, num_classes, ignore_index,
           reduction, label_smoothing, lse_square_scale, return_decoding, device) -> Tensor:
    """This rank's (HEADER_LEN,) int64 summary; only the error slot is set when `problems`."""
    h = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    if problems:
        h[_H_ERROR] = 1
        return h
    batch = tuple(local_logits.shape[:-1])
    opts = repr((int(ignore_index), reduction, float(label_smoothing), float(lse_square_scale),
                 bool(return_decoding), str(local_logits.dtype), weight is None,
                 class_start is None, num_classes is None))
    host = [0, math.prod(batch), zlib.crc32(repr(batch).encode()), local_logits.shape[-1],
            -1 if class_start is None else class_start,
            -1 if num_classes is None else num_classes, zlib.crc32(opts.encode())]
    h[:len(host)] = torch.tensor(host, dtype=torch.int64, device=device)
    _target_slots(h, target, ignore_index)
    h[_H_WLEN] = -1
    if weight is not None:
        h[_H_WLEN] = weight.numel()
        h[_H_WMIX] = _mix(_bits(weight))[1]
        h[_H_WNAN] = torch.isnan(weight).any().to(torch.int64)
    return h


# ----------------------------------------------------------------------------- all headers
def _differs(hs: list[list[int]], slot: int, what: str) -> None:
    vals = [h[slot] for h in hs]
    if len(set(vals)) > 1:
        fail(ValueError, f"{what} differs across ranks: "
             + ", ".join(f"rank {r}: {v}" for r, v in enumerate(vals)))


def _raise_local_problems(hs, problems: list[str], group) -> None:
    world = len(hs)
    errs = [r for r in range(world) if hs[r][_H_ERROR]]
    if errs:
        msgs = [None] * world
        dist.all_gather_object(msgs, problems, group=group)  # all ranks are here: no hang
        text = "; ".join(f"rank {r}: {' / '.join(msgs[r])}" for r in errs)
        runtime = all(isinstance(m, RuntimeProblem) for r in errs for m in msgs[r])
        fail(RuntimeError if runtime else ValueError,
             f"bad input on {len(errs)} of {world} ranks: {text}")


def _check_same_everywhere(hs) -> None:
    _differs(hs, _H_ROWS, "the number of rows (local_logits.shape[:-1] numel)")
    _differs(hs, _H_SHAPE, "the batch shape (local_logits.shape[:-1]) hash")
    _differs(hs, _H_OPTS, "the options hash (ignore_index, reduction, label_smoothing, "
             "lse_square_scale, return_decoding, dtype, whether weight/class_start/num_classes "
             "are given)")
    if len({(h[_H_TSUM], h[_H_TMIX]) for h in hs}) > 1:
        fail(ValueError, "target differs across ranks (checksums "
             + ", ".join(f"rank {r}: {h[_H_TSUM]}/{h[_H_TMIX]}" for r, h in enumerate(hs))
             + "); every rank must hold the same global class indices")


def _class_starts(hs) -> tuple[list[int], int]:
    """Every rank's class_start and num_classes, checked to tile [0, num_classes)."""
    world = len(hs)
    sizes = [h[_H_SIZE] for h in hs]
    total = sum(sizes)
    ncls = hs[0][_H_NCLS]
    _differs(hs, _H_NCLS, "num_classes")
    if ncls != -1 and ncls != total:
        fail(ValueError, f"the local shard sizes {sizes} add up to {total}, not "
             f"num_classes={ncls}")
    if hs[0][_H_START] == -1:
        return [sum(sizes[:r]) for r in range(world)], total
    starts = [h[_H_START] for h in hs]
    pos = 0
    for r in sorted(range(world), key=lambda r: starts[r]):
        if starts[r] != pos:
            fail(ValueError, f"shards must tile [0, {total}) without gaps or overlap: "
                 f"rank {r} has class_start={starts[r]} but the classes before it end at "
                 f"{pos} (class_start {starts}, sizes {sizes})")
        pos += sizes[r]
    return starts, total


def _check_weight_and_targets(hs, total: int) -> None:
    if hs[0][_H_WLEN] != -1:
        lens = [h[_H_WLEN] for h in hs]
        if any(n != total for n in lens):
            fail(ValueError, f"weight must be the full (num_classes,) = ({total},) weight on "
                 f"every rank, not this rank's slice; got {lens} entries on ranks "
                 f"0..{len(hs) - 1}")
        _differs(hs, _H_WMIX, "weight (checksum)")
        if hs[0][_H_WNAN]:
            fail(ValueError, "weight contains NaN")
    tmin, tmax = hs[0][_H_TMIN], hs[0][_H_TMAX]
    if tmin < 0:
        fail(IndexError, f"Target {tmin} is out of bounds (num_classes={total}).")
    if tmax >= total:
        fail(IndexError, f"Target {tmax} is out of bounds (num_classes={total}).")


def check_headers(hs: list[list[int]], rank: int, problems: list[str], group
                  ) -> tuple[int, int]:
    """Raise the same error on every rank (they all see the same gathered headers).
    Returns (class_start of this rank, num_classes)."""
    _raise_local_problems(hs, problems, group)
    _check_same_everywhere(hs)
    starts, total = _class_starts(hs)
    _check_weight_and_targets(hs, total)
    return starts[rank], total
