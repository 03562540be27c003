// Host-side argument checks of the fusedloss ops, shared by the CPU and CUDA wrappers so that
// every native kernel rejects the same arguments with the same exception type and message.
// Every message starts with "<op>: <argument>", then says what was expected and what was given.
//   - wrong rank, shape, dtype, stride or device of a tensor argument: TORCH_CHECK
//     (RuntimeError in Python);
//   - a float argument out of its domain (label_smoothing, lse_square_scale, softcap):
//     TORCH_CHECK_VALUE (ValueError).
// Nothing here reads tensor data (the out-of-range class-index check needs the values: the CPU
// does it, a CUDA kernel records it on the device), so every check is free of device syncs.
// The Python backends raise the same (python/fusedloss/_op_checks.py).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace fusedloss {
namespace checks {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation dtype of a logits dtype: fp64 for fp64, fp32 for fp32/fp16/bf16.
inline at::ScalarType acc_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the logits' device ",
              logits.device(), ", got ", t.device());
}

// (R, C) logits of a float dtype; `unit_col_stride`: columns contiguous (rows may be strided).
inline void check_logits(const char* op, const at::Tensor& logits, bool unit_col_stride) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (rows, classes), got shape ",
              logits.sizes());
  TORCH_CHECK(is_float_dtype(logits.scalar_type()), op,
              ": logits must be float16, bfloat16, float32 or float64, got ",
              logits.scalar_type());
  if (unit_col_stride) {
    TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, op,
                ": logits must have stride(1) == 1 (rows may be strided), got strides ",
                logits.strides());
  }
}

// Softmax-CE target: (R,) int64 class indices, or (R, C) probabilities in the logits' dtype or
// the accumulation dtype with stride(1) == 1. Returns true for probabilities.
inline bool check_ce_target(const char* op, const at::Tensor& target, const at::Tensor& logits) {
  check_same_device(op, "target", target, logits);
  if (target.dim() == 1) {
    TORCH_CHECK(target.scalar_type() == at::kLong, op,
                ": target (class indices) must be int64, got ", target.scalar_type());
    TORCH_CHECK(target.size(0) == logits.size(0), op, ": target must have shape (",
                logits.size(0), ",) for logits of shape ", logits.sizes(), ", got ",
                target.sizes());
    return false;
  }
  TORCH_CHECK(target.dim() == 2, op,
              ": target must be (rows,) class indices or (rows, classes) probabilities, got "
              "shape ", target.sizes());
  const auto d = target.scalar_type(), x = logits.scalar_type();
  TORCH_CHECK(d == x || d == acc_dtype(x), op,
              ": target (probabilities) must have the logits' dtype ", x,
              " or the accumulation dtype ", acc_dtype(x), ", got ", d);
  TORCH_CHECK(target.sizes() == logits.sizes(), op,
              ": target (probabilities) must have the logits' shape ", logits.sizes(), ", got ",
              target.sizes());
  TORCH_CHECK(target.size(1) <= 1 || target.stride(1) == 1, op,
              ": target (probabilities) must have stride(1) == 1, got strides ",
              target.strides());
  return true;
}

// Per-class vector (CE weight, BCE threshold): (C,) of any float dtype and any stride.
inline void check_class_vector(const char* op, const char* name, const at::Tensor& v,
                               const at::Tensor& logits) {
  check_same_device(op, name, v, logits);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == logits.size(1), op, ": ", name,
              " must have shape (", logits.size(1), ",), got ", v.sizes());
  TORCH_CHECK(is_float_dtype(v.scalar_type()), op, ": ", name, " must be floating, got ",
              v.scalar_type());
}

// (R, C) operand of a sigmoid op (target, weight, pos_weight, grad_loss): any strides; float
// dtypes, plus bool/uint8 where `allow_bytes` (targets).
inline void check_elementwise_operand(const char* op, const char* name, const at::Tensor& t,
                                      const at::Tensor& logits, bool allow_bytes) {
  check_same_device(op, name, t, logits);
  TORCH_CHECK(t.sizes() == logits.sizes(), op, ": ", name, " must have the logits' shape ",
              logits.sizes(), ", got ", t.sizes());
  const auto d = t.scalar_type();
  TORCH_CHECK(is_float_dtype(d) || (allow_bytes && (d == at::kBool || d == at::kByte)), op,
              ": ", name, " must be floating", allow_bytes ? " (or bool/uint8)" : "",
              ", got ", d);
}

