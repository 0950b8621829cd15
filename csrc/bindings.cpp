// Python bindings of the mpkernels extension (pybind11). This one file holds what needs torch:
// argument validation (ValueError / TypeError naming the argument, never a crash), the layout
// decisions (outputs are allocated with empty_like, inputs brought to the output's strides; a copy
// only when a layout fits no kernel path), dtype mapping, and the choice of twin: mpk::cpu for
// CPU tensors, mpk::cuda (on the tensor's device and current stream) for CUDA tensors.
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings_common.h"
#include "launch_shapes.h"
#include "mp_kernels.h"

namespace {

using at::Tensor;
using mpk::DType;
using OptTensor = std::optional<Tensor>;
using namespace mpk::bind;

// ------------------------------------------------------------------------------------------------
// Validation

void check_same_shape(const Tensor& t, const std::string& name, const Tensor& ref, const std::string& ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ": shape ", t.sizes(), " does not match ", ref_name, " shape ",
                    ref.sizes());
}

// A tensor that must match `ref` in device, dtype and shape (gradients, second operands).
void check_like(const Tensor& t, const std::string& name, const Tensor& ref, const std::string& ref_name) {
  check_tensor(t, name);
  check_same_device(t, name, ref, ref_name);
  check_same_dtype(t, name, ref, ref_name);
  check_same_shape(t, name, ref, ref_name);
}

void check_stats(const Tensor& rms, const Tensor& ref, int64_t count) {
  TORCH_CHECK_TYPE(rms.defined(), "rms: expected a tensor, got None");
  TORCH_CHECK_TYPE(rms.scalar_type() == at::kFloat, "rms: expected float32 statistics, got ", rms.scalar_type());
  check_same_device(rms, "rms", ref, "x");
  TORCH_CHECK_VALUE(rms.numel() == count, "rms: has ", rms.numel(), " elements, expected ", count);
}

// ------------------------------------------------------------------------------------------------
// Layout

// The [N, C, L] view of `t` (spatial dims collapsed); false when they do not collapse or when
// neither C nor L has unit stride.
bool ncl_of(const Tensor& t, mpk::NCL& s) {
  s.N = t.size(0);
  s.C = t.dim() > 1 ? t.size(1) : 1;
  s.sN = t.stride(0);
  s.sC = t.dim() > 1 ? t.stride(1) : 1;
  int64_t L = 1, sL = 1;
  bool have = false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (!have) {
      sL = t.stride(d);
      L = t.size(d);
      have = true;
    } else if (t.stride(d) == sL * L) {
      L *= t.size(d);
    } else {
      return false;
    }
  }
  s.L = L;
  s.sL = have ? sL : 1;
  if (s.N == 1) s.sN = 0;  // canonical strides of size-1 dims (see mp_kernels.h)
  if (s.C == 1) s.sC = 1;
  return s.sC == 1 || s.sL == 1;
}

