// scale_grad_ on CUDA: grad *= scale in place, with `scale` a 0-dim tensor on grad's device.
// The kernel reads the scale on the device and every block returns at once when it is exactly
// 1 (the usual loss.backward()), so the op never synchronises and costs one launch plus one
// 4-byte read per block in that case.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/ops.h"
#include "op_checks.h"

namespace fusedloss {
namespace cuda {
namespace {

// 256 threads x 4 blocks per SM x 16-byte chunks, grid-stride: enough bytes in flight to
// saturate HBM for an elementwise pass (an assumption for H100/H200, not measured here).
constexpr int kScaleBlock = 256;
constexpr int kScaleBlocksPerSm = 4;

template <typename T>
__global__ void __launch_bounds__(kScaleBlock)
    scale_kernel(T* __restrict__ g, int64_t n, const acc_t<T>* __restrict__ scale) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const A s = *scale;
  if (s == A(1)) return;
  // Chunks aligned to the buffer (common.cuh): chunk j covers [j*V - phase, j*V - phase + V).
  const int phase = row_phase(g, sizeof(T), V);
  const int64_t chunks = (n + phase + V - 1) / V;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < chunks;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = j * V - phase;
    const int lo = static_cast<int>(max(static_cast<int64_t>(0), -i));
    const int hi = static_cast<int>(min(static_cast<int64_t>(V), n - i));
    const Pack<T, V> p = load_pack<T, V>(g + i, true, lo, hi);
    A out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = static_cast<A>(p.v[k]) * s;
    store_pack<T, V>(g + i, true, lo, hi, out);
  }
}

}  // namespace

void scale_grad_(at::Tensor& grad, const at::Tensor& scale) {
  constexpr const char* op = "scale_grad_";
  c10::cuda::CUDAGuard guard(grad.device());
  op_prologue();
  checks::check_scalar_tensor(op, "scale", scale, grad);
  if (grad.numel() == 0) return;
  if (!grad.is_non_overlapping_and_dense()) {
    // Not produced by fusedloss: scale it with ATen (no synchronisation, but not free at 1).
    grad.mul_(scale.to(grad.scalar_type()));
    return;
  }
  const int device = grad.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  FUSEDLOSS_DISPATCH_FLOAT(grad.scalar_type(), "scale_grad_", [&] {
    using A = acc_t<scalar_t>;
    const auto acc = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
    // A dtype conversion of a 0-dim tensor is a tiny device op (no sync); usually a no-op.
    at::Tensor s = scale.scalar_type() == acc ? scale : scale.to(acc);
    const int64_t n = grad.numel();
    const int64_t chunks = (n + 2 * kVec<scalar_t> - 2) / kVec<scalar_t>;
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>((chunks + kScaleBlock - 1) / kScaleBlock,
                             static_cast<int64_t>(sm_count(device)) * kScaleBlocksPerSm));
    scale_kernel<scalar_t><<<static_cast<unsigned>(blocks), kScaleBlock, 0, stream>>>(
        grad.data_ptr<scalar_t>(), n, s.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace fusedloss
