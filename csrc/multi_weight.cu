// CUDA kernels of mp_weights (csrc/multi_weight.h): all effective weights of an output dtype group
// in one launch, all their gradients in one launch, all tensor-gain gradients in one small launch.
//
// Like force_normalize_ (csrc/weights.cu), the per-weight pointers and sizes travel in the kernel
// parameters (__grid_constant__, read in place): no device table, no host-to-device copy, so the
// launches can be captured in a CUDA graph. A warp handles a row (fp32 sums, 16-byte accesses when
// the row allows); a block handles kWarps rows of one weight and finds it by binary search over
// the prefix sum of block counts. Parameter space is 4 KB before CUDA 12.1 / sm_90 (32 KB after):
// the chunks below fit in 4 KB everywhere, so a list longer than a chunk (an EDM2 network has
// about 160 weights) takes a few launches per group.
#include "cuda_common.cuh"
#include "weight_rows.cuh"
#include "multi_weight.h"

namespace mpk {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;  // rows per block
constexpr int kParamBytes = 4096 - 96;  // kernel-parameter space left for a chunk (4 KB limit)

// A gain: a pointer to a one-element tensor read on the device (its dtype in gain_code), or a
// number (gain_code -1) whose fp32 bits fill the slot (no union: ptxas copies a union indexed at
// run time to the stack).
__host__ __device__ inline uint64_t gain_bits(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

// Weights per launch. Each takes the (w, out, gain[, grad]) slots of 8 bytes, rows, len, qkv_rows,
// stat and block_start (32-bit), and two dtype bytes; about 4 KB in all.
template <bool kGrad>
constexpr int chunk_size() {
  return (kParamBytes - 16) / ((kGrad ? 4 : 3) * 8 + 5 * 4 + 2);
}
constexpr int kFwdChunk = chunk_size<false>();  // 86
constexpr int kBwdChunk = chunk_size<true>();   // 73
constexpr int kGainChunk = (kParamBytes - 8) / (8 + 3 * 4 + 1);  // 189

template <bool kGrad>
struct WeightBatch {
  static constexpr int kSize = kGrad ? kBwdChunk : kFwdChunk;
  static constexpr bool kHasGrad = kGrad;
  const void* w[kSize];
  void* out[kSize];
  uint64_t gain[kSize];
  const void* grad[kGrad ? kSize : 1];
  int32_t rows[kSize], len[kSize], qkv_rows[kSize], stat[kSize];
  int32_t block_start[kSize + 1];
  DType w_dtype[kSize];
  int8_t gain_code[kSize];
  int32_t count;
};
using FwdBatch = WeightBatch<false>;
using BwdBatch = WeightBatch<true>;
static_assert(sizeof(FwdBatch) <= kParamBytes, "mp_weights forward chunk exceeds the kernel-parameter space");
static_assert(sizeof(BwdBatch) <= kParamBytes, "mp_weights backward chunk exceeds the kernel-parameter space");

struct GainBatch {
  void* out[kGainChunk];
  int32_t stat[kGainChunk], rows[kGainChunk], len[kGainChunk];
  DType dtype[kGainChunk];
  int32_t count;
};
static_assert(sizeof(GainBatch) <= kParamBytes, "mp_weights gain chunk exceeds the kernel-parameter space");

// Same scale as mp_weight's kernel (csrc/weights.cu): k = gain * (1 / sqrt(len)).
template <typename Batch>
__device__ __forceinline__ float gain_scale(const Batch& b, int t, float inv_sqrt_len) {
  const int code = b.gain_code[t];
  const uint64_t slot = b.gain[t];
  const float g = code < 0 ? __uint_as_float(static_cast<uint32_t>(slot))
                           : load_any(reinterpret_cast<const void*>(slot), static_cast<DType>(code), 0);
  return g * inv_sqrt_len;
}

// out = w * (k / (eps + rms)) for one row; the sum of squares is spread over the lanes.
template <typename TW, typename TO>
__device__ __forceinline__ void fwd_row(const TW* w, TO* out, int64_t len, float k, float inv_len, float eps,
                                        float* rms, int lane) {
  const bool vec = len % kUnit == 0 && aligned16_dev(w) && aligned16_dev(out);
  const float rv = rms_from_sumsq(warp_sum(lane_sumsq(w, len, vec, lane)), inv_len);
  if (lane == 0) *rms = rv;
  lane_scale(w, out, len, inv_denom(rv, eps) * k, vec, lane);
}

template <typename TO>
__global__ void __launch_bounds__(kThreads)
    mp_weights_fwd_kernel(const __grid_constant__ FwdBatch b, float eps, float* __restrict__ rms) {
  const int t = block_owner(b.block_start, b.count, blockIdx.x);
  const int32_t row = (static_cast<int32_t>(blockIdx.x) - b.block_start[t]) * kWarps + (threadIdx.x >> 5);
  if (row >= b.rows[t]) return;  // uniform per warp
  const int lane = threadIdx.x & 31;
  const int64_t len = b.len[t];
  const float inv_sqrt_len = 1.0f / sqrtf(static_cast<float>(len));
  const float k = gain_scale(b, t, inv_sqrt_len), inv_len = inv_sqrt_len * inv_sqrt_len;
  TO* out = static_cast<TO*>(b.out[t]) + static_cast<int64_t>(qkv_out_row(row, b.qkv_rows[t])) * len;
  float* r = rms + b.stat[t] + row;
  const int64_t first = static_cast<int64_t>(row) * len;
  switch (b.w_dtype[t]) {
    case DType::F16: fwd_row(static_cast<const __half*>(b.w[t]) + first, out, len, k, inv_len, eps, r, lane); break;
    case DType::BF16:
      fwd_row(static_cast<const __nv_bfloat16*>(b.w[t]) + first, out, len, k, inv_len, eps, r, lane);
      break;
    default: fwd_row(static_cast<const float*>(b.w[t]) + first, out, len, k, inv_len, eps, r, lane);
  }
}

// gw = k (g r - coef w (g . w)); *partial = r (g . w) (d out / d gain, times sqrt(len)) if given.
template <typename TW, typename TG>
__device__ __forceinline__ void bwd_row(const TG* g, const TW* w, TW* gw, int64_t len, float k, float inv_len,
                                        float rv, float eps, float* partial, int lane) {
  const bool vec = len % kUnit == 0 && aligned16_dev(g) && aligned16_dev(w) && aligned16_dev(gw);
  const float d = warp_sum(lane_dot(g, w, len, vec, lane)), r = inv_denom(rv, eps);
  if (partial && lane == 0) *partial = r * d;
  const float a = r * k, cd = norm_grad_coef(r, rv, inv_len) * d * k;
  lane_norm_grad(g, w, gw, len, a, cd, vec, lane);
}

// A weight whose effective weight got no gradient: gw = 0, no gain term.
template <typename TW>
__device__ __forceinline__ void zero_row(TW* gw, int64_t len, float* partial, int lane) {
  if (partial && lane == 0) *partial = 0.0f;
  for (int64_t i = lane; i < len; i += 32) gw[i] = from_f<TW>(0.0f);
}

template <typename TW, typename TG>
__device__ __forceinline__ void bwd_row_of(const BwdBatch& b, int t, int32_t row, float eps, float rv,
                                           float* partial, int lane) {
  const int64_t len = b.len[t], first = static_cast<int64_t>(row) * len;
  TW* gw = static_cast<TW*>(b.out[t]) + first;
  if (!b.grad[t]) {
    zero_row(gw, len, partial, lane);
    return;
  }
  const float inv_sqrt_len = 1.0f / sqrtf(static_cast<float>(len));
  const TG* g = static_cast<const TG*>(b.grad[t]) + static_cast<int64_t>(qkv_out_row(row, b.qkv_rows[t])) * len;
  bwd_row(g, static_cast<const TW*>(b.w[t]) + first, gw, len, gain_scale(b, t, inv_sqrt_len),
          inv_sqrt_len * inv_sqrt_len, rv, eps, partial, lane);
}

template <typename TG>
__global__ void __launch_bounds__(kThreads)
    mp_weights_bwd_kernel(const __grid_constant__ BwdBatch b, float eps, const float* __restrict__ rms,
                          float* __restrict__ partial) {
  const int t = block_owner(b.block_start, b.count, blockIdx.x);
  const int32_t row = (static_cast<int32_t>(blockIdx.x) - b.block_start[t]) * kWarps + (threadIdx.x >> 5);
  if (row >= b.rows[t]) return;  // uniform per warp
  const int lane = threadIdx.x & 31;
  const float rv = rms[b.stat[t] + row];
  float* part = partial && b.gain_code[t] >= 0 ? partial + b.stat[t] + row : nullptr;
  switch (b.w_dtype[t]) {
    case DType::F16: bwd_row_of<__half, TG>(b, t, row, eps, rv, part, lane); break;
    case DType::BF16: bwd_row_of<__nv_bfloat16, TG>(b, t, row, eps, rv, part, lane); break;
    default: bwd_row_of<float, TG>(b, t, row, eps, rv, part, lane);
  }
}

// One block per tensor gain: the sum of its rows' terms, in a fixed order (deterministic).
__global__ void __launch_bounds__(kThreads)
    mp_weights_gain_grads_kernel(const __grid_constant__ GainBatch b, const float* __restrict__ partial) {
  const int j = blockIdx.x;
  const float* p = partial + b.stat[j];
  float acc = 0.0f;
  for (int32_t i = threadIdx.x; i < b.rows[j]; i += kThreads) acc += p[i];
  acc = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) store_any(b.out[j], b.dtype[j], 0, acc * (1.0f / sqrtf(static_cast<float>(b.len[j]))));
}

// Fills `batch` with consecutive weights and calls launch(batch, blocks) whenever it is full.
template <typename Batch, typename Launch>
void for_each_chunk(const WeightRows* weights, int64_t count, Launch launch) {
  Batch batch;
  batch.count = 0;
  batch.block_start[0] = 0;
  auto flush = [&]() {
    if (batch.count == 0) return;
    launch(batch, static_cast<unsigned>(batch.block_start[batch.count]));
    batch.count = 0;
  };
  for (int64_t i = 0; i < count; ++i) {
    const WeightRows& t = weights[i];
    if (t.rows == 0 || t.len == 0) continue;
    const int64_t blocks = (t.rows + kWarps - 1) / kWarps;
    if (batch.count == Batch::kSize || batch.block_start[batch.count] + blocks > INT32_MAX) flush();
    const int c = batch.count;
    batch.w[c] = t.w;
    batch.out[c] = t.out;
    if (t.gain_ptr) {
      batch.gain[c] = reinterpret_cast<uint64_t>(t.gain_ptr);
      batch.gain_code[c] = static_cast<int8_t>(t.gain_dtype);
    } else {
      batch.gain[c] = gain_bits(t.gain);
      batch.gain_code[c] = -1;
    }
    if constexpr (Batch::kHasGrad) batch.grad[c] = t.grad;
    batch.rows[c] = static_cast<int32_t>(t.rows);
    batch.len[c] = static_cast<int32_t>(t.len);
    batch.qkv_rows[c] = static_cast<int32_t>(t.qkv_rows);
    batch.stat[c] = static_cast<int32_t>(t.stat);
    batch.w_dtype[c] = t.w_dtype;
    batch.block_start[c + 1] = static_cast<int32_t>(batch.block_start[c] + blocks);
    batch.count = c + 1;
  }
  flush();
}

}  // namespace

