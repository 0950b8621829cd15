"""Normalization along one axis: ``normalize``, ``pixel_norm`` and ``pixel_norm_mp_silu`` (spec §1).

Forward (paper App. B.2): ``y = x * inv`` with ``inv = 1 / (eps + ||x|| / sqrt(R))`` per row, the
norm in fp32; ``pixel_norm_mp_silu`` also writes ``mp_silu(y) = silu(y) / 0.596`` from the same
registers (one read of ``x``, two writes). Saved for backward: ``x`` and the fp32 ``inv`` per row.

Backward, with ``G`` the gradient reaching ``y`` (for the fused op ``G = g_y + g_s * silu'(y) / 0.596``):
``dx = inv * G - x * inv^2 * <G, x> / (R * rms)``, ``rms = ||x|| / sqrt(R) = 1/inv - eps``.

Every call is reduced to a contiguous ``[outer, R, inner]`` tensor by views alone when the
reduced axes are adjacent in memory: NCHW (``inner = H*W``, stride-1 along pixels) and
channels_last (``inner = 1``, stride-1 along channels) both take the fast path; other layouts
are copied once. The kernel keeps a whole row in registers when ``R <= 1024`` (one read of
``x``) and otherwise makes two passes over it.

The same kernels serve :mod:`mpkernels.triton.mp_weight` (flag ``GAIN``: output scaled by a
gain read from memory, per-row partial gradients of that gain written in backward).
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
def _row_setup(pid, R, inner, num_iblocks, R_CONTIG: tl.constexpr, BLOCK_I: tl.constexpr):
    """Base offset (int64) of this program's tile, the mask of its valid columns and their stat index."""
    il = tl.arange(0, BLOCK_I)
    if R_CONTIG:  # rows of length R, contiguous: row index = pid*BLOCK_I + il
        row0 = pid.to(tl.int64) * BLOCK_I
        base = row0 * R
        ivalid = (row0 + il) < inner
        stat = row0 + il
    else:  # [outer, R, inner] with inner contiguous
        o = pid // num_iblocks
        i0 = (pid % num_iblocks) * BLOCK_I
        base = o.to(tl.int64) * R * inner + i0
        ivalid = (i0 + il) < inner
        stat = o.to(tl.int64) * inner + i0 + il
    return base, ivalid, stat


@triton.jit
def _row_offsets(r, R, inner, R_CONTIG: tl.constexpr, BLOCK_I: tl.constexpr):
    il = tl.arange(0, BLOCK_I)
    if R_CONTIG:
        return il[None, :] * R + r[:, None]
    else:
        return r[:, None] * inner + il[None, :]


