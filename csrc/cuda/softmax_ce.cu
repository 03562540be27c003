// Softmax cross-entropy on CUDA: softmax_ce_fwd, softmax_ce_fwd_inplace, softmax_ce_bwd,
// softmax_decode (semantics: docs/OPS.md). One kernel, `ce_kernel`, serves all four; what it
// computes is chosen by which pointers in CeArgs are set.
//
// DATA MOVEMENT. Forward+gradient must read the logits once and write the gradient once. The
// row's statistics (max, sum of exp, argmax, weighted sums) are needed before the first gradient
// element can be written, so the row is kept on chip between the two passes:
//   pass 1 reads each 16-byte chunk of the row from global memory, keeps it in shared memory
//          ("staging") and folds it into per-thread statistics (online max/sum-exp);
//   reduce the statistics over the row group (a warp, a block, or a cluster of blocks);
//   pass 2 re-reads each chunk from shared memory (the thread reads back exactly the chunks it
//          wrote, so no barrier is needed for the data itself) and writes the gradient.
// Row layouts, picked by the launcher (choose_layout) from the row size in 16-byte chunks:
//   - warp rows: rows of <= kWarpRowMaxChunks chunks (bf16 C <= 1024, fp32 C <= 512); one warp per
//     row, 8 rows per 256-thread block, shuffles only. Small-vocabulary classifiers.
//   - block rows: one block (64..512 threads) per row, row bytes <= kCtaStageBytes.
//   - cluster rows (sm_90 thread-block clusters): the row is split into 2/4/8 contiguous slices,
//     one block per slice, each slice staged in its own block's shared memory; the blocks
//     exchange their partial statistics through distributed shared memory (one 64-byte record
//     per block), so no logit leaves the chip twice. 128k-256k vocabularies: a 256k bf16 row is
//     512 KiB = 8 x 64 KiB slices. This is the Hopper path the 128k-256k vocabularies take.
//   - streaming (fallback): rows too large even for 8 blocks' shared memory (e.g. fp64 with
//     > ~220k classes), clusters not schedulable (MIG/MPS limits), or no gradient wanted. One
//     block per row, no staging; with a gradient, pass 2 reads the row a second time from global
//     memory. That read hits L2 only if the row is still resident: 132 SMs x 1-2 rows x row bytes
//     usually exceeds the 50 MB L2 for such rows, so assume a second HBM read (3x the ideal
//     traffic, like the eager/Liger anchors). Not measured here (no GPU in the writing session).
//
// OUT-OF-RANGE CLASS TARGETS (a value outside [0, C) that is not ignore_index). The CPU op raises
// IndexError before computing; on CUDA that would need a host synchronisation, and torch's own
// device assert kills the CUDA context. Instead:
//   1. the kernel never reads out of bounds: it treats the row as invalid and writes loss = NaN
//      and a NaN gradient row (lse, pred, confidence are computed normally), so a mean loss and
//      the weights it updates visibly become NaN in the same step;
//   2. it stores the offending value into a host-mapped pinned "mailbox" (one int64, written by
//      the device with a plain store, read by the host without synchronising);
//   3. every fusedloss CUDA op checks the mailbox when it is called and, if a value is there,
//      clears it and raises IndexError("Target <v> is out of bounds. ..."), like an asynchronous
//      CUDA error but with the value and without poisoning the context. So the error surfaces at
//      the first fusedloss CUDA call made after the bad kernel finished (typically the backward
//      of the same step, or the next step), and explicitly with
//      torch.cuda.synchronize(); torch.ops.fusedloss_cuda.raise_pending_error().
//   If several rows are bad, the value reported is the one stored last (any of them).
//
// Numerics: fp32 accumulation (fp64 for fp64 input), 64-bit offsets, no float atomics: every
// reduction has a fixed order, so two runs are bitwise equal.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <mutex>

#include "cuda/common.cuh"

namespace cg = cooperative_groups;

