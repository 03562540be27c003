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
// Accumulation: into a task's 16-bit table (2, classes, B + 2) that stays in cache: a task of
// rows bins all the classes, row by row in the forward's own order, when that table is small
// enough (kHistRowTableBytes in sigmoid_bce.cpp); otherwise a task owns strips of classes and
// sweeps each over all the rows. The table is added into the output every kFlushRows rows (a
// cell gains at most 1 per row, so 16 bits never overflow) and at the end, under a lock when
// several tasks share the output (integer sums: deterministic).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
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

  // Adds the cells of classes [c0, c0 + n) into the (2, C, B + 2) int64 table h and zeroes them;
  // under `lock` when it is not null (tasks sharing h). Plain adds under one lock, not an atomic
  // add per cell: a 2-task 65536x256 pass with 1024 bins flushed 0.5M cells a task.
  void flush(int64_t* h, int64_t c0, int64_t n, int64_t classes, std::mutex* lock) {
    std::unique_lock<std::mutex> guard;
    if (lock != nullptr) guard = std::unique_lock<std::mutex>(*lock);
    for (int64_t p = 0; p < 2; ++p) {
      for (int64_t k = 0; k < n; ++k) {
        uint16_t* src = cells.data() + (p * cols + k) * nb;
        int64_t* dst = h + (p * classes + c0 + k) * nb;
        for (int64_t b = 0; b < nb; ++b) dst[b] += src[b];
        std::fill(src, src + nb, uint16_t(0));
      }
    }
    rows = 0;
  }
};

// Adds a block of one row (n classes from table column k0; logits x and targets y in acc) to the
// 16-bit table t, in two sweeps: the cell of every element by the equal-width rule, in vectors
// (exact integers in acc while the table has under 2^24 cells), into `codes` (n ints), noting
// whether any element was near an edge or NaN; then the scalar increments: a bare loop when none
// was (the common case), else one that takes the binary search for those elements (and skips
// NaN).
template <typename acc>
void hist_block(const HistBinner<acc>& hb, const acc* x, const acc* y, int64_t n,
                HistTable& t, int64_t k0, at::vec::int_same_size_t<acc>* codes) {
  using Vec = at::vec::Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const int64_t nb = t.nb, pos_off = t.cols * nb;
  uint16_t* cells = t.cells.data() + k0 * nb;  // cell indices below are relative to column k0
  auto add_searched = [&](int64_t i) {  // element i by the binary search; NaN is left out
    if (!std::isnan(x[i])) ++cells[i * nb + hb.bin(x[i]) + (y[i] > acc(0.5) ? pos_off : 0)];
  };
  const bool vector_cells = hb.uniform && 2 * pos_off < (int64_t(1) << 24);
  if (!vector_cells) {
    for (int64_t i = 0; i < n; ++i) add_searched(i);
    return;
  }
  const Vec zero(0), one(1), half(0.5), lo(hb.lo), scale(hb.scale), eps(hb.eps),
      last(acc(hb.n_edges)), vpos{acc(pos_off)}, step{acc(V * nb)};
  Vec col = Vec::arange(acc(0), acc(1)) * Vec(acc(nb));  // (i + lane) * nb
  int special = 0;  // lanes that need a search or are NaN
  for (int64_t i = 0; i < n; i += V, col += step) {
    const int64_t k = std::min(V, n - i);
    const Vec xv = Vec::loadu(x + i, k), yv = Vec::loadu(y + i, k);
    const Vec tt = (xv - lo) * scale, r = tt.round();
    // Near an integer t (an edge when 0 <= t <= B; elsewhere the clamp below is right either
    // way, so those lanes merely take the search), or NaN (every comparison false).
    const Vec sure = (tt - r).abs() > eps;
    const Vec b = at::vec::minimum(at::vec::maximum(tt.floor() + one, zero), last);
    const Vec cell = b + col + ((yv > half) & vpos);
    at::vec::convert_to_int_of_same_size(cell).store(codes + i, k);
    special |= sure.zero_mask() & ((1 << k) - 1);
  }
  if (!special) {
    for (int64_t i = 0; i < n; ++i) ++cells[codes[i]];
    return;
  }
  // Again with the lanes that were not sure: a search for those, nothing for NaN.
  for (int64_t i = 0; i < n; i += V) {
    const int64_t k = std::min(V, n - i);
    const Vec xv = Vec::loadu(x + i, k), tt = (xv - lo) * scale;
    const int unsure = ((tt - tt.round()).abs() > eps).zero_mask() & ((1 << k) - 1);
    for (int64_t q = 0; q < k; ++q) {
      if (unsure >> q & 1) {
        add_searched(i + q);
      } else {
        ++cells[codes[i + q]];
      }
    }
  }
}

}  // namespace cpu
}  // namespace fusedloss
