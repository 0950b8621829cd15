"""Normalization along one axis: ``normalize``, ``pixel_norm`` and ``pixel_norm_mp_silu`` (spec §1).

Forward (paper App. B.2): ``y = x * inv`` with ``inv = 1 / (eps + ||x|| / sqrt(R))`` per row, the
norm in fp32; ``pixel_norm_mp_silu`` also writes ``mp_silu(y) = silu(y) / 0.596`` from the same
registers (one read of ``x``, two writes). Saved for backward: ``x`` and the fp32 ``inv`` per row.

Backward, with ``G`` the gradient reaching ``y`` (for the fused op ``G = g_y + g_s * silu'(y) / 0.596``):
``dx = inv * G - x * inv^2 * <G, x> / (R * rms)``, ``rms = ||x|| / sqrt(R) = 1/inv - eps``.

Every call is reduced to a contiguous ``[outer, R, inner]`` tensor by views alone when the
reduced axes are adjacent in memory: NCHW (``inner = H*W``, stride-1 along pixels) and
channels_last (``inner = 1``, stride-1 along channels) both take the fast path; other layouts
are copied once. The kernel keeps a whole row in registers when it fits (one read of ``x``; rows
up to 2048, as one or two power-of-two chunks) and otherwise makes two passes over it. Each
program's base offset is 64-bit, offsets within a ``[R, inner]`` slice 32-bit (64-bit ones per
element cost registers): slices of 2^31 elements or more fall back to the reference (``supports``).

The same kernels serve :mod:`mpkernels.triton.mp_weight` (flag ``GAIN``: output scaled by a
gain read from memory, per-row partial gradients of that gain written in backward; flag
``PERM``: output rows in head-contiguous q, k, v order, gradients scattered back).
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
def _qkv_source_row(row, D):
    """Row ``head*3*D + 3*d + j`` (interleaved q, k, v) that head-contiguous row ``head*3*D + j*D + d`` reads."""
    head = row // (3 * D)
    rem = row - head * (3 * D)
    j = rem // D
    return head * (3 * D) + 3 * (rem - j * D) + j


@triton.jit
def _columns(pid, R, inner, num_iblocks, qkv_d, R_CONTIG: tl.constexpr, PERM: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's tile: the int64 offset of its first element, the [BLOCK_I] offsets of its
    columns (rows of the reduction) from there in the outputs and in x (they differ only with PERM,
    which reads rows in :func:`_qkv_source_row` order), which columns are valid, and their statistic
    index. Offsets within a tile are 32-bit: ``supports`` refuses slices of 2^31 elements or more."""
    il = tl.arange(0, BLOCK_I)
    if R_CONTIG:  # rows of length R, contiguous: row index = pid*BLOCK_I + il (inner = number of rows)
        row0 = pid.to(tl.int64) * BLOCK_I
        base = row0 * R
        valid = (row0 + il) < inner
        y_col = il * R
        if PERM:  # the source rows lie within the same heads' 3*D rows: small offsets from row0
            x_col = ((_qkv_source_row(row0 + il, qkv_d) - row0) * R).to(tl.int32)
        else:
            x_col = y_col
        stat = row0 + il
    else:  # [outer, R, inner] with inner contiguous
        o = pid // num_iblocks
        i0 = (pid % num_iblocks) * BLOCK_I
        base = o.to(tl.int64) * R * inner + i0
        valid = (i0 + il) < inner
        y_col = il
        x_col = y_col
        stat = o.to(tl.int64) * inner + i0 + il
    return base, x_col, y_col, valid, stat


@triton.jit
def _offsets(col, r, inner, R_CONTIG: tl.constexpr):
    """[len(r), BLOCK_I] element offsets from the tile's base."""
    if R_CONTIG:
        return col[None, :] + r[:, None]
    else:
        return col[None, :] + (r * inner)[:, None]