namespace fusedloss {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Bad-target mailbox (see the comment at the top).

namespace {
volatile long long* g_mailbox_host = nullptr;
long long* g_mailbox_dev = nullptr;
std::once_flag g_mailbox_once;
}  // namespace

long long* bad_target_mailbox() {
  std::call_once(g_mailbox_once, [] {
    void* host = nullptr;
    // Portable: usable from every device's context; Mapped: the kernels write it directly.
    C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(long long),
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    *static_cast<volatile long long*>(host) = kNoBadTarget;
    void* dev = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
    g_mailbox_dev = static_cast<long long*>(dev);
    g_mailbox_host = static_cast<volatile long long*>(host);
  });
  return g_mailbox_dev;
}

void raise_pending_bad_target() {
  volatile long long* box = g_mailbox_host;
  if (box == nullptr || *box == kNoBadTarget) return;
  long long v = __atomic_exchange_n(const_cast<long long*>(box), kNoBadTarget, __ATOMIC_SEQ_CST);
  if (v == kNoBadTarget) return;
  TORCH_CHECK_INDEX(false, "Target ", v,
                    " is out of bounds. (Found by an earlier fusedloss CUDA kernel; its loss and "
                    "gradient rows for that target were set to NaN.)");
}

namespace {

// ---------------------------------------------------------------------------------------------
// Tuning constants. None was measured (the writing session had no GPU); each states what it
// assumes about an H100/H200 (sm_90: 228 KiB shared memory per SM, up to 227 KiB per block,
// 2048 threads per SM, clusters of up to 8 blocks portable).

// Warp rows for rows of at most this many 16-byte chunks (4 per lane): enough independent
// loads per lane to cover latency with 8 warps per block, and no block barriers at all.
constexpr int64_t kWarpRowMaxChunks = 4 * kWarp;
constexpr int kWarpRowBlock = 256;  // 8 rows per block
constexpr int kWarpRowsPerBlock = kWarpRowBlock / kWarp;
// Block rows: aim at ~4 chunks (64 bytes) in flight per thread, between 64 and 512 threads.
// 512 threads x 4 chunks = 32 KiB of a row in flight per block.
constexpr int kChunksPerThread = 4;
constexpr int kMinBlock = 64;
constexpr int kMaxBlock = 512;
// Shared memory staged per block when choosing the cluster size: 64 KiB leaves room for 3
// blocks per SM, so one block's loads overlap another's reduction and gradient writes.
constexpr int64_t kCtaStageBytes = 64 * 1024;
constexpr int kMaxCluster = 8;  // portable cluster size limit on sm_90
// Rows handled by one launch's grid before the blocks loop (keeps gridDim.x < 2^31).
constexpr int64_t kMaxGridRows = int64_t(1) << 24;

template <typename A>
struct RowStats {
  A m;         // max of z over the elements seen (NaNs skipped here; they poison s)
  A s;         // sum of exp(z - shift(m))
  A am;        // argmax value (NaN wins, as in torch.argmax)
  int64_t ai;  // argmax index (lowest on ties)
  A sw;        // sum w_c                   (label smoothing)
  A swz;       // sum w_c (z_c - ref)       (label smoothing)
  A swy;       // sum w_c y'_c = S          (probability targets)
  A swyz;      // sum w_c y'_c (z_c - ref)  (probability targets)
};

template <typename A>
__device__ __forceinline__ RowStats<A> empty_stats() {
  const A ninf = -std::numeric_limits<A>::infinity();
  return {ninf, A(0), ninf, std::numeric_limits<int64_t>::max(), A(0), A(0), A(0), A(0)};
}

// exp(z - shift) is computed against shift(m) = m when m is finite, else 0: a row of -inf gives
// s = 0 and lse = -inf (as torch.logsumexp) instead of exp(-inf - -inf) = NaN.
template <typename A>
__device__ __forceinline__ A shift_of(A m) {
  return isfinite(m) ? m : A(0);
}

// s (taken against shift(m_old)) re-expressed against `sh`. s == 0 stays 0 even when the
// factor would overflow; NaN stays NaN.
template <typename A>
__device__ __forceinline__ A rescale(A s, A m_old, A sh) {
  return s == A(0) ? A(0) : s * acc_exp(shift_of(m_old) - sh);
}

// Is (v2, i2) a better argmax than (v1, i1)? NaN beats numbers, then larger, then lower index.
template <typename A>
__device__ __forceinline__ bool argmax_better(A v1, int64_t i1, A v2, int64_t i2) {
  const bool n1 = isnan(v1), n2 = isnan(v2);
  if (n1 || n2) return n2 && (!n1 || i2 < i1);
  return v2 > v1 || (v2 == v1 && i2 < i1);
}

template <typename A>
__device__ __forceinline__ void combine(RowStats<A>& a, const RowStats<A>& b) {
  const A m = fmax(a.m, b.m);
  const A sh = shift_of(m);
  a.s = rescale(a.s, a.m, sh) + rescale(b.s, b.m, sh);
  a.m = m;
  if (argmax_better(a.am, a.ai, b.am, b.ai)) {
    a.am = b.am;
    a.ai = b.ai;
  }
  a.sw += b.sw;
  a.swz += b.swz;
  a.swy += b.swy;
  a.swyz += b.swyz;
}

template <typename A>
__device__ __forceinline__ RowStats<A> shfl_xor(const RowStats<A>& a, int o) {
  RowStats<A> b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
  b.am = __shfl_xor_sync(0xffffffffu, a.am, o);
  b.ai = __shfl_xor_sync(0xffffffffu, a.ai, o);
  b.sw = __shfl_xor_sync(0xffffffffu, a.sw, o);
  b.swz = __shfl_xor_sync(0xffffffffu, a.swz, o);
  b.swy = __shfl_xor_sync(0xffffffffu, a.swy, o);
  b.swyz = __shfl_xor_sync(0xffffffffu, a.swyz, o);
  return b;
}

// Butterfly reduction: every lane ends with the same total, combined in the same order.
template <typename A>
__device__ __forceinline__ void warp_reduce(RowStats<A>& st) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    RowStats<A> other = shfl_xor(st, o);
    // Combine in lane order (lower lane first) so both partners compute the same value.
    if (threadIdx.x & o) {
      combine(other, st);
      st = other;
    } else {
      combine(st, other);
    }
  }
}

