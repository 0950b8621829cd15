// CPU twin of csrc/cat.cu: mp_cat (spec §1) forward and backward on row-major [M, K] matrices,
// parallel over rows with at::parallel_for, inner loops over contiguous columns in fp32.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "attention_cat.h"

namespace mpk {
namespace cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task

template <typename T>
inline void scale_row(const T* src, T* dst, int64_t k, float scale) {
  for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]) * scale);
}

template <typename T>
void cat_t(int64_t M, int64_t Ka, int64_t Kb, const T* a, const T* b, T* out, float ca, float cb) {
  const int64_t K = Ka + Kb;
  at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, K)), [&](int64_t s, int64_t e) {
    for (int64_t m = s; m < e; ++m) {
      scale_row(a + m * Ka, out + m * K, Ka, ca);
      scale_row(b + m * Kb, out + m * K + Ka, Kb, cb);
    }
  });
}

template <typename T>
void split_t(int64_t M, int64_t Ka, int64_t Kb, const T* g, T* ga, T* gb, float ca, float cb) {
  const int64_t K = Ka + Kb;
  at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, K)), [&](int64_t s, int64_t e) {
    for (int64_t m = s; m < e; ++m) {
      scale_row(g + m * K, ga + m * Ka, Ka, ca);
      scale_row(g + m * K + Ka, gb + m * Kb, Kb, cb);
    }
  });
}

#define MPK_CAT_CPU_DISPATCH(dt, T, ...) \
  switch (dt) {                          \
    case DType::F32: {                   \
      using T = float;                   \
      __VA_ARGS__;                       \
      break;                             \
    }                                    \
    case DType::F16: {                   \
      using T = c10::Half;               \
      __VA_ARGS__;                       \
      break;                             \
    }                                    \
    case DType::BF16: {                  \
      using T = c10::BFloat16;           \
      __VA_ARGS__;                       \
      break;                             \
    }                                    \
  }

}  // namespace

void mp_cat_fwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* a, const void* b, void* out, float ca,
                float cb) {
  if (M * (Ka + Kb) == 0) return;
  MPK_CAT_CPU_DISPATCH(dt, T, cat_t<T>(M, Ka, Kb, static_cast<const T*>(a), static_cast<const T*>(b),
                                       static_cast<T*>(out), ca, cb));
}

void mp_cat_bwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* g, void* ga, void* gb, float ca, float cb) {
  if (M * (Ka + Kb) == 0) return;
  MPK_CAT_CPU_DISPATCH(dt, T, split_t<T>(M, Ka, Kb, static_cast<const T*>(g), static_cast<T*>(ga),
                                         static_cast<T*>(gb), ca, cb));
}

}  // namespace cpu
}  // namespace mpk
