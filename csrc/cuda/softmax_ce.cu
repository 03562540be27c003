// Softmax cross-entropy on CUDA, host side: softmax_ce_fwd, softmax_ce_fwd_inplace,
// softmax_ce_bwd and softmax_decode (semantics: docs/OPS.md). Each op checks its arguments
// (op_checks.h, shared with the CPU ops), allocates its outputs and launches ce_kernel
// (ce_kernel.cuh) through launch_ce (ce_launch.cuh). Out-of-range class targets are reported
// through the mailbox (mailbox.h); registration is in register.cpp.
#include <ATen/ops/empty.h>

#include <limits>

#include "cuda/ce_launch.cuh"
#include "cuda/common.cuh"
#include "cuda/ops.h"
#include "op_checks.h"

namespace fusedloss {
namespace cuda {
namespace {

int64_t ld_of(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// CeArgs for an op, with the converted side tensors it points into (kept alive here).
struct CeInputs {
  CeArgs a = {};
  at::Tensor target, weight, scale;
};

// Checks and fills the logits/target/weight fields shared by the forward, in-place and backward
// ops. The class weight is read in the accumulation type, contiguous (a (C,) copy only when it
// is not already).
void ce_inputs(CeInputs& in, const char* op, const at::Tensor& logits, const at::Tensor& target,
               const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
               double zsq, double softcap) {
  checks::check_logits(op, logits, /*unit_col_stride=*/true);
  checks::check_ce_scalars(op, eps, zsq, softcap);
  const bool prob = checks::check_ce_target(op, target, logits);
  CeArgs& a = in.a;
  a.x = logits.data_ptr();
  a.ldx = ld_of(logits);
  a.R = logits.size(0);
  a.C = logits.size(1);
  a.ignore_index = ignore_index;
  a.eps = eps;
  a.zsq = zsq;
  a.softcap = softcap;
  const auto acc = acc_dtype(logits.scalar_type());
  if (prob) {
    a.ytarget = target.data_ptr();
    a.ldy = ld_of(target);
    a.y_acc = target.scalar_type() != logits.scalar_type();  // checked: logits' or acc dtype
  } else {
    in.target = target.contiguous();
    a.target = in.target.data_ptr<int64_t>();
  }
  if (weight.has_value()) {
    checks::check_class_vector(op, "weight", *weight, logits);
    in.weight = weight->to(acc).contiguous();
    a.weight = in.weight.data_ptr();
  }
}

// grad_scale as a 0-dim tensor of the accumulation type (`.to` is a no-op in the usual case).
const void* scale_ptr(CeInputs& in, const char* op, const std::optional<at::Tensor>& grad_scale,
                      const at::Tensor& logits) {
  if (!grad_scale.has_value()) return nullptr;
  checks::check_scalar_tensor(op, "grad_scale", *grad_scale, logits);
  in.scale = grad_scale->to(acc_dtype(logits.scalar_type()));
  return in.scale.data_ptr();
}

// The (R,) outputs of the forward ops; with C = 0 they are already final (docs/OPS.md: loss 0,
// lse -inf, pred 0, confidence 0), since the kernel is not launched.
struct CeRowOutputs {
  at::Tensor loss, lse, pred, conf;
};

CeRowOutputs row_outputs(CeArgs& a, const at::Tensor& logits, bool decode) {
  const auto acc = logits.options().dtype(acc_dtype(logits.scalar_type()));
  const auto i64 = logits.options().dtype(at::kLong);
  const auto f32 = logits.options().dtype(at::kFloat);
  CeRowOutputs o{at::empty({a.R}, acc), at::empty({a.R}, acc),
                 at::empty({decode ? a.R : 0}, i64), at::empty({decode ? a.R : 0}, f32)};
  if (a.C == 0) {
    o.loss.zero_();
    o.lse.fill_(-std::numeric_limits<double>::infinity());
    o.pred.zero_();
    o.conf.zero_();
  }
  a.loss = o.loss.data_ptr();
  a.lse = o.lse.data_ptr();
  if (decode) {
    a.pred = o.pred.data_ptr<int64_t>();
    a.conf = o.conf.data_ptr<float>();
  }
  return o;
}

void dispatch_ce(const CeArgs& a, const at::Tensor& logits, bool want_grad) {
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), "softmax_ce", [&] {
    launch_ce<scalar_t>(a, logits.get_device(), want_grad);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce_fwd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool compute_grad, bool decode) {
  constexpr const char* op = "softmax_ce_fwd";
  c10::cuda::CUDAGuard guard(logits.device());
  op_prologue();
  CeInputs in;
  ce_inputs(in, op, logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
            softcap);
  CeArgs& a = in.a;
  if (compute_grad) a.grad_scale = scale_ptr(in, op, grad_scale, logits);
  CeRowOutputs o = row_outputs(a, logits, decode);
  at::Tensor grad = compute_grad ? at::empty({a.R, a.C}, logits.options())
                                 : at::empty({0}, logits.options());
  if (compute_grad) {
    a.grad = grad.data_ptr();
    a.ldg = a.C;
  }
  dispatch_ce(a, logits, compute_grad);
  return {o.loss, o.lse, grad, o.pred, o.conf};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce_fwd_inplace(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool decode) {
  constexpr const char* op = "softmax_ce_fwd_inplace";
  c10::cuda::CUDAGuard guard(logits.device());
  op_prologue();
  CeInputs in;
  ce_inputs(in, op, logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
            softcap);
  CeArgs& a = in.a;
  a.grad_scale = scale_ptr(in, op, grad_scale, logits);
  CeRowOutputs o = row_outputs(a, logits, decode);
  a.grad = logits.data_ptr();  // each element is read (into shared memory) before it is written
  a.ldg = a.ldx;
  dispatch_ce(a, logits, true);
  return {o.loss, o.lse, o.pred, o.conf};
}

// Recomputes the row statistics with the forward's kernel (no saved lse): for grad_loss equal to
// the forward's grad_scale, the result is bitwise the forward's fused gradient.
at::Tensor softmax_ce_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                          const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          int64_t ignore_index, double label_smoothing, double lse_square_scale,
                          double softcap) {
  constexpr const char* op = "softmax_ce_bwd";
  c10::cuda::CUDAGuard guard(logits.device());
  op_prologue();
  CeInputs in;
  ce_inputs(in, op, logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
            softcap);
  checks::check_row_vector(op, "grad_loss", grad_loss, logits);
  CeArgs& a = in.a;
  at::Tensor grad = at::empty({a.R, a.C}, logits.options());
  if (a.R == 0 || a.C == 0) return grad;
  // grad_loss in the accumulation type (a no-op when it already is); an expanded (stride 0)
  // grad_loss keeps stride 0 when no conversion is needed.
  const auto acc = acc_dtype(logits.scalar_type());
  in.scale = grad_loss.scalar_type() == acc ? grad_loss : grad_loss.to(acc);
  a.row_scale = in.scale.data_ptr();
  a.rs = in.scale.stride(0);
  a.grad = grad.data_ptr();
  a.ldg = a.C;
  dispatch_ce(a, logits, true);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> softmax_decode(const at::Tensor& logits, double softcap) {
  constexpr const char* op = "softmax_decode";
  c10::cuda::CUDAGuard guard(logits.device());
  op_prologue();
  checks::check_logits(op, logits, /*unit_col_stride=*/true);
  checks::check_softcap(op, softcap);
  const int64_t R = logits.size(0), C = logits.size(1);
  at::Tensor pred = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor conf = at::empty({R}, logits.options().dtype(at::kFloat));
  if (C == 0) {  // docs/OPS.md: pred 0, confidence 0
    pred.zero_();
    conf.zero_();
    return {pred, conf};
  }
  CeArgs a = {};
  a.x = logits.data_ptr();
  a.ldx = ld_of(logits);
  a.R = R;
  a.C = C;
  a.softcap = softcap;
  a.pred = pred.data_ptr<int64_t>();
  a.conf = conf.data_ptr<float>();
  dispatch_ce(a, logits, false);
  return {pred, conf};
}

}  // namespace cuda
}  // namespace fusedloss
