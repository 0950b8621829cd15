// Element-wise CUDA kernels: mp_silu, mp_sum_clip (spec §1-2) and modulated_mp_silu (the
// embedding modulation of a Block, spec §2 step 3), forward and backward.
#include "cuda_common.cuh"

namespace mpk {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

template <int N>
struct ConstPtrs {
  const void* p[N];
};
template <int N>
struct Ptrs {
  void* p[N];
};

// ------------------------------------------------------------------------------------------------
// Flat maps over identically laid out arrays: NI inputs -> NO outputs through Op, in fp32.

struct MpSiluFwdOp {
  __device__ void operator()(const float* in, float* out) const { out[0] = mp_silu_f(in[0]); }
};

struct MpSiluBwdOp {  // in: grad, x
  __device__ void operator()(const float* in, float* out) const { out[0] = in[0] * mp_silu_grad_f(in[1]); }
};

struct MpSumClipFwdOp {  // in: a, b
  float t, scale, clip;
  __device__ void operator()(const float* in, float* out) const {
    out[0] = clip_f(lerp_f(in[0], in[1], t) * scale, clip);
  }
};

struct MpSumClipBwdOp {  // in: grad, a, b -> grad_a, grad_b
  float t, scale, clip, wa, wb;
  __device__ void operator()(const float* in, float* out) const {
    const float gm = clip_grad_f(in[0], lerp_f(in[1], in[2], t) * scale, clip);
    out[0] = gm * wa;
    out[1] = gm * wb;
  }
};

template <typename T, int NI, int NO, class Op>
__global__ void __launch_bounds__(kThreads) map_kernel(int64_t n, ConstPtrs<NI> in, Ptrs<NO> out, Op op, bool vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = vec ? n / kUnit : 0;
  for (int64_t v = first; v < nvec; v += stride) {
    float a[NI][kUnit], b[NO][kUnit];
#pragma unroll
    for (int k = 0; k < NI; ++k) load8(static_cast<const T*>(in.p[k]) + v * kUnit, a[k]);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      float x[NI], y[NO];
#pragma unroll
      for (int k = 0; k < NI; ++k) x[k] = a[k][j];
      op(x, y);
#pragma unroll
      for (int k = 0; k < NO; ++k) b[k][j] = y[k];
    }
#pragma unroll
    for (int k = 0; k < NO; ++k) store8(static_cast<T*>(out.p[k]) + v * kUnit, b[k]);
  }
  for (int64_t i = nvec * kUnit + first; i < n; i += stride) {
    float x[NI], y[NO];
#pragma unroll
    for (int k = 0; k < NI; ++k) x[k] = to_f(static_cast<const T*>(in.p[k])[i]);
    op(x, y);
#pragma unroll
    for (int k = 0; k < NO; ++k) static_cast<T*>(out.p[k])[i] = from_f<T>(y[k]);
  }
}

template <typename T, int NI, int NO, class Op>
void launch_map(int64_t n, ConstPtrs<NI> in, Ptrs<NO> out, Op op, cudaStream_t stream, const char* what) {
  if (n == 0) return;
  bool vec = true;
  for (int k = 0; k < NI; ++k) vec = vec && aligned16(in.p[k]);
  for (int k = 0; k < NO; ++k) vec = vec && aligned16(out.p[k]);
  const int64_t work = vec ? (n + kUnit - 1) / kUnit : n;
  map_kernel<T, NI, NO, Op><<<grid_for(work, kThreads), kThreads, 0, stream>>>(n, in, out, op, vec);
  MPK_CHECK_LAUNCH(what);
}

// ------------------------------------------------------------------------------------------------
// modulated_mp_silu over an [N, C, L] view. A "row" is a unit-stride run: the L pixels of one
// (n, ch) in NCHW, or the C channels of one (n, pixel) in channels_last (CLAST).

struct RowGeometry {
  int64_t len;     // elements per row
  int64_t per_n;   // rows per image
  int64_t s_row;   // stride between rows of one image
};

__host__ __device__ inline RowGeometry rows_of(const NCL& s, bool clast) {
  return clast ? RowGeometry{s.C, s.L, s.sL} : RowGeometry{s.L, s.C, s.sC};
}

