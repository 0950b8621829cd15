"""``mp_sum`` and ``mp_sum_clip`` (spec §1 and §2 steps 5-7), forward and backward.

``y = lerp(a, b, t) * s`` with ``s = 1/sqrt((1-t)^2 + t^2)``, optionally clipped to
``[-clip, clip]``, fp32. The lerp is ``torch.lerp``'s own formula (``a + t*(b-a)`` for
``t < 0.5``, else ``b + (1-t)*(a-b)``; the launcher swaps the operands), so an infinite input
gives the reference's result (NaN where ``inf - inf`` appears), not ``inf * ca + b * cb``'s.
The clamp propagates NaN like ``torch.clamp`` (a diverging run must not be clipped into
finite values). Element-wise over the dense storage shared by ``a`` and ``b`` (``b`` is copied
into ``a``'s layout only when the two differ). Backward: ``da = g * (1-t) * s``,
``db = g * t * s`` in one kernel.

With clipping, the forward also writes the clip mask as bits (1 where ``-clip <= sum <= clip``
for the unrounded fp32 sum, so the gradient passes exactly where ``clamp``'s would): one bit
per element is all the backward reads and all that is saved, instead of the reference's
saved pre-clip tensor.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._library import kernel_op, with_backward
from . import _common as C


@triton.jit
def _mp_sum_fwd_kernel(p_ptr, q_ptr, y_ptr, mask_ptr, n, w, scale, clip, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """y = (p + w * (q - p)) * scale: (p, q, w) is (a, b, t), or (b, a, 1 - t) when t >= 0.5."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    off = tl.arange(0, BLOCK)
    m = off < n - start
    p = tl.load(p_ptr + start + off, mask=m, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + start + off, mask=m, other=0.0).to(tl.float32)
    y = (p + w * (q - p)) * scale
    if CLIP:
        keep = ((y >= -clip) & (y <= clip)).to(tl.int32)  # 0 for NaN, as clamp's backward
        bits = tl.sum(tl.reshape(keep, [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :], axis=1)
        byte = tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + start // 8 + byte, bits.to(tl.uint8), mask=byte * 8 < n - start)
        # Plain min/max compile to min.f32/max.f32, which return the non-NaN operand (NaN -> -clip).
        y = tl.clamp(y, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + start + off, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mp_sum_bwd_kernel(g_ptr, mask_ptr, da_ptr, db_ptr, n, ca, cb, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    off = tl.arange(0, BLOCK)
    m = off < n - start
    g = tl.load(g_ptr + start + off, mask=m, other=0.0).to(tl.float32)
    if CLIP:  # the gradient passes where clamp's would (bit set in the forward's mask)
        bits = tl.load(mask_ptr + start // 8 + off // 8, mask=m, other=0).to(tl.int32)
        g = tl.where(((bits >> (off % 8)) & 1) != 0, g, 0.0)
    tl.store(da_ptr + start + off, (g * ca).to(da_ptr.dtype.element_ty), mask=m)
    tl.store(db_ptr + start + off, (g * cb).to(db_ptr.dtype.element_ty), mask=m)


BLOCK = 2048
NUM_WARPS = 4


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(d, clip):
    return C.make_config(_mp_sum_fwd_kernel, ptrs=dict(p_ptr=d, q_ptr=d, y_ptr=d, mask_ptr="u8"),
                         floats=("w", "scale", "clip"), constexprs=dict(CLIP=clip, BLOCK=BLOCK),
                         num_warps=NUM_WARPS, num_stages=1)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _bwd_config(d, clip):
    return C.make_config(_mp_sum_bwd_kernel, ptrs=dict(g_ptr=d, mask_ptr="u8", da_ptr=d, db_ptr=d),
                         floats=("ca", "cb"), constexprs=dict(CLIP=clip, BLOCK=BLOCK),
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
    """``(y, mask)``; ``mask`` holds one bit per element when clipping (else it is empty)."""
    scale = 1.0 / math.sqrt((1 - t) ** 2 + t ** 2)
    p, q, w = (a, b, t) if t < 0.5 else (b, a, 1.0 - t)  # torch.lerp's two formulas
    y = C.empty_like_dense(a)
    n = a.numel()
    mask = torch.empty((C.cdiv(n, 8) if clip is not None else 0,), dtype=torch.uint8, device=a.device)
    C.launch(_fwd_config(a.dtype, clip is not None), (C.cdiv(n, BLOCK),), p, q, y, mask, n, float(w), scale,
             float(clip) if clip is not None else 0.0)
    return y, mask


def mp_sum_backward(g, mask, t: float, layout):
    """``(da, db)`` in the layout of the dense tensor ``layout``; ``mask`` None when not clipping."""
    ca, cb = _coefs(t)
    g = C.like(g, layout)
    da = C.empty_like_dense(layout)
    db = C.empty_like_dense(layout)
    n = g.numel()
    C.launch(_bwd_config(g.dtype, mask is not None), (C.cdiv(n, BLOCK),), g, mask if mask is not None else g,
             da, db, n, ca, cb)
    return da, db


# mp_sum saves nothing: the backward needs only t. mp_sum_clip saves its bit mask.
_sum_op = kernel_op("triton_mp_sum", "(Tensor a, Tensor b, float t) -> Tensor",
                    impl=lambda a, b, t: mp_sum_forward(a, b, t, None)[0],
                    fake=lambda a, b, t: torch.empty_like(a))
_sum_bwd_op = kernel_op("triton_mp_sum_backward", "(Tensor g, float t) -> (Tensor, Tensor)",
                        impl=lambda g, t: mp_sum_backward(g, None, t, C.dense(g)),
                        fake=lambda g, t: (torch.empty_like(g), torch.empty_like(g)))
with_backward(_sum_op, _sum_bwd_op, num_outputs=1, nontensor_args=(2,), grads_for=(0, 1))


def _mask_fake(a):
    return a.new_empty((C.cdiv(a.numel(), 8),), dtype=torch.uint8)


_clip_op = kernel_op("triton_mp_sum_clip", "(Tensor a, Tensor b, float t, float clip) -> (Tensor, Tensor)",
                     impl=lambda a, b, t, clip: mp_sum_forward(a, b, t, clip),
                     fake=lambda a, b, t, clip: (torch.empty_like(a), _mask_fake(a)))
_clip_bwd_op = kernel_op("triton_mp_sum_clip_backward", "(Tensor g, Tensor mask, float t) -> (Tensor, Tensor)",
                         impl=lambda g, mask, t: mp_sum_backward(g, mask, t, C.dense(g)),
                         fake=lambda g, mask, t: (torch.empty_like(g), torch.empty_like(g)))


def _clip_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.t = inputs[2]
    ctx.layout = (tuple(inputs[0].shape), tuple(inputs[0].stride()))
    ctx.set_materialize_grads(False)  # the mask never gets a gradient: no zeros launch for it


def _clip_backward(ctx, g, _g_mask):
    if g is None:
        return None, None, None, None
    (mask,) = ctx.saved_tensors
    shape, stride = ctx.layout
    # The mask's bits follow a's storage order: bring g into that order first (no copy when it already is).
    if not C.is_dense(g) or any(n != 1 and s != t for n, s, t in zip(shape, g.stride(), stride)):
        g = torch.empty_strided(shape, stride, dtype=g.dtype, device=g.device).copy_(g)
    da, db = _clip_bwd_op(g, mask, ctx.t)
    return da, db, None, None


_clip_op.register_autograd(_clip_backward, setup_context=_clip_setup)


def _pair(a, b):
    a = C.dense(a)
    return a, C.like(b, a)


def mp_sum(a, b, t: float):
    a, b = _pair(a, b)
    return _sum_op(a, b, t)


def mp_sum_clip(a, b, t: float, clip: float):
    a, b = _pair(a, b)
    return _clip_op(a, b, t, clip)[0]


def supports(a, b, *args) -> bool:
    return C.supported_dtype(a, b)
