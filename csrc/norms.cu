// Pixel norm and pixel norm + mp_silu (spec §1, §2 step 2-3), forward and backward, over an
// [N, C, L] view: normalize over C for every (n, pixel), rms saved in fp32 for backward.
//
// NCHW (sL == 1): a block takes a tile of TW pixels (8 threads x U pixels, 16-byte accesses
// along the unit-stride pixels) and all C channels (32 channel groups); the tile is kept in
// shared memory between the reduction and the output pass when it fits.
// channels_last (sC == 1): one warp per pixel, 16-byte accesses along the channels, values
// kept in registers between the two passes (up to 32 * kMaxUnits units of the row).
#include "cuda_common.cuh"

namespace mpk {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kPixThreads = 8;                      // NCHW: threads across the pixels of a tile
constexpr int kGroups = kThreads / kPixThreads;     // NCHW: channel groups
constexpr int kWarps = kThreads / 32;               // channels_last: pixels per block

template <int U>
constexpr int max_units() { return U == 1 ? 16 : 4; }  // register cache per lane: <= 32 floats

// ------------------------------------------------------------------------------------------------
// NCHW

template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_fwd_cfirst(NCL s, int64_t tiles, bool cache, const T* __restrict__ x, T* __restrict__ xn,
                          T* __restrict__ y, float* __restrict__ rms, float eps, float inv_c) {
  constexpr int TW = kPixThreads * U;
  extern __shared__ float4 smem4[];
  float* red = reinterpret_cast<float*>(smem4);  // [kGroups][TW] partial sums of squares
  float* rr = red + kGroups * TW;                 // [TW] 1 / (eps + rms)
  T* tile = reinterpret_cast<T*>(rr + TW);        // [C][TW] the input tile, when `cache`
  const int px = threadIdx.x % kPixThreads, cg = threadIdx.x / kPixThreads;
  const int64_t n = blockIdx.x / tiles, t0 = (blockIdx.x - n * tiles) * TW;
  const int64_t l = t0 + px * U;
  const bool active = l < s.L;  // with U > 1, L % U == 0: a unit is wholly in or out
  const T* xb = x + n * s.sN + l;

  float acc[U];
#pragma unroll
  for (int k = 0; k < U; ++k) acc[k] = 0.0f;
  if (active) {
#pragma unroll 4
    for (int64_t c = cg; c < s.C; c += kGroups) {
      float v[U];
      load_u<T, U>(xb + c * s.sC, v);
#pragma unroll
      for (int k = 0; k < U; ++k) acc[k] += v[k] * v[k];
      if (cache) store_u_shared<T, U>(tile + c * TW + px * U, v);
    }
  }
#pragma unroll
  for (int k = 0; k < U; ++k) red[cg * TW + px * U + k] = acc[k];
  __syncthreads();
  if (threadIdx.x < TW) {
    float ss = 0.0f;
#pragma unroll 8
    for (int g = 0; g < kGroups; ++g) ss += red[g * TW + threadIdx.x];
    const float rv = rms_from_sumsq(ss, inv_c);
    rr[threadIdx.x] = inv_denom(rv, eps);
    if (t0 + threadIdx.x < s.L) rms[n * s.L + t0 + threadIdx.x] = rv;
  }
  __syncthreads();
  if (!active) return;

  float r[U];
#pragma unroll
  for (int k = 0; k < U; ++k) r[k] = rr[px * U + k];
  T* xo = xn + n * s.sN + l;
  T* yo = y ? y + n * s.sN + l : nullptr;
#pragma unroll 4
  for (int64_t c = cg; c < s.C; c += kGroups) {
    float v[U];
    if (cache)
      load_u<T, U>(tile + c * TW + px * U, v);
    else
      load_u<T, U>(xb + c * s.sC, v);
#pragma unroll
    for (int k = 0; k < U; ++k) v[k] *= r[k];
    store_u<T, U>(xo + c * s.sC, v);
    if (yo) {
#pragma unroll
      for (int k = 0; k < U; ++k) v[k] = mp_silu_f(v[k]);
      store_u<T, U>(yo + c * s.sC, v);
    }
  }
}

// Gradient reaching xn at U elements: gxn + gy * mp_silu'(x * r).
template <typename T, int U>
__device__ __forceinline__ void total_grad(const T* gxn, const T* gy, int64_t off, const float (&xv)[U],
                                           const float (&r)[U], float (&gt)[U]) {
  if (gxn) {
    load_u<T, U>(gxn + off, gt);
  } else {
#pragma unroll
    for (int k = 0; k < U; ++k) gt[k] = 0.0f;
  }
  if (gy) {
    float g2[U];
    load_u<T, U>(gy + off, g2);
#pragma unroll
    for (int k = 0; k < U; ++k) gt[k] += g2[k] * mp_silu_grad_f(xv[k] * r[k]);
  }
}

template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_bwd_cfirst(NCL s, int64_t tiles, const T* __restrict__ gxn, const T* __restrict__ gy,
                          const T* __restrict__ x, const float* __restrict__ rms, T* __restrict__ gx, float eps,
                          float inv_c) {
  constexpr int TW = kPixThreads * U;
  __shared__ float red[kGroups * TW];
  __shared__ float cd_s[TW];
  const int px = threadIdx.x % kPixThreads, cg = threadIdx.x / kPixThreads;
  const int64_t n = blockIdx.x / tiles, t0 = (blockIdx.x - n * tiles) * TW;
  const int64_t l = t0 + px * U;
  const bool active = l < s.L;
  const int64_t base = n * s.sN + l;

  float r[U], acc[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    r[k] = active ? inv_denom(rms[n * s.L + l + k], eps) : 0.0f;
    acc[k] = 0.0f;
  }
  if (active) {
#pragma unroll 2
    for (int64_t c = cg; c < s.C; c += kGroups) {
      const int64_t off = base + c * s.sC;
      float xv[U], gt[U];
      load_u<T, U>(x + off, xv);
      total_grad<T, U>(gxn, gy, off, xv, r, gt);
#pragma unroll
      for (int k = 0; k < U; ++k) acc[k] += gt[k] * xv[k];
    }
  }
#pragma unroll
  for (int k = 0; k < U; ++k) red[cg * TW + px * U + k] = acc[k];
  __syncthreads();
  if (threadIdx.x < TW) {
    float d = 0.0f;
#pragma unroll 8
    for (int g = 0; g < kGroups; ++g) d += red[g * TW + threadIdx.x];
    const int64_t lt = t0 + threadIdx.x;
    float cd = 0.0f;
    if (lt < s.L) {
      const float rv = rms[n * s.L + lt];
      cd = norm_grad_coef(inv_denom(rv, eps), rv, inv_c) * d;
    }
    cd_s[threadIdx.x] = cd;
  }
  __syncthreads();
  if (!active) return;

  float cd[U];
#pragma unroll
  for (int k = 0; k < U; ++k) cd[k] = cd_s[px * U + k];
#pragma unroll 2
  for (int64_t c = cg; c < s.C; c += kGroups) {
    const int64_t off = base + c * s.sC;
    float xv[U], gt[U], out[U];
    load_u<T, U>(x + off, xv);
    total_grad<T, U>(gxn, gy, off, xv, r, gt);
#pragma unroll
    for (int k = 0; k < U; ++k) out[k] = gt[k] * r[k] - cd[k] * xv[k];
    store_u<T, U>(gx + off, out);
  }
}

// ------------------------------------------------------------------------------------------------
// channels_last

template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_fwd_clast(NCL s, const T* __restrict__ x, T* __restrict__ xn, T* __restrict__ y,
                         float* __restrict__ rms, float eps, float inv_c) {
  constexpr int MAXU = max_units<U>();
  const int lane = threadIdx.x & 31;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (pix >= s.N * s.L) return;  // uniform per warp
  const int64_t n = pix / s.L, l = pix - n * s.L;
  const int64_t off = n * s.sN + l * s.sL;
  const int64_t units = s.C / U;

  float cache[MAXU][U];
  float acc = 0.0f;
#pragma unroll
  for (int k = 0; k < MAXU; ++k) {
    const int64_t u = lane + 32 * k;
    if (u < units) {
      load_u<T, U>(x + off + u * U, cache[k]);
#pragma unroll
      for (int j = 0; j < U; ++j) acc += cache[k][j] * cache[k][j];
    }
  }
  for (int64_t u = lane + 32 * MAXU; u < units; u += 32) {
    float v[U];
    load_u<T, U>(x + off + u * U, v);
#pragma unroll
    for (int j = 0; j < U; ++j) acc += v[j] * v[j];
  }
  const float rv = rms_from_sumsq(warp_sum(acc), inv_c);
  const float r = inv_denom(rv, eps);
  if (lane == 0) rms[pix] = rv;

#pragma unroll
  for (int k = 0; k < MAXU; ++k) {
    const int64_t u = lane + 32 * k;
    if (u < units) {
      float v[U];
#pragma unroll
      for (int j = 0; j < U; ++j) v[j] = cache[k][j] * r;
      store_u<T, U>(xn + off + u * U, v);
      if (y) {
#pragma unroll
        for (int j = 0; j < U; ++j) v[j] = mp_silu_f(v[j]);
        store_u<T, U>(y + off + u * U, v);
      }
    }
  }
  for (int64_t u = lane + 32 * MAXU; u < units; u += 32) {
    float v[U];
    load_u<T, U>(x + off + u * U, v);
#pragma unroll
    for (int j = 0; j < U; ++j) v[j] *= r;
    store_u<T, U>(xn + off + u * U, v);
    if (y) {
#pragma unroll
      for (int j = 0; j < U; ++j) v[j] = mp_silu_f(v[j]);
      store_u<T, U>(y + off + u * U, v);
    }
  }
}

template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_bwd_clast(NCL s, const T* __restrict__ gxn, const T* __restrict__ gy, const T* __restrict__ x,
                         const float* __restrict__ rms, T* __restrict__ gx, float eps, float inv_c) {
  constexpr int MAXU = max_units<U>();
  const int lane = threadIdx.x & 31;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (pix >= s.N * s.L) return;  // uniform per warp
  const int64_t n = pix / s.L, l = pix - n * s.L;
  const int64_t off = n * s.sN + l * s.sL;
  const int64_t units = s.C / U;
  const float rv = rms[pix];
  float r[U];
#pragma unroll
  for (int j = 0; j < U; ++j) r[j] = inv_denom(rv, eps);

  float xc[MAXU][U], gc[MAXU][U];
  float acc = 0.0f;
#pragma unroll
  for (int k = 0; k < MAXU; ++k) {
    const int64_t u = lane + 32 * k;
    if (u < units) {
      load_u<T, U>(x + off + u * U, xc[k]);
      total_grad<T, U>(gxn, gy, off + u * U, xc[k], r, gc[k]);
#pragma unroll
      for (int j = 0; j < U; ++j) acc += gc[k][j] * xc[k][j];
    }
  }
  for (int64_t u = lane + 32 * MAXU; u < units; u += 32) {
    float xv[U], gt[U];
    load_u<T, U>(x + off + u * U, xv);
    total_grad<T, U>(gxn, gy, off + u * U, xv, r, gt);
#pragma unroll
    for (int j = 0; j < U; ++j) acc += gt[j] * xv[j];
  }
  const float cd = norm_grad_coef(r[0], rv, inv_c) * warp_sum(acc);

#pragma unroll
  for (int k = 0; k < MAXU; ++k) {
    const int64_t u = lane + 32 * k;
    if (u < units) {
      float out[U];
#pragma unroll
      for (int j = 0; j < U; ++j) out[j] = gc[k][j] * r[j] - cd * xc[k][j];
      store_u<T, U>(gx + off + u * U, out);
    }
  }
  for (int64_t u = lane + 32 * MAXU; u < units; u += 32) {
    float xv[U], gt[U], out[U];
    load_u<T, U>(x + off + u * U, xv);
    total_grad<T, U>(gxn, gy, off + u * U, xv, r, gt);
#pragma unroll
    for (int j = 0; j < U; ++j) out[j] = gt[j] * r[j] - cd * xv[j];
    store_u<T, U>(gx + off + u * U, out);
  }
}

// ------------------------------------------------------------------------------------------------

// 16-byte accesses along the unit-stride dim need its length and every row start to be multiples
// of kUnit elements, and aligned base pointers.
bool vectorizable(const NCL& s, bool clast, std::initializer_list<const void*> ptrs) {
  const int64_t inner = clast ? s.C : s.L;
  const int64_t outer_count = clast ? s.L : s.C, outer_stride = clast ? s.sL : s.sC;
  if (inner % kUnit || s.sN % kUnit || (outer_count > 1 && outer_stride % kUnit)) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

// Dynamic shared memory the NCHW forward may use for its tile: at least two blocks per SM.
int64_t tile_smem_budget() {
  int dev = 0, optin = 0, per_sm = 0;
  check(cudaGetDevice(&dev), "pixel_norm (device query)");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "pixel_norm (device query)");
  check(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
        "pixel_norm (device query)");
  return std::min<int64_t>(optin, per_sm / 2 - 2048);
}

template <typename T, int U>
void launch_fwd_cfirst(const NCL& s, const T* x, T* xn, T* y, float* rms, float eps, cudaStream_t stream) {
  constexpr int TW = kPixThreads * U;
  const int64_t tiles = (s.L + TW - 1) / TW;
  const int64_t base = static_cast<int64_t>(kGroups + 1) * TW * sizeof(float);
  const int64_t with_tile = base + s.C * TW * static_cast<int64_t>(sizeof(T));
  const bool cache = with_tile <= tile_smem_budget();
  const int64_t smem = cache ? with_tile : base;
  auto kernel = pixel_norm_fwd_cfirst<T, U>;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          "pixel_norm_fwd (shared memory)");
  kernel<<<static_cast<unsigned>(s.N * tiles), kThreads, static_cast<size_t>(smem), stream>>>(
      s, tiles, cache, x, xn, y, rms, eps, 1.0f / static_cast<float>(s.C));
}

}  // namespace

