// mp_cat (spec §1), forward and backward, one launch each. Python presents a, b and out in one
// memory order of their dims as row-major matrices a [M, Ka], b [M, Kb], out [M, Ka + Kb]
// (mpkernels/cuda/_attention.py): the forward gathers both scaled blocks into out, the backward
// scatters the gradient back into the two. Vector units of 8 elements when Ka and Kb are
// multiples of 8 and the pointers 16-byte aligned (a unit then never straddles the two blocks).
// mp_cat_mp_silu (decoder Block input, spec §2) fuses mp_silu into the same passes: the forward
// also writes y = mp_silu(x) of the x it rounded to the dtype, the backward reads the gradients
// of x and y (either may be absent) and the saved x and writes both input gradients.
#include "attention_cat.h"
#include "cuda_common.cuh"
#include "mp_math.h"

namespace mpk {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

// Unit u of the K = Ka + Kb wide matrix: row m, column c. kGather: out[m, c] = src(m, c) * scale
// (forward); else dst(m, c) = g[m, c] * scale (backward).
template <typename T, int U, bool kGather>
__global__ void __launch_bounds__(kThreads)
    cat_kernel(int64_t M, int64_t Ka, int64_t Kb, const T* a_or_g, const T* b, T* out_or_ga, T* gb, float ca,
               float cb) {
  const int64_t K = Ka + Kb, units_per_row = K / U;
  const int64_t units = M * units_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t m = u / units_per_row;
    const int64_t c = (u - m * units_per_row) * U;
    const bool first = c < Ka;
    const int64_t part = first ? m * Ka + c : m * Kb + (c - Ka);
    const float scale = first ? ca : cb;
    float f[U];
    if constexpr (kGather) {
      load_u<T, U>((first ? a_or_g : b) + part, f);
#pragma unroll
      for (int i = 0; i < U; ++i) f[i] *= scale;
      store_u<T, U>(out_or_ga + m * K + c, f);
    } else {
      load_u<T, U>(a_or_g + m * K + c, f);
#pragma unroll
      for (int i = 0; i < U; ++i) f[i] *= scale;
      store_u<T, U>((first ? out_or_ga : gb) + part, f);
    }
  }
}

template <bool kGather>
void launch(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* src1, const void* src2, void* dst1, void* dst2,
            float ca, float cb, cudaStream_t stream) {
  const int64_t K = Ka + Kb;
  if (M * K == 0) return;
  const bool vec = Ka % kUnit == 0 && Kb % kUnit == 0 && aligned16(src1) && aligned16(dst1) &&
                   (src2 == nullptr || aligned16(src2)) && (dst2 == nullptr || aligned16(dst2));
  MPK_CUDA_DISPATCH(dt, T, {
    const T* s1 = static_cast<const T*>(src1);
    const T* s2 = static_cast<const T*>(src2);
    T* d1 = static_cast<T*>(dst1);
    T* d2 = static_cast<T*>(dst2);
    if (vec)
      cat_kernel<T, kUnit, kGather><<<grid_for(M * K / kUnit, kThreads), kThreads, 0, stream>>>(M, Ka, Kb, s1, s2, d1,
                                                                                              d2, ca, cb);
    else
      cat_kernel<T, 1, kGather><<<grid_for(M * K, kThreads), kThreads, 0, stream>>>(M, Ka, Kb, s1, s2, d1, d2, ca,
                                                                                  cb);
  });
}

// x[m, c] = src(m, c) * scale rounded to T, y[m, c] = mp_silu of that rounded x (as the
// reference's mp_silu(mp_cat(a, b)) sees it).
template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    cat_silu_fwd_kernel(int64_t M, int64_t Ka, int64_t Kb, const T* a, const T* b, T* x, T* y, float ca, float cb) {
  const int64_t K = Ka + Kb, units_per_row = K / U;
  const int64_t units = M * units_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t m = u / units_per_row;
    const int64_t c = (u - m * units_per_row) * U;
    const bool first = c < Ka;
    const float scale = first ? ca : cb;
    float f[U];
    load_u<T, U>(first ? a + m * Ka + c : b + m * Kb + (c - Ka), f);
#pragma unroll
    for (int i = 0; i < U; ++i) f[i] = to_f(from_f<T>(f[i] * scale));
    store_u<T, U>(x + m * K + c, f);
#pragma unroll
    for (int i = 0; i < U; ++i) f[i] = mp_silu_f(f[i]);
    store_u<T, U>(y + m * K + c, f);
  }
}

