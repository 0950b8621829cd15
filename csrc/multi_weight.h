// Launchers of mp_weights, the multi-tensor mp_weight (issue 10): every effective weight of a
// network, normalize_rows(w) * gain / sqrt(fan_in) in fp32 stored in the output dtype, in one
// launch per output dtype group, and all their gradients in one launch per group (plus one small
// launch for all tensor-gain gradients). Raw pointers and sizes only, like mp_kernels.h; the CPU
// twins are in multi_weight_cpu.cpp, the CUDA kernels in multi_weight.cu, validation and layout in
// multi_weight_bindings.cpp.
//
// Conventions:
// * A weight is `rows` rows of `len` contiguous elements (dense, first dim outermost; the order
//   inside a row does not matter to a per-row norm). Its output / gradient has the same strides.
// * `qkv_rows` = D != 0: rows come in heads of 3 D rows, interleaved (3 d + j, j = q, k, v), and
//   input row h 3D + 3d + j is output row h 3D + j D + d (head-contiguous, see
//   mpkernels.reference.head_contiguous_rows). The statistics stay in input-row order.
// * `stat`: offset of the weight's first row in the flat fp32 buffers `rms` (saved by the forward)
//   and `partial` (per-row terms of the gain gradient); offsets stay below 2^31.
#pragma once

#include <cstdint>

#include "mp_kernels.h"
#include "mp_math.h"

namespace mpk {

struct WeightRows {
  const void* w;         // the weight, dtype w_dtype
  void* out;             // forward: the effective weight (group dtype); backward: the weight gradient (w_dtype)
  const void* grad;      // backward: gradient of the effective weight (group dtype), nullptr = zero
  const void* gain_ptr;  // one-element tensor gain (dtype gain_dtype, read on the device), or nullptr: `gain`
  float gain;
  DType w_dtype, gain_dtype;
  int64_t rows, len, qkv_rows, stat;
};

// Gradient of one tensor gain: the sum of `rows` per-row terms at `partial + stat`, divided by
// sqrt(len), stored as one element of `dtype` at `out`.
struct GainGrad {
  void* out;
  DType dtype;
  int64_t stat, rows, len;
};

// Output row of input row `r` (the identity when D == 0); rows < 2^31 (bindings check).
MPK_HD int32_t qkv_out_row(int32_t r, int32_t D) {
  if (D == 0) return r;
  const int32_t g = 3 * D, h = r / g, rem = r - h * g, d = rem / 3;
  return h * g + (rem - 3 * d) * D + d;
}

#define MPK_DECLARE_MULTI_WEIGHT_LAUNCHERS(...)                                                    \
  /* out = w / (eps + rms_row) * gain / sqrt(len) in `out_dtype`; rms[stat + row] = rms_row */      \
  void mp_weights_fwd(DType out_dtype, const WeightRows* weights, int64_t count, float eps,          \
                      float* rms __VA_ARGS__);                                                      \
  /* out = d loss / d w from `grad` (dtype grad_dtype); partial[stat + row] written for the */      \
  /* weights with a tensor gain when `partial` is not nullptr */                                    \
  void mp_weights_bwd(DType grad_dtype, const WeightRows* weights, int64_t count, float eps,        \
                      const float* rms, float* partial __VA_ARGS__);                                \
  void mp_weights_gain_grads(const GainGrad* gains, int64_t count, const float* partial __VA_ARGS__);

namespace cpu {
MPK_DECLARE_MULTI_WEIGHT_LAUNCHERS()
}  // namespace cpu

#if defined(MPK_WITH_CUDA)
namespace cuda {
MPK_DECLARE_MULTI_WEIGHT_LAUNCHERS(, cudaStream_t stream)
// Weights per launch (kernel-parameter space, 4 KB on every architecture), for tests.
int64_t mp_weights_chunk(bool forward);
}  // namespace cuda
#endif

}  // namespace mpk
