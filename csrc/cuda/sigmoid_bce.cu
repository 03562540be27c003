// Sigmoid binary cross-entropy with logits on CUDA: sigmoid_bce_fwd, sigmoid_bce_bwd,
// sigmoid_decode (semantics: docs/OPS.md). One elementwise kernel, `bce_kernel`, serves all three;
// which outputs it writes is chosen by which pointers in BceArgs are set.
//
// Math (per element, accumulation type A; y target, p pos_weight (1 if None), w weight):
//   softplus(-x) = max(-x, 0) + log1p(exp(-|x|))           (no overflow for |x| up to 1e4+)
//   loss = w * ((1 - y) x + (1 + (p - 1) y) softplus(-x))
//   d loss / dx = w * ((p y + 1 - y) sigmoid(x) - p y)
//     since d/dx softplus(-x) = sigmoid(x) - 1 and
//     (1 - y) + (1 + (p - 1) y)(sigmoid(x) - 1) = (p y + 1 - y) sigmoid(x) - p y.
//   sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0, with e = exp(-|x|) in (0, 1].
// Decoding: label = x > threshold[c] (logit space, strict), positive target = y > 0.5,
// counts[0/1/2][c] = #TP / #FP / #FN.
//
// Layout. A block is 256 threads = (256 / tx) row slots x tx lanes (tx a power of two <= 32,
// just enough lanes to cover one column tile of a row). Block (bx, by) owns column tile bx
// (span_chunks 16-byte chunks of each row, chunk boundaries aligned to the logits row, see
// common.cuh) and rows by*slots + i, stepping by gridDim.y*slots. Row sums (reduce_rows) are
// shuffles over the tx lanes; with several column tiles the per-tile sums go to a (tiles, R)
// fp32 workspace summed in a fixed order by bce_row_sum_kernel. Counts are integer atomics in
// shared memory per block, then one 64-bit global atomic per class per block: integer sums, so
// the result does not depend on the order (deterministic). No float atomics anywhere.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/common.cuh"

namespace fusedloss {
namespace cuda {
namespace {

// 256 threads: 8 such blocks fill an sm_90 SM (2048 threads); small enough that the grid has
// many blocks for small problems.
constexpr int kBceBlock = 256;
// Column tile: at most 256 chunks (4 KiB of logits per row: 2048 bf16 / 1024 fp32 columns). Keeps
// the shared-memory counters of a tile small (3 x (2048 + 8) int32 = 24 KiB at most) and the
// reduce_rows workspace at <= 1/256 of the logits' size (fp32 256k classes: 256 tiles).
constexpr int64_t kBceSpanChunks = 256;
// Blocks per SM for the grid-stride loop over rows: 8 x 256 threads = full occupancy.
constexpr int kBceBlocksPerSm = 8;
// Register cap: 3 resident blocks (768 threads, <= 85 registers each) keep 768 x 32 bytes (logits +
// target chunk) = 24 KiB of loads in flight per SM, above the ~15 KiB per SM that Little's law
// asks for at 3.35 TB/s and ~600 ns latency on an H100. A cap of 64 registers made the bf16
// kernel spill (at 85, ptxas for sm_90 reports a 24-byte spill for bf16/fp16, none otherwise).
constexpr int kBceMinBlocksPerSm = 3;

struct BceArgs {
  const void* x;  // logits (R, C), unit column stride
  int64_t ldx;
  const void* y;  // target (R, C) or nullptr; dtype T, or bytes (bool/uint8) when y_byte
  int64_t ys0, ys1;
  bool y_byte;
  const void* w;  // weight view (R, C), any strides, or nullptr
  int64_t ws0, ws1;
  const void* pw;  // pos_weight view (R, C), any strides, or nullptr
  int64_t ps0, ps1;
  const void* gscale;   // forward: 0-dim scale in the accumulation type, or nullptr (1)
  const void* gl;       // backward: grad_loss (R, C) in T, any strides, or nullptr
  int64_t gs0, gs1;
  const float* thr;        // (C,) logit-space thresholds or nullptr
  void* loss_elem;         // (R, C) contiguous T, or nullptr
  void* loss_rows;         // (tiles, R) row partials in the accumulation type (fp64 for fp64
                           // logits); the (R,) loss itself when tiles == 1
  void* grad;              // (R, C) contiguous T, or nullptr
  bool* labels;            // (R, C) contiguous, or nullptr
  void* probs;             // (R, C) contiguous T, or nullptr
  unsigned long long* counts;  // (3, C) int64, zeroed, or nullptr
  int64_t R, C;
  int64_t span_chunks;  // chunks per column tile
  int tx;               // lanes per row
};

template <typename T>
__global__ void __launch_bounds__(kBceBlock, kBceMinBlocksPerSm) bce_kernel(const BceArgs a) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  extern __shared__ int cnt[];  // [3][tile columns + V] when counting