struct CeArgs {
  const void* x;  // logits (R, C), row stride ldx
  int64_t ldx;
  void* grad;  // gradient (R, C), row stride ldg; nullptr: no gradient
  int64_t ldg;
  const int64_t* target;  // class indices (R,), or nullptr
  const void* ytarget;    // probability targets (R, C), row stride ldy, or nullptr
  int64_t ldy;
  const void* weight;        // (C,) or nullptr
  const void* grad_scale;    // forward: 0-dim scale in the accumulation type, nullptr means 1
  const void* row_scale;     // backward: grad_loss (R,) in the accumulation type, stride rs
  int64_t rs;
  // loss / lse / saved_lse are in the accumulation type (fp64 for fp64 logits; docs/OPS.md)
  const void* saved_lse;     // backward: lse from the forward
  void* loss;                // (R,) or nullptr
  void* lse;                 // (R,) or nullptr
  int64_t* pred;             // (R,) or nullptr
  float* conf;               // (R,) or nullptr
  int64_t R, C;
  int64_t ignore_index;
  double eps, zsq, softcap;  // label_smoothing, lse_square_scale, softcap (0: off)
  int64_t cta_chunks;        // 16-byte chunks of a row per block (see common.cuh: chunks)
  int cluster;               // blocks per row (1: no cluster)
  bool stage;                // keep chunks in shared memory between the passes
  long long* mailbox;
};

