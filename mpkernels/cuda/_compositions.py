"""The fused block-boundary ops on backend ``'cuda'``: compositions of the extension's own ops.

The extension has no single kernel for :func:`mpkernels.resample_up_mp_silu`,
:func:`mpkernels.mp_sum_clip_pixel_norm_mp_silu` or :func:`mpkernels.mp_sum_clip_mp_cat_mp_silu`
(the Triton backend has). Without a registration here, backend ``'cuda'`` would run them on the
pure-PyTorch reference; instead each is the sequence of public ops it fuses, so every part runs
on the extension's kernels (the same launches as calling them one by one)."""

from __future__ import annotations

from .. import functional as F, reference
from .._dispatch import register


def resample_up_mp_silu(x):
    u = reference.resample(x, "up")  # the extension has no resampling: PyTorch's nearest upsampling
    return u, F.mp_silu(u)


def mp_sum_clip_pixel_norm_mp_silu(x, y, t, clip, eps=1e-4):
    s = F.mp_sum(x, y, t) if clip is None else F.mp_sum_clip(x, y, t, clip)
    n, h = F.pixel_norm_mp_silu(s, eps)
    return s, n, h


def mp_sum_clip_mp_cat_mp_silu(x, y, skip, t, clip, cat_t, dim=1):
    s = F.mp_sum(x, y, t) if clip is None else F.mp_sum_clip(x, y, t, clip)
    return F.mp_cat_mp_silu(s, skip, dim, cat_t)


for _name, _fn in (("resample_up_mp_silu", resample_up_mp_silu),
                   ("mp_sum_clip_pixel_norm_mp_silu", mp_sum_clip_pixel_norm_mp_silu),
                   ("mp_sum_clip_mp_cat_mp_silu", mp_sum_clip_mp_cat_mp_silu)):
    register(_name, "cuda", _fn, devices=("cuda", "cpu"))
