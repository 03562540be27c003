// Shared pieces of the CPU kernels: accumulation types, the one dtype dispatch, vector helpers,
// strided any-dtype operand loads, argument checks. Everything works on (rows, classes) views.
//
// Vectorisation: at::vec::Vectorized<T> is real SIMD only when this file is compiled with the ISA
// flags (setup.py builds every csrc/cpu/*.cpp once per ISA: default, avx2, avx512); without them
// it is the scalar fallback (measured ~9x slower for CE 4096x32000 fp32 on the 2-core AVX-512
// EPYC the CPU figures were measured on).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "op_checks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fusedloss {
namespace cpu {

using at::Tensor;
using at::vec::Vectorized;

// Accumulation type: fp32 for fp16/bf16/fp32, fp64 for fp64 (docs/OPS.md).
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_type = typename AccType<T>::type;

// The one dtype dispatch of the CPU kernels (the logits dtype picks the instantiation).
#define FUSEDLOSS_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Columns per block. A block of logits staged in fp32 (8 KiB) plus the same block of the
// gradient/exp buffer (8 KiB) stay in L1 (48 KiB on the 2-core EPYC used for the measurements,
// >= 32 KiB on every x86 core of the last decade) between the max and the exp loops.
constexpr int64_t kBlock = 2048;
// Least elements per at::parallel_for task: below ~32K elements (128 KiB fp32) the fork/join cost
// of a task (a few microseconds) is comparable to the work. An estimate, not a sweep: at the ~2
// cycles per element of the softmax statistics pass on the 2-core AVX-512 EPYC (see ce_exp),
// 32K elements are some tens of microseconds, several times the fork/join cost.
constexpr int64_t kGrainElems = 32768;

inline int64_t row_grain(int64_t classes) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(classes, 1));
}

// ---------------------------------------------------------------------------------------------
// Vector helpers. `n` is the number of valid lanes (1..size()); tails use masked/partial loads.

template <typename T>
inline Vectorized<T> vload(const T* p, int64_t n) {
  return n == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
}

// Partial load with the missing lanes set to `fill` (e.g. -inf for a max).
template <typename T>
inline Vectorized<T> vload_fill(const T* p, int64_t n, T fill) {
  if (n == Vectorized<T>::size()) return Vectorized<T>::loadu(p);
  return Vectorized<T>::set(Vectorized<T>(fill), Vectorized<T>::loadu(p, n), n);
}

template <typename T>
inline void vstore(T* p, const Vectorized<T>& v, int64_t n) {
  if (n == Vectorized<T>::size()) v.store(p); else v.store(p, static_cast<int>(n));
}

// Store an accumulation-precision vector as scalar_t (rounding once).
template <typename scalar_t, typename acc>
inline void vstore_as(scalar_t* p, const Vectorized<acc>& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    vstore(p, v, n);
  } else {
    static_assert(std::is_same_v<acc, float>, "reduced types accumulate in fp32");
    at::vec::convert_from_float<scalar_t>(v, v).store(p, static_cast<int>(n));
  }
}

// Load n <= size() elements of scalar_t as acc (through `buf` when a conversion is needed).
template <typename acc, typename scalar_t>
inline Vectorized<acc> vload_as(const scalar_t* p, int64_t n, acc* buf) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    return vload(p, n);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc>(p[i]);
    return vload(buf, n);
  }
}

// Horizontal max that propagates NaN (torch.max semantics).
template <typename T>
inline T hmax(const Vectorized<T>& v) {
  alignas(64) T a[Vectorized<T>::size()];
  v.store(a);
  T r = a[0];
  for (int64_t i = 1; i < Vectorized<T>::size(); ++i) r = (std::isnan(a[i]) || a[i] > r) ? a[i] : r;
  return r;
}

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  alignas(64) T a[Vectorized<T>::size()];
  v.store(a);
  T r = 0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) r += a[i];
  return r;
}

// exp for the softmax/sigmoid inner loops. fp32: ATen's exp_u20 polynomial (max 20 ulp, ~2.4e-6
// relative; measured max 2.4e-6 relative error of the CE gradient against fp64, where eager
// torch.softmax in fp32 has 6.5e-6) instead of Sleef's 1-ulp exp, which made the forward
// compute-bound: 4096x32000 fp32 loss-only pass 79 ms -> 48 ms on the AVX-512 EPYC here.
// fp64 (and the scalar default build) keeps the exact exp (exp_u20 falls back to it).
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& v) { return v.exp_u20(); }

