// Softmax cross-entropy on CPU, pass 1 over a row: the row statistics (max, sum of exps, the
// sums the loss needs) and the row loss. Used by every softmax op in softmax_ce.cpp.
//
// The row is walked in column blocks of kBlock (one block of logits lives in L1):
// z = softcap(x) is staged in the accumulation type, the block max is taken, then
// e_c = exp(z_c - m_b) with m_b the running max after block b (the "shift" of block b) is summed
// and, when a gradient follows, kept (in the gradient buffer or a per-thread row). The running
// sum is rescaled by exp(m_old - m_new) when the max grows (one scalar exp per block). The same
// pass picks up z[target], the block of the first maximum and the sums that label smoothing and
// soft targets need. lse = m + log(s), s = sum_c exp(z_c - m).
#pragma once

#include "cpu/common.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fusedloss {
namespace cpu {
namespace {

// exp of the inner loops. fp32 with AVX-512: exp(x) = 2^n e^r, n = round(x / ln2),
// r = x - n ln2 (ln2 in two parts, |r| <= ln2/2), e^r by the same degree-5 polynomial as ATen's
// exp_u20, 2^n applied with vscalefps, which also gives +inf past the overflow bound and 0 (or a
// subnormal) past the underflow bound. The input is clamped to [-104, 89] first (exp is 0 / inf
// there; max(lo, x) and min(hi, x) keep a NaN x), so -inf gives 0 and +inf gives inf without
// special cases. 12 instructions against exp_u20's 19, which is what bounds the forward: the
// statistics pass runs at ~2 cycles per element on the 2-core AVX-512 EPYC the CPU figures were
// measured on, not at memory bandwidth. Elsewhere: vexp (common.h).
template <typename T>
inline Vectorized<T> ce_exp(const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 x = _mm512_min_ps(_mm512_set1_ps(89.f),
                                   _mm512_max_ps(_mm512_set1_ps(-104.f), __m512(v)));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);      // ln2 high part
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);          // ln2 low part
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.166676521f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.499991506f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.999999701f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
  }
#endif
  return vexp(v);
}

template <typename acc>
struct CeConfig {
  int64_t C = 0;
  int64_t ignore_index = -100;
  acc eps = 0;               // label_smoothing
  acc lse_square_scale = 0;  // z-loss coefficient
  acc cap = 0;               // softcap, 0 = off
  const acc* w = nullptr;    // class weights (C,) in acc precision, or null
  acc W = 0;                 // sum_c w_c (C without weight)
  bool prob = false;         // probability targets (target.dim() == 2)
  acc eps_c() const { return C > 0 ? eps / static_cast<acc>(C) : acc(0); }
  // (eps/C) W, the smoothing share of every row's coefficient; 0 without smoothing, so that an
  // infinite class weight does not reach other rows through 0 * inf
  acc eps_c_W() const { return eps > 0 ? eps_c() * W : acc(0); }
};

// Per-task scratch, allocated once per at::parallel_for chunk.
template <typename acc>
struct Scratch {
  std::vector<acc> z, y, e, shift;
  Scratch(int64_t C, bool keep_row)
      : z(kBlock), y(kBlock), e(keep_row ? std::max<int64_t>(C, 1) : 0), shift(C / kBlock + 1) {}
};

// One row of a probability target: in the logits' dtype (`lp`) or the accumulation dtype (`ap`).
template <typename scalar_t, typename acc>
struct TargetRow {
  const scalar_t* lp = nullptr;
  const acc* ap = nullptr;
  bool present() const { return lp != nullptr || ap != nullptr; }
};

template <typename acc>
struct RowStats {
  acc m = -std::numeric_limits<acc>::infinity();  // max_c z_c (NaN if the row has a NaN)
  acc shift = 0;         // exp shift of the last block: m, or 0 when m is +-inf (torch.logsumexp)
  acc sum = 0;           // s = sum_c exp(z_c - shift)
  acc inv_sum = 0;       // 1 / s: p_c = exp(z_c - shift) * (1 / s), never exp(z_c - lse)
  acc lse = -std::numeric_limits<acc>::infinity();
  int64_t arg_block = 0; // block holding the first maximum
  acc zt = 0;            // z[target]
  acc xt = 0;            // x[target] (the soft cap's derivative is taken from it)
  acc ref = 0;           // a logit of the row: sums of z are taken relative to it (cancellation)
  acc wz = 0;            // sum_c w_c (z_c - ref)           (label smoothing)
  acc wy = 0, wyz = 0;   // sum_c w_c y_c, sum_c w_c y_c (z_c - ref)   (soft targets)
  bool pos_inf() const { return m == std::numeric_limits<acc>::infinity(); }
};

// Zero the lanes past n (partial loads leave them 0 already, but (0 - ref) would not be).
template <typename T>
inline Vectorized<T> keep_lanes(const Vectorized<T>& v, int64_t n) {
  return n == Vectorized<T>::size() ? v : Vectorized<T>::set(Vectorized<T>(0), v, n);
}