void pixel_norm_fwd(DType dt, const NCL& s, const void* x, void* xn, void* y, float* rms, float eps,
                    cudaStream_t stream) {
  if (s.N * s.L == 0) return;
  const bool clast = s.sC == 1;
  const bool vec = vectorizable(s, clast, {x, xn, y});
  const float inv_c = 1.0f / static_cast<float>(s.C);
  MPK_CUDA_DISPATCH(dt, T, {
    const T* xp = static_cast<const T*>(x);
    T* xnp = static_cast<T*>(xn);
    T* yp = static_cast<T*>(y);
    if (clast) {
      const unsigned grid = static_cast<unsigned>((s.N * s.L + kWarps - 1) / kWarps);
      if (vec)
        pixel_norm_fwd_clast<T, kUnit><<<grid, kThreads, 0, stream>>>(s, xp, xnp, yp, rms, eps, inv_c);
      else
        pixel_norm_fwd_clast<T, 1><<<grid, kThreads, 0, stream>>>(s, xp, xnp, yp, rms, eps, inv_c);
    } else if (vec) {
      launch_fwd_cfirst<T, kUnit>(s, xp, xnp, yp, rms, eps, stream);
    } else {
      launch_fwd_cfirst<T, 1>(s, xp, xnp, yp, rms, eps, stream);
    }
  });
  MPK_CHECK_LAUNCH("pixel_norm_fwd");
}

