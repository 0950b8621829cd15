// Python bindings of mp_weights (csrc/multi_weight.h): validation (ValueError / TypeError naming
// the argument), layout, output dtype groups, and the choice of twin (CPU, or CUDA on the weights'
// device and current stream). Registered into the extension module by bindings.cpp.
//
// Arguments shared by both directions (mpkernels/cuda/_multi_weight.py builds them):
//   weights     list of weights (>= 2 dims, non-empty, one device)
//   gains       the one-element tensor gains, each used by exactly one weight
//   gain_index  per weight: index into `gains`, or -1 for the number gain_values[i]
//   gain_values per weight: the gain when it is a number
//   qkv_heads   per weight: heads of a qkv projection (rows come out head-contiguous), or 0
//   dtypes      per weight: output dtype, 0 = float32, 1 = float16, 2 = bfloat16 (mpk::DType)
// Statistics: one flat fp32 buffer of the per-row rms of all weights, in list order.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "multi_weight.h"

namespace {

using at::Tensor;
using mpk::DType;
using namespace mpk::bind;

void check_tensor(const Tensor& t, const std::string& name, const Tensor* ref) {
  mpk::bind::check_tensor(t, name);
  if (ref) check_same_device(t, name, *ref, "weights[0]");
}

void check_count(size_t n, const char* name, size_t want) {
  TORCH_CHECK_VALUE(n == want, name, ": ", n, " entries but weights has ", want);
}

// Memory for an output (or gradient) of weight `w`: w's layout when each row is one contiguous
// block, else contiguous. mpkernels/cuda/_multi_weight.py's fake functions mirror this.
Tensor out_like(const Tensor& w, at::ScalarType dtype) {
  Tensor out = at::empty_like(w, w.options().dtype(dtype));
  return row_dense(out) ? out : at::empty(w.sizes(), w.options().dtype(dtype));
}

// The validated arguments shared by forward and backward.
struct Plan {
  std::vector<mpk::WeightRows> rows;  // per weight, pointers filled in by the caller
  std::vector<DType> out_dtype;
  int64_t total_rows = 0;
};

Plan check_and_plan(const std::vector<Tensor>& weights, const std::vector<Tensor>& gains,
                    const std::vector<int64_t>& gain_index, const std::vector<double>& gain_values,
                    const std::vector<int64_t>& qkv_heads, const std::vector<int64_t>& dtypes) {
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(n > 0, "weights: expected at least one weight, got an empty list");
  check_count(gain_index.size(), "gain_index", n);
  check_count(gain_values.size(), "gain_values", n);
  check_count(qkv_heads.size(), "qkv_heads", n);
  check_count(dtypes.size(), "dtypes", n);
  const Tensor& ref = weights[0];
  for (size_t j = 0; j < gains.size(); ++j) {
    const std::string name = item("gains", j);
    check_tensor(gains[j], name, &ref);
    TORCH_CHECK_VALUE(gains[j].numel() == 1, name, ": a tensor gain must have exactly one element, got shape ",
                      gains[j].sizes());
  }
  std::vector<int> used(gains.size(), 0);
  Plan plan;
  plan.rows.resize(n);
  plan.out_dtype.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string name = item("weights", i);
    const Tensor& w = weights[i];
    check_tensor(w, name, &ref);
    TORCH_CHECK_VALUE(w.dim() >= 2, name, ": expected a weight with at least 2 dims, got shape ", w.sizes());
    TORCH_CHECK_VALUE(w.numel() > 0, name, ": expected a non-empty weight, got shape ", w.sizes());
    const int64_t gi = gain_index[i];
    TORCH_CHECK_VALUE(gi >= -1 && gi < static_cast<int64_t>(gains.size()), item("gain_index", i), ": ", gi,
                      " is not -1 or the index of one of the ", gains.size(), " tensor gains");
    if (gi >= 0) ++used[gi];
    const int64_t heads = qkv_heads[i];
    TORCH_CHECK_VALUE(heads >= 0, item("qkv_heads", i), ": must be a positive number of heads (or 0: none), got ",
                      heads);
    TORCH_CHECK_VALUE(heads == 0 || w.size(0) % (3 * heads) == 0, item("qkv_heads", i), ": ", name, " has ",
                      w.size(0), " rows, not a multiple of 3 * ", heads, " heads");
    TORCH_CHECK_TYPE(dtypes[i] >= 0 && dtypes[i] <= 2, item("dtypes", i), ": unsupported output dtype code ",
                     dtypes[i], "; expected 0 (float32), 1 (float16) or 2 (bfloat16)");
    mpk::WeightRows& r = plan.rows[i];
    r.w = r.out = nullptr;
    r.grad = nullptr;
    r.gain_ptr = gi >= 0 ? gains[gi].data_ptr() : nullptr;
    r.gain = static_cast<float>(gain_values[i]);
    r.w_dtype = dtype_of(w, name);
    r.gain_dtype = gi >= 0 ? dtype_of(gains[gi], item("gains", gi)) : DType::F32;
    r.rows = w.size(0);
    r.len = w.numel() / w.size(0);
    r.qkv_rows = heads == 0 ? 0 : w.size(0) / (3 * heads);
    r.stat = plan.total_rows;
    plan.total_rows += r.rows;
    plan.out_dtype[i] = static_cast<DType>(dtypes[i]);
  }
  TORCH_CHECK_VALUE(plan.total_rows <= kMaxNumel, "weights: ", plan.total_rows,
                    " rows in all; mp_weights handles at most 2^31 - 1");
  for (size_t j = 0; j < gains.size(); ++j)
    TORCH_CHECK_VALUE(used[j] == 1, "gain_index: must refer to each tensor gain exactly once, but gains[", j,
                      "] is used ", used[j], " times");
  return plan;
}

