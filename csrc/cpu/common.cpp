// Out-of-line helpers shared by the CPU kernels (see common.h).
#include "cpu/common.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fusedloss {
namespace cpu {

// Below this size the allocation is served from the heap's free lists (no fresh pages to fault
// in), and a huge page (2 MiB) would not even fit.
constexpr int64_t kHugePageAdviceBytes = 4 << 20;

Tensor new_2d_output(int64_t rows, int64_t classes, const at::TensorOptions& options) {
  Tensor out = at::empty({rows, classes}, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = out.numel() * static_cast<int64_t>(out.element_size());
  if (bytes >= kHugePageAdviceBytes) {
    // madvise needs a page-aligned start; advise the page-aligned interior of the buffer. It is
    // only a hint: failure (THP disabled, not an anonymous mapping) changes nothing.
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t start = (begin + page - 1) & ~(page - 1);
    const uintptr_t end = (begin + static_cast<uintptr_t>(bytes)) & ~(page - 1);
    if (end > start) (void)madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace cpu
}  // namespace fusedloss
