// CPU twins of the mp_weights launchers (csrc/multi_weight.h): the rows of all weights of a call
// form one range that at::parallel_for splits, so a list of many small weights costs one parallel
// region, not one per weight. Per-row math as the single-weight twin (csrc/mp_cpu_impl.h): fp32
// sums with eight partial sums, scale = gain / sqrt(len) / (eps + rms). The row kernels
// (csrc/multi_weight_cpu_impl.h) are compiled for SSE2, AVX2+FMA and AVX-512 and run with the
// instruction set the single-tensor twins use.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "multi_weight.h"

namespace mpk {
namespace cpu {
namespace {

inline float gain_of(const WeightRows& t) { return t.gain_ptr ? load_any(t.gain_ptr, t.gain_dtype) : t.gain; }
inline float inv_sqrt(int64_t len) { return 1.0f / std::sqrt(static_cast<float>(len)); }

}  // namespace

namespace mw_default {
#include "multi_weight_cpu_impl.h"
}  // namespace mw_default

#if MPK_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace mw_avx2 {
#include "multi_weight_cpu_impl.h"
}  // namespace mw_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace mw_avx512 {
#include "multi_weight_cpu_impl.h"
}  // namespace mw_avx512
#pragma GCC pop_options
#endif

namespace {

// The instruction set of the single-tensor twins (mp_cpu.cpp: the CPU's best, capped by
// MPKERNELS_CPU_ISA or set_isa), so both twins round alike.
#if MPK_CPU_MULTI_ISA
#define MPK_MW_ISA_CALL(fn, ...)           \
  do {                                     \
    const int isa = isa_level();           \
    if (isa == 2)                          \
      mw_avx512::fn(__VA_ARGS__);          \
    else if (isa == 1)                     \
      mw_avx2::fn(__VA_ARGS__);            \
    else                                   \
      mw_default::fn(__VA_ARGS__);         \
  } while (0)
#else
#define MPK_MW_ISA_CALL(fn, ...) mw_default::fn(__VA_ARGS__)
#endif

// Splits the concatenated rows of all weights over the threads; row_range(first, b, e) runs rows [b, e).
template <typename RowRange>
void for_rows(const WeightRows* ws, int64_t count, RowRange row_range) {
  std::vector<int64_t> first(count + 1, 0);  // first[t]: index of weight t's first row
  int64_t elems = 0;
  for (int64_t t = 0; t < count; ++t) {
    first[t + 1] = first[t] + ws[t].rows;
    elems += ws[t].rows * ws[t].len;
  }
  const int64_t total = first[count];
  if (total == 0) return;
  const int64_t grain = grain_for(elems / total);
  at::parallel_for(0, total, grain, [=](int64_t b, int64_t e) { row_range(first.data(), b, e); });
}

}  // namespace

void mp_weights_fwd(DType out_dtype, const WeightRows* weights, int64_t count, float eps, float* rms) {
  for_rows(weights, count, [&](const int64_t* first, int64_t b, int64_t e) {
    MPK_MW_ISA_CALL(fwd_rows, out_dtype, weights, first, b, e, eps, rms);
  });
}

void mp_weights_bwd(DType grad_dtype, const WeightRows* weights, int64_t count, float eps, const float* rms,
                    float* partial) {
  for_rows(weights, count, [&](const int64_t* first, int64_t b, int64_t e) {
    MPK_MW_ISA_CALL(bwd_rows, grad_dtype, weights, first, b, e, eps, rms, partial);
  });
}

void mp_weights_gain_grads(const GainGrad* gains, int64_t count, const float* partial) {
  for (int64_t j = 0; j < count; ++j) {
    const GainGrad& g = gains[j];
    float tot = 0.0f;
    for (int64_t o = 0; o < g.rows; ++o) tot += partial[g.stat + o];
    store_any(g.out, g.dtype, 0, tot * inv_sqrt(g.len));
  }
}

}  // namespace cpu
}  // namespace mpk
