// Device helpers shared by the weight kernels (csrc/weights.cu: mp_weight, force_normalize_;
// csrc/multi_weight.cu: mp_weights): a warp handles one row of a weight (an output channel), each
// lane a strided part of it, with fp32 sums. `vec` (decided by the caller, uniform per warp): the
// row length is a multiple of kUnit and every pointer is 16-byte aligned, so each lane moves
// kUnit elements per access; otherwise one element per access.
//
// The sums are per lane (no cross-lane reduction): the caller reduces them with warp_sum, so
// that every kernel decides itself where the reduced value goes.
#pragma once

#include "cuda_common.cuh"

namespace mpk {
namespace cuda {
namespace detail {

// Sum of squares of p[0, len) over this lane's elements.
template <typename T>
__device__ __forceinline__ float lane_sumsq(const T* p, int64_t len, bool vec, int lane) {
  float acc = 0.0f;
  if (vec) {
    for (int64_t i = static_cast<int64_t>(lane) * kUnit; i < len; i += 32 * kUnit) {
      float v[kUnit];
      load8(p + i, v);
#pragma unroll
      for (int k = 0; k < kUnit; ++k) acc += v[k] * v[k];
    }
  } else {
    for (int64_t i = lane; i < len; i += 32) {
      const float v = to_f(p[i]);
      acc += v * v;
    }
  }
  return acc;
}

// out[i] = in[i] * scale for this lane's elements (out may alias in).
template <typename TI, typename TO>
__device__ __forceinline__ void lane_scale(const TI* in, TO* out, int64_t len, float scale, bool vec, int lane) {
  if (vec) {
    for (int64_t i = static_cast<int64_t>(lane) * kUnit; i < len; i += 32 * kUnit) {
      float v[kUnit];
      load8(in + i, v);
#pragma unroll
      for (int k = 0; k < kUnit; ++k) v[k] *= scale;
      store8(out + i, v);
    }
  } else {
    for (int64_t i = lane; i < len; i += 32) out[i] = from_f<TO>(to_f(in[i]) * scale);
  }
}

// Dot product g . w over this lane's elements.
template <typename TG, typename TW>
__device__ __forceinline__ float lane_dot(const TG* g, const TW* w, int64_t len, bool vec, int lane) {
  float acc = 0.0f;
  if (vec) {
    for (int64_t i = static_cast<int64_t>(lane) * kUnit; i < len; i += 32 * kUnit) {
      float gv[kUnit], wv[kUnit];
      load8(g + i, gv);
      load8(w + i, wv);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) acc += gv[j] * wv[j];
    }
  } else {
    for (int64_t i = lane; i < len; i += 32) acc += to_f(g[i]) * to_f(w[i]);
  }
  return acc;
}

// gw[i] = g[i] * a - cd * w[i] for this lane's elements: the weight-normalization gradient
// (spec §1) once the row's scale a and coefficient cd are known.
template <typename TG, typename TW>
__device__ __forceinline__ void lane_norm_grad(const TG* g, const TW* w, TW* gw, int64_t len, float a, float cd,
                                               bool vec, int lane) {
  if (vec) {
    for (int64_t i = static_cast<int64_t>(lane) * kUnit; i < len; i += 32 * kUnit) {
      float gv[kUnit], wv[kUnit], o[kUnit];
      load8(g + i, gv);
      load8(w + i, wv);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) o[j] = gv[j] * a - cd * wv[j];
      store8(gw + i, o);
    }
  } else {
    for (int64_t i = lane; i < len; i += 32) gw[i] = from_f<TW>(to_f(g[i]) * a - cd * to_f(w[i]));
  }
}

// The multi-tensor kernels give each tensor a run of blocks: tensor i owns the blocks
// [block_start[i], block_start[i + 1]). Returns the owner of `block` (binary search).
__device__ __forceinline__ int block_owner(const int32_t* block_start, int count, int64_t block) {
  int lo = 0, hi = count - 1;  // largest i with block_start[i] <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (block_start[mid] <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace detail
}  // namespace cuda
}  // namespace mpk