// One row group: a warp (kWarpRow) or a block (+ cluster). See the top of the file.
// Launch bounds (65536 registers per SM): block rows 2 x 512 threads resident per SM (<= 64
// registers); warp rows 3 x 256 threads (<= 85 registers: at 64 the bf16 variant spilled 56
// bytes, fp64 184). ptxas for sm_90 (nvcc 13.0) reports at most 8 spilled bytes for bf16/fp16
// (block rows), none for fp32, 16-48 for fp64. Either way
// 768-1024 threads x 2 prefetched 16-byte loads keep >= 24 KiB per SM in flight.
template <typename T, bool kWarpRow>
__global__ void __launch_bounds__(kWarpRow ? kWarpRowBlock : kMaxBlock, kWarpRow ? 3 : 2)
    ce_kernel(const CeArgs a) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  using P = Pack<T, V>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ RowStats<A> red[kWarp];  // per-warp partials (block rows)
  __shared__ RowStats<A> cta_total;   // this block's total, read by the cluster
  __shared__ RowStats<A> row_total;   // the whole row's total

  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int gtid = kWarpRow ? lane : threadIdx.x;
  const int gthreads = kWarpRow ? kWarp : blockDim.x;
  const int rank = kWarpRow ? 0 : static_cast<int>(blockIdx.x % a.cluster);
  const int64_t C = a.C;
  P* stage_buf = reinterpret_cast<P*>(smem_raw) +
                 (kWarpRow ? static_cast<int64_t>(warp) * a.cta_chunks : 0);

  const bool has_cls = a.target != nullptr;
  const bool has_prob = a.ytarget != nullptr;
  const bool want_loss = a.loss != nullptr;
  const bool decode = a.pred != nullptr;
  const bool want_grad = a.grad != nullptr;
  const A eps = static_cast<A>(a.eps);
  const A eps_c = C > 0 ? static_cast<A>(a.eps / static_cast<double>(C)) : A(0);
  const A zsq = static_cast<A>(a.zsq);
  const bool capped = a.softcap > 0;
  const A cap = static_cast<A>(a.softcap);
  const A inv_cap = capped ? static_cast<A>(1.0 / a.softcap) : A(0);
  const bool smooth = has_cls && a.eps > 0;
  const bool need_w = a.weight != nullptr && (smooth || has_prob);
  const bool need_ref = smooth || (has_prob && want_loss);
  const T* W = static_cast<const T*>(a.weight);
  const A g_fwd = a.grad_scale != nullptr ? *static_cast<const A*>(a.grad_scale) : A(1);
  auto zof = [&](A x) { return capped ? cap * acc_tanh(x * inv_cap) : x; };

  const int64_t groups_per_grid =
      kWarpRow ? static_cast<int64_t>(gridDim.x) * kWarpRowsPerBlock : gridDim.x / a.cluster;
  int64_t row = kWarpRow ? static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + warp
                         : blockIdx.x / a.cluster;
  for (; row < a.R; row += groups_per_grid) {
    const T* xrow = static_cast<const T*>(a.x) + row * a.ldx;
    const T* yrow = has_prob ? static_cast<const T*>(a.ytarget) + row * a.ldy : nullptr;
    T* grow = want_grad ? static_cast<T*>(a.grad) + row * a.ldg : nullptr;
    // This block's chunks of the row: [j0, j1) (common.cuh: chunk j starts at column j*V - phase).
    const int phase = row_phase(xrow, sizeof(T), V);
    const int64_t j0 = rank * a.cta_chunks;
    const int64_t j1 = min((C + phase + V - 1) / V, j0 + a.cta_chunks);
    const bool fy = has_prob && chunk_aligned<T, V>(yrow, phase);
    const bool fg = want_grad && chunk_aligned<T, V>(grow, phase);
    const bool fw = need_w && chunk_aligned<T, V>(W, phase);

    // Per-row target facts (every thread: the loads are warp broadcasts).
    int64_t t = -1;
    bool ignored = false, bad = false;
    if (has_cls) {
      t = a.target[row];
      ignored = t == a.ignore_index;
      bad = !ignored && (t < 0 || t >= C);
    }
    const bool valid_cls = has_cls && !ignored && !bad;
    // z of the target (for the loss) and the reference logit, read before any gradient of this
    // row is written (in-place: another block of the cluster may overwrite them after the
    // cluster barrier).
    A z_t = A(0);
    if (valid_cls && want_loss && gtid == 0 && rank == 0) z_t = zof(static_cast<A>(xrow[t]));
    const A ref = need_ref ? zof(static_cast<A>(xrow[0])) : A(0);
    if (bad && gtid == 0 && rank == 0 && a.mailbox != nullptr) {
      *reinterpret_cast<volatile long long*>(a.mailbox) = static_cast<long long>(t);
      __threadfence_system();
    }

    // Pass 1: statistics (and staging). The next chunk's load is issued before the current one
    // is processed (one 16-byte register prefetch), so each thread has two loads in flight.
    RowStats<A> st = empty_stats<A>();
    auto load_x = [&](int64_t jj) {
      const int64_t c = jj * V - phase;
      return load_pack<T, V>(xrow + c, true, static_cast<int>(max(static_cast<int64_t>(0), -c)),
                             static_cast<int>(min(static_cast<int64_t>(V), C - c)));
    };
    P next;
    if (j0 + gtid < j1) next = load_x(j0 + gtid);
    for (int64_t j = j0 + gtid; j < j1; j += gthreads) {
      const int64_t col = j * V - phase;  // column of the chunk's element 0 (may be < 0)
      const int lo = static_cast<int>(max(static_cast<int64_t>(0), -col));
      const int hi = static_cast<int>(min(static_cast<int64_t>(V), C - col));
      const P px = next;
      if (j + gthreads < j1) next = load_x(j + gthreads);
      if (a.stage) stage_buf[j - j0] = px;
      A z[V];
      A cm = -std::numeric_limits<A>::infinity();
#pragma unroll
      for (int k = 0; k < V; ++k) {
        z[k] = zof(static_cast<A>(px.v[k]));
        if (k >= lo && k < hi) cm = fmax(cm, z[k]);
      }
      const A m = fmax(st.m, cm);
      const A sh = shift_of(m);
      A add = A(0);
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (k >= lo && k < hi) add += acc_exp(z[k] - sh);
      st.s = rescale(st.s, st.m, sh) + add;
      st.m = m;
      if (decode) {
#pragma unroll
        for (int k = 0; k < V; ++k)
          if (k >= lo && k < hi && argmax_better(st.am, st.ai, z[k], col + k)) {
            st.am = z[k];
            st.ai = col + k;
          }
      }
      if (smooth || has_prob) {
        A w[V];
        if (need_w) {
          const P pw = load_pack<T, V>(W + col, fw, lo, hi);  // zero outside [lo, hi)
#pragma unroll
          for (int k = 0; k < V; ++k) w[k] = static_cast<A>(pw.v[k]);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) w[k] = (k >= lo && k < hi) ? A(1) : A(0);
        }
        if (smooth) {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            st.sw += w[k];
            st.swz += w[k] * (k >= lo && k < hi ? z[k] - ref : A(0));
          }
        } else {
          const P py = load_pack<T, V>(yrow + col, fy, lo, hi);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            // w[k] is 0 outside the row, so padding adds nothing.
            const A wy = w[k] * ((A(1) - eps) * static_cast<A>(py.v[k]) + eps_c);
            st.swy += wy;
            st.swyz += wy * (k >= lo && k < hi ? z[k] - ref : A(0));
          }
        }
      }
    }

    // Reduce over the row group; every thread gets the row's total.
    warp_reduce(st);
    if constexpr (kWarpRow) {
      __syncwarp();  // in-place: all lanes' reads of the row precede any gradient write
    } else {
      const int nwarps = blockDim.x / kWarp;
      if (lane == 0) red[warp] = st;
      __syncthreads();
      if (warp == 0) {
        st = lane < nwarps ? red[lane] : empty_stats<A>();
        warp_reduce(st);
        if (lane == 0) cta_total = st;
      }
      if (a.cluster > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();  // every block's cta_total is written
        if (threadIdx.x == 0) {
          RowStats<A> tot = *cluster.map_shared_rank(&cta_total, 0);
          for (int r = 1; r < a.cluster; ++r) combine(tot, *cluster.map_shared_rank(&cta_total, r));
          row_total = tot;
        }
#else
        __trap();  // the launcher uses clusters only on sm_90+
#endif
      } else if (threadIdx.x == 0) {
        row_total = cta_total;
      }
      __syncthreads();
      st = row_total;
    }

    const A lse_fwd = shift_of(st.m) + acc_log(st.s);
    const A lse = a.saved_lse != nullptr ? static_cast<const A*>(a.saved_lse)[row] : lse_fwd;
    const A Wsum = a.weight != nullptr ? st.sw : static_cast<A>(C);
    const A w_t = valid_cls ? (a.weight != nullptr ? static_cast<A>(W[t]) : A(1)) : A(0);
    const A wt1 = (A(1) - eps) * w_t;

    if (gtid == 0 && rank == 0) {
      if (a.lse != nullptr) static_cast<A*>(a.lse)[row] = lse_fwd;
      if (decode) {
        a.pred[row] = st.ai;
        a.conf[row] = static_cast<float>(acc_exp(st.am - lse_fwd));
      }
      if (want_loss) {
        A l;
        if (has_prob) {
          l = st.swy * (lse_fwd - ref) - st.swyz + zsq * lse_fwd * lse_fwd;
        } else if (ignored) {
          l = A(0);
        } else if (bad) {
          l = quiet_nan<A>();
        } else {
          l = wt1 * (lse_fwd - z_t) + zsq * lse_fwd * lse_fwd;
          if (smooth) l += eps_c * (Wsum * (lse_fwd - ref) - st.swz);
        }
        static_cast<A*>(a.loss)[row] = l;
      }
    }

    // Pass 2: gradient. dz_c = p_c * coef - (per-class term); see docs/OPS.md:
    //   class index: coef = (1-eps) w_t + (eps/C) W + 2 s lse,
    //                term  = (1-eps) w_t [c == t] + (eps/C) w_c
    //   probability: coef = S + 2 s lse,  term = w_c y'_c,  y' = (1-eps) y + eps/C
    // then dx = dz * (1 - (z/cap)^2) with softcap, times the scale g.
    if (want_grad) {
      const A g = a.row_scale != nullptr ? static_cast<const A*>(a.row_scale)[row * a.rs] : g_fwd;
      const A two_s_lse = A(2) * zsq * lse;
      const A coef = has_prob ? st.swy + two_s_lse : wt1 + eps_c * Wsum + two_s_lse;
      for (int64_t j = j0 + gtid; j < j1; j += gthreads) {
        const int64_t col = j * V - phase;
        const int lo = static_cast<int>(max(static_cast<int64_t>(0), -col));
        const int hi = static_cast<int>(min(static_cast<int64_t>(V), C - col));
        A out[V];
        if (ignored) {
#pragma unroll
          for (int k = 0; k < V; ++k) out[k] = A(0);
        } else if (bad) {
#pragma unroll
          for (int k = 0; k < V; ++k) out[k] = quiet_nan<A>();
        } else {
          const P px = a.stage ? stage_buf[j - j0] : load_pack<T, V>(xrow + col, true, lo, hi);
          A w[V];
          if (a.weight != nullptr && (smooth || has_prob)) {
            const P pw = load_pack<T, V>(W + col, fw, lo, hi);
#pragma unroll
            for (int k = 0; k < V; ++k) w[k] = static_cast<A>(pw.v[k]);
          } else {
#pragma unroll
            for (int k = 0; k < V; ++k) w[k] = A(1);
          }
          A term[V];
          if (has_prob) {
            const P py = load_pack<T, V>(yrow + col, fy, lo, hi);
#pragma unroll
            for (int k = 0; k < V; ++k)
              term[k] = w[k] * ((A(1) - eps) * static_cast<A>(py.v[k]) + eps_c);
          } else {
#pragma unroll
            for (int k = 0; k < V; ++k)
              term[k] = (smooth ? eps_c * w[k] : A(0)) + (col + k == t ? wt1 : A(0));
          }
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const A z = zof(static_cast<A>(px.v[k]));
            A dz = acc_exp(z - lse) * coef - term[k];
            if (capped) {
              const A r = z * inv_cap;
              dz *= A(1) - r * r;
            }
            out[k] = g * dz;
          }
        }
        store_pack<T, V>(grow + col, fg, lo, hi, out);
      }
    }

    // The next row reuses red/cta_total/row_total; with a cluster, the other blocks may still
    // be reading this block's cta_total, and a block's shared memory must outlive those reads.
    if constexpr (!kWarpRow) {
      if (a.cluster > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        cg::this_cluster().sync();
#endif
      } else {
        __syncthreads();
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launcher.

struct Layout {
  bool warp_rows;
  int threads;
  int cluster;
  bool stage;
  int64_t cta_chunks;
  size_t smem;
};

int max_smem_optin(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return v;
}

int block_threads_for(int64_t chunks) {
  int64_t want = (chunks + kChunksPerThread - 1) / kChunksPerThread;
  int t = kMinBlock;
  while (t < kMaxBlock && t < want) t *= 2;
  return t;
}

template <typename T>
bool cluster_schedulable(int device, int n, size_t smem);

template <typename T>
Layout choose_layout(int64_t C, bool want_grad, int device) {
  const int64_t chunks = max_row_chunks<T>(C);
  const int64_t chunk_bytes = 16;
  if (chunks <= kWarpRowMaxChunks) {
    return {true, kWarpRowBlock, 1, want_grad, chunks,
            want_grad ? static_cast<size_t>(kWarpRowsPerBlock * chunks * chunk_bytes) : 0};
  }
  if (!want_grad) {  // one pass: nothing to keep
    return {false, block_threads_for(chunks), 1, false, chunks, 0};
  }
  // Static shared memory of ce_kernel (red, cta_total, row_total) is < 2.2 KiB (ptxas, fp64);
  // keep 4 KiB free so staging + static always fits under the opt-in limit set above.
  const int64_t optin = max_smem_optin(device) - 4096;
  int prop_major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&prop_major, cudaDevAttrComputeCapabilityMajor, device));
  const int max_cluster = prop_major >= 9 ? kMaxCluster : 1;
  for (int pass = 0; pass < 2; ++pass) {
    // pass 0: slices of <= kCtaStageBytes (3 blocks per SM) plus the one chunk a row that does
    // not start 16-byte aligned needs (so 32k bf16 / 256k bf16 rows still take 1 / 8 blocks);
    // pass 1: up to the opt-in maximum (one block per SM).
    const int64_t limit = pass == 0 ? kCtaStageBytes + chunk_bytes : optin;
    for (int n = 1; n <= max_cluster; n *= 2) {
      const int64_t cta_chunks = (chunks + n - 1) / n;
      const int64_t bytes = cta_chunks * chunk_bytes;
      if (bytes > limit) continue;
      if (n > 1 && !cluster_schedulable<T>(device, n, static_cast<size_t>(bytes))) break;
      return {false, block_threads_for(cta_chunks), n, true, cta_chunks,
              static_cast<size_t>(bytes)};
    }
  }
  return {false, kMaxBlock, 1, false, chunks, 0};  // streaming fallback
}

