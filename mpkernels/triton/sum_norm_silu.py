"""``mp_sum_clip_pixel_norm_mp_silu`` (encoder Block boundary, spec §2): ``s = mp_sum_clip(x, y, t, clip)``
then ``n, h = pixel_norm_mp_silu(s)``, in one launch each way.

In the encoder ``s`` has two uses: it is a skip connection (its gradient comes from the decoder)
and the next Block's input (pixel norm ``n`` and its MP-SiLU ``h``). Unfused that is two kernels
forward (:mod:`.mp_sum`, :mod:`.normalize`) and three backward (pixel norm, the gradient sum of
the two uses of ``s``, the sum's). Here:

* forward: one launch reads ``x``, ``y`` and writes ``s`` (``lerp`` as :mod:`.mp_sum`, clipped,
  rounded to the dtype exactly as ``mp_sum_clip`` stores it), ``n = s * inv`` and
  ``h = silu(n) / 0.596`` computed in fp32 from the *rounded* ``s`` (as :mod:`.normalize` computes
  from its stored input), the fp32 per-pixel ``inv = 1 / (eps + ||s|| / sqrt(C))`` and the clip mask;
* backward: one launch reads ``g_s``, ``g_n``, ``g_h`` (any may be absent), the saved ``s``,
  ``inv`` and mask and writes ``dx``, ``dy``: ``g = g_s + dpixel_norm_mp_silu(g_n, g_h)`` in fp32 (not
  rounded to the dtype in between, unlike the unfused sequence), then
  ``dx = g * keep * (1-t) * scale``, ``dy = g * keep * t * scale``, each rounded once.

Layout: :mod:`.normalize`'s contiguous ``[outer, C, inner]`` view of ``x`` (NCHW: ``inner = H*W``;
channels_last: ``inner = 1``, rows of ``C`` channels), ``y`` copied into ``x``'s layout only when
it differs; tiles, block sizes and the reduction order are :mod:`.normalize`'s, so ``n`` and ``h``
are bit for bit what ``pixel_norm_mp_silu(s)`` gives on this backend, except where this kernel's
tiles are capped (:func:`_blocks`: NCHW one-pass rows of 1537-2048 fp32 or 769-1024 16-bit values
forward, 769-1024 fp32 or 385-512 16-bit values backward, and every two-pass tile, take smaller
tiles, which would otherwise spill): there only the fp32 reduction order differs.

Clip mask: the bit mask of :mod:`.mp_sum` (1 where ``-clip <= sum <= clip`` for the unrounded fp32
sum, 0 for NaN), packed along the contiguous axis of the view so that a tile packs whole bytes:
NCHW ``mask[o, c, i // 8]`` bit ``i % 8`` (``BLOCK_I`` is a multiple of 8), channels_last
``mask[row, c // 8]`` bit ``c % 8`` (chunks of channels start at multiples of 64). Without
clipping no mask is written or read.

Gradient presence and clipping in backward are runtime flags (0/1 ints, not constexprs): every
combination shares one compiled kernel per block choice, and a real launch with a flag of 1 is
specialised to a constant by Triton's JIT anyway (the EDM2 encoder always passes all three
gradients and clips).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._library import kernel_op
from . import _common as C
from . import normalize as N
from .mp_sum import _coefs


@triton.jit
def _tile(pid, R, inner, num_iblocks, mstride, R_CONTIG: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's tile (as :func:`normalize._columns` without PERM): int64 element base, [BLOCK_I]
    column offsets, number of valid columns, statistic indices, and the int64 base of its mask bytes."""
    il = tl.arange(0, BLOCK_I)
    if R_CONTIG:  # rows of R channels; inner = number of rows
        row0 = pid.to(tl.int64) * BLOCK_I
        base = row0 * R
        n_cols = tl.minimum(inner - row0, BLOCK_I).to(tl.int32)
        col = il * R
        stat = row0 + il
        mbase = row0 * mstride
    else:  # [outer, R, inner], inner contiguous
        o = pid // num_iblocks
        i0 = (pid % num_iblocks) * BLOCK_I
        base = o.to(tl.int64) * R * inner + i0
        n_cols = tl.minimum(inner - i0, BLOCK_I).to(tl.int32)
        col = il
        stat = o.to(tl.int64) * inner + i0 + il
        mbase = o.to(tl.int64) * R * mstride + i0 // 8
    return base, col, il < n_cols, n_cols, stat, mbase