@triton.jit
def _normalize_fwd_kernel(x_ptr, y_ptr, s_ptr, inv_ptr, gain_ptr, R, inner, num_iblocks, eps, inv_sqrt_r, scale,
                          R_CONTIG: tl.constexpr, SILU: tl.constexpr, GAIN: tl.constexpr,
                          ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """y = x * inv * scale [* gain]; optionally s = silu(y) / 0.596; inv saved per row (fp32)."""
    pid = tl.program_id(0)
    base, ivalid, stat = _row_setup(pid, R, inner, num_iblocks, R_CONTIG, BLOCK_I)
    x_ptr += base
    y_ptr += base
    if SILU:
        s_ptr += base
    mult = scale
    if GAIN:
        mult = scale * tl.load(gain_ptr).to(tl.float32)
    if ONE_PASS:
        r = tl.arange(0, BLOCK_R)
        off = _row_offsets(r, R, inner, R_CONTIG, BLOCK_I)
        m = (r < R)[:, None] & ivalid[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        inv = 1.0 / (eps + tl.sqrt(tl.sum(x * x, axis=0)) * inv_sqrt_r)
        y = x * (inv * mult)[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)
        if SILU:
            s = y / (1.0 + tl.exp(-y)) * (1.0 / 0.596)
            tl.store(s_ptr + off, s.to(s_ptr.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            off = _row_offsets(r, R, inner, R_CONTIG, BLOCK_I)
            m = (r < R)[:, None] & ivalid[None, :]
            x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            acc += x * x
        inv = 1.0 / (eps + tl.sqrt(tl.sum(acc, axis=0)) * inv_sqrt_r)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            off = _row_offsets(r, R, inner, R_CONTIG, BLOCK_I)
            m = (r < R)[:, None] & ivalid[None, :]
            x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            y = x * (inv * mult)[None, :]
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)
            if SILU:
                s = y / (1.0 + tl.exp(-y)) * (1.0 / 0.596)
                tl.store(s_ptr + off, s.to(s_ptr.dtype.element_ty), mask=m)
    tl.store(inv_ptr + stat, inv, mask=ivalid)


@triton.jit
def _incoming_grad(g_ptr, gs_ptr, x, inv, off, m, SILU: tl.constexpr):
    """Gradient reaching the normalized tensor y = x * inv (fp32)."""
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
    if SILU:  # y feeds both outputs: g + g_s * d/dy [silu(y) / 0.596]
        gs = tl.load(gs_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = x * inv[None, :]
        sig = 1.0 / (1.0 + tl.exp(-y))
        g += gs * (sig * (1.0 + y * (1.0 - sig)) * (1.0 / 0.596))
    return g


@triton.jit
def _normalize_bwd_kernel(g_ptr, gs_ptr, x_ptr, inv_ptr, gain_ptr, dx_ptr, dgain_ptr, R, inner, num_iblocks,
                          eps, inv_r, scale,
                          R_CONTIG: tl.constexpr, SILU: tl.constexpr, GAIN: tl.constexpr,
                          ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """dx = mult * (inv*G - x * inv^2 <G,x> / (R*rms)); with GAIN also dgain partial = scale * inv * <G,x> per row."""
    pid = tl.program_id(0)
    base, ivalid, stat = _row_setup(pid, R, inner, num_iblocks, R_CONTIG, BLOCK_I)
    g_ptr += base
    x_ptr += base
    dx_ptr += base
    if SILU:
        gs_ptr += base
    inv = tl.load(inv_ptr + stat, mask=ivalid, other=1.0)
    mult = scale
    if GAIN:
        mult = scale * tl.load(gain_ptr).to(tl.float32)
    rms = 1.0 / inv - eps
    # d(inv)/dx = -inv^2 * x / (R * rms); zero rows (rms == 0) have a zero derivative, as in PyTorch.
    coef = tl.where(rms > 0.0, inv * inv * inv_r / tl.where(rms > 0.0, rms, 1.0), 0.0)
    if ONE_PASS:
        r = tl.arange(0, BLOCK_R)
        off = _row_offsets(r, R, inner, R_CONTIG, BLOCK_I)
        m = (r < R)[:, None] & ivalid[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        g = _incoming_grad(g_ptr, gs_ptr, x, inv, off, m, SILU)
        dot = tl.sum(g * x, axis=0)
        dx = (g * (inv * mult)[None, :] - x * (coef * dot * mult)[None, :])
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            off = _row_offsets(r, R, inner, R_CONTIG, BLOCK_I)
            m = (r < R)[:, None] & ivalid[None, :]
            x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            g = _incoming_grad(g_ptr, gs_ptr, x, inv, off, m, SILU)
            acc += g * x
        dot = tl.sum(acc, axis=0)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            off = _row_offsets(r, R, inner, R_CONTIG, BLOCK_I)
            m = (r < R)[:, None] & ivalid[None, :]
            x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            g = _incoming_grad(g_ptr, gs_ptr, x, inv, off, m, SILU)
            dx = (g * (inv * mult)[None, :] - x * (coef * dot * mult)[None, :])
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
    if GAIN:
        tl.store(dgain_ptr + stat, inv * dot * scale, mask=ivalid)


# --- configurations --------------------------------------------------------------------------

MAX_ONE_PASS_R = 1024  # rows up to this length stay in registers (EDM2-S has C <= 768)
BLOCK_RS = (64, 256, 512, 1024)  # few sizes: every one is compiled ahead of time in the tests
_TILE = {False: 8192, True: 4096}  # elements per program (forward, backward)
_PER_THREAD = {False: 16, True: 8}  # elements per thread (the backward holds three tiles)
_TWO_PASS = {True: (1024, 4), False: (64, 64)}  # R_CONTIG -> (BLOCK_R chunk, BLOCK_I)


def _blocks(R: int, r_contig: bool, bwd: bool) -> tuple[bool, int, int]:
    """(ONE_PASS, BLOCK_R, BLOCK_I) for rows of length R."""
    if R > MAX_ONE_PASS_R:
        return (False,) + _TWO_PASS[r_contig]
    block_r = next(b for b in BLOCK_RS if b >= R)
    tile = _TILE[bwd]
    # NCHW: at least 8 contiguous pixels per row of the tile (a full 32-byte sector in fp32).
    block_i = max(1, tile // block_r) if r_contig else min(128, max(8, tile // block_r))
    return True, block_r, block_i


def _all_blocks(r_contig: bool, bwd: bool):
    return [_blocks(r, r_contig, bwd) for r in BLOCK_RS + (MAX_ONE_PASS_R + 1,)]


def _warps(block_r: int, block_i: int, bwd: bool) -> int:
    return max(4, min(16, block_r * block_i // (32 * _PER_THREAD[bwd])))


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(r_contig, silu, gain, one_pass, block_r, block_i, xd, yd):
    ptrs = dict(x_ptr=xd, y_ptr=yd, s_ptr=yd if silu else xd, inv_ptr="fp32", gain_ptr="fp32" if gain else xd)
    return C.make_config(_normalize_fwd_kernel, ptrs=ptrs, floats=("eps", "inv_sqrt_r", "scale"),
                         constexprs=dict(R_CONTIG=r_contig, SILU=silu, GAIN=gain, ONE_PASS=one_pass,
                                         BLOCK_R=block_r, BLOCK_I=block_i),
                         num_warps=_warps(block_r, block_i, False), num_stages=1)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _bwd_config(r_contig, silu, gain, one_pass, block_r, block_i, xd, gd):
    ptrs = dict(g_ptr=gd, gs_ptr=gd if silu else gd, x_ptr=xd, inv_ptr="fp32", gain_ptr="fp32" if gain else xd,
                dx_ptr=xd, dgain_ptr="fp32" if gain else xd)
    return C.make_config(_normalize_bwd_kernel, ptrs=ptrs, floats=("eps", "inv_r", "scale"),
                         constexprs=dict(R_CONTIG=r_contig, SILU=silu, GAIN=gain, ONE_PASS=one_pass,
                                         BLOCK_R=block_r, BLOCK_I=block_i),
                         num_warps=_warps(block_r, block_i, True), num_stages=1)


@C.declare_configs
def configs():
    """Normalize / pixel norm (+ MP-SiLU): both layouts, every block size, every dtype."""
    for d in C.DTYPES:
        for r_contig in (False, True):
            for silu in (False, True):
                for blk in _all_blocks(r_contig, False):
                    yield _fwd_config(r_contig, silu, False, *blk, d, d)
                for blk in _all_blocks(r_contig, True):
                    yield _bwd_config(r_contig, silu, False, *blk, d, d)


# --- launchers -----------------------------------------------------------------------------

def _grid(outer, R, inner, block_i, r_contig):
    if r_contig:
        return (C.cdiv(outer * inner, block_i),), outer * inner, 1
    nib = C.cdiv(inner, block_i)
    return (outer * nib,), inner, nib


def normalize_forward(x3: torch.Tensor, eps: float, silu: bool = False, *, out_dtype=None, scale: float = 1.0,
                      gain: torch.Tensor | None = None, blocks=None):
    """Launch the forward kernel on a contiguous ``[outer, R, inner]`` tensor.

    Returns ``(y, s or None, inv)``; ``inv`` is fp32 ``[outer, 1, inner]``.
    """
    x3 = x3.contiguous()  # no-op on the views the public entry points build
    outer, R, inner = x3.shape
    r_contig = inner == 1
    y = torch.empty(x3.shape, dtype=out_dtype or x3.dtype, device=x3.device)
    s = torch.empty_like(x3) if silu else None
    inv = torch.empty((outer, 1, inner), dtype=torch.float32, device=x3.device)
    one_pass, block_r, block_i = blocks or _blocks(R, r_contig, False)
    cfg = _fwd_config(r_contig, silu, gain is not None, one_pass, block_r, block_i, x3.dtype, y.dtype)
    grid, inner_arg, nib = _grid(outer, R, inner, block_i, r_contig)
    C.launch(cfg, grid, x3, y, s if silu else x3, inv, gain if gain is not None else x3, R, inner_arg, nib,
             float(eps), 1.0 / math.sqrt(R), float(scale))
    return y, s, inv


def normalize_backward(g: torch.Tensor, gs: torch.Tensor | None, x3: torch.Tensor, inv: torch.Tensor, eps: float,
                       *, scale: float = 1.0, gain: torch.Tensor | None = None, blocks=None):
    """Launch the backward kernel; returns ``(dx, dgain_rows or None)`` (``dx`` in ``x3.dtype``)."""
    x3 = x3.contiguous()
    outer, R, inner = x3.shape
    r_contig = inner == 1
    g = g.contiguous()
    gs = gs.contiguous() if gs is not None else None
    if gs is not None and gs.dtype != g.dtype:
        gs = gs.to(g.dtype)
    dx = torch.empty_like(x3)
    dgain = torch.empty((outer * inner,), dtype=torch.float32, device=x3.device) if gain is not None else None
    one_pass, block_r, block_i = blocks or _blocks(R, r_contig, True)
    cfg = _bwd_config(r_contig, gs is not None, gain is not None, one_pass, block_r, block_i, x3.dtype, g.dtype)
    grid, inner_arg, nib = _grid(outer, R, inner, block_i, r_contig)
    C.launch(cfg, grid, g, gs if gs is not None else g, x3, inv, gain if gain is not None else x3, dx,
             dgain if dgain is not None else x3, R, inner_arg, nib, float(eps), 1.0 / R, float(scale))
    return dx, dgain


# --- custom ops ------------------------------------------------------------------------------

def _inv_fake(x3):
    return x3.new_empty((x3.shape[0], 1, x3.shape[2]), dtype=torch.float32)


_normalize_op = kernel_op(
    "triton_normalize", "(Tensor x, float eps) -> (Tensor, Tensor)",
    impl=lambda x, eps: (lambda y, s, inv: (y, inv))(*normalize_forward(x, eps)),
    fake=lambda x, eps: (x.new_empty(x.shape), _inv_fake(x)))
_normalize_bwd_op = kernel_op(
    "triton_normalize_backward", "(Tensor g, Tensor x, Tensor inv, float eps) -> Tensor",
    impl=lambda g, x, inv, eps: normalize_backward(g, None, x, inv, eps)[0],
    fake=lambda g, x, inv, eps: x.new_empty(x.shape))
with_backward(_normalize_op, _normalize_bwd_op, num_outputs=1, saved_inputs=(0,), saved_outputs=(1,),
              nontensor_args=(1,), grads_for=(0,))

_pn_silu_op = kernel_op(
    "triton_pixel_norm_mp_silu", "(Tensor x, float eps) -> (Tensor, Tensor, Tensor)",
    impl=lambda x, eps: normalize_forward(x, eps, silu=True),
    fake=lambda x, eps: (x.new_empty(x.shape), x.new_empty(x.shape), _inv_fake(x)))
_pn_silu_bwd_op = kernel_op(
    "triton_pixel_norm_mp_silu_backward", "(Tensor g, Tensor gs, Tensor x, Tensor inv, float eps) -> Tensor",
    impl=lambda g, gs, x, inv, eps: normalize_backward(g, gs, x, inv, eps)[0],
    fake=lambda g, gs, x, inv, eps: x.new_empty(x.shape))
with_backward(_pn_silu_op, _pn_silu_bwd_op, num_outputs=2, saved_inputs=(0,), saved_outputs=(2,),
              nontensor_args=(1,), grads_for=(0,))


# --- public entry points (receive the validated arguments of mpkernels.functional) ------------

def _row_view(x: torch.Tensor, dims: tuple[int, ...]):
    """Turn ``x`` into a contiguous ``[outer, R, inner]`` tensor reduced over its middle axis, by views
    alone when the reduced axes are adjacent in memory (a copy otherwise), and return it with a
    function that maps a result of that shape back to ``x``'s shape."""
    nd = x.ndim
    red = set(dims)
    big = [d for d in range(nd) if x.shape[d] != 1]  # size-1 dims have no meaningful stride
    ones_red = [d for d in range(nd) if x.shape[d] == 1 and d in red]
    ones_other = [d for d in range(nd) if x.shape[d] == 1 and d not in red]

    def full_order(core):
        pos = [i for i, d in enumerate(core) if d in red]
        if pos and pos != list(range(pos[0], pos[-1] + 1)):
            return None  # reduced axes not adjacent in this order
        cut = pos[-1] + 1 if pos else len(core)
        return ones_other + core[:cut] + ones_red + core[cut:]

    plan = None
    if C.is_dense(x):
        for core in (big, [d for d in big if d not in red] + [d for d in big if d in red],
                     sorted(big, key=lambda d: -x.stride(d))):
            order = full_order(core)
            if order is not None and x.permute(order).is_contiguous():
                plan = order
                break
    if plan is None:  # unusual layout: one copy, reduced axes innermost
        order = ones_other + [d for d in big if d not in red] + [d for d in range(nd) if d in red]
        xp = x.permute(order).contiguous()
    else:
        order = plan
        xp = x.permute(order)
    lo = min(order.index(d) for d in red)
    hi = lo + len(red)
    shp = xp.shape
    x3 = xp.reshape(math.prod(shp[:lo]), math.prod(shp[lo:hi]), math.prod(shp[hi:]))
    inv_order = [order.index(d) for d in range(nd)]

    def back(t3: torch.Tensor) -> torch.Tensor:
        return t3.reshape(shp).permute(inv_order)

    return x3, back


def normalize(x: torch.Tensor, dims, eps: float) -> torch.Tensor:
    dims = tuple(range(1, x.ndim)) if dims is None else tuple(dims)
    x3, back = _row_view(x, dims)
    y3, _ = _normalize_op(x3, eps)
    return back(y3)


def pixel_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return normalize(x, (1,), eps)


def pixel_norm_mp_silu(x: torch.Tensor, eps: float):
    x3, back = _row_view(x, (1,))
    y3, s3, _ = _pn_silu_op(x3, eps)
    return back(y3), back(s3)


def supports(x, *args) -> bool:
    return C.supported_dtype(x)
