// Helpers shared by the CUDA kernels: dtype conversion, 16-byte vector access, warp reduction,
// launch checks. Only CUDA headers: no torch, so that the .cu files compile quickly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mp_kernels.h"
#include "mp_math.h"

namespace mpk {
namespace cuda {
namespace detail {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements per vectorised access: 16 bytes of a 16-bit type, two 16-byte accesses of fp32.
constexpr int kUnit = 8;

// Loads / stores kUnit consecutive elements; `p` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[kUnit]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < kUnit; ++i) f[i] = to_f(h[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[kUnit]) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
  } else {
    uint4 u;
    T* h = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < kUnit; ++i) h[i] = from_f<T>(f[i]);
    *reinterpret_cast<uint4*>(p) = u;
  }
}

// U consecutive elements: one vector access when U == kUnit, a scalar one when U == 1.
template <typename T, int U>
__device__ __forceinline__ void load_u(const T* p, float (&f)[U]) {
  if constexpr (U == kUnit) {
    load8(p, f);
  } else {
#pragma unroll
    for (int i = 0; i < U; ++i) f[i] = to_f(p[i]);
  }
}

template <typename T, int U>
__device__ __forceinline__ void store_u(T* p, const float (&f)[U]) {
  if constexpr (U == kUnit) {
    store8(p, f);
  } else {
#pragma unroll
    for (int i = 0; i < U; ++i) p[i] = from_f<T>(f[i]);
  }
}

// Scalar access with the dtype known only at run time (modulation vectors, gains, multi-tensor
// lists of mixed dtypes). The branch is uniform across a warp.
__device__ __forceinline__ float load_any(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_any(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Sum over the 32 lanes of a warp; every lane must take part.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block of `kThreads` threads (a multiple of 32); the result is valid in every thread.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[kThreads / 32];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  float tot = 0.0f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) tot += partial[i];
  __syncthreads();  // `partial` may be reused by a later call
  return tot;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
__device__ __forceinline__ bool aligned16_dev(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("mpkernels CUDA kernel ") + what + " failed: " + cudaGetErrorString(err));
}

// Grid for `work` items at `threads` per block; kernels loop (grid-stride) past the cap.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

}  // namespace detail
}  // namespace cuda
}  // namespace mpk

#define MPK_CUDA_CASE(enum_value, type, T, ...) \
  case ::mpk::DType::enum_value: {             \
    using T = type;                            \
    __VA_ARGS__;                               \
    break;                                     \
  }

// Instantiates `...` with T = float, __half or __nv_bfloat16 according to `dt`.
#define MPK_CUDA_DISPATCH(dt, T, ...)                  \
  switch (dt) {                                        \
    MPK_CUDA_CASE(F32, float, T, __VA_ARGS__)          \
    MPK_CUDA_CASE(F16, __half, T, __VA_ARGS__)         \
    MPK_CUDA_CASE(BF16, __nv_bfloat16, T, __VA_ARGS__) \
  }

#define MPK_CHECK_LAUNCH(what) ::mpk::cuda::detail::check(cudaGetLastError(), what)