int64_t mp_weights_chunk(bool forward) { return forward ? kFwdChunk : kBwdChunk; }

void mp_weights_fwd(DType out_dtype, const WeightRows* weights, int64_t count, float eps, float* rms,
                    cudaStream_t stream) {
  for_each_chunk<FwdBatch>(weights, count, [&](const FwdBatch& batch, unsigned grid) {
    MPK_CUDA_DISPATCH(out_dtype, TO, mp_weights_fwd_kernel<TO><<<grid, kThreads, 0, stream>>>(batch, eps, rms));
    MPK_CHECK_LAUNCH("mp_weights (forward)");
  });
}

void mp_weights_bwd(DType grad_dtype, const WeightRows* weights, int64_t count, float eps, const float* rms,
                    float* partial, cudaStream_t stream) {
  for_each_chunk<BwdBatch>(weights, count, [&](const BwdBatch& batch, unsigned grid) {
    MPK_CUDA_DISPATCH(grad_dtype, TG,
                      mp_weights_bwd_kernel<TG><<<grid, kThreads, 0, stream>>>(batch, eps, rms, partial));
    MPK_CHECK_LAUNCH("mp_weights (backward)");
  });
}

void mp_weights_gain_grads(const GainGrad* gains, int64_t count, const float* partial, cudaStream_t stream) {
  GainBatch batch;
  for (int64_t first = 0; first < count; first += kGainChunk) {
    const int n = static_cast<int>(count - first < kGainChunk ? count - first : kGainChunk);
    for (int c = 0; c < n; ++c) {
      const GainGrad& g = gains[first + c];
      batch.out[c] = g.out;
      batch.stat[c] = static_cast<int32_t>(g.stat);
      batch.rows[c] = static_cast<int32_t>(g.rows);
      batch.len[c] = static_cast<int32_t>(g.len);
      batch.dtype[c] = g.dtype;
    }
    batch.count = n;
    mp_weights_gain_grads_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(batch, partial);
    MPK_CHECK_LAUNCH("mp_weights (gain gradients)");
  }
}

}  // namespace cuda
}  // namespace mpk