// Calls run(group dtype, weights of that group) once per output dtype present, in dtype order.
template <typename Run>
void per_group(const Plan& plan, Run run) {
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    std::vector<mpk::WeightRows> group;
    for (size_t i = 0; i < plan.rows.size(); ++i)
      if (plan.out_dtype[i] == dt) group.push_back(plan.rows[i]);
    if (!group.empty()) run(dt, group);
  }
}

std::tuple<std::vector<Tensor>, Tensor> mp_weights_fwd(const std::vector<Tensor>& weights,
                                                       const std::vector<Tensor>& gains,
                                                       const std::vector<int64_t>& gain_index,
                                                       const std::vector<double>& gain_values, double eps,
                                                       const std::vector<int64_t>& qkv_heads,
                                                       const std::vector<int64_t>& dtypes) {
  const float e = check_eps(eps);
  Plan plan = check_and_plan(weights, gains, gain_index, gain_values, qkv_heads, dtypes);
  const Tensor& ref = weights[0];
  std::vector<Tensor> outs, keep;
  for (size_t i = 0; i < weights.size(); ++i) {
    outs.push_back(out_like(weights[i], scalar_type_of(plan.out_dtype[i])));
    keep.push_back(laid_out_like(weights[i], outs.back()));
    plan.rows[i].w = keep.back().data_ptr();
    plan.rows[i].out = outs.back().data_ptr();
  }
  Tensor rms = at::empty({plan.total_rows}, ref.options().dtype(at::kFloat));
  float* rp = rms.data_ptr<float>();
#if defined(MPK_WITH_CUDA)
  if (ref.is_cuda()) {
    const c10::cuda::CUDAGuard guard(ref.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ref.get_device()).stream();
    per_group(plan, [&](DType dt, const std::vector<mpk::WeightRows>& g) {
      mpk::cuda::mp_weights_fwd(dt, g.data(), static_cast<int64_t>(g.size()), e, rp, stream);
    });
    return {outs, rms};
  }
#endif
  per_group(plan, [&](DType dt, const std::vector<mpk::WeightRows>& g) {
    mpk::cpu::mp_weights_fwd(dt, g.data(), static_cast<int64_t>(g.size()), e, rp);
  });
  return {outs, rms};
}

