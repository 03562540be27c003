// Softmax cross-entropy on CPU, pass 2 over a row: the gradient (and the decoding of a row).
// The row is still in L2 from pass 1 (128 KiB for 32000 fp32 classes, 513 KiB for 128256), and
// its exps were kept by pass 1: p_c = e_c * (exp(m_b - m) * (1 / s)) with one scalar exp per
// block, no exp per element; the gradient is written over the kept exps, rounded to the logits
// dtype once.
//
// Gradient (derivative of the row loss w.r.t. z):
//   loss = (1-eps) w_t (lse - z_t) + (eps/C) sum_c w_c (lse - z_c) + lse_square_scale lse^2
//   d lse / d z_c = p_c, so, with k = 2 lse_square_scale lse,
//   dz_c = p_c ((1-eps) w_t + (eps/C) W + k) - (1-eps) w_t [c == t] - (eps/C) w_c.
//   Soft targets y' = (1-eps) y + eps/C: loss = sum_c w_c y'_c (lse - z_c) + lse_square_scale lse^2,
//   dz_c = p_c (S + k) - w_c y'_c with S = sum_c w_c y'_c.
//   Softcap z = cap tanh(x / cap): dz/dx = sech(x / cap)^2 (= 1 - (z / cap)^2, but without the
//   cancellation where |x| >> cap).
// In code: dz_c = p_c * coef - sub_c (the [c == t] term is patched after the vector loop).
// The forward's fused gradient (g = grad_scale) and softmax_ce_bwd (g = grad_loss[r]) run this
// same code on the same pass-1 results, so they agree bitwise for equal g.
#pragma once

#include "cpu/softmax_ce_stats.h"

namespace fusedloss {
namespace cpu {
namespace {

template <typename acc>
acc class_coef(const RowStats<acc>& st, const CeConfig<acc>& cfg, int64_t t) {
  acc coef = (1 - cfg.eps) * (cfg.prob ? st.wy : cfg.w != nullptr ? cfg.w[t] : acc(1)) +
             cfg.eps_c_W();
  if (cfg.lse_square_scale != 0) coef += 2 * cfg.lse_square_scale * st.lse;
  return coef;
}

// out_c = g * dz_c * softcap'(z_c) for every c, with dz_c = p_c * coef - sub_c and p_c from the
// exps pass 1 kept in `kept_e` (which may be `out` itself). The [c == t] term of class-index
// targets is patched by the caller.
template <typename scalar_t, typename acc>
void row_grad(scalar_t* out, const scalar_t* x, const TargetRow<scalar_t, acc>& y,
              const acc* kept_e, const RowStats<acc>& st, acc coef, acc g,
              const CeConfig<acc>& cfg, Scratch<acc>& sc) {
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const int64_t C = cfg.C;
  const acc epsC = cfg.eps_c();
  const bool sub = cfg.prob || cfg.eps > 0;
  // Soft targets: sub_c = w_c (g (1-eps) y_c + g eps/C); smoothing: sub_c = g (eps/C) w_c.
  const Vec vy_scale(g * (1 - cfg.eps)), vy_add(g * epsC), vsub(g * epsC);
  for (int64_t b0 = 0, b = 0; b0 < C; b0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc* eb = kept_e + b0;
    scalar_t* ob = out + b0;
    const Vec a(g * coef * (std::exp(sc.shift[b] - st.shift) * st.inv_sum));
    if (!sub && cfg.cap == 0) {  // the common case: one multiply per element
      int64_t i = 0;
      for (; i + V <= n; i += V) vstore_as<scalar_t, acc>(ob + i, Vec::loadu(eb + i) * a, V);
      if (i < n) vstore_as<scalar_t, acc>(ob + i, vload(eb + i, n - i) * a, n - i);
      continue;
    }
    const acc* db = cfg.cap != 0 ? stage_dzdx(x + b0, n, cfg.cap, sc.z.data()) : nullptr;
    const acc* yb = cfg.prob ? stage_y(y, b0, n, sc.y.data()) : nullptr;
    const acc* wb = cfg.w != nullptr ? cfg.w + b0 : nullptr;
    for (int64_t i = 0; i < n; i += V) {
      const int64_t k = std::min(V, n - i);
      Vec d = vload(eb + i, k) * a;
      if (cfg.prob) {
        const Vec yv = vy_scale * vload(yb + i, k) + vy_add;
        d = d - (wb != nullptr ? vload(wb + i, k) * yv : yv);
      } else if (sub) {
        d = d - (wb != nullptr ? vload(wb + i, k) * vsub : vsub);
      }
      if (cfg.cap != 0) d = d * vload(db + i, k);
      vstore_as<scalar_t, acc>(ob + i, d, k);
    }
  }
}

// The target element of a class-index row, computed whole (one rounding).
template <typename scalar_t, typename acc>
void patch_target(scalar_t* out, int64_t t, const RowStats<acc>& st, acc coef, acc g,
                  const CeConfig<acc>& cfg) {
  const acc wt = cfg.w != nullptr ? cfg.w[t] : acc(1);
  const acc zt = st.zt;
  acc d = std::exp(zt - st.shift) * st.inv_sum * coef - (1 - cfg.eps) * wt;
  if (cfg.eps > 0) d -= cfg.eps_c() * wt;
  if (cfg.cap != 0) d *= softcap_dzdx(st.xt, cfg.cap);
  out[t] = static_cast<scalar_t>(g * d);
}

// argmax (first maximum; the first NaN when there is one, as torch.argmax) and its probability
// (NaN when the row holds +inf, as torch.softmax gives).
template <typename scalar_t, typename acc>
void decode_row(const scalar_t* x, const RowStats<acc>& st, const CeConfig<acc>& cfg,
                Scratch<acc>& sc, int64_t* pred, float* conf) {
  if (cfg.C == 0) {
    *pred = 0;
    *conf = 0.f;
    return;
  }
  const int64_t b0 = st.arg_block * kBlock;
  const int64_t n = std::min(kBlock, cfg.C - b0);
  const acc* zb = stage_z(x + b0, n, cfg.cap, sc.z.data());
  const bool nan = std::isnan(st.m);
  int64_t idx = b0;
  for (int64_t i = 0; i < n; ++i) {
    if (zb[i] == st.m || (nan && std::isnan(zb[i]))) {
      idx = b0 + i;
      break;
    }
  }
  *pred = idx;
  *conf = st.pos_inf() ? std::numeric_limits<float>::quiet_NaN()
                       : static_cast<float>(std::exp(st.m - st.shift) * st.inv_sum);
}

}  // namespace
}  // namespace cpu
}  // namespace fusedloss