template <typename T, bool CLAST, int U>
__global__ void __launch_bounds__(kThreads)
    modulated_fwd_kernel(NCL s, const T* __restrict__ y, const void* __restrict__ c, DType cdt, int64_t csN,
                         int64_t csC, T* __restrict__ out) {
  const RowGeometry g = rows_of(s, CLAST);
  // Tensors have < 2^31 elements (checked by the bindings): 32-bit division is enough and much
  // cheaper than 64-bit on the GPU.
  const uint32_t units_per_row = static_cast<uint32_t>(g.len / U), per_n = static_cast<uint32_t>(g.per_n);
  const int64_t total = s.N * g.per_n * units_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < total; u += stride) {
    const uint32_t row = static_cast<uint32_t>(u) / units_per_row;
    const int64_t j = static_cast<int64_t>(static_cast<uint32_t>(u) - row * units_per_row) * U;
    const uint32_t n32 = row / per_n;
    const int64_t n = n32, m = row - n32 * per_n;
    const int64_t off = n * s.sN + m * g.s_row + j;
    float v[U];
    load_u<T, U>(y + off, v);
    if (CLAST) {
#pragma unroll
      for (int k = 0; k < U; ++k) v[k] = mp_silu_f(v[k] * load_any(c, cdt, n * csN + (j + k) * csC));
    } else {
      const float sc = load_any(c, cdt, n * csN + m * csC);
#pragma unroll
      for (int k = 0; k < U; ++k) v[k] = mp_silu_f(v[k] * sc);
    }
    store_u<T, U>(out + off, v);
  }
}

// NCHW backward: each (n, ch) row of L pixels is handled by RT threads (8, 32 or 128, see
// launch::plan_modulated_rows) of a 128-thread block; their sum gives gc[n, ch]. Short rows share
// a block (8x8: 8 accesses per row, 16 rows per block) instead of idling 120 of 128 threads.
constexpr int kRowThreads = launch::kModulatedRowBlock;

// Sum over the RT consecutive threads of a row group; all 128 threads take part.
template <int RT>
__device__ __forceinline__ float row_group_sum(float v) {
  if constexpr (RT == kRowThreads) {
    return block_sum<kRowThreads>(v);
  } else {
#pragma unroll
    for (int o = RT / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
}

template <typename T, int U, int RT>
__global__ void __launch_bounds__(kRowThreads)
    modulated_bwd_rows_kernel(NCL s, const T* __restrict__ g, const T* __restrict__ y, const void* __restrict__ c,
                              DType cdt, int64_t csN, int64_t csC, T* __restrict__ gy, void* __restrict__ gc,
                              int64_t gcsN, int64_t gcsC) {
  constexpr int kRows = kRowThreads / RT;
  const int lane = threadIdx.x % RT;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / RT;
  const bool active = row < s.N * s.C;  // inactive threads still join the reductions
  const int64_t n = active ? row / s.C : 0, ch = active ? row - n * s.C : 0;
  const int64_t off = n * s.sN + ch * s.sC;
  float acc = 0.0f;
  if (active) {
    const float sc = load_any(c, cdt, n * csN + ch * csC);
    for (int64_t j = static_cast<int64_t>(lane) * U; j < s.L; j += RT * U) {
      float gv[U], yv[U], out[U];
      load_u<T, U>(g + off + j, gv);
      load_u<T, U>(y + off + j, yv);
#pragma unroll
      for (int k = 0; k < U; ++k) {
        const float gs = gv[k] * mp_silu_grad_f(yv[k] * sc);
        out[k] = gs * sc;
        acc += gs * yv[k];
      }
      store_u<T, U>(gy + off + j, out);
    }
  }
  acc = row_group_sum<RT>(acc);
  if (active && lane == 0) store_any(gc, cdt, n * gcsN + ch * gcsC, acc);
}

template <typename T, int U, typename... Args>
void launch_rows(const launch::ModulatedRowsPlan& plan, cudaStream_t stream, Args... args) {
  const unsigned grid = static_cast<unsigned>(plan.blocks);
  switch (plan.row_threads) {
    case 8: modulated_bwd_rows_kernel<T, U, 8><<<grid, kRowThreads, 0, stream>>>(args...); break;
    case 32: modulated_bwd_rows_kernel<T, U, 32><<<grid, kRowThreads, 0, stream>>>(args...); break;
    default: modulated_bwd_rows_kernel<T, U, kRowThreads><<<grid, kRowThreads, 0, stream>>>(args...);
  }
}

// channels_last backward: block (32 x 8) = 32 channel units x 8 pixel rows over a chunk of
// kChunk pixels; per-chunk partial sums of gc go to a workspace [N, chunks, C], summed by
// modulated_gc_sum_kernel in a fixed order (deterministic, no atomics).
constexpr int kChunk = 128;

template <typename T, int U>
__global__ void __launch_bounds__(kThreads)
    modulated_bwd_pixels_kernel(NCL s, int64_t chunks, const T* __restrict__ g, const T* __restrict__ y,
                                const void* __restrict__ c, DType cdt, int64_t csN, int64_t csC,
                                T* __restrict__ gy, float* __restrict__ ws) {
  __shared__ float red[8][32 * U];
  const int64_t n = blockIdx.x / chunks, chunk = blockIdx.x - n * chunks;
  const int64_t ch0 = (static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x) * U;
  const bool active = ch0 < s.C;
  float acc[U], sc[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    acc[k] = 0.0f;
    sc[k] = active ? load_any(c, cdt, n * csN + (ch0 + k) * csC) : 0.0f;
  }
  if (active) {
    const int64_t l_end = s.L < (chunk + 1) * kChunk ? s.L : (chunk + 1) * kChunk;
    for (int64_t l = chunk * kChunk + threadIdx.y; l < l_end; l += 8) {
      const int64_t off = n * s.sN + l * s.sL + ch0;
      float gv[U], yv[U], out[U];
      load_u<T, U>(g + off, gv);
      load_u<T, U>(y + off, yv);
#pragma unroll
      for (int k = 0; k < U; ++k) {
        const float gs = gv[k] * mp_silu_grad_f(yv[k] * sc[k]);
        out[k] = gs * sc[k];
        acc[k] += gs * yv[k];
      }
      store_u<T, U>(gy + off, out);
    }
  }
#pragma unroll
  for (int k = 0; k < U; ++k) red[threadIdx.y][threadIdx.x * U + k] = acc[k];
  __syncthreads();
  // 256 threads sum the 8 rows of 32 * U columns.
  for (int col = threadIdx.y * 32 + threadIdx.x; col < 32 * U; col += kThreads) {
    const int64_t ch = static_cast<int64_t>(blockIdx.y) * 32 * U + col;
    if (ch < s.C) {
      float tot = 0.0f;
#pragma unroll
      for (int r = 0; r < 8; ++r) tot += red[r][col];
      ws[(n * chunks + chunk) * s.C + ch] = tot;
    }
  }
}

// Launched with grid_for (capped): a grid-stride loop covers every (n, ch).
__global__ void __launch_bounds__(kThreads)
    modulated_gc_sum_kernel(const float* __restrict__ ws, int64_t N, int64_t chunks, int64_t C,
                            void* __restrict__ gc, DType cdt, int64_t gcsN, int64_t gcsC) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N * C; i += stride) {
    const int64_t n = i / C, ch = i - n * C;
    float tot = 0.0f;
    for (int64_t k = 0; k < chunks; ++k) tot += ws[(n * chunks + k) * C + ch];
    store_any(gc, cdt, n * gcsN + ch * gcsC, tot);
  }
}

