// Sigmoid binary cross-entropy with logits on CUDA: sigmoid_bce_fwd, sigmoid_bce_bwd,
// sigmoid_decode (semantics: docs/OPS.md). One elementwise kernel, `bce_kernel`, serves all three;
// which outputs it writes is chosen by which pointers in BceArgs are set.
//
// Math (per element, accumulation type A; y target, p pos_weight (1 if None), w weight):
//   e = exp(-|x|) in (0, 1]
//   loss = w * ((1 - y) max(x, 0) - p y min(x, 0) + (1 + (p - 1) y) log1p(e))
//     (= w * ((1 - y) x + (1 + (p - 1) y) softplus(-x)) with softplus(-x) = max(-x, 0) +
//     log1p(e), regrouped so that no term cancels: for x << 0 and y = 0 the old form subtracted
//     two numbers of size |x|);
//   d loss / dx = w * ((p y + 1 - y) sigmoid(x) - p y)
//   sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0.
// Decoding: label = x > threshold[c] (logit space, strict), positive target = y > 0.5,
// counts[0/1/2][c] = #TP / #FP / #FN.
// Side tensors (weight, pos_weight, grad_loss, threshold) may have any floating dtype and any
// strides; they are read element by element in A (common.cuh: load_as). A float target is in
// the logits' dtype or in A (autocast: bf16 logits with an fp32 target); the elementwise loss
// is then stored in A too (torch.promote_types).
//
// Layout. A block is 256 threads = (256 / tx) row slots x tx lanes (tx a power of two <= 32,
// just enough lanes to cover one column tile of a row). Block (bx, by) owns column tile bx
// (span_chunks 16-byte chunks of each row, chunk boundaries aligned to the logits row, see
// common.cuh) and rows by*slots + i, stepping by gridDim.y*slots. Row sums (reduce_rows) are
// shuffles over the tx lanes; with several column tiles the per-tile sums go to a (tiles, R)
// workspace summed in a fixed order by bce_row_sum_kernel. Counts are integer atomics in shared
// memory per block, then one 64-bit global atomic per class per block: integer sums, so the
// result does not depend on the order (deterministic). No float atomics anywhere.
// The optional threshold histogram (hist_edges / hist_counts) is binned in the same pass: an
// equal-width guess checked against the edges, a binary search where it is wrong (exact), then
// one 64-bit integer atomic per element (bce_kernel.cuh: hist_bin, hist_chunk).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "cuda/bce_kernel.cuh"
#include "cuda/common.cuh"
#include "cuda/ops.h"
#include "op_checks.h"

