// Helpers shared by the C++ CPU twins (csrc/mp_cpu.cpp, multi_weight_cpu.cpp, cat_cpu.cpp,
// attention_cpu.cpp and the row-kernel headers they include once per instruction set): dtype
// conversions, the dtype dispatch, generic loads and stores, the parallel grain, and which
// instruction-set variants are compiled.
//
// Include this before any `#pragma GCC target`: the inline functions are then compiled for the
// baseline instruction set and inlined into every variant alike.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "mp_kernels.h"

// GCC on x86-64 compiles the row kernels three times (SSE2, AVX2+FMA, AVX-512) and runs the one
// mp_cpu.cpp chose (the CPU's best, capped by MPKERNELS_CPU_ISA or set_isa()).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MPK_CPU_MULTI_ISA 1
#else
#define MPK_CPU_MULTI_ISA 0
#endif

// switch (dt) { ... } with `using T = <the element type>;` in each case.
#define MPK_CPU_CASE(enum_value, type, T, ...) \
  case ::mpk::DType::enum_value: {             \
    using T = type;                            \
    __VA_ARGS__;                               \
    break;                                     \
  }
#define MPK_CPU_DISPATCH(dt, T, ...)                  \
  switch (dt) {                                       \
    MPK_CPU_CASE(F32, float, T, __VA_ARGS__)          \
    MPK_CPU_CASE(F16, c10::Half, T, __VA_ARGS__)      \
    MPK_CPU_CASE(BF16, c10::BFloat16, T, __VA_ARGS__) \
  }

namespace mpk {
namespace cpu {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }
// bfloat16 <-> fp32 without branches (c10's rounding has a NaN branch that blocks vectorisation);
// the same values as c10's conversions.
inline float to_f(c10::BFloat16 v) {
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

// Element i of a buffer whose dtype is known only at run time (gains, modulation vectors).
inline float load_any(const void* p, DType dt, int64_t i = 0) {
  switch (dt) {
    case DType::F16: return to_f(static_cast<const c10::Half*>(p)[i]);
    case DType::BF16: return to_f(static_cast<const c10::BFloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_any(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::F16: static_cast<c10::Half*>(p)[i] = from_f<c10::Half>(v); break;
    case DType::BF16: static_cast<c10::BFloat16*>(p)[i] = from_f<c10::BFloat16>(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

constexpr int64_t kGrain = 32768;  // elements per parallel task, below which one thread does it all

// Items per parallel task when each item is `work_per_item` elements.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, work_per_item));
}

// The instruction set in use as a number (0 baseline, 1 AVX2, 2 AVX-512), for the files whose
// row kernels follow mp_cpu.cpp's choice so that every twin rounds alike.
inline int isa_level() {
  if (!MPK_CPU_MULTI_ISA) return 0;
  const char* isa = isa_name();
  return std::strcmp(isa, "avx512") == 0 ? 2 : std::strcmp(isa, "avx2") == 0 ? 1 : 0;
}

}  // namespace cpu
}  // namespace mpk
