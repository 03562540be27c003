// Shared pieces of the CUDA kernels of fusedloss: accumulation types, 16-byte vector access,
// exp/log, side-tensor reads in any dtype, warp reductions, launch-side helpers.
//
// Conventions used by every kernel in csrc/cuda/:
// - Accumulate in `acc_t<T>`: float for half/bfloat16/float, double for double.
// - Offsets are int64_t everywhere (rows x classes passes 2^31 on one GPU).
// - A "chunk" is kVec<T> consecutive elements = 16 bytes of the logits dtype. A chunk is loaded
//   with one 16-byte instruction when the host said the tensor's rows are 16-byte aligned and the
//   chunk lies inside the row; otherwise element by element (same values, slower).
// - Launchers: c10::cuda::CUDAGuard on the input's device, the current stream,
//   C10_CUDA_KERNEL_LAUNCH_CHECK() after every launch, never a host synchronisation.
// - Out-of-range class targets are reported through the mailbox of mailbox.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/mailbox.h"

namespace fusedloss {
namespace cuda {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements of T in one 16-byte vector (8 for bf16/fp16, 4 for fp32, 2 for fp64).
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

constexpr int kWarp = 32;

// A chunk of N elements of U loaded/stored in one instruction (N * sizeof(U) bytes: 2..16).
template <typename U, int N>
struct alignas(sizeof(U) * N) Pack {
  U v[N];
};

// Chunks are aligned to the logits row: chunk j of a row covers columns
// [j*N - phase, j*N - phase + N) where `phase` = (address of the row / sizeof(T)) % N, so every
// chunk of the logits is 16-byte aligned whatever the row stride (GPT-2's 50257 classes
// included). The first and last chunk of a row may be partial: only elements k in [lo, hi) of
// a chunk lie inside the row. Another tensor indexed like the logits (gradient, targets, ...)
// can use the same vector instructions on a row iff its chunk at the same columns is aligned
// too: chunk_aligned() checks that once per row.
template <typename U, int N>
__device__ __forceinline__ bool chunk_aligned(const U* row, int phase) {
  return (reinterpret_cast<uintptr_t>(row - phase) % (sizeof(U) * N)) == 0;
}

__device__ __forceinline__ int row_phase(const void* row, int elem_size, int n) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(row) / elem_size) % n);
}

// Load the chunk at `p` (elements outside [lo, hi) are not read and come back as zero).
// `fast`: the chunk is aligned (chunk_aligned for this row).
template <typename U, int N>
__device__ __forceinline__ Pack<U, N> load_pack(const U* p, bool fast, int lo, int hi) {
  if (fast && lo == 0 && hi == N) return *reinterpret_cast<const Pack<U, N>*>(p);
  Pack<U, N> r;
#pragma unroll
  for (int k = 0; k < N; ++k) r.v[k] = (k >= lo && k < hi) ? p[k] : static_cast<U>(0);
  return r;
}

// Store elements [lo, hi) of a chunk (converted to U) at `p`.
template <typename U, int N, typename A>
__device__ __forceinline__ void store_pack(U* p, bool fast, int lo, int hi, const A (&in)[N]) {
  if (fast && lo == 0 && hi == N) {
    Pack<U, N> pk;
#pragma unroll
    for (int k = 0; k < N; ++k) pk.v[k] = static_cast<U>(in[k]);
    *reinterpret_cast<Pack<U, N>*>(p) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k >= lo && k < hi) p[k] = static_cast<U>(in[k]);
  }
}

// Chunk j of a row: its first column (may be < 0) and the elements [lo, hi) inside the row.
struct ChunkSpan {
  int64_t col;
  int lo, hi;
};

template <int V>
__device__ __forceinline__ ChunkSpan chunk_span(int64_t j, int phase, int64_t C) {
  const int64_t col = j * V - phase;
  return {col, static_cast<int>(max(static_cast<int64_t>(0), -col)),
          static_cast<int>(min(static_cast<int64_t>(V), C - col))};
}

// Chunks per row, whatever the phase: the launchers size shared memory with this.
template <typename T>
inline int64_t max_row_chunks(int64_t cols) {
  return (cols + 2 * kVec<T> - 2) / kVec<T>;
}

// exp/log in the accumulation type. The build does NOT use --use_fast_math (it would turn tanhf
// into tanh.approx, relative error ~1e-5, and every division into an approximation); the float
// exp of every element is the intrinsic __expf (ex2.approx based, relative error ~2 ulp plus
// |x| 2^-24), everything else is IEEE. The log, once per row, is logf: __logf's absolute error
// of ~2^-21 near 1 is a large relative error of log(s) for a confident row (loss ~1e-6), which
// is that row's loss. double keeps the IEEE versions throughout.
__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double acc_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float acc_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double acc_tanh(double x) { return tanh(x); }

// Small side tensors (weights, thresholds, grad_loss) may come in any floating dtype; kernels
// read them element by element in the accumulation type through this tag (uniform per launch,
// so the switch costs no divergence).
enum class FloatKind : int8_t { kHalf, kBFloat16, kFloat, kDouble };

template <typename A>
__device__ __forceinline__ A load_as(const void* p, FloatKind k, int64_t i) {
  switch (k) {
    case FloatKind::kHalf:
      return static_cast<A>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    case FloatKind::kBFloat16:
      return static_cast<A>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    case FloatKind::kFloat:
      return static_cast<A>(static_cast<const float*>(p)[i]);
    default:
      return static_cast<A>(static_cast<const double*>(p)[i]);
  }
}

template <typename A>
__device__ __forceinline__ A quiet_nan() {
  return static_cast<A>(NAN);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v, int width = kWarp) {
  for (int o = width / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o, width);
  return v;
}

// The one dtype dispatch of the CUDA ops: fp64, fp32, fp16, bf16 (inside, `scalar_t`).
#define FUSEDLOSS_DISPATCH_FLOAT(ST, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ST, NAME, __VA_ARGS__)

// Host side ------------------------------------------------------------------------------------

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The FloatKind of a floating tensor (raises, naming `name`, for any other dtype).
inline FloatKind float_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return FloatKind::kHalf;
    case at::kBFloat16: return FloatKind::kBFloat16;
    case at::kFloat: return FloatKind::kFloat;
    case at::kDouble: return FloatKind::kDouble;
    default: TORCH_CHECK(false, name, ": expected a floating dtype, got ", t.scalar_type());
  }
}

// The accumulation dtype of logits of dtype `st` (fp64 for fp64, fp32 otherwise).
inline at::ScalarType acc_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

inline int sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

}  // namespace cuda
}  // namespace fusedloss
