// Per-element math of the magnitude-preserving ops (spec §1-2), shared by the CUDA kernels
// (csrc/*.cu) and their CPU twins (csrc/mp_cpu.cpp). Everything here works on fp32 scalars;
// loads, stores and dtype conversions belong to each side. No torch headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MPK_HD __host__ __device__ __forceinline__
#else
#define MPK_HD inline
#endif

namespace mpk {

constexpr float kMpSiluScale = 0.596f;             // std of silu(z), z ~ N(0, 1) (spec §1)
constexpr float kInvMpSiluScale = 1.0f / 0.596f;

#if !defined(__CUDA_ARCH__)
// exp for the CPU twin, written so that GCC vectorises a loop around it with plain SSE2
// (no libm call): Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, degree-6 Taylor
// polynomial for e^r (relative error < 2e-7), 2^k assembled in the exponent bits.
// The polynomial sees x clamped to [-87, 88] (2^k stays a normal number); past ln(FLT_MAX) the
// result is +inf like expf, so that sigmoid(-inf) = 0 and silu(-inf) = -inf * 0 = NaN as in
// PyTorch. NaN in, NaN out (comparisons with NaN are false: the clamp keeps it).
inline float host_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;                  // 1.5 * 2^23: adding it rounds to an integer
  float k = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - k * 0.693145751953125f;              // ln2 split in a high part exact in fp32 ...
  r = r - k * 1.428606765330187e-06f;                 // ... and the remainder
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // k of a NaN is NaN: convert k only where it is a number (the cast of NaN is undefined).
  int32_t bits = (static_cast<int32_t>(k == k ? k : 0.0f) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x > 88.72283935546875f ? HUGE_VALF : p * scale;
}
#endif

MPK_HD float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return host_exp(x);
#endif
}

// sigmoid(x) = 1 / (1 + e^-x); NaN in, NaN out (through the callers' multiplication by x).
MPK_HD float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

// mp_silu(x) = silu(x) / 0.596 (spec §1).
MPK_HD float mp_silu_f(float x) { return x * sigmoid_f(x) * kInvMpSiluScale; }

// d mp_silu / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))) / 0.596.
MPK_HD float mp_silu_grad_f(float x) {
  float s = sigmoid_f(x);
  return s * (1.0f + x * (1.0f - s)) * kInvMpSiluScale;
}

// normalize (spec §1): y = x / (eps + rms), rms = ||x|| / sqrt(K). Kernels keep rms (fp32) per
// row as the statistic saved for backward and multiply by r = 1 / (eps + rms).
MPK_HD float rms_from_sumsq(float sumsq, float inv_k) { return sqrtf(sumsq * inv_k); }
MPK_HD float inv_denom(float rms, float eps) { return 1.0f / (eps + rms); }

// Backward of y = x * r(x) with r = 1/(eps + rms):  dx = g * r - coef * x * sum(g * x),
// coef = r^2 / (K * rms). A zero row has no defined direction: PyTorch's norm backward gives
// 0 there, and so does this (coef = 0).
// The test is `rms == 0`, not `rms > 0`: a NaN statistic must give a NaN gradient, as in PyTorch.
MPK_HD float norm_grad_coef(float r, float rms, float inv_k) {
  return rms == 0.0f ? 0.0f : r * r * inv_k / rms;
}

// clamp(x, -c, c) that keeps NaN, like torch.clamp. Never fminf / fmaxf (nor min.f32 / max.f32 on
// the GPU): they return the non-NaN operand, which would turn a NaN into -c. On sm_80+ one
// max.NaN + min.NaN (FMNMX.NAN); elsewhere compare-and-select, where NaN fails both tests.
// c = inf never clips.
MPK_HD float clip_f(float x, float c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(-c));
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(y), "f"(c));
  return y;
#else
  return x < -c ? -c : (x > c ? c : x);
#endif
}

// Gradient through clip_f, as torch.clamp's backward: where(-c <= x <= c, g, 0). A select, not
// g * mask: a NaN or inf gradient at a clipped (or NaN) x gives 0, not NaN. c = inf means no clip
// at all (plain mp_sum): the gradient passes everywhere, at NaN x too, as without a clamp.
MPK_HD float clip_grad_f(float g, float x, float c) {
  const bool pass = (c == HUGE_VALF) | ((x >= -c) & (x <= c));
  return pass ? g : 0.0f;
}

// torch.lerp's formula (exact at w = 0 and w = 1): a + w (b - a), or b - (b - a)(1 - w) for w >= 1/2.
MPK_HD float lerp_f(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

}  // namespace mpk
