// Weight kernels: mp_weight (spec §1, MPConv steps 3-4, forward and backward) and the two
// multi-tensor ops of a training step, force_normalize_ (paper Eq. 66), ema_lerp_ (spec §7) and
// force_finite_ (the gradient clean-up before Adam).
//
// Weights are processed as rows (one per output channel): a warp per row, fp32 sums.
// The multi-tensor ops take the whole list in a few launches, like a multi-tensor apply: the
// pointers, sizes and dtypes of up to kMaxTensors tensors travel in the kernel parameters
// (< 4 KB, read in place as __grid_constant__), each block finds its tensor by binary search over
// a prefix sum of block counts.
#include "cuda_common.cuh"
#include "weight_rows.cuh"

namespace mpk {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;  // rows per block

template <typename T>
__global__ void __launch_bounds__(kThreads)
    mp_weight_fwd_kernel(int64_t rows, int64_t len, bool vec, const T* __restrict__ w, const void* gain_ptr, DType gdt,
                         float gain, float inv_sqrt_len, float eps, float* __restrict__ out, float* __restrict__ rms) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // uniform per warp
  const float k = (gain_ptr ? load_any(gain_ptr, gdt, 0) : gain) * inv_sqrt_len;
  const T* wr = w + row * len;
  const float rv = rms_from_sumsq(warp_sum(lane_sumsq(wr, len, vec, lane)), inv_sqrt_len * inv_sqrt_len);
  if (lane == 0) rms[row] = rv;
  lane_scale(wr, out + row * len, len, inv_denom(rv, eps) * k, vec, lane);
}

// gw = k (g r - coef w (g . w)), k = gain / sqrt(len); partial[row] = r (g . w) for d/d gain.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mp_weight_bwd_kernel(int64_t rows, int64_t len, bool vec, const float* __restrict__ g, const T* __restrict__ w,
                         const void* gain_ptr, DType gdt, float gain, const float* __restrict__ rms,
                         float inv_sqrt_len, float eps, T* __restrict__ gw, float* __restrict__ partial) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // uniform per warp
  const float k = (gain_ptr ? load_any(gain_ptr, gdt, 0) : gain) * inv_sqrt_len;
  const T* wr = w + row * len;
  const float* gr = g + row * len;
  T* gwr = gw + row * len;
  const float d = warp_sum(lane_dot(gr, wr, len, vec, lane));
  const float rv = rms[row], r = inv_denom(rv, eps);
  if (partial && lane == 0) partial[row] = r * d;
  const float a = r * k, cd = norm_grad_coef(r, rv, inv_sqrt_len * inv_sqrt_len) * d * k;
  lane_norm_grad(gr, wr, gwr, len, a, cd, vec, lane);
}

// One block sums `n` floats and stores the total times `scale` as one element of dtype dt.
__global__ void __launch_bounds__(kThreads) sum_to_scalar_kernel(const float* __restrict__ v, int64_t n, float scale,
                                                                 void* out, DType dt) {
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += v[i];
  acc = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) store_any(out, dt, 0, acc * scale);
}

// ------------------------------------------------------------------------------------------------
// Multi-tensor ops.

constexpr int kMaxTensors = 64;

struct RowBatch {
  void* ptr[kMaxTensors];
  int32_t rows[kMaxTensors];
  int32_t len[kMaxTensors];
  int32_t block_start[kMaxTensors + 1];
  DType dtype[kMaxTensors];
  int32_t count;
};

template <typename T>
__device__ __forceinline__ void normalize_row(T* p, int64_t len, float eps, int lane) {
  const bool vec = aligned16_dev(p) && len % kUnit == 0;
  const float rv = rms_from_sumsq(warp_sum(lane_sumsq(p, len, vec, lane)), 1.0f / static_cast<float>(len));
  lane_scale(p, p, len, inv_denom(rv, eps), vec, lane);
}

