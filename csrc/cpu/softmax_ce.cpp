// Softmax cross-entropy on CPU: softmax_ce_fwd, softmax_ce_fwd_inplace, softmax_ce_bwd,
// softmax_decode. Semantics: docs/OPS.md. One task per group of rows (at::parallel_for).
//
// Forward, per row, in column blocks of kBlock (one block of logits lives in L1):
//   pass 1 (one read of the row from memory): z = softcap(x) staged in fp32, block max, then
//     e_c = exp(z_c - m_b) with m_b the running max after block b (the "shift" of block b),
//     kept in the gradient buffer (or a per-thread fp32 row) when the gradient is wanted; the
//     running sum is rescaled by exp(m_old - m_new) when the max grows (one scalar exp per
//     block). The same pass picks up z[target], the argmax block and the sums that label
//     smoothing / soft targets need. lse = m + log(sum).
//   pass 2 (the row is still in L2: 128 KiB for 32000 fp32 classes, 513 KiB for 128256):
//     p_c = e_c * exp(m_b - lse) (one scalar exp per block, no exp per element), the gradient
//     written over the kept exps, rounded to the logits dtype once.
// So each element costs one exp (ce_exp below), the logits are read once and the gradient
// written once.
// Why the exps go into the fresh gradient buffer itself: its pages are faulted in (zeroed by the
// kernel) as pass 1 first touches them, and passes 1 and 2 then work on the row in L2; the
// alternatives measured slower for 4096x32000 and 2048x128256 fp32 on the 2-core AVX-512 EPYC
// used here (A/B in one process, both THP settings): a per-thread fp32 exp row with the gradient
// written once by plain stores +20-25%, the same with streaming (non-temporal) stores +30%,
// prefetching the next row's logits during pass 2 +15%.
//
// Gradient (derivative of the row loss w.r.t. z; docs/OPS.md):
//   loss = (1-eps) w_t (lse - z_t) + (eps/C) sum_c w_c (lse - z_c) + s lse^2
//   d lse / d z_c = p_c, so
//   dz_c = p_c ((1-eps) w_t + (eps/C) W + 2 s lse) - (1-eps) w_t [c == t] - (eps/C) w_c.
//   Soft targets y' = (1-eps) y + eps/C: loss = sum_c w_c y'_c (lse - z_c) + s lse^2,
//   dz_c = p_c (S + 2 s lse) - w_c y'_c with S = sum_c w_c y'_c.
//   Softcap z = cap tanh(x / cap): dz/dx = 1 - tanh^2 = 1 - (z / cap)^2.
// In code: dz_c = p_c * coef - sub_c (the [c == t] term is patched after the vector loop).
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
// row stats pass runs at ~2 cycles per element on the 2-core EPYC, not at memory bandwidth.
// Elsewhere: vexp (common.h).
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
  acc eps = 0;            // label_smoothing
  acc s = 0;              // lse_square_scale (z-loss)
  acc cap = 0;            // softcap, 0 = off
  const acc* w = nullptr; // class weights (C,) in acc precision, or null
  acc W = 0;              // sum_c w_c (C without weight)
  bool prob = false;      // probability targets (target.dim() == 2)
};

// Per-task scratch, allocated once per at::parallel_for chunk.
template <typename acc>
struct Scratch {
  std::vector<acc> z, y, e, shift;
  Scratch(int64_t C, bool keep_row)
      : z(kBlock), y(kBlock), e(keep_row ? std::max<int64_t>(C, 1) : 0), shift(C / kBlock + 1) {}
};