// BCE target: a float dtype must be the logits' or the accumulation dtype; bool/uint8 as is.
inline void check_bce_target(const char* op, const at::Tensor& target, const at::Tensor& logits) {
  check_elementwise_operand(op, "target", target, logits, /*allow_bytes=*/true);
  const auto d = target.scalar_type(), x = logits.scalar_type();
  TORCH_CHECK(!is_float_dtype(d) || d == x || d == acc_dtype(x), op,
              ": target must have the logits' dtype ", x, ", the accumulation dtype ",
              acc_dtype(x), ", bool or uint8, got ", d);
}

// A one-element float tensor (grad_scale, scale) on the logits' device.
inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                                const at::Tensor& logits) {
  check_same_device(op, name, t, logits);
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name, " must be floating, got ",
              t.scalar_type());
}

// Per-row incoming gradient of softmax_ce_bwd: (R,) of any float dtype and stride.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& logits) {
  check_same_device(op, name, t, logits);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name, " must have shape (",
              logits.size(0), ",), got ", t.sizes());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name, " must be floating, got ",
              t.scalar_type());
}

inline void check_softcap(const char* op, double softcap) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, op,
                    ": softcap must be finite and >= 0 (0 = off), got ", softcap);
}

// The float arguments of the softmax-CE ops.
inline void check_ce_scalars(const char* op, double label_smoothing, double lse_square_scale,
                             double softcap) {
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(lse_square_scale) && lse_square_scale >= 0.0, op,
                    ": lse_square_scale must be finite and >= 0, got ", lse_square_scale);
  check_softcap(op, softcap);
}

// sigmoid_bce_fwd: the confusion counts compare against a threshold.
inline void check_count(const char* op, bool count, bool has_threshold) {
  TORCH_CHECK_VALUE(!count || has_threshold, op, ": count=True needs a threshold, got None");
}

// sigmoid_bce_fwd: the threshold histogram, both given or neither; edges (B + 1,) float32
// contiguous, counts (2, C, B + 2) int64 contiguous, both on the logits' device. The edges'
// order is not checked (that would read them; ThresholdHistogram builds them increasing).
inline void check_histogram(const char* op, const std::optional<at::Tensor>& edges,
                            const std::optional<at::Tensor>& counts, const at::Tensor& logits) {
  const bool has_e = edges.has_value() && edges->defined();
  const bool has_c = counts.has_value() && counts->defined();
  TORCH_CHECK_VALUE(has_e == has_c, op, ": hist_counts and hist_edges must be given together, got ",
                    has_c ? "hist_counts" : "hist_edges", " alone");
  if (!has_e) return;
  const at::Tensor& e = *edges;
  const at::Tensor& c = *counts;
  check_same_device(op, "hist_edges", e, logits);
  TORCH_CHECK(e.dim() == 1 && e.size(0) >= 1 && e.stride(0) == 1, op,
              ": hist_edges must be a non-empty contiguous 1-D tensor, got shape ", e.sizes(),
              " and strides ", e.strides());
  TORCH_CHECK(e.scalar_type() == at::kFloat, op, ": hist_edges must be float32, got ",
              e.scalar_type());
  check_same_device(op, "hist_counts", c, logits);
  TORCH_CHECK(c.scalar_type() == at::kLong, op, ": hist_counts must be int64, got ",
              c.scalar_type());
  TORCH_CHECK(c.dim() == 3 && c.size(0) == 2 && c.size(1) == logits.size(1) &&
                  c.size(2) == e.size(0) + 1 && c.is_contiguous(),
              op, ": hist_counts must be a contiguous (2, ", logits.size(1), ", ", e.size(0) + 1,
              ") tensor, got shape ", c.sizes(), " and strides ", c.strides());
}

}  // namespace checks
}  // namespace fusedloss