@triton.jit
def _sum_chunk(p_ptr, q_ptr, s_ptr, mask_ptr, col, valid, n_cols, r0, R, inner, mstride, w, scale, clip,
               STORE: tl.constexpr, R_CONTIG: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
               BLOCK_I: tl.constexpr):
    """s for channels ``r0 + [0, BLOCK)`` of the tile (``r0`` a multiple of 8), rounded to the dtype and
    returned in fp32 (0 in masked lanes); with STORE also writes s and the clip bits."""
    r = r0 + tl.arange(0, BLOCK)
    off = N._offsets(col, r, inner, R_CONTIG)
    m = (r < R)[:, None] & valid[None, :]
    p = tl.load(p_ptr + off, mask=m, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + off, mask=m, other=0.0).to(tl.float32)
    s = (p + w * (q - p)) * scale  # mp_sum's lerp
    if CLIP:
        if STORE:
            keep = ((s >= -clip) & (s <= clip)).to(tl.int32)  # 0 for NaN, as clamp's backward
            if R_CONTIG:  # pack 8 channels of a row per byte
                bits = tl.sum(tl.reshape(keep, [BLOCK // 8, 8, BLOCK_I]) << tl.arange(0, 8)[None, :, None], axis=1)
                rb = tl.arange(0, BLOCK // 8)
                moff = (tl.arange(0, BLOCK_I) * mstride)[None, :] + (r0 // 8 + rb)[:, None]
                bm = (r0 + rb * 8 < R)[:, None] & valid[None, :]
            else:  # pack 8 pixels of a channel per byte
                bits = tl.sum(tl.reshape(keep, [BLOCK, BLOCK_I // 8, 8]) << tl.arange(0, 8)[None, None, :], axis=2)
                ib = tl.arange(0, BLOCK_I // 8)
                moff = (r * mstride)[:, None] + ib[None, :]
                bm = (r < R)[:, None] & (ib * 8 < n_cols)[None, :]
            tl.store(mask_ptr + moff, bits.to(tl.uint8), mask=bm)
        s = tl.clamp(s, -clip, clip, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN (see mp_sum.py)
    s = s.to(s_ptr.dtype.element_ty)  # s as mp_sum_clip stores it
    if STORE:
        tl.store(s_ptr + off, s, mask=m)
    return s.to(tl.float32)


@triton.jit
def _sum_norm_silu_fwd_kernel(p_ptr, q_ptr, s_ptr, n_ptr, h_ptr, inv_ptr, mask_ptr, R, inner, num_iblocks, mstride,
                              w, scale, clip, eps, inv_sqrt_r, R_CONTIG: tl.constexpr, CLIP: tl.constexpr,
                              ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_R2: tl.constexpr,
                              BLOCK_I: tl.constexpr):
    """s = clip(lerp(p, q, w) * scale) rounded; n = s * inv, h = silu(n) / 0.596 from the rounded s; inv saved."""
    pid = tl.program_id(0)
    base, col, valid, n_cols, stat, mbase = _tile(pid, R, inner, num_iblocks, mstride, R_CONTIG, BLOCK_I)
    p_ptr += base
    q_ptr += base
    s_ptr += base
    n_ptr += base
    h_ptr += base
    mask_ptr += mbase
    if ONE_PASS:  # the row in registers as one or two chunks (see normalize.py)
        r = tl.arange(0, BLOCK_R)
        s = _sum_chunk(p_ptr, q_ptr, s_ptr, mask_ptr, col, valid, n_cols, 0, R, inner, mstride, w, scale, clip,
                       True, R_CONTIG, CLIP, BLOCK_R, BLOCK_I)
        ss = tl.sum(s * s, axis=0)
        if BLOCK_R2 > 0:
            r2 = BLOCK_R + tl.arange(0, BLOCK_R2)
            s2 = _sum_chunk(p_ptr, q_ptr, s_ptr, mask_ptr, col, valid, n_cols, BLOCK_R, R, inner, mstride, w, scale,
                            clip, True, R_CONTIG, CLIP, BLOCK_R2, BLOCK_I)
            ss += tl.sum(s2 * s2, axis=0)
        inv = 1.0 / (eps + tl.sqrt(ss) * inv_sqrt_r)
        N._store_y(n_ptr, h_ptr, col, valid, r, R, inner, s, inv, R_CONTIG, True)
        if BLOCK_R2 > 0:
            N._store_y(n_ptr, h_ptr, col, valid, r2, R, inner, s2, inv, R_CONTIG, True)
    else:  # first pass: s, the mask and the sum of squares; second: s again from x, y (no re-read of s)
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            s = _sum_chunk(p_ptr, q_ptr, s_ptr, mask_ptr, col, valid, n_cols, r0, R, inner,
                           mstride, w, scale, clip, True, R_CONTIG, CLIP, BLOCK_R, BLOCK_I)
            acc += s * s
        inv = 1.0 / (eps + tl.sqrt(tl.sum(acc, axis=0)) * inv_sqrt_r)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            s = _sum_chunk(p_ptr, q_ptr, s_ptr, mask_ptr, col, valid, n_cols, r0, R, inner, mstride, w, scale, clip,
                           False, R_CONTIG, CLIP, BLOCK_R, BLOCK_I)
            N._store_y(n_ptr, h_ptr, col, valid, r, R, inner, s, inv, R_CONTIG, True)
    tl.store(inv_ptr + stat, inv, mask=valid)


@triton.jit
def _norm_grad(gn_ptr, gh_ptr, off, m, x, inv, has_gn, has_gh):
    """Gradient reaching n = x * inv (fp32): g_n + g_h * d/dn [silu(n) / 0.596]; each part only when present."""
    g = tl.zeros(x.shape, dtype=tl.float32)
    if has_gn != 0:
        g += tl.load(gn_ptr + off, mask=m, other=0.0).to(tl.float32)
    if has_gh != 0:
        y = x * inv[None, :]
        sig = 1.0 / (1.0 + tl.exp(-y))
        g += tl.load(gh_ptr + off, mask=m, other=0.0).to(tl.float32) * (sig * (1.0 + y * (1.0 - sig)) *
                                                                       (1.0 / 0.596))
    return g


@triton.jit
def _store_dxy(gs_ptr, mask_ptr, dx_ptr, dy_ptr, off, m, r, il, mstride, g, x, inv, b, ca, cb, has_gs, clip_on,
               R_CONTIG: tl.constexpr):
    """g_s + pixel-norm gradient (``g * inv - x * b``) in fp32, masked where the clamp cut, scaled per input."""
    d = g * inv[None, :] - x * b[None, :]
    if has_gs != 0:
        d += tl.load(gs_ptr + off, mask=m, other=0.0).to(tl.float32)
    if clip_on != 0:  # the gradient passes where clamp's would (bit set in the forward's mask)
        if R_CONTIG:
            bits = tl.load(mask_ptr + ((il * mstride)[None, :] + (r // 8)[:, None]), mask=m, other=0)
            keep = (bits.to(tl.int32) >> (r % 8)[:, None]) & 1
        else:
            bits = tl.load(mask_ptr + ((r * mstride)[:, None] + (il // 8)[None, :]), mask=m, other=0)
            keep = (bits.to(tl.int32) >> (il % 8)[None, :]) & 1
        d = tl.where(keep != 0, d, 0.0)
    tl.store(dx_ptr + off, (d * ca).to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dy_ptr + off, (d * cb).to(dy_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sum_norm_silu_bwd_kernel(gs_ptr, gn_ptr, gh_ptr, s_ptr, inv_ptr, mask_ptr, dx_ptr, dy_ptr, R, inner,
                              num_iblocks, mstride, eps, inv_r, ca, cb, has_gs, has_gn, has_gh, clip_on,
                              R_CONTIG: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_R2: tl.constexpr, BLOCK_I: tl.constexpr):
    """dx, dy = (g_s + inv*G - s * inv^2 <G, s> / (R*rms)) * keep * (ca, cb), G the gradient reaching n."""
    pid = tl.program_id(0)
    base, col, valid, n_cols, stat, mbase = _tile(pid, R, inner, num_iblocks, mstride, R_CONTIG, BLOCK_I)
    gs_ptr += base
    gn_ptr += base
    gh_ptr += base
    s_ptr += base
    dx_ptr += base
    dy_ptr += base
    mask_ptr += mbase
    il = tl.arange(0, BLOCK_I)
    inv = tl.load(inv_ptr + stat, mask=valid, other=1.0)
    rms = 1.0 / inv - eps
    # d(inv)/ds = -inv^2 * s / (R * rms); zero rows (rms == 0) have a zero derivative, as in PyTorch.
    coef = tl.where(rms > 0.0, inv * inv * inv_r / tl.where(rms > 0.0, rms, 1.0), 0.0)
    if ONE_PASS:
        r = tl.arange(0, BLOCK_R)
        off = N._offsets(col, r, inner, R_CONTIG)
        m = (r < R)[:, None] & valid[None, :]
        x = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
        g = _norm_grad(gn_ptr, gh_ptr, off, m, x, inv, has_gn, has_gh)
        dot = tl.sum(g * x, axis=0)
        if BLOCK_R2 > 0:
            r2 = BLOCK_R + tl.arange(0, BLOCK_R2)
            off2 = N._offsets(col, r2, inner, R_CONTIG)
            m2 = (r2 < R)[:, None] & valid[None, :]
            x2 = tl.load(s_ptr + off2, mask=m2, other=0.0).to(tl.float32)
            g2 = _norm_grad(gn_ptr, gh_ptr, off2, m2, x2, inv, has_gn, has_gh)
            dot += tl.sum(g2 * x2, axis=0)
        _store_dxy(gs_ptr, mask_ptr, dx_ptr, dy_ptr, off, m, r, il, mstride, g, x, inv, coef * dot, ca, cb, has_gs,
                   clip_on, R_CONTIG)
        if BLOCK_R2 > 0:
            _store_dxy(gs_ptr, mask_ptr, dx_ptr, dy_ptr, off2, m2, r2, il, mstride, g2, x2, inv, coef * dot, ca, cb,
                       has_gs, clip_on, R_CONTIG)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            off = N._offsets(col, r, inner, R_CONTIG)
            m = (r < R)[:, None] & valid[None, :]
            x = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
            acc += _norm_grad(gn_ptr, gh_ptr, off, m, x, inv, has_gn, has_gh) * x
        dot = tl.sum(acc, axis=0)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            off = N._offsets(col, r, inner, R_CONTIG)
            m = (r < R)[:, None] & valid[None, :]
            x = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
            g = _norm_grad(gn_ptr, gh_ptr, off, m, x, inv, has_gn, has_gh)
            _store_dxy(gs_ptr, mask_ptr, dx_ptr, dy_ptr, off, m, r, il, mstride, g, x, inv, coef * dot, ca, cb,
                       has_gs, clip_on, R_CONTIG)


# --- configurations: normalize.py's block choices (same tiles, same reduction order) -----------

@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(d, r_contig, clip, one_pass, block_r, block_r2, block_i, warps):
    return C.make_config(_sum_norm_silu_fwd_kernel,
                         ptrs=dict(p_ptr=d, q_ptr=d, s_ptr=d, n_ptr=d, h_ptr=d, inv_ptr="fp32", mask_ptr="u8"),
                         floats=("w", "scale", "clip", "eps", "inv_sqrt_r"),
                         constexprs=dict(R_CONTIG=r_contig, CLIP=clip, ONE_PASS=one_pass, BLOCK_R=block_r,
                                         BLOCK_R2=block_r2, BLOCK_I=block_i),
                         num_warps=warps, num_stages=1)


@functools.lru_cache(maxsize=None)
def _bwd_config(d, r_contig, one_pass, block_r, block_r2, block_i, warps):
    return C.make_config(_sum_norm_silu_bwd_kernel,
                         ptrs=dict(gs_ptr=d, gn_ptr=d, gh_ptr=d, s_ptr=d, inv_ptr="fp32", mask_ptr="u8", dx_ptr=d,
                                   dy_ptr=d),
                         floats=("eps", "inv_r", "ca", "cb"),
                         constexprs=dict(R_CONTIG=r_contig, ONE_PASS=one_pass, BLOCK_R=block_r, BLOCK_R2=block_r2,
                                         BLOCK_I=block_i),
                         num_warps=warps, num_stages=1)


# Tiles: normalize.py's, capped in values per thread, since this kernel does more per value (the sum and
# the clip bits forward; g_s and two gradients backward). Past the caps ptxas spills at 128 registers
# (sm_80 or sm_90, some variants). A one-pass tile over the cap takes the two-pass configuration, a
# two-pass one halves BLOCK_R. Only the fp32 reduction order changes (allowed: same math).
_MAX_ONE_PASS_PER_THREAD = {False: 24, True: 12}  # forward, backward
_MAX_TWO_PASS_PER_THREAD = {False: 8, True: 16}


def _per_thread(blk) -> int:
    one_pass, block_r, block_r2, block_i, warps = blk
    return (block_r + block_r2) * block_i // (32 * warps)


def _capped(blk, r_contig: bool, bwd: bool, elsize: int):
    if blk[0] and _per_thread(blk) > _MAX_ONE_PASS_PER_THREAD[bwd]:
        blk = N._blocks(N.MAX_ONE_PASS_R + 1, r_contig, bwd, elsize)
    while not blk[0] and _per_thread(blk) > _MAX_TWO_PASS_PER_THREAD[bwd]:
        blk = (False, blk[1] // 2, 0, blk[3], blk[4])
    return blk


def _blocks(R: int, r_contig: bool, bwd: bool, elsize: int) -> tuple[bool, int, int, int, int]:
    """(ONE_PASS, BLOCK_R, BLOCK_R2, BLOCK_I, num_warps) for rows of length ``R``."""
    return _capped(N._blocks(R, r_contig, bwd, elsize), r_contig, bwd, elsize)


def _all_blocks(r_contig: bool, bwd: bool, elsize: int):
    """Every outcome of :func:`_blocks` for these flags."""
    out = []
    for b in N._all_blocks(r_contig, bwd, elsize):
        b = _capped(b, r_contig, bwd, elsize)
        if b not in out:
            out.append(b)
    return out


@C.declare_configs
def configs():
    """Both layouts, every block choice of normalize.py, every dtype; forward with and without clipping."""
    for d in C.DTYPES:
        for r_contig in (False, True):
            for blk in _all_blocks(r_contig, False, N.elsize(d)):
                for clip in (False, True):
                    yield _fwd_config(d, r_contig, clip, *blk)
            for blk in _all_blocks(r_contig, True, N.elsize(d)):
                yield _bwd_config(d, r_contig, *blk)


# --- launchers ---------------------------------------------------------------------------------

def _mask_shape(outer: int, R: int, inner: int, clip: float) -> tuple[int, ...]:
    """One bit per element, packed along the view's contiguous axis (module docstring); none without clipping."""
    if clip <= 0:
        return (0,)
    return (outer, C.cdiv(R, 8)) if inner == 1 else (outer, R, C.cdiv(inner, 8))


def forward(x3: torch.Tensor, y3: torch.Tensor, t: float, clip: float, eps: float):
    """``(s, n, h, inv, mask)`` of contiguous ``[outer, R, inner]`` tensors ``x3``, ``y3``; ``clip <= 0``: none."""
    x3, y3 = x3.contiguous(), y3.contiguous()  # no-ops on the views mp_sum_clip_pixel_norm_mp_silu builds
    outer, R, inner = x3.shape
    r_contig = inner == 1
    s = torch.empty_like(x3)
    n = torch.empty_like(x3)
    h = torch.empty_like(x3)
    inv = torch.empty((outer, 1, inner), dtype=torch.float32, device=x3.device)
    mask = torch.empty(_mask_shape(outer, R, inner, clip), dtype=torch.uint8, device=x3.device)
    mstride = mask.shape[-1] if clip > 0 else 0
    scale = 1.0 / math.sqrt((1 - t) ** 2 + t ** 2)
    p, q, w = (x3, y3, t) if t < 0.5 else (y3, x3, 1.0 - t)  # torch.lerp's two formulas, as mp_sum
    blk = _blocks(R, r_contig, False, N.elsize(x3.dtype))
    grid, inner_arg, nib = N._grid(outer, R, inner, blk[3], r_contig)
    C.launch(_fwd_config(x3.dtype, r_contig, clip > 0, *blk), grid, p, q, s, n, h, inv, mask, R, inner_arg, nib,
             mstride, float(w), scale, float(clip), float(eps), 1.0 / math.sqrt(R))
    return s, n, h, inv, mask


def backward(gs: torch.Tensor | None, gn: torch.Tensor | None, gh: torch.Tensor | None, s3: torch.Tensor,
             inv: torch.Tensor, mask: torch.Tensor, t: float, eps: float):
    """``(dx, dy)`` as ``[outer, R, inner]`` tensors; ``mask`` empty: no clipping."""
    outer, R, inner = s3.shape
    r_contig = inner == 1
    dx = torch.empty_like(s3)
    dy = torch.empty_like(s3)
    if gs is None and gn is None and gh is None:
        return dx.zero_(), dy.zero_()
    gs, gn, gh = (g.contiguous() if g is not None else None for g in (gs, gn, gh))
    ca, cb = _coefs(t)
    clip_on = mask.numel() > 0
    blk = _blocks(R, r_contig, True, N.elsize(s3.dtype))
    grid, inner_arg, nib = N._grid(outer, R, inner, blk[3], r_contig)
    C.launch(_bwd_config(s3.dtype, r_contig, *blk), grid, gs if gs is not None else s3, gn if gn is not None else s3,
             gh if gh is not None else s3, s3, inv, mask, dx, dy, R, inner_arg, nib,
             mask.shape[-1] if clip_on else 0, float(eps), 1.0 / R, ca, cb, int(gs is not None), int(gn is not None),
             int(gh is not None), int(clip_on))
    return dx, dy


def _fwd_fake(x3, y3, t, clip, eps):
    outer, R, inner = x3.shape
    return (x3.new_empty(x3.shape), x3.new_empty(x3.shape), x3.new_empty(x3.shape),
            x3.new_empty((outer, 1, inner), dtype=torch.float32),
            x3.new_empty(_mask_shape(outer, R, inner, clip), dtype=torch.uint8))


_fwd_op = kernel_op("triton_mp_sum_clip_pixel_norm_mp_silu",
                    "(Tensor x, Tensor y, float t, float clip, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                    impl=forward, fake=_fwd_fake)
_bwd_op = kernel_op("triton_mp_sum_clip_pixel_norm_mp_silu_backward",
                    "(Tensor? gs, Tensor? gn, Tensor? gh, Tensor s, Tensor inv, Tensor mask, float t, float eps) "
                    "-> (Tensor, Tensor)",
                    impl=backward,
                    fake=lambda gs, gn, gh, s, inv, mask, t, eps: (s.new_empty(s.shape), s.new_empty(s.shape)))


def _setup(ctx, inputs, output):
    ctx.t, ctx.eps = inputs[2], inputs[4]
    ctx.save_for_backward(output[0], output[3], output[4])
    ctx.mark_non_differentiable(output[3], output[4])
    ctx.set_materialize_grads(False)  # an absent gradient costs nothing (flags); the statistics never get one


def _backward(ctx, gs, gn, gh, _g_inv, _g_mask):
    if gs is None and gn is None and gh is None:
        return None, None, None, None, None
    s, inv, mask = ctx.saved_tensors
    dx, dy = _bwd_op(gs, gn, gh, s, inv, mask, ctx.t, ctx.eps)
    return dx, dy, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def mp_sum_clip_pixel_norm_mp_silu(x, y, t: float, clip: float | None, eps: float = 1e-4):
    x = C.dense(x)
    y = C.like(y, x)  # x's memory order, so that both have the same [outer, C, inner] view
    x3, back = N._row_view(x, (1,))
    y3, _ = N._row_view(y, (1,))
    s3, n3, h3, _, _ = _fwd_op(x3, y3, t, float(clip) if clip is not None else 0.0, eps)
    return back(s3), back(n3), back(h3)


def supports(x, y, *args, **kwargs) -> bool:
    return C.supported_dtype(x, y) and N.slice_numel(x, (1,)) <= N.MAX_SLICE_NUMEL


register("mp_sum_clip_pixel_norm_mp_silu", "triton", mp_sum_clip_pixel_norm_mp_silu,
         devices=("cuda", "cpu") if C.INTERPRET else ("cuda",), supports=supports)