// Vector access along a row needs the row length and every row start to be multiples of kUnit
// elements, and 16-byte aligned base pointers.
bool rows_vectorizable(const NCL& s, bool clast, std::initializer_list<const void*> ptrs) {
  const RowGeometry g = rows_of(s, clast);
  if (g.len % kUnit || s.sN % kUnit || (g.per_n > 1 && g.s_row % kUnit)) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

}  // namespace

void mp_silu_fwd(DType dt, int64_t n, const void* x, void* y, cudaStream_t stream) {
  MPK_CUDA_DISPATCH(dt, T, launch_map<T, 1, 1>(n, ConstPtrs<1>{{x}}, Ptrs<1>{{y}}, MpSiluFwdOp{}, stream,
                                                "mp_silu_fwd"));
}

void mp_silu_bwd(DType dt, int64_t n, const void* g, const void* x, void* gx, cudaStream_t stream) {
  MPK_CUDA_DISPATCH(dt, T, launch_map<T, 2, 1>(n, ConstPtrs<2>{{g, x}}, Ptrs<1>{{gx}}, MpSiluBwdOp{}, stream,
                                                "mp_silu_bwd"));
}

void mp_sum_clip_fwd(DType dt, int64_t n, const void* a, const void* b, void* y, float t, float scale, float clip,
                     cudaStream_t stream) {
  MPK_CUDA_DISPATCH(dt, T, launch_map<T, 2, 1>(n, ConstPtrs<2>{{a, b}}, Ptrs<1>{{y}}, MpSumClipFwdOp{t, scale, clip},
                                                stream, "mp_sum_clip_fwd"));
}

void mp_sum_clip_bwd(DType dt, int64_t n, const void* g, const void* a, const void* b, void* ga, void* gb, float t,
                     float scale, float clip, cudaStream_t stream) {
  const MpSumClipBwdOp op{t, scale, clip, (1.0f - t) * scale, t * scale};
  MPK_CUDA_DISPATCH(dt, T, launch_map<T, 3, 2>(n, ConstPtrs<3>{{g, a, b}}, Ptrs<2>{{ga, gb}}, op, stream,
                                                "mp_sum_clip_bwd"));
}

