// The sigmoid BCE kernels (math and layout: sigmoid_bce.cu): bce_kernel, elementwise over a
// column tile x a slice of rows, and bce_row_sum_kernel, the fixed-order sum of row partials.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace fusedloss {
namespace cuda {

// 256 threads: 8 such blocks fill an sm_90 SM (2048 threads); small enough that the grid has
// many blocks for small problems.
constexpr int kBceBlock = 256;
// Column tile: at most 256 chunks (4 KiB of logits per row: 2048 bf16 / 1024 fp32 columns). Keeps
// the shared-memory counters of a tile small (3 x (2048 + 8) int32 = 24 KiB at most) and the
// reduce_rows workspace at <= 1/256 of the logits' size (fp32 256k classes: 256 tiles).
constexpr int64_t kBceSpanChunks = 256;
// Register cap: 3 resident blocks (768 threads, <= 85 registers each) keep 768 x 32 bytes (logits +
// target chunk) = 24 KiB of loads in flight per SM, above the ~15 KiB per SM that Little's law
// asks for at 3.35 TB/s and ~600 ns latency on an H100. A cap of 64 registers made the bf16
// kernel spill.
constexpr int kBceMinBlocksPerSm = 3;

// What the target is: the logits' type, the accumulation type, or bytes (bool/uint8, 0/1).
enum class BceTarget : int8_t { kNone, kLogits, kAcc, kByte };

// A strided view of a side tensor of any floating dtype: element (r, c) at p[r*s0 + c*s1].
struct SideView {
  const void* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  FloatKind kind = FloatKind::kFloat;
};

template <typename A>
__device__ __forceinline__ A side_at(const SideView& v, int64_t row, int64_t c, A dflt) {
  return v.p != nullptr ? load_as<A>(v.p, v.kind, row * v.s0 + c * v.s1) : dflt;
}

struct BceArgs {
  const void* x;  // logits (R, C), unit column stride
  int64_t ldx;
  const void* y;  // target (R, C) or nullptr, kind y_kind
  int64_t ys0, ys1;
  BceTarget y_kind;
  SideView w, pw;          // weight, pos_weight views (R, C), or empty
  SideView gl;             // backward: grad_loss (R, C), or empty
  SideView thr;            // (C,) logit-space thresholds (stride s1), or empty
  const void* gscale;      // forward: 0-dim scale in the accumulation type, or nullptr (1)
  void* loss_elem;         // (R, C) contiguous, in the accumulation type when loss_acc, else T
  bool loss_acc;
  void* loss_rows;         // (tiles, R) row partials in the accumulation type; the (R,) loss
                           // itself when tiles == 1
  void* grad;              // (R, C) contiguous T, or nullptr
  bool* labels;            // (R, C) contiguous, or nullptr
  void* probs;             // (R, C) contiguous T, or nullptr
  unsigned long long* counts;  // (3, C) int64, zeroed, or nullptr
  const float* hist_edges;     // threshold histogram: (B + 1,) float32 edges, or nullptr
  unsigned long long* hist;    // (2, C, B + 2) int64, added to
  int64_t hist_n_edges;        // B + 1
  int64_t R, C;
  int64_t span_chunks;  // chunks per column tile
  int tx;               // lanes per row
};

// The target values of one chunk of a row, in A (0 outside [lo, hi) and without a target).
template <typename T, typename A, int V>
__device__ __forceinline__ void load_bce_target(const BceArgs& a, int64_t row, int phase,
                                                const ChunkSpan& c, A (&y)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) y[k] = A(0);
  if (a.y == nullptr) return;
  const bool unit = a.ys1 == 1;
  if (unit && a.y_kind == BceTarget::kLogits) {
    const T* p = static_cast<const T*>(a.y) + row * a.ys0;
    const auto v = load_pack<T, V>(p + c.col, chunk_aligned<T, V>(p, phase), c.lo, c.hi);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = static_cast<A>(v.v[k]);
  } else if (unit && a.y_kind == BceTarget::kAcc) {
    const A* p = static_cast<const A*>(a.y) + row * a.ys0;
    const auto v = load_pack<A, V>(p + c.col, chunk_aligned<A, V>(p, phase), c.lo, c.hi);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = v.v[k];
  } else if (unit) {
    const uint8_t* p = static_cast<const uint8_t*>(a.y) + row * a.ys0;
    const auto v = load_pack<uint8_t, V>(p + c.col, chunk_aligned<uint8_t, V>(p, phase), c.lo,
                                         c.hi);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = static_cast<A>(v.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < c.lo || k >= c.hi) continue;
      const int64_t off = row * a.ys0 + (c.col + k) * a.ys1;
      y[k] = a.y_kind == BceTarget::kByte ? static_cast<A>(static_cast<const uint8_t*>(a.y)[off])
             : a.y_kind == BceTarget::kAcc ? static_cast<const A*>(a.y)[off]
                                           : static_cast<A>(static_cast<const T*>(a.y)[off]);
    }
  }
}

