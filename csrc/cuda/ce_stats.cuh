// Row statistics of the softmax cross-entropy kernel and their reductions (warp shuffles in a
// fixed order, so every lane ends with the same bits and two runs are bitwise equal).
#pragma once

#include <cstdint>
#include <limits>

#include "cuda/common.cuh"

namespace fusedloss {
namespace cuda {

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

}  // namespace cuda
}  // namespace fusedloss
