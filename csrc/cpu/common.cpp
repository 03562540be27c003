// Out-of-line helpers shared by the CPU kernels (see common.h).
#include "cpu/common.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>

#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fusedloss {
namespace cpu {

// Below this size the allocation is served from the heap's free lists (no fresh pages to fault
// in), and a huge page (2 MiB) would not even fit.
constexpr int64_t kHugePageAdviceBytes = 4 << 20;

namespace {

std::mutex slot_mutex;
c10::intrusive_ptr<c10::StorageImpl> slot;  // guarded by slot_mutex

// Nothing but the slot refers to the storage, and it came from the CPU allocator.
bool unreferenced(const c10::intrusive_ptr<c10::StorageImpl>& s) {
  return s.use_count() == 1 && s.weak_use_count() == 1 && s->device_type() == c10::kCPU &&
         s->data_ptr().get_deleter() == c10::GetCPUAllocator()->raw_deleter();
}

void advise_huge_pages(const Tensor& out, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePageAdviceBytes) {
    // madvise needs a page-aligned start; advise the page-aligned interior of the buffer. It is
    // only a hint: failure (THP disabled, not an anonymous mapping) changes nothing.
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t start = (begin + page - 1) & ~(page - 1);
    const uintptr_t end = (begin + static_cast<uintptr_t>(bytes)) & ~(page - 1);
    if (end > start) (void)madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#else
  (void)out;
  (void)bytes;
#endif
}

}  // namespace

Tensor new_2d_output(int64_t rows, int64_t classes, const at::TensorOptions& options) {
  const int64_t bytes =
      rows * classes * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  const bool cached = bytes >= kReuseMinBytes;
  if (cached) {
    std::lock_guard<std::mutex> lock(slot_mutex);
    if (slot && unreferenced(slot)) {
      const int64_t have = static_cast<int64_t>(slot->nbytes());
      if (have >= bytes && have / 2 <= bytes) {
        Tensor out = at::empty({0}, options);
        out.set_(c10::Storage(slot), 0, {rows, classes}, {classes, 1});
        return out;
      }
    }
    slot.reset();  // dropped before the new allocation: the peak stays that of one buffer
  }
  Tensor out = at::empty({rows, classes}, options);
  advise_huge_pages(out, bytes);
  if (cached) {
    std::lock_guard<std::mutex> lock(slot_mutex);
    slot = c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(
        out.storage().unsafeGetStorageImpl());
  }
  return out;
}

int64_t empty_output_cache() {
  std::lock_guard<std::mutex> lock(slot_mutex);
  int64_t released = 0;
  if (slot && unreferenced(slot)) released = static_cast<int64_t>(slot->nbytes());
  slot.reset();
  return released;
}

TORCH_LIBRARY(fusedloss_cpu, m) {
  m.def("empty_output_cache() -> int", &empty_output_cache);
}

}  // namespace cpu
}  // namespace fusedloss
