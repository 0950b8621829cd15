"""``mp_sum_clip_mp_cat_mp_silu`` (decoder Block boundary, spec §2): ``s = mp_sum_clip(x, y, t, clip)``
then ``c = mp_cat(s, skip)``, ``h = mp_silu(c)``, without storing ``s``.

Unfused this is two kernels forward (the sum, then :mod:`.mp_cat_silu`) and two backward; here:

* forward: one launch reads ``x``, ``y``, ``skip`` and writes ``c``, ``h`` (and the clip mask).
  The ``s`` part of ``c`` is ``round(round(clamp(lerp(x, y, t) * scale)) * ca)``: ``s`` rounded to
  the dtype exactly as :mod:`.mp_sum` stores it, then scaled in fp32 and rounded as
  :mod:`.mp_cat_silu` does with its input; ``h`` is MP-SiLU of the rounded ``c`` in fp32. The
  ``skip`` part is :mod:`.mp_cat_silu`'s own block code;
* backward: one launch reads the gradients of ``c`` and ``h`` (either may be absent: flags), the
  saved ``c`` and the mask. The ``s`` part gives ``g_s = ca * (g_c + g_h * mp_silu'(c))`` in fp32
  (not rounded: the ``s`` tensor the unfused backward would round no longer exists), then
  ``dx = g_s * keep * (1-t) * scale``, ``dy = g_s * keep * t * scale``; the ``skip`` part is
  :mod:`.mp_cat_silu`'s. Each gradient is rounded once.

Layout: :mod:`.mp_cat`'s ``[M, K]`` view in ``x``'s memory order (``y`` and ``skip`` copied into it
only when they differ), ``c[m] = [s[m] * ca | skip[m] * cb]``; programs ``[0, n_programs_a)`` do the
``s`` part, the rest the ``skip`` part. The clip mask is the bit mask of :mod:`.mp_sum` (1 where
``-clip <= sum <= clip`` for the unrounded fp32 sum, 0 for NaN) laid out per row of the ``s`` part:
``mask[m, k // 8]`` bit ``k % 8``, so a tile packs and unpacks whole bytes (``BLOCK_K`` is a
multiple of 8). Without clipping no mask is written or read.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._library import cat_rows, kernel_op, memory_order
from . import _common as C
from .mp_cat import BLOCK_KS, MAX_ROW, TILE, _row_length
from .mp_cat_silu import _bwd_block, _fwd_block, _grid, _tile
from .mp_sum import _coefs


@triton.jit
def _sum_fwd_block(p_ptr, q_ptr, c_ptr, h_ptr, mask_ptr, pid, M, Ka, K, mask_stride, w, scale, clip, ca,
                   n_kblocks, CLIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of the ``s`` part: s = (p + w * (q - p)) * scale (mp_sum's lerp), clipped and rounded."""
    row0, col0, rows, cols, mask = _tile(pid, M, Ka, n_kblocks, BLOCK_M, BLOCK_K)
    src = (row0 * Ka + col0) + (rows[:, None] * Ka + cols[None, :])
    p = tl.load(p_ptr + src, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + src, mask=mask, other=0.0).to(tl.float32)
    s = (p + w * (q - p)) * scale
    if CLIP:
        keep = ((s >= -clip) & (s <= clip)).to(tl.int32)  # 0 for NaN, as clamp's backward
        bits = tl.sum(tl.reshape(keep, [BLOCK_M, BLOCK_K // 8, 8]) << tl.arange(0, 8)[None, None, :], axis=2)
        byte = tl.arange(0, BLOCK_K // 8)
        bmask = (rows < M - row0)[:, None] & (byte * 8 < Ka - col0)[None, :]
        moff = (row0 * mask_stride + col0 // 8) + (rows[:, None] * mask_stride + byte[None, :])
        tl.store(mask_ptr + moff, bits.to(tl.uint8), mask=bmask)
        s = tl.clamp(s, -clip, clip, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN (see mp_sum.py)
    s = s.to(c_ptr.dtype.element_ty)  # s as mp_sum_clip stores it
    c = (s.to(tl.float32) * ca).to(c_ptr.dtype.element_ty)  # as mp_cat_silu rounds its x
    cf = c.to(tl.float32)
    h = cf / (1.0 + tl.exp(-cf)) * (1.0 / 0.596)
    dst = (row0 * K + col0) + (rows[:, None] * K + cols[None, :])
    tl.store(c_ptr + dst, c, mask=mask)
    tl.store(h_ptr + dst, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_cat_silu_fwd_kernel(p_ptr, q_ptr, skip_ptr, c_ptr, h_ptr, mask_ptr, M, Ka, Kb, K, mask_stride, w, scale,
                             clip, ca, cb, n_kblocks_a, n_kblocks_b, n_programs_a, CLIP: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_programs_a:
        _sum_fwd_block(p_ptr, q_ptr, c_ptr, h_ptr, mask_ptr, pid, M, Ka, K, mask_stride, w, scale, clip, ca,
                       n_kblocks_a, CLIP, BLOCK_M, BLOCK_K)
    else:
        _fwd_block(skip_ptr, c_ptr + Ka, h_ptr + Ka, pid - n_programs_a, M, Kb, Kb, K, cb, n_kblocks_b,
                   BLOCK_M, BLOCK_K)


@triton.jit
def _sum_bwd_block(gc_ptr, gh_ptr, c_ptr, mask_ptr, dx_ptr, dy_ptr, pid, M, Ka, K, mask_stride, ca, cx, cy,
                   n_kblocks, HAS_GC: tl.constexpr, HAS_GH: tl.constexpr, CLIP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    row0, col0, rows, cols, mask = _tile(pid, M, Ka, n_kblocks, BLOCK_M, BLOCK_K)
    off = (row0 * K + col0) + (rows[:, None] * K + cols[None, :])
    g = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_GC:
        g += tl.load(gc_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_GH:
        c = tl.load(c_ptr + off, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-c))
        g += tl.load(gh_ptr + off, mask=mask, other=0.0).to(tl.float32) * (sig * (1.0 + c * (1.0 - sig)) *
                                                                           (1.0 / 0.596))
    g = g * ca  # the gradient of s, kept in fp32
    if CLIP:  # the gradient passes where clamp's would (bit set in the forward's mask)
        moff = (row0 * mask_stride + col0 // 8) + (rows[:, None] * mask_stride + (cols // 8)[None, :])
        bits = tl.load(mask_ptr + moff, mask=mask, other=0).to(tl.int32)
        g = tl.where(((bits >> (cols % 8)[None, :]) & 1) != 0, g, 0.0)
    doff = (row0 * Ka + col0) + (rows[:, None] * Ka + cols[None, :])
    tl.store(dx_ptr + doff, (g * cx).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_ptr + doff, (g * cy).to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_cat_silu_bwd_kernel(gc_ptr, gh_ptr, c_ptr, mask_ptr, dx_ptr, dy_ptr, dskip_ptr, M, Ka, Kb, K, mask_stride,
                             ca, cb, cx, cy, n_kblocks_a, n_kblocks_b, n_programs_a, HAS_GC: tl.constexpr,
                             HAS_GH: tl.constexpr, CLIP: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_programs_a:
        _sum_bwd_block(gc_ptr, gh_ptr, c_ptr, mask_ptr, dx_ptr, dy_ptr, pid, M, Ka, K, mask_stride, ca, cx, cy,
                       n_kblocks_a, HAS_GC, HAS_GH, CLIP, BLOCK_M, BLOCK_K)
    else:
        _bwd_block(gc_ptr + Ka, gh_ptr + Ka, c_ptr + Ka, dskip_ptr, pid - n_programs_a, M, Kb, K, Kb, cb,
                   n_kblocks_b, HAS_GC, HAS_GH, BLOCK_M, BLOCK_K)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(d, block_k, clip):
    return C.make_config(_sum_cat_silu_fwd_kernel,
                         ptrs=dict(p_ptr=d, q_ptr=d, skip_ptr=d, c_ptr=d, h_ptr=d, mask_ptr="u8"),
                         floats=("w", "scale", "clip", "ca", "cb"),
                         constexprs=dict(CLIP=clip, BLOCK_M=TILE // block_k, BLOCK_K=block_k),
                         num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)
def _bwd_config(d, block_k, has_gc, has_gh, clip):
    return C.make_config(_sum_cat_silu_bwd_kernel,
                         ptrs=dict(gc_ptr=d, gh_ptr=d, c_ptr=d, mask_ptr="u8", dx_ptr=d, dy_ptr=d, dskip_ptr=d),
                         floats=("ca", "cb", "cx", "cy"),
                         constexprs=dict(HAS_GC=has_gc, HAS_GH=has_gh, CLIP=clip, BLOCK_M=TILE // block_k,
                                         BLOCK_K=block_k),
                         num_warps=4, num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        for bk in BLOCK_KS:
            for clip in (True, False):
                yield _fwd_config(d, bk, clip)
                for has_gc, has_gh in ((True, True), (True, False), (False, True)):
                    yield _bwd_config(d, bk, has_gc, has_gh, clip)


def _mask_shape(M: int, ka: int, clip: float) -> tuple[int, int]:
    """One bit per element of the ``s`` part, a row of bytes per row; nothing without clipping."""
    return (M, C.cdiv(ka, 8)) if clip > 0 else (0, 0)


def forward(x2: torch.Tensor, y2: torch.Tensor, skip2: torch.Tensor, t: float, clip: float, ca: float, cb: float):
    """``(c, h, mask)`` of ``[M, Ka]`` rows ``x2``, ``y2`` and ``[M, Kb]`` rows ``skip2``; ``clip <= 0``: none."""
    x2, y2, skip2 = x2.contiguous(), y2.contiguous(), skip2.contiguous()  # no-ops on the views built below
    M, Ka = x2.shape
    Kb = skip2.shape[1]
    c = torch.empty((M, Ka + Kb), dtype=x2.dtype, device=x2.device)
    h = torch.empty_like(c)
    mask = torch.empty(_mask_shape(M, Ka, clip), dtype=torch.uint8, device=x2.device)
    scale = 1.0 / math.sqrt((1 - t) ** 2 + t ** 2)
    p, q, w = (x2, y2, t) if t < 0.5 else (y2, x2, 1.0 - t)  # torch.lerp's two formulas, as mp_sum
    bk, nk_a, nk_b, n_a, n = _grid(M, Ka, Kb)
    C.launch(_fwd_config(x2.dtype, bk, clip > 0), (n,), p, q, skip2, c, h, mask, M, Ka, Kb, Ka + Kb, mask.shape[1],
             float(w), scale, float(clip), float(ca), float(cb), nk_a, nk_b, n_a)
    return c, h, mask


def backward(gc: torch.Tensor | None, gh: torch.Tensor | None, c: torch.Tensor, mask: torch.Tensor, ka: int,
             t: float, ca: float, cb: float):
    """``(dx, dy, dskip)`` as ``[M, Ka]``, ``[M, Ka]``, ``[M, Kb]`` rows; ``mask`` empty: no clipping."""
    M, K = c.shape
    kb = K - ka
    dx = torch.empty((M, ka), dtype=c.dtype, device=c.device)
    dy = torch.empty_like(dx)
    dskip = torch.empty((M, kb), dtype=c.dtype, device=c.device)
    if gc is None and gh is None:
        return dx.zero_(), dy.zero_(), dskip.zero_()
    gc = gc.contiguous() if gc is not None else None
    gh = gh.contiguous() if gh is not None else None
    cx, cy = _coefs(t)
    bk, nk_a, nk_b, n_a, n = _grid(M, ka, kb)
    clip = mask.numel() > 0
    cfg = _bwd_config(c.dtype, bk, gc is not None, gh is not None, clip)
    C.launch(cfg, (n,), gc if gc is not None else c, gh if gh is not None else c, c, mask, dx, dy, dskip, M, ka, kb,
             K, mask.shape[1] if clip else 0, float(ca), float(cb), cx, cy, nk_a, nk_b, n_a)
    return dx, dy, dskip


def _fwd_fake(x2, y2, skip2, t, clip, ca, cb):
    M, Ka = x2.shape
    shape = (M, Ka + skip2.shape[1])
    return x2.new_empty(shape), x2.new_empty(shape), x2.new_empty(_mask_shape(M, Ka, clip), dtype=torch.uint8)


_fwd_op = kernel_op("triton_mp_sum_clip_mp_cat_mp_silu",
                    "(Tensor x, Tensor y, Tensor skip, float t, float clip, float ca, float cb) "
                    "-> (Tensor, Tensor, Tensor)",
                    impl=forward, fake=_fwd_fake)
_bwd_op = kernel_op("triton_mp_sum_clip_mp_cat_mp_silu_backward",
                    "(Tensor? gc, Tensor? gh, Tensor c, Tensor mask, int ka, float t, float ca, float cb) "
                    "-> (Tensor, Tensor, Tensor)",
                    impl=backward,
                    fake=lambda gc, gh, c, mask, ka, t, ca, cb: (c.new_empty((c.shape[0], ka)),
                                                                 c.new_empty((c.shape[0], ka)),
                                                                 c.new_empty((c.shape[0], c.shape[1] - ka))))


def _setup(ctx, inputs, output):
    ctx.ka = inputs[0].shape[1]
    ctx.t, ctx.ca, ctx.cb = inputs[3], inputs[5], inputs[6]
    ctx.save_for_backward(output[0], output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused output costs nothing (flags), the mask never gets a gradient


def _backward(ctx, gc, gh, _g_mask):
    if gc is None and gh is None:
        return None, None, None, None, None, None, None
    c, mask = ctx.saved_tensors
    dx, dy, dskip = _bwd_op(gc, gh, c, mask, ctx.ka, ctx.t, ctx.ca, ctx.cb)
    return dx, dy, dskip, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def mp_sum_clip_mp_cat_mp_silu(x, y, skip, t: float, clip: float | None, cat_t: float, dim: int = 1):
    x = C.dense(x)
    y = C.like(y, x)  # x's memory order, so that both have the same [M, Ka] rows
    x2, skip2, ca, cb, back = cat_rows(x, skip, dim, cat_t)
    y2 = y.permute(memory_order(x)).reshape(x2.shape)  # the permutation cat_rows applied to x
    c2, h2, _ = _fwd_op(x2, y2, skip2, t, float(clip) if clip is not None else 0.0, ca, cb)
    return back(c2), back(h2)


def supports(x, y, skip, t=0.5, clip=None, cat_t=0.5, dim: int = 1) -> bool:
    return C.supported_dtype(x, y, skip) and _row_length(x, skip, dim) < MAX_ROW


register("mp_sum_clip_mp_cat_mp_silu", "triton", mp_sum_clip_mp_cat_mp_silu,
         devices=("cuda", "cpu") if C.INTERPRET else ("cuda",), supports=supports)