template <typename T, bool kWarpRow>
void set_smem_attr(int device, size_t smem) {
  // Raise the dynamic shared memory limit once per device to the opt-in maximum minus the
  // kernel's static shared memory (the sum may not exceed the opt-in limit).
  static std::atomic<bool> done[64];
  if (smem <= 48 * 1024 || (device < 64 && done[device].load())) return;
  cudaFuncAttributes fa;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, ce_kernel<T, kWarpRow>));
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      ce_kernel<T, kWarpRow>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      max_smem_optin(device) - static_cast<int>(fa.sharedSizeBytes)));
  if (device < 64) done[device].store(true);
}

template <typename T>
bool cluster_schedulable(int device, int n, size_t smem) {
  // Can at least one cluster of n blocks with the largest staging we would use be resident?
  // (Fails under some MIG/MPS partitions.) Cached per device and cluster size.
  static std::atomic<int> cache[64][4];  // 0 unknown, 1 yes, 2 no
  const int slot = n == 2 ? 0 : n == 4 ? 1 : 2;
  if (device < 64 && cache[device][slot].load() != 0) return cache[device][slot].load() == 1;
  (void)smem;
  set_smem_attr<T, false>(device, 64 * 1024);
  const size_t probe_smem = static_cast<size_t>(max_smem_optin(device) - 4096);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(n);
  cfg.blockDim = dim3(kMaxBlock);
  cfg.dynamicSmemBytes = probe_smem;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = n;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, ce_kernel<T, false>, &cfg);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error; treat as "not schedulable"
    clusters = 0;
  }
  if (device < 64) cache[device][slot].store(clusters > 0 ? 1 : 2);
  return clusters > 0;
}

