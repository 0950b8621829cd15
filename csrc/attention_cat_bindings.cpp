// Python bindings of cosine attention's normalization and of mp_cat (csrc/attention_cat.h):
// validation (ValueError / TypeError naming the argument), layout, dtype mapping and the choice of
// twin, as csrc/bindings.cpp does for the other ops. Registered from bindings.cpp's module.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "attention_cat.h"
#include "bindings_common.h"

namespace {

using at::Tensor;
using mpk::DType;
using namespace mpk::bind;

void check_tensor(const Tensor& t, const std::string& name, int64_t ndim) {
  mpk::bind::check_tensor(t, name);
  TORCH_CHECK_VALUE(t.dim() == ndim, name, ": expected ", ndim, " dims, got shape ", t.sizes());
}

void check_like(const Tensor& t, const std::string& name, const Tensor& ref, const std::string& ref_name) {
  check_same_device(t, name, ref, ref_name);
  check_same_dtype(t, name, ref, ref_name);
}

// Strides (sN, sC, sL) of `t` [N, C, H, W] as [N, C, H*W]; false when H and W do not collapse.
bool ncl_strides(const Tensor& t, int64_t& sN, int64_t& sC, int64_t& sL) {
  sN = t.stride(0);
  sC = t.stride(1);
  const int64_t H = t.size(2), W = t.size(3);
  if (H == 1) {
    sL = W == 1 ? 1 : t.stride(3);
  } else if (W == 1 || t.stride(2) == t.stride(3) * W) {
    sL = W == 1 ? t.stride(2) : t.stride(3);
  } else {
    return false;
  }
  return true;
}

mpk::QkvView qkv_view(const Tensor& x, int64_t heads, bool head_contiguous) {
  TORCH_CHECK_VALUE(heads >= 1, "heads: must be positive, got ", heads);
  TORCH_CHECK_VALUE(x.size(1) % (3 * heads) == 0, "heads: ", heads, " heads of q, k and v do not divide the ",
                    x.size(1), " channels of qkv");
  mpk::QkvView s;
  s.N = x.size(0);
  s.heads = heads;
  s.D = x.size(1) / (3 * heads);
  s.L = x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(ncl_strides(x, s.sN, s.sC, s.sL), "qkv: spatial dims do not collapse (make it contiguous)");
  s.cd = head_contiguous ? 1 : 3;
  s.cj = head_contiguous ? s.D : 1;
  return s;
}

mpk::HeadsStrides heads_strides(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// q, k, v ([N, L, heads, D] contiguous, dtype of qkv) and rms ([3, N, L, heads] fp32).
std::vector<Tensor> qkv_normalize_fwd(const Tensor& qkv_in, int64_t heads, bool head_contiguous, double eps) {
  check_tensor(qkv_in, "qkv", 4);
  const float e = check_eps(eps);
  int64_t a, b, c;
  const Tensor x = ncl_strides(qkv_in, a, b, c) ? qkv_in : qkv_in.contiguous();
  const mpk::QkvView s = qkv_view(x, heads, head_contiguous);
  const auto opts = x.options();
  std::vector<Tensor> out;
  for (int i = 0; i < 3; ++i) out.push_back(at::empty({s.N, s.L, heads, s.D}, opts));
  out.push_back(at::empty({3, s.N, s.L, heads}, opts.dtype(at::kFloat)));
  void* ptrs[3] = {out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr()};
  const mpk::HeadsStrides os = heads_strides(out[0]);
  MPK_LAUNCH(x, qkv_normalize_fwd, dtype_of(x, "qkv"), s, x.data_ptr(), ptrs, os, out[3].data_ptr<float>(), e);
  return out;
}

// Gradient of qkv (empty_like(qkv): its strides when qkv is dense) from those of q, k and v.
Tensor qkv_normalize_bwd(const Tensor& gq, const Tensor& gk, const Tensor& gv, const Tensor& qkv_in,
                         const Tensor& rms, int64_t heads, bool head_contiguous, double eps) {
  check_tensor(qkv_in, "qkv", 4);
  const float e = check_eps(eps);
  int64_t a, b, c;
  const Tensor x = ncl_strides(qkv_in, a, b, c) ? qkv_in : qkv_in.contiguous();
  const mpk::QkvView s = qkv_view(x, heads, head_contiguous);
  const Tensor* grads[3] = {&gq, &gk, &gv};
  const char* names[3] = {"grad_q", "grad_k", "grad_v"};
  const void* gp[3];
  mpk::HeadsStrides gs[3];
  for (int i = 0; i < 3; ++i) {
    check_tensor(*grads[i], names[i], 4);
    check_like(*grads[i], names[i], x, "qkv");
    TORCH_CHECK_VALUE(grads[i]->sizes() == at::IntArrayRef({s.N, s.L, heads, s.D}), names[i], ": shape ",
                      grads[i]->sizes(), " must be [N, L, heads, D] = [", s.N, ", ", s.L, ", ", heads, ", ", s.D, "]");
    gp[i] = grads[i]->data_ptr();
    gs[i] = heads_strides(*grads[i]);
  }
  TORCH_CHECK_TYPE(rms.defined() && rms.scalar_type() == at::kFloat, "rms: expected float32 statistics");
  TORCH_CHECK_VALUE(rms.device() == x.device(), "rms: on ", rms.device(), " but qkv is on ", x.device());
  TORCH_CHECK_VALUE(rms.numel() == 3 * s.N * s.L * heads, "rms: has ", rms.numel(), " elements, expected ",
                    3 * s.N * s.L * heads);
  const Tensor r = rms.contiguous();
  // The result is empty_like(qkv), as the op's fake function says; a layout whose spatial dims
  // do not collapse gets the kernel's contiguous result copied in.
  Tensor result = at::empty_like(qkv_in);
  int64_t osN, osC, osL;
  Tensor gx = result;
  if (!ncl_strides(gx, osN, osC, osL)) {
    gx = at::empty_like(x, at::MemoryFormat::Contiguous);
    ncl_strides(gx, osN, osC, osL);
  }
  MPK_LAUNCH(x, qkv_normalize_bwd, dtype_of(x, "qkv"), s, gp, gs, x.data_ptr(), r.data_ptr<float>(),
                gx.data_ptr(), osN, osC, osL, e);
  if (!gx.is_same(result)) result.copy_(gx);
  return result;
}

void check_cat_scale(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), name, ": must be finite, got ", v);
}

