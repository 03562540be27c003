// The softmax cross-entropy kernel, `ce_kernel`, serving softmax_ce_fwd, softmax_ce_fwd_inplace,
// softmax_ce_bwd and softmax_decode; what it computes is chosen by which pointers in CeArgs are
// set. Per row it runs four named steps: ce_row_setup (target facts), ce_pass1 (statistics and
// staging), ce_reduce_row (over the warp / block / cluster), then ce_row_outputs (loss, lse,
// decoding) and ce_gradient_pass.
//
// DATA MOVEMENT. Forward+gradient must read the logits once and write the gradient once. The
// row's statistics (max, sum of exp, argmax, weighted sums) are needed before the first gradient
// element can be written, so the row is kept on chip between the two passes:
//   pass 1 reads each 16-byte chunk of the row from global memory, keeps it in shared memory
//          ("staging") and folds it into per-thread statistics (online max/sum-exp);
//   reduce the statistics over the row group (a warp, a block, or a cluster of blocks);
//   pass 2 re-reads each chunk from shared memory (the thread reads back exactly the chunks it
//          wrote, so no barrier is needed for the data itself) and writes the gradient.
// Row layouts (picked by choose_layout in ce_launch.cuh from the row size in 16-byte chunks):
//   - warp rows: rows of <= kWarpRowMaxChunks chunks (bf16 C <= 1024, fp32 C <= 512); one warp per
//     row, 8 rows per 256-thread block, shuffles only. Small-vocabulary classifiers.
//   - block rows: one block (64..512 threads) per row, the row staged in its shared memory.
//   - cluster rows (thread-block clusters, sm_90+ only): the row is split into 2/4/8 contiguous
//     slices, one block per slice, each slice staged in its own block's shared memory; the
//     blocks exchange their partial statistics through distributed shared memory (one 64-byte
//     record per block), so no logit leaves the chip twice. A 256k bf16 row is 512 KiB =
//     8 x 64 KiB slices.
//   - streaming (fallback): rows too large for the staging available (on GPUs without clusters:
//     rows over one block's shared memory, e.g. bf16 rows over ~80k classes on an A100; on sm_90:
//     fp64 rows over ~220k classes, or clusters not schedulable under MIG/MPS), or no gradient
//     wanted. One block per row, no staging; with a gradient, pass 2 reads the row a second time
//     from global memory (from L2 when the row is still resident there, else from HBM).
//
// Numerics: fp32 accumulation (fp64 for fp64 input), 64-bit offsets, no float atomics: every
// reduction has a fixed order, so two runs are bitwise equal. The gradient uses
// p = exp(z - m) * (1 / s) (never exp(z - lse): a rounded lse would put its absolute error into
// every p), and softmax_ce_bwd runs this same kernel, so its recomputed gradient is bitwise
// equal to the forward's fused gradient for the same scale.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>
#include <limits>

#include "cuda/ce_row.cuh"
#include "cuda/ce_stats.cuh"
#include "cuda/common.cuh"