template <typename T>
void launch_ce(CeArgs args, int device, bool want_grad) {
  if (args.R == 0 || args.C == 0) return;
  const Layout L = choose_layout<T>(args.C, want_grad, device);
  args.cluster = L.cluster;
  args.stage = L.stage;
  args.cta_chunks = L.cta_chunks;
  args.mailbox = args.target != nullptr ? bad_target_mailbox() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  if (L.warp_rows) {
    set_smem_attr<T, true>(device, L.smem);
    const int64_t blocks = std::min<int64_t>((args.R + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock,
                                             kMaxGridRows);
    ce_kernel<T, true><<<static_cast<unsigned>(blocks), L.threads, L.smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  set_smem_attr<T, false>(device, L.smem);
  const int64_t rows = std::min<int64_t>(args.R, kMaxGridRows);
  if (L.cluster == 1) {
    ce_kernel<T, false><<<static_cast<unsigned>(rows), L.threads, L.smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(rows * L.cluster));
  cfg.blockDim = dim3(L.threads);
  cfg.dynamicSmemBytes = L.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = L.cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, ce_kernel<T, false>, args));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Ops.

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.is_cuda(), name, ": expected a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, name, ": expected a 2-D (rows, classes) tensor, got ",
              logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, name,
              ": expected unit column stride, got stride ", logits.strides());
}