// out [M, Ka + Kb] = [a * ca | b * cb]; a, b row-major (made contiguous when not).
Tensor mp_cat_fwd(const Tensor& a_in, const Tensor& b_in, double ca, double cb) {
  check_tensor(a_in, "a", 2);
  check_tensor(b_in, "b", 2);
  check_like(b_in, "b", a_in, "a");
  TORCH_CHECK_VALUE(b_in.size(0) == a_in.size(0), "b: has ", b_in.size(0), " rows but a has ", a_in.size(0));
  check_cat_scale(ca, "ca");
  check_cat_scale(cb, "cb");
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), Ka = a.size(1), Kb = b.size(1);
  TORCH_CHECK_VALUE(M * (Ka + Kb) <= kMaxNumel, "a, b: the result has ", M * (Ka + Kb),
                    " elements; the mpkernels extension handles at most 2^31 - 1 per tensor");
  Tensor out = at::empty({M, Ka + Kb}, a.options());
  MPK_LAUNCH(a, mp_cat_fwd, dtype_of(a, "a"), M, Ka, Kb, a.data_ptr(), b.data_ptr(), out.data_ptr(),
                static_cast<float>(ca), static_cast<float>(cb));
  return out;
}

// (g[:, :ka] * ca, g[:, ka:] * cb), each contiguous.
std::vector<Tensor> mp_cat_bwd(const Tensor& g_in, int64_t ka, double ca, double cb) {
  check_tensor(g_in, "grad", 2);
  TORCH_CHECK_VALUE(ka >= 0 && ka <= g_in.size(1), "ka: must be in [0, ", g_in.size(1), "], got ", ka);
  check_cat_scale(ca, "ca");
  check_cat_scale(cb, "cb");
  const Tensor g = g_in.contiguous();
  const int64_t M = g.size(0), kb = g.size(1) - ka;
  Tensor ga = at::empty({M, ka}, g.options()), gb = at::empty({M, kb}, g.options());
  MPK_LAUNCH(g, mp_cat_bwd, dtype_of(g, "grad"), M, ka, kb, g.data_ptr(), ga.data_ptr(), gb.data_ptr(),
                static_cast<float>(ca), static_cast<float>(cb));
  return {ga, gb};
}