void* ptr_or_null(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

// ------------------------------------------------------------------------------------------------
// mp_silu

Tensor mp_silu_fwd(const Tensor& x) {
  check_tensor(x, "x");
  Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const Tensor xx = laid_out_like(x, y);
  MPK_LAUNCH(x, mp_silu_fwd, dtype_of(x, "x"), x.numel(), xx.data_ptr(), y.data_ptr());
  return y;
}

Tensor mp_silu_bwd(const Tensor& grad, const Tensor& x) {
  check_tensor(x, "x");
  check_like(grad, "grad", x, "x");
  Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  const Tensor gg = laid_out_like(grad, gx), xx = laid_out_like(x, gx);
  MPK_LAUNCH(x, mp_silu_bwd, dtype_of(x, "x"), x.numel(), gg.data_ptr(), xx.data_ptr(), gx.data_ptr());
  return gx;
}

// ------------------------------------------------------------------------------------------------
// mp_sum_clip: clip(lerp(a, b, t) / sqrt((1-t)^2 + t^2), -clip, clip); clip = inf for plain mp_sum.

float mp_sum_scale(double t, double clip) {
  TORCH_CHECK_VALUE(std::isfinite(t) && t >= 0 && t <= 1, "t: must be in [0, 1], got ", t);
  TORCH_CHECK_VALUE(clip > 0, "clip: must be > 0, got ", clip);
  return static_cast<float>(1.0 / std::sqrt((1 - t) * (1 - t) + t * t));
}

Tensor mp_sum_clip_fwd(const Tensor& a, const Tensor& b, double t, double clip) {
  check_tensor(a, "a");
  check_like(b, "b", a, "a");
  const float scale = mp_sum_scale(t, clip);
  Tensor y = at::empty_like(a);
  if (a.numel() == 0) return y;
  const Tensor aa = laid_out_like(a, y), bb = laid_out_like(b, y);
  MPK_LAUNCH(a, mp_sum_clip_fwd, dtype_of(a, "a"), a.numel(), aa.data_ptr(), bb.data_ptr(), y.data_ptr(),
             static_cast<float>(t), scale, static_cast<float>(clip));
  return y;
}

std::vector<Tensor> mp_sum_clip_bwd(const Tensor& grad, const Tensor& a, const Tensor& b, double t, double clip) {
  check_tensor(a, "a");
  check_like(b, "b", a, "a");
  check_like(grad, "grad", a, "a");
  const float scale = mp_sum_scale(t, clip);
  Tensor ga = at::empty_like(a), gb = at::empty_like(b);
  if (a.numel() == 0) return {ga, gb};
  const Tensor gbw = gb.strides() == ga.strides() ? gb : at::empty_like(ga);  // kernels share one layout
  const Tensor gg = laid_out_like(grad, ga), aa = laid_out_like(a, ga), bb = laid_out_like(b, ga);
  MPK_LAUNCH(a, mp_sum_clip_bwd, dtype_of(a, "a"), a.numel(), gg.data_ptr(), aa.data_ptr(), bb.data_ptr(),
             ga.data_ptr(), gbw.data_ptr(), static_cast<float>(t), scale, static_cast<float>(clip));
  if (!gbw.is_same(gb)) gb.copy_(gbw);
  return {ga, gb};
}

// ------------------------------------------------------------------------------------------------
// modulated_mp_silu: mp_silu(y * c[:, :, None, None]), c: [N, C] of any supported dtype.

void check_modulation(const Tensor& y, const Tensor& c) {
  check_tensor(y, "y");
  TORCH_CHECK_VALUE(y.dim() >= 2, "y: expected at least 2 dims (N, C, ...), got shape ", y.sizes());
  check_tensor(c, "c");
  check_same_device(c, "c", y, "y");
  TORCH_CHECK_VALUE(c.dim() == 2 && c.size(0) == y.size(0) && c.size(1) == y.size(1), "c: shape ", c.sizes(),
                    " must be [N, C] = [", y.size(0), ", ", y.size(1), "]");
}

Tensor modulated_mp_silu_fwd(const Tensor& y, const Tensor& c) {
  check_modulation(y, c);
  Tensor out = at::empty_like(y);
  if (y.numel() == 0) return out;
  mpk::NCL s;
  if (!ncl_of(out, s)) return out.copy_(modulated_mp_silu_fwd(y.contiguous(), c));
  const Tensor yy = laid_out_like(y, out);
  MPK_LAUNCH(y, modulated_mp_silu_fwd, dtype_of(y, "y"), s, yy.data_ptr(), c.data_ptr(), dtype_of(c, "c"),
             c.stride(0), c.stride(1), out.data_ptr());
  return out;
}

std::vector<Tensor> modulated_mp_silu_bwd(const Tensor& grad, const Tensor& y, const Tensor& c) {
  check_modulation(y, c);
  check_like(grad, "grad", y, "y");
  Tensor gy = at::empty_like(y), gc = at::empty_like(c);
  if (y.numel() == 0) return {gy, gc.zero_()};
  mpk::NCL s;
  if (!ncl_of(gy, s)) {
    auto r = modulated_mp_silu_bwd(grad.contiguous(), y.contiguous(), c);
    return {gy.copy_(r[0]), gc.copy_(r[1])};
  }
  const Tensor gg = laid_out_like(grad, gy), yy = laid_out_like(y, gy);
  Tensor ws;
#if defined(MPK_WITH_CUDA)
  if (y.is_cuda()) ws = at::empty({std::max<int64_t>(1, mpk::cuda::modulated_mp_silu_bwd_workspace(s))},
                                  y.options().dtype(at::kFloat));
#endif
  MPK_LAUNCH(y, modulated_mp_silu_bwd, dtype_of(y, "y"), s, gg.data_ptr(), yy.data_ptr(), c.data_ptr(),
             dtype_of(c, "c"), c.stride(0), c.stride(1), gy.data_ptr(), gc.data_ptr(), gc.stride(0), gc.stride(1),
             ws.defined() ? ws.data_ptr<float>() : nullptr);
  return {gy, gc};
}

// ------------------------------------------------------------------------------------------------
// pixel_norm (with_silu: pixel_norm_mp_silu). Returns [xn, rms] or [xn, y, rms]; rms: fp32,
// shape x.shape without dim 1, contiguous.

// fp32 workspace of the NCHW CUDA kernels when they split the channels over blocks (undefined
// on CPU and when not needed).
Tensor pixel_norm_workspace(const Tensor& x, const mpk::NCL& s, bool forward) {
#if defined(MPK_WITH_CUDA)
  if (x.is_cuda()) {
    const int64_t n = mpk::cuda::pixel_norm_workspace(dtype_of(x, "x"), s, forward, x.get_device());
    if (n > 0) return at::empty({n}, x.options().dtype(at::kFloat));
  }
#endif
  (void)x, (void)s, (void)forward;
  return Tensor();
}

std::vector<Tensor> pixel_norm_fwd(const Tensor& x, double eps, bool with_silu) {
  check_tensor(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 2, "x: expected at least 2 dims (N, C, ...), got shape ", x.sizes());
  const float e = check_eps(eps);
  Tensor xn = at::empty_like(x);
  Tensor y = with_silu ? at::empty_like(x) : Tensor();
  std::vector<int64_t> stat_shape = x.sizes().vec();
  stat_shape.erase(stat_shape.begin() + 1);
  Tensor rms = at::empty(stat_shape, x.options().dtype(at::kFloat));
  auto result = [&]() { return with_silu ? std::vector<Tensor>{xn, y, rms} : std::vector<Tensor>{xn, rms}; };
  if (x.numel() == 0) {
    rms.zero_();
    return result();
  }
  mpk::NCL s;
  if (!ncl_of(xn, s)) {
    auto r = pixel_norm_fwd(x.contiguous(), eps, with_silu);
    xn.copy_(r[0]);
    if (with_silu) y.copy_(r[1]);
    rms.copy_(r.back());
    return result();
  }
  const Tensor xx = laid_out_like(x, xn);
  const Tensor ws = pixel_norm_workspace(x, s, true);
  MPK_LAUNCH(x, pixel_norm_fwd, dtype_of(x, "x"), s, xx.data_ptr(), xn.data_ptr(), with_silu ? y.data_ptr() : nullptr,
             rms.data_ptr<float>(), e, ws.defined() ? ws.data_ptr<float>() : nullptr);
  return result();
}

Tensor pixel_norm_bwd(const OptTensor& grad_xn, const OptTensor& grad_y, const Tensor& x, const Tensor& rms,
                      double eps) {
  check_tensor(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 2, "x: expected at least 2 dims (N, C, ...), got shape ", x.sizes());
  const float e = check_eps(eps);
  const OptTensor g1 = grad_xn && grad_xn->defined() ? grad_xn : std::nullopt;
  const OptTensor g2 = grad_y && grad_y->defined() ? grad_y : std::nullopt;
  TORCH_CHECK_VALUE(g1 || g2, "grad_xn, grad_y: at least one gradient is needed");
  if (g1) check_like(*g1, "grad_xn", x, "x");
  if (g2) check_like(*g2, "grad_y", x, "x");
  int64_t pixels = x.size(0);
  for (int64_t d = 2; d < x.dim(); ++d) pixels *= x.size(d);
  check_stats(rms, x, pixels);
  Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  mpk::NCL s;
  if (!ncl_of(gx, s)) {
    auto contig = [](const OptTensor& t) -> OptTensor { return t ? OptTensor(t->contiguous()) : std::nullopt; };
    return gx.copy_(pixel_norm_bwd(contig(g1), contig(g2), x.contiguous(), rms, eps));
  }
  auto like_gx = [&](const OptTensor& t) -> OptTensor { return t ? OptTensor(laid_out_like(*t, gx)) : std::nullopt; };
  const OptTensor gg1 = like_gx(g1), gg2 = like_gx(g2);
  const Tensor xx = laid_out_like(x, gx), r = rms.contiguous();
  const Tensor ws = pixel_norm_workspace(x, s, false);
  MPK_LAUNCH(x, pixel_norm_bwd, dtype_of(x, "x"), s, ptr_or_null(gg1), ptr_or_null(gg2), xx.data_ptr(),
             r.data_ptr<float>(), gx.data_ptr(), e, ws.defined() ? ws.data_ptr<float>() : nullptr);
  return gx;
}

// ------------------------------------------------------------------------------------------------
// mp_weight: normalize(w) * gain / sqrt(fan_in) in fp32. The gain is `gain_t` (a one-element
// tensor, read on the device: no host sync) when given, else the number `gain`.

DType check_gain(const OptTensor& gain_t, const Tensor& w) {
  if (!gain_t) return DType::F32;
  check_tensor(*gain_t, "gain");
  check_same_device(*gain_t, "gain", w, "w");
  TORCH_CHECK_VALUE(gain_t->numel() == 1, "gain: a tensor gain must have exactly one element, got shape ",
                    gain_t->sizes());
  return dtype_of(*gain_t, "gain");
}

std::vector<Tensor> mp_weight_fwd(const Tensor& w, const OptTensor& gain_t, double gain, double eps) {
  check_tensor(w, "w");
  TORCH_CHECK_VALUE(w.dim() >= 2, "w: expected a weight with at least 2 dims, got shape ", w.sizes());
  const DType gdt = check_gain(gain_t, w);
  const float e = check_eps(eps);
  Tensor out = at::empty_like(w, w.options().dtype(at::kFloat));
  Tensor rms = at::empty({w.size(0)}, w.options().dtype(at::kFloat));
  if (w.numel() == 0) return {out, rms.zero_()};
  if (!row_dense(out)) {
    auto r = mp_weight_fwd(w.contiguous(), gain_t, gain, eps);
    return {out.copy_(r[0]), r[1]};
  }
  const Tensor ww = laid_out_like(w, out);
  MPK_LAUNCH(w, mp_weight_fwd, dtype_of(w, "w"), w.size(0), w.numel() / w.size(0), ww.data_ptr(), ptr_or_null(gain_t),
             gdt, static_cast<float>(gain), e, out.data_ptr<float>(), rms.data_ptr<float>());
  return {out, rms};
}

std::vector<Tensor> mp_weight_bwd(const Tensor& grad, const Tensor& w, const OptTensor& gain_t, const Tensor& rms,
                                  double gain, double eps) {
  check_tensor(w, "w");
  TORCH_CHECK_VALUE(w.dim() >= 2, "w: expected a weight with at least 2 dims, got shape ", w.sizes());
  check_tensor(grad, "grad");
  check_same_device(grad, "grad", w, "w");
  check_same_shape(grad, "grad", w, "w");
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat, "grad: mp_weight's output is float32, got ", grad.scalar_type());
  const DType gdt = check_gain(gain_t, w);
  check_stats(rms, w, w.size(0));
  const float e = check_eps(eps);
  Tensor gw = at::empty_like(w);
  Tensor ggain = gain_t ? at::empty_like(*gain_t) : Tensor();
  auto result = [&]() { return gain_t ? std::vector<Tensor>{gw, ggain} : std::vector<Tensor>{gw}; };
  if (w.numel() == 0) {
    if (gain_t) ggain.zero_();
    return result();
  }
  if (!row_dense(gw)) {
    auto r = mp_weight_bwd(grad, w.contiguous(), gain_t, rms, gain, eps);
    gw.copy_(r[0]);
    if (gain_t) ggain.copy_(r[1]);
    return result();
  }
  const Tensor gg = laid_out_like(grad, gw), ww = laid_out_like(w, gw), r = rms.contiguous();
  const Tensor ws = gain_t ? at::empty({w.size(0)}, w.options().dtype(at::kFloat)) : Tensor();
  MPK_LAUNCH(w, mp_weight_bwd, dtype_of(w, "w"), w.size(0), w.numel() / w.size(0), gg.data_ptr<float>(),
             ww.data_ptr(), ptr_or_null(gain_t), gdt, static_cast<float>(gain), r.data_ptr<float>(), e, gw.data_ptr(),
             gain_t ? ggain.data_ptr() : nullptr, ws.defined() ? ws.data_ptr<float>() : nullptr);
  return result();
}