void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), name, " is on ", t.device(), " but logits are on ",
              logits.device());
}

int64_t ld_of(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// Fills the target/weight/scale fields shared by the forward, in-place and backward ops.
CeArgs base_args(const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                 double zsq, double softcap) {
  check_logits(logits, "logits");
  check_same_device(target, logits, "target");
  CeArgs a = {};
  a.x = logits.data_ptr();
  a.ldx = ld_of(logits);
  a.R = logits.size(0);
  a.C = logits.size(1);
  a.ignore_index = ignore_index;
  a.eps = eps;
  a.zsq = zsq;
  a.softcap = softcap;
  if (target.dim() == 2) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "target: probability targets must have shape ",
                logits.sizes(), ", got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == logits.scalar_type(), "target: expected dtype ",
                logits.scalar_type(), ", got ", target.scalar_type());
    TORCH_CHECK(target.size(1) <= 1 || target.stride(1) == 1,
                "target: expected unit column stride, got strides ", target.strides());
    a.ytarget = target.data_ptr();
    a.ldy = ld_of(target);
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == a.R, "target: expected shape (", a.R,
                ",), got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == at::kLong, "target: expected int64 class indices, got ",
                target.scalar_type());
    TORCH_CHECK(target.is_contiguous(), "target: expected a contiguous tensor");
    a.target = target.data_ptr<int64_t>();
  }
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    check_same_device(w, logits, "weight");
    TORCH_CHECK(w.dim() == 1 && w.size(0) == a.C && w.is_contiguous(),
                "weight: expected a contiguous (", a.C, ",) tensor, got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == logits.scalar_type(), "weight: expected dtype ",
                logits.scalar_type(), ", got ", w.scalar_type());
    a.weight = w.data_ptr();
  }
  TORCH_CHECK(softcap >= 0, "softcap: expected >= 0, got ", softcap);
  return a;
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// grad_scale as a 0-dim tensor of the accumulation type; `holder` keeps a converted copy alive
// (`.to` is a no-op when the dtype already matches, the usual case).
const void* scale_ptr(const std::optional<at::Tensor>& grad_scale, const at::Tensor& logits,
                      at::Tensor& holder) {
  if (!grad_scale.has_value()) return nullptr;
  const at::Tensor& g = *grad_scale;
  check_same_device(g, logits, "grad_scale");
  TORCH_CHECK(g.numel() == 1 && at::isFloatingType(g.scalar_type()),
              "grad_scale: expected a 0-dim floating tensor, got ", g.scalar_type(), " of shape ",
              g.sizes());
  holder = g.to(acc_dtype(logits));
  return holder.data_ptr();
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce_fwd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool compute_grad, bool decode) {
  raise_pending_bad_target();
  c10::cuda::CUDAGuard guard(logits.device());
  CeArgs a = base_args(logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
                       softcap);
  const auto f32 = logits.options().dtype(at::kFloat);
  const auto acc = logits.options().dtype(acc_dtype(logits));
  at::Tensor loss = at::empty({a.R}, acc);
  at::Tensor lse = at::empty({a.R}, acc);
  at::Tensor grad = compute_grad ? at::empty({a.R, a.C}, logits.options())
                                 : at::empty({0}, logits.options());
  at::Tensor pred = decode ? at::empty({a.R}, logits.options().dtype(at::kLong))
                           : at::empty({0}, logits.options().dtype(at::kLong));
  at::Tensor conf = decode ? at::empty({a.R}, f32) : at::empty({0}, f32);
  if (a.C == 0) {  // no classes: nothing to read (see docs/OPS.md: outputs are zero)
    loss.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    if (decode) {
      pred.zero_();
      conf.zero_();
    }
  }
  at::Tensor scale_holder;
  a.grad_scale = compute_grad ? scale_ptr(grad_scale, logits, scale_holder) : nullptr;
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr();
  if (compute_grad) {
    a.grad = grad.data_ptr();
    a.ldg = a.C;
  }
  if (decode) {
    a.pred = pred.data_ptr<int64_t>();
    a.conf = conf.data_ptr<float>();
  }
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), "softmax_ce_fwd", [&] {
    using T = scalar_t;
    launch_ce<T>(a, logits.get_device(), compute_grad);
  });
  return {loss, lse, grad, pred, conf};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce_fwd_inplace(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool decode) {
  raise_pending_bad_target();
  c10::cuda::CUDAGuard guard(logits.device());
  CeArgs a = base_args(logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
                       softcap);
  const auto f32 = logits.options().dtype(at::kFloat);
  const auto acc = logits.options().dtype(acc_dtype(logits));
  at::Tensor loss = at::empty({a.R}, acc);
  at::Tensor lse = at::empty({a.R}, acc);
  at::Tensor pred = decode ? at::empty({a.R}, logits.options().dtype(at::kLong))
                           : at::empty({0}, logits.options().dtype(at::kLong));
  at::Tensor conf = decode ? at::empty({a.R}, f32) : at::empty({0}, f32);
  if (a.C == 0) {
    loss.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    if (decode) {
      pred.zero_();
      conf.zero_();
    }
  }
  at::Tensor scale_holder;
  a.grad_scale = scale_ptr(grad_scale, logits, scale_holder);
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr();
  a.grad = logits.data_ptr();  // each element is read (into shared memory) before it is written
  a.ldg = a.ldx;
  if (decode) {
    a.pred = pred.data_ptr<int64_t>();
    a.conf = conf.data_ptr<float>();
  }
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), "softmax_ce_fwd_inplace", [&] {
    using T = scalar_t;
    launch_ce<T>(a, logits.get_device(), true);
  });
  return {loss, lse, pred, conf};
}