// Returns (weight gradients, per-row gain terms): grads[i] = None means the output i got no
// gradient. The per-row terms (fp32, one per row, written for the weights with a tensor gain; empty
// without tensor gains) go to mp_weights_gain_grads.
std::tuple<std::vector<Tensor>, Tensor> mp_weights_bwd(
    const std::vector<std::optional<Tensor>>& grads, const std::vector<Tensor>& weights,
    const std::vector<Tensor>& gains, const std::vector<int64_t>& gain_index, const std::vector<double>& gain_values,
    const Tensor& rms, double eps, const std::vector<int64_t>& qkv_heads, const std::vector<int64_t>& dtypes) {
  const float e = check_eps(eps);
  Plan plan = check_and_plan(weights, gains, gain_index, gain_values, qkv_heads, dtypes);
  check_count(grads.size(), "grads", weights.size());
  const Tensor& ref = weights[0];
  TORCH_CHECK_TYPE(rms.defined(), "rms: expected a tensor, got None");
  TORCH_CHECK_TYPE(rms.scalar_type() == at::kFloat, "rms: expected float32 statistics, got ", rms.scalar_type());
  TORCH_CHECK_VALUE(rms.device() == ref.device(), "rms: on ", rms.device(), " but weights[0] is on ", ref.device());
  TORCH_CHECK_VALUE(rms.numel() == plan.total_rows, "rms: has ", rms.numel(), " elements, expected ",
                    plan.total_rows, " (one per row of every weight)");
  std::vector<Tensor> gws, keep;
  for (size_t i = 0; i < weights.size(); ++i) {
    const Tensor& w = weights[i];
    gws.push_back(out_like(w, w.scalar_type()));
    keep.push_back(laid_out_like(w, gws.back()));
    plan.rows[i].w = keep.back().data_ptr();
    plan.rows[i].out = gws.back().data_ptr();
    if (grads[i] && grads[i]->defined()) {
      const Tensor& g = *grads[i];
      const std::string name = item("grads", i);
      check_tensor(g, name, &ref);
      TORCH_CHECK_VALUE(g.sizes() == w.sizes(), name, ": shape ", g.sizes(), " does not match weights[", i,
                        "] shape ", w.sizes());
      TORCH_CHECK_TYPE(g.scalar_type() == scalar_type_of(plan.out_dtype[i]), name, ": dtype ", g.scalar_type(),
                       " does not match the output dtype ", scalar_type_of(plan.out_dtype[i]));
      keep.push_back(laid_out_like(g, gws.back()));
      plan.rows[i].grad = keep.back().data_ptr();
    }
  }
  const Tensor cr = rms.contiguous();
  Tensor partial = at::empty({gains.empty() ? 0 : plan.total_rows}, ref.options().dtype(at::kFloat));
  const float* rp = cr.data_ptr<float>();
  float* pp = gains.empty() ? nullptr : partial.data_ptr<float>();
#if defined(MPK_WITH_CUDA)
  if (ref.is_cuda()) {
    const c10::cuda::CUDAGuard guard(ref.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ref.get_device()).stream();
    per_group(plan, [&](DType dt, const std::vector<mpk::WeightRows>& g) {
      mpk::cuda::mp_weights_bwd(dt, g.data(), static_cast<int64_t>(g.size()), e, rp, pp, stream);
    });
    return {gws, partial};
  }
#endif
  per_group(plan, [&](DType dt, const std::vector<mpk::WeightRows>& g) {
    mpk::cpu::mp_weights_bwd(dt, g.data(), static_cast<int64_t>(g.size()), e, rp, pp);
  });
  return {gws, partial};
}