  const int tx = a.tx;
  const int lx = threadIdx.x % tx;
  const int slot = threadIdx.x / tx;
  const int slots = kBceBlock / tx;
  const int64_t C = a.C;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * a.span_chunks;
  // Columns of this tile, over all phases: [j0*V - (V-1), (j0 + span)*V).
  const int64_t tile_base = j0 * V - (V - 1);
  const int64_t tile_cols = a.span_chunks * V + V - 1;
  const bool counting = a.counts != nullptr;
  if (counting) {
    for (int64_t i = threadIdx.x; i < 3 * tile_cols; i += kBceBlock) cnt[i] = 0;
    __syncthreads();
  }
  const T* X = static_cast<const T*>(a.x);
  const T* Yt = static_cast<const T*>(a.y);
  const uint8_t* Yb = static_cast<const uint8_t*>(a.y);
  const T* Wt = static_cast<const T*>(a.w);
  const T* Pt = static_cast<const T*>(a.pw);
  const T* Gl = static_cast<const T*>(a.gl);
  const A g_fwd = a.gscale != nullptr ? *static_cast<const A*>(a.gscale) : A(1);
  const bool want_loss = a.loss_elem != nullptr || a.loss_rows != nullptr;
  const bool want_grad = a.grad != nullptr;

  // `base` is uniform over the block, so every lane reaches the row-sum shuffle.
  for (int64_t base = static_cast<int64_t>(blockIdx.y) * slots; base < a.R;
       base += static_cast<int64_t>(gridDim.y) * slots) {
    const int64_t row = base + slot;
    A rowsum = A(0);
    if (row < a.R) {
      const T* xrow = X + row * a.ldx;
      const int phase = row_phase(xrow, sizeof(T), V);
      const int64_t j1 = min((C + phase + V - 1) / V, j0 + a.span_chunks);
      const int64_t out_off = row * C;  // outputs are contiguous (R, C)
      T* lrow = a.loss_elem ? static_cast<T*>(a.loss_elem) + out_off : nullptr;
      T* grow = want_grad ? static_cast<T*>(a.grad) + out_off : nullptr;
      T* prow = a.probs ? static_cast<T*>(a.probs) + out_off : nullptr;
      bool* brow = a.labels ? a.labels + out_off : nullptr;
      const bool fl = lrow && chunk_aligned<T, V>(lrow, phase);
      const bool fg = grow && chunk_aligned<T, V>(grow, phase);
      const bool fp = prow && chunk_aligned<T, V>(prow, phase);
      const bool fb = brow && chunk_aligned<bool, V>(brow, phase);
      const bool y_unit = a.y != nullptr && a.ys1 == 1;
      const T* ytrow = a.y && !a.y_byte ? Yt + row * a.ys0 : nullptr;
      const uint8_t* ybrow = a.y && a.y_byte ? Yb + row * a.ys0 : nullptr;
      const bool fyt = ytrow && y_unit && chunk_aligned<T, V>(ytrow, phase);
      const bool fyb = ybrow && y_unit && chunk_aligned<uint8_t, V>(ybrow, phase);

      for (int64_t j = j0 + lx; j < j1; j += tx) {
        const int64_t col = j * V - phase;
        const int lo = static_cast<int>(max(static_cast<int64_t>(0), -col));
        const int hi = static_cast<int>(min(static_cast<int64_t>(V), C - col));
        const Pack<T, V> px = load_pack<T, V>(xrow + col, true, lo, hi);
        A y[V];
  #pragma unroll
        for (int k = 0; k < V; ++k) y[k] = A(0);
        if (a.y != nullptr) {
          if (y_unit && !a.y_byte) {
            const Pack<T, V> py = load_pack<T, V>(ytrow + col, fyt, lo, hi);
  #pragma unroll
            for (int k = 0; k < V; ++k) y[k] = static_cast<A>(py.v[k]);
          } else if (y_unit) {
            const Pack<uint8_t, V> py = load_pack<uint8_t, V>(ybrow + col, fyb, lo, hi);
  #pragma unroll
            for (int k = 0; k < V; ++k) y[k] = static_cast<A>(py.v[k]);
          } else {
  #pragma unroll
            for (int k = 0; k < V; ++k)
              if (k >= lo && k < hi) {
                const int64_t off = (col + k) * a.ys1;
                y[k] = a.y_byte ? static_cast<A>(ybrow[off]) : static_cast<A>(ytrow[off]);
              }
          }
        }
        // Outputs are kept in T (half the registers of A for bf16/fp16).
        T lo_v[V], gr_v[V], pr_v[V];
        bool lab[V], pos[V];
  #pragma unroll
        for (int k = 0; k < V; ++k) {
          const bool in = k >= lo && k < hi;
          const int64_t c = col + k;
          const A x = static_cast<A>(px.v[k]);
          const A w = Wt && in ? static_cast<A>(Wt[row * a.ws0 + c * a.ws1]) : A(1);
          const A p = Pt && in ? static_cast<A>(Pt[row * a.ps0 + c * a.ps1]) : A(1);
          const A e = acc_exp(-fabs(x));  // in (0, 1]
          const A inv = A(1) / (A(1) + e);
          const A sig = x >= A(0) ? inv : e * inv;
          if (want_loss) {
            const A sp = fmax(-x, A(0)) + acc_log1p(e);  // softplus(-x)
            const A l = w * ((A(1) - y[k]) * x + (A(1) + (p - A(1)) * y[k]) * sp);
            lo_v[k] = static_cast<T>(l);
            if (in) rowsum += l;
          }
          if (want_grad) {
            const A g = Gl ? (in ? static_cast<A>(Gl[row * a.gs0 + c * a.gs1]) : A(0)) : g_fwd;
            const A py = p * y[k];
            gr_v[k] = static_cast<T>(g * w * ((py + A(1) - y[k]) * sig - py));
          }
          pr_v[k] = static_cast<T>(sig);
          lab[k] = a.thr != nullptr && in && x > static_cast<A>(a.thr[c]);
          pos[k] = y[k] > A(0.5);
        }
        if (lrow) store_pack<T, V>(lrow + col, fl, lo, hi, lo_v);
        if (grow) store_pack<T, V>(grow + col, fg, lo, hi, gr_v);
        if (prow) store_pack<T, V>(prow + col, fp, lo, hi, pr_v);
        if (brow) store_pack<bool, V>(brow + col, fb, lo, hi, lab);
        if (counting) {
  #pragma unroll
          for (int k = 0; k < V; ++k) {
            if (k < lo || k >= hi) continue;
            const int64_t i = col + k - tile_base;
            if (lab[k] && pos[k]) atomicAdd(&cnt[i], 1);
            else if (lab[k]) atomicAdd(&cnt[tile_cols + i], 1);
            else if (pos[k]) atomicAdd(&cnt[2 * tile_cols + i], 1);
          }
        }
      }
    }  // row < R
    if (a.loss_rows != nullptr) {
      rowsum = warp_sum(rowsum, tx);  // the tx lanes of a row are consecutive in one warp
      if (lx == 0 && row < a.R) static_cast<A*>(a.loss_rows)[blockIdx.x * a.R + row] = rowsum;
    }
  }

