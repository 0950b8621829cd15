// Helpers shared by the CUDA kernels: dtype conversion, 16-byte vector access, warp reduction,
// launch checks. Only CUDA headers: no torch, so that the .cu files compile quickly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "launch_shapes.h"
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

// Loads kUnit consecutive elements; `p` must be 16-byte aligned.
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

// Two floats rounded to a 16-bit type and packed in one 32-bit word, `a` in the low half (the
// lower address): one cvt.rn.{f16,bf16}x2.f32 on sm_80+.
__device__ __forceinline__ uint32_t pack2(__half, float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return static_cast<uint32_t>(__half_as_ushort(__low2half(h))) |
         (static_cast<uint32_t>(__half_as_ushort(__high2half(h))) << 16);
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16, float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return static_cast<uint32_t>(__bfloat16_as_ushort(__low2bfloat16(h))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__high2bfloat16(h))) << 16);
}

// kUnit elements as 16-byte words: two for fp32, one (packed pairs) for 16-bit types.
template <typename T>
__device__ __forceinline__ void pack8(const float (&f)[kUnit], uint4 (&w)[sizeof(T) / 2]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      w[i] = make_uint4(__float_as_uint(f[4 * i]), __float_as_uint(f[4 * i + 1]), __float_as_uint(f[4 * i + 2]),
                        __float_as_uint(f[4 * i + 3]));
  } else {
    w[0] = make_uint4(pack2(T(), f[0], f[1]), pack2(T(), f[2], f[3]), pack2(T(), f[4], f[5]), pack2(T(), f[6], f[7]));
  }
}

// One 16-byte store to global memory (STG.E.128). Written in PTX because a plain uint4 store is
// split by nvcc into 32-bit pieces and only sometimes merged again: nvcc 13 left four STG.E in
// the sm_90 code of the modulated and NCHW pixel-norm kernels. "memory": ordered like a C++ store.
__device__ __forceinline__ void store_global_16B(void* p, const uint4& w) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)), "r"(w.x), "r"(w.y),
               "r"(w.z), "r"(w.w)
               : "memory");
}

// Stores kUnit consecutive elements to global memory; `p` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[kUnit]) {
  uint4 w[sizeof(T) / 2];
  pack8<T>(f, w);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 2); ++i) store_global_16B(reinterpret_cast<uint4*>(p) + i, w[i]);
}

// The same to shared memory (STS.128 as plain C++ stores).
template <typename T>
__device__ __forceinline__ void store8_shared(T* p, const float (&f)[kUnit]) {
  uint4 w[sizeof(T) / 2];
  pack8<T>(f, w);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 2); ++i) reinterpret_cast<uint4*>(p)[i] = w[i];
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

template <typename T, int U>
__device__ __forceinline__ void store_u_shared(T* p, const float (&f)[U]) {
  if constexpr (U == kUnit) {
    store8_shared(p, f);
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

using launch::grid_for;  // capped grid: kernels launched with it loop (grid-stride)

// What the launchers need to know about a device, queried once per device (thread-safe), not per
// call: a device query costs microseconds, more than a small kernel.
struct DeviceInfo {
  int sm_count = 0;
  int64_t smem_budget = 0;  // dynamic shared memory one block may take: <= optin, two blocks per SM
};

constexpr int kMaxDevices = 64;

inline const DeviceInfo& device_info(int dev) {
  static DeviceInfo info[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("mpkernels: device index out of range");
  std::call_once(once[dev], [dev]() {
    int sms = 0, optin = 0, per_sm = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "device query");
    check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "device query");
    check(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev), "device query");
    info[dev].sm_count = sms;
    info[dev].smem_budget = std::min<int64_t>(optin, per_sm / 2 - 2048);
  });
  return info[dev];
}

inline int current_device() {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

// Raises `kernel`'s dynamic shared memory limit to `bytes` once per device (`once`: a static of the
// caller, one per kernel). Call it with the largest size any launch of `kernel` may use (the
// device's budget): the attribute is then never changed again, so host threads cannot race on it.
template <typename Kernel>
void allow_dynamic_smem_once(Kernel kernel, int dev, int64_t bytes, std::once_flag (&once)[kMaxDevices]) {
  if (bytes <= 48 * 1024) return;
  std::call_once(once[dev], [&]() {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
          "cudaFuncSetAttribute (shared memory)");
  });
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
