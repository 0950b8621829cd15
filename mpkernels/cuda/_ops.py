"""The extension's kernels as ``torch.library`` custom ops (``mpkernels::cuda_*``).

Each differentiable op is a forward custom op that also returns its fp32 statistics, plus a
backward custom op, tied with :func:`mpkernels._library.with_backward`; the in-place
multi-tensor ops are custom ops that declare what they mutate. Fake functions allocate
exactly as ``csrc/bindings.cpp`` does (``empty_like`` of the input, statistics contiguous
fp32), so ``torch.compile(fullgraph=True)`` sees the same strides as eager.

Multi-tensor ops under CUDA graphs: the extension passes its per-tensor pointers and sizes as
kernel parameters (no device table, no host-to-device copy), so capturing them is safe. A tensor
EMA weight on a CUDA device reaches the kernel as a pointer (read when the kernel runs, so each
replay of a captured graph sees the weight's current value); a number is baked into the launch.
"""

from __future__ import annotations

import types

import torch

from .. import _library

_OPS: types.SimpleNamespace | None = None
# The extension module the ops call (set by define). The ops are defined once per process and
# read this global at each call, so a later build replaces the module they call.
_EXT = None


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel fp32 statistics of pixel norm: x.shape without dim 1, contiguous."""
    return x.new_empty(x.shape[:1] + x.shape[2:], dtype=torch.float32)


def _custom_inplace(name: str, schema: str, mutates: tuple[str, ...], impl):
    qualname = f"{_library.NAMESPACE}::{name}"
    if qualname in _library._DEFINED:
        return _library._DEFINED[qualname]
    op = torch.library.custom_op(qualname, impl, mutates_args=mutates, schema=schema)
    op.register_fake(lambda *args: None)
    _library._DEFINED[qualname] = op
    return op


def define(module) -> types.SimpleNamespace:
    """Define (once per process) the custom ops, backed by the extension module ``module``."""
    global _OPS, _EXT
    _EXT = module
    if _OPS is not None:
        return _OPS
    kernel_op, with_backward = _library.kernel_op, _library.with_backward
    ops = types.SimpleNamespace()

    # mp_silu (spec §1)
    ops.mp_silu = kernel_op("cuda_mp_silu", "(Tensor x) -> Tensor",
                            impl=lambda x: _EXT.mp_silu_fwd(x), fake=lambda x: torch.empty_like(x))
    ops.mp_silu_backward = kernel_op("cuda_mp_silu_backward", "(Tensor grad, Tensor x) -> Tensor",
                                     impl=lambda g, x: _EXT.mp_silu_bwd(g, x),
                                     fake=lambda g, x: torch.empty_like(x))
    with_backward(ops.mp_silu, ops.mp_silu_backward, saved_inputs=(0,))

    # pixel norm (spec §1): (xn, rms)
    ops.pixel_norm = kernel_op(
        "cuda_pixel_norm", "(Tensor x, float eps) -> (Tensor, Tensor)",
        impl=lambda x, eps: tuple(_EXT.pixel_norm_fwd(x, eps, False)),
        fake=lambda x, eps: (torch.empty_like(x), _stats_like(x)))
    ops.pixel_norm_backward = kernel_op(
        "cuda_pixel_norm_backward", "(Tensor grad, Tensor x, Tensor rms, float eps) -> Tensor",
        impl=lambda g, x, rms, eps: _EXT.pixel_norm_bwd(g, None, x, rms, eps),
        fake=lambda g, x, rms, eps: torch.empty_like(x))
    with_backward(ops.pixel_norm, ops.pixel_norm_backward, num_outputs=1, saved_inputs=(0,), saved_outputs=(1,),
                  nontensor_args=(1,))

    # pixel norm + mp_silu (encoder Block, spec §2): (xn, y, rms)
    ops.pixel_norm_mp_silu = kernel_op(
        "cuda_pixel_norm_mp_silu", "(Tensor x, float eps) -> (Tensor, Tensor, Tensor)",
        impl=lambda x, eps: tuple(_EXT.pixel_norm_fwd(x, eps, True)),
        fake=lambda x, eps: (torch.empty_like(x), torch.empty_like(x), _stats_like(x)))
    ops.pixel_norm_mp_silu_backward = kernel_op(
        "cuda_pixel_norm_mp_silu_backward",
        "(Tensor grad_xn, Tensor grad_y, Tensor x, Tensor rms, float eps) -> Tensor",
        impl=lambda g1, g2, x, rms, eps: _EXT.pixel_norm_bwd(g1, g2, x, rms, eps),
        fake=lambda g1, g2, x, rms, eps: torch.empty_like(x))
    with_backward(ops.pixel_norm_mp_silu, ops.pixel_norm_mp_silu_backward, num_outputs=2, saved_inputs=(0,),
                  saved_outputs=(2,), nontensor_args=(1,))

    # modulated mp_silu (Block, spec §2 step 3)
    ops.modulated_mp_silu = kernel_op(
        "cuda_modulated_mp_silu", "(Tensor y, Tensor c) -> Tensor",
        impl=lambda y, c: _EXT.modulated_mp_silu_fwd(y, c), fake=lambda y, c: torch.empty_like(y))
    ops.modulated_mp_silu_backward = kernel_op(
        "cuda_modulated_mp_silu_backward", "(Tensor grad, Tensor y, Tensor c) -> (Tensor, Tensor)",
        impl=lambda g, y, c: tuple(_EXT.modulated_mp_silu_bwd(g, y, c)),
        fake=lambda g, y, c: (torch.empty_like(y), torch.empty_like(c)))
    with_backward(ops.modulated_mp_silu, ops.modulated_mp_silu_backward, saved_inputs=(0, 1), grads_for=(0, 1))

    # mp_sum + clip (Block residual, spec §2 steps 5-7); clip = inf gives plain mp_sum
    ops.mp_sum_clip = kernel_op(
        "cuda_mp_sum_clip", "(Tensor a, Tensor b, float t, float clip) -> Tensor",
        impl=lambda a, b, t, clip: _EXT.mp_sum_clip_fwd(a, b, t, clip),
        fake=lambda a, b, t, clip: torch.empty_like(a))
    ops.mp_sum_clip_backward = kernel_op(
        "cuda_mp_sum_clip_backward", "(Tensor grad, Tensor a, Tensor b, float t, float clip) -> (Tensor, Tensor)",
        impl=lambda g, a, b, t, clip: tuple(_EXT.mp_sum_clip_bwd(g, a, b, t, clip)),
        fake=lambda g, a, b, t, clip: (torch.empty_like(a), torch.empty_like(b)))
    with_backward(ops.mp_sum_clip, ops.mp_sum_clip_backward, saved_inputs=(0, 1), nontensor_args=(2, 3),
                  grads_for=(0, 1))

    # mp_weight (MPConv steps 3-4): (w_eff fp32, rms); a number gain, or a one-element tensor gain
    def w_fake(w, *rest):
        return torch.empty_like(w, dtype=torch.float32), w.new_empty((w.shape[0],), dtype=torch.float32)

    ops.mp_weight = kernel_op(
        "cuda_mp_weight", "(Tensor w, float gain, float eps) -> (Tensor, Tensor)",
        impl=lambda w, gain, eps: tuple(_EXT.mp_weight_fwd(w, None, gain, eps)), fake=w_fake)
    ops.mp_weight_backward = kernel_op(
        "cuda_mp_weight_backward", "(Tensor grad, Tensor w, Tensor rms, float gain, float eps) -> Tensor",
        impl=lambda g, w, rms, gain, eps: _EXT.mp_weight_bwd(g, w, None, rms, gain, eps)[0],
        fake=lambda g, w, rms, gain, eps: torch.empty_like(w))
    with_backward(ops.mp_weight, ops.mp_weight_backward, num_outputs=1, saved_inputs=(0,), saved_outputs=(1,),
                  nontensor_args=(1, 2))
    ops.mp_weight_t = kernel_op(
        "cuda_mp_weight_tensor_gain", "(Tensor w, Tensor gain, float eps) -> (Tensor, Tensor)",
        impl=lambda w, gain, eps: tuple(_EXT.mp_weight_fwd(w, gain, 1.0, eps)), fake=w_fake)
    ops.mp_weight_t_backward = kernel_op(
        "cuda_mp_weight_tensor_gain_backward",
        "(Tensor grad, Tensor w, Tensor gain, Tensor rms, float eps) -> (Tensor, Tensor)",
        impl=lambda g, w, gain, rms, eps: tuple(_EXT.mp_weight_bwd(g, w, gain, rms, 1.0, eps)),
        fake=lambda g, w, gain, rms, eps: (torch.empty_like(w), torch.empty_like(gain)))
    with_backward(ops.mp_weight_t, ops.mp_weight_t_backward, num_outputs=1, saved_inputs=(0, 1),
                  saved_outputs=(1,), nontensor_args=(2,), grads_for=(0, 1))

    # multi-tensor, in place (MPConv step 2 / paper Eq. 66, and spec §7)
    def force_normalize_impl(tensors, eps):
        _EXT.force_normalize_(tensors, eps)

    def ema_lerp_impl(ema_tensors, tensors, weight):
        _EXT.ema_lerp_(ema_tensors, tensors, weight)

    def ema_lerp_tensor_weight_impl(ema_tensors, tensors, weight):
        # The extension takes a 0-d fp32 weight tensor: on the CPU it reads it on the host, on a GPU
        # the kernel reads it (no synchronization; a graph replay sees its current value). The cast
        # of an fp16/bf16/fp64 weight is a device op, as capture-safe as the launch itself.
        _EXT.ema_lerp_(ema_tensors, tensors, 0.0, weight.to(torch.float32))

    ops.force_normalize_ = _custom_inplace("cuda_force_normalize_", "(Tensor(a!)[] tensors, float eps) -> ()",
                                           ("tensors",), force_normalize_impl)
    ema_lerp_float = _custom_inplace("cuda_ema_lerp_",
                                     "(Tensor(a!)[] ema_tensors, Tensor[] tensors, float weight) -> ()",
                                     ("ema_tensors",), ema_lerp_impl)
    ema_lerp_tensor = _custom_inplace("cuda_ema_lerp_tensor_weight_",
                                      "(Tensor(a!)[] ema_tensors, Tensor[] tensors, Tensor weight) -> ()",
                                      ("ema_tensors",), ema_lerp_tensor_weight_impl)

    def ema_lerp_(ema_tensors, tensors, weight):
        """``weight``: a number, or a 0-d tensor on the tensors' device (capture-safe, see above)."""
        if isinstance(weight, torch.Tensor):
            ema_lerp_tensor(ema_tensors, tensors, weight)
        else:
            ema_lerp_float(ema_tensors, tensors, float(weight))

    ops.ema_lerp_ = ema_lerp_

    # gradient clean-up before Adam (spec §6): inf / NaN -> 0, the whole list in one launch
    def force_finite_impl(tensors):
        _EXT.force_finite_(tensors)

    ops.force_finite_ = _custom_inplace("cuda_force_finite_", "(Tensor(a!)[] tensors) -> ()", ("tensors",),
                                        force_finite_impl)
    _OPS = ops
    return ops


def get() -> types.SimpleNamespace:
    if _OPS is None:
        raise RuntimeError("the mpkernels extension is not loaded; call mpkernels.cuda.build() first")
    return _OPS