// Add the chunk's TP / FP / FN to the block's shared-memory counters.
template <int V>
__device__ __forceinline__ void count_chunk(int* cnt, int64_t tile_base, int64_t tile_cols,
                                            const ChunkSpan& c, const bool (&lab)[V],
                                            const bool (&pos)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k < c.lo || k >= c.hi) continue;
    const int64_t i = c.col + k - tile_base;
    if (lab[k] && pos[k]) atomicAdd(&cnt[i], 1);
    else if (lab[k]) atomicAdd(&cnt[tile_cols + i], 1);
    else if (pos[k]) atomicAdd(&cnt[2 * tile_cols + i], 1);
  }
}

// The bin of a non-NaN x: the number of edges e[0..n) strictly below it (compared in A). The
// equal-width guess g = ceil((x - e0) * scale), right for equal-width edges up to rounding (an x
// equal to an edge gives that edge's index, its bin), is checked against e[g - 1] and e[g]; when
// it is wrong, a binary search over the side of g they leave open decides. Exact for any
// increasing edges; in bounds [0, n] for any edges.
template <typename A>
__device__ __forceinline__ int64_t hist_bin(const float* e, int64_t n, A e0, A scale, A x) {
  const A t = ceil((x - e0) * scale);
  const int64_t g = t >= A(0) ? (t < A(n) ? static_cast<int64_t>(t) : n) : 0;  // NaN t: 0
  int64_t lo = 0, hi = n;
  if (g > 0) {
    if (static_cast<A>(__ldg(e + g - 1)) < x) lo = g; else hi = g - 1;
  }
  if (g < n) {
    if (static_cast<A>(__ldg(e + g)) < x) lo = g + 1; else hi = min(hi, g);
  }
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<A>(__ldg(e + mid)) < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Add the chunk's logits to the threshold histogram (hist_bin); NaN logits are left out. One
// 64-bit integer atomic per element: exact, order-independent.
template <typename T, int V>
__device__ __forceinline__ void hist_chunk(const BceArgs& a, const ChunkSpan& c,
                                           const Pack<T, V>& px, const bool (&pos)[V]) {
  using A = acc_t<T>;
  const int64_t n = a.hist_n_edges, nb = n + 1;
  const A e0 = static_cast<A>(__ldg(a.hist_edges));
  const A span = static_cast<A>(__ldg(a.hist_edges + n - 1)) - e0;
  const A scale = span > A(0) ? A(n - 1) / span : A(0);  // 0 for one edge: every guess is 0
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const A x = static_cast<A>(px.v[k]);
    if (k < c.lo || k >= c.hi || isnan(x)) continue;
    const int64_t b = hist_bin<A>(a.hist_edges, n, e0, scale, x);
    atomicAdd(&a.hist[((pos[k] ? a.C : 0) + c.col + k) * nb + b], 1ULL);
  }
}

