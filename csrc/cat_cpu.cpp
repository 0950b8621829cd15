// CPU twin of csrc/cat.cu: mp_cat (spec §1) forward and backward on row-major [M, K] matrices,
// parallel over rows with at::parallel_for, inner loops over contiguous columns in fp32; and the
// fused mp_cat_mp_silu forward (x and y = mp_silu(x) of the rounded x) and backward.
#include <ATen/Parallel.h>

#include <cstdint>

#include "attention_cat.h"
#include "cpu_common.h"
#include "mp_math.h"

namespace mpk {
namespace cpu {
namespace {

template <typename T>
inline void scale_row(const T* src, T* dst, int64_t k, float scale) {
  for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]) * scale);
}

template <typename T>
void cat_t(int64_t M, int64_t Ka, int64_t Kb, const T* a, const T* b, T* out, float ca, float cb) {
  const int64_t K = Ka + Kb;
  at::parallel_for(0, M, grain_for(K), [=](int64_t s, int64_t e) {
    for (int64_t m = s; m < e; ++m) {
      scale_row(a + m * Ka, out + m * K, Ka, ca);
      scale_row(b + m * Kb, out + m * K + Ka, Kb, cb);
    }
  });
}

template <typename T>
void split_t(int64_t M, int64_t Ka, int64_t Kb, const T* g, T* ga, T* gb, float ca, float cb) {
  const int64_t K = Ka + Kb;
  at::parallel_for(0, M, grain_for(K), [=](int64_t s, int64_t e) {
    for (int64_t m = s; m < e; ++m) {
      scale_row(g + m * K, ga + m * Ka, Ka, ca);
      scale_row(g + m * K + Ka, gb + m * Kb, Kb, cb);
    }
  });
}

}  // namespace

// The fused rows, compiled for SSE2, AVX2+FMA and AVX-512 (as csrc/mp_cpu.cpp's twins).
namespace cs_default {
#include "cat_silu_cpu_impl.h"
}  // namespace cs_default

#if MPK_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace cs_avx2 {
#include "cat_silu_cpu_impl.h"
}  // namespace cs_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace cs_avx512 {
#include "cat_silu_cpu_impl.h"
}  // namespace cs_avx512
#pragma GCC pop_options
#endif

namespace {

template <typename T>
void cat_silu_t(int64_t M, int64_t Ka, int64_t Kb, const T* a, const T* b, T* x, T* y, float ca, float cb) {
  const int64_t K = Ka + Kb;
  const int isa = isa_level();
  at::parallel_for(0, M, grain_for(K), [=](int64_t s, int64_t e) {
#if MPK_CPU_MULTI_ISA
    if (isa == 2) return cs_avx512::cat_silu_rows<T>(s, e, Ka, Kb, a, b, x, y, ca, cb);
    if (isa == 1) return cs_avx2::cat_silu_rows<T>(s, e, Ka, Kb, a, b, x, y, ca, cb);
#endif
    cs_default::cat_silu_rows<T>(s, e, Ka, Kb, a, b, x, y, ca, cb);
  });
}

template <typename T, bool kGx, bool kGy>
void cat_silu_bwd_t(int64_t M, int64_t Ka, int64_t Kb, const T* gx, const T* gy, const T* x, T* ga, T* gb, float ca,
                    float cb) {
  const int64_t K = Ka + Kb;
  const int isa = isa_level();
  at::parallel_for(0, M, grain_for(K), [=](int64_t s, int64_t e) {
#if MPK_CPU_MULTI_ISA
    if (isa == 2) return cs_avx512::cat_silu_grad_rows<T, kGx, kGy>(s, e, Ka, Kb, gx, gy, x, ga, gb, ca, cb);
    if (isa == 1) return cs_avx2::cat_silu_grad_rows<T, kGx, kGy>(s, e, Ka, Kb, gx, gy, x, ga, gb, ca, cb);
#endif
    cs_default::cat_silu_grad_rows<T, kGx, kGy>(s, e, Ka, Kb, gx, gy, x, ga, gb, ca, cb);
  });
}

template <typename T>
void cat_silu_bwd_any(int64_t M, int64_t Ka, int64_t Kb, const T* gx, const T* gy, const T* x, T* ga, T* gb, float ca,
                      float cb) {
  if (gx != nullptr && gy != nullptr)
    cat_silu_bwd_t<T, true, true>(M, Ka, Kb, gx, gy, x, ga, gb, ca, cb);
  else if (gx != nullptr)
    cat_silu_bwd_t<T, true, false>(M, Ka, Kb, gx, gy, x, ga, gb, ca, cb);
  else
    cat_silu_bwd_t<T, false, true>(M, Ka, Kb, gx, gy, x, ga, gb, ca, cb);
}

}  // namespace

void mp_cat_fwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* a, const void* b, void* out, float ca,
                float cb) {
  if (M * (Ka + Kb) == 0) return;
  MPK_CPU_DISPATCH(dt, T, cat_t<T>(M, Ka, Kb, static_cast<const T*>(a), static_cast<const T*>(b),
                                       static_cast<T*>(out), ca, cb));
}

void mp_cat_bwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* g, void* ga, void* gb, float ca, float cb) {
  if (M * (Ka + Kb) == 0) return;
  MPK_CPU_DISPATCH(dt, T, split_t<T>(M, Ka, Kb, static_cast<const T*>(g), static_cast<T*>(ga),
                                         static_cast<T*>(gb), ca, cb));
}

void mp_cat_silu_fwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* a, const void* b, void* x, void* y,
                     float ca, float cb) {
  if (M * (Ka + Kb) == 0) return;
  MPK_CPU_DISPATCH(dt, T, cat_silu_t<T>(M, Ka, Kb, static_cast<const T*>(a), static_cast<const T*>(b),
                                            static_cast<T*>(x), static_cast<T*>(y), ca, cb));
}

// At least one of gx, gy is given (the binding zero-fills the gradients when neither is).
void mp_cat_silu_bwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* gx, const void* gy, const void* x,
                     void* ga, void* gb, float ca, float cb) {
  if (M * (Ka + Kb) == 0 || (gx == nullptr && gy == nullptr)) return;
  MPK_CPU_DISPATCH(dt, T, cat_silu_bwd_any<T>(M, Ka, Kb, static_cast<const T*>(gx), static_cast<const T*>(gy),
                                                  static_cast<const T*>(x), static_cast<T*>(ga), static_cast<T*>(gb),
                                                  ca, cb));
}

}  // namespace cpu
}  // namespace mpk