  if (counting) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < tile_cols; i += kBceBlock) {
      const int64_t c = tile_base + i;
      if (c < 0 || c >= C) continue;
      for (int q = 0; q < 3; ++q) {
        const int v = cnt[q * tile_cols + i];
        if (v != 0) atomicAdd(&a.counts[q * C + c], static_cast<unsigned long long>(v));
      }
    }
  }
}

// loss[r] = sum over tiles b (in order) of part[b, r].
template <typename A>
__global__ void bce_row_sum_kernel(const A* part, A* loss, int64_t R, int64_t tiles) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < R;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = 0;
    for (int64_t b = 0; b < tiles; ++b) s += part[b * R + r];
    loss[r] = s;
  }
}

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
      1, std::min<int64_t>({row_groups, (want_blocks + tiles - 1) / tiles, 65535}));
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
    const int64_t blocks = std::min<int64_t>((a.R + 255) / 256, 65535);
    bce_row_sum_kernel<A><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        static_cast<const A*>(a.loss_rows), static_cast<A*>(loss_rows_out), a.R, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------------
// Ops.

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "logits: expected a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "logits: expected a 2-D (rows, classes) tensor, got ",
              logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "logits: expected unit column stride, got strides ", logits.strides());
}

int64_t ld_of(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// A (R, C) view of logits' dtype and device with any strides (weight, pos_weight, grad_loss).
const void* strided_view(const std::optional<at::Tensor>& t, const at::Tensor& logits,
                         const char* name, int64_t& s0, int64_t& s1) {
  s0 = s1 = 0;
  if (!t.has_value()) return nullptr;
  const at::Tensor& v = *t;
  TORCH_CHECK(v.device() == logits.device(), name, " is on ", v.device(), " but logits are on ",
              logits.device());
  TORCH_CHECK(v.sizes() == logits.sizes(), name, ": expected shape ", logits.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == logits.scalar_type(), name, ": expected dtype ",
              logits.scalar_type(), ", got ", v.scalar_type());
  s0 = v.stride(0);
  s1 = v.stride(1);
  return v.data_ptr();
}

void set_target(BceArgs& a, const at::Tensor& target, const at::Tensor& logits) {
  TORCH_CHECK(target.device() == logits.device(), "target is on ", target.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(target.sizes() == logits.sizes(), "target: expected shape ", logits.sizes(),
              ", got ", target.sizes());
  const auto st = target.scalar_type();
  TORCH_CHECK(st == logits.scalar_type() || st == at::kBool || st == at::kByte,
              "target: expected dtype ", logits.scalar_type(), ", bool or uint8, got ", st);
  a.y = target.data_ptr();
  a.y_byte = st == at::kBool || st == at::kByte;
  a.ys0 = target.stride(0);
  a.ys1 = target.stride(1);
}

const float* threshold_ptr(const std::optional<at::Tensor>& thr, const at::Tensor& logits) {
  if (!thr.has_value()) return nullptr;
  const at::Tensor& t = *thr;
  TORCH_CHECK(t.device() == logits.device(), "threshold is on ", t.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(1) && t.scalar_type() == at::kFloat &&
                  t.is_contiguous(),
              "threshold: expected a contiguous float32 (", logits.size(1),
              ",) tensor of logit-space thresholds, got ", t.scalar_type(), " ", t.sizes());
  return t.data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_bce_fwd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& threshold, bool reduce_rows, bool compute_grad,
    bool return_probs, bool count) {
  raise_pending_bad_target();
  c10::cuda::CUDAGuard guard(logits.device());
  check_logits(logits);
  TORCH_CHECK(!count || threshold.has_value(), "count=True requires a threshold");
  BceArgs a = {};
  a.x = logits.data_ptr();
  a.ldx = ld_of(logits);
  a.R = logits.size(0);
  a.C = logits.size(1);
  set_target(a, target, logits);
  a.w = strided_view(weight, logits, "weight", a.ws0, a.ws1);
  a.pw = strided_view(pos_weight, logits, "pos_weight", a.ps0, a.ps1);
  a.thr = threshold_ptr(threshold, logits);
  const auto opts = logits.options();
  // Every row sum is written by the kernel, unless there are no classes (then it is 0).
  // Row sums in the accumulation type (fp64 for fp64 logits, docs/OPS.md).
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = !reduce_rows ? at::empty({a.R, a.C}, opts)
                    : a.C == 0   ? at::zeros({a.R}, opts.dtype(acc))
                                 : at::empty({a.R}, opts.dtype(acc));
  at::Tensor grad = compute_grad ? at::empty({a.R, a.C}, opts) : at::empty({0}, opts);
  at::Tensor labels = a.thr ? at::empty({a.R, a.C}, opts.dtype(at::kBool))
                            : at::empty({0}, opts.dtype(at::kBool));
  at::Tensor probs = return_probs ? at::empty({a.R, a.C}, opts) : at::empty({0}, opts);
  at::Tensor counts = count ? at::zeros({3, a.C}, opts.dtype(at::kLong))
                            : at::empty({0}, opts.dtype(at::kLong));
  at::Tensor scale_holder;  // grad_scale in the accumulation type (`.to` is a no-op if it is)
  if (compute_grad && grad_scale.has_value()) {
    const at::Tensor& g = *grad_scale;
    TORCH_CHECK(g.device() == logits.device(), "grad_scale is on ", g.device(),
                " but logits are on ", logits.device());
    TORCH_CHECK(g.numel() == 1 && at::isFloatingType(g.scalar_type()),
                "grad_scale: expected a 0-dim floating tensor, got ", g.scalar_type(), " ",
                g.sizes());
    scale_holder = g.to(acc);
    a.gscale = scale_holder.data_ptr();
  }
  if (!reduce_rows) a.loss_elem = loss.data_ptr();
  if (compute_grad) a.grad = grad.data_ptr();
  if (a.thr) a.labels = labels.data_ptr<bool>();
  if (return_probs) a.probs = probs.data_ptr();
  if (count) a.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), "sigmoid_bce_fwd", [&] {
    launch_bce<scalar_t>(a, logits, reduce_rows ? loss.data_ptr() : nullptr);
  });
  return {loss, grad, labels, probs, counts};
}

