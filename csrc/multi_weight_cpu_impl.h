// Row kernels of mp_weights' CPU twins, included by multi_weight_cpu.cpp once per instruction set
// (inside mpk::cpu::mw_<isa>, under a matching `#pragma GCC target`), like mp_cpu_impl.h. No
// include guard on purpose. Uses to_f / from_f (csrc/cpu_common.h) and gain_of / inv_sqrt
// (multi_weight_cpu.cpp).
namespace {

#include "row_sums_cpu_impl.h"

template <typename TW, typename TO>
void fwd_row(const WeightRows& t, int64_t row, float eps, float* rms) {
  const int64_t len = t.len;
  const TW* __restrict__ w = static_cast<const TW*>(t.w) + row * len;
  TO* __restrict__ out = static_cast<TO*>(t.out) + qkv_out_row(static_cast<int32_t>(row), static_cast<int32_t>(t.qkv_rows)) * len;
  const float rv = rms_from_sumsq(sumsq(w, len), 1.0f / static_cast<float>(len));
  rms[t.stat + row] = rv;
  const float sc = inv_denom(rv, eps) * (gain_of(t) / std::sqrt(static_cast<float>(len)));
  for (int64_t i = 0; i < len; ++i) out[i] = from_f<TO>(to_f(w[i]) * sc);
}

// gw = k (g r - coef w (g . w)), k = gain / sqrt(len); partial = r (g . w) for d / d gain.
template <typename TW, typename TG>
void bwd_row(const WeightRows& t, int64_t row, float eps, const float* rms, float* partial) {
  const int64_t len = t.len;
  const TW* w = static_cast<const TW*>(t.w) + row * len;
  TW* __restrict__ gw = static_cast<TW*>(t.out) + row * len;
  float* part = partial && t.gain_ptr ? partial + t.stat + row : nullptr;
  if (!t.grad) {  // the effective weight got no gradient
    std::fill(gw, gw + len, from_f<TW>(0.0f));
    if (part) *part = 0.0f;
    return;
  }
  const TG* g = static_cast<const TG*>(t.grad) +
                qkv_out_row(static_cast<int32_t>(row), static_cast<int32_t>(t.qkv_rows)) * len;
  const float inv_sqrt_len = inv_sqrt(len), k = gain_of(t) * inv_sqrt_len;
  const float rv = rms[t.stat + row], r = inv_denom(rv, eps);
  const float d = dot(g, w, len);
  const float a = r * k, cd = norm_grad_coef(r, rv, 1.0f / static_cast<float>(len)) * d * k;
  for (int64_t i = 0; i < len; ++i) gw[i] = from_f<TW>(to_f(g[i]) * a - cd * to_f(w[i]));
  if (part) *part = r * d;
}

}  // namespace

// Rows [b, e) of the concatenated rows of `ws` (first[t]: weight t's first row).
inline void fwd_rows(DType out_dtype, const WeightRows* ws, const int64_t* first, int64_t b, int64_t e, float eps,
                     float* rms) {
  int64_t t = 0;
  while (b >= first[t + 1]) ++t;
  for (int64_t i = b; i < e; ++i) {
    while (i >= first[t + 1]) ++t;
    const WeightRows& w = ws[t];
    MPK_CPU_DISPATCH(out_dtype, TO, MPK_CPU_DISPATCH(w.w_dtype, TW, fwd_row<TW, TO>(w, i - first[t], eps, rms)));
  }
}

inline void bwd_rows(DType grad_dtype, const WeightRows* ws, const int64_t* first, int64_t b, int64_t e, float eps,
                     const float* rms, float* partial) {
  int64_t t = 0;
  while (b >= first[t + 1]) ++t;
  for (int64_t i = b; i < e; ++i) {
    while (i >= first[t + 1]) ++t;
    const WeightRows& w = ws[t];
    MPK_CPU_DISPATCH(grad_dtype, TG,
                    MPK_CPU_DISPATCH(w.w_dtype, TW, bwd_row<TW, TG>(w, i - first[t], eps, rms, partial)));
  }
}
