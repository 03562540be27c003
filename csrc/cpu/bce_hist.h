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
// Accumulation: a task of rows bins a block of classes at a time (hist_cols in sigmoid_bce.cpp)
// into a 16-bit table (2, block, B + 2) small enough to stay in cache; the table is added into
// the output every kFlushRows rows (a cell gains at most 1 per row, so 16 bits never overflow)
// and at the end of the block, with relaxed atomic adds of its nonzero cells when several tasks
// share the output (integer sums: deterministic).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

namespace fusedloss {
namespace cpu {

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

// Rows between flushes of a 16-bit table: no cell can pass 65535.
constexpr int64_t kFlushRows = 65535;

// The 16-bit table of one block of `cols` classes starting at class c0: cell
// (positive, class c0 + k, bin b) at (positive * cols + k) * (B + 2) + b.
struct HistTable {
  std::vector<uint16_t> cells;
  int64_t cols = 0, nb = 0, rows = 0;  // rows added since the last flush

  HistTable(int64_t cols_, int64_t n_edges) : cells(2 * cols_ * (n_edges + 1), 0),
                                              cols(cols_), nb(n_edges + 1) {}

  // Adds the cells of classes [c0, c0 + n) into the (2, C, B + 2) int64 table h and zeroes them.
  void flush(int64_t* h, int64_t c0, int64_t n, int64_t classes, bool atomic) {
    for (int64_t p = 0; p < 2; ++p) {
      for (int64_t k = 0; k < n; ++k) {
        uint16_t* src = cells.data() + (p * cols + k) * nb;
        int64_t* dst = h + (p * classes + c0 + k) * nb;
        for (int64_t b = 0; b < nb; ++b) {
          if (atomic) {
            if (src[b] != 0) __atomic_fetch_add(dst + b, int64_t(src[b]), __ATOMIC_RELAXED);
          } else {
            dst[b] += src[b];
          }
        }
        std::fill(src, src + nb, uint16_t(0));
      }
    }
    rows = 0;
  }
};

// Adds a block of one row (n <= t.cols classes; logits x and targets y in acc) to the 16-bit
// table t. The cells of V elements at a time are computed in vectors (the equal-width rule, see
// above; exact integers in acc while the table has under 2^24 cells) as cell indices, -1 where
// a binary search decides, -2 for NaN; the increments are scalar.
template <typename acc>
void hist_block(const HistBinner<acc>& hb, const acc* x, const acc* y, int64_t n,
                HistTable& t) {
  using Vec = at::vec::Vectorized<acc>;
  using I = at::vec::int_same_size_t<acc>;
  constexpr int64_t V = Vec::size();
  const int64_t nb = t.nb, pos_off = t.cols * nb;
  const bool vector_cells = hb.uniform && 2 * pos_off < (int64_t(1) << 24);
  const Vec zero(0), one(1), half(0.5), lo(hb.lo), scale(hb.scale), eps(hb.eps),
      top(acc(hb.n_edges - 1)), last(acc(hb.n_edges)), vnb{acc(nb)}, vpos{acc(pos_off)},
      search(-1), skip(-2);
  alignas(64) I codes[V];
  uint16_t* cells = t.cells.data();
  for (int64_t i = 0; i < n; i += V) {
    const int64_t k = std::min(V, n - i);
    const Vec xv = Vec::loadu(x + i, k), yv = Vec::loadu(y + i, k);
    Vec code = search;
    if (vector_cells) {
      const Vec tt = (xv - lo) * scale, r = tt.round();
      const Vec near = ((tt - r).abs() <= eps) & (r >= zero) & (r <= top);
      const Vec b = at::vec::minimum(at::vec::maximum(tt.floor() + one, zero), last);
      const Vec cell = b + Vec::arange(acc(i), acc(1)) * vnb + Vec::blendv(zero, vpos, yv > half);
      code = Vec::blendv(cell, search, near);
    }
    code = Vec::blendv(code, skip, xv.isnan());
    at::vec::convert_to_int_of_same_size(code).store(codes, k);
    for (int64_t q = 0; q < k; ++q) {
      const I c = codes[q];
      if (c >= 0) {
        ++cells[c];
      } else if (c == I(-1)) {
        ++cells[(i + q) * nb + hb.bin(x[i + q]) + (y[i + q] > acc(0.5) ? pos_off : 0)];
      }
    }
  }
}

}  // namespace cpu
}  // namespace fusedloss
