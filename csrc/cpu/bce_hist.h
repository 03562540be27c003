// The threshold histogram of sigmoid_bce_fwd on CPU (docs/OPS.md): every non-NaN logit x of
// class c adds 1 to counts[y > 0.5][c][b], b = the number of edges strictly below x.
//
// Binning. Edges from ThresholdHistogram(bins=n, range=...) are equal-width up to float32
// rounding, so t = (x - e_0) * scale with scale = B / (e_B - e_0) puts edge k near t = k. Let
// `dev` be the largest |t(e_k) - k| over the actual edges and `margin` a bound on the rounding
// of t itself (two roundings of at most u |t| each, |t| <= B + 1 where it matters). When t is
// further than eps = dev + margin from every edge index 0..B, x lies strictly between the same
// edges as t, so b = clamp(floor(t) + 1, 0, B + 1); otherwise (a fraction ~2 eps of the values,
// ~1e-4 for 1024 bins over (-16, 16)) and for edges that are not equal-width (eps >= 1/4),
// b comes from a binary search over the edges. Both give the exact answer.
//
// Accumulation: each task of rows adds into its own table (2, C, B + 2), the first into the
// output itself; tables are summed after the pass (integers: deterministic). When the extra
// tables would exceed kPrivateBudget, tasks add into the output with relaxed atomic increments.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

namespace fusedloss {
namespace cpu {

// Bytes of per-task tables allowed beyond the output (above it: atomics into the output).
constexpr int64_t kPrivateBudget = int64_t(256) << 20;

template <typename acc>
struct HistBinner {
  const float* edges = nullptr;  // (B + 1,) float32, increasing
  int64_t n_edges = 0;           // B + 1
  acc lo = 0, scale = 0, eps = 0;
  bool uniform = false;

  HistBinner(const float* e, int64_t n) : edges(e), n_edges(n) {
    if (n < 2) return;
    lo = acc(e[0]);
    scale = acc(double(n - 1) / (double(e[n - 1]) - double(e[0])));
    if (!std::isfinite(double(scale)) || !(scale > 0)) return;
    double dev = 0;
    for (int64_t k = 0; k < n; ++k) {
      dev = std::max(dev, std::abs((double(e[k]) - double(lo)) * double(scale) - double(k)));
    }
    const double u = std::numeric_limits<acc>::epsilon();
    const double e_all = dev + 4 * u * double(n + 1);
    uniform = e_all < 0.25;
    eps = acc(e_all);
  }

  // The exact bin of a non-NaN x: the number of edges strictly below it.
  int64_t bin(acc x) const {
    if (uniform) {
      const acc t = (x - lo) * scale;
      const acc r = std::nearbyint(t);
      const bool near_edge = std::abs(t - r) <= eps && r >= acc(0) && r <= acc(n_edges - 1);
      if (!near_edge) {
        if (!(t >= acc(0))) return 0;
        if (t >= acc(n_edges)) return n_edges;
        return std::min<int64_t>(static_cast<int64_t>(t) + 1, n_edges);
      }
    }
    return std::lower_bound(edges, edges + n_edges, x,
                            [](float e, acc v) { return acc(e) < v; }) - edges;
  }
};

// Adds a block of one row (n classes from c0; logits x and targets y in acc) to the table `h`
// ((2, C, B + 2) int64, flat); `atomic`: relaxed atomic increments (h shared between tasks).
// The bins of V elements at a time are computed in vectors (the equal-width rule, see above) as
// codes 2 b + positive, -1 where a binary search decides, -2 for NaN; the increments are scalar.
template <typename acc>
void hist_block(const HistBinner<acc>& hb, const acc* x, const acc* y, int64_t n, int64_t c0,
                int64_t classes, int64_t* h, bool atomic) {
  using Vec = at::vec::Vectorized<acc>;
  using I = at::vec::int_same_size_t<acc>;
  constexpr int64_t V = Vec::size();
  const int64_t nb = hb.n_edges + 1, pos_off = classes * nb;
  const Vec zero(0), one(1), two(2), half(0.5), lo(hb.lo), scale(hb.scale), eps(hb.eps),
      top(acc(hb.n_edges - 1)), last(acc(hb.n_edges)), search(-1), skip(-2);
  alignas(64) I codes[V];
  int64_t* hc = h + c0 * nb;
  for (int64_t i = 0; i < n; i += V) {
    const int64_t k = std::min(V, n - i);
    const Vec xv = Vec::loadu(x + i, k), yv = Vec::loadu(y + i, k);
    const Vec t = (xv - lo) * scale, r = t.round();
    const Vec near = ((t - r).abs() <= eps) & (r >= zero) & (r <= top);
    const Vec b = at::vec::minimum(at::vec::maximum(t.floor() + one, zero), last);
    Vec code = hb.uniform ? Vec::blendv(b * two + Vec::blendv(zero, one, yv > half), search, near)
                          : search;
    code = Vec::blendv(code, skip, xv.isnan());
    at::vec::convert_to_int_of_same_size(code).store(codes, k);
    for (int64_t q = 0; q < k; ++q) {
      const I c = codes[q];
      if (c == I(-2)) continue;
      const int64_t off = c >= 0 ? (c >> 1) + ((c & 1) ? pos_off : 0)
                                 : hb.bin(x[i + q]) + (y[i + q] > acc(0.5) ? pos_off : 0);
      int64_t* cell = hc + (i + q) * nb + off;
      if (atomic) {
        __atomic_fetch_add(cell, int64_t(1), __ATOMIC_RELAXED);
      } else {
        *cell += 1;
      }
    }
  }
}

}  // namespace cpu
}  // namespace fusedloss