// ------------------------------------------------------------------------------------------------
// Multi-tensor, in place.

void check_in_place(const Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    ": has internally overlapping memory (an expanded tensor?) and cannot be updated in place");
}

void force_normalize_(const std::vector<Tensor>& tensors, double eps) {
  const float e = check_eps(eps);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string name = "tensors[" + std::to_string(i) + "]";
    check_tensor(tensors[i], name);
    check_same_device(tensors[i], name, tensors[0], "tensors[0]");
    TORCH_CHECK_VALUE(tensors[i].dim() >= 1, name, ": expected a weight with at least 1 dim, got a scalar");
    check_in_place(tensors[i], name);
  }
  std::vector<mpk::RowTensor> rows;
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (destination, dense working copy)
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    Tensor work = t;
    if (!row_dense(t)) {
      work = t.contiguous();
      write_back.emplace_back(t, work);
    }
    rows.push_back({work.data_ptr(), t.size(0), t.numel() / t.size(0), dtype_of(t, "tensors")});
  }
  if (rows.empty()) return;
  MPK_LAUNCH(tensors[0], force_normalize, rows.data(), static_cast<int64_t>(rows.size()), e);
  for (auto& wb : write_back) wb.first.copy_(wb.second);
}

// The blend weight of ema_lerp_ as a tensor: 0-d fp32 on the tensors' device (`ref`, if any).
void check_weight_tensor(const Tensor& w, const Tensor* ref) {
  check_tensor(w, "weight");
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "weight: a tensor weight must be float32, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 0, "weight: a tensor weight must be 0-d, got shape ", w.sizes());
  if (ref) check_same_device(w, "weight", *ref, "ema_tensors[0]");
}

