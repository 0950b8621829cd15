"""``mp_sum`` and ``mp_sum_clip`` (spec §1 and §2 steps 5-7), forward and backward.

``y = a * ca + b * cb`` with ``ca = (1-t)/sqrt((1-t)^2 + t^2)``, ``cb = t/sqrt(...)`` (the lerp
and the rescale in one multiply-add, fp32), optionally clipped to ``[-clip, clip]``.
Element-wise over the dense storage shared by ``a`` and ``b`` (``b`` is copied into ``a``'s
layout only when the two differ). Backward: ``da = g * ca``, ``db = g * cb`` in one kernel;
with clipping, the gradient is zeroed where the output sits at ``±clip``, so the only tensor
saved is the output itself (which the next layer keeps anyway), not the unclipped sum.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._library import kernel_op, with_backward
from . import _common as C


@triton.jit
def _mp_sum_fwd_kernel(a_ptr, b_ptr, y_ptr, n, ca, cb, clip, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    off = tl.arange(0, BLOCK)
    m = off < n - start
    a = tl.load(a_ptr + start + off, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + start + off, mask=m, other=0.0).to(tl.float32)
    y = a * ca + b * cb
    if CLIP:
        y = tl.minimum(tl.maximum(y, -clip), clip)
    tl.store(y_ptr + start + off, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mp_sum_bwd_kernel(g_ptr, y_ptr, da_ptr, db_ptr, n, ca, cb, clip, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    off = tl.arange(0, BLOCK)
    m = off < n - start
    g = tl.load(g_ptr + start + off, mask=m, other=0.0).to(tl.float32)
    if CLIP:  # clamp passes the gradient strictly inside the range
        y = tl.load(y_ptr + start + off, mask=m, other=0.0).to(tl.float32)
        g = tl.where(tl.abs(y) < clip, g, 0.0)
    tl.store(da_ptr + start + off, (g * ca).to(da_ptr.dtype.element_ty), mask=m)
    tl.store(db_ptr + start + off, (g * cb).to(db_ptr.dtype.element_ty), mask=m)


BLOCK = 2048
NUM_WARPS = 4


def _fwd_config(d, clip):
    return C.make_config(_mp_sum_fwd_kernel, ptrs=dict(a_ptr=d, b_ptr=d, y_ptr=d), floats=("ca", "cb", "clip"),
                         constexprs=dict(CLIP=clip, BLOCK=BLOCK), num_warps=NUM_WARPS, num_stages=1)


def _bwd_config(d, clip):
    return C.make_config(_mp_sum_bwd_kernel, ptrs=dict(g_ptr=d, y_ptr=d, da_ptr=d, db_ptr=d),
                         floats=("ca", "cb", "clip"), constexprs=dict(CLIP=clip, BLOCK=BLOCK),
                         num_warps=NUM_WARPS, num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        for clip in (False, True):
            yield _fwd_config(d, clip)
            yield _bwd_config(d, clip)


def _coefs(t: float) -> tuple[float, float]:
    s = 1.0 / math.sqrt((1 - t) ** 2 + t ** 2)
    return (1 - t) * s, t * s


def mp_sum_forward(a, b, t: float, clip: float | None):
    ca, cb = _coefs(t)
    y = C.empty_like_dense(a)
    n = a.numel()
    C.launch(_fwd_config(a.dtype, clip is not None), (C.cdiv(n, BLOCK),), a, b, y, n, ca, cb,
             float(clip) if clip is not None else 0.0)
    return y


def mp_sum_backward(g, y, t: float, clip: float | None, like_tensor):
    ca, cb = _coefs(t)
    g = C.like(g, like_tensor)
    da = C.empty_like_dense(like_tensor)
    db = C.empty_like_dense(like_tensor)
    n = g.numel()
    if clip is not None:
        y = C.like(y, like_tensor)
    C.launch(_bwd_config(g.dtype, clip is not None), (C.cdiv(n, BLOCK),), g, y if clip is not None else g, da, db,
             n, ca, cb, float(clip) if clip is not None else 0.0)
    return da, db


# mp_sum saves nothing (the backward only needs t); a 0-element witness gives the layout of a.
_sum_op = kernel_op("triton_mp_sum", "(Tensor a, Tensor b, float t) -> Tensor",
                    impl=lambda a, b, t: mp_sum_forward(a, b, t, None),
                    fake=lambda a, b, t: torch.empty_like(a))
_sum_bwd_op = kernel_op("triton_mp_sum_backward", "(Tensor g, float t) -> (Tensor, Tensor)",
                        impl=lambda g, t: mp_sum_backward(C.dense(g), None, t, None, C.dense(g)),
                        fake=lambda g, t: (torch.empty_like(g), torch.empty_like(g)))
with_backward(_sum_op, _sum_bwd_op, num_outputs=1, nontensor_args=(2,), grads_for=(0, 1))

_clip_op = kernel_op("triton_mp_sum_clip", "(Tensor a, Tensor b, float t, float clip) -> Tensor",
                     impl=lambda a, b, t, clip: mp_sum_forward(a, b, t, clip),
                     fake=lambda a, b, t, clip: torch.empty_like(a))
_clip_bwd_op = kernel_op("triton_mp_sum_clip_backward", "(Tensor g, Tensor y, float t, float clip) -> (Tensor, Tensor)",
                         impl=lambda g, y, t, clip: mp_sum_backward(g, y, t, clip, y),
                         fake=lambda g, y, t, clip: (torch.empty_like(y), torch.empty_like(y)))
with_backward(_clip_op, _clip_bwd_op, num_outputs=1, saved_outputs=(0,), nontensor_args=(2, 3), grads_for=(0, 1))


def _pair(a, b):
    a = C.dense(a)
    return a, C.like(b, a)


def mp_sum(a, b, t: float):
    a, b = _pair(a, b)
    return _sum_op(a, b, t)


def mp_sum_clip(a, b, t: float, clip: float):
    a, b = _pair(a, b)
    return _clip_op(a, b, t, clip)


def supports(a, b, *args) -> bool:
    return C.supported_dtype(a, b)
