// Pixel norm and pixel norm + mp_silu (spec §1, §2 step 2-3), forward and backward, over an
// [N, C, L] view: normalize over C for every (n, pixel), rms saved in fp32 for backward.
//
// NCHW (sL == 1): a block takes a tile of pixels (16-byte accesses along the unit-stride pixels)
// and all C channels, or one chunk of them when the grid would otherwise be too small for the GPU
// (then in two phases); the tile is kept in shared memory between the reduction and the output
// pass when it fits. launch::plan_pixel_norm_nchw (csrc/launch_shapes.h) picks the shape.
// channels_last (sC == 1): one warp per pixel, 16-byte accesses along the channels, values
// kept in registers between the two passes (up to 32 * kMaxUnits units of the row).
#include "cuda_common.cuh"

namespace mpk {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = launch::kPixelNormThreads;
constexpr int kWarps = kThreads / 32;               // channels_last: pixels per block

template <int U>
constexpr int max_units() { return U == 1 ? 16 : 4; }  // register cache per lane: <= 32 floats

// ------------------------------------------------------------------------------------------------
// NCHW. A block takes a tile of tw = px * U pixels of one image (px threads across the pixels, U
// each; px = 8, 4, 2: a run-time power of two) and the channels [c0, c1) of its chunk
// (blockIdx.y), spread over kThreads / px channel groups.

struct NchwTile {
  int px, cg;        // this thread: pixel thread, channel group
  int tw_log2, tw;   // tile width (pixels)
  int groups;        // channel groups
  int64_t n, t0, l;  // image, first pixel of the tile, first pixel of this thread
  int64_t c0, c1;    // channels of this block's chunk
  bool active;       // this thread's pixels are in the image (U > 1 needs L % U == 0)
};

template <int U>
__device__ __forceinline__ NchwTile nchw_tile(const NCL& s, int px_log2, int64_t tiles, int64_t chunk) {
  NchwTile t;
  t.px = threadIdx.x & ((1 << px_log2) - 1);
  t.cg = threadIdx.x >> px_log2;
  t.tw_log2 = px_log2 + (U == 8 ? 3 : 0);
  t.tw = 1 << t.tw_log2;
  t.groups = kThreads >> px_log2;
  t.n = blockIdx.x / tiles;
  t.t0 = (blockIdx.x - t.n * tiles) << t.tw_log2;
  t.l = t.t0 + t.px * U;
  t.c0 = static_cast<int64_t>(blockIdx.y) * chunk;
  t.c1 = s.C < t.c0 + chunk ? s.C : t.c0 + chunk;
  t.active = t.l < s.L;
  return t;
}

// Per-pixel total of the threads' U partial sums over the channel groups, valid in threads < tw
// (thread i: pixel t0 + i). Fixed order: deterministic. red: kThreads * U floats, scratch: kThreads.
template <int U>
__device__ __forceinline__ float sum_over_groups(const NchwTile& t, const float (&acc)[U], float* red,
                                                 float* scratch) {
#pragma unroll
  for (int k = 0; k < U; ++k) red[t.cg * t.tw + t.px * U + k] = acc[k];
  __syncthreads();
  // Two steps: kThreads / tw threads per pixel sum U groups each, then one thread per pixel.
  const int parts_log2 = 8 - t.tw_log2;  // kThreads = 2^8
  const int j = threadIdx.x & (t.tw - 1), q = threadIdx.x >> t.tw_log2;
  float v = 0.0f;
  for (int g = q; g < t.groups; g += 1 << parts_log2) v += red[g * t.tw + j];
  scratch[threadIdx.x] = v;
  __syncthreads();
  float tot = 0.0f;
  if (threadIdx.x < t.tw)
    for (int i = 0; i < 1 << parts_log2; ++i) tot += scratch[(i << t.tw_log2) + threadIdx.x];
  return tot;
}

// Sum of x^2 over this thread's channels of the chunk; the values go to `tile` when given.
template <typename T, int U>
__device__ __forceinline__ void sumsq_channels(const NCL& s, const NchwTile& t, const T* __restrict__ x, T* tile,
                                               float (&acc)[U]) {
#pragma unroll
  for (int k = 0; k < U; ++k) acc[k] = 0.0f;
  if (!t.active) return;
  const T* xb = x + t.n * s.sN + t.l;
#pragma unroll 4
  for (int64_t c = t.c0 + t.cg; c < t.c1; c += t.groups) {
    float v[U];
    load_u<T, U>(xb + c * s.sC, v);
#pragma unroll
    for (int k = 0; k < U; ++k) acc[k] += v[k] * v[k];
    if (tile) store_u_shared<T, U>(tile + ((c - t.c0) << t.tw_log2) + t.px * U, v);
  }
}

// xn = x * r (and y = mp_silu(xn)) for this thread's channels; x from `tile` when given.
template <typename T, int U>
__device__ __forceinline__ void normalize_channels(const NCL& s, const NchwTile& t, const float* rr,
                                                   const T* tile, const T* __restrict__ x, T* __restrict__ xn,
                                                   T* __restrict__ y) {
  float r[U];
#pragma unroll
  for (int k = 0; k < U; ++k) r[k] = rr[t.px * U + k];
  const int64_t base = t.n * s.sN + t.l;
#pragma unroll 4
  for (int64_t c = t.c0 + t.cg; c < t.c1; c += t.groups) {
    float v[U];
    if (tile)
      load_u<T, U>(tile + ((c - t.c0) << t.tw_log2) + t.px * U, v);
    else
      load_u<T, U>(x + base + c * s.sC, v);
#pragma unroll
    for (int k = 0; k < U; ++k) v[k] *= r[k];
    store_u<T, U>(xn + base + c * s.sC, v);
    if (y) {
#pragma unroll
      for (int k = 0; k < U; ++k) v[k] = mp_silu_f(v[k]);
      store_u<T, U>(y + base + c * s.sC, v);
    }
  }
}

// One phase: all C channels in the block; the tile stays in shared memory when `cache`.
template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_fwd_cfirst(NCL s, int px_log2, int64_t tiles, bool cache, const T* __restrict__ x,
                          T* __restrict__ xn, T* __restrict__ y, float* __restrict__ rms, float eps, float inv_c) {
  extern __shared__ float4 smem4[];
  const NchwTile t = nchw_tile<U>(s, px_log2, tiles, s.C);
  float* red = reinterpret_cast<float*>(smem4);  // [kThreads * U] partial sums of squares
  float* scratch = red + kThreads * U;            // [kThreads]
  float* rr = scratch + kThreads;                 // [tw] 1 / (eps + rms)
  T* tile = cache ? reinterpret_cast<T*>(rr + t.tw) : nullptr;  // [C][tw] the input tile
  float acc[U];
  sumsq_channels<T, U>(s, t, x, tile, acc);
  const float ss = sum_over_groups<U>(t, acc, red, scratch);
  if (threadIdx.x < t.tw) {
    const float rv = rms_from_sumsq(ss, inv_c);
    rr[threadIdx.x] = inv_denom(rv, eps);
    if (t.t0 + threadIdx.x < s.L) rms[t.n * s.L + t.t0 + threadIdx.x] = rv;
  }
  __syncthreads();
  if (t.active) normalize_channels<T, U>(s, t, rr, tile, x, xn, y);
}

// Two phases, 1: partial[n, chunk, l] = sum of x^2 over the chunk's channels.
template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_sumsq_cfirst(NCL s, int px_log2, int64_t tiles, int64_t chunk, const T* __restrict__ x,
                            float* __restrict__ partial) {
  __shared__ float red[kThreads * U];
  __shared__ float scratch[kThreads];
  const NchwTile t = nchw_tile<U>(s, px_log2, tiles, chunk);
  float acc[U];
  sumsq_channels<T, U>(s, t, x, static_cast<T*>(nullptr), acc);
  const float ss = sum_over_groups<U>(t, acc, red, scratch);
  if (threadIdx.x < t.tw && t.t0 + threadIdx.x < s.L)
    partial[(t.n * gridDim.y + blockIdx.y) * s.L + t.t0 + threadIdx.x] = ss;
}

// Two phases, 2: every chunk block sums the partials of its pixels (chunk order: the same total in
// every block), the first one stores rms; each normalizes its channels.
template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_fwd_apply_cfirst(NCL s, int px_log2, int64_t tiles, int64_t chunk, const float* __restrict__ partial,
                                const T* __restrict__ x, T* __restrict__ xn, T* __restrict__ y,
                                float* __restrict__ rms, float eps, float inv_c) {
  __shared__ float rr[kThreads];
  const NchwTile t = nchw_tile<U>(s, px_log2, tiles, chunk);
  if (threadIdx.x < t.tw) {
    const int64_t lt = t.t0 + threadIdx.x;
    float r = 0.0f;
    if (lt < s.L) {
      float ss = 0.0f;
      for (unsigned k = 0; k < gridDim.y; ++k) ss += partial[(t.n * gridDim.y + k) * s.L + lt];
      const float rv = rms_from_sumsq(ss, inv_c);
      r = inv_denom(rv, eps);
      if (blockIdx.y == 0) rms[t.n * s.L + lt] = rv;
    }
    rr[threadIdx.x] = r;
  }
  __syncthreads();
  if (t.active) normalize_channels<T, U>(s, t, rr, static_cast<const T*>(nullptr), x, xn, y);
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

template <int U>
__device__ __forceinline__ void inv_denoms(const NCL& s, const NchwTile& t, const float* __restrict__ rms, float eps,
                                           float (&r)[U]) {
#pragma unroll
  for (int k = 0; k < U; ++k) r[k] = t.active ? inv_denom(rms[t.n * s.L + t.l + k], eps) : 0.0f;
}

// Sum of (total gradient) * x over this thread's channels of the chunk.
template <typename T, int U>
__device__ __forceinline__ void dot_channels(const NCL& s, const NchwTile& t, const T* gxn, const T* gy,
                                             const T* __restrict__ x, const float (&r)[U], float (&acc)[U]) {
#pragma unroll
  for (int k = 0; k < U; ++k) acc[k] = 0.0f;
  if (!t.active) return;
  const int64_t base = t.n * s.sN + t.l;
#pragma unroll 2
  for (int64_t c = t.c0 + t.cg; c < t.c1; c += t.groups) {
    const int64_t off = base + c * s.sC;
    float xv[U], gt[U];
    load_u<T, U>(x + off, xv);
    total_grad<T, U>(gxn, gy, off, xv, r, gt);
#pragma unroll
    for (int k = 0; k < U; ++k) acc[k] += gt[k] * xv[k];
  }
}

// gx = gt * r - cd * x for this thread's channels.
template <typename T, int U>
__device__ __forceinline__ void grad_channels(const NCL& s, const NchwTile& t, const T* gxn, const T* gy,
                                              const T* __restrict__ x, const float (&r)[U], const float* cd_s,
                                              T* __restrict__ gx) {
  float cd[U];
#pragma unroll
  for (int k = 0; k < U; ++k) cd[k] = cd_s[t.px * U + k];
  const int64_t base = t.n * s.sN + t.l;
#pragma unroll 2
  for (int64_t c = t.c0 + t.cg; c < t.c1; c += t.groups) {
    const int64_t off = base + c * s.sC;
    float xv[U], gt[U], out[U];
    load_u<T, U>(x + off, xv);
    total_grad<T, U>(gxn, gy, off, xv, r, gt);
#pragma unroll
    for (int k = 0; k < U; ++k) out[k] = gt[k] * r[k] - cd[k] * xv[k];
    store_u<T, U>(gx + off, out);
  }
}

// coef * d of the pixel t0 + threadIdx.x (0 past the image).
__device__ __forceinline__ float grad_coef_times(const NCL& s, const NchwTile& t, const float* __restrict__ rms,
                                                 float d, float eps, float inv_c) {
  const int64_t lt = t.t0 + threadIdx.x;
  if (lt >= s.L) return 0.0f;
  const float rv = rms[t.n * s.L + lt];
  return norm_grad_coef(inv_denom(rv, eps), rv, inv_c) * d;
}

// One phase: all C channels in the block (x and the gradients read twice).
template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_bwd_cfirst(NCL s, int px_log2, int64_t tiles, const T* __restrict__ gxn, const T* __restrict__ gy,
                          const T* __restrict__ x, const float* __restrict__ rms, T* __restrict__ gx, float eps,
                          float inv_c) {
  __shared__ float red[kThreads * U];
  __shared__ float scratch[kThreads];
  __shared__ float cd_s[kThreads];
  const NchwTile t = nchw_tile<U>(s, px_log2, tiles, s.C);
  float r[U], acc[U];
  inv_denoms<U>(s, t, rms, eps, r);
  dot_channels<T, U>(s, t, gxn, gy, x, r, acc);
  const float d = sum_over_groups<U>(t, acc, red, scratch);
  if (threadIdx.x < t.tw) cd_s[threadIdx.x] = grad_coef_times(s, t, rms, d, eps, inv_c);
  __syncthreads();
  if (t.active) grad_channels<T, U>(s, t, gxn, gy, x, r, cd_s, gx);
}

// Two phases, 1: partial[n, chunk, l] = sum of (total gradient) * x over the chunk's channels.
template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_bwd_dot_cfirst(NCL s, int px_log2, int64_t tiles, int64_t chunk, const T* __restrict__ gxn,
                              const T* __restrict__ gy, const T* __restrict__ x, const float* __restrict__ rms,
                              float eps, float* __restrict__ partial) {
  __shared__ float red[kThreads * U];
  __shared__ float scratch[kThreads];
  const NchwTile t = nchw_tile<U>(s, px_log2, tiles, chunk);
  float r[U], acc[U];
  inv_denoms<U>(s, t, rms, eps, r);
  dot_channels<T, U>(s, t, gxn, gy, x, r, acc);
  const float d = sum_over_groups<U>(t, acc, red, scratch);
  if (threadIdx.x < t.tw && t.t0 + threadIdx.x < s.L)
    partial[(t.n * gridDim.y + blockIdx.y) * s.L + t.t0 + threadIdx.x] = d;
}

// Two phases, 2: sum the partials (chunk order), then gx for this chunk's channels.
template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    pixel_norm_bwd_apply_cfirst(NCL s, int px_log2, int64_t tiles, int64_t chunk, const float* __restrict__ partial,
                                const T* __restrict__ gxn, const T* __restrict__ gy, const T* __restrict__ x,
                                const float* __restrict__ rms, T* __restrict__ gx, float eps, float inv_c) {
  __shared__ float cd_s[kThreads];
  const NchwTile t = nchw_tile<U>(s, px_log2, tiles, chunk);
  if (threadIdx.x < t.tw) {
    const int64_t lt = t.t0 + threadIdx.x;
    float d = 0.0f;
    if (lt < s.L)
      for (unsigned k = 0; k < gridDim.y; ++k) d += partial[(t.n * gridDim.y + k) * s.L + lt];
    cd_s[threadIdx.x] = grad_coef_times(s, t, rms, d, eps, inv_c);
  }
  __syncthreads();
  float r[U];
  inv_denoms<U>(s, t, rms, eps, r);
  if (t.active) grad_channels<T, U>(s, t, gxn, gy, x, r, cd_s, gx);
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

// Launch shape of the NCHW kernels on the current device (and the device index).
launch::PixelNormPlan nchw_plan(const NCL& s, int unit, int elem_bytes, bool forward, int dev) {
  const DeviceInfo& info = device_info(dev);
  return launch::plan_pixel_norm_nchw(s.N, s.C, s.L, unit, elem_bytes, info.sm_count, info.smem_budget, forward);
}

int log2_of(int px) { return px >= 8 ? 3 : (px >= 4 ? 2 : (px >= 2 ? 1 : 0)); }

template <typename T, int U>
void launch_fwd_cfirst(const NCL& s, const T* x, T* xn, T* y, float* rms, float eps, float* workspace,
                       cudaStream_t stream) {
  const int dev = current_device();
  const launch::PixelNormPlan p = nchw_plan(s, U, sizeof(T), true, dev);
  const int px_log2 = log2_of(p.px);
  const float inv_c = 1.0f / static_cast<float>(s.C);
  if (p.splits == 1) {
    auto kernel = pixel_norm_fwd_cfirst<T, U>;
    static std::once_flag once[kMaxDevices];  // the largest tile any call may use: set once per device
    allow_dynamic_smem_once(kernel, dev, device_info(dev).smem_budget, once);
    kernel<<<static_cast<unsigned>(p.blocks), kThreads, static_cast<size_t>(p.smem), stream>>>(
        s, px_log2, p.tiles, p.cache, x, xn, y, rms, eps, inv_c);
    return;
  }
  const dim3 grid(static_cast<unsigned>(s.N * p.tiles), static_cast<unsigned>(p.splits));
  pixel_norm_sumsq_cfirst<T, U><<<grid, kThreads, 0, stream>>>(s, px_log2, p.tiles, p.chunk, x, workspace);
  MPK_CHECK_LAUNCH("pixel_norm_fwd (partial sums)");
  pixel_norm_fwd_apply_cfirst<T, U><<<grid, kThreads, 0, stream>>>(s, px_log2, p.tiles, p.chunk, workspace, x, xn, y,
                                                                  rms, eps, inv_c);
}

template <typename T, int U>
void launch_bwd_cfirst(const NCL& s, const T* gxn, const T* gy, const T* x, const float* rms, T* gx, float eps,
                       float* workspace, cudaStream_t stream) {
  const launch::PixelNormPlan p = nchw_plan(s, U, sizeof(T), false, current_device());
  const int px_log2 = log2_of(p.px);
  const float inv_c = 1.0f / static_cast<float>(s.C);
  if (p.splits == 1) {
    pixel_norm_bwd_cfirst<T, U><<<static_cast<unsigned>(p.blocks), kThreads, 0, stream>>>(s, px_log2, p.tiles, gxn, gy,
                                                                                         x, rms, gx, eps, inv_c);
    return;
  }
  const dim3 grid(static_cast<unsigned>(s.N * p.tiles), static_cast<unsigned>(p.splits));
  pixel_norm_bwd_dot_cfirst<T, U><<<grid, kThreads, 0, stream>>>(s, px_log2, p.tiles, p.chunk, gxn, gy, x, rms, eps,
                                                                workspace);
  MPK_CHECK_LAUNCH("pixel_norm_bwd (partial sums)");
  pixel_norm_bwd_apply_cfirst<T, U><<<grid, kThreads, 0, stream>>>(s, px_log2, p.tiles, p.chunk, workspace, gxn, gy,
                                                                  x, rms, gx, eps, inv_c);
}

}  // namespace

int64_t pixel_norm_workspace(DType dt, const NCL& s, bool forward, int device) {
  if (s.sC == 1 || s.N * s.L == 0) return 0;  // channels_last: no workspace
  const int elem = dt == DType::F32 ? 4 : 2;
  int64_t floats = 0;
  for (int unit : {1, kUnit}) {  // the vector path is decided at launch (pointer alignment): cover both
    const launch::PixelNormPlan p = nchw_plan(s, unit, elem, forward, device);
    if (p.splits > 1) floats = std::max(floats, s.N * p.splits * s.L);
  }
  return floats;
}

void pixel_norm_fwd(DType dt, const NCL& s, const void* x, void* xn, void* y, float* rms, float eps, float* workspace,
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
      launch_fwd_cfirst<T, kUnit>(s, xp, xnp, yp, rms, eps, workspace, stream);
    } else {
      launch_fwd_cfirst<T, 1>(s, xp, xnp, yp, rms, eps, workspace, stream);
    }
  });
  MPK_CHECK_LAUNCH("pixel_norm_fwd");
}

void pixel_norm_bwd(DType dt, const NCL& s, const void* gxn, const void* gy, const void* x, const float* rms,
                    void* gx, float eps, float* workspace, cudaStream_t stream) {
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
      launch_bwd_cfirst<T, kUnit>(s, g1, g2, xp, rms, gxp, eps, workspace, stream);
    } else {
      launch_bwd_cfirst<T, 1>(s, g1, g2, xp, rms, gxp, eps, workspace, stream);
    }
  });
  MPK_CHECK_LAUNCH("pixel_norm_bwd");
}

}  // namespace cuda
}  // namespace mpk