// g = gx + gy * mp_silu'(x) in fp32 (kGx / kGy: which gradients exist), then ga or gb = g * scale.
template <typename T, int U, bool kGx, bool kGy>
__global__ void __launch_bounds__(kThreads)
    cat_silu_bwd_kernel(int64_t M, int64_t Ka, int64_t Kb, const T* gx, const T* gy, const T* x, T* ga, T* gb,
                        float ca, float cb) {
  const int64_t K = Ka + Kb, units_per_row = K / U;
  const int64_t units = M * units_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t m = u / units_per_row;
    const int64_t c = (u - m * units_per_row) * U;
    const int64_t off = m * K + c;
    const bool first = c < Ka;
    const float scale = first ? ca : cb;
    float g[U];
    if constexpr (kGx) {
      load_u<T, U>(gx + off, g);
    } else {
#pragma unroll
      for (int i = 0; i < U; ++i) g[i] = 0.0f;
    }
    if constexpr (kGy) {
      float gyv[U], xv[U];
      load_u<T, U>(gy + off, gyv);
      load_u<T, U>(x + off, xv);
#pragma unroll
      for (int i = 0; i < U; ++i) g[i] += gyv[i] * mp_silu_grad_f(xv[i]);
    }
#pragma unroll
    for (int i = 0; i < U; ++i) g[i] *= scale;
    store_u<T, U>(first ? ga + m * Ka + c : gb + m * Kb + (c - Ka), g);
  }
}

}  // namespace

void mp_cat_fwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* a, const void* b, void* out, float ca,
                float cb, cudaStream_t stream) {
  launch<true>(dt, M, Ka, Kb, a, b, out, nullptr, ca, cb, stream);
  MPK_CHECK_LAUNCH("mp_cat_fwd");
}

void mp_cat_bwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* g, void* ga, void* gb, float ca, float cb,
                cudaStream_t stream) {
  launch<false>(dt, M, Ka, Kb, g, nullptr, ga, gb, ca, cb, stream);
  MPK_CHECK_LAUNCH("mp_cat_bwd");
}

void mp_cat_silu_fwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* a, const void* b, void* x, void* y,
                     float ca, float cb, cudaStream_t stream) {
  const int64_t K = Ka + Kb;
  if (M * K == 0) return;
  const bool vec = Ka % kUnit == 0 && Kb % kUnit == 0 && aligned16(a) && aligned16(b) && aligned16(x) &&
                   aligned16(y);
  MPK_CUDA_DISPATCH(dt, T, {
    const T* pa = static_cast<const T*>(a);
    const T* pb = static_cast<const T*>(b);
    T* px = static_cast<T*>(x);
    T* py = static_cast<T*>(y);
    if (vec)
      cat_silu_fwd_kernel<T, kUnit><<<grid_for(M * K / kUnit, kThreads), kThreads, 0, stream>>>(M, Ka, Kb, pa, pb, px,
                                                                                              py, ca, cb);
    else
      cat_silu_fwd_kernel<T, 1><<<grid_for(M * K, kThreads), kThreads, 0, stream>>>(M, Ka, Kb, pa, pb, px, py, ca, cb);
  });
  MPK_CHECK_LAUNCH("mp_cat_silu_fwd");
}

namespace {

template <typename T, int U>
void launch_cat_silu_bwd(int64_t M, int64_t Ka, int64_t Kb, const T* gx, const T* gy, const T* x, T* ga, T* gb,
                         float ca, float cb, cudaStream_t stream) {
  const int64_t K = Ka + Kb;
  const unsigned blocks = grid_for(M * K / U, kThreads);
  if (gx != nullptr && gy != nullptr)
    cat_silu_bwd_kernel<T, U, true, true><<<blocks, kThreads, 0, stream>>>(M, Ka, Kb, gx, gy, x, ga, gb, ca, cb);
  else if (gx != nullptr)
    cat_silu_bwd_kernel<T, U, true, false><<<blocks, kThreads, 0, stream>>>(M, Ka, Kb, gx, gy, x, ga, gb, ca, cb);
  else
    cat_silu_bwd_kernel<T, U, false, true><<<blocks, kThreads, 0, stream>>>(M, Ka, Kb, gx, gy, x, ga, gb, ca, cb);
}

}  // namespace

// At least one of gx, gy is given (the binding zero-fills the gradients when neither is).
void mp_cat_silu_bwd(DType dt, int64_t M, int64_t Ka, int64_t Kb, const void* gx, const void* gy, const void* x,
                     void* ga, void* gb, float ca, float cb, cudaStream_t stream) {
  const int64_t K = Ka + Kb;
  if (M * K == 0 || (gx == nullptr && gy == nullptr)) return;
  const bool vec = Ka % kUnit == 0 && Kb % kUnit == 0 && (gx == nullptr || aligned16(gx)) &&
                   (gy == nullptr || aligned16(gy)) && aligned16(x) && aligned16(ga) && aligned16(gb);
  MPK_CUDA_DISPATCH(dt, T, {
    const T* pgx = static_cast<const T*>(gx);
    const T* pgy = static_cast<const T*>(gy);
    const T* px = static_cast<const T*>(x);
    T* pga = static_cast<T*>(ga);
    T* pgb = static_cast<T*>(gb);
    if (vec)
      launch_cat_silu_bwd<T, kUnit>(M, Ka, Kb, pgx, pgy, px, pga, pgb, ca, cb, stream);
    else
      launch_cat_silu_bwd<T, 1>(M, Ka, Kb, pgx, pgy, px, pga, pgb, ca, cb, stream);
  });
  MPK_CHECK_LAUNCH("mp_cat_silu_bwd");
}

}  // namespace cuda
}  // namespace mpk
