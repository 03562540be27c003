"""Timing, copy bandwidth and peak memory, the same way for every provider.

CUDA: one pair of cuda events around each call, synchronised after it; an L2-sized buffer is
overwritten before every call (untimed) so no call starts with its inputs in L2, and a short
GPU spin (torch.cuda._sleep) is queued before the start event so that the host can enqueue the
whole call meanwhile: the events then time the device's work, not Python/autograd launch
overhead (as long as enqueuing takes less than the spin).
CPU: time.perf_counter around each call (CPU ops are synchronous).
The call's return value is dropped inside the timed region, so freeing its outputs (on CPU:
munmap of large buffers) counts, as it does in a training step.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bytes_model import copy_bytes

# H100/H200 L2 is 50/60 MB; overwriting 256 MB evicts it (triton.testing.do_bench uses 256 MB).
L2_FLUSH_BYTES = 256 * 1024 * 1024
# ~2 ms at the H100's ~1.7 GHz boost clock: longer than enqueuing one loss fwd+bwd from Python.
HOST_HIDE_CYCLES = 3_500_000


@dataclass
class Stats:
    median_s: float
    p25_s: float
    p75_s: float
    reps: int
    min_s: float

    @property
    def iqr_s(self) -> float:
        return self.p75_s - self.p25_s


def summarize(times: list[float]) -> Stats:
    if len(times) == 1:
        return Stats(times[0], times[0], times[0], 1, times[0])
    q = statistics.quantiles(times, n=4, method="inclusive")
    return Stats(statistics.median(times), q[0], q[2], len(times), min(times))


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
                       if self.cuda else None)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def prepare(self) -> None:
        """Untimed, before each timed call."""
        if self._flush is not None:
            self._flush.zero_()

    def once(self, fn: Callable[[], object]) -> float:
        """Seconds one call of `fn` takes (its result is dropped inside the timed region)."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(HOST_HIDE_CYCLES)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def round_robin(self, calls: dict[str, Callable[[], object]], rounds: int,
                    reduce: Callable[[list[float]], float] = statistics.median) -> dict:
        """{name: median seconds (or `reduce` of the times)} over `rounds` rounds in which every
        call runs once in turn (after one untimed warm-up call each), so machine noise hits all
        of them alike."""
        for fn in calls.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, fn in calls.items():
                self.sync()
                times[name].append(self.once(fn))
        return {name: reduce(v) for name, v in times.items()}

    def measure(self, fn: Callable[[], object], setup: Callable[[], None] | None = None, *,
                warmup: int, min_reps: int, max_reps: int, budget_s: float) -> Stats:
        """Warm up, then time calls until `min_reps` are done and `budget_s` seconds of timed
        calls have passed (or `max_reps` are done). `setup` runs untimed before each call."""
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
        self.sync()
        times: list[float] = []
        spent = 0.0
        while len(times) < max_reps and (len(times) < min_reps or spent < budget_s):
            if setup is not None:
                setup()
            self.prepare()
            self.sync()
            times.append(self.once(fn))
            spent += times[-1]
        return summarize(times)


def copy_bandwidth(timer: Timer, like: torch.Tensor, **reps) -> tuple[float, Stats]:
    """Bytes/s of `dst.copy_(src)` for a buffer the size and dtype of `like`, into a
    preallocated destination (bytes counted: read + written)."""
    src = torch.empty_like(like, requires_grad=False).copy_(like.detach())
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page of the destination once (untimed)
    stats = timer.measure(lambda: dst.copy_(src), **reps)
    nbytes = src.numel() * src.element_size()
    return copy_bytes(nbytes) / stats.median_s, stats


# ---- peak memory --------------------------------------------------------------------------

def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give glibc's free heap pages back to the OS, so that memory a call takes from the heap
    shows up as new resident pages (glibc keeps freed blocks up to 32 MB in its heap)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated during one call, minus what was allocated before"
RSS_MEM_METHOD = ("peak RSS during one call (VmHWM after malloc_trim and /proc/self/clear_refs) "
                  "minus RSS before")
MAXRSS_MEM_METHOD = ("increase of getrusage ru_maxrss during one call (a lower bound: 0 unless "
                     "the call exceeds the process's earlier peak)")


def peak_memory(timer: Timer, fn: Callable[[], object]) -> tuple[int, str]:
    """Extra bytes one call of `fn` needs at its peak, beyond what was resident before,
    and how that was measured."""
    if timer.cuda:
        timer.sync()
        torch.cuda.reset_peak_memory_stats(timer.device)
        base = torch.cuda.memory_allocated(timer.device)
        fn()
        timer.sync()
        return torch.cuda.max_memory_allocated(timer.device) - base, CUDA_MEM_METHOD
    # fusedloss keeps its last large CPU output for reuse: release it, so that the call's own
    # buffer counts in its peak instead of hiding in `before`.
    fusedloss = sys.modules.get("fusedloss")
    if fusedloss is not None:
        fusedloss.empty_cache()
    _malloc_trim()
    before = _proc_status_kb("VmRSS")
    if before is not None and _reset_peak_rss():
        fn()
        peak = _proc_status_kb("VmHWM")
        if peak is not None:
            return max(0, peak - before) * 1024, RSS_MEM_METHOD
    import resource

    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (r1 - r0) * 1024, MAXRSS_MEM_METHOD