namespace fusedloss {
namespace cuda {

// Fold one chunk's z into the online max / sum-exp and the argmax.
template <typename A, int V>
__device__ __forceinline__ void fold_chunk(RowStats<A>& st, const A (&z)[V], const ChunkSpan& c,
                                           bool decode) {
  A cm = -std::numeric_limits<A>::infinity();
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (i >= c.lo && i < c.hi) cm = fmax(cm, z[i]);
  const A m = fmax(st.m, cm);
  const A sh = shift_of(m);
  A add = A(0);
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (i >= c.lo && i < c.hi) add += acc_exp(z[i] - sh);
  st.s = rescale(st.s, st.m, sh) + add;
  st.m = m;
  if (decode) {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i >= c.lo && i < c.hi && argmax_better(st.am, st.ai, z[i], c.col + i)) {
        st.am = z[i];
        st.ai = c.col + i;
      }
  }
}

// Pass 1: this thread's statistics over its chunks of the row (and staging). The next chunk's
// load is issued before the current one is processed, so each thread has two loads in flight.
template <typename T, typename A>
__device__ __forceinline__ RowStats<A> ce_pass1(const CeArgs& a, const CeConst<A>& k,
                                               const RowGroup& grp, const CeRow<T, A>& r,
                                               Pack<T, kVec<T>>* stage_buf) {
  constexpr int V = kVec<T>;
  using P = Pack<T, V>;
  RowStats<A> st = empty_stats<A>();
  auto load_x = [&](int64_t jj) {
    const ChunkSpan c = chunk_span<V>(jj, r.phase, a.C);
    return load_pack<T, V>(r.x + c.col, true, c.lo, c.hi);
  };
  P next;
  if (r.j0 + grp.gtid < r.j1) next = load_x(r.j0 + grp.gtid);
  for (int64_t j = r.j0 + grp.gtid; j < r.j1; j += grp.gthreads) {
    const ChunkSpan c = chunk_span<V>(j, r.phase, a.C);
    const P px = next;
    if (j + grp.gthreads < r.j1) next = load_x(j + grp.gthreads);
    if (a.stage) stage_buf[j - r.j0] = px;
    A z[V];
#pragma unroll
    for (int i = 0; i < V; ++i) z[i] = softcap_z(k, static_cast<A>(px.v[i]));
    fold_chunk<A, V>(st, z, c, k.decode);
    if (!k.smooth && !k.has_prob) continue;
    A w[V];
    if (k.need_w) {
      load_weights<A, V>(a, r.fw, c, w);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) w[i] = (i >= c.lo && i < c.hi) ? A(1) : A(0);
    }
    if (k.smooth) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        st.sw += w[i];
        st.swz += w[i] * (i >= c.lo && i < c.hi ? z[i] - r.ref : A(0));
      }
    } else {
      A wy[V];  // 0 outside the row (w is), so padding adds nothing
      load_wy<T, A, V>(a, k, r, c, w, wy);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        st.swy += wy[i];
        st.swyz += wy[i] * (i >= c.lo && i < c.hi ? z[i] - r.ref : A(0));
      }
    }
  }
  return st;
}

// Shared memory of the row reduction (block and cluster rows).
template <typename A>
struct CeShared {
  RowStats<A> red[kWarp];  // per-warp partials
  RowStats<A> cta_total;   // this block's total, read by the other blocks of the cluster
  RowStats<A> row_total;   // the whole row's total
};

// Reduce the statistics over the row group; every thread gets the row's total.
template <typename A, bool kWarpRow>
__device__ __forceinline__ RowStats<A> ce_reduce_row(const CeArgs& a, const RowGroup& grp,
                                                    RowStats<A> st, CeShared<A>& sh) {
  warp_reduce(st);
  if constexpr (kWarpRow) {
    __syncwarp();  // in place: all lanes' reads of the row precede any gradient write
    return st;
  } else {
    const int nwarps = blockDim.x / kWarp;
    if (grp.lane == 0) sh.red[grp.warp] = st;
    __syncthreads();
    if (grp.warp == 0) {
      st = grp.lane < nwarps ? sh.red[grp.lane] : empty_stats<A>();
      warp_reduce(st);
      if (grp.lane == 0) sh.cta_total = st;
    }
    if (a.cluster > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
      cluster.sync();  // every block's cta_total is written
      if (threadIdx.x == 0) {
        RowStats<A> tot = *cluster.map_shared_rank(&sh.cta_total, 0);
        for (int q = 1; q < a.cluster; ++q)
          combine(tot, *cluster.map_shared_rank(&sh.cta_total, q));
        sh.row_total = tot;
      }
#else
      __trap();  // the launcher uses clusters only on sm_90+
#endif
    } else if (threadIdx.x == 0) {
      sh.row_total = sh.cta_total;
    }
    __syncthreads();
    return sh.row_total;
  }
}

// The row's softmax normaliser: shift sh = m (0 when m is not finite), 1/s, lse = sh + log s.
template <typename A>
struct RowTotals {
  A sh, log_s, inv_s, lse;
  bool posinf;  // a +inf logit (only possible without softcap): loss and gradient are NaN
};

