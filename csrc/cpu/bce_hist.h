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
// The grid case, cheaper: when t1 = fmadd(x, scale, c1), c1 = 1 - e_0 * scale, evaluated as the
// vector loop evaluates it, gives exactly k + 1 at every edge e_k (equal widths of a power of
// two from a multiple of it, as ThresholdHistogram's default range (-16, 16) with 16 to 2^20
// bins: checked at setup, not assumed), no margin is needed. t1 is a non-decreasing function of
// x (products and sums round monotonically), so t1(x) > k + 1 implies x > e_k and
// t1(x) < k + 1 implies x < e_k: when t1 is not an integer, b = clamp(floor(t1), 0, B + 1)
// exactly; an integer t1 (x within a rounding of an edge, or beyond 2^23 bins of the range)
// and NaN take the search.
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
  acc lo = 0, scale = 0, eps = 0, c1 = 0;
  bool uniform = false, grid = false;

  HistBinner(const float* e, int64_t n) : edges(e), n_edges(n) {
    if (n < 2) return;
    lo = acc(e[0]);
    scale = acc(double(n - 1) / (double(e[n - 1]) - double(e[0])));
    if (!std::isfinite(double(scale)) || !(scale > 0)) return;
    // x - e_0 must not overflow in acc for an x inside the edges (it became inf and took the
    // last bin with edges wider than acc's range, e.g. +-3e38 in fp32): the search decides then
    if (!std::isfinite(acc(e[n - 1]) - acc(e[0]))) return;
    double dev = 0;
    for (int64_t k = 0; k < n; ++k) {
      dev = std::max(dev, std::abs((double(e[k]) - double(lo)) * double(scale) - double(k)));
    }
    const double u = std::numeric_limits<acc>::epsilon();
    const double e_all = dev + 4 * u * double(n + 1);
    uniform = e_all < 0.25;
    eps = acc(e_all);
    c1 = acc(1) - lo * scale;
    grid = uniform && on_grid();
  }

  // Whether the vector form of t1 maps every edge e_k to exactly k + 1.
  bool on_grid() const {
    using Vec = at::vec::Vectorized<acc>;
    constexpr int64_t V = Vec::size();
    acc buf[V], t[V];
    for (int64_t k0 = 0; k0 < n_edges; k0 += V) {
      const int64_t m = std::min(V, n_edges - k0);
      for (int64_t q = 0; q < V; ++q) buf[q] = acc(edges[k0 + std::min(q, m - 1)]);
      at::vec::fmadd(Vec::loadu(buf), Vec(scale), Vec(c1)).store(t);
      for (int64_t q = 0; q < m; ++q) {
        if (t[q] != acc(k0 + q + 1)) return false;
      }
    }
    return true;
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

// The equal-width rule in vectors. A cell index is an exact integer in acc while the table has
// under 2^24 cells (`usable`); elements near an edge take the binary search; NaN is left out.
template <typename acc>
struct HistVectorBinner {
  using Vec = at::vec::Vectorized<acc>;
  using Int = at::vec::int_same_size_t<acc>;
  const HistBinner<acc>& hb;
  int64_t nb, pos_off;
  bool usable;
  Vec lo, scale, eps, c1, last, vpos, lane_col;

  HistVectorBinner(const HistBinner<acc>& b, const HistTable& t)
      : hb(b), nb(t.nb), pos_off(t.cols * t.nb),
        usable(b.uniform && 2 * t.cols * t.nb < (int64_t(1) << 24)), lo(b.lo), scale(b.scale),
        eps(b.eps), c1(b.c1), last(acc(b.n_edges)), vpos(acc(pos_off)),
        lane_col(Vec::arange(acc(0), acc(1)) * Vec(acc(t.nb))) {}

  // The cells of Vec::size() elements (stored in `codes`, relative to the cells of a block's
  // first column; the lanes' columns at `col`), and the mask of the lanes whose cell is not
  // sure (near an edge, or NaN).
  C10_ALWAYS_INLINE int cells(const Vec& xv, const Vec& yv, const Vec& col, Int* codes) const {
    const Vec one(1), zero(0), half(0.5);
    Vec sure, b;
    if (hb.grid) {
      const Vec t1 = at::vec::fmadd(xv, scale, c1), f = t1.floor();
      sure = t1 > f;  // false for an integer t1 and for NaN
      b = at::vec::minimum(at::vec::maximum(f, zero), last);
    } else {
      const Vec tt = (xv - lo) * scale, r = tt.round();
      // Near an integer t (an edge when 0 <= t <= B; elsewhere the clamp below is right either
      // way, so those lanes merely take the search), or NaN (every comparison false).
      sure = (tt - r).abs() > eps;
      b = at::vec::minimum(at::vec::maximum(tt.floor() + one, zero), last);
    }
    const Vec cell = b + col + ((yv > half) & vpos);
    at::vec::convert_to_int_of_same_size(cell).store(codes);
    return sure.zero_mask();
  }

  // Element i of a block (cells of its first column at `cells`) by the binary search.
  inline void add_searched(uint16_t* cells, const acc* x, const acc* y, int64_t i) const {
    if (!std::isnan(x[i])) ++cells[i * nb + hb.bin(x[i]) + (y[i] > acc(0.5) ? pos_off : 0)];
  }
};

// Adds a block of one row (n classes from table column k0; logits x and targets y in acc) to the
// 16-bit table t in two sweeps: the cells of every element into `codes` (n rounded up to the
// vector size, ints) and each vector's mask of lanes that were not sure into `masks` (one int
// per vector); then the increments, a bare loop when no lane was unsure (the common case), else
// the search for those lanes. Element by element through the binary search when the vector rule
// is not usable. Tried on a 2-core AVX2 EPYC (65536x256 fp32, uint8 targets, one thread,
// fastest of 11): the increments made one vector at a time inside the loss's own loop gave
// 37.6-38.2 ms against these sweeps' 39.6-42.2 without the gradient with 64 bins, 45.4-51.8
// against 45.1-46.3 with 1024, and with the gradient 47-54 against 44-48 (64 bins): too little
// and too mixed for a second copy of the loss loop, so binning stays a sweep after each block.
template <typename acc>
void hist_block(const HistVectorBinner<acc>& vb, const acc* x, const acc* y, int64_t n,
                HistTable& t, int64_t k0, at::vec::int_same_size_t<acc>* codes, int* masks) {
  using Vec = at::vec::Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  uint16_t* cells = t.cells.data() + k0 * t.nb;
  if (!vb.usable) {
    for (int64_t i = 0; i < n; ++i) vb.add_searched(cells, x, y, i);
    return;
  }
  const Vec step{acc(V * t.nb)};
  Vec col = vb.lane_col;
  int special = 0;
  for (int64_t i = 0; i < n; i += V, col += step) {
    const int64_t k = std::min(V, n - i);
    masks[i / V] = vb.cells(Vec::loadu(x + i, k), Vec::loadu(y + i, k), col, codes + i) &
                   ((1 << k) - 1);
    special |= masks[i / V];
  }
  if (!special) {
    for (int64_t i = 0; i < n; ++i) ++cells[codes[i]];
    return;
  }
  for (int64_t i = 0; i < n; i += V) {
    const int64_t k = std::min(V, n - i);
    const int unsure = masks[i / V];
    for (int64_t q = 0; q < k; ++q) {
      if (unsure >> q & 1) {
        vb.add_searched(cells, x, y, i + q);
      } else {
        ++cells[codes[i + q]];
      }
    }
  }
}

}  // namespace cpu
}  // namespace fusedloss
