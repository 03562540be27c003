// The CUDA implementations of the fusedloss ops (schemas: csrc/ops.cpp; semantics:
// docs/OPS.md), defined in softmax_ce.cu, sigmoid_bce.cu and scale_grad.cu and registered for
// the CUDA dispatch key in register.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fusedloss {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce_fwd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool compute_grad, bool decode);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce_fwd_inplace(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool decode);

at::Tensor softmax_ce_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                          const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          int64_t ignore_index, double label_smoothing, double lse_square_scale,
                          double softcap);

std::tuple<at::Tensor, at::Tensor> softmax_decode(const at::Tensor& logits, double softcap);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_bce_fwd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& threshold, bool reduce_rows, bool compute_grad,
    bool return_probs, bool count, const std::optional<at::Tensor>& hist_edges,
    const std::optional<at::Tensor>& hist_counts);

at::Tensor sigmoid_bce_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                           const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight);

std::tuple<at::Tensor, at::Tensor> sigmoid_decode(const at::Tensor& logits,
                                                  const at::Tensor& threshold, bool return_probs);

void scale_grad_(at::Tensor& grad, const at::Tensor& scale);

}  // namespace cuda
}  // namespace fusedloss
