"""``mp_sum_clip_pixel_norm_mp_silu``: an encoder Block's residual sum feeding the next Block's input.

In the EDM2 encoder a Block ends with ``s = mp_sum_clip(x, y, t, clip)`` (spec §2 steps 5-7) and
the next Block starts with ``n, h = pixel_norm_mp_silu(s)`` (spec §2 steps 2-3). ``s`` is also a
skip connection to the decoder, so all three are returned; one fused op reads ``x`` and ``y`` once
and writes ``s``, ``n`` and ``h`` (and its backward takes the gradients of all three at once: no
separate gradient sum for the two uses of ``s``).

Rounding: the result is what the two ops give one after the other. ``s`` is rounded to the tensor
dtype exactly as ``mp_sum_clip`` stores it, and ``n``, ``h`` are computed (norm in fp32) from that
rounded ``s``. In backward the gradient of ``s`` (``g_s`` plus the pixel norm's gradient) stays in
fp32 instead of being rounded to the dtype as the unfused sequence does, so the fused gradients may
be slightly more accurate than the sequence's.
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import reference
from ._dispatch import dispatch, register

__all__ = ["mp_sum_clip_pixel_norm_mp_silu"]


def _check(x, y, t, clip, eps) -> tuple[float, float | None, float]:
    """The checks of ``mp_sum_clip`` on (x, y) and of ``pixel_norm_mp_silu`` on the sum, named for this op."""
    V.tensor(x, "x", min_ndim=2)
    V.tensor(y, "y")
    V.same_device([("x", x), ("y", y)])
    V.same_dtype("x", x, "y", y)
    V.same_shape("x", x, "y", y)
    t = V.interp_t(t)
    clip = None if clip is None else V.number(clip, "clip", lo=0.0, lo_open=True)
    return t, clip, V.eps(eps)


def mp_sum_clip_pixel_norm_mp_silu(x: torch.Tensor, y: torch.Tensor, t: float, clip: float | None,
                                   eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, n, h)`` with ``s = mp_sum_clip(x, y, t, clip)`` and ``n, h = pixel_norm_mp_silu(s, eps)``.

    ``clip=None`` sums without clipping (``s = mp_sum(x, y, t)``); otherwise ``clip > 0``. ``x`` and
    ``y`` have one shape (``[N, C, H, W]`` in EDM2, the pixel norm over dim 1); ``t`` is in [0, 1],
    ``eps >= 0``. All three results are differentiable in ``x`` and ``y`` and have ``x``'s layout.
    Rounding as the two ops in sequence (see the module docstring).
    """
    t, clip, eps = _check(x, y, t, clip, eps)
    return dispatch("mp_sum_clip_pixel_norm_mp_silu", x, y, t, clip, eps)


def _reference(x, y, t, clip, eps=1e-4):
    """The oracle: the reference ops in sequence."""
    s = reference.mp_sum(x, y, t) if clip is None else reference.mp_sum_clip(x, y, t, clip)
    n, h = reference.pixel_norm_mp_silu(s, eps)
    return s, n, h


register("mp_sum_clip_pixel_norm_mp_silu", "reference", _reference, devices=None)