__global__ void __launch_bounds__(kThreads)
    force_normalize_kernel(const __grid_constant__ RowBatch batch, float eps) {
  const int t = block_owner(batch.block_start, batch.count, blockIdx.x);
  const int64_t row = static_cast<int64_t>(blockIdx.x - batch.block_start[t]) * kWarps + (threadIdx.x >> 5);
  if (row >= batch.rows[t]) return;  // uniform per warp
  const int lane = threadIdx.x & 31;
  const int64_t len = batch.len[t];
  switch (batch.dtype[t]) {
    case DType::F16: normalize_row(static_cast<__half*>(batch.ptr[t]) + row * len, len, eps, lane); break;
    case DType::BF16: normalize_row(static_cast<__nv_bfloat16*>(batch.ptr[t]) + row * len, len, eps, lane); break;
    default: normalize_row(static_cast<float*>(batch.ptr[t]) + row * len, len, eps, lane);
  }
}

constexpr int kLerpChunk = kThreads * kUnit * 4;  // elements per block

struct LerpBatch {
  void* ema[kMaxTensors];
  const void* src[kMaxTensors];
  int32_t numel[kMaxTensors];
  int32_t block_start[kMaxTensors + 1];
  DType ema_dtype[kMaxTensors];
  DType src_dtype[kMaxTensors];
  int32_t count;
};

template <typename TE, typename TS>
__device__ __forceinline__ void lerp_chunk(TE* e, const TS* s, int64_t n, float w) {
  // e, s point at the chunk; n <= kLerpChunk elements.
  const bool vec = aligned16_dev(e) && aligned16_dev(s);
  const int64_t nvec = vec ? n / kUnit : 0;
  for (int64_t u = threadIdx.x; u < nvec; u += kThreads) {
    float ev[kUnit], sv[kUnit];
    load8(e + u * kUnit, ev);
    load8(s + u * kUnit, sv);
#pragma unroll
    for (int k = 0; k < kUnit; ++k) ev[k] = lerp_f(ev[k], sv[k], w);
    store8(e + u * kUnit, ev);
  }
  for (int64_t i = nvec * kUnit + threadIdx.x; i < n; i += kThreads)
    e[i] = from_f<TE>(lerp_f(to_f(e[i]), to_f(s[i]), w));
}

template <typename TE>
__device__ __forceinline__ void lerp_chunk_src(TE* e, const void* s, DType sdt, int64_t first, int64_t n, float w) {
  switch (sdt) {
    case DType::F16: lerp_chunk(e + first, static_cast<const __half*>(s) + first, n, w); break;
    case DType::BF16: lerp_chunk(e + first, static_cast<const __nv_bfloat16*>(s) + first, n, w); break;
    default: lerp_chunk(e + first, static_cast<const float*>(s) + first, n, w);
  }
}

// weight_ptr (fp32, on the device) when not null, else `weight`: a CUDA graph replay then reads the
// weight's current value instead of the one baked into the captured launch.
__global__ void __launch_bounds__(kThreads)
    ema_lerp_kernel(const __grid_constant__ LerpBatch batch, float weight, const float* __restrict__ weight_ptr) {
  const float w = weight_ptr ? __ldg(weight_ptr) : weight;  // once per thread
  const int t = block_owner(batch.block_start, batch.count, blockIdx.x);
  const int64_t first = static_cast<int64_t>(blockIdx.x - batch.block_start[t]) * kLerpChunk;
  const int64_t rest = batch.numel[t] - first;
  const int64_t n = rest < kLerpChunk ? rest : kLerpChunk;
  switch (batch.ema_dtype[t]) {
    case DType::F16:
      lerp_chunk_src(static_cast<__half*>(batch.ema[t]), batch.src[t], batch.src_dtype[t], first, n, w);
      break;
    case DType::BF16:
      lerp_chunk_src(static_cast<__nv_bfloat16*>(batch.ema[t]), batch.src[t], batch.src_dtype[t], first, n, w);
      break;
    default:
      lerp_chunk_src(static_cast<float*>(batch.ema[t]), batch.src[t], batch.src_dtype[t], first, n, w);
  }
}

