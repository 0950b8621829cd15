"""Triton backend: fused kernels for every magnitude-preserving op, forward and backward.

One module per op family (kernels, launchers, custom ops). Each op is a ``torch.library``
custom op (``mpkernels::triton_*``) with its backward registered, so models using this
backend run under autograd and ``torch.compile(fullgraph=True)``.

The backend is available when Triton imports and a CUDA device exists, or when
``TRITON_INTERPRET=1`` (then the kernels also run on CPU tensors, for tests; ``'auto'``
never picks the interpreter). Importing never touches a GPU.
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here means: backend not available)

from .._dispatch import register, register_backend
from . import _common
from ._common import INTERPRET, all_configs

if INTERPRET:
    from . import _interpreter  # noqa: F401  (fixes for the interpreter's bf16 dot)

from . import (cosine_attention, modulated_mp_silu, mp_cat, mp_fourier, mp_silu, mp_sum, mp_weight,  # noqa: E402
               multi_tensor, normalize, resample)
from . import multi_weight  # noqa: E402


def _is_available() -> bool:
    import torch
    return INTERPRET or torch.cuda.is_available()


register_backend("triton", priority=20, is_available=_is_available, auto_devices=("cuda",),
                 description="Triton kernels (fused, stride-aware; CPU only under TRITON_INTERPRET=1)")

_DEVICES = ("cuda", "cpu") if INTERPRET else ("cuda",)

_OPS = {
    "normalize": (normalize.normalize, normalize.supports),
    "pixel_norm": (normalize.pixel_norm, normalize.supports),
    "pixel_norm_mp_silu": (normalize.pixel_norm_mp_silu, normalize.supports),
    "mp_silu": (mp_silu.mp_silu, mp_silu.supports),
    "mp_sum": (mp_sum.mp_sum, mp_sum.supports),
    "mp_sum_clip": (mp_sum.mp_sum_clip, mp_sum.supports),
    "mp_cat": (mp_cat.mp_cat, mp_cat.supports),
    "modulated_mp_silu": (modulated_mp_silu.modulated_mp_silu, modulated_mp_silu.supports),
    "mp_weight": (mp_weight.mp_weight, mp_weight.supports),
    "mp_conv2d": (mp_weight.mp_conv2d, mp_weight.supports_conv),
    "mp_linear": (mp_weight.mp_linear, mp_weight.supports_conv),
    "mp_fourier": (mp_fourier.mp_fourier, mp_fourier.supports),
    "resample": (resample.resample, resample.supports),
    "cosine_attention": (cosine_attention.cosine_attention, cosine_attention.supports),
    "force_normalize_": (multi_tensor.force_normalize_, multi_tensor.supports_force_normalize),
    "ema_lerp_": (multi_tensor.ema_lerp_, multi_tensor.supports_ema_lerp),
    "force_finite_": (multi_tensor.force_finite_, multi_tensor.supports_force_finite),
    "mp_weights": (multi_weight.mp_weights, multi_weight.supports),
    "mp_weights_forced": (multi_weight.mp_weights_forced, multi_weight.supports),
}
for _op, (_fn, _supports) in _OPS.items():
    register(_op, "triton", _fn, devices=_DEVICES, supports=_supports)

__all__ = ["all_configs", "INTERPRET", "_common"]

from . import mp_cat_silu  # noqa: E402,F401  (registers 'mp_cat_mp_silu'; needs the backend declared above)
from . import sum_cat_silu, sum_norm_silu, up_silu  # noqa: E402,F401  (fused block-boundary ops)
