// Helpers shared by the extension's Python bindings (csrc/bindings.cpp, attention_cat_bindings.cpp,
// multi_weight_bindings.cpp): argument validation (ValueError / TypeError naming the argument,
// never a crash), the dtype mapping, the choice of twin (MPK_LAUNCH) and layout helpers.
#pragma once

#include <torch/extension.h>

#if defined(MPK_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <cstddef>
#include <string>

#include "mp_kernels.h"

#if defined(MPK_WITH_CUDA)
// Runs the CUDA twin mpk::cuda::fn on `ref`'s device and current stream, or the CPU twin mpk::cpu::fn.
#define MPK_LAUNCH(ref, fn, ...)                                                                   \
  do {                                                                                             \
    if ((ref).is_cuda()) {                                                                         \
      const c10::cuda::CUDAGuard mpk_guard((ref).device());                                        \
      mpk::cuda::fn(__VA_ARGS__, c10::cuda::getCurrentCUDAStream((ref).get_device()).stream());    \
    } else {                                                                                       \
      mpk::cpu::fn(__VA_ARGS__);                                                                   \
    }                                                                                              \
  } while (0)
#else
#define MPK_LAUNCH(ref, fn, ...) mpk::cpu::fn(__VA_ARGS__)
#endif

namespace mpk {
namespace bind {

using at::Tensor;

#if defined(MPK_WITH_CUDA)
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

constexpr int64_t kMaxNumel = (int64_t(1) << 31) - 1;  // kernels index with 32-bit-safe offsets

// "name[i]", for entries of list arguments.
inline std::string item(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

inline DType dtype_of(const Tensor& t, const std::string& name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, name, ": unsupported dtype ", t.scalar_type(),
                       "; the mpkernels extension takes float32, float16 or bfloat16");
  }
  return DType::F32;  // unreachable
}

inline at::ScalarType scalar_type_of(DType dt) {
  switch (dt) {
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    default: return at::kFloat;
  }
}

// A tensor any kernel of the extension can take: defined, strided, on the CPU or on a GPU (when
// built with CUDA), at most kMaxNumel elements, a supported dtype.
inline void check_tensor(const Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, ": only strided (dense) tensors are supported, got ",
                    t.layout());
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), name, ": tensors on ", t.device(),
                    " are not supported; expected CPU or CUDA");
  TORCH_CHECK_VALUE(!t.is_cuda() || kWithCuda, name,
                    ": is a CUDA tensor but the mpkernels extension was built without CUDA");
  TORCH_CHECK_VALUE(t.numel() <= kMaxNumel, name, ": has ", t.numel(),
                    " elements; the mpkernels extension handles at most 2^31 - 1 per tensor");
  dtype_of(t, name);
}

inline void check_same_device(const Tensor& t, const std::string& name, const Tensor& ref,
                              const std::string& ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; CPU and CUDA tensors (or tensors on different GPUs) cannot be mixed");
}

inline void check_same_dtype(const Tensor& t, const std::string& name, const Tensor& ref,
                             const std::string& ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": dtype ", t.scalar_type(), " does not match ",
                   ref_name, " dtype ", ref.scalar_type());
}

inline float check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps: must be finite and >= 0, got ", eps);
  return static_cast<float>(eps);
}

// Each index of dim 0 owns a contiguous block of numel / size(0) elements.
inline bool row_dense(const Tensor& t) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == t.numel() / t.size(0));
}

// `t`'s values with `like`'s strides: `t` itself when its elements sit where `like`'s do (same
// shape, same strides on every dim of size > 1: a [O, C, 1, 1] gradient strided (C, 1, 1, 1)
// matches a weight strided (C, 1, C, C)), else a copy in `like`'s layout. `like` is dense
// (freshly allocated by the caller).
inline Tensor laid_out_like(const Tensor& t, const Tensor& like) {
  bool same = t.sizes() == like.sizes();
  for (int64_t d = 0; same && d < t.dim(); ++d) same = t.size(d) == 1 || t.stride(d) == like.stride(d);
  if (same) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

}  // namespace bind
}  // namespace mpk