float check_weight(double weight) {
  TORCH_CHECK_VALUE(std::isfinite(weight) && weight >= 0 && weight <= 1, "weight: must be in [0, 1], got ", weight);
  return static_cast<float>(weight);
}

// ema <- lerp(ema, src, weight). The weight is `weight_t` when given (a 0-d fp32 tensor on the
// tensors' device, `weight` is then ignored), else `weight`. A CPU `weight_t` is read on the host
// and range-checked; a CUDA one is passed to the kernel by pointer and not range-checked, since
// reading it here would synchronize with the device (and is illegal during graph capture): a
// captured launch then reads the weight's current value at each replay.
void ema_lerp_(const std::vector<Tensor>& ema_tensors, const std::vector<Tensor>& tensors, double weight,
               const OptTensor& weight_t) {
  TORCH_CHECK_VALUE(ema_tensors.size() == tensors.size(), "tensors: ", tensors.size(),
                    " tensors but ema_tensors has ", ema_tensors.size());
  if (weight_t) check_weight_tensor(*weight_t, ema_tensors.empty() ? nullptr : &ema_tensors[0]);
  const bool device_weight = weight_t && weight_t->is_cuda();
  const float w = device_weight ? 0.0f : check_weight(weight_t ? weight_t->item<double>() : weight);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string en = "ema_tensors[" + std::to_string(i) + "]", tn = "tensors[" + std::to_string(i) + "]";
    check_tensor(ema_tensors[i], en);
    check_tensor(tensors[i], tn);
    check_same_device(ema_tensors[i], en, ema_tensors[0], "ema_tensors[0]");
    check_same_device(tensors[i], tn, ema_tensors[0], "ema_tensors[0]");
    check_same_shape(tensors[i], tn, ema_tensors[i], en);
    check_in_place(ema_tensors[i], en);
  }
  std::vector<mpk::LerpPair> pairs;
  std::vector<Tensor> keep;                           // sources brought to the ema's layout
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (destination, dense working copy)
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& e = ema_tensors[i];
    if (e.numel() == 0) continue;
    Tensor work = e;
    if (!e.is_non_overlapping_and_dense()) {
      work = e.contiguous();
      write_back.emplace_back(e, work);
    }
    keep.push_back(laid_out_like(tensors[i], work));
    pairs.push_back({work.data_ptr(), keep.back().data_ptr(), e.numel(), dtype_of(e, "ema_tensors"),
                     dtype_of(tensors[i], "tensors")});
  }
  if (pairs.empty()) return;
  const int64_t count = static_cast<int64_t>(pairs.size());
