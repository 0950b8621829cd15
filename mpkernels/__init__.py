"""mpkernels: fused kernels for the magnitude-preserving layers of EDM2 (Karras et al. 2024).

Functional ops validate their arguments and dispatch to the active backend
(``'auto'`` by default: the fastest backend available for the tensors' device).
Importing this package never touches a GPU.
"""

from __future__ import annotations

from . import _dispatch, reference
from ._dispatch import (BackendUnavailableError, available_backends, get_backend, register, register_backend,
                        registered_backends, set_backend, use_backend)
from .functional import (cosine_attention, ema_lerp_, force_finite_, force_normalize_, modulated_mp_silu, mp_cat, mp_cat_mp_silu,
                         mp_conv2d,
                         mp_fourier, mp_linear, mp_silu, mp_sum, mp_sum_clip, mp_weight, normalize, pixel_norm,
                         pixel_norm_mp_silu, resample)
from . import functional as _functional
from .multi_weight import mp_weights

__version__ = "0.1.0"

register_backend("reference", priority=0, description="pure PyTorch, from the spec's equations")
for _op in _functional.__all__:
    register(_op, "reference", getattr(reference, _op), devices=None)
register("mp_weights", "reference", reference.mp_weights, devices=None)
register("mp_weights_forced", "reference", reference.mp_weights_forced, devices=None)
# Fused block-boundary ops: each module registers its reference implementation at import.
from . import sum_cat_silu as _sum_cat_silu, sum_norm_silu as _sum_norm_silu, up_silu as _up_silu  # noqa: E402
from .sum_cat_silu import *  # noqa: E402,F401,F403
from .sum_norm_silu import *  # noqa: E402,F401,F403
from .up_silu import *  # noqa: E402,F401,F403

from . import _backends  # noqa: E402  (optional fast backends register themselves here)

_backends.load_all()
_dispatch._initial_backend()

from . import nn  # noqa: E402

__all__ = list(_functional.__all__) + _sum_cat_silu.__all__ + _sum_norm_silu.__all__ + _up_silu.__all__ + [
    "mp_weights",
    "available_backends", "registered_backends", "set_backend", "get_backend", "use_backend", "register",
    "register_backend", "BackendUnavailableError", "nn", "reference",
]
