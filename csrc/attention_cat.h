// Launchers of cosine attention's normalization and of mp_cat (spec §1), CUDA and CPU twins.
// Raw pointers, sizes and strides in elements, no torch types (csrc/mp_kernels.h conventions);
// csrc/attention_cat_bindings.cpp validates tensors and picks the twin.
#pragma once

#include <cstdint>

#include "mp_kernels.h"

namespace mpk {

// The qkv convolution output [N, 3C, H, W] seen as [N, 3C, L] with strides (sN, sC, sL). The
// vector (n, l, head, j) (j = q, k, v) holds channels head*3*D + d*cd + j*cj, d < D:
// (cd, cj) = (3, 1) for the release's interleaved order, (1, D) for head-contiguous.
struct QkvView {
  int64_t N, heads, D, L;
  int64_t sN, sC, sL;
  int64_t cd, cj;
};

// q, k or v (or a gradient of one): [N, L, heads, D] with these strides.
struct HeadsStrides {
  int64_t sN, sL, sH, sD;
};

// qkv_normalize: q, k, v = x / (eps + rms) of every vector; rms (fp32) is [3, N, L, heads]
// contiguous. Backward: gx = g * r - x * r^2 / (D * rms) * <g, x>, r = 1 / (eps + rms), written
// with strides (osN, osC, osL) of an [N, 3C, L] view of gx.
#define MPK_DECLARE_ATTENTION_CAT_LAUNCHERS(...)                                                      \
  void qkv_normalize_fwd(DType dt, const QkvView& s, const void* x, void* const* qkv_out,             \
                         const HeadsStrides& os, float* rms, float eps __VA_ARGS__);                   \
  void qkv_normalize_bwd(DType dt, const QkvView& s, const void* const* grads, const HeadsStrides* gs, \
                         const void* x, const float* rms, void* gx, int64_t osN, int64_t osC,          \
                         int64_t osL, float eps __VA_ARGS__);                                          \
  /* out[m] = [a[m] * ca | b[m] * cb]: a [M, Ka], b [M, Kb], out [M, Ka + Kb], all row-major */       \
  void mp_cat_fwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* a, const void* b, void* out, \
                  float ca, float cb __VA_ARGS__);                                                     \
  /* ga[m] = g[m, :Ka] * ca, gb[m] = g[m, Ka:] * cb */                                                 \
  void mp_cat_bwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* g, void* ga, void* gb,      \
                  float ca, float cb __VA_ARGS__);                                                     \
  /* mp_cat_mp_silu: x as mp_cat_fwd (rounded to dt), y = mp_silu(x) of that rounded x */             \
  void mp_cat_silu_fwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* a, const void* b,      \
                       void* x, void* y, float ca, float cb __VA_ARGS__);                              \
  /* g = gx + gy * mp_silu'(x) in fp32 (gx or gy may be null: absent), then split as mp_cat_bwd */     \
  void mp_cat_silu_bwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* gx, const void* gy,    \
                       const void* x, void* ga, void* gb, float ca, float cb __VA_ARGS__);

namespace cpu {
MPK_DECLARE_ATTENTION_CAT_LAUNCHERS()
}  // namespace cpu

#if defined(MPK_WITH_CUDA)
namespace cuda {
MPK_DECLARE_ATTENTION_CAT_LAUNCHERS(, cudaStream_t stream)
}  // namespace cuda
#endif

}  // namespace mpk
