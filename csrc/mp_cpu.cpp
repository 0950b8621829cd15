// CPU twins of the CUDA kernels: same launchers (csrc/mp_kernels.h), same per-element math
// (csrc/mp_math.h), parallel over the batch / pixels / rows with at::parallel_for. Inner loops
// run over a unit-stride dimension in fp32 so that the compiler vectorises them; statistics are
// accumulated in fp32 with several partial sums (vectorisable, and more accurate than one).
//
// The kernels (csrc/mp_cpu_impl.h) are compiled three times with GCC on x86-64: baseline
// (SSE2), AVX2+FMA and AVX-512, and the best one the CPU supports is used
// (MPKERNELS_CPU_ISA=default|avx2|avx512 caps it; set_isa() too, for tests).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "mp_kernels.h"
#include "mp_math.h"

namespace mpk {
namespace cpu {

namespace isa_default {
#include "mp_cpu_impl.h"
}  // namespace isa_default

#if MPK_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#include "mp_cpu_impl.h"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace isa_avx512 {
#include "mp_cpu_impl.h"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------------------------------------
// Instruction-set selection.

namespace {

enum Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"default", "avx2", "avx512"};

int parse_isa(const char* name) {
  for (int i = 0; i < 3; ++i)
    if (name && std::string(name) == kIsaNames[i]) return i;
  return -1;
}

int supported_isa() {
#if MPK_CPU_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
#endif
  return kDefault;
}

std::atomic<int> g_isa{-1};

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = supported_isa();
    const int cap = parse_isa(std::getenv("MPKERNELS_CPU_ISA"));
    if (cap >= 0) isa = std::min(isa, cap);
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

}  // namespace

const char* isa_name() { return kIsaNames[current_isa()]; }

bool set_isa(const char* name) {
  const int want = parse_isa(name);
  if (want < 0 || want > supported_isa()) return false;
  g_isa.store(want, std::memory_order_relaxed);
  return true;
}

#if MPK_CPU_MULTI_ISA
#define MPK_CPU_ISA_CALL(fn, ...)                                      \
  switch (current_isa()) {                                             \
    case kAvx512: return isa_avx512::fn(__VA_ARGS__);                  \
    case kAvx2: return isa_avx2::fn(__VA_ARGS__);                      \
    default: return isa_default::fn(__VA_ARGS__);                      \
  }
#else
#define MPK_CPU_ISA_CALL(fn, ...) return isa_default::fn(__VA_ARGS__);
#endif

// ---------------------------------------------------------------------------------------------
// Launchers.

void mp_silu_fwd(DType dt, int64_t n, const void* x, void* y) { MPK_CPU_ISA_CALL(mp_silu_fwd, dt, n, x, y) }

void mp_silu_bwd(DType dt, int64_t n, const void* g, const void* x, void* gx) {
  MPK_CPU_ISA_CALL(mp_silu_bwd, dt, n, g, x, gx)
}

void mp_sum_clip_fwd(DType dt, int64_t n, const void* a, const void* b, void* y, float t, float scale, float clip) {
  MPK_CPU_ISA_CALL(mp_sum_clip_fwd, dt, n, a, b, y, t, scale, clip)
}

void mp_sum_clip_bwd(DType dt, int64_t n, const void* g, const void* a, const void* b, void* ga, void* gb, float t,
                     float scale, float clip) {
  MPK_CPU_ISA_CALL(mp_sum_clip_bwd, dt, n, g, a, b, ga, gb, t, scale, clip)
}

void modulated_mp_silu_fwd(DType dt, const NCL& s, const void* y, const void* c, DType cdt, int64_t csN,
                           int64_t csC, void* out) {
  MPK_CPU_ISA_CALL(modulated_mp_silu_fwd, dt, s, y, c, cdt, csN, csC, out)
}

void modulated_mp_silu_bwd(DType dt, const NCL& s, const void* g, const void* y, const void* c, DType cdt,
                           int64_t csN, int64_t csC, void* gy, void* gc, int64_t gcsN, int64_t gcsC,
                           float* workspace) {
  MPK_CPU_ISA_CALL(modulated_mp_silu_bwd, dt, s, g, y, c, cdt, csN, csC, gy, gc, gcsN, gcsC, workspace)
}

void pixel_norm_fwd(DType dt, const NCL& s, const void* x, void* xn, void* y, float* rms, float eps,
                    float* /*workspace*/) {
  MPK_CPU_ISA_CALL(pixel_norm_fwd, dt, s, x, xn, y, rms, eps, nullptr)
}

void pixel_norm_bwd(DType dt, const NCL& s, const void* gxn, const void* gy, const void* x, const float* rms,
                    void* gx, float eps, float* /*workspace*/) {
  MPK_CPU_ISA_CALL(pixel_norm_bwd, dt, s, gxn, gy, x, rms, gx, eps, nullptr)
}

void mp_weight_fwd(DType dt, int64_t rows, int64_t len, const void* w, const void* gain_ptr, DType gdt, float gain,
                   float eps, float* out, float* rms) {
  MPK_CPU_ISA_CALL(mp_weight_fwd, dt, rows, len, w, gain_ptr, gdt, gain, eps, out, rms)
}

void mp_weight_bwd(DType dt, int64_t rows, int64_t len, const float* g, const void* w, const void* gain_ptr,
                   DType gdt, float gain, const float* rms, float eps, void* gw, void* ggain, float* workspace) {
  MPK_CPU_ISA_CALL(mp_weight_bwd, dt, rows, len, g, w, gain_ptr, gdt, gain, rms, eps, gw, ggain, workspace)
}

void force_normalize(const RowTensor* tensors, int64_t count, float eps) {
  MPK_CPU_ISA_CALL(force_normalize, tensors, count, eps)
}

void ema_lerp(const LerpPair* pairs, int64_t count, float weight) {
  MPK_CPU_ISA_CALL(ema_lerp, pairs, count, weight)
}

void force_finite(const FlatTensor* tensors, int64_t count) { MPK_CPU_ISA_CALL(force_finite, tensors, count) }

}  // namespace cpu
}  // namespace mpk