template <typename acc>
struct RowStats {
  acc m = -std::numeric_limits<acc>::infinity();  // max_c z_c (NaN if the row has a NaN)
  acc shift = 0;         // exp shift of the last block: m, or 0 when m is +-inf (torch.logsumexp)
  acc sum = 0;           // sum_c exp(z_c - shift)
  acc lse = -std::numeric_limits<acc>::infinity();
  // lse = lse_hi + lse_lo with lse_hi = shift, lse_lo = log(sum): exp(z - lse) is formed as
  // exp((z - lse_hi) - lse_lo), which keeps full precision when |lse| ~ 1e4 (an fp32 lse there is
  // only good to 5e-4 absolute, which would be the relative error of every p).
  acc lse_hi = 0, lse_lo = -std::numeric_limits<acc>::infinity();
  int64_t arg_block = 0; // block holding the first maximum
  acc zt = 0;            // z[target]
  acc ref = 0;           // a logit of the row: sums of z are taken relative to it (cancellation)
  acc wz = 0;            // sum_c w_c (z_c - ref)           (label smoothing)
  acc wy = 0, wyz = 0;   // sum_c w_c y_c, sum_c w_c y_c (z_c - ref)   (soft targets)
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

template <typename scalar_t, typename acc>
inline const acc* stage_y(const scalar_t* y, int64_t n, acc* buf) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    return y;
  } else {
    convert_contig<scalar_t, acc>(y, n, buf);
    return buf;
  }
}

template <typename acc>
inline acc softcap_scalar(acc x, acc cap) { return cap == 0 ? x : cap * std::tanh(x / cap); }

// Pass 1 over a row. `keep_e` (C elements) receives exp(z_c - shift_b) when not null; `t` is the
// class-index target or -1.
template <typename scalar_t, typename acc>
RowStats<acc> row_stats(const scalar_t* x, const scalar_t* y, int64_t t, const CeConfig<acc>& cfg,
                        bool need_wz, acc* keep_e, Scratch<acc>& sc) {
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const acc ninf = -std::numeric_limits<acc>::infinity();
  RowStats<acc> st;
  const int64_t C = cfg.C;
  for (int64_t b0 = 0, b = 0; b0 < C; b0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc* zb = stage_z(x + b0, n, cfg.cap, sc.z.data());
    if (b0 == 0) st.ref = std::isfinite(zb[0]) ? zb[0] : acc(0);

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
    sc.shift[b] = st.shift;

    const Vec vshift(st.shift);
    // Two accumulators (exp latency); the same summation order with and without keep_e, so the
    // loss does not depend on compute_grad.
    Vec vs0(0), vs1(0);
    acc* eb = keep_e != nullptr ? keep_e + b0 : nullptr;
    for (i = 0; i + 2 * V <= n; i += 2 * V) {
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
      const Vec e = ce_exp(vload_fill(zb + i, k, ninf) - vshift);
      if (eb != nullptr) vstore(eb + i, e, k);
      vs0 += e;
    }
    st.sum += hsum(vs0 + vs1);

    if (t >= b0 && t < b0 + n) st.zt = zb[t - b0];

    if (need_wz || y != nullptr) {
      const Vec vref(st.ref);
      const acc* yb = y != nullptr ? stage_y(y + b0, n, sc.y.data()) : nullptr;
      Vec awz(0), awy(0), awyz(0);
      for (i = 0; i < n; i += V) {
        const int64_t k = std::min(V, n - i);
        const Vec w = cfg.w != nullptr ? vload(cfg.w + b0 + i, k) : Vec(1);
        const Vec wd = keep_lanes(w * (vload(zb + i, k) - vref), k);
        if (need_wz) awz += wd;
        if (yb != nullptr) {
          const Vec yv = vload(yb + i, k);
          awy += keep_lanes(w * yv, k);
          awyz += keep_lanes(wd * yv, k);
        }
      }
      st.wz += hsum(awz);
      st.wy += hsum(awy);
      st.wyz += hsum(awyz);
    }
  }
  st.lse_hi = st.shift;
  st.lse_lo = std::log(st.sum);
  st.lse = st.lse_hi + st.lse_lo;
  return st;
}

