// Softmax cross-entropy on CPU: softmax_ce_fwd, softmax_ce_fwd_inplace, softmax_ce_bwd,
// softmax_decode (semantics: docs/OPS.md). One task per group of rows (at::parallel_for); per
// row, pass 1 (softmax_ce_stats.h) reads the row once for the statistics and the loss, pass 2
// (softmax_ce_grad.h) writes the gradient from the exps pass 1 kept. So each element costs one
// exp, the logits are read once and the gradient written once.
//
// Where the exps are kept: fp32/fp64 out of place, in the fresh gradient buffer itself (its pages
// are faulted in as pass 1 first touches them, and both passes then work on the row in L2);
// otherwise (fp16/bf16 gradients, or logits that are overwritten in place) in a per-thread acc
// row. The alternatives measured slower for 4096x32000 and 2048x128256 fp32 on the 2-core
// AVX-512 EPYC used for the CPU figures (A/B in one process, both THP settings): a per-thread
// fp32 exp row with the gradient written once by plain stores +20-25%, the same with streaming
// (non-temporal) stores +30%, prefetching the next row's logits during pass 2 +15%.
//
// softmax_ce_bwd (reduction='none') runs the forward's row code with the loss off and
// g = grad_loss[r]: it recomputes the row's max and sum exactly as the forward does, so a
// recomputed gradient is bitwise equal to the forward's fused one for the same g.
#include "cpu/softmax_ce_grad.h"
#include "op_checks.h"

