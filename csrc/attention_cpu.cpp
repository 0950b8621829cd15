// CPU twin of csrc/attention.cu: cosine attention's normalization of q, k and v (spec §1),
// forward and backward, fp32 math (csrc/mp_math.h), parallel with at::parallel_for.
// NCHW input (unit pixel stride): one task per (n, head, j) that keeps per-pixel statistics in an
// fp32 vector, so that the inner loops run over contiguous pixels. Otherwise one task per pixel
// range, inner loops over d.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attention_cat.h"
#include "cpu_common.h"
#include "mp_math.h"

namespace mpk {
namespace cpu {
namespace {

inline int64_t rms_index(const QkvView& s, int64_t j, int64_t n, int64_t l, int64_t head) {
  return ((j * s.N + n) * s.L + l) * s.heads + head;
}

template <typename T>
void fwd_t(const QkvView& s, const T* x, T* const* out, const HeadsStrides& os, float* rms, float eps) {
  const float inv_k = 1.0f / static_cast<float>(s.D);
  const int64_t sd = s.cd * s.sC;
  if (s.sL == 1 && s.L > 1) {  // NCHW: per (n, head, j), vectors over pixels
    const int64_t tasks = s.N * s.heads * 3;
    at::parallel_for(0, tasks, 1, [=](int64_t b, int64_t e) {
      std::vector<float> acc(s.L);
      for (int64_t t = b; t < e; ++t) {
        const int64_t j = t % 3, head = (t / 3) % s.heads, n = t / (3 * s.heads);
        const T* xr = x + n * s.sN + (head * 3 * s.D + j * s.cj) * s.sC;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t d = 0; d < s.D; ++d) {
          const T* xd = xr + d * sd;
          for (int64_t l = 0; l < s.L; ++l) {
            const float v = to_f(xd[l]);
            acc[l] += v * v;
          }
        }
        for (int64_t l = 0; l < s.L; ++l) {
          const float rm = rms_from_sumsq(acc[l], inv_k);
          rms[rms_index(s, j, n, l, head)] = rm;
          acc[l] = inv_denom(rm, eps);
        }
        T* yr = out[j] + n * os.sN + head * os.sH;
        for (int64_t d = 0; d < s.D; ++d) {
          const T* xd = xr + d * sd;
          T* yd = yr + d * os.sD;
          for (int64_t l = 0; l < s.L; ++l) yd[l * os.sL] = static_cast<T>(to_f(xd[l]) * acc[l]);
        }
      }
    });
    return;
  }
  const int64_t pixels = s.N * s.L;
  at::parallel_for(0, pixels, 1, [=](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t n = p / s.L, l = p % s.L;
      for (int64_t head = 0; head < s.heads; ++head)
        for (int64_t j = 0; j < 3; ++j) {
          const T* xr = x + n * s.sN + (head * 3 * s.D + j * s.cj) * s.sC + l * s.sL;
          float acc = 0.0f;
          for (int64_t d = 0; d < s.D; ++d) {
            const float v = to_f(xr[d * sd]);
            acc += v * v;
          }
          const float rm = rms_from_sumsq(acc, inv_k);
          const float inv = inv_denom(rm, eps);
          rms[rms_index(s, j, n, l, head)] = rm;
          T* yr = out[j] + n * os.sN + l * os.sL + head * os.sH;
          for (int64_t d = 0; d < s.D; ++d) yr[d * os.sD] = static_cast<T>(to_f(xr[d * sd]) * inv);
        }
    }
  });
}

template <typename T>
void bwd_t(const QkvView& s, const T* const* g, const HeadsStrides* gs, const T* x, const float* rms, T* gx,
           int64_t osN, int64_t osC, int64_t osL, float eps) {
  const float inv_k = 1.0f / static_cast<float>(s.D);
  const int64_t sd = s.cd * s.sC, od = s.cd * osC;
  if (s.sL == 1 && osL == 1 && s.L > 1) {  // NCHW: per (n, head, j), vectors over pixels
    const int64_t tasks = s.N * s.heads * 3;
    at::parallel_for(0, tasks, 1, [=](int64_t b, int64_t e) {
      std::vector<float> dot(s.L), inv(s.L);
      for (int64_t t = b; t < e; ++t) {
        const int64_t j = t % 3, head = (t / 3) % s.heads, n = t / (3 * s.heads);
        const int64_t ch = head * 3 * s.D + j * s.cj;
        const T* xr = x + n * s.sN + ch * s.sC;
        const HeadsStrides& q = gs[j];
        const T* gr = g[j] + n * q.sN + head * q.sH;
        std::fill(dot.begin(), dot.end(), 0.0f);
        for (int64_t d = 0; d < s.D; ++d) {
          const T* xd = xr + d * sd;
          const T* gd = gr + d * q.sD;
          for (int64_t l = 0; l < s.L; ++l) dot[l] += to_f(gd[l * q.sL]) * to_f(xd[l]);
        }
        for (int64_t l = 0; l < s.L; ++l) {
          const float rm = rms[rms_index(s, j, n, l, head)];
          inv[l] = inv_denom(rm, eps);
          dot[l] *= norm_grad_coef(inv[l], rm, inv_k);
        }
        T* outr = gx + n * osN + ch * osC;
        for (int64_t d = 0; d < s.D; ++d) {
          const T* xd = xr + d * sd;
          const T* gd = gr + d * q.sD;
          T* od_ = outr + d * od;
          for (int64_t l = 0; l < s.L; ++l) od_[l] = static_cast<T>(to_f(gd[l * q.sL]) * inv[l] - dot[l] * to_f(xd[l]));
        }
      }
    });
    return;
  }
  const int64_t pixels = s.N * s.L;
  at::parallel_for(0, pixels, 1, [=](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t n = p / s.L, l = p % s.L;
      for (int64_t head = 0; head < s.heads; ++head)
        for (int64_t j = 0; j < 3; ++j) {
          const int64_t ch = head * 3 * s.D + j * s.cj;
          const T* xr = x + n * s.sN + ch * s.sC + l * s.sL;
          const HeadsStrides& q = gs[j];
          const T* gr = g[j] + n * q.sN + l * q.sL + head * q.sH;
          float dot = 0.0f;
          for (int64_t d = 0; d < s.D; ++d) dot += to_f(gr[d * q.sD]) * to_f(xr[d * sd]);
          const float rm = rms[rms_index(s, j, n, l, head)];
          const float inv = inv_denom(rm, eps);
          const float coef = norm_grad_coef(inv, rm, inv_k) * dot;
          T* outr = gx + n * osN + ch * osC + l * osL;
          for (int64_t d = 0; d < s.D; ++d) outr[d * od] = static_cast<T>(to_f(gr[d * q.sD]) * inv - coef * to_f(xr[d * sd]));
        }
    }
  });
}

}  // namespace

void qkv_normalize_fwd(DType dt, const QkvView& s, const void* x, void* const* qkv_out, const HeadsStrides& os,
                       float* rms, float eps) {
  if (s.N * s.L * s.heads == 0) return;
  MPK_CPU_DISPATCH(dt, T, {
    T* out[3] = {static_cast<T*>(qkv_out[0]), static_cast<T*>(qkv_out[1]), static_cast<T*>(qkv_out[2])};
    fwd_t<T>(s, static_cast<const T*>(x), out, os, rms, eps);
  });
}

void qkv_normalize_bwd(DType dt, const QkvView& s, const void* const* grads, const HeadsStrides* gs, const void* x,
                       const float* rms, void* gx, int64_t osN, int64_t osC, int64_t osL, float eps) {
  if (s.N * s.L * s.heads == 0) return;
  MPK_CPU_DISPATCH(dt, T, {
    const T* g[3] = {static_cast<const T*>(grads[0]), static_cast<const T*>(grads[1]),
                     static_cast<const T*>(grads[2])};
    bwd_t<T>(s, g, gs, static_cast<const T*>(x), rms, static_cast<T*>(gx), osN, osC, osL, eps);
  });
}

}  // namespace cpu
}  // namespace mpk
