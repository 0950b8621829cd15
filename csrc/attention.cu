// Cosine attention's normalization (spec §1): every q, k and v vector of the qkv convolution
// output to unit RMS over its D channels, fp32 math, written as q, k, v in [N, L, heads, D] (the
// layout PyTorch's flash / memory-efficient attention reads without a copy), with the fp32 rms
// saved for backward; and the backward through it. The attention core itself is PyTorch's fused
// scaled-dot-product attention (mpkernels/cuda/_attention.py).
//
// One row = one vector (n, l, head, j). channels_last input (unit channel stride): a warp per
// row, lanes over d (coalesced). Otherwise (NCHW): a thread per row, consecutive threads at
// consecutive pixels, so that each load over d is coalesced across the warp.
#include "attention_cat.h"
#include "cuda_common.cuh"

namespace mpk {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

struct OutPtrs {
  void* p[3];
};
struct InPtrs {
  const void* p[3];
  HeadsStrides s[3];
};

// Rows (vectors) of a qkv view: one per (n, l, head, j).
__host__ __device__ __forceinline__ int64_t rows_of(const QkvView& s) { return 3 * s.N * s.L * s.heads; }

struct Row {
  int64_t n, l, head, j;
};

// Row r in the order of the lane group G: pixel-major (head, j fastest) for G = 32, pixel-minor
// (l fastest) for G = 1.
template <int G>
__device__ __forceinline__ Row row_of(int64_t r, const QkvView& s) {
  const int64_t hj_count = 3 * s.heads;
  Row w;
  int64_t hj;
  if constexpr (G == 1) {
    w.l = r % s.L;
    const int64_t q = r / s.L;
    hj = q % hj_count;
    w.n = q / hj_count;
  } else {
    hj = r % hj_count;
    const int64_t p = r / hj_count;
    w.n = p / s.L;
    w.l = p % s.L;
  }
  w.head = hj / 3;
  w.j = hj % 3;
  return w;
}

template <int G>
__device__ __forceinline__ float group_sum(float v) {
  if constexpr (G == 32) return warp_sum(v);
  return v;
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    qkv_normalize_fwd_kernel(QkvView s, const T* __restrict__ x, OutPtrs out, HeadsStrides os, float* rms, float eps) {
  const int64_t rows = rows_of(s);
  const int64_t groups = static_cast<int64_t>(gridDim.x) * (kThreads / G);
  const int lane = G == 1 ? 0 : static_cast<int>(threadIdx.x % G);
  const float inv_k = 1.0f / static_cast<float>(s.D);
  const int64_t sd = s.cd * s.sC;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G; r < rows; r += groups) {
    const Row w = row_of<G>(r, s);
    const T* xr = x + w.n * s.sN + (w.head * 3 * s.D + w.j * s.cj) * s.sC + w.l * s.sL;
    float acc = 0.0f;
    for (int64_t d = lane; d < s.D; d += G) {
      const float v = to_f(xr[d * sd]);
      acc += v * v;
    }
    const float rm = rms_from_sumsq(group_sum<G>(acc), inv_k);
    const float inv = inv_denom(rm, eps);
    T* yr = static_cast<T*>(out.p[w.j]) + w.n * os.sN + w.l * os.sL + w.head * os.sH;
    for (int64_t d = lane; d < s.D; d += G) yr[d * os.sD] = from_f<T>(to_f(xr[d * sd]) * inv);
    if (lane == 0) rms[((w.j * s.N + w.n) * s.L + w.l) * s.heads + w.head] = rm;
  }
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    qkv_normalize_bwd_kernel(QkvView s, InPtrs g, const T* __restrict__ x, const float* __restrict__ rms, T* gx,
                             int64_t osN, int64_t osC, int64_t osL, float eps) {
  const int64_t rows = rows_of(s);
  const int64_t groups = static_cast<int64_t>(gridDim.x) * (kThreads / G);
  const int lane = G == 1 ? 0 : static_cast<int>(threadIdx.x % G);
  const float inv_k = 1.0f / static_cast<float>(s.D);
  const int64_t sd = s.cd * s.sC, od = s.cd * osC;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G; r < rows; r += groups) {
    const Row w = row_of<G>(r, s);
    const int64_t ch = w.head * 3 * s.D + w.j * s.cj;
    const T* xr = x + w.n * s.sN + ch * s.sC + w.l * s.sL;
    const HeadsStrides& gs = g.s[w.j];
    const T* gr = static_cast<const T*>(g.p[w.j]) + w.n * gs.sN + w.l * gs.sL + w.head * gs.sH;
    float acc = 0.0f;
    for (int64_t d = lane; d < s.D; d += G) acc += to_f(gr[d * gs.sD]) * to_f(xr[d * sd]);
    const float dot = group_sum<G>(acc);
    const float rm = rms[((w.j * s.N + w.n) * s.L + w.l) * s.heads + w.head];
    const float inv = inv_denom(rm, eps);
    const float coef = norm_grad_coef(inv, rm, inv_k) * dot;
    T* out = gx + w.n * osN + ch * osC + w.l * osL;
    for (int64_t d = lane; d < s.D; d += G)
      out[d * od] = from_f<T>(to_f(gr[d * gs.sD]) * inv - coef * to_f(xr[d * sd]));
  }
}


}  // namespace

void qkv_normalize_fwd(DType dt, const QkvView& s, const void* x, void* const* qkv_out, const HeadsStrides& os,
                       float* rms, float eps, cudaStream_t stream) {
  if (s.N * s.L * s.heads == 0) return;
  const OutPtrs out{{qkv_out[0], qkv_out[1], qkv_out[2]}};
  const bool warp_rows = s.sC == 1;
  MPK_CUDA_DISPATCH(dt, T, {
    if (warp_rows)
      qkv_normalize_fwd_kernel<T, 32><<<grid_for(rows_of(s) * 32, kThreads), kThreads, 0, stream>>>(
          s, static_cast<const T*>(x), out, os, rms, eps);
    else
      qkv_normalize_fwd_kernel<T, 1><<<grid_for(rows_of(s), kThreads), kThreads, 0, stream>>>(
          s, static_cast<const T*>(x), out, os, rms, eps);
  });
  MPK_CHECK_LAUNCH("qkv_normalize_fwd");
}

void qkv_normalize_bwd(DType dt, const QkvView& s, const void* const* grads, const HeadsStrides* gs, const void* x,
                       const float* rms, void* gx, int64_t osN, int64_t osC, int64_t osL, float eps,
                       cudaStream_t stream) {
  if (s.N * s.L * s.heads == 0) return;
  const InPtrs g{{grads[0], grads[1], grads[2]}, {gs[0], gs[1], gs[2]}};
  const bool warp_rows = s.sC == 1;
  MPK_CUDA_DISPATCH(dt, T, {
    if (warp_rows)
      qkv_normalize_bwd_kernel<T, 32><<<grid_for(rows_of(s) * 32, kThreads), kThreads, 0, stream>>>(
          s, g, static_cast<const T*>(x), rms, static_cast<T*>(gx), osN, osC, osL, eps);
    else
      qkv_normalize_bwd_kernel<T, 1><<<grid_for(rows_of(s), kThreads), kThreads, 0, stream>>>(
          s, g, static_cast<const T*>(x), rms, static_cast<T*>(gx), osN, osC, osL, eps);
  });
  MPK_CHECK_LAUNCH("qkv_normalize_bwd");
}

}  // namespace cuda
}  // namespace mpk
