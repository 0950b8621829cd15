"""``resample_up_mp_silu``: the decoder 'up' Block input, ``u = resample(x, 'up')`` and ``h = mp_silu(u)``.

The decoder 'up' Block (spec §2) uses the upsampled ``u`` twice: as the residual and, through
MP-SiLU, as the input of its first convolution. Unfused that is two kernels forward (resample,
mp_silu) and three backward (mp_silu, the gradient sum of the two uses, resample). A fast
backend does each direction in one pass over the low-resolution ``x``.
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import reference
from ._dispatch import dispatch, register

__all__ = ["resample_up_mp_silu"]


def resample_up_mp_silu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, mp_silu(u))`` with ``u = resample(x, 'up')`` (2x nearest, ``[1, 1]`` filter), spec §1-2.

    ``x``: ``[N, C, H, W]``, float16, bfloat16, float32 (float64 runs on the reference), NCHW or
    channels_last; both results are ``[N, C, 2H, 2W]`` in ``x``'s memory format (as
    :func:`mpkernels.resample` gives). ``u`` holds ``x``'s values replicated (no rounding);
    ``h`` is computed in fp32 from them and rounded once to the dtype.

    Both results are differentiable; a fast backend's backward takes both gradients (either may
    be absent) in one pass and writes ``dx = sum over each 2x2 block of (g_u + g_h * mp_silu'(u))``,
    accumulated in fp32 and rounded once (no separate gradient sum for the two uses of ``u``).
    """
    V.tensor(x, "x", ndim=4)
    return dispatch("resample_up_mp_silu", x)


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: :func:`reference.resample` ``'up'``, then :func:`reference.mp_silu` of its result."""
    u = reference.resample(x, "up")
    return u, reference.mp_silu(u)


register("resample_up_mp_silu", "reference", _reference, devices=None)
