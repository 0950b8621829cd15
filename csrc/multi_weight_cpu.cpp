// CPU twins of the mp_weights launchers (csrc/multi_weight.h): the rows of all weights of a call
// form one range that at::parallel_for splits, so a list of many small weights costs one parallel
// region, not one per weight. Per-row math as the single-weight twin (csrc/mp_cpu_impl.h): fp32
// sums with eight partial sums, scale = gain / sqrt(len) / (eps + rms).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "multi_weight.h"

namespace mpk {
namespace cpu {
namespace {

inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
inline float to_f(c10::BFloat16 v) {  // branch-free widening (vectorises)
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }
template <>
inline c10::BFloat16 from_f<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  r = f != f ? 0x7FC0u : r;                              // NaN stays a (quiet) NaN
  return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
}

#define MPK_MW_CASE(enum_value, type, T, ...) \
  case DType::enum_value: {                   \
    using T = type;                           \
    __VA_ARGS__;                              \
    break;                                    \
  }
#define MPK_MW_DISPATCH(dt, T, ...)                  \
  switch (dt) {                                      \
    MPK_MW_CASE(F32, float, T, __VA_ARGS__)          \
    MPK_MW_CASE(F16, c10::Half, T, __VA_ARGS__)      \
    MPK_MW_CASE(BF16, c10::BFloat16, T, __VA_ARGS__) \
  }

inline float load_any(const void* p, DType dt) {
  switch (dt) {
    case DType::F16: return to_f(*static_cast<const c10::Half*>(p));
    case DType::BF16: return to_f(*static_cast<const c10::BFloat16*>(p));
    default: return *static_cast<const float*>(p);
  }
}

inline void store_any(void* p, DType dt, float v) {
  switch (dt) {
    case DType::F16: *static_cast<c10::Half*>(p) = from_f<c10::Half>(v); break;
    case DType::BF16: *static_cast<c10::BFloat16*>(p) = from_f<c10::BFloat16>(v); break;
    default: *static_cast<float*>(p) = v;
  }
}

template <typename T>
inline float sumsq(const T* p, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const float v = to_f(p[i + j]);
      acc[j] += v * v;
    }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) {
    const float v = to_f(p[i]);
    s += v * v;
  }
  return s;
}

template <typename TA, typename TB>
inline float dot(const TA* a, const TB* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += to_f(a[i + j]) * to_f(b[i + j]);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += to_f(a[i]) * to_f(b[i]);
  return s;
}

inline float gain_of(const WeightRows& t) { return t.gain_ptr ? load_any(t.gain_ptr, t.gain_dtype) : t.gain; }
inline float inv_sqrt(int64_t len) { return 1.0f / std::sqrt(static_cast<float>(len)); }

// Calls row_fn(t, row) for every row of every weight, in parallel over the concatenated rows.
template <typename RowFn>
void for_each_row(const WeightRows* ws, int64_t count, RowFn row_fn) {
  std::vector<int64_t> first(count + 1, 0);  // first[t]: index of weight t's first row
  int64_t elems = 0;
  for (int64_t t = 0; t < count; ++t) {
    first[t + 1] = first[t] + ws[t].rows;
    elems += ws[t].rows * ws[t].len;
  }
  const int64_t total = first[count];
  if (total == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elems / total));
  at::parallel_for(0, total, grain, [&](int64_t b, int64_t e) {
    int64_t t = std::upper_bound(first.begin(), first.end(), b) - first.begin() - 1;
    for (int64_t i = b; i < e; ++i) {
      while (i >= first[t + 1]) ++t;
      row_fn(ws[t], i - first[t]);
    }
  });
}

template <typename TW, typename TO>
void fwd_row(const WeightRows& t, int64_t row, float eps, float* rms) {
  const int64_t len = t.len;
  const TW* w = static_cast<const TW*>(t.w) + row * len;
  TO* out = static_cast<TO*>(t.out) + qkv_out_row(static_cast<int32_t>(row), static_cast<int32_t>(t.qkv_rows)) * len;
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
  TW* gw = static_cast<TW*>(t.out) + row * len;
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

void mp_weights_fwd(DType out_dtype, const WeightRows* weights, int64_t count, float eps, float* rms) {
  for_each_row(weights, count, [&](const WeightRows& t, int64_t row) {
    MPK_MW_DISPATCH(out_dtype, TO, MPK_MW_DISPATCH(t.w_dtype, TW, fwd_row<TW, TO>(t, row, eps, rms)));
  });
}

void mp_weights_bwd(DType grad_dtype, const WeightRows* weights, int64_t count, float eps, const float* rms,
                    float* partial) {
  for_each_row(weights, count, [&](const WeightRows& t, int64_t row) {
    MPK_MW_DISPATCH(grad_dtype, TG, MPK_MW_DISPATCH(t.w_dtype, TW, bwd_row<TW, TG>(t, row, eps, rms, partial)));
  });
}

void mp_weights_gain_grads(const GainGrad* gains, int64_t count, const float* partial) {
  for (int64_t j = 0; j < count; ++j) {
    const GainGrad& g = gains[j];
    float tot = 0.0f;
    for (int64_t o = 0; o < g.rows; ++o) tot += partial[g.stat + o];
    store_any(g.out, g.dtype, tot * inv_sqrt(g.len));
  }
}

}  // namespace cpu
}  // namespace mpk
