// The bad-target mailbox (semantics and CUDA-graph behaviour: mailbox.h).
#include "cuda/mailbox.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <mutex>

namespace fusedloss {
namespace cuda {

namespace {
volatile long long* g_mailbox_host = nullptr;
long long* g_mailbox_dev = nullptr;
std::once_flag g_mailbox_once;

void allocate_mailbox() {
  // Relaxed: legal while this thread captures a graph (see mailbox.h); a no-op otherwise.
  c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  void* host = nullptr;
  // Portable: usable from every device's context; Mapped: the kernels write it directly.
  C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(long long),
                               cudaHostAllocMapped | cudaHostAllocPortable));
  *static_cast<volatile long long*>(host) = kNoBadTarget;
  void* dev = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
  g_mailbox_dev = static_cast<long long*>(dev);
  g_mailbox_host = static_cast<volatile long long*>(host);
}
}  // namespace

long long* bad_target_mailbox() {
  std::call_once(g_mailbox_once, allocate_mailbox);
  return g_mailbox_dev;
}

void op_prologue() {
  bad_target_mailbox();
  volatile long long* box = g_mailbox_host;
  if (*box == kNoBadTarget) return;
  long long v = __atomic_exchange_n(const_cast<long long*>(box), kNoBadTarget, __ATOMIC_SEQ_CST);
  if (v == kNoBadTarget) return;
  TORCH_CHECK_INDEX(false, "Target ", v,
                    " is out of bounds. (Found by an earlier fusedloss CUDA kernel; its loss and "
                    "gradient rows for that target were set to NaN.)");
}

}  // namespace cuda
}  // namespace fusedloss