void modulated_mp_silu_fwd(DType dt, const NCL& s, const void* y, const void* c, DType cdt, int64_t csN,
                           int64_t csC, void* out, cudaStream_t stream) {
  const int64_t numel = s.N * s.C * s.L;
  if (numel == 0) return;
  const bool clast = s.sC == 1;
  const bool vec = rows_vectorizable(s, clast, {y, out});
  const unsigned grid = grid_for(vec ? numel / kUnit : numel, kThreads);
  MPK_CUDA_DISPATCH(dt, T, {
    const T* yp = static_cast<const T*>(y);
    T* op = static_cast<T*>(out);
    if (clast && vec)
      modulated_fwd_kernel<T, true, kUnit><<<grid, kThreads, 0, stream>>>(s, yp, c, cdt, csN, csC, op);
    else if (clast)
      modulated_fwd_kernel<T, true, 1><<<grid, kThreads, 0, stream>>>(s, yp, c, cdt, csN, csC, op);
    else if (vec)
      modulated_fwd_kernel<T, false, kUnit><<<grid, kThreads, 0, stream>>>(s, yp, c, cdt, csN, csC, op);
    else
      modulated_fwd_kernel<T, false, 1><<<grid, kThreads, 0, stream>>>(s, yp, c, cdt, csN, csC, op);
  });
  MPK_CHECK_LAUNCH("modulated_mp_silu_fwd");
}

int64_t modulated_mp_silu_bwd_workspace(const NCL& s) {
  if (s.sC != 1) return 0;
  return s.N * ((s.L + kChunk - 1) / kChunk) * s.C;
}

void modulated_mp_silu_bwd(DType dt, const NCL& s, const void* g, const void* y, const void* c, DType cdt,
                           int64_t csN, int64_t csC, void* gy, void* gc, int64_t gcsN, int64_t gcsC, float* workspace,
                           cudaStream_t stream) {
  if (s.N * s.C == 0) return;
  const bool clast = s.sC == 1;
  const bool vec = rows_vectorizable(s, clast, {g, y, gy});
  if (!clast) {
    const launch::ModulatedRowsPlan plan = launch::plan_modulated_rows(s.N, s.C, s.L, vec ? kUnit : 1);
    MPK_CUDA_DISPATCH(dt, T, {
      const T* gp = static_cast<const T*>(g);
      const T* yp = static_cast<const T*>(y);
      T* gyp = static_cast<T*>(gy);
      if (vec)
        launch_rows<T, kUnit>(plan, stream, s, gp, yp, c, cdt, csN, csC, gyp, gc, gcsN, gcsC);
      else
        launch_rows<T, 1>(plan, stream, s, gp, yp, c, cdt, csN, csC, gyp, gc, gcsN, gcsC);
    });
    MPK_CHECK_LAUNCH("modulated_mp_silu_bwd");
    return;
  }
  const int64_t chunks = (s.L + kChunk - 1) / kChunk;
  const dim3 block(32, 8);
  MPK_CUDA_DISPATCH(dt, T, {
    const T* gp = static_cast<const T*>(g);
    const T* yp = static_cast<const T*>(y);
    T* gyp = static_cast<T*>(gy);
    if (vec) {
      const dim3 grid(static_cast<unsigned>(s.N * chunks),
                      static_cast<unsigned>((s.C + 32 * kUnit - 1) / (32 * kUnit)));
      modulated_bwd_pixels_kernel<T, kUnit><<<grid, block, 0, stream>>>(s, chunks, gp, yp, c, cdt, csN, csC, gyp,
                                                                       workspace);
    } else {
      const dim3 grid(static_cast<unsigned>(s.N * chunks), static_cast<unsigned>((s.C + 31) / 32));
      modulated_bwd_pixels_kernel<T, 1><<<grid, block, 0, stream>>>(s, chunks, gp, yp, c, cdt, csN, csC, gyp,
                                                                   workspace);
    }
  });
  MPK_CHECK_LAUNCH("modulated_mp_silu_bwd");
  modulated_gc_sum_kernel<<<grid_for(s.N * s.C, kThreads), kThreads, 0, stream>>>(workspace, s.N, chunks, s.C, gc,
                                                                                   cdt, gcsN, gcsC);
  MPK_CHECK_LAUNCH("modulated_mp_silu_bwd (sum)");
}

}  // namespace cuda
}  // namespace mpk