at::Tensor softmax_ce_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                          const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          int64_t ignore_index, double label_smoothing,
                          double lse_square_scale, double softcap) {
  raise_pending_bad_target();
  c10::cuda::CUDAGuard guard(logits.device());
  CeArgs a = base_args(logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
                       softcap);
  check_same_device(grad_loss, logits, "grad_loss");
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == a.R, "grad_loss: expected shape (",
              a.R, ",), got ", grad_loss.sizes());
  at::Tensor grad = at::empty({a.R, a.C}, logits.options());
  if (a.R == 0 || a.C == 0) return grad;
  // grad_loss in the accumulation type (a no-op for fp32 logits with fp32 grad_loss); a stride-0
  // (expanded) grad_loss keeps stride 0.
  const auto acc = acc_dtype(logits);
  at::Tensor gl = grad_loss.scalar_type() == acc ? grad_loss : grad_loss.to(acc);
  a.row_scale = gl.data_ptr();
  a.rs = gl.stride(0);
  a.saved_lse = nullptr;  // the kernel recomputes the row statistics (pass 1)
  a.grad = grad.data_ptr();
  a.ldg = a.C;
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), "softmax_ce_bwd", [&] {
    using T = scalar_t;
    launch_ce<T>(a, logits.get_device(), true);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> softmax_decode(const at::Tensor& logits, double softcap) {
  raise_pending_bad_target();
  c10::cuda::CUDAGuard guard(logits.device());
  check_logits(logits, "logits");
  TORCH_CHECK(softcap >= 0, "softcap: expected >= 0, got ", softcap);
  const int64_t R = logits.size(0), C = logits.size(1);
  at::Tensor pred = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor conf = at::empty({R}, logits.options().dtype(at::kFloat));
  if (C == 0) {
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
  FUSEDLOSS_DISPATCH_FLOAT(logits.scalar_type(), "softmax_decode", [&] {
    using T = scalar_t;
    launch_ce<T>(a, logits.get_device(), false);
  });
  return {pred, conf};
}

void raise_pending_error() { raise_pending_bad_target(); }

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("softmax_ce_fwd", &softmax_ce_fwd);
  m.impl("softmax_ce_fwd_inplace", &softmax_ce_fwd_inplace);
  m.impl("softmax_ce_bwd", &softmax_ce_bwd);
  m.impl("softmax_decode", &softmax_decode);
}

// CUDA-only helper op (its own namespace: csrc/ops.cpp holds the backend-neutral contract).
// raise_pending_error(): raise the IndexError recorded by an earlier kernel, if any (see the top
// of this file). Synchronise first to be sure every launched kernel has reported.
TORCH_LIBRARY(fusedloss_cuda, m) { m.def("raise_pending_error() -> ()", &raise_pending_error); }

}  // namespace cuda
}  // namespace fusedloss