// Row loss from the pass-1 sums. lse - z is formed as (shift - z) + log(sum) so that a large
// common logit (|x| ~ 1e4) does not cancel in fp32.
template <typename acc>
acc row_loss(const RowStats<acc>& st, const CeConfig<acc>& cfg, int64_t t) {
  const acc logsum = std::log(st.sum);
  const acc lse_ref = (st.shift - st.ref) + logsum;  // lse - ref
  const acc epsC = cfg.C > 0 ? cfg.eps / static_cast<acc>(cfg.C) : acc(0);
  acc loss;
  if (cfg.prob) {
    const acc S = (1 - cfg.eps) * st.wy + epsC * cfg.W;
    loss = S * lse_ref - ((1 - cfg.eps) * st.wyz + epsC * st.wz);
  } else {
    const acc wt = cfg.w != nullptr ? cfg.w[t] : acc(1);
    loss = (1 - cfg.eps) * wt * ((st.shift - st.zt) + logsum);
    if (cfg.eps > 0) loss += epsC * (cfg.W * lse_ref - st.wz);
  }
  if (cfg.s != 0) loss += cfg.s * st.lse * st.lse;
  return loss;
}

// Pass 2: out_c = g * dz_c * softcap'(z_c) for every c, with dz_c = p_c * coef - sub_c, where
// p_c comes from the kept exps (forward) or exp(z_c - lse) recomputed from x (backward).
// The [c == t] term of class-index targets is patched by the caller.
template <typename scalar_t, typename acc>
void row_grad(scalar_t* out, const scalar_t* x, const scalar_t* y, const acc* kept_e,
              const RowStats<acc>& st, acc coef, acc g, const CeConfig<acc>& cfg,
              Scratch<acc>& sc) {
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  const int64_t C = cfg.C;
  const acc epsC = C > 0 ? cfg.eps / static_cast<acc>(C) : acc(0);
  const bool sub = cfg.prob || cfg.eps > 0;
  const bool need_z = kept_e == nullptr || cfg.cap != 0;
  const Vec vcap(cfg.cap), vone(1), vhi(st.lse_hi), vlo(st.lse_lo);
  // Soft targets: sub_c = w_c (g (1-eps) y_c + g eps/C); smoothing: sub_c = g (eps/C) w_c.
  const Vec vy_scale(g * (1 - cfg.eps)), vy_add(g * epsC), vsub(g * epsC);
  for (int64_t b0 = 0, b = 0; b0 < C; b0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc* zb = need_z ? stage_z(x + b0, n, cfg.cap, sc.z.data()) : nullptr;
    const acc* yb = cfg.prob ? stage_y(y + b0, n, sc.y.data()) : nullptr;
    const acc* wb = cfg.w != nullptr ? cfg.w + b0 : nullptr;
    scalar_t* ob = out + b0;
    if (kept_e != nullptr && !sub && cfg.cap == 0) {  // the common case: one multiply per element
      const Vec a(g * coef * std::exp((sc.shift[b] - st.lse_hi) - st.lse_lo));
      const acc* eb = kept_e + b0;
      int64_t i = 0;
      for (; i + V <= n; i += V) vstore_as<scalar_t, acc>(ob + i, Vec::loadu(eb + i) * a, V);
      if (i < n) vstore_as<scalar_t, acc>(ob + i, vload(eb + i, n - i) * a, n - i);
      continue;
    }
    const Vec a(g * coef *
                (kept_e != nullptr ? std::exp((sc.shift[b] - st.lse_hi) - st.lse_lo) : acc(1)));
    for (int64_t i = 0; i < n; i += V) {
      const int64_t k = std::min(V, n - i);
      const Vec p = kept_e != nullptr ? vload(kept_e + b0 + i, k) : ce_exp((vload(zb + i, k) - vhi) - vlo);
      Vec d = p * a;
      if (cfg.prob) {
        const Vec yv = vy_scale * vload(yb + i, k) + vy_add;
        d = d - (wb != nullptr ? vload(wb + i, k) * yv : yv);
      } else if (sub) {
        d = d - (wb != nullptr ? vload(wb + i, k) * vsub : vsub);
      }
      if (cfg.cap != 0) {
        const Vec zc = vload(zb + i, k) / vcap;
        d = d * (vone - zc * zc);
      }
      vstore_as<scalar_t, acc>(ob + i, d, k);
    }
  }
}

template <typename acc>
acc class_coef(const RowStats<acc>& st, const CeConfig<acc>& cfg, int64_t t, acc S) {
  const acc epsC = cfg.C > 0 ? cfg.eps / static_cast<acc>(cfg.C) : acc(0);
  acc coef = cfg.prob ? S
                      : (1 - cfg.eps) * (cfg.w != nullptr ? cfg.w[t] : acc(1)) + epsC * cfg.W;
  if (cfg.s != 0) coef += 2 * cfg.s * st.lse;
  return coef;
}