at::Tensor sigmoid_bce_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                           const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight) {
  raise_pending_bad_target();
  c10::cuda::CUDAGuard guard(logits.device());
  check_logits(logits);
  BceArgs a = {};
  a.x = logits.data_ptr();
  a.ldx = ld_of(logits);
  a.R = logits.size(0);
  a.C = logits.size(1);
  set_target(a, target, logits);
  a.w = strided_view(weight, logits, "weight", a.ws0, a.ws1);
  a.pw = strided_view(pos_weight, logits, "pos_weight", a.ps0, a.ps1);
  // grad_loss in the logits dtype (a no-op in the usual case); strides are kept.
  at::Tensor gl = grad_loss.scalar_type() == logits.scalar_type()
                      ? grad_loss
                      : grad_loss.to(logits.scalar_type());
  a.gl = strided_view(gl, logits, "grad_loss", a.gs0, a.gs1);
  at::Tensor grad = at::empty({a.R, a.C}, logits.options());
  a.grad = grad.data_ptr();
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), "sigmoid_bce_bwd",
                           [&] { launch_bce<scalar_t>(a, logits, nullptr); });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_decode(const at::Tensor& logits,
                                                  const at::Tensor& threshold,
                                                  bool return_probs) {
  raise_pending_bad_target();
  c10::cuda::CUDAGuard guard(logits.device());
  check_logits(logits);
  BceArgs a = {};
  a.x = logits.data_ptr();
  a.ldx = ld_of(logits);
  a.R = logits.size(0);
  a.C = logits.size(1);
  a.thr = threshold_ptr(threshold, logits);
  const auto opts = logits.options();
  at::Tensor labels = at::empty({a.R, a.C}, opts.dtype(at::kBool));
  at::Tensor probs = return_probs ? at::empty({a.R, a.C}, opts) : at::empty({0}, opts);
  a.labels = labels.data_ptr<bool>();
  if (return_probs) a.probs = probs.data_ptr();
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), "sigmoid_decode",
                           [&] { launch_bce<scalar_t>(a, logits, nullptr); });
  return {labels, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("sigmoid_bce_fwd", &sigmoid_bce_fwd);
  m.impl("sigmoid_bce_bwd", &sigmoid_bce_bwd);
  m.impl("sigmoid_decode", &sigmoid_decode);
}

}  // namespace cuda
}  // namespace fusedloss