template <typename A>
__device__ __forceinline__ RowTotals<A> row_totals(const RowStats<A>& st) {
  RowTotals<A> t;
  t.sh = shift_of(st.m);
  t.log_s = acc_log(st.s);
  t.inv_s = A(1) / st.s;
  t.lse = t.sh + t.log_s;
  t.posinf = st.m == std::numeric_limits<A>::infinity();
  return t;
}

// lse, decoding and loss of the row (one thread). lse - z is formed as (sh - z) + log s, so a
// large common logit (|x| ~ 1e4) does not cancel.
template <typename T, typename A>
__device__ __forceinline__ void ce_row_outputs(const CeArgs& a, const CeConst<A>& k,
                                               const CeRow<T, A>& r, const RowStats<A>& st,
                                               const RowTotals<A>& tot, int64_t row) {
  if (a.lse != nullptr) static_cast<A*>(a.lse)[row] = tot.lse;
  if (k.decode) {
    a.pred[row] = st.ai;
    a.conf[row] = static_cast<float>(acc_exp(st.am - tot.sh) * tot.inv_s);
  }
  if (!k.want_loss) return;
  const A lse_ref = (tot.sh - r.ref) + tot.log_s;
  const A zloss = k.zsq != A(0) ? k.zsq * tot.lse * tot.lse : A(0);
  A l;
  if (k.has_prob) {
    l = tot.posinf ? quiet_nan<A>() : st.swy * lse_ref - st.swyz + zloss;
  } else if (r.ignored) {
    l = A(0);
  } else if (r.bad || tot.posinf) {
    l = quiet_nan<A>();
  } else {
    const A w_t = a.weight != nullptr ? static_cast<const A*>(a.weight)[r.t] : A(1);
    l = (A(1) - k.eps) * w_t * ((tot.sh - r.z_t) + tot.log_s) + zloss;
    if (k.smooth) {
      const A Wsum = a.weight != nullptr ? st.sw : static_cast<A>(a.C);
      l += k.eps_c * (isinf(Wsum) ? Wsum : Wsum * lse_ref - st.swz);  // inf W: no inf - inf
    }
  }
  static_cast<A*>(a.loss)[row] = l;
}

// Pass 2: gradient. dz_c = p_c * coef - term_c with p_c = exp(z_c - m) * (1/s):
//   class index: coef = (1-eps) w_t + (eps/C) W + 2 s lse,
//                term  = (1-eps) w_t [c == t] + (eps/C) w_c
//   probability: coef = S + 2 s lse,  term = w_c y'_c,  y' = (1-eps) y + eps/C
// then dx = dz * sech(x/cap)^2 (= 1 - (z/cap)^2) with softcap, times the scale g (forward:
// grad_scale; backward: grad_loss[row]). Ignored rows are exactly 0; bad-target and +inf rows
// are NaN.
template <typename T, typename A>
__device__ __forceinline__ void ce_gradient_pass(const CeArgs& a, const CeConst<A>& k,
                                                 const RowGroup& grp, const CeRow<T, A>& r,
                                                 const RowStats<A>& st, const RowTotals<A>& tot,
                                                 const Pack<T, kVec<T>>* stage_buf, int64_t row) {
  constexpr int V = kVec<T>;
  const A g = a.row_scale != nullptr ? static_cast<const A*>(a.row_scale)[row * a.rs] : k.g_fwd;
  const A two_s_lse = k.zsq != A(0) ? A(2) * k.zsq * tot.lse : A(0);
  const A w_t = r.valid ? (a.weight != nullptr ? static_cast<const A*>(a.weight)[r.t] : A(1))
                        : A(0);
  const A wt1 = (A(1) - k.eps) * w_t;
  const A Wsum = a.weight != nullptr ? st.sw : static_cast<A>(a.C);
  // no 0 * inf from an infinite class weight when eps = 0
  const A coef = k.has_prob ? st.swy + two_s_lse
                            : wt1 + (k.smooth ? k.eps_c * Wsum : A(0)) + two_s_lse;
  const bool row_nan = r.bad || tot.posinf;
  for (int64_t j = r.j0 + grp.gtid; j < r.j1; j += grp.gthreads) {
    const ChunkSpan c = chunk_span<V>(j, r.phase, a.C);
    A out[V];
    if (r.ignored || row_nan) {
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = r.ignored ? A(0) : quiet_nan<A>();
      store_pack<T, V>(r.g + c.col, r.fg, c.lo, c.hi, out);
      continue;
    }
    const Pack<T, V> px = a.stage ? stage_buf[j - r.j0] : load_pack<T, V>(r.x + c.col, true, c.lo,
                                                                           c.hi);
    A term[V];
    if (k.has_prob) {
      A w[V];
      load_weights<A, V>(a, r.fw, c, w);
      load_wy<T, A, V>(a, k, r, c, w, term);
    } else {
      A w[V];
      if (k.smooth) load_weights<A, V>(a, r.fw, c, w);
#pragma unroll
      for (int i = 0; i < V; ++i)
        term[i] = (k.smooth ? k.eps_c * w[i] : A(0)) + (c.col + i == r.t ? wt1 : A(0));
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A x = static_cast<A>(px.v[i]);
      const A z = softcap_z(k, x);
      A dz = acc_exp(z - tot.sh) * tot.inv_s * coef - term[i];
      if (k.capped) dz *= softcap_dzdx(k, x);
      out[i] = g * dz;
    }
    store_pack<T, V>(r.g + c.col, r.fg, c.lo, c.hi, out);
  }
}