// The target element of a class-index row, computed whole (one rounding).
template <typename scalar_t, typename acc>
void patch_target(scalar_t* out, int64_t t, acc zt, const RowStats<acc>& st, acc coef, acc g,
                  const CeConfig<acc>& cfg) {
  const acc wt = cfg.w != nullptr ? cfg.w[t] : acc(1);
  const acc epsC = cfg.C > 0 ? cfg.eps / static_cast<acc>(cfg.C) : acc(0);
  acc d = std::exp((zt - st.lse_hi) - st.lse_lo) * coef - (1 - cfg.eps) * wt - epsC * wt;
  if (cfg.cap != 0) d *= 1 - (zt / cfg.cap) * (zt / cfg.cap);
  out[t] = static_cast<scalar_t>(g * d);
}

// argmax (first maximum; the first NaN when there is one, as torch.argmax) and its probability.
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
  *conf = static_cast<float>(std::exp((st.m - st.shift) - std::log(st.sum)));
}

// ---------------------------------------------------------------------------------------------
// Boundary: validation and the fixed parts of the config.

struct CeArgs {
  Tensor w_acc;  // weight in acc precision (undefined when None)
  bool prob = false;
};

CeArgs check_ce(const char* op, const Tensor& logits, const Tensor& target,
                const std::optional<Tensor>& weight, int64_t ignore_index, double eps,
                double softcap) {
  check_logits(op, logits, /*need_unit_col_stride=*/true);
  const int64_t R = logits.size(0), C = logits.size(1);
  check_same_device(op, "target", target);
  CeArgs a;
  if (target.dim() == 1) {
    TORCH_CHECK(target.scalar_type() == at::kLong, op,
                ": class-index target must be int64, got ", target.scalar_type());
    TORCH_CHECK(target.size(0) == R, op, ": target must have shape (", R, ",) for logits ",
                logits.sizes(), ", got ", target.sizes());
    // Out-of-range class indices raise before any kernel reads x[target] (R int64 reads).
    const int64_t* t = target.data_ptr<int64_t>();
    const int64_t ts = target.stride(0);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t v = t[r * ts];
      if (v != ignore_index && (v < 0 || v >= C)) {
        TORCH_CHECK_INDEX(false, "Target ", v, " is out of bounds.");
      }
    }
  } else if (target.dim() == 2) {
    TORCH_CHECK(target.scalar_type() == logits.scalar_type(), op,
                ": probability target must have the logits' dtype ", logits.scalar_type(),
                ", got ", target.scalar_type());
    TORCH_CHECK(target.sizes() == logits.sizes(), op,
                ": probability target must have the logits' shape ", logits.sizes(), ", got ",
                target.sizes());
    TORCH_CHECK(C <= 1 || target.stride(1) == 1, op,
                ": probability target must have stride(1) == 1, got strides ", target.strides());
    a.prob = true;
  } else {
    TORCH_CHECK(false, op, ": target must be (rows,) class indices or (rows, classes) "
                "probabilities, got shape ", target.sizes());
  }
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (weight.has_value() && weight->defined()) {
    a.w_acc = class_vector(op, "weight", *weight, C, acc_dtype);
  }
  TORCH_CHECK(eps >= 0.0 && eps <= 1.0, op, ": label_smoothing must be in [0, 1], got ", eps);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op,
              ": softcap must be finite and >= 0 (0 = off), got ", softcap);
  return a;
}

template <typename acc>
CeConfig<acc> make_config(const Tensor& logits, const CeArgs& a, int64_t ignore_index, double eps,
                          double s, double cap) {
  CeConfig<acc> cfg;
  cfg.C = logits.size(1);
  cfg.ignore_index = ignore_index;
  cfg.eps = static_cast<acc>(eps);
  cfg.s = static_cast<acc>(s);
  cfg.cap = static_cast<acc>(cap);
  cfg.prob = a.prob;
  if (a.w_acc.defined()) {
    cfg.w = a.w_acc.data_ptr<acc>();
    cfg.W = static_cast<acc>(a.w_acc.sum(at::kDouble).item<double>());
  } else {
    cfg.W = static_cast<acc>(cfg.C);
  }
  return cfg;
}