// ---------------------------------------------------------------------------------------------
// Contiguous scalar_t -> acc conversion of n elements (vectorised for fp16/bf16).
template <typename src_t, typename acc>
inline void convert_contig(const src_t* src, int64_t n, acc* dst) {
  using Vec = Vectorized<acc>;
  int64_t i = 0;
  if constexpr (std::is_same_v<acc, float> &&
                (std::is_same_v<src_t, at::BFloat16> || std::is_same_v<src_t, at::Half>)) {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec v;
      at::vec::load_to_float(src + i, v);
      v.store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<acc>(src[i]);
}

// Elements [c0, c0+n) of row r of a 2-D tensor with any strides (zeros included) and a dtype among
// float types, bool and uint8, as acc values. Returns a pointer into the tensor itself when it
// already holds contiguous acc values, else converts into `buf` (kBlock elements). Never copies
// the whole tensor: targets/weights are read where they are (docs/OPS.md, sigmoid_bce_fwd).
struct Operand {
  const char* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t s0 = 0, s1 = 0, itemsize = 0;
  bool present = false;  // (an empty tensor may have a null data pointer)

  Operand() = default;
  explicit Operand(const Tensor& t)
      : data(static_cast<const char*>(t.data_ptr())), dtype(t.scalar_type()),
        s0(t.dim() == 2 ? t.stride(0) : 0), s1(t.dim() >= 1 ? t.stride(t.dim() - 1) : 0),
        itemsize(static_cast<int64_t>(t.element_size())), present(true) {}
  bool defined() const { return present; }

  // Asks the cache for the n elements of row r from column c0 (contiguous rows only): for
  // column-strip sweeps, whose row-strided reads the hardware prefetchers do not follow.
  void prefetch(int64_t r, int64_t c0, int64_t n) const {
    if (!present || s1 != 1) return;
    const char* p = data + (r * s0 + c0) * itemsize;
    for (int64_t b = 0; b < n * itemsize; b += 64) __builtin_prefetch(p + b);
  }

  template <typename acc>
  const acc* block(int64_t r, int64_t c0, int64_t n, acc* buf) const {
    const char* p = data + (r * s0 + c0 * s1) * itemsize;
    switch (dtype) {
      case at::kFloat: return load<float, acc>(reinterpret_cast<const float*>(p), n, buf);
      case at::kDouble: return load<double, acc>(reinterpret_cast<const double*>(p), n, buf);
      case at::kHalf: return load<at::Half, acc>(reinterpret_cast<const at::Half*>(p), n, buf);
      case at::kBFloat16:
        return load<at::BFloat16, acc>(reinterpret_cast<const at::BFloat16*>(p), n, buf);
      case at::kBool: return load<bool, acc>(reinterpret_cast<const bool*>(p), n, buf);
      case at::kByte: return load<uint8_t, acc>(reinterpret_cast<const uint8_t*>(p), n, buf);
      default: TORCH_CHECK(false, "fusedloss: unsupported operand dtype ", dtype);
    }
  }

 private:
  template <typename src_t, typename acc>
  const acc* load(const src_t* p, int64_t n, acc* buf) const {
    if constexpr (std::is_same_v<src_t, acc>) {
      if (s1 == 1) return p;
    }
    if (s1 == 0) {
      std::fill(buf, buf + n, static_cast<acc>(p[0]));
    } else if (s1 == 1) {
      convert_contig<src_t, acc>(p, n, buf);
    } else {
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc>(p[i * s1]);
    }
    return buf;
  }
};

// ---------------------------------------------------------------------------------------------
// Argument reads shared by the CPU ops (the checks themselves: op_checks.h).

// grad_scale: None (1) or a one-element floating tensor on the CPU. Reading it is not a host sync.
inline double read_grad_scale(const char* op, const c10::optional<Tensor>& grad_scale,
                              const Tensor& logits) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return 1.0;
  checks::check_scalar_tensor(op, "grad_scale", *grad_scale, logits);
  return grad_scale->item<double>();
}

// Per-class vector (weight, threshold) of any float dtype and stride as a contiguous copy in the
// accumulation dtype: C elements, negligible next to the (R, C) logits, and it saves a
// conversion per element in the row loops.
inline Tensor class_vector(const char* op, const char* name, const Tensor& v,
                           const Tensor& logits) {
  checks::check_class_vector(op, name, v, logits);
  return v.to(checks::acc_dtype(logits.scalar_type())).contiguous();
}

// Fresh (rows, classes) output. Large buffers are advised to use transparent huge pages (what
// PyTorch's own allocator does under THP_MEM_ALLOC_ENABLE=1): first-touch page faults on 4 KiB
// pages cost ~1.4 us each, measured 176 ms to allocate+fill 524 MB here vs 35 ms with THP
// (same 2-core EPYC), more than the whole fused kernel.
//
// Even with huge pages, the kernel zeroes every fresh page before the first touch: a fresh 524 MB
// gradient costs more than the fused pass's own reads and writes. So the last large output buffer
// (>= kReuseMinBytes) is kept in a one-slot cache and handed out again by the next call that needs
// no more than it holds and at least half of it, but only once nothing else references it: no
// tensor, view or Python storage object (strong count 1, the slot's own) and no weak reference
// (weak count 1), allocated by the CPU allocator (not shared memory). A buffer that can't be reused
// is dropped before the new one is allocated, so a call's peak is that of one buffer, as without
// the cache; between calls one buffer stays resident until `empty_output_cache` (Python:
// fusedloss.empty_cache()) or a call that needs another size.
constexpr int64_t kReuseMinBytes = 16 << 20;
Tensor new_2d_output(int64_t rows, int64_t classes, const at::TensorOptions& options);
// Releases the cached buffer; returns the bytes released (0 if none or in use elsewhere).
int64_t empty_output_cache();

}  // namespace cpu
}  // namespace fusedloss