@triton.jit
def _load_x(x_ptr, x_col, valid, r, R, inner, R_CONTIG: tl.constexpr):
    m = (r < R)[:, None] & valid[None, :]
    return tl.load(x_ptr + _offsets(x_col, r, inner, R_CONTIG), mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_y(y_ptr, s_ptr, y_col, valid, r, R, inner, x, mult, R_CONTIG: tl.constexpr, SILU: tl.constexpr):
    """y = x * mult per column; with SILU also s = silu(y) / 0.596."""
    off = _offsets(y_col, r, inner, R_CONTIG)
    m = (r < R)[:, None] & valid[None, :]
    y = x * mult[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)
    if SILU:
        s = y / (1.0 + tl.exp(-y)) * (1.0 / 0.596)
        tl.store(s_ptr + off, s.to(s_ptr.dtype.element_ty), mask=m)


@triton.jit
def _normalize_fwd_kernel(x_ptr, y_ptr, s_ptr, inv_ptr, gain_ptr, R, inner, num_iblocks, qkv_d, eps, inv_sqrt_r,
                          scale, R_CONTIG: tl.constexpr, SILU: tl.constexpr, GAIN: tl.constexpr, PERM: tl.constexpr,
                          ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_R2: tl.constexpr,
                          BLOCK_I: tl.constexpr):
    """y = x * inv * scale [* gain]; optionally s = silu(y) / 0.596; inv saved per row (fp32).

    One pass: the row is held in registers as a BLOCK_R chunk plus an optional BLOCK_R2 chunk
    (e.g. 576 = 512 + 64 channels, instead of one 1024 block with 44% of its lanes masked).
    """
    pid = tl.program_id(0)
    base, x_col, y_col, valid, stat = _columns(pid, R, inner, num_iblocks, qkv_d, R_CONTIG, PERM, BLOCK_I)
    x_ptr += base
    y_ptr += base
    if SILU:
        s_ptr += base
    mult = scale
    if GAIN:
        mult = scale * tl.load(gain_ptr).to(tl.float32)
    if ONE_PASS:
        r = tl.arange(0, BLOCK_R)
        x = _load_x(x_ptr, x_col, valid, r, R, inner, R_CONTIG)
        ss = tl.sum(x * x, axis=0)
        if BLOCK_R2 > 0:
            r2 = BLOCK_R + tl.arange(0, BLOCK_R2)
            x2 = _load_x(x_ptr, x_col, valid, r2, R, inner, R_CONTIG)
            ss += tl.sum(x2 * x2, axis=0)
        inv = 1.0 / (eps + tl.sqrt(ss) * inv_sqrt_r)
        _store_y(y_ptr, s_ptr, y_col, valid, r, R, inner, x, inv * mult, R_CONTIG, SILU)
        if BLOCK_R2 > 0:
            _store_y(y_ptr, s_ptr, y_col, valid, r2, R, inner, x2, inv * mult, R_CONTIG, SILU)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            x = _load_x(x_ptr, x_col, valid, r0 + tl.arange(0, BLOCK_R), R, inner, R_CONTIG)
            acc += x * x
        inv = 1.0 / (eps + tl.sqrt(tl.sum(acc, axis=0)) * inv_sqrt_r)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            x = _load_x(x_ptr, x_col, valid, r, R, inner, R_CONTIG)
            _store_y(y_ptr, s_ptr, y_col, valid, r, R, inner, x, inv * mult, R_CONTIG, SILU)
    tl.store(inv_ptr + stat, inv, mask=valid)


@triton.jit
def _incoming_grad(g_ptr, gs_ptr, y_col, valid, r, R, inner, x, inv, R_CONTIG: tl.constexpr, SILU: tl.constexpr):
    """Gradient reaching the normalized tensor y = x * inv (fp32)."""
    off = _offsets(y_col, r, inner, R_CONTIG)
    m = (r < R)[:, None] & valid[None, :]
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
    if SILU:  # y feeds both outputs: g + g_s * d/dy [silu(y) / 0.596]
        gs = tl.load(gs_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = x * inv[None, :]
        sig = 1.0 / (1.0 + tl.exp(-y))
        g += gs * (sig * (1.0 + y * (1.0 - sig)) * (1.0 / 0.596))
    return g


@triton.jit
def _store_dx(dx_ptr, x_col, valid, r, R, inner, g, x, a, b, R_CONTIG: tl.constexpr):
    """dx = g * a - x * b per column (written in x's row order)."""
    m = (r < R)[:, None] & valid[None, :]
    dx = g * a[None, :] - x * b[None, :]
    tl.store(dx_ptr + _offsets(x_col, r, inner, R_CONTIG), dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _normalize_bwd_kernel(g_ptr, gs_ptr, x_ptr, inv_ptr, gain_ptr, dx_ptr, dgain_ptr, R, inner, num_iblocks, qkv_d,
                          eps, inv_r, scale,
                          R_CONTIG: tl.constexpr, SILU: tl.constexpr, GAIN: tl.constexpr, PERM: tl.constexpr,
                          ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_R2: tl.constexpr,
                          BLOCK_I: tl.constexpr):
    """dx = mult * (inv*G - x * inv^2 <G,x> / (R*rms)); with GAIN also dgain partial = scale * inv * <G,x> per row.

    With PERM the incoming gradient is in the output's (permuted) row order and dx is scattered
    back to the rows of x (a permutation: every row written once)."""
    pid = tl.program_id(0)
    base, x_col, y_col, valid, stat = _columns(pid, R, inner, num_iblocks, qkv_d, R_CONTIG, PERM, BLOCK_I)
    g_ptr += base
    x_ptr += base
    dx_ptr += base
    if SILU:
        gs_ptr += base
    inv = tl.load(inv_ptr + stat, mask=valid, other=1.0)
    mult = scale
    if GAIN:
        mult = scale * tl.load(gain_ptr).to(tl.float32)
    rms = 1.0 / inv - eps
    # d(inv)/dx = -inv^2 * x / (R * rms); zero rows (rms == 0) have a zero derivative, as in PyTorch.
    coef = tl.where(rms > 0.0, inv * inv * inv_r / tl.where(rms > 0.0, rms, 1.0), 0.0)
    if ONE_PASS:
        r = tl.arange(0, BLOCK_R)
        x = _load_x(x_ptr, x_col, valid, r, R, inner, R_CONTIG)
        g = _incoming_grad(g_ptr, gs_ptr, y_col, valid, r, R, inner, x, inv, R_CONTIG, SILU)
        dot = tl.sum(g * x, axis=0)
        if BLOCK_R2 > 0:
            r2 = BLOCK_R + tl.arange(0, BLOCK_R2)
            x2 = _load_x(x_ptr, x_col, valid, r2, R, inner, R_CONTIG)
            g2 = _incoming_grad(g_ptr, gs_ptr, y_col, valid, r2, R, inner, x2, inv, R_CONTIG, SILU)
            dot += tl.sum(g2 * x2, axis=0)
        _store_dx(dx_ptr, x_col, valid, r, R, inner, g, x, inv * mult, coef * dot * mult, R_CONTIG)
        if BLOCK_R2 > 0:
            _store_dx(dx_ptr, x_col, valid, r2, R, inner, g2, x2, inv * mult, coef * dot * mult, R_CONTIG)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            x = _load_x(x_ptr, x_col, valid, r, R, inner, R_CONTIG)
            acc += _incoming_grad(g_ptr, gs_ptr, y_col, valid, r, R, inner, x, inv, R_CONTIG, SILU) * x
        dot = tl.sum(acc, axis=0)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            x = _load_x(x_ptr, x_col, valid, r, R, inner, R_CONTIG)
            g = _incoming_grad(g_ptr, gs_ptr, y_col, valid, r, R, inner, x, inv, R_CONTIG, SILU)
            _store_dx(dx_ptr, x_col, valid, r, R, inner, g, x, inv * mult, coef * dot * mult, R_CONTIG)
    if GAIN:
        tl.store(dgain_ptr + stat, inv * dot * scale, mask=valid)


# --- configurations --------------------------------------------------------------------------
#
# Block sizes are chosen in bytes: threads move 16-byte vectors, an NCHW tile row (BLOCK_I
# contiguous pixels) spans at least a 32-byte sector and at most a 128-byte line, and a row
# length that is not a power of two is held in registers as two power-of-two chunks
# (576 = 512 + 64) rather than one mostly masked block. Rows too long for the registers take two
# passes (the second read mostly from L2), one row per program when rows are contiguous, so a
# few long rows still spread over many programs.

SECTOR_BYTES = 32
LINE_BYTES = 128
MIN_BLOCK_R = 64
MAX_ONE_PASS_R = 2048  # longest padded row a one-pass configuration holds (EDM2 channel counts <= 1792)
# fp32 values per thread for a tile (forward: x; backward: x and the incoming gradient), nominal and at most.
_PER_THREAD = {False: 16, True: 8}
_PER_THREAD_MAX = {False: 32, True: 16}
MAX_WARPS = 16
# Second chunks: every EDM2 channel count (multiples of 64 such as 192, 320, 576, 640, 1152) pads by < 25%.
_CHUNK_PAIRS = tuple((p, p >> k) for p in (128, 256, 512, 1024) for k in (1, 2, 3) if p >> k >= MIN_BLOCK_R)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _chunks(R: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_R2): the smallest padded row of one or two power-of-two chunks (fewer chunks on ties)."""
    best = (max(MIN_BLOCK_R, _pow2_ceil(R)), 0)
    for a, b in _CHUNK_PAIRS:
        if R <= a + b < sum(best):
            best = (a, b)
    return best


def _blocks(R: int, r_contig: bool, bwd: bool, elsize: int) -> tuple[bool, int, int, int, int]:
    """(ONE_PASS, BLOCK_R, BLOCK_R2, BLOCK_I, num_warps) for rows of length ``R`` of ``elsize``-byte elements.

    Depends on ``R`` only through :func:`_chunks` (and whether the row fits), so :func:`configs` lists
    every outcome."""
    nominal = _PER_THREAD[bwd] * 32 * MAX_WARPS  # tile elements at the nominal load per thread
    most = _PER_THREAD_MAX[bwd] * 32 * MAX_WARPS
    min_i = 1 if r_contig else SECTOR_BYTES // elsize  # NCHW tile rows: whole sectors
    max_i = nominal if r_contig else LINE_BYTES // elsize
    block_r, block_r2 = _chunks(R)
    total = block_r + block_r2
    if total > MAX_ONE_PASS_R or total * min_i > most:  # two passes over chunks of the row
        block_i = min_i if r_contig else max_i
        return False, nominal // block_i, 0, block_i, _warps(nominal, bwd)
    block_i = min(max_i, max(min_i, _pow2_floor(nominal // total)))
    return True, block_r, block_r2, block_i, _warps(total * block_i, bwd)


def _warps(tile: int, bwd: bool) -> int:
    return max(4, min(MAX_WARPS, _pow2_floor(tile // (32 * _PER_THREAD[bwd]))))


def _all_blocks(r_contig: bool, bwd: bool, elsize: int):
    """Every outcome of :func:`_blocks` for these flags."""
    out = []
    for R in sorted({sum(_chunks(r)) for r in range(1, MAX_ONE_PASS_R + 1)}) + [MAX_ONE_PASS_R + 1]:
        b = _blocks(R, r_contig, bwd, elsize)
        if b not in out:
            out.append(b)
    return out


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(r_contig, silu, gain, perm, one_pass, block_r, block_r2, block_i, warps, xd, yd):
    ptrs = dict(x_ptr=xd, y_ptr=yd, s_ptr=yd if silu else xd, inv_ptr="fp32", gain_ptr="fp32" if gain else xd)
    return C.make_config(_normalize_fwd_kernel, ptrs=ptrs, floats=("eps", "inv_sqrt_r", "scale"),
                         constexprs=dict(R_CONTIG=r_contig, SILU=silu, GAIN=gain, PERM=perm, ONE_PASS=one_pass,
                                         BLOCK_R=block_r, BLOCK_R2=block_r2, BLOCK_I=block_i),
                         num_warps=warps, num_stages=1)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _bwd_config(r_contig, silu, gain, perm, one_pass, block_r, block_r2, block_i, warps, xd, gd):
    ptrs = dict(g_ptr=gd, gs_ptr=gd if silu else gd, x_ptr=xd, inv_ptr="fp32", gain_ptr="fp32" if gain else xd,
                dx_ptr=xd, dgain_ptr="fp32" if gain else xd)
    return C.make_config(_normalize_bwd_kernel, ptrs=ptrs, floats=("eps", "inv_r", "scale"),
                         constexprs=dict(R_CONTIG=r_contig, SILU=silu, GAIN=gain, PERM=perm, ONE_PASS=one_pass,
                                         BLOCK_R=block_r, BLOCK_R2=block_r2, BLOCK_I=block_i),
                         num_warps=warps, num_stages=1)


def elsize(*dtypes: torch.dtype) -> int:
    """Bytes of the narrowest element type a launch moves (it sets the vector width)."""
    return min(torch.empty((), dtype=d).element_size() for d in dtypes)


@C.declare_configs
def configs():
    """Normalize / pixel norm (+ MP-SiLU): both layouts, every block choice, every dtype."""
    for d in C.DTYPES:
        for r_contig in (False, True):
            for silu in (False, True):
                for blk in _all_blocks(r_contig, False, elsize(d)):
                    yield _fwd_config(r_contig, silu, False, False, *blk, d, d)
                for blk in _all_blocks(r_contig, True, elsize(d)):
                    yield _bwd_config(r_contig, silu, False, False, *blk, d, d)


# --- launchers -----------------------------------------------------------------------------

def _grid(outer, R, inner, block_i, r_contig):
    if r_contig:
        return (C.cdiv(outer * inner, block_i),), outer * inner, 1
    nib = C.cdiv(inner, block_i)
    return (outer * nib,), inner, nib


def normalize_forward(x3: torch.Tensor, eps: float, silu: bool = False, *, out_dtype=None, scale: float = 1.0,
                      gain: torch.Tensor | None = None, qkv_d: int = 0, blocks=None):
    """Launch the forward kernel on a contiguous ``[outer, R, inner]`` tensor.

    Returns ``(y, s or None, inv)``; ``inv`` is fp32 ``[outer, 1, inner]``. ``qkv_d > 0`` (rows only,
    ``inner == 1``): output row ``head*3*D + j*D + d`` normalizes input row ``head*3*D + 3*d + j``.
    """
    x3 = x3.contiguous()  # no-op on the views the public entry points build
    outer, R, inner = x3.shape
    r_contig = inner == 1
    y = torch.empty(x3.shape, dtype=out_dtype or x3.dtype, device=x3.device)
    s = torch.empty_like(x3) if silu else None
    inv = torch.empty((outer, 1, inner), dtype=torch.float32, device=x3.device)
    blk = blocks or _blocks(R, r_contig, False, elsize(x3.dtype, y.dtype))
    cfg = _fwd_config(r_contig, silu, gain is not None, qkv_d > 0, *blk, x3.dtype, y.dtype)
    grid, inner_arg, nib = _grid(outer, R, inner, blk[3], r_contig)
    C.launch(cfg, grid, x3, y, s if silu else x3, inv, gain if gain is not None else x3, R, inner_arg, nib,
             max(qkv_d, 1), float(eps), 1.0 / math.sqrt(R), float(scale))
    return y, s, inv


def normalize_backward(g: torch.Tensor, gs: torch.Tensor | None, x3: torch.Tensor, inv: torch.Tensor, eps: float,
                       *, scale: float = 1.0, gain: torch.Tensor | None = None, qkv_d: int = 0, blocks=None):
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
    blk = blocks or _blocks(R, r_contig, True, elsize(x3.dtype, g.dtype))
    cfg = _bwd_config(r_contig, gs is not None, gain is not None, qkv_d > 0, *blk, x3.dtype, g.dtype)
    grid, inner_arg, nib = _grid(outer, R, inner, blk[3], r_contig)
    C.launch(cfg, grid, g, gs if gs is not None else g, x3, inv, gain if gain is not None else x3, dx,
             dgain if dgain is not None else x3, R, inner_arg, nib, max(qkv_d, 1), float(eps), 1.0 / R, float(scale))
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


MAX_SLICE_NUMEL = 2 ** 31 - 1  # offsets within one [R, inner] slice are 32-bit


def slice_numel(x: torch.Tensor, dims) -> int:
    """Elements of the largest ``[R, inner]`` slice a launch on ``x`` addresses with 32-bit offsets."""
    if x.numel() <= MAX_SLICE_NUMEL:  # every offset fits: skip the layout analysis
        return x.numel()
    meta = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")  # no copy, whatever the layout
    x3, _ = _row_view(meta, tuple(range(1, x.ndim)) if dims is None else tuple(dims))
    return x3.shape[1] * x3.shape[2]


def supports(x, *args) -> bool:
    """For ``normalize(x, dims, eps)`` and ``pixel_norm[_mp_silu](x, eps)`` (dims = (1,))."""
    dims = args[0] if args and not isinstance(args[0], (int, float)) else (1,)
    return C.supported_dtype(x) and slice_numel(x, dims) <= MAX_SLICE_NUMEL
