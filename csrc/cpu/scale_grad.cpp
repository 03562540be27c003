// scale_grad_ on CPU: grad *= scale in place (docs/OPS.md). The backward of a loss whose gradient
// was computed in the forward: with the usual loss.backward() the incoming gradient is exactly 1
// and this returns without touching the (R, C) gradient. Reading a CPU scalar is not a sync.
#include "cpu/common.h"

namespace fusedloss {
namespace cpu {
namespace {

// Mutable (Tensor(a!)) arguments are `Tensor&`: every backend's kernel must have the same C++
// signature (csrc/cuda/scale_grad.cu).
void scale_grad__cpu(Tensor& grad, const Tensor& scale) {
  const char* op = "scale_grad_";
  TORCH_CHECK(checks::is_float_dtype(grad.scalar_type()), op,
              ": grad must be float16, bfloat16, float32 or float64, got ", grad.scalar_type());
  checks::check_scalar_tensor(op, "scale", scale, grad);
  const double s = scale.item<double>();
  if (s == 1.0 || grad.numel() == 0) return;
  if (!grad.is_contiguous()) {  // not produced by the fused forward; let ATen handle the strides
    grad.mul_(s);
    return;
  }
  FUSEDLOSS_DISPATCH_FLOATING(grad.scalar_type(), "scale_grad_", [&] {
    using acc = acc_type<scalar_t>;
    using Vec = Vectorized<acc>;
    constexpr int64_t V = Vec::size();
    scalar_t* p = grad.data_ptr<scalar_t>();
    const Vec vs(static_cast<acc>(s));
    at::parallel_for(0, grad.numel(), kGrainElems, [&](int64_t i0, int64_t i1) {
      acc buf[V];
      for (int64_t i = i0; i < i1; i += V) {
        const int64_t k = std::min(V, i1 - i);
        vstore_as<scalar_t, acc>(p + i, vload_as<acc>(p + i, k, buf) * vs, k);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { m.impl("scale_grad_", &scale_grad__cpu); }

}  // namespace cpu
}  // namespace fusedloss