#if defined(MPK_WITH_CUDA)
  if (ema_tensors[0].is_cuda()) {
    const c10::cuda::CUDAGuard guard(ema_tensors[0].device());
    const float* weight_ptr = device_weight ? weight_t->data_ptr<float>() : nullptr;
    mpk::cuda::ema_lerp(pairs.data(), count, w, weight_ptr,
                        c10::cuda::getCurrentCUDAStream(ema_tensors[0].get_device()).stream());
  } else {
    mpk::cpu::ema_lerp(pairs.data(), count, w);
  }
#else
  mpk::cpu::ema_lerp(pairs.data(), count, w);
#endif
  for (auto& wb : write_back) wb.first.copy_(wb.second);
}

// Every inf / NaN element of every tensor becomes +0, in place (torch.nan_to_num(t, 0, 0, 0) on
// each): the gradient clean-up of a training step, one launch for the whole list on a GPU. The op
// is element-wise, so a dense tensor of any layout is processed as its flat memory; others go
// through a contiguous copy.
void force_finite_(const std::vector<Tensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string name = "tensors[" + std::to_string(i) + "]";
    check_tensor(tensors[i], name);
    check_same_device(tensors[i], name, tensors[0], "tensors[0]");
    check_in_place(tensors[i], name);
  }
  std::vector<mpk::FlatTensor> flat;
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (destination, dense working copy)
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    Tensor work = t;
    if (!t.is_non_overlapping_and_dense()) {
      work = t.contiguous();
      write_back.emplace_back(t, work);
    }
    flat.push_back({work.data_ptr(), t.numel(), dtype_of(t, "tensors")});
  }
  if (flat.empty()) return;
  MPK_LAUNCH(tensors[0], force_finite, flat.data(), static_cast<int64_t>(flat.size()));
  for (auto& wb : write_back) wb.first.copy_(wb.second);
}

}  // namespace