namespace fusedloss {
namespace cuda {
namespace {

// Blocks per SM for the grid-stride loop over rows: 8 x 256 threads = full occupancy.
constexpr int kBceBlocksPerSm = 8;
// Grid y dimension limit of CUDA launches.
constexpr int64_t kMaxGridY = 65535;
// bce_row_sum_kernel: one thread per row.
constexpr int kRowSumBlock = 256;

// Launch bce_kernel over (R, C); `loss_rows_out` is the (R,) output when reducing rows.
template <typename T>
void launch_bce(BceArgs a, const at::Tensor& logits, void* loss_rows_out) {
  using A = acc_t<T>;
  if (a.R == 0 || a.C == 0) return;
  const int device = logits.get_device();
  const int64_t chunks = max_row_chunks<T>(a.C);
  a.span_chunks = std::min(chunks, kBceSpanChunks);
  int tx = 1;
  while (tx < kWarp && tx < a.span_chunks) tx *= 2;
  a.tx = tx;
  const int64_t tiles = (chunks + a.span_chunks - 1) / a.span_chunks;
  const int64_t slots = kBceBlock / tx;
  const int64_t row_groups = (a.R + slots - 1) / slots;
  const int64_t want_blocks = static_cast<int64_t>(sm_count(device)) * kBceBlocksPerSm;
  const int64_t gy = std::max<int64_t>(
      1, std::min<int64_t>({row_groups, (want_blocks + tiles - 1) / tiles, kMaxGridY}));
  at::Tensor part;
  if (loss_rows_out != nullptr) {
    if (tiles == 1) {
      a.loss_rows = loss_rows_out;
    } else {
      part = at::empty({tiles, a.R}, logits.options().dtype(c10::CppTypeToScalarType<A>::value));
      a.loss_rows = part.data_ptr();
    }
  }
  TORCH_CHECK(tiles <= 0x7fffffff, "logits: too many classes (", a.C, ")");
  const size_t smem = a.counts != nullptr
                          ? static_cast<size_t>(3 * (a.span_chunks * kVec<T> + kVec<T> - 1)) *
                                sizeof(int)
                          : 0;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  bce_kernel<T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(gy)), kBceBlock, smem,
                  stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (part.defined()) {
    const int64_t blocks = std::min<int64_t>((a.R + kRowSumBlock - 1) / kRowSumBlock, kMaxGridY);
    bce_row_sum_kernel<A><<<static_cast<unsigned>(blocks), kRowSumBlock, 0, stream>>>(
        static_cast<const A*>(a.loss_rows), static_cast<A*>(loss_rows_out), a.R, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

int64_t ld_of(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

void set_logits(BceArgs& a, const char* op, const at::Tensor& logits) {
  checks::check_logits(op, logits, /*unit_col_stride=*/true);
  a.x = logits.data_ptr();
  a.ldx = ld_of(logits);
  a.R = logits.size(0);
  a.C = logits.size(1);
}

// An (R, C) view of any floating dtype and any strides (weight, pos_weight, grad_loss).
SideView side_view(const char* op, const std::optional<at::Tensor>& t, const at::Tensor& logits,
                   const char* name) {
  if (!t.has_value()) return {};
  checks::check_elementwise_operand(op, name, *t, logits, /*allow_bytes=*/false);
  return {t->data_ptr(), t->stride(0), t->stride(1), float_kind(*t, name)};
}

void set_target(BceArgs& a, const char* op, const at::Tensor& target, const at::Tensor& logits) {
  checks::check_bce_target(op, target, logits);
  const auto st = target.scalar_type();
  a.y = target.data_ptr();
  a.y_kind = st == at::kBool || st == at::kByte  ? BceTarget::kByte
             : st == logits.scalar_type()         ? BceTarget::kLogits
                                                  : BceTarget::kAcc;
  a.ys0 = target.stride(0);
  a.ys1 = target.stride(1);
}

void set_threshold(BceArgs& a, const char* op, const at::Tensor& thr, const at::Tensor& logits) {
  checks::check_class_vector(op, "threshold", thr, logits);
  a.thr = {thr.data_ptr(), 0, thr.stride(0), float_kind(thr, "threshold")};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_bce_fwd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& threshold, bool reduce_rows, bool compute_grad,
    bool return_probs, bool count, const std::optional<at::Tensor>& hist_edges,
    const std::optional<at::Tensor>& hist_counts) {
  constexpr const char* op = "sigmoid_bce_fwd";
  c10::cuda::CUDAGuard guard(logits.device());
  op_prologue();
  BceArgs a = {};
  set_logits(a, op, logits);
  set_target(a, op, target, logits);
  a.w = side_view(op, weight, logits, "weight");
  a.pw = side_view(op, pos_weight, logits, "pos_weight");
  checks::check_count(op, count, threshold.has_value());
  if (threshold.has_value()) set_threshold(a, op, *threshold, logits);
  checks::check_histogram(op, hist_edges, hist_counts, logits);
  if (hist_edges.has_value() && hist_edges->defined()) {
    a.hist_edges = hist_edges->data_ptr<float>();
    a.hist_n_edges = hist_edges->size(0);
    a.hist = reinterpret_cast<unsigned long long*>(hist_counts->data_ptr<int64_t>());
  }
  const auto opts = logits.options();
  const auto acc = acc_dtype(logits.scalar_type());
  // Row sums in the accumulation type; the elementwise loss in promote_types(logits, target)
  // for a float target (so fp32 for bf16 logits with an fp32 target), else the logits' dtype.
  a.loss_acc = a.y_kind == BceTarget::kAcc;
  const auto elem_dtype = a.loss_acc ? acc : logits.scalar_type();
  at::Tensor loss = !reduce_rows ? at::empty({a.R, a.C}, opts.dtype(elem_dtype))
                    : a.C == 0   ? at::zeros({a.R}, opts.dtype(acc))
                                 : at::empty({a.R}, opts.dtype(acc));
  at::Tensor grad = compute_grad ? at::empty({a.R, a.C}, opts) : at::empty({0}, opts);
  at::Tensor labels = a.thr.p ? at::empty({a.R, a.C}, opts.dtype(at::kBool))
                             : at::empty({0}, opts.dtype(at::kBool));
  at::Tensor probs = return_probs ? at::empty({a.R, a.C}, opts) : at::empty({0}, opts);
  at::Tensor counts = count ? at::zeros({3, a.C}, opts.dtype(at::kLong))
                            : at::empty({0}, opts.dtype(at::kLong));
  at::Tensor scale_holder;  // grad_scale in the accumulation type (`.to` is a no-op if it is)
  if (compute_grad && grad_scale.has_value()) {
    checks::check_scalar_tensor(op, "grad_scale", *grad_scale, logits);
    scale_holder = grad_scale->to(acc);
    a.gscale = scale_holder.data_ptr();
  }
  if (!reduce_rows) a.loss_elem = loss.data_ptr();
  if (compute_grad) a.grad = grad.data_ptr();
  if (a.thr.p) a.labels = labels.data_ptr<bool>();
  if (return_probs) a.probs = probs.data_ptr();
  if (count) a.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), op, [&] {
    launch_bce<scalar_t>(a, logits, reduce_rows ? loss.data_ptr() : nullptr);
  });
  return {loss, grad, labels, probs, counts};
}

at::Tensor sigmoid_bce_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                           const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight) {
  constexpr const char* op = "sigmoid_bce_bwd";
  c10::cuda::CUDAGuard guard(logits.device());
  op_prologue();
  BceArgs a = {};
  set_logits(a, op, logits);
  set_target(a, op, target, logits);
  a.w = side_view(op, weight, logits, "weight");
  a.pw = side_view(op, pos_weight, logits, "pos_weight");
  a.gl = side_view(op, grad_loss, logits, "grad_loss");  // read in A, no conversion copy
  at::Tensor grad = at::empty({a.R, a.C}, logits.options());
  a.grad = grad.data_ptr();
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), op,
                           [&] { launch_bce<scalar_t>(a, logits, nullptr); });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_decode(const at::Tensor& logits,
                                                  const at::Tensor& threshold,
                                                  bool return_probs) {
  constexpr const char* op = "sigmoid_decode";
  c10::cuda::CUDAGuard guard(logits.device());
  op_prologue();
  BceArgs a = {};
  set_logits(a, op, logits);
  set_threshold(a, op, threshold, logits);
  const auto opts = logits.options();
  at::Tensor labels = at::empty({a.R, a.C}, opts.dtype(at::kBool));
  at::Tensor probs = return_probs ? at::empty({a.R, a.C}, opts) : at::empty({0}, opts);
  a.labels = labels.data_ptr<bool>();
  if (return_probs) a.probs = probs.data_ptr();
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), op,
                           [&] { launch_bce<scalar_t>(a, logits, nullptr); });
  return {labels, probs};
}

}  // namespace cuda
}  // namespace fusedloss
