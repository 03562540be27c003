// Arguments and per-row context of the softmax cross-entropy kernel (ce_kernel.cuh): what the
// launcher passes (CeArgs), what each thread derives once per launch (CeConst) and once per row
// (CeRow), and the loads of the side tensors (weights, probability targets).
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace fusedloss {
namespace cuda {

// Block shapes shared by the kernel and its launcher (ce_launch.cuh states the assumptions).
constexpr int kWarpRowBlock = 256;  // warp rows: 8 rows per block
constexpr int kWarpRowsPerBlock = kWarpRowBlock / kWarp;
constexpr int kMaxBlock = 512;      // block and cluster rows: at most 512 threads per block

struct CeArgs {
  const void* x;  // logits (R, C), row stride ldx
  int64_t ldx;
  void* grad;  // gradient (R, C), row stride ldg; nullptr: no gradient
  int64_t ldg;
  const int64_t* target;  // class indices (R,), or nullptr
  const void* ytarget;    // probability targets (R, C), row stride ldy, or nullptr
  int64_t ldy;
  bool y_acc;             // ytarget is in the accumulation type (else in the logits' type)
  const void* weight;     // (C,) contiguous in the accumulation type, or nullptr
  const void* grad_scale; // forward: 0-dim scale in the accumulation type, nullptr means 1
  const void* row_scale;  // backward: grad_loss (R,) in the accumulation type, stride rs
  int64_t rs;
  void* loss;             // (R,) in the accumulation type, or nullptr
  void* lse;              // (R,) in the accumulation type, or nullptr
  int64_t* pred;          // (R,) or nullptr
  float* conf;            // (R,) or nullptr
  int64_t R, C;
  int64_t ignore_index;
  double eps, zsq, softcap;  // label_smoothing, lse_square_scale, softcap (0: off)
  int64_t cta_chunks;        // 16-byte chunks of a row per block (see common.cuh: chunks)
  int cluster;               // blocks per row (1: no cluster)
  bool stage;                // keep chunks in shared memory between the passes
  long long* mailbox;        // mailbox.h; nullptr without class targets
};

// Per-launch constants, derived from CeArgs once per thread.
template <typename A>
struct CeConst {
  bool has_cls, has_prob, want_loss, decode, want_grad, smooth, need_w, need_ref, capped;
  A eps, eps_c, zsq, cap, inv_cap, g_fwd;
};

template <typename A>
__device__ __forceinline__ CeConst<A> ce_const(const CeArgs& a) {
  CeConst<A> k;
  k.has_cls = a.target != nullptr;
  k.has_prob = a.ytarget != nullptr;
  k.want_loss = a.loss != nullptr;
  k.decode = a.pred != nullptr;
  k.want_grad = a.grad != nullptr;
  k.smooth = k.has_cls && a.eps > 0;
  k.need_w = a.weight != nullptr && (k.smooth || k.has_prob);
  k.need_ref = k.smooth || (k.has_prob && k.want_loss);
  k.capped = a.softcap > 0;
  k.eps = static_cast<A>(a.eps);
  k.eps_c = a.C > 0 ? static_cast<A>(a.eps / static_cast<double>(a.C)) : A(0);
  k.zsq = static_cast<A>(a.zsq);
  k.cap = static_cast<A>(a.softcap);
  k.inv_cap = k.capped ? static_cast<A>(1.0 / a.softcap) : A(0);
  k.g_fwd = a.grad_scale != nullptr ? *static_cast<const A*>(a.grad_scale) : A(1);
  return k;
}

template <typename A>
__device__ __forceinline__ A softcap_z(const CeConst<A>& k, A x) {
  return k.capped ? k.cap * acc_tanh(x * k.inv_cap) : x;
}

// dz/dx of the soft cap: sech(x/cap)^2 = 4 e / (1 + e)^2 with e = exp(-2|x/cap|), relatively
// precise where 1 - (z/cap)^2 cancels (|x| >> cap).
template <typename A>
__device__ __forceinline__ A softcap_dzdx(const CeConst<A>& k, A x) {
  const A e = acc_exp(A(-2) * fabs(x * k.inv_cap));
  const A d = A(1) + e;
  return A(4) * e / (d * d);
}

// Where this thread sits: a warp of 32 lanes (warp rows) or a block of a cluster (block rows).
struct RowGroup {
  int lane, warp, gtid, gthreads, rank;
};

template <bool kWarpRow>
__device__ __forceinline__ RowGroup row_group(const CeArgs& a) {
  RowGroup g;
  g.lane = threadIdx.x % kWarp;
  g.warp = threadIdx.x / kWarp;
  g.gtid = kWarpRow ? g.lane : threadIdx.x;
  g.gthreads = kWarpRow ? kWarp : blockDim.x;
  g.rank = kWarpRow ? 0 : static_cast<int>(blockIdx.x % a.cluster);
  return g;
}

// What pass 1 and the gradient pass share about one row.
template <typename T, typename A>
struct CeRow {
  const T* x;
  const void* y;  // probability target row (T or A, see CeArgs::y_acc) or nullptr
  T* g;           // gradient row or nullptr
  int phase;
  int64_t j0, j1;      // this block's chunks of the row
  bool fy, fg, fw;     // the target / gradient / weight chunks of this row are vector-aligned
  int64_t t;           // class target (-1 without)
  bool ignored, bad, valid;
  A z_t, ref;          // z of the target (thread 0 of rank 0 only) and the reference logit
};

template <typename T, typename A>
__device__ __forceinline__ CeRow<T, A> ce_row_setup(const CeArgs& a, const CeConst<A>& k,
                                                   const RowGroup& grp, int64_t row) {
  constexpr int V = kVec<T>;
  CeRow<T, A> r;
  r.x = static_cast<const T*>(a.x) + row * a.ldx;
  const size_t ysize = a.y_acc ? sizeof(A) : sizeof(T);
  r.y = k.has_prob ? static_cast<const char*>(a.ytarget) + row * a.ldy * ysize : nullptr;
  r.g = k.want_grad ? static_cast<T*>(a.grad) + row * a.ldg : nullptr;
  // Chunk j starts at column j*V - phase (common.cuh).
  r.phase = row_phase(r.x, sizeof(T), V);
  r.j0 = grp.rank * a.cta_chunks;
  r.j1 = min((a.C + r.phase + V - 1) / V, r.j0 + a.cta_chunks);
  r.fy = k.has_prob && (a.y_acc ? chunk_aligned<A, V>(static_cast<const A*>(r.y), r.phase)
                                : chunk_aligned<T, V>(static_cast<const T*>(r.y), r.phase));
  r.fg = k.want_grad && chunk_aligned<T, V>(r.g, r.phase);
  r.fw = k.need_w && chunk_aligned<A, V>(static_cast<const A*>(a.weight), r.phase);
  // Target facts, on every thread (the loads are warp broadcasts).
  r.t = -1;
  r.ignored = r.bad = false;
  if (k.has_cls) {
    r.t = a.target[row];
    r.ignored = r.t == a.ignore_index;
    r.bad = !r.ignored && (r.t < 0 || r.t >= a.C);
  }
  r.valid = k.has_cls && !r.ignored && !r.bad;
  // Read before any gradient of this row is written (in place, another block of the cluster
  // may overwrite them after the cluster barrier). A non-finite reference logit would make
  // z - ref NaN (-inf - -inf): use 0 then, as every other backend does.
  const bool lead = grp.gtid == 0 && grp.rank == 0;
  r.z_t = r.valid && k.want_loss && lead ? softcap_z(k, static_cast<A>(r.x[r.t])) : A(0);
  const A z0 = k.need_ref ? softcap_z(k, static_cast<A>(r.x[0])) : A(0);
  r.ref = isfinite(z0) ? z0 : A(0);
  if (r.bad && lead && a.mailbox != nullptr) {
    *reinterpret_cast<volatile long long*>(a.mailbox) = static_cast<long long>(r.t);
    __threadfence_system();
  }
  return r;
}

// Weights (accumulation type) of a chunk; 1 inside the row without weights, 0 outside.
template <typename A, int V>
__device__ __forceinline__ void load_weights(const CeArgs& a, bool fw, const ChunkSpan& c,
                                             A (&w)[V]) {
  if (a.weight != nullptr) {
    const Pack<A, V> pw = load_pack<A, V>(static_cast<const A*>(a.weight) + c.col, fw, c.lo, c.hi);
#pragma unroll
    for (int k = 0; k < V; ++k) w[k] = pw.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) w[k] = (k >= c.lo && k < c.hi) ? A(1) : A(0);
  }
}

// Smoothed probability targets y' = (1 - eps) y + eps/C of a chunk, times the weights.
template <typename T, typename A, int V>
__device__ __forceinline__ void load_wy(const CeArgs& a, const CeConst<A>& k,
                                        const CeRow<T, A>& r, const ChunkSpan& c,
                                        const A (&w)[V], A (&wy)[V]) {
  A y[V];
  if (a.y_acc) {
    const auto p = load_pack<A, V>(static_cast<const A*>(r.y) + c.col, r.fy, c.lo, c.hi);
#pragma unroll
    for (int i = 0; i < V; ++i) y[i] = p.v[i];
  } else {
    const auto p = load_pack<T, V>(static_cast<const T*>(r.y) + c.col, r.fy, c.lo, c.hi);
#pragma unroll
    for (int i = 0; i < V; ++i) y[i] = static_cast<A>(p.v[i]);
  }
#pragma unroll
  for (int i = 0; i < V; ++i) wy[i] = w[i] * ((A(1) - k.eps) * y[i] + k.eps_c);
}

}  // namespace cuda
}  // namespace fusedloss