void pixel_norm_bwd(DType dt, const NCL& s, const void* gxn, const void* gy, const void* x, const float* rms,
                    void* gx, float eps, cudaStream_t stream) {
  if (s.N * s.L == 0) return;
  const bool clast = s.sC == 1;
  const bool vec = vectorizable(s, clast, {gxn, gy, x, gx});
  const float inv_c = 1.0f / static_cast<float>(s.C);
  MPK_CUDA_DISPATCH(dt, T, {
    const T* g1 = static_cast<const T*>(gxn);
    const T* g2 = static_cast<const T*>(gy);
    const T* xp = static_cast<const T*>(x);
    T* gxp = static_cast<T*>(gx);
    if (clast) {
      const unsigned grid = static_cast<unsigned>((s.N * s.L + kWarps - 1) / kWarps);
      if (vec)
        pixel_norm_bwd_clast<T, kUnit><<<grid, kThreads, 0, stream>>>(s, g1, g2, xp, rms, gxp, eps, inv_c);
      else
        pixel_norm_bwd_clast<T, 1><<<grid, kThreads, 0, stream>>>(s, g1, g2, xp, rms, gxp, eps, inv_c);
    } else if (vec) {
      const int64_t tiles = (s.L + kPixThreads * kUnit - 1) / (kPixThreads * kUnit);
      pixel_norm_bwd_cfirst<T, kUnit><<<static_cast<unsigned>(s.N * tiles), kThreads, 0, stream>>>(
          s, tiles, g1, g2, xp, rms, gxp, eps, inv_c);
    } else {
      const int64_t tiles = (s.L + kPixThreads - 1) / kPixThreads;
      pixel_norm_bwd_cfirst<T, 1><<<static_cast<unsigned>(s.N * tiles), kThreads, 0, stream>>>(
          s, tiles, g1, g2, xp, rms, gxp, eps, inv_c);
    }
  });
  MPK_CHECK_LAUNCH("pixel_norm_bwd");
}

}  // namespace cuda
}  // namespace mpk