// The forward of softmax_ce_fwd (grad into `grad`) and softmax_ce_fwd_inplace (grad into logits).
template <typename scalar_t>
void ce_forward_kernel(const Tensor& logits, const Tensor& target, const CeConfig<acc_type<scalar_t>>& cfg,
                       double g_scale, scalar_t* grad, bool inplace, bool decode,
                       acc_type<scalar_t>* loss, acc_type<scalar_t>* lse, int64_t* pred,
                       float* conf) {
  using acc = acc_type<scalar_t>;
  const int64_t R = logits.size(0), C = cfg.C;
  scalar_t* xbase = logits.data_ptr<scalar_t>();
  const int64_t xs = logits.stride(0);
  const int64_t* tgt = cfg.prob ? nullptr : target.data_ptr<int64_t>();
  const int64_t ts = cfg.prob ? 0 : target.stride(0);
  const scalar_t* ybase = cfg.prob ? target.data_ptr<scalar_t>() : nullptr;
  const int64_t ys = cfg.prob ? target.stride(0) : 0;
  const bool want_grad = grad != nullptr;
  // fp32/fp64 out of place: the exps live in the gradient buffer itself; otherwise in a
  // per-thread acc row (fp16/bf16 gradients, or the logits that must be read before overwritten).
  constexpr bool same = std::is_same_v<scalar_t, acc>;
  const bool e_in_grad = want_grad && !inplace && same;
  const bool keep_row = want_grad && !e_in_grad;
  const acc g = static_cast<acc>(g_scale);
  at::parallel_for(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
    Scratch<acc> sc(C, keep_row);
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* x = xbase + r * xs;
      const scalar_t* y = cfg.prob ? ybase + r * ys : nullptr;
      const int64_t t = cfg.prob ? -1 : tgt[r * ts];
      const bool ignored = !cfg.prob && t == cfg.ignore_index;
      scalar_t* out = !want_grad ? nullptr : (inplace ? x : grad + r * C);
      acc* keep = nullptr;
      if (want_grad && !ignored) keep = e_in_grad ? reinterpret_cast<acc*>(out) : sc.e.data();
      const RowStats<acc> st = row_stats<scalar_t, acc>(x, y, ignored ? -1 : t, cfg,
                                                        cfg.eps > 0 && !ignored, keep, sc);
      lse[r] = st.lse;
      loss[r] = ignored ? acc(0) : row_loss(st, cfg, t);
      if (decode) decode_row(x, st, cfg, sc, pred + r, conf + r);  // before x is overwritten
      if (!want_grad) continue;
      if (ignored) {
        std::fill(out, out + C, static_cast<scalar_t>(0));
        continue;
      }
      const acc S = cfg.prob ? (1 - cfg.eps) * st.wy +
                                   (C > 0 ? cfg.eps / static_cast<acc>(C) : acc(0)) * cfg.W
                             : acc(0);
      const acc coef = class_coef(st, cfg, t, S);
      row_grad<scalar_t, acc>(out, x, y, keep, st, coef, g, cfg, sc);
      if (!cfg.prob) patch_target(out, t, st.zt, st, coef, g, cfg);
    }
  });
}

struct FwdOut {
  Tensor loss, lse, pred, conf;
};

