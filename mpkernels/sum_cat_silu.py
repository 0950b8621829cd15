"""``mp_sum_clip_mp_cat_mp_silu``: a decoder Block's residual sum feeding the next Block's input.

In the EDM2 decoder a Block ends with ``s = mp_sum_clip(x, y, t, clip)`` (spec §2 steps 5-7) and
the next Block starts with ``c, h = mp_cat_mp_silu(s, skip, dim, cat_t)`` (spec §2). ``s`` has no
other use, so one fused op reads ``x``, ``y`` and ``skip`` and writes ``c`` and ``h`` without
storing ``s`` (and its backward writes the gradients of all three inputs in one pass).

Rounding: the result is what the two ops give one after the other. ``s`` is rounded to the
tensor dtype exactly as ``mp_sum_clip`` stores it, ``c``'s part of it is ``round(s * ca)`` and
``h = mp_silu(c)`` is computed from the rounded ``c``. In backward the gradient of ``s`` stays in
fp32 (not rounded to the dtype as the unfused sequence does), so the fused gradients may be
slightly more accurate than the sequence's.
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import functional
from . import reference
from ._dispatch import dispatch, register

__all__ = ["mp_sum_clip_mp_cat_mp_silu"]


def _check(x, y, skip, t, clip, cat_t, dim) -> tuple[float, float | None, float, int]:
    """The checks of ``mp_sum_clip`` on (x, y) and of ``mp_cat_mp_silu`` on (s, skip), named for this op."""
    functional._pair(x, y, "x", "y")  # mp_sum_clip's checks on (x, y)
    V.same_shape("x", x, "y", y)
    functional._pair(x, skip, "x", "skip")  # then _cat_args's on (s, skip): s is x's shape, dtype, device
    if skip.ndim != x.ndim:
        raise ValueError(f"skip: has {skip.ndim} dims but x has {x.ndim}")
    d = V.dim(dim, x.ndim)
    if x.shape[:d] + x.shape[d + 1:] != skip.shape[:d] + skip.shape[d + 1:]:
        raise ValueError(f"skip: shape {tuple(skip.shape)} does not match x {tuple(x.shape)} outside dim {d}")
    t = V.interp_t(t)
    clip = None if clip is None else V.number(clip, "clip", lo=0.0, lo_open=True)
    cat_t = V.interp_t(cat_t, "cat_t")
    return t, clip, cat_t, d


def mp_sum_clip_mp_cat_mp_silu(x: torch.Tensor, y: torch.Tensor, skip: torch.Tensor, t: float,
                               clip: float | None, cat_t: float, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, mp_silu(c))`` with ``c = mp_cat(s, skip, dim, cat_t)`` and ``s = mp_sum_clip(x, y, t, clip)``.

    ``clip=None`` sums without clipping (``s = mp_sum(x, y, t)``); otherwise ``clip > 0``.
    ``x`` and ``y`` have one shape; ``skip`` matches it outside ``dim``. ``t`` and ``cat_t`` are
    in [0, 1]. Both results are differentiable, in ``x``, ``y`` and ``skip``; ``s`` is not
    returned (spec §2: it only feeds the concatenation). Rounding as the two ops in sequence
    (see the module docstring).
    """
    t, clip, cat_t, d = _check(x, y, skip, t, clip, cat_t, dim)
    return dispatch("mp_sum_clip_mp_cat_mp_silu", x, y, skip, t, clip, cat_t, d)


def _reference(x, y, skip, t, clip, cat_t, dim=1):
    """The oracle: the reference ops in sequence."""
    s = reference.mp_sum(x, y, t) if clip is None else reference.mp_sum_clip(x, y, t, clip)
    return reference.mp_cat_mp_silu(s, skip, dim, cat_t)


register("mp_sum_clip_mp_cat_mp_silu", "reference", _reference, devices=None)
