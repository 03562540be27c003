// fusedloss op schemas: the one contract the native (CPU, CUDA) and Triton backends implement.
// Schemas and the Autograd-key guard below live here; kernels register with
// TORCH_LIBRARY_IMPL(fusedloss, CPU|CUDA) in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu. The Triton
// backend registers the same schemas under the namespace `fusedloss_triton`
// (python/fusedloss/_triton.py); the pure-PyTorch backend implements the same signatures in
// python/fusedloss/_torch_backend.py. Semantics: docs/OPS.md.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedloss, m) {
  // Softmax cross-entropy over a (R, C) row-major view. One read of `logits` produces
  // loss/lse/decoding and, when compute_grad, the gradient pre-scaled by grad_scale.
  m.def(
      "softmax_ce_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? grad_scale, "
      "int ignore_index, float label_smoothing, float lse_square_scale, float softcap, "
      "bool compute_grad, bool decode) "
      "-> (Tensor loss, Tensor lse, Tensor grad, Tensor pred, Tensor confidence)");
  // Same, but the gradient overwrites `logits` (inplace_backward=True).
  m.def(
      "softmax_ce_fwd_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, "
      "Tensor? grad_scale, int ignore_index, float label_smoothing, float lse_square_scale, "
      "float softcap, bool decode) -> (Tensor loss, Tensor lse, Tensor pred, Tensor confidence)");
  // Backward for reduction='none': grad_loss is (R,). Recomputes the row's max and sum of exps
  // with the forward's code, so the result is bitwise the forward's fused gradient for equal
  // scales (no saved lse: exp(z - lse) from a rounded lse loses precision at large logits).
  m.def(
      "softmax_ce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "int ignore_index, float label_smoothing, float lse_square_scale, float softcap) "
      "-> Tensor");
  // Inference decoding: argmax (lowest index on ties) and its probability.
  m.def("softmax_decode(Tensor logits, float softcap) -> (Tensor pred, Tensor confidence)");

  // Sigmoid binary cross-entropy with logits, elementwise over (R, C).
  m.def(
      "sigmoid_bce_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "Tensor? grad_scale, Tensor? threshold, bool reduce_rows, bool compute_grad, "
      "bool return_probs, bool count, Tensor? hist_edges=None, "
      "Tensor(a!)? hist_counts=None) "
      "-> (Tensor loss, Tensor grad, Tensor labels, Tensor probs, Tensor counts)");
  // Backward for reduction='none': grad_loss is (R, C).
  m.def(
      "sigmoid_bce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor? pos_weight) -> Tensor");
  // Inference decoding: multi-hot labels (x > threshold, logit space) and optional probs.
  m.def("sigmoid_decode(Tensor logits, Tensor threshold, bool return_probs) -> (Tensor labels, Tensor probs)");

  // grad *= scale (0-dim tensor), in place; reads `scale` on the device and touches nothing
  // when it is exactly 1 (the usual loss.backward()).
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
}

// The loss ops' gradients come from the autograd Functions in python/fusedloss/autograd.py,
// which call the ops with grad mode off. An op called with grad mode on and an input that
// requires grad would be differentiated by autograd itself, and it has no formula: torch's
// fallback warns and gives a zero gradient. That is a silently wrong gradient (torch.compile
// inside torch.func transforms once did it), so this guard raises instead. Below it the call
// goes on as before. The decoding ops are not guarded: their outputs are not differentiable.
namespace {

void no_direct_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                        torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const size_t n = op.schema().arguments().size();
    for (size_t i = stack->size() - n; i < stack->size(); ++i) {
      const c10::IValue& v = (*stack)[i];
      TORCH_CHECK(!(v.isTensor() && v.toTensor().requires_grad()), op.schema().name(),
                  ": an input requires grad and grad mode is on, but this op has no autograd "
                  "formula (autograd would give a zero gradient). Call the loss through "
                  "fusedloss's functions or modules, which compute its gradient, or under "
                  "torch.no_grad().");
    }
  }
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  for (const char* name : {"softmax_ce_fwd", "softmax_ce_fwd_inplace", "softmax_ce_bwd",
                           "sigmoid_bce_fwd", "sigmoid_bce_bwd", "scale_grad_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_direct_autograd>());
  }
}