FwdOut ce_forward(const char* op, const Tensor& logits, const Tensor& target,
                  const std::optional<Tensor>& weight, const std::optional<Tensor>& grad_scale,
                  int64_t ignore_index, double eps, double s, double cap, Tensor* grad,
                  bool inplace, bool decode) {
  const CeArgs a = check_ce(op, logits, target, weight, ignore_index, eps, cap);
  const double g = read_grad_scale(op, grad_scale);
  const int64_t R = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  // loss and lse in the accumulation dtype (fp64 for fp64 logits), confidence in fp32.
  const auto acc_opts = logits.options().dtype(
      logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  FwdOut o;
  o.loss = at::empty({R}, acc_opts);
  o.lse = at::empty({R}, acc_opts);
  o.pred = at::empty({decode ? R : 0}, logits.options().dtype(at::kLong));
  o.conf = at::empty({decode ? R : 0}, f32);
  FUSEDLOSS_DISPATCH_FLOATING(logits.scalar_type(), "softmax_ce_fwd", [&] {
    using acc = acc_type<scalar_t>;
    const CeConfig<acc> cfg = make_config<acc>(logits, a, ignore_index, eps, s, cap);
    scalar_t* gp = inplace ? logits.data_ptr<scalar_t>()
                           : (grad != nullptr ? grad->data_ptr<scalar_t>() : nullptr);
    ce_forward_kernel<scalar_t>(logits, target, cfg, g, gp, inplace, decode,
                                o.loss.data_ptr<acc>(), o.lse.data_ptr<acc>(),
                                decode ? o.pred.data_ptr<int64_t>() : nullptr,
                                decode ? o.conf.data_ptr<float>() : nullptr);
  });
  return o;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> softmax_ce_fwd_cpu(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool compute_grad, bool decode) {
  check_logits("softmax_ce_fwd", logits, true);
  Tensor grad = compute_grad ? new_2d_output(logits.size(0), logits.size(1), logits.options())
                             : at::empty({0}, logits.options());
  FwdOut o = ce_forward("softmax_ce_fwd", logits, target, weight, grad_scale, ignore_index,
                        label_smoothing, lse_square_scale, softcap,
                        compute_grad ? &grad : nullptr, /*inplace=*/false, decode);
  return {o.loss, o.lse, grad, o.pred, o.conf};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> softmax_ce_fwd_inplace_cpu(
    Tensor& logits,  // Tensor(a!): `Tensor&`, as the CUDA kernel's signature
    const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double lse_square_scale, double softcap, bool decode) {
  FwdOut o = ce_forward("softmax_ce_fwd_inplace", logits, target, weight, grad_scale,
                        ignore_index, label_smoothing, lse_square_scale, softcap, nullptr,
                        /*inplace=*/true, decode);
  return {o.loss, o.lse, o.pred, o.conf};
}

// Backward for reduction='none': recompute p = exp(z - lse) from the saved lse, scale each row
// by its incoming gradient. One read of the logits (two rows' worth of reads for soft targets:
// S needs the whole row first), one write of the gradient.
Tensor softmax_ce_bwd_cpu(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                          const std::optional<Tensor>& weight, const Tensor& lse,
                          int64_t ignore_index, double label_smoothing, double lse_square_scale,
                          double softcap) {
  const char* op = "softmax_ce_bwd";
  const CeArgs a = check_ce(op, logits, target, weight, ignore_index, label_smoothing, softcap);
  const int64_t R = logits.size(0), C = logits.size(1);
  check_same_device(op, "grad_loss", grad_loss);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == R, op,
              ": grad_loss must have shape (", R, ",), got ", grad_loss.sizes());
  TORCH_CHECK(is_float_dtype(grad_loss.scalar_type()), op, ": grad_loss must be floating, got ",
              grad_loss.scalar_type());
  check_same_device(op, "lse", lse);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == R, op, ": lse must have shape (", R, ",), got ",
              lse.sizes());
  TORCH_CHECK(is_float_dtype(lse.scalar_type()), op, ": lse must be floating, got ",
              lse.scalar_type());
  Tensor grad = new_2d_output(R, C, logits.options());
  FUSEDLOSS_DISPATCH_FLOATING(logits.scalar_type(), "softmax_ce_bwd", [&] {
    using acc = acc_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc>::value;
    const CeConfig<acc> cfg = make_config<acc>(logits, a, ignore_index, label_smoothing,
                                               lse_square_scale, softcap);
    // (R,) vectors in acc precision (R elements: negligible; also resolves stride-0 grad_loss).
    const Tensor gl = grad_loss.to(acc_dtype).contiguous();
    const Tensor ls = lse.to(acc_dtype).contiguous();
    const acc* glp = gl.data_ptr<acc>();
    const acc* lsp = ls.data_ptr<acc>();
    const scalar_t* xbase = logits.data_ptr<scalar_t>();
    const int64_t xs = logits.stride(0);
    const int64_t* tgt = cfg.prob ? nullptr : target.data_ptr<int64_t>();
    const int64_t ts = cfg.prob ? 0 : target.stride(0);
    const scalar_t* ybase = cfg.prob ? target.data_ptr<scalar_t>() : nullptr;
    const int64_t ys = cfg.prob ? target.stride(0) : 0;
    scalar_t* gbase = grad.data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
      using Vec = Vectorized<acc>;
      Scratch<acc> sc(C, false);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = xbase + r * xs;
        const scalar_t* y = cfg.prob ? ybase + r * ys : nullptr;
        const int64_t t = cfg.prob ? -1 : tgt[r * ts];
        scalar_t* out = gbase + r * C;
        if (!cfg.prob && t == cfg.ignore_index) {
          std::fill(out, out + C, static_cast<scalar_t>(0));
          continue;
        }
        RowStats<acc> st;
        st.lse = st.lse_hi = lsp[r];
        st.lse_lo = 0;
        acc S = 0;
        if (cfg.prob) {  // S = sum_c w_c y'_c needs the whole row before the gradient
          Vec awy(0);
          for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
            const int64_t n = std::min(kBlock, C - b0);
            const acc* yb = stage_y(y + b0, n, sc.y.data());
            for (int64_t i = 0; i < n; i += Vec::size()) {
              const int64_t k = std::min<int64_t>(Vec::size(), n - i);
              const Vec yv = vload(yb + i, k);
              awy += cfg.w != nullptr ? vload(cfg.w + b0 + i, k) * yv : yv;
            }
          }
          S = (1 - cfg.eps) * hsum(awy) + (C > 0 ? cfg.eps / static_cast<acc>(C) : acc(0)) * cfg.W;
        }
        const acc coef = class_coef(st, cfg, t, S);
        row_grad<scalar_t, acc>(out, x, y, nullptr, st, coef, glp[r], cfg, sc);
        if (!cfg.prob) {
          const acc zt = softcap_scalar(static_cast<acc>(x[t]), cfg.cap);
          patch_target(out, t, zt, st, coef, glp[r], cfg);
        }
      }
    });
  });
  return grad;
}

