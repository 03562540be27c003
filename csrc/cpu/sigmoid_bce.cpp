// Sigmoid binary cross-entropy with logits on CPU: sigmoid_bce_fwd, sigmoid_bce_bwd,
// sigmoid_decode. Semantics: docs/OPS.md. Elementwise over (R, C), one task per group of rows.
//
// Math, with p = pos_weight (1 if None), y the target, w the weight (1 if None), and
// e = exp(-|x|) (the one exp per element; never overflows):
//   softplus(-x) = log(1 + exp(-x)) = max(-x, 0) + log1p(e)
//   loss = w ((1 - y) x + (1 + (p - 1) y) softplus(-x))
//        = w ((1 - y) max(x, 0) - p y min(x, 0) + (1 + (p - 1) y) log1p(e))   (computed form)
//   sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0
//   d loss / dx = w ((1 - y) - (1 + (p - 1) y) sigmoid(-x))
//              = w ((p y + 1 - y) sigmoid(x) - p y)      (using sigmoid(-x) = 1 - sigmoid(x))
// Targets (float, bool or uint8), weight and pos_weight are read in place through their strides
// (expanded (C,) or (R, 1) tensors have stride 0): no conversion copy of any (R, C) operand.
// Labels compare in logit space, x > threshold[c] (strict: a logit at the threshold is negative);
// counts (TP, FP, FN per class, target positive when y > 0.5) are summed in per-chunk int64
// partials, then added: integer sums, so the result does not depend on the thread count. The
// optional threshold histogram is binned in the same pass (cpu/bce_hist.h).
#include "cpu/bce_hist.h"
#include "cpu/common.h"
#include "op_checks.h"

#include <mutex>
#include <optional>