// mp_cat_mp_silu forward: x [M, Ka + Kb] as mp_cat_fwd and y = mp_silu(x), both contiguous.
std::vector<Tensor> mp_cat_silu_fwd(const Tensor& a_in, const Tensor& b_in, double ca, double cb) {
  check_tensor(a_in, "a", 2);
  check_tensor(b_in, "b", 2);
  check_like(b_in, "b", a_in, "a");
  TORCH_CHECK_VALUE(b_in.size(0) == a_in.size(0), "b: has ", b_in.size(0), " rows but a has ", a_in.size(0));
  check_cat_scale(ca, "ca");
  check_cat_scale(cb, "cb");
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), Ka = a.size(1), Kb = b.size(1);
  TORCH_CHECK_VALUE(M * (Ka + Kb) <= kMaxNumel, "a, b: the result has ", M * (Ka + Kb),
                    " elements; the mpkernels extension handles at most 2^31 - 1 per tensor");
  Tensor x = at::empty({M, Ka + Kb}, a.options()), y = at::empty({M, Ka + Kb}, a.options());
  MPK_LAUNCH(a, mp_cat_silu_fwd, dtype_of(a, "a"), M, Ka, Kb, a.data_ptr(), b.data_ptr(), x.data_ptr(),
                y.data_ptr(), static_cast<float>(ca), static_cast<float>(cb));
  return {x, y};
}

// mp_cat_mp_silu backward: (da, db) from the gradients of x and y (either may be None) and the
// saved x; neither given: zeros.
std::vector<Tensor> mp_cat_silu_bwd(const std::optional<Tensor>& gx_in, const std::optional<Tensor>& gy_in,
                                    const Tensor& x_in, int64_t ka, double ca, double cb) {
  check_tensor(x_in, "x", 2);
  TORCH_CHECK_VALUE(ka >= 0 && ka <= x_in.size(1), "ka: must be in [0, ", x_in.size(1), "], got ", ka);
  check_cat_scale(ca, "ca");
  check_cat_scale(cb, "cb");
  const Tensor x = x_in.contiguous();
  Tensor g[2];
  const std::optional<Tensor>* given[2] = {&gx_in, &gy_in};
  const char* names[2] = {"grad_x", "grad_y"};
  for (int i = 0; i < 2; ++i) {
    if (!given[i]->has_value() || !given[i]->value().defined()) continue;
    const Tensor& t = given[i]->value();
    check_tensor(t, names[i], 2);
    check_like(t, names[i], x, "x");
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), names[i], ": shape ", t.sizes(), " does not match x's ", x.sizes());
    g[i] = t.contiguous();
  }
  const int64_t M = x.size(0), kb = x.size(1) - ka;
  if (!g[0].defined() && !g[1].defined()) return {at::zeros({M, ka}, x.options()), at::zeros({M, kb}, x.options())};
  Tensor ga = at::empty({M, ka}, x.options()), gb = at::empty({M, kb}, x.options());
  MPK_LAUNCH(x, mp_cat_silu_bwd, dtype_of(x, "x"), M, ka, kb, g[0].defined() ? g[0].data_ptr() : nullptr,
                g[1].defined() ? g[1].data_ptr() : nullptr, x.data_ptr(), ga.data_ptr(), gb.data_ptr(),
                static_cast<float>(ca), static_cast<float>(cb));
  return {ga, gb};
}

}  // namespace

void register_attention_cat(pybind11::module& m) {
  namespace py = pybind11;
  m.def("qkv_normalize_fwd", &qkv_normalize_fwd, py::arg("qkv"), py::arg("heads"), py::arg("head_contiguous"),
        py::arg("eps"), "q, k, v ([N, L, heads, D]) normalized over D, and their fp32 rms ([3, N, L, heads])");
  m.def("qkv_normalize_bwd", &qkv_normalize_bwd, py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"),
        py::arg("qkv"), py::arg("rms"), py::arg("heads"), py::arg("head_contiguous"), py::arg("eps"));
  m.def("mp_cat_fwd", &mp_cat_fwd, py::arg("a"), py::arg("b"), py::arg("ca"), py::arg("cb"));
  m.def("mp_cat_bwd", &mp_cat_bwd, py::arg("grad"), py::arg("ka"), py::arg("ca"), py::arg("cb"));
  m.def("mp_cat_silu_fwd", &mp_cat_silu_fwd, py::arg("a"), py::arg("b"), py::arg("ca"), py::arg("cb"),
        "mp_cat_mp_silu: x = [a * ca | b * cb] (rounded to the dtype) and y = mp_silu(x), both [M, Ka + Kb]");
  m.def("mp_cat_silu_bwd", &mp_cat_silu_bwd, py::arg("grad_x"), py::arg("grad_y"), py::arg("x"), py::arg("ka"),
        py::arg("ca"), py::arg("cb"), "(da, db) of mp_cat_mp_silu from the gradients of x and y (None: absent)");
}