// force_finite_: a chunk of kLerpChunk elements per block, as ema_lerp_. An element whose exponent
// bits are all ones (inf or NaN) becomes +0; the test runs on the bits (exact in every dtype), 16
// bytes per load when the chunk is aligned.
struct FiniteBatch {
  void* ptr[kMaxTensors];
  int32_t numel[kMaxTensors];
  int32_t block_start[kMaxTensors + 1];
  DType dtype[kMaxTensors];
  int32_t count;
};

template <typename U, U kExp>
__device__ __forceinline__ U finite_bits(U u) {
  return (u & kExp) == kExp ? U(0) : u;
}

template <typename U, U kExp>
__device__ __forceinline__ void finite_chunk(U* p, int64_t n) {
  constexpr int kPer = 16 / sizeof(U);
  const int64_t nvec = aligned16_dev(p) ? n / kPer : 0;
  uint4* q = reinterpret_cast<uint4*>(p);
  for (int64_t u = threadIdx.x; u < nvec; u += kThreads) {
    uint4 v = q[u];
    U e[kPer];
    memcpy(e, &v, sizeof(v));
#pragma unroll
    for (int k = 0; k < kPer; ++k) e[k] = finite_bits<U, kExp>(e[k]);
    memcpy(&v, e, sizeof(v));
    q[u] = v;
  }
  for (int64_t i = nvec * kPer + threadIdx.x; i < n; i += kThreads) p[i] = finite_bits<U, kExp>(p[i]);
}

__global__ void __launch_bounds__(kThreads) force_finite_kernel(const __grid_constant__ FiniteBatch batch) {
  const int t = block_owner(batch.block_start, batch.count, blockIdx.x);
  const int64_t first = static_cast<int64_t>(blockIdx.x - batch.block_start[t]) * kLerpChunk;
  const int64_t rest = batch.numel[t] - first;
  const int64_t n = rest < kLerpChunk ? rest : kLerpChunk;
  switch (batch.dtype[t]) {
    case DType::F16: finite_chunk<uint16_t, 0x7C00u>(static_cast<uint16_t*>(batch.ptr[t]) + first, n); break;
    case DType::BF16: finite_chunk<uint16_t, 0x7F80u>(static_cast<uint16_t*>(batch.ptr[t]) + first, n); break;
    default: finite_chunk<uint32_t, 0x7F800000u>(static_cast<uint32_t*>(batch.ptr[t]) + first, n);
  }
}

}  // namespace

void mp_weight_fwd(DType dt, int64_t rows, int64_t len, const void* w, const void* gain_ptr, DType gdt, float gain,
                   float eps, float* out, float* rms, cudaStream_t stream) {
  if (rows == 0 || len == 0) return;
  const bool vec = len % kUnit == 0 && aligned16(w) && aligned16(out);
  const unsigned grid = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  const float inv_sqrt_len = 1.0f / std::sqrt(static_cast<float>(len));
  MPK_CUDA_DISPATCH(dt, T, mp_weight_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(
                               rows, len, vec, static_cast<const T*>(w), gain_ptr, gdt, gain, inv_sqrt_len, eps, out,
                               rms));
  MPK_CHECK_LAUNCH("mp_weight_fwd");
}

void mp_weight_bwd(DType dt, int64_t rows, int64_t len, const float* g, const void* w, const void* gain_ptr, DType gdt,
                   float gain, const float* rms, float eps, void* gw, void* ggain, float* workspace,
                   cudaStream_t stream) {
  if (rows == 0 || len == 0) return;
  const bool vec = len % kUnit == 0 && aligned16(g) && aligned16(w) && aligned16(gw);
  const unsigned grid = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  const float inv_sqrt_len = 1.0f / std::sqrt(static_cast<float>(len));
  float* partial = ggain ? workspace : nullptr;
  MPK_CUDA_DISPATCH(dt, T, mp_weight_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(
                               rows, len, vec, g, static_cast<const T*>(w), gain_ptr, gdt, gain, rms, inv_sqrt_len, eps,
                               static_cast<T*>(gw), partial));
  MPK_CHECK_LAUNCH("mp_weight_bwd");
  if (ggain) {
    sum_to_scalar_kernel<<<1, kThreads, 0, stream>>>(partial, rows, inv_sqrt_len, ggain, gdt);
    MPK_CHECK_LAUNCH("mp_weight_bwd (gain)");
  }
}

