// mp_cat (spec §1), forward and backward, one launch each. Python presents a, b and out in one
// memory order of their dims as row-major matrices a [M, Ka], b [M, Kb], out [M, Ka + Kb]
// (mpkernels/cuda/_attention.py): the forward gathers both scaled blocks into out, the backward
// scatters the gradient back into the two. Vector units of 8 elements when Ka and Kb are
// multiples of 8 and the pointers 16-byte aligned (a unit then never straddles the two blocks).
#include "attention_cat.h"
#include "cuda_common.cuh"

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

}  // namespace cuda
}  // namespace mpk