// The next row reuses the CeShared records; with a cluster, the other blocks may still be
// reading this block's cta_total, and a block's shared memory must outlive those reads.
template <bool kWarpRow>
__device__ __forceinline__ void ce_row_barrier(const CeArgs& a) {
  if constexpr (!kWarpRow) {
    if (a.cluster > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      cooperative_groups::this_cluster().sync();
#endif
    } else {
      __syncthreads();
    }
  }
}

// One row group per row: a warp (kWarpRow) or a block (+ cluster); the grid loops over rows.
// Launch bounds (65536 registers per SM): block rows 2 x 512 threads resident per SM (<= 64
// registers); warp rows 3 x 256 threads (<= 85 registers: at 64 the bf16 variant spilled 56
// bytes, fp64 184). ptxas for sm_90 (nvcc 13.0, -Xptxas -v): block rows 60-64 registers with
// 0 (fp32) / 32 (bf16, fp16) / 54 (fp64) bytes of spill stores; warp rows 74-80 registers with
// 0 / 12 / 74 bytes. Either way 768-1024 threads x 2 prefetched 16-byte loads keep >= 24 KiB per
// SM in flight.
template <typename T, bool kWarpRow>
__global__ void __launch_bounds__(kWarpRow ? kWarpRowBlock : kMaxBlock, kWarpRow ? 3 : 2)
    ce_kernel(const CeArgs a) {
  using A = acc_t<T>;
  using P = Pack<T, kVec<T>>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ CeShared<A> sh;
  const CeConst<A> k = ce_const<A>(a);
  const RowGroup grp = row_group<kWarpRow>(a);
  P* stage_buf = reinterpret_cast<P*>(smem_raw) +
                 (kWarpRow ? static_cast<int64_t>(grp.warp) * a.cta_chunks : 0);
  const int64_t groups_per_grid =
      kWarpRow ? static_cast<int64_t>(gridDim.x) * kWarpRowsPerBlock : gridDim.x / a.cluster;
  int64_t row = kWarpRow ? static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + grp.warp
                         : blockIdx.x / a.cluster;
  for (; row < a.R; row += groups_per_grid) {
    const CeRow<T, A> r = ce_row_setup<T, A>(a, k, grp, row);
    RowStats<A> st = ce_pass1<T, A>(a, k, grp, r, stage_buf);
    st = ce_reduce_row<A, kWarpRow>(a, grp, st, sh);
    const RowTotals<A> tot = row_totals(st);
    if (grp.gtid == 0 && grp.rank == 0) ce_row_outputs<T, A>(a, k, r, st, tot, row);
    if (k.want_grad) ce_gradient_pass<T, A>(a, k, grp, r, st, tot, stage_buf, row);
    ce_row_barrier<kWarpRow>(a);
  }
}

}  // namespace cuda
}  // namespace fusedloss
