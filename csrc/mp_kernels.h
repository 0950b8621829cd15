// Launchers of the mpkernels extension: raw pointers, sizes and strides (in elements), no torch
// types, so that the .cu files compile without torch headers. bindings.cpp validates tensors,
// picks the layout and calls one of the two twins: mpk::cpu::* (csrc/mp_cpu.cpp) or
// mpk::cuda::* (csrc/*.cu, only when built with MPK_WITH_CUDA). Both share csrc/mp_math.h.
//
// Conventions, shared by every launcher:
// * Every tensor argument of one call has the same strides (bindings.cpp copies when needed).
// * Element counts and offsets are below 2^31 per tensor (bindings.cpp checks).
// * Statistics saved for backward are fp32: `rms` = ||x|| / sqrt(K) of each normalized row.
#pragma once

#include <cstdint>

#if defined(MPK_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mpk {

enum class DType : int8_t { F32 = 0, F16 = 1, BF16 = 2 };

// A tensor seen as [N, C, L]: batch, channels, all spatial dims collapsed into one. Kernels take
// the channels_last path when sC == 1 and the NCHW path otherwise, which needs sL == 1.
// bindings.cpp canonicalises the strides of size-1 dims (sN = 0 if N == 1, sC = 1 if C == 1,
// sL = 1 if L == 1) and copies tensors that fit neither path.
struct NCL {
  int64_t N, C, L;
  int64_t sN, sC, sL;
};

// force_normalize_: `rows` rows of `len` contiguous elements each (a dense weight whose first
// dim is outermost; the order inside a row does not matter for a per-row norm).
struct RowTensor {
  void* ptr;
  int64_t rows, len;
  DType dtype;
};

// ema_lerp_: ema <- lerp(ema, src, weight) over `numel` elements laid out alike.
struct LerpPair {
  void* ema;
  const void* src;
  int64_t numel;
  DType ema_dtype, src_dtype;
};

// force_finite_: `numel` elements of a dense tensor (any layout: the op is element-wise).
struct FlatTensor {
  void* ptr;
  int64_t numel;
  DType dtype;
};

// Both twins declare the same launchers; the CUDA ones take the stream last.
#define MPK_DECLARE_LAUNCHERS(...)                                                                 \
  void mp_silu_fwd(DType dt, int64_t n, const void* x, void* y __VA_ARGS__);                       \
  void mp_silu_bwd(DType dt, int64_t n, const void* g, const void* x, void* gx __VA_ARGS__);       \
  /* y = clip(lerp(a, b, t) * scale, -clip, clip) */                                               \
  void mp_sum_clip_fwd(DType dt, int64_t n, const void* a, const void* b, void* y, float t,         \
                       float scale, float clip __VA_ARGS__);                                        \
  void mp_sum_clip_bwd(DType dt, int64_t n, const void* g, const void* a, const void* b, void* ga,  \
                       void* gb, float t, float scale, float clip __VA_ARGS__);                     \
  /* out = mp_silu(y * c[n, ch]); c: [N, C] of dtype cdt with strides (csN, csC) */                 \
  void modulated_mp_silu_fwd(DType dt, const NCL& s, const void* y, const void* c, DType cdt,       \
                             int64_t csN, int64_t csC, void* out __VA_ARGS__);                      \
  /* gy = g * mp_silu'(y c) * c;  gc[n, ch] = sum_l g * mp_silu'(y c) * y, stored in cdt with */     \
  /* strides (gcsN, gcsC); `workspace` holds modulated_mp_silu_bwd_workspace(s) floats */           \
  void modulated_mp_silu_bwd(DType dt, const NCL& s, const void* g, const void* y, const void* c,   \
                             DType cdt, int64_t csN, int64_t csC, void* gy, void* gc, int64_t gcsN, \
                             int64_t gcsC, float* workspace __VA_ARGS__);                           \
  /* xn = x / (eps + rms) over C; y = mp_silu(xn) when y != nullptr; rms: [N, L] contiguous; */    \
  /* `workspace` holds pixel_norm_workspace(dt, s, true, device) floats (CUDA only) */              \
  void pixel_norm_fwd(DType dt, const NCL& s, const void* x, void* xn, void* y, float* rms,         \
                      float eps, float* workspace __VA_ARGS__);                                     \
  /* gxn / gy may be nullptr (no gradient); gy != nullptr means the mp_silu output was used */      \
  void pixel_norm_bwd(DType dt, const NCL& s, const void* gxn, const void* gy, const void* x,      \
                      const float* rms, void* gx, float eps, float* workspace __VA_ARGS__);         \
  /* out (fp32) = w / (eps + rms_row) * gain / sqrt(len); gain = *gain_ptr (dtype gdt) if given */  \
  void mp_weight_fwd(DType dt, int64_t rows, int64_t len, const void* w, const void* gain_ptr,      \
                     DType gdt, float gain, float eps, float* out, float* rms __VA_ARGS__);         \
  /* g: fp32 gradient of out; ggain (dtype gdt, one element) written when not nullptr; */           \
  /* `workspace` holds `rows` floats */                                                             \
  void mp_weight_bwd(DType dt, int64_t rows, int64_t len, const float* g, const void* w,           \
                     const void* gain_ptr, DType gdt, float gain, const float* rms, float eps,      \
                     void* gw, void* ggain, float* workspace __VA_ARGS__);                          \
  void force_normalize(const RowTensor* tensors, int64_t count, float eps __VA_ARGS__);

namespace cpu {
MPK_DECLARE_LAUNCHERS()
void ema_lerp(const LerpPair* pairs, int64_t count, float weight);
// force_finite_: every inf / NaN element becomes +0 (nan_to_num(nan=0, posinf=0, neginf=0)).
void force_finite(const FlatTensor* tensors, int64_t count);
// Instruction set of the CPU kernels in use: "default" (SSE2), "avx2" or "avx512".
const char* isa_name();
// Use `name` (at most what the CPU supports); false when it cannot.
bool set_isa(const char* name);
}  // namespace cpu

#if defined(MPK_WITH_CUDA)
namespace cuda {
MPK_DECLARE_LAUNCHERS(, cudaStream_t stream)
// The weight is *weight_ptr (fp32, on the device) when weight_ptr is not null, else `weight`:
// a captured CUDA graph then reads the weight's value at each replay (the CPU twin takes the
// value, read on the host by bindings.cpp).
void ema_lerp(const LerpPair* pairs, int64_t count, float weight, const float* weight_ptr, cudaStream_t stream);
void force_finite(const FlatTensor* tensors, int64_t count, cudaStream_t stream);
// Number of floats modulated_mp_silu_bwd needs as workspace for shape `s`.
int64_t modulated_mp_silu_bwd_workspace(const NCL& s);
// Number of floats pixel_norm_fwd (forward) / pixel_norm_bwd need as workspace on `device`
// (NCHW shapes whose grid is split over channels; 0 otherwise).
int64_t pixel_norm_workspace(DType dt, const NCL& s, bool forward, int device);
}  // namespace cuda
#endif

}  // namespace mpk