// n logits of one row as z = softcap(x) in acc precision: the row itself when no conversion is
// needed, else `buf`.
template <typename scalar_t, typename acc>
inline const acc* stage_z(const scalar_t* x, int64_t n, acc cap, acc* buf) {
  using Vec = Vectorized<acc>;
  const acc* src = buf;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (cap == 0) return x;
    src = x;
  } else {
    convert_contig<scalar_t, acc>(x, n, buf);
    if (cap == 0) return buf;
  }
  const Vec vcap(cap);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - i);
    vstore(buf + i, (vload(src + i, k) / vcap).tanh() * vcap, k);
  }
  return buf;
}

// dz/dx of the soft cap for n logits into `buf`: sech(x/cap)^2 = 4 e / (1 + e)^2 with
// e = exp(-2|x/cap|), relatively precise where 1 - (z/cap)^2 cancels (|x| >> cap).
template <typename scalar_t, typename acc>
inline const acc* stage_dzdx(const scalar_t* x, int64_t n, acc cap, acc* buf) {
  using Vec = Vectorized<acc>;
  const acc* src = buf;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    src = x;
  } else {
    convert_contig<scalar_t, acc>(x, n, buf);
  }
  const Vec vcap(cap), vm2(-2), v1(1), v4(4);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - i);
    const Vec e = ((vload(src + i, k) / vcap).abs() * vm2).exp();
    const Vec d = v1 + e;
    vstore(buf + i, v4 * e / (d * d), k);
  }
  return buf;
}

template <typename acc>
inline acc softcap_dzdx(acc x, acc cap) {
  const acc e = std::exp(acc(-2) * std::abs(x / cap));
  return acc(4) * e / ((1 + e) * (1 + e));
}

// Columns [b0, b0 + n) of a probability target row in acc precision.
template <typename scalar_t, typename acc>
inline const acc* stage_y(const TargetRow<scalar_t, acc>& y, int64_t b0, int64_t n, acc* buf) {
  if (y.ap != nullptr) return y.ap + b0;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    return y.lp + b0;
  } else {
    convert_contig<scalar_t, acc>(y.lp + b0, n, buf);
    return buf;
  }
}

// Block max; when it raises the running max, the running sum is rescaled to the new shift.
template <typename acc>
inline void update_max(RowStats<acc>& st, const acc* zb, int64_t n, int64_t b) {
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const acc ninf = -std::numeric_limits<acc>::infinity();
  Vec vm0(ninf), vm1(ninf);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    vm0 = at::vec::maximum(vm0, Vec::loadu(zb + i));
    vm1 = at::vec::maximum(vm1, Vec::loadu(zb + i + V));
  }
  for (; i < n; i += V) vm0 = at::vec::maximum(vm0, vload_fill(zb + i, std::min(V, n - i), ninf));
  const acc bmax = hmax(at::vec::maximum(vm0, vm1));
  if (!std::isnan(st.m) && (std::isnan(bmax) || bmax > st.m)) {
    st.arg_block = b;
    const acc shift = std::isinf(bmax) ? acc(0) : bmax;
    if (st.sum != 0) st.sum *= std::exp(st.shift - shift);
    st.m = bmax;
    st.shift = shift;
  }
}

// sum_c exp(z_c - shift) over the block, the exps stored to `eb` when not null. Two accumulators
// (exp latency); the same summation order with and without `eb`, so the loss does not depend on
// whether a gradient is computed.
template <typename acc>
inline acc block_exp_sum(const acc* zb, int64_t n, acc shift, acc* eb) {
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const Vec vshift(shift);
  Vec vs0(0), vs1(0);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    const Vec e0 = ce_exp(Vec::loadu(zb + i) - vshift);
    const Vec e1 = ce_exp(Vec::loadu(zb + i + V) - vshift);
    if (eb != nullptr) {
      e0.store(eb + i);
      e1.store(eb + i + V);
    }
    vs0 += e0;
    vs1 += e1;
  }
  for (; i < n; i += V) {
    const int64_t k = std::min(V, n - i);
    const Vec e = ce_exp(vload_fill(zb + i, k, -std::numeric_limits<acc>::infinity()) - vshift);
    if (eb != nullptr) vstore(eb + i, e, k);
    vs0 += e;
  }
  return hsum(vs0 + vs1);
}