namespace fusedloss {
namespace cpu {
namespace {

// log1p(e) for e in [0, 1].
// fp32: 2 atanh(s) with s = e / (2 + e) in [0, 1/3], as the odd series 2 (s + s^3/3 + ... +
// s^15/15): the first omitted term is below 2^-28 of the sum, and the terms after 2s add at most
// 4% of it, so the error is that of s (the division), about 1 ulp. One division and 8 FMAs,
// against a Sleef log plus a division for the fp64 form below: the BCE forward is
// compute-bound on AVX2 machines, where that log was a quarter of its time (perf).
// fp64: Goldberg's log(u) * e / (u - 1) with u = 1 + e, within a few ulp; u == 1 means
// e < ulp(1)/2, where log1p(e) = e. Sleef's log1p (what Vectorized::log1p calls) measured ~20x
// slower than its log on an AVX-512 EPYC (424 ms vs ~20 ms over 16.7M fp32 elements).
template <typename T>
inline Vectorized<T> log1p_unit(const Vectorized<T>& e) {
  using Vec = Vectorized<T>;
  if constexpr (std::is_same_v<T, float>) {
    const Vec sv = e / (Vec(2.0f) + e), s2 = sv * sv, s4 = s2 * s2;
    // q = 1/3 + s2/5 + ... + s2^6/15 in Estrin's form: a dependency chain 3 operations deep
    // after s2 instead of Horner's 6
    const Vec q01 = at::vec::fmadd(Vec(1.0f / 5), s2, Vec(1.0f / 3));
    const Vec q23 = at::vec::fmadd(Vec(1.0f / 9), s2, Vec(1.0f / 7));
    const Vec q46 = at::vec::fmadd(Vec(1.0f / 15), s4,
                                   at::vec::fmadd(Vec(1.0f / 13), s2, Vec(1.0f / 11)));
    const Vec q = at::vec::fmadd(q46, s4 * s4, at::vec::fmadd(q23, s4, q01));
    const Vec t = sv + sv;
    return at::vec::fmadd(t * s2, q, t);
  } else {
    const Vec one(1), zero(0);
    const Vec u = one + e;
    const Vec d = u - one;
    return Vec::blendv(u.log() * (e / d), e, d == zero);
  }
}

// loss = (1-y) max(x,0) - p y min(x,0) + (1 + (p-1) y) log1p(e), e = exp(-|x|): the same value
// as (1-y) x + (1 + (p-1) y) softplus(-x) without its cancellation (for x << 0, y = 0 that form
// computes x + (-x + log1p(e^x)), losing about half an ulp of |x| on a loss of about e^x).
template <typename T>
inline Vectorized<T> bce_loss(const Vectorized<T>& x, const Vectorized<T>& y,
                              const Vectorized<T>& p, const Vectorized<T>& e, bool has_pw) {
  const Vectorized<T> zero(0), one(1);
  const Vectorized<T> pos = at::vec::maximum(x, zero), neg = at::vec::minimum(x, zero);
  if (!has_pw) return (one - y) * pos - y * neg + log1p_unit(e);
  // p y min(x, 0) is 0 for x >= 0 even for an infinite pos_weight (torch: +inf, not inf * 0);
  // an infinite coefficient of softplus(-x) > 0 gives its infinity, also where log1p(e) has
  // rounded to 0 (x << 0, or e flushed to 0 beyond |x| ~ 87 in fp32)
  const Vectorized<T> pyn = Vectorized<T>::blendv(zero, p * y * neg, neg < zero);
  const Vectorized<T> coef = one + (p - one) * y;
  const Vectorized<T> soft = Vectorized<T>::blendv(
      coef * log1p_unit(e), coef, coef.abs() == Vectorized<T>(std::numeric_limits<T>::infinity()));
  return (one - y) * pos - pyn + soft;
}

struct BceJob {
  Operand x, y, w, pw, gl;  // gl: per-element incoming gradient (sigmoid_bce_bwd)
  const void* thr = nullptr; // (C,) logit thresholds in acc precision
  double g = 1.0;            // grad_scale
  bool loss_rows = false, loss_elem = false, grad = false, probs = false, labels = false,
       count = false;
  bool loss_elem_acc = false;     // the elementwise loss is stored in acc (float target in acc)
  void* loss_rows_out = nullptr;  // acc, (R,)
  void* loss_elem_out = nullptr;  // scalar_t (or acc), (R, C) contiguous
  void* grad_out = nullptr;       // scalar_t, (R, C) contiguous
  void* probs_out = nullptr;      // scalar_t, (R, C) contiguous
  bool* labels_out = nullptr;     // (R, C) contiguous
  const float* hist_edges = nullptr;  // (B + 1,) float32: the histogram is asked for
  int64_t hist_n_edges = 0;
};

// Where a task of rows writes: its (3, C) counts, and the (2, C, B + 2) histogram output
// (under hist_lock when tasks share it); null: not asked.
struct BceSinks {
  int64_t* cnt = nullptr;
  int64_t* hist = nullptr;
  std::mutex* hist_lock = nullptr;
};

struct BceBuffers {
  template <typename acc>
  struct Of {
    std::vector<acc> x, y, w, pw, gl;
    Of() : x(kBlock), y(kBlock), w(kBlock), pw(kBlock), gl(kBlock) {}
  };
};

// The operands of one block of a row, in acc precision (null when absent).
template <typename acc>
struct BceBlock {
  const acc *x = nullptr, *y = nullptr, *w = nullptr, *pw = nullptr, *gl = nullptr;
  int64_t n = 0;    // columns in the block
  int64_t out = 0;  // element offset of the block in the (R, C) outputs
};

// The common case of bce_block, with no per-element option to test in the loop: no weight,
// pos_weight or incoming per-element gradient, the loss summed per row, no probabilities, and
// the gradient (times grad_scale) when GRAD. The same operations as bce_block in the same order,
// only without the per-vector tests of the options: the general loop with a weight of ones gives
// bitwise the same loss and gradient (tested; the compiler may fuse a multiply and an add into
// one FMA differently in the two loops, which the test would catch). On a 2-core AVX2 EPYC
// (65536x256 fp32, uint8 targets, medians of 15 side by side) the op took 1.26-1.39x less time
// with the loss and gradient, 1.23-1.25x with the loss only, on one thread and on two. Tried
// there and dropped: two vectors per step (slower), and the same loop for weight / pos_weight
// (no faster, under load). Estrin's form for log1p's series (log1p_unit) made the loss-only
// loop 1.25-1.29x faster (28.5 -> 22.2 ms at 65536x256, 211-216 -> 164-165 ms at 4096x32768,
// one thread, fastest of 9 side by side): that loop waits on its dependency chain (exp, the
// division, the series), which Estrin's form shortens; the loop with the gradient has the
// sigmoid's division to overlap and did not change. Forcing bce_loss inline as well made the
// gradient's loop 6-12% slower, and was dropped.
template <typename scalar_t, bool GRAD>
void bce_block_plain(const BceJob& j, const BceBlock<acc_type<scalar_t>>& b,
                     Vectorized<acc_type<scalar_t>>& row_sum) {
  using acc = acc_type<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const Vec zero(0), one(1), vg(static_cast<acc>(j.g));
  scalar_t* g = static_cast<scalar_t*>(j.grad_out) + b.out;
  Vec sum = row_sum;
  auto step = [&](const Vec& x, const Vec& y, int64_t i, int64_t k) {
    const Vec e = vexp(x.abs().neg());
    const Vec l = bce_loss(x, y, one, e, false);
    sum += k == V ? l : Vec::set(zero, l, k);
    if constexpr (GRAD) {
      const Vec rcp = one / (one + e);
      const Vec sig = Vec::blendv(e * rcp, rcp, x >= zero);
      vstore_as<scalar_t, acc>(g + i, (sig - y) * vg, k);
    }
  };
  int64_t i = 0;
  for (; i + V <= b.n; i += V) step(Vec::loadu(b.x + i), Vec::loadu(b.y + i), i, V);
  if (i < b.n) step(vload(b.x + i, b.n - i), vload(b.y + i, b.n - i), i, b.n - i);
  row_sum = sum;
}

// Loss, probabilities and gradient of one block; the row-sum loss is added to `row_sum`.
template <typename scalar_t>
void bce_block(const BceJob& j, const BceBlock<acc_type<scalar_t>>& b,
               Vectorized<acc_type<scalar_t>>& row_sum) {
  using acc = acc_type<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const Vec zero(0), one(1), vg(static_cast<acc>(j.g));
  if (j.loss_rows && !j.probs && b.w == nullptr && b.pw == nullptr && b.gl == nullptr) {
    if (j.grad) {
      bce_block_plain<scalar_t, true>(j, b, row_sum);
    } else {
      bce_block_plain<scalar_t, false>(j, b, row_sum);
    }
    return;
  }
  for (int64_t i = 0; i < b.n; i += V) {
    const int64_t k = std::min(V, b.n - i), o = b.out + i;
    const Vec x = vload(b.x + i, k);
    const Vec e = vexp(x.abs().neg());
    const Vec y = b.y != nullptr ? vload(b.y + i, k) : zero;
    const Vec p = b.pw != nullptr ? vload(b.pw + i, k) : one;
    if (j.loss_rows || j.loss_elem) {
      Vec l = bce_loss(x, y, p, e, b.pw != nullptr);
      if (b.w != nullptr) l = l * vload(b.w + i, k);
      if (j.loss_rows) {
        row_sum += k == V ? l : Vec::set(zero, l, k);
      } else if (j.loss_elem_acc) {
        vstore(static_cast<acc*>(j.loss_elem_out) + o, l, k);
      } else {
        vstore_as<scalar_t, acc>(static_cast<scalar_t*>(j.loss_elem_out) + o, l, k);
      }
    }
    if (!j.grad && !j.probs) continue;
    const Vec rcp = one / (one + e);
    const Vec sig = Vec::blendv(e * rcp, rcp, x >= zero);
    if (j.probs) vstore_as<scalar_t, acc>(static_cast<scalar_t*>(j.probs_out) + o, sig, k);
    if (j.grad) {
      const Vec py = b.pw != nullptr ? p * y : y;
      Vec d = b.pw != nullptr ? (py + one - y) * sig - py : sig - y;
      if (b.w != nullptr) d = d * vload(b.w + i, k);
      d = b.gl != nullptr ? d * vload(b.gl + i, k) : d * vg;
      vstore_as<scalar_t, acc>(static_cast<scalar_t*>(j.grad_out) + o, d, k);
    }
  }
}

// Labels of one block (x > threshold) and, when `cnt` is not null, its TP/FP/FN counts.
template <typename acc>
void label_block(const BceJob& j, const BceBlock<acc>& b, int64_t c0, int64_t C, int64_t* cnt) {
  bool* lb = j.labels_out + b.out;
  const acc* tb = static_cast<const acc*>(j.thr) + c0;
  for (int64_t i = 0; i < b.n; ++i) lb[i] = b.x[i] > tb[i];
  if (cnt == nullptr) return;
  int64_t* tp = cnt + c0;
  int64_t* fp = cnt + C + c0;
  int64_t* fn = cnt + 2 * C + c0;
  for (int64_t i = 0; i < b.n; ++i) {
    const int64_t lab = lb[i], pos = b.y[i] > acc(0.5);
    tp[i] += lab & pos;
    fp[i] += lab & (1 - pos);
    fn[i] += (1 - lab) & pos;
  }
}

// The histogram is binned inside the forward's own row loop, into each task's 16-bit table
// (bce_hist.h: HistTable) of all the classes, when that table takes at most
// kHistRowTableBytes. Otherwise it is binned in a pass of its own after the forward: tasks take
// disjoint strips of hist_cols classes and sweep every row, reading the strip kHistPrefetchRows
// rows ahead; each output cell is then written by one task, once, without a lock. Measured on
// a 2-core AVX2 EPYC (512 KiB L2 per core, 32 MiB L3), 1024 bins: binning alone, the
// row-by-row table beat strips up to 1024 classes (a 4.2 MB table: 12.8 vs 25 ms over 8192
// rows) and lost from 2048 (8.4 MB: 25 vs 16.5 ms). In the op, 4096x32768 fp32, medians of 5
// side by side: 1024 bins 564-603 ms with strips of 256-512 classes (1-2 MB tables), 645 with
// 1024, 781 with 128; 64 bins 316-336 ms with 2048 classes, 359 with 1024, 488 with 256 (each
// row of a strip has a fixed cost). In the op, reading 2 rows ahead was within noise of 0 and
// of 8 rows; binning alone in a C++ loop, reading ahead saved a quarter to a half.
constexpr int64_t kHistRowTableBytes = int64_t(5) << 20;
constexpr int64_t kHistStripBytes = int64_t(2) << 20;
constexpr int64_t kHistPrefetchRows = 2;

inline int64_t hist_class_bytes(int64_t n_edges) {
  return 2 * (n_edges + 1) * int64_t(sizeof(uint16_t));
}

inline bool hist_in_strips(int64_t C, int64_t n_edges) {
  return C * hist_class_bytes(n_edges) > kHistRowTableBytes;
}

// Classes per strip: the largest power of two in [16, kBlock] whose table fits in
// kHistStripBytes, or 16.
inline int64_t hist_cols(int64_t n_edges) {
  const int64_t per_class = hist_class_bytes(n_edges);
  int64_t bc = 16;
  while (bc * 2 <= kBlock && bc * 2 * per_class <= kHistStripBytes) bc *= 2;
  return bc;
}

// Rows [r0, r1), row by row, into this task's sinks (with a histogram: into a table of all the
// classes, added into the output under out.hist_lock).
template <typename scalar_t>
void bce_rows(const BceJob& j, int64_t C, int64_t r0, int64_t r1, const BceSinks& out) {
  using acc = acc_type<scalar_t>;
  using Vec = Vectorized<acc>;
  BceBuffers::Of<acc> buf;
  const HistBinner<acc> binner(j.hist_edges, j.hist_n_edges);
  const bool need_y = j.loss_rows || j.loss_elem || j.grad || j.count || out.hist != nullptr;
  const bool elementwise = j.loss_rows || j.loss_elem || j.grad || j.probs;
  std::optional<HistTable> table;
  std::optional<HistVectorBinner<acc>> vbinner;
  std::vector<at::vec::int_same_size_t<acc>> codes;
  std::vector<int> masks;
  if (out.hist != nullptr) {
    table.emplace(C, j.hist_n_edges);
    vbinner.emplace(binner, *table);
    codes.resize(kBlock);
    masks.resize(kBlock / Vec::size() + 1);
  }
  for (int64_t r = r0; r < r1; ++r) {
    // The row's loss: each block sums into vector lanes (at most kBlock / V terms a lane),
    // the blocks' sums add up in double. One vector for the whole row summed 2^17 terms a lane
    // at 2^20 classes (relative error 5.5e-6 in fp32, against torch's 5.6e-9).
    double row_total = 0;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      Vec row_sum(0);
      BceBlock<acc> b;
      b.n = std::min(kBlock, C - c0);
      b.out = r * C + c0;
      b.x = j.x.block<acc>(r, c0, b.n, buf.x.data());
      if (need_y) b.y = j.y.block<acc>(r, c0, b.n, buf.y.data());
      if (j.w.defined()) b.w = j.w.block<acc>(r, c0, b.n, buf.w.data());
      if (j.pw.defined()) b.pw = j.pw.block<acc>(r, c0, b.n, buf.pw.data());
      if (j.gl.defined()) b.gl = j.gl.block<acc>(r, c0, b.n, buf.gl.data());
      if (elementwise) bce_block<scalar_t>(j, b, row_sum);
      if (j.labels) label_block<acc>(j, b, c0, C, out.cnt);
      if (table) {
        hist_block<acc>(*vbinner, b.x, b.y, b.n, *table, c0, codes.data(), masks.data());
      }
      if (j.loss_rows) row_total += static_cast<double>(hsum(row_sum));
    }
    if (j.loss_rows) static_cast<acc*>(j.loss_rows_out)[r] = static_cast<acc>(row_total);
    if (table && ++table->rows == kFlushRows) table->flush(out.hist, 0, C, C, out.hist_lock);
  }
  if (table) table->flush(out.hist, 0, C, C, out.hist_lock);
}

// The histogram alone, of classes [c_begin, c_end) over all R rows, strip by strip; this task
// is the only writer of those classes' cells in `hist`.
template <typename scalar_t>
void hist_strips(const BceJob& j, int64_t R, int64_t C, int64_t c_begin, int64_t c_end,
                 int64_t* hist) {
  using acc = acc_type<scalar_t>;
  const HistBinner<acc> binner(j.hist_edges, j.hist_n_edges);
  const int64_t bc = hist_cols(j.hist_n_edges);
  HistTable table(bc, j.hist_n_edges);
  const HistVectorBinner<acc> vbinner(binner, table);
  std::vector<acc> xb(bc), yb(bc);
  std::vector<at::vec::int_same_size_t<acc>> codes(bc);
  std::vector<int> masks(bc / Vectorized<acc>::size() + 1);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += bc) {
    const int64_t n = std::min(bc, c_end - c0);
    for (int64_t r = 0; r < R; ++r) {
      if (r + kHistPrefetchRows < R) {
        j.x.prefetch(r + kHistPrefetchRows, c0, n);
        j.y.prefetch(r + kHistPrefetchRows, c0, n);
      }
      const acc* x = j.x.block<acc>(r, c0, n, xb.data());
      const acc* y = j.y.block<acc>(r, c0, n, yb.data());
      hist_block<acc>(vbinner, x, y, n, table, 0, codes.data(), masks.data());
      if (++table.rows == kFlushRows) table.flush(hist, c0, n, C, nullptr);
    }
    table.flush(hist, c0, n, C, nullptr);
  }
}

// Runs the job over all rows; returns the (3, C) counts when j.count, and adds the histogram
// into `hist` when j.hist_edges is set.
template <typename scalar_t>
Tensor run(const BceJob& j, int64_t R, int64_t C, const at::TensorOptions& opts,
           const Tensor& hist = Tensor()) {
  const bool strips = j.hist_edges != nullptr && hist_in_strips(C, j.hist_n_edges);
  const bool row_hist = j.hist_edges != nullptr && !strips;
  Tensor counts;
  if (!j.count && !row_hist) {
    at::parallel_for(0, R, row_grain(C),
                     [&](int64_t r0, int64_t r1) { bce_rows<scalar_t>(j, C, r0, r1, {}); });
  } else {
    // Fixed chunks, one (3, C) partial each; the sum over chunks is exact (integers). A
    // row-by-row histogram is added into the output directly (under a lock when there are
    // several chunks).
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(R, at::get_num_threads()));
    const int64_t per = R == 0 ? 0 : (R + chunks - 1) / chunks;
    Tensor partial = at::zeros({j.count ? chunks : 0, 3, C}, opts.dtype(at::kLong));
    std::mutex hist_lock;
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        BceSinks out;
        if (j.count) out.cnt = partial.data_ptr<int64_t>() + k * 3 * C;
        if (row_hist) {
          out.hist = hist.data_ptr<int64_t>();
          out.hist_lock = chunks > 1 ? &hist_lock : nullptr;
        }
        bce_rows<scalar_t>(j, C, std::min(R, k * per), std::min(R, (k + 1) * per), out);
      }
    });
    if (j.count) counts = partial.sum(0);
  }
  if (strips && R > 0) {
    const int64_t bc = hist_cols(j.hist_n_edges), n_strips = (C + bc - 1) / bc;
    at::parallel_for(0, n_strips, 1, [&](int64_t s0, int64_t s1) {
      hist_strips<scalar_t>(j, R, C, s0 * bc, std::min(C, s1 * bc), hist.data_ptr<int64_t>());
    });
  }
  return counts;
}