// Gradients of the tensor gains from mp_weights_bwd's per-row terms: gains[gain_index[i]] gets
// sum over the rows of weights[i] / sqrt(fan_in), in a fixed order (deterministic).
std::vector<Tensor> mp_weights_gain_grads(const Tensor& partial, const std::vector<Tensor>& weights,
                                          const std::vector<Tensor>& gains, const std::vector<int64_t>& gain_index) {
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(n > 0, "weights: expected at least one weight, got an empty list");
  check_count(gain_index.size(), "gain_index", n);
  const Tensor& ref = weights[0];
  std::vector<int> used(gains.size(), 0);
  for (size_t j = 0; j < gains.size(); ++j) {
    check_tensor(gains[j], item("gains", j), &ref);
    TORCH_CHECK_VALUE(gains[j].numel() == 1, item("gains", j),
                      ": a tensor gain must have exactly one element, got shape ", gains[j].sizes());
  }
  std::vector<Tensor> ggains(gains.size());
  std::vector<mpk::GainGrad> todo;
  int64_t stat = 0;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& w = weights[i];
    TORCH_CHECK_VALUE(w.defined() && w.dim() >= 2 && w.numel() > 0, item("weights", i),
                      ": expected a non-empty weight with at least 2 dims");
    const int64_t gi = gain_index[i];
    TORCH_CHECK_VALUE(gi >= -1 && gi < static_cast<int64_t>(gains.size()), item("gain_index", i), ": ", gi,
                      " is not -1 or the index of one of the ", gains.size(), " tensor gains");
    if (gi >= 0) {
      ++used[gi];
      ggains[gi] = at::empty_like(gains[gi]);
      todo.push_back({ggains[gi].data_ptr(), dtype_of(gains[gi], item("gains", gi)), stat, w.size(0),
                      w.numel() / w.size(0)});
    }
    stat += w.size(0);
  }
  for (size_t j = 0; j < gains.size(); ++j)
    TORCH_CHECK_VALUE(used[j] == 1, "gain_index: must refer to each tensor gain exactly once, but gains[", j,
                      "] is used ", used[j], " times");
  if (todo.empty()) return ggains;
  TORCH_CHECK_TYPE(partial.defined() && partial.scalar_type() == at::kFloat, "partial: expected float32 terms");
  TORCH_CHECK_VALUE(partial.device() == ref.device(), "partial: on ", partial.device(), " but weights[0] is on ",
                    ref.device());
  TORCH_CHECK_VALUE(partial.numel() == stat, "partial: has ", partial.numel(), " elements, expected ", stat,
                    " (one per row of every weight)");
  const Tensor cp = partial.contiguous();
  const int64_t count = static_cast<int64_t>(todo.size());
#if defined(MPK_WITH_CUDA)
  if (ref.is_cuda()) {
    const c10::cuda::CUDAGuard guard(ref.device());
    mpk::cuda::mp_weights_gain_grads(todo.data(), count, cp.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream(ref.get_device()).stream());
    return ggains;
  }
#endif
  mpk::cpu::mp_weights_gain_grads(todo.data(), count, cp.data_ptr<float>());
  return ggains;
}

}  // namespace

void register_multi_weight(pybind11::module& m) {
  namespace py = pybind11;
  m.def("mp_weights_fwd", &mp_weights_fwd, py::arg("weights"), py::arg("gains"), py::arg("gain_index"),
        py::arg("gain_values"), py::arg("eps"), py::arg("qkv_heads"), py::arg("dtypes"),
        "effective weights of all `weights` (output dtype group by group) and their per-row rms");
  m.def("mp_weights_bwd", &mp_weights_bwd, py::arg("grads"), py::arg("weights"), py::arg("gains"),
        py::arg("gain_index"), py::arg("gain_values"), py::arg("rms"), py::arg("eps"), py::arg("qkv_heads"),
        py::arg("dtypes"), "(weight gradients, per-row gain terms) of mp_weights_fwd");
  m.def("mp_weights_gain_grads", &mp_weights_gain_grads, py::arg("partial"), py::arg("weights"), py::arg("gains"),
        py::arg("gain_index"), "gradients of the tensor gains from mp_weights_bwd's per-row terms");
#if defined(MPK_WITH_CUDA)
  m.def(
      "_mp_weights_chunk", [](bool forward) { return mpk::cuda::mp_weights_chunk(forward); }, py::arg("forward"),
      "weights per CUDA launch of mp_weights (kernel-parameter space)");
#endif
}