// Cosine attention normalization and mp_cat (csrc/attention_cat_bindings.cpp).
void register_attention_cat(pybind11::module& m);
// mp_weights, the multi-tensor mp_weight (csrc/multi_weight_bindings.cpp).
void register_multi_weight(pybind11::module& m);

#define MPK_STR2(x) #x
#define MPK_STR(x) MPK_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "mpkernels native kernels (CUDA and CPU twins) for the magnitude-preserving ops of EDM2";
  m.attr("with_cuda") = py::bool_(kWithCuda);
#if defined(MPK_SOURCE_HASH)
  m.attr("source_hash") = MPK_STR(MPK_SOURCE_HASH);  // checked against csrc/ by mpkernels/cuda/_build.py
#else
  m.attr("source_hash") = "";
#endif
  register_attention_cat(m);
  register_multi_weight(m);
  m.def("cpu_isa", &mpk::cpu::isa_name, "instruction set of the CPU kernels in use");
  m.def(
      "_set_cpu_isa", [](const std::string& name) { return mpk::cpu::set_isa(name.c_str()); }, py::arg("name"),
      "use the CPU kernels compiled for `name` ('default', 'avx2', 'avx512'); False if unsupported here");
  m.def("mp_silu_fwd", &mp_silu_fwd, py::arg("x"));
  m.def("mp_silu_bwd", &mp_silu_bwd, py::arg("grad"), py::arg("x"));
  m.def("mp_sum_clip_fwd", &mp_sum_clip_fwd, py::arg("a"), py::arg("b"), py::arg("t"), py::arg("clip"));
  m.def("mp_sum_clip_bwd", &mp_sum_clip_bwd, py::arg("grad"), py::arg("a"), py::arg("b"), py::arg("t"),
        py::arg("clip"));
  m.def("modulated_mp_silu_fwd", &modulated_mp_silu_fwd, py::arg("y"), py::arg("c"));
  m.def("modulated_mp_silu_bwd", &modulated_mp_silu_bwd, py::arg("grad"), py::arg("y"), py::arg("c"));
  m.def("pixel_norm_fwd", &pixel_norm_fwd, py::arg("x"), py::arg("eps"), py::arg("with_silu"));
  m.def("pixel_norm_bwd", &pixel_norm_bwd, py::arg("grad_xn"), py::arg("grad_y"), py::arg("x"), py::arg("rms"),
        py::arg("eps"));
  m.def("mp_weight_fwd", &mp_weight_fwd, py::arg("w"), py::arg("gain_t"), py::arg("gain"), py::arg("eps"));
  m.def("mp_weight_bwd", &mp_weight_bwd, py::arg("grad"), py::arg("w"), py::arg("gain_t"), py::arg("rms"),
        py::arg("gain"), py::arg("eps"));
  m.def("force_normalize_", &force_normalize_, py::arg("tensors"), py::arg("eps"));
  m.def("force_finite_", &force_finite_, py::arg("tensors"),
        "every inf / NaN element becomes +0, in place (one launch for the whole list on a GPU)");
  // Launch-shape heuristics of the CUDA kernels (csrc/launch_shapes.h), for tests without a GPU.
  m.def(
      "_grid_for", [](int64_t work, int threads) { return mpk::launch::grid_for(work, threads); }, py::arg("work"),
      py::arg("threads"));
  m.def(
      "_plan_pixel_norm_nchw",
      [](int64_t N, int64_t C, int64_t L, int unit, int elem_bytes, int sm_count, int64_t smem_budget, bool forward) {
        TORCH_CHECK_VALUE(N > 0 && C > 0 && L > 0, "N, C, L: must be positive");
        TORCH_CHECK_VALUE(unit == 1 || unit == 8, "unit: must be 1 or 8, got ", unit);
        TORCH_CHECK_VALUE(elem_bytes == 2 || elem_bytes == 4, "elem_bytes: must be 2 or 4, got ", elem_bytes);
        const auto p = mpk::launch::plan_pixel_norm_nchw(N, C, L, unit, elem_bytes, sm_count, smem_budget, forward);
        py::dict d;
        d["px"] = p.px;
        d["tiles"] = p.tiles;
        d["splits"] = p.splits;
        d["chunk"] = p.chunk;
        d["cache"] = p.cache;
        d["smem"] = p.smem;
        d["blocks"] = p.blocks;
        return d;
      },
      py::arg("N"), py::arg("C"), py::arg("L"), py::arg("unit"), py::arg("elem_bytes"), py::arg("sm_count"),
      py::arg("smem_budget"), py::arg("forward"));
  m.def(
      "_plan_modulated_rows",
      [](int64_t N, int64_t C, int64_t L, int unit) {
        TORCH_CHECK_VALUE(N > 0 && C > 0 && L > 0, "N, C, L: must be positive");
        TORCH_CHECK_VALUE(unit == 1 || unit == 8, "unit: must be 1 or 8, got ", unit);
        const auto p = mpk::launch::plan_modulated_rows(N, C, L, unit);
        py::dict d;
        d["row_threads"] = p.row_threads;
        d["rows_per_block"] = p.rows_per_block;
        d["blocks"] = p.blocks;
        return d;
      },
      py::arg("N"), py::arg("C"), py::arg("L"), py::arg("unit"));
  m.def("ema_lerp_", &ema_lerp_, py::arg("ema_tensors"), py::arg("tensors"), py::arg("weight"),
        py::arg("weight_t") = py::none(),
        "weight_t: a 0-d float32 tensor on the tensors' device, used instead of `weight` when given "
        "(read by the kernel on a GPU, so a captured CUDA graph sees its value at each replay)");
}