// The weighted sums of label smoothing (wz) and soft targets (wy, wyz) over one block.
template <typename acc>
inline void block_side_sums(RowStats<acc>& st, const acc* zb, const acc* yb, const acc* wb,
                            int64_t n, bool need_wz) {
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const Vec vref(st.ref);
  Vec awz(0), awy(0), awyz(0);
  for (int64_t i = 0; i < n; i += V) {
    const int64_t k = std::min(V, n - i);
    const Vec w = wb != nullptr ? vload(wb + i, k) : Vec(1);
    const Vec wd = keep_lanes(w * (vload(zb + i, k) - vref), k);
    if (need_wz) awz += wd;
    if (yb != nullptr) {
      const Vec yv = vload(yb + i, k);
      awy += keep_lanes(w * yv, k);
      // With label smoothing every class has a positive target (1 - eps) y_c + eps / C, so a
      // -inf logit makes the loss +inf, as torch's: its y_c = 0 must add 0 here, not
      // 0 * -inf = NaN. Without smoothing torch's y_c * log_softmax is that NaN, and so is ours.
      const Vec wdy = wd * yv;
      awyz += keep_lanes(need_wz ? Vec::blendv(wdy, Vec(0), yv == Vec(0)) : wdy, k);
    }
  }
  st.wz += hsum(awz);
  st.wy += hsum(awy);
  st.wyz += hsum(awyz);
}

// Pass 1 over a row. `keep_e` (C elements) receives exp(z_c - shift_b) when not null (and
// sc.shift[b] the shift of block b); `t` is the class-index target or -1.
template <typename scalar_t, typename acc>
RowStats<acc> row_stats(const scalar_t* x, const TargetRow<scalar_t, acc>& y, int64_t t,
                        const CeConfig<acc>& cfg, bool need_wz, acc* keep_e, Scratch<acc>& sc) {
  RowStats<acc> st;
  const int64_t C = cfg.C;
  for (int64_t b0 = 0, b = 0; b0 < C; b0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc* zb = stage_z(x + b0, n, cfg.cap, sc.z.data());
    if (b0 == 0) st.ref = std::isfinite(zb[0]) ? zb[0] : acc(0);
    update_max(st, zb, n, b);
    sc.shift[b] = st.shift;
    st.sum += block_exp_sum(zb, n, st.shift, keep_e != nullptr ? keep_e + b0 : nullptr);
    if (t >= b0 && t < b0 + n) {
      st.zt = zb[t - b0];
      st.xt = static_cast<acc>(x[t]);
    }
    if (need_wz || y.present()) {
      const acc* yb = y.present() ? stage_y(y, b0, n, sc.y.data()) : nullptr;
      block_side_sums(st, zb, yb, cfg.w != nullptr ? cfg.w + b0 : nullptr, n, need_wz);
    }
  }
  if ((need_wz || y.present()) && std::isfinite(st.m) && st.ref != st.m &&
      !(std::isfinite(st.wz) && std::isfinite(st.wyz))) {
    // Logits further apart than acc's range (3e38 and 0 in fp32): a z - ref overflowed. Again,
    // relative to the max, where no term exceeds the answer's own lse - z_c (rows holding an
    // infinite or NaN sum for other reasons merely take this second pass to the same result).
    st.ref = st.m;
    st.wz = st.wy = st.wyz = 0;
    for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
      const int64_t n = std::min(kBlock, C - b0);
      const acc* zb = stage_z(x + b0, n, cfg.cap, sc.z.data());
      const acc* yb = y.present() ? stage_y(y, b0, n, sc.y.data()) : nullptr;
      block_side_sums(st, zb, yb, cfg.w != nullptr ? cfg.w + b0 : nullptr, n, need_wz);
    }
  }
  st.inv_sum = acc(1) / st.sum;
  st.lse = st.shift + std::log(st.sum);
  return st;
}

// Row loss from the pass-1 sums. lse - z is formed as (shift - z) + log(s) so that a large
// common logit (|x| ~ 1e4) does not cancel in fp32. A +inf logit makes the row NaN, as torch's
// log_softmax does.
template <typename acc>
acc row_loss(const RowStats<acc>& st, const CeConfig<acc>& cfg, int64_t t) {
  if (st.pos_inf()) return std::numeric_limits<acc>::quiet_NaN();
  const acc logsum = std::log(st.sum);
  const acc lse_ref = (st.shift - st.ref) + logsum;  // lse - ref
  const acc epsC = cfg.eps_c();
  acc loss;
  if (cfg.prob) {
    const acc S = (1 - cfg.eps) * st.wy + cfg.eps_c_W();
    loss = S * lse_ref - ((1 - cfg.eps) * st.wyz + epsC * st.wz);
  } else {
    const acc wt = cfg.w != nullptr ? cfg.w[t] : acc(1);
    loss = (1 - cfg.eps) * wt * ((st.shift - st.zt) + logsum);
    // sum_c w_c (lse - z_c) with lse - z_c >= 0: an infinite W gives its sign of infinity (as
    // torch's sum of w_c * -log p_c), where W lse - sum_c w_c z_c would be inf - inf
    if (cfg.eps > 0) loss += epsC * (std::isinf(cfg.W) ? cfg.W : cfg.W * lse_ref - st.wz);
  }
  if (cfg.lse_square_scale != 0) loss += cfg.lse_square_scale * st.lse * st.lse;
  return loss;
}

}  // namespace
}  // namespace cpu
}  // namespace fusedloss