std::tuple<Tensor, Tensor> softmax_decode_cpu(const Tensor& logits, double softcap) {
  const char* op = "softmax_decode";
  check_logits(op, logits, true);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op,
              ": softcap must be finite and >= 0 (0 = off), got ", softcap);
  const int64_t R = logits.size(0), C = logits.size(1);
  Tensor pred = at::empty({R}, logits.options().dtype(at::kLong));
  Tensor conf = at::empty({R}, logits.options().dtype(at::kFloat));
  FUSEDLOSS_DISPATCH_FLOATING(logits.scalar_type(), "softmax_decode", [&] {
    using acc = acc_type<scalar_t>;
    CeConfig<acc> cfg;
    cfg.C = C;
    cfg.cap = static_cast<acc>(softcap);
    const scalar_t* xbase = logits.data_ptr<scalar_t>();
    const int64_t xs = logits.stride(0);
    int64_t* pp = pred.data_ptr<int64_t>();
    float* cp = conf.data_ptr<float>();
    at::parallel_for(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
      Scratch<acc> sc(C, false);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = xbase + r * xs;
        const RowStats<acc> st = row_stats<scalar_t, acc>(x, nullptr, -1, cfg, false, nullptr, sc);
        decode_row(x, st, cfg, sc, pp + r, cp + r);
      }
    });
  });
  return {pred, conf};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("softmax_ce_fwd", &softmax_ce_fwd_cpu);
  m.impl("softmax_ce_fwd_inplace", &softmax_ce_fwd_inplace_cpu);
  m.impl("softmax_ce_bwd", &softmax_ce_bwd_cpu);
  m.impl("softmax_decode", &softmax_decode_cpu);
}

}  // namespace cpu
}  // namespace fusedloss