// One chunk of a row: every requested output; returns the chunk's loss sum (inside the row).
template <typename T, int V>
__device__ __forceinline__ acc_t<T> bce_chunk(const BceArgs& a, int64_t row, int phase,
                                              const ChunkSpan& c, int* cnt, int64_t tile_base,
                                              int64_t tile_cols) {
  using A = acc_t<T>;
  const T* xrow = static_cast<const T*>(a.x) + row * a.ldx;
  const Pack<T, V> px = load_pack<T, V>(xrow + c.col, true, c.lo, c.hi);
  A y[V];
  load_bce_target<T, A, V>(a, row, phase, c, y);
  const A g_fwd = a.gscale != nullptr ? *static_cast<const A*>(a.gscale) : A(1);
  A lv[V], gv[V], pv[V];
  bool lab[V], pos[V];
  A sum = A(0);
  const bool want_loss = a.loss_elem != nullptr || a.loss_rows != nullptr;
  const bool want_grad = a.grad != nullptr;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const bool in = k >= c.lo && k < c.hi;
    const int64_t col = c.col + k;
    const A x = static_cast<A>(px.v[k]);
    const A w = in ? side_at<A>(a.w, row, col, A(1)) : A(1);
    const A p = in ? side_at<A>(a.pw, row, col, A(1)) : A(1);
    const A e = acc_exp(-fabs(x));  // in (0, 1]
    const A inv = A(1) / (A(1) + e);
    const A sig = x >= A(0) ? inv : e * inv;
    const A py = p * y[k];
    // an infinite coefficient of softplus(-x) > 0 gives its infinity (no inf * 0 where
    // log1p(e) has rounded to 0); a NaN x stays NaN through e (fmax would drop it)
    const A coef = A(1) + (p - A(1)) * y[k];
    lv[k] = want_loss ? w * ((A(1) - y[k]) * fmax(x, A(0)) - (x < A(0) ? py * x : A(0)) +
                             (isinf(coef) && !isnan(e) ? coef : coef * acc_log1p(e)))
                      : A(0);
    if (in) sum += lv[k];
    if (want_grad) {
      const A g = a.gl.p != nullptr ? (in ? side_at<A>(a.gl, row, col, A(0)) : A(0)) : g_fwd;
      // sig - y without a pos_weight: (y + 1 - y) rounds below 1 for soft targets (y = 0.3)
      gv[k] = g * w * (a.pw.p != nullptr ? (py + A(1) - y[k]) * sig - py : sig - y[k]);
    }
    pv[k] = sig;
    lab[k] = a.thr.p != nullptr && in && x > side_at<A>(a.thr, 0, col, A(0));
    pos[k] = y[k] > A(0.5);
  }
  // Outputs are contiguous (R, C): chunk alignment checked per row, like the logits'.
  const int64_t off = row * a.C;
  if (a.loss_elem != nullptr && a.loss_acc) {
    A* p = static_cast<A*>(a.loss_elem) + off;
    store_pack<A, V>(p + c.col, chunk_aligned<A, V>(p, phase), c.lo, c.hi, lv);
  } else if (a.loss_elem != nullptr) {
    T* p = static_cast<T*>(a.loss_elem) + off;
    store_pack<T, V>(p + c.col, chunk_aligned<T, V>(p, phase), c.lo, c.hi, lv);
  }
  if (a.grad != nullptr) {
    T* p = static_cast<T*>(a.grad) + off;
    store_pack<T, V>(p + c.col, chunk_aligned<T, V>(p, phase), c.lo, c.hi, gv);
  }
  if (a.probs != nullptr) {
    T* p = static_cast<T*>(a.probs) + off;
    store_pack<T, V>(p + c.col, chunk_aligned<T, V>(p, phase), c.lo, c.hi, pv);
  }
  if (a.labels != nullptr) {
    bool* p = a.labels + off;
    store_pack<bool, V>(p + c.col, chunk_aligned<bool, V>(p, phase), c.lo, c.hi, lab);
  }
  if (a.counts != nullptr) count_chunk<V>(cnt, tile_base, tile_cols, c, lab, pos);
  if (a.hist != nullptr) hist_chunk<T, V>(a, c, px, pos);
  return sum;
}

// Column tile blockIdx.x, rows blockIdx.y*slots + slot, stepping by gridDim.y*slots.
template <typename T>
__global__ void __launch_bounds__(kBceBlock, kBceMinBlocksPerSm) bce_kernel(const BceArgs a) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  extern __shared__ int cnt[];  // [3][tile columns + V] when counting
  const int tx = a.tx;
  const int lx = threadIdx.x % tx;
  const int slot = threadIdx.x / tx;
  const int slots = kBceBlock / tx;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * a.span_chunks;
  // Columns of this tile, over all phases: [j0*V - (V-1), (j0 + span)*V).
  const int64_t tile_base = j0 * V - (V - 1);
  const int64_t tile_cols = a.span_chunks * V + V - 1;
  const bool counting = a.counts != nullptr;
  if (counting) {
    for (int64_t i = threadIdx.x; i < 3 * tile_cols; i += kBceBlock) cnt[i] = 0;
    __syncthreads();
  }
  // `base` is uniform over the block, so every lane reaches the row-sum shuffle.
  for (int64_t base = static_cast<int64_t>(blockIdx.y) * slots; base < a.R;
       base += static_cast<int64_t>(gridDim.y) * slots) {
    const int64_t row = base + slot;
    A rowsum = A(0);
    if (row < a.R) {
      const int phase = row_phase(static_cast<const T*>(a.x) + row * a.ldx, sizeof(T), V);
      const int64_t j1 = min((a.C + phase + V - 1) / V, j0 + a.span_chunks);
      for (int64_t j = j0 + lx; j < j1; j += tx)
        rowsum += bce_chunk<T, V>(a, row, phase, chunk_span<V>(j, phase, a.C), cnt, tile_base,
                                  tile_cols);
    }
    if (a.loss_rows != nullptr) {
      rowsum = warp_sum(rowsum, tx);  // the tx lanes of a row are consecutive in one warp
      if (lx == 0 && row < a.R) static_cast<A*>(a.loss_rows)[blockIdx.x * a.R + row] = rowsum;
    }
  }
  if (!counting) return;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < tile_cols; i += kBceBlock) {
    const int64_t c = tile_base + i;
    if (c < 0 || c >= a.C) continue;
    for (int q = 0; q < 3; ++q) {
      const int v = cnt[q * tile_cols + i];
      if (v != 0) atomicAdd(&a.counts[q * a.C + c], static_cast<unsigned long long>(v));
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

}  // namespace cuda
}  // namespace fusedloss