at::ScalarType acc_dtype_of(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sigmoid_bce_fwd_cpu(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& pos_weight, const std::optional<Tensor>& grad_scale,
    const std::optional<Tensor>& threshold, bool reduce_rows, bool compute_grad,
    bool return_probs, bool count, const std::optional<Tensor>& hist_edges,
    const std::optional<Tensor>& hist_counts) {
  const char* op = "sigmoid_bce_fwd";
  checks::check_logits(op, logits, /*unit_col_stride=*/false);
  const int64_t R = logits.size(0), C = logits.size(1);
  const auto o = logits.options();
  checks::check_bce_target(op, target, logits);
  BceJob j;
  j.x = Operand(logits);
  j.y = Operand(target);
  if (weight.has_value() && weight->defined()) {
    checks::check_elementwise_operand(op, "weight", *weight, logits, false);
    j.w = Operand(*weight);
  }
  if (pos_weight.has_value() && pos_weight->defined()) {
    checks::check_elementwise_operand(op, "pos_weight", *pos_weight, logits, false);
    j.pw = Operand(*pos_weight);
  }
  j.g = read_grad_scale(op, grad_scale, logits);
  const bool has_thr = threshold.has_value() && threshold->defined();
  checks::check_count(op, count, has_thr);
  checks::check_histogram(op, hist_edges, hist_counts, logits);
  Tensor hist;
  if (hist_edges.has_value() && hist_edges->defined()) {
    j.hist_edges = hist_edges->data_ptr<float>();
    j.hist_n_edges = hist_edges->size(0);
    hist = *hist_counts;
  }
  Tensor thr;
  if (has_thr) {
    thr = class_vector(op, "threshold", *threshold, logits);
    j.thr = thr.data_ptr();
  }
  // Row sums in the accumulation dtype (fp64 for fp64 logits), elementwise loss in the logits'.
  // Elementwise loss: promote(logits, target) for a float target (the accumulation dtype for
  // an fp32 target with reduced-precision logits), the logits' dtype for bool/uint8.
  const bool loss_acc = !reduce_rows && checks::is_float_dtype(target.scalar_type()) &&
                        target.scalar_type() != logits.scalar_type();
  Tensor loss = reduce_rows ? at::empty({R}, o.dtype(acc_dtype_of(logits)))
                            : new_2d_output(R, C, loss_acc ? o.dtype(acc_dtype_of(logits)) : o);
  j.loss_elem_acc = loss_acc;
  Tensor grad = compute_grad ? new_2d_output(R, C, o) : at::empty({0}, o);
  Tensor labels = has_thr ? at::empty({R, C}, o.dtype(at::kBool)) : at::empty({0}, o.dtype(at::kBool));
  Tensor probs = return_probs ? new_2d_output(R, C, o) : at::empty({0}, o);
  j.loss_rows = reduce_rows;
  j.loss_elem = !reduce_rows;
  j.grad = compute_grad;
  j.probs = return_probs;
  j.labels = has_thr;
  j.count = count;
  if (reduce_rows) j.loss_rows_out = loss.data_ptr(); else j.loss_elem_out = loss.data_ptr();
  if (compute_grad) j.grad_out = grad.data_ptr();
  if (return_probs) j.probs_out = probs.data_ptr();
  if (has_thr) j.labels_out = labels.data_ptr<bool>();
  Tensor counts;
  FUSEDLOSS_DISPATCH_FLOATING(logits.scalar_type(), "sigmoid_bce_fwd",
                              [&] { counts = run<scalar_t>(j, R, C, o, hist); });
  if (!count) counts = at::empty({0}, o.dtype(at::kLong));
  return {loss, grad, labels, probs, counts};
}

Tensor sigmoid_bce_bwd_cpu(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                           const std::optional<Tensor>& weight,
                           const std::optional<Tensor>& pos_weight) {
  const char* op = "sigmoid_bce_bwd";
  checks::check_logits(op, logits, false);
  const int64_t R = logits.size(0), C = logits.size(1);
  checks::check_elementwise_operand(op, "grad_loss", grad_loss, logits, false);
  checks::check_bce_target(op, target, logits);
  BceJob j;
  j.x = Operand(logits);
  j.y = Operand(target);
  j.gl = Operand(grad_loss);
  if (weight.has_value() && weight->defined()) {
    checks::check_elementwise_operand(op, "weight", *weight, logits, false);
    j.w = Operand(*weight);
  }
  if (pos_weight.has_value() && pos_weight->defined()) {
    checks::check_elementwise_operand(op, "pos_weight", *pos_weight, logits, false);
    j.pw = Operand(*pos_weight);
  }
  Tensor grad = new_2d_output(R, C, logits.options());
  j.grad = true;
  j.grad_out = grad.data_ptr();
  FUSEDLOSS_DISPATCH_FLOATING(logits.scalar_type(), "sigmoid_bce_bwd",
                              [&] { run<scalar_t>(j, R, C, logits.options()); });
  return grad;
}

std::tuple<Tensor, Tensor> sigmoid_decode_cpu(const Tensor& logits, const Tensor& threshold,
                                              bool return_probs) {
  const char* op = "sigmoid_decode";
  checks::check_logits(op, logits, false);
  const int64_t R = logits.size(0), C = logits.size(1);
  const auto o = logits.options();
  const Tensor thr = class_vector(op, "threshold", threshold, logits);
  Tensor labels = at::empty({R, C}, o.dtype(at::kBool));
  Tensor probs = return_probs ? new_2d_output(R, C, o) : at::empty({0}, o);
  BceJob j;
  j.x = Operand(logits);
  j.thr = thr.data_ptr();
  j.labels = true;
  j.labels_out = labels.data_ptr<bool>();
  j.probs = return_probs;
  if (return_probs) j.probs_out = probs.data_ptr();
  FUSEDLOSS_DISPATCH_FLOATING(logits.scalar_type(), "sigmoid_decode", [&] { run<scalar_t>(j, R, C, o); });
  return {labels, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("sigmoid_bce_fwd", &sigmoid_bce_fwd_cpu);
  m.impl("sigmoid_bce_bwd", &sigmoid_bce_bwd_cpu);
  m.impl("sigmoid_decode", &sigmoid_decode_cpu);
}

}  // namespace cpu
}  // namespace fusedloss
