// The bad-target mailbox: how a CUDA kernel reports an out-of-range class target without a host
// synchronisation.
//
// An out-of-range class index (outside [0, C) and not ignore_index) raises IndexError on the CPU
// before anything is computed; on CUDA that would need a host synchronisation, and torch's own
// device assert kills the CUDA context. Instead:
//   1. the kernel never reads out of bounds: it treats the row as invalid and writes loss = NaN
//      and a NaN gradient row (lse, pred, confidence are computed normally), so a mean loss and
//      the weights it updates visibly become NaN in the same step;
//   2. it stores the offending value into the mailbox: one int64 in mapped, pinned host memory,
//      written by the device with a plain store and read by the host without synchronising;
//   3. every fusedloss CUDA op checks the mailbox when it is called (host side, before it
//      launches anything) and, if a value is there, clears it and raises
//      IndexError("Target <v> is out of bounds. ..."), like an asynchronous CUDA error but with
//      the value and without poisoning the context.
// So the error surfaces at the first fusedloss CUDA op called after the bad kernel finished
// (typically the backward of the same step, or the next step), or explicitly with
// torch.cuda.synchronize(); torch.ops.fusedloss_cuda.raise_pending_error(). If several rows are
// bad, the value reported is the one stored last (any of them).
//
// CUDA graphs. The mailbox is allocated once per process by the first fusedloss CUDA op (so in
// the usual warm-up before a capture, outside it). If that first op runs under stream capture,
// the allocation runs with this thread's capture mode set to relaxed: cudaHostAlloc is not a
// stream operation and is not captured, and in the default (global) mode it would be a
// prohibited call that invalidates the capture. Its address never changes, so captured kernels
// keep writing to it on every replay. A replay runs no host code of ours: an out-of-range target
// met during a replay surfaces at the next fusedloss CUDA op called eagerly after the replay
// finished, or at an explicit synchronize + raise_pending_error() (fusedloss._native.check_errors).
// A loop that only replays graphs sees the NaN loss at once and the IndexError only when it
// checks.
#pragma once

#include <cstdint>

namespace fusedloss {
namespace cuda {

// The mailbox value meaning "nothing to report".
constexpr long long kNoBadTarget = INT64_MIN;

// Device pointer of the mailbox (allocated on first use, capture-safe; shared by all devices).
long long* bad_target_mailbox();

// The prologue of every fusedloss CUDA op: allocate the mailbox if this is the first op of the
// process, then raise IndexError("Target <v> is out of bounds.") if a kernel launched earlier
// recorded one (and clear it). Costs one host read.
void op_prologue();

}  // namespace cuda
}  // namespace fusedloss