void force_normalize(const RowTensor* tensors, int64_t count, float eps, cudaStream_t stream) {
  RowBatch batch;
  batch.count = 0;
  batch.block_start[0] = 0;
  auto flush = [&]() {
    if (batch.count == 0) return;
    force_normalize_kernel<<<static_cast<unsigned>(batch.block_start[batch.count]), kThreads, 0, stream>>>(batch, eps);
    MPK_CHECK_LAUNCH("force_normalize_");
    batch.count = 0;
  };
  for (int64_t i = 0; i < count; ++i) {
    const RowTensor& t = tensors[i];
    if (t.rows == 0 || t.len == 0) continue;
    const int64_t blocks = (t.rows + kWarps - 1) / kWarps;
    if (batch.count == kMaxTensors || batch.block_start[batch.count] + blocks > INT32_MAX) flush();
    const int c = batch.count;
    batch.ptr[c] = t.ptr;
    batch.rows[c] = static_cast<int32_t>(t.rows);
    batch.len[c] = static_cast<int32_t>(t.len);
    batch.dtype[c] = t.dtype;
    batch.block_start[c + 1] = static_cast<int32_t>(batch.block_start[c] + blocks);
    batch.count = c + 1;
  }
  flush();
}

void ema_lerp(const LerpPair* pairs, int64_t count, float weight, const float* weight_ptr, cudaStream_t stream) {
  LerpBatch batch;
  batch.count = 0;
  batch.block_start[0] = 0;
  auto flush = [&]() {
    if (batch.count == 0) return;
    const unsigned grid = static_cast<unsigned>(batch.block_start[batch.count]);
    ema_lerp_kernel<<<grid, kThreads, 0, stream>>>(batch, weight, weight_ptr);
    MPK_CHECK_LAUNCH("ema_lerp_");
    batch.count = 0;
  };
  for (int64_t i = 0; i < count; ++i) {
    const LerpPair& p = pairs[i];
    if (p.numel == 0) continue;
    const int64_t blocks = (p.numel + kLerpChunk - 1) / kLerpChunk;
    if (batch.count == kMaxTensors || batch.block_start[batch.count] + blocks > INT32_MAX) flush();
    const int c = batch.count;
    batch.ema[c] = p.ema;
    batch.src[c] = p.src;
    batch.numel[c] = static_cast<int32_t>(p.numel);
    batch.ema_dtype[c] = p.ema_dtype;
    batch.src_dtype[c] = p.src_dtype;
    batch.block_start[c + 1] = static_cast<int32_t>(batch.block_start[c] + blocks);
    batch.count = c + 1;
  }
  flush();
}

void force_finite(const FlatTensor* tensors, int64_t count, cudaStream_t stream) {
  FiniteBatch batch;
  batch.count = 0;
  batch.block_start[0] = 0;
  auto flush = [&]() {
    if (batch.count == 0) return;
    force_finite_kernel<<<static_cast<unsigned>(batch.block_start[batch.count]), kThreads, 0, stream>>>(batch);
    MPK_CHECK_LAUNCH("force_finite_");
    batch.count = 0;
  };
  for (int64_t i = 0; i < count; ++i) {
    const FlatTensor& t = tensors[i];
    if (t.numel == 0) continue;
    const int64_t blocks = (t.numel + kLerpChunk - 1) / kLerpChunk;
    if (batch.count == kMaxTensors || batch.block_start[batch.count] + blocks > INT32_MAX) flush();
    const int c = batch.count;
    batch.ptr[c] = t.ptr;
    batch.numel[c] = static_cast<int32_t>(t.numel);
    batch.dtype[c] = t.dtype;
    batch.block_start[c + 1] = static_cast<int32_t>(batch.block_start[c] + blocks);
    batch.count = c + 1;
  }
  flush();
}

}  // namespace cuda
}  // namespace mpk