namespace fusedloss {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Boundary: validation and the fixed parts of the config.

struct CeArgs {
  Tensor w_acc;  // weight in acc precision, contiguous (undefined when None)
  bool prob = false;
};

// Out-of-range class indices raise before any kernel reads x[target] (R int64 reads).
void check_target_range(const Tensor& target, int64_t ignore_index, int64_t C) {
  const int64_t* t = target.data_ptr<int64_t>();
  const int64_t ts = target.stride(0);
  for (int64_t r = 0; r < target.size(0); ++r) {
    const int64_t v = t[r * ts];
    if (v != ignore_index && (v < 0 || v >= C)) {
      TORCH_CHECK_INDEX(false, "Target ", v, " is out of bounds.");
    }
  }
}

CeArgs check_ce(const char* op, const Tensor& logits, const Tensor& target,
                const std::optional<Tensor>& weight, int64_t ignore_index, double eps, double s,
                double softcap) {
  checks::check_logits(op, logits, /*unit_col_stride=*/true);
  CeArgs a;
  a.prob = checks::check_ce_target(op, target, logits);
  if (weight.has_value() && weight->defined()) {
    a.w_acc = class_vector(op, "weight", *weight, logits);
  }
  checks::check_ce_scalars(op, eps, s, softcap);
  if (!a.prob) check_target_range(target, ignore_index, logits.size(1));
  return a;
}

template <typename acc>
CeConfig<acc> make_config(const Tensor& logits, const CeArgs& a, int64_t ignore_index, double eps,
                          double lse_square_scale, double cap) {
  CeConfig<acc> cfg;
  cfg.C = logits.size(1);
  cfg.ignore_index = ignore_index;
  cfg.eps = static_cast<acc>(eps);
  cfg.lse_square_scale = static_cast<acc>(lse_square_scale);
  cfg.cap = static_cast<acc>(cap);
  cfg.prob = a.prob;
  if (a.w_acc.defined()) {
    cfg.w = a.w_acc.data_ptr<acc>();
    cfg.W = static_cast<acc>(a.w_acc.sum(at::kDouble).item<double>());
  } else {
    cfg.W = static_cast<acc>(cfg.C);
  }
  return cfg;
}

// ---------------------------------------------------------------------------------------------
// The row loop every softmax op runs (null outputs are not computed).

template <typename scalar_t>
struct CeJob {
  using acc = acc_type<scalar_t>;
  scalar_t* x = nullptr;
  int64_t xs = 0;
  const int64_t* tgt = nullptr;  // class indices (or null)
  int64_t ts = 0;
  const scalar_t* y = nullptr;   // probabilities in the logits' dtype (or null)
  const acc* y_acc = nullptr;    // probabilities in the accumulation dtype (or null)
  int64_t ys = 0;
  const acc* g = nullptr;        // gradient scale per row: g[r * gs] (gs = 0: one scale)
  int64_t gs = 0;
  scalar_t* grad = nullptr;      // (R, C) contiguous, or x itself when `inplace`
  bool inplace = false;
  acc* loss = nullptr;
  acc* lse = nullptr;
  int64_t* pred = nullptr;
  float* conf = nullptr;
};

template <typename scalar_t>
void ce_row(const CeJob<scalar_t>& j, const CeConfig<acc_type<scalar_t>>& cfg, int64_t r,
            bool e_in_grad, Scratch<acc_type<scalar_t>>& sc) {
  using acc = acc_type<scalar_t>;
  const int64_t C = cfg.C;
  scalar_t* x = j.x + r * j.xs;
  TargetRow<scalar_t, acc> y;
  if (j.y != nullptr) y.lp = j.y + r * j.ys;
  if (j.y_acc != nullptr) y.ap = j.y_acc + r * j.ys;
  const int64_t t = cfg.prob ? -1 : j.tgt[r * j.ts];
  const bool ignored = !cfg.prob && t == cfg.ignore_index;
  const bool want_grad = j.grad != nullptr;
  scalar_t* out = !want_grad ? nullptr : (j.inplace ? x : j.grad + r * C);
  acc* keep = nullptr;
  if (want_grad && !ignored) keep = e_in_grad ? reinterpret_cast<acc*>(out) : sc.e.data();
  const bool need_wz = j.loss != nullptr && cfg.eps > 0 && !ignored;
  const RowStats<acc> st = row_stats<scalar_t, acc>(x, y, ignored ? -1 : t, cfg, need_wz, keep, sc);
  if (j.lse != nullptr) j.lse[r] = st.lse;
  if (j.loss != nullptr) j.loss[r] = ignored ? acc(0) : row_loss(st, cfg, t);
  if (j.pred != nullptr) decode_row(x, st, cfg, sc, j.pred + r, j.conf + r);  // before x is overwritten
  if (!want_grad) return;
  if (ignored || st.pos_inf()) {  // ignored: exactly 0 (never 0 * g); +inf: NaN as torch
    const scalar_t fill = ignored ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN();
    std::fill(out, out + C, fill);
    return;
  }
  const acc coef = class_coef(st, cfg, t);
  const acc g = j.g[r * j.gs];
  row_grad<scalar_t, acc>(out, x, y, keep, st, coef, g, cfg, sc);
  if (!cfg.prob) patch_target(out, t, st, coef, g, cfg);
}

template <typename scalar_t>
void ce_rows(const CeJob<scalar_t>& j, const CeConfig<acc_type<scalar_t>>& cfg, int64_t R) {
  using acc = acc_type<scalar_t>;
  const bool want_grad = j.grad != nullptr;
  const bool e_in_grad = want_grad && !j.inplace && std::is_same_v<scalar_t, acc>;
  const bool keep_row = want_grad && !e_in_grad;
  at::parallel_for(0, R, row_grain(cfg.C), [&](int64_t r0, int64_t r1) {
    Scratch<acc> sc(cfg.C, keep_row);
    for (int64_t r = r0; r < r1; ++r) ce_row<scalar_t>(j, cfg, r, e_in_grad, sc);
  });
}

template <typename scalar_t>
CeJob<scalar_t> make_job(const Tensor& logits, const Tensor& target, const CeArgs& a) {
  using acc = acc_type<scalar_t>;
  CeJob<scalar_t> j;
  j.x = logits.data_ptr<scalar_t>();
  j.xs = logits.stride(0);
  if (!a.prob) {
    j.tgt = target.data_ptr<int64_t>();
    j.ts = target.stride(0);
  } else {
    j.ys = target.stride(0);
    if (target.scalar_type() == logits.scalar_type()) {
      j.y = target.data_ptr<scalar_t>();
    } else {
      j.y_acc = target.data_ptr<acc>();
    }
  }
  return j;
}

// ---------------------------------------------------------------------------------------------
// The ops.

struct FwdOut {
  Tensor loss, lse, pred, conf;
};

FwdOut ce_forward(const char* op, const Tensor& logits, const Tensor& target,
                  const std::optional<Tensor>& weight, const std::optional<Tensor>& grad_scale,
                  int64_t ignore_index, double eps, double s, double cap, Tensor* grad,
                  bool inplace, bool decode) {
  const CeArgs a = check_ce(op, logits, target, weight, ignore_index, eps, s, cap);
  const double g = read_grad_scale(op, grad_scale, logits);
  const int64_t R = logits.size(0);
  // loss and lse in the accumulation dtype (fp64 for fp64 logits), confidence in fp32.
  const auto acc_opts = logits.options().dtype(checks::acc_dtype(logits.scalar_type()));
  FwdOut o;
  o.loss = at::empty({R}, acc_opts);
  o.lse = at::empty({R}, acc_opts);
  o.pred = at::empty({decode ? R : 0}, logits.options().dtype(at::kLong));
  o.conf = at::empty({decode ? R : 0}, logits.options().dtype(at::kFloat));
  FUSEDLOSS_DISPATCH_FLOATING(logits.scalar_type(), "softmax_ce_fwd", [&] {
    using acc = acc_type<scalar_t>;
    const CeConfig<acc> cfg = make_config<acc>(logits, a, ignore_index, eps, s, cap);
    CeJob<scalar_t> j = make_job<scalar_t>(logits, target, a);
    const acc g_acc = static_cast<acc>(g);
    j.g = &g_acc;
    j.inplace = inplace;
    j.grad = inplace ? j.x : (grad != nullptr ? grad->data_ptr<scalar_t>() : nullptr);
    j.loss = o.loss.data_ptr<acc>();
    j.lse = o.lse.data_ptr<acc>();
    if (decode) {
      j.pred = o.pred.data_ptr<int64_t>();
      j.conf = o.conf.data_ptr<float>();
    }
    ce_rows<scalar_t>(j, cfg, R);
  });
  return o;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> softmax_ce_fwd_cpu(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool compute_grad, bool decode) {
  checks::check_logits("softmax_ce_fwd", logits, true);
  Tensor grad = compute_grad ? new_2d_output(logits.size(0), logits.size(1), logits.options())
                             : at::empty({0}, logits.options());
  FwdOut o = ce_forward("softmax_ce_fwd", logits, target, weight, grad_scale, ignore_index,
                        label_smoothing, lse_square_scale, softcap,
                        compute_grad ? &grad : nullptr, /*inplace=*/false, decode);
  return {o.loss, o.lse, grad, o.pred, o.conf};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> softmax_ce_fwd_inplace_cpu(
    Tensor& logits,  // Tensor(a!): `Tensor&`, as the CUDA kernel's signature
    const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool decode) {
  FwdOut o = ce_forward("softmax_ce_fwd_inplace", logits, target, weight, grad_scale,
                        ignore_index, label_smoothing, lse_square_scale, softcap, nullptr,
                        /*inplace=*/true, decode);
  return {o.loss, o.lse, o.pred, o.conf};
}

// Backward for reduction='none': the forward's rows with the loss off, each row's gradient
// scaled by its incoming gradient. One read of the logits, one write of the gradient.
Tensor softmax_ce_bwd_cpu(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                          const std::optional<Tensor>& weight, int64_t ignore_index,
                          double label_smoothing, double lse_square_scale, double softcap) {
  const char* op = "softmax_ce_bwd";
  const CeArgs a = check_ce(op, logits, target, weight, ignore_index, label_smoothing,
                            lse_square_scale, softcap);
  checks::check_row_vector(op, "grad_loss", grad_loss, logits);
  const int64_t R = logits.size(0), C = logits.size(1);
  Tensor grad = new_2d_output(R, C, logits.options());
  FUSEDLOSS_DISPATCH_FLOATING(logits.scalar_type(), "softmax_ce_bwd", [&] {
    using acc = acc_type<scalar_t>;
    const CeConfig<acc> cfg = make_config<acc>(logits, a, ignore_index, label_smoothing,
                                               lse_square_scale, softcap);
    // (R,) in acc precision (R elements: negligible); a stride-0 grad_loss keeps stride 0.
    const Tensor gl = grad_loss.to(c10::CppTypeToScalarType<acc>::value);
    CeJob<scalar_t> j = make_job<scalar_t>(logits, target, a);
    j.g = gl.data_ptr<acc>();
    j.gs = gl.stride(0);
    j.grad = grad.data_ptr<scalar_t>();
    ce_rows<scalar_t>(j, cfg, R);
  });
  return grad;
}

std::tuple<Tensor, Tensor> softmax_decode_cpu(const Tensor& logits, double softcap) {
  const char* op = "softmax_decode";
  checks::check_logits(op, logits, true);
  checks::check_softcap(op, softcap);
  const int64_t R = logits.size(0);
  Tensor pred = at::empty({R}, logits.options().dtype(at::kLong));
  Tensor conf = at::empty({R}, logits.options().dtype(at::kFloat));
  FUSEDLOSS_DISPATCH_FLOATING(logits.scalar_type(), "softmax_decode", [&] {
    using acc = acc_type<scalar_t>;
    CeConfig<acc> cfg;
    cfg.C = logits.size(1);
    cfg.cap = static_cast<acc>(softcap);
    CeJob<scalar_t> j;
    j.x = logits.data_ptr<scalar_t>();
    j.xs = logits.stride(0);
    j.pred = pred.data_ptr<int64_t>();
    j.conf = conf.data_ptr<float>();
    cfg.prob = true;  // no class-index target to read; nothing else depends on it without loss
    ce_rows<scalar_t>(j, cfg, R);
  });
  return {pred, conf};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("softmax_ce_fwd", &softmax_ce_fwd_cpu);
  m.impl("softmax_ce_fwd_inplace", &softmax_ce_fwd_inplace_cpu);
  m.impl("softmax_ce_bwd", &softmax_ce_bwd_cpu);
  m.impl("softmax_decode", &softmax_decode_cpu);
}

}  // namespace cpu
}  // namespace fusedloss
