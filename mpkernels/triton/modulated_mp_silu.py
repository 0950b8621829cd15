"""``modulated_mp_silu(y, c) = mp_silu(y * c[:, :, None, None])`` (spec §2 step 3), forward and backward.

``y`` is seen as a contiguous ``[N, P, Q]`` tensor: NCHW gives ``P = C`` channels of ``Q = H*W``
contiguous pixels; channels_last gives ``P = H*W`` pixels of ``Q = C`` contiguous channels (flag
``C_ON_COLS``). Tiles are ``[BLOCK_P, BLOCK_Q]`` along those axes, so both layouts read whole
contiguous runs. ``c`` (a tiny ``[N, C]`` tensor, rows at any stride) is widened to fp32 and used unrounded, and
``dc`` is reduced and returned in fp32; autograd of the widening casts it to ``c``'s dtype.

Backward (``z = y*c``, ``dz = g * silu'(z) / 0.596``): ``dy = dz * c`` and ``dc = sum_{H,W} dz * y``.
Each program reduces its tile over the pixel axis while it walks a range of pixels; when the
pixel axis is split across programs for parallelism, fp32 partial sums go to a small buffer
that a second launch adds up. Saved for backward: ``y`` and ``c`` (both inputs).
"""

from __future__ import annotations

import functools
import torch
import triton
import triton.language as tl

from .._library import kernel_op, with_backward
from . import _common as C


@triton.jit
def _modsilu_fwd_kernel(y_ptr, c_ptr, c_stride, out_ptr, P, Q, n_pblocks, n_qblocks,
                        C_ON_COLS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    pid = tl.program_id(0)
    per_n = n_pblocks * n_qblocks
    n = pid // per_n
    pb = (pid % per_n) // n_qblocks
    qb = pid % n_qblocks
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m = (p < P)[:, None] & (q < Q)[None, :]
    # The tile's corner in int64 (one sample may pass 2^31 elements), offsets within it in int32.
    base = (n.to(tl.int64) * P + pb * BLOCK_P) * Q + qb * BLOCK_Q
    off = tl.arange(0, BLOCK_P)[:, None] * Q + tl.arange(0, BLOCK_Q)[None, :]
    y = tl.load(y_ptr + base + off, mask=m, other=0.0).to(tl.float32)
    if C_ON_COLS:
        cv = tl.load(c_ptr + n * c_stride + q, mask=q < Q, other=0.0).to(tl.float32)
        z = y * cv[None, :]
    else:
        cv = tl.load(c_ptr + n * c_stride + p, mask=p < P, other=0.0).to(tl.float32)
        z = y * cv[:, None]
    out = z / (1.0 + tl.exp(-z)) * (1.0 / 0.596)
    tl.store(out_ptr + base + off, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _modsilu_bwd_kernel(g_ptr, y_ptr, c_ptr, c_stride, dy_ptr, dc_ptr, N, P, Q, n_blocks, n_splits, split_len,
                        C_ON_COLS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Program (n, block of channels, split of pixels); fp32 dc partials at dc_ptr[split, n, channel]."""
    pid = tl.program_id(0)
    per_n = n_blocks * n_splits
    n = pid // per_n
    b = (pid % per_n) // n_splits
    s = pid % n_splits
    # Pointers to tile corners advance in int64 (one sample may pass 2^31 elements); offsets
    # within a tile are int32 (supports() bounds them).
    base = n.to(tl.int64) * P * Q
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    lo = s * split_len
    rp = tl.arange(0, BLOCK_P)
    rq = tl.arange(0, BLOCK_Q)
    tile = rp[:, None] * Q + rq[None, :]
    if C_ON_COLS:  # channels along q, pixels along p (channels_last)
        q = b * BLOCK_Q + rq
        cv = tl.load(c_ptr + n * c_stride + q, mask=q < Q, other=0.0).to(tl.float32)
        hi = tl.minimum(lo + split_len, P)
        base += b * BLOCK_Q
        for p0 in range(lo, hi, BLOCK_P):
            m = (p0 + rp < hi)[:, None] & (q < Q)[None, :]
            corner = base + tl.cast(p0, tl.int64) * Q  # p0: an int in the interpreter
            g = tl.load(g_ptr + corner + tile, mask=m, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + corner + tile, mask=m, other=0.0).to(tl.float32)
            z = y * cv[None, :]
            sig = 1.0 / (1.0 + tl.exp(-z))
            dz = g * (sig * (1.0 + z * (1.0 - sig)) * (1.0 / 0.596))
            tl.store(dy_ptr + corner + tile, (dz * cv[None, :]).to(dy_ptr.dtype.element_ty), mask=m)
            acc += dz * y
        dc = tl.sum(acc, axis=0)
        ch = q
        chmask = q < Q
        n_ch = Q
    else:  # channels along p, pixels along q (NCHW)
        p = b * BLOCK_P + rp
        cv = tl.load(c_ptr + n * c_stride + p, mask=p < P, other=0.0).to(tl.float32)
        hi = tl.minimum(lo + split_len, Q)
        base += (b * BLOCK_P).to(tl.int64) * Q
        for q0 in range(lo, hi, BLOCK_Q):
            m = (p < P)[:, None] & (q0 + rq < hi)[None, :]
            corner = base + q0
            g = tl.load(g_ptr + corner + tile, mask=m, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + corner + tile, mask=m, other=0.0).to(tl.float32)
            z = y * cv[:, None]
            sig = 1.0 / (1.0 + tl.exp(-z))
            dz = g * (sig * (1.0 + z * (1.0 - sig)) * (1.0 / 0.596))
            tl.store(dy_ptr + corner + tile, (dz * cv[:, None]).to(dy_ptr.dtype.element_ty), mask=m)
            acc += dz * y
        dc = tl.sum(acc, axis=1)
        ch = p
        chmask = p < P
        n_ch = P
    tl.store(dc_ptr + s.to(tl.int64) * N * n_ch + n * n_ch + ch, dc, mask=chmask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, n, n_splits, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i] (fp32)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(part_ptr + s * n + i, mask=m, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=m)


TILE = 4096
NUM_WARPS = 8
BLOCK_QS = (16, 64, 256)
TARGET_PROGRAMS = 1024  # enough programs to fill a large GPU several times over
SUM_BLOCK = 1024


def _tile(Q: int, c_on_cols: bool) -> tuple[int, int]:
    cap = 64 if c_on_cols else 256  # channels_last: 64 divides every EDM2 width
    bq = next(b for b in BLOCK_QS if b >= min(Q, cap))
    return TILE // bq, bq


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(d, c_on_cols, bq):
    return C.make_config(_modsilu_fwd_kernel, ptrs=dict(y_ptr=d, c_ptr="fp32", out_ptr=d),
                         constexprs=dict(C_ON_COLS=c_on_cols, BLOCK_P=TILE // bq, BLOCK_Q=bq),
                         num_warps=NUM_WARPS, num_stages=1)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _bwd_config(d, c_on_cols, bq):
    return C.make_config(_modsilu_bwd_kernel,
                         ptrs=dict(g_ptr=d, y_ptr=d, c_ptr="fp32", dy_ptr=d, dc_ptr="fp32"),
                         constexprs=dict(C_ON_COLS=c_on_cols, BLOCK_P=TILE // bq, BLOCK_Q=bq),
                         num_warps=NUM_WARPS, num_stages=1)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _sum_config():
    return C.make_config(_sum_partials_kernel, ptrs=dict(part_ptr="fp32", out_ptr="fp32"),
                         constexprs=dict(BLOCK=SUM_BLOCK), num_warps=4, num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        for c_on_cols in (False, True):
            for bq in BLOCK_QS:
                if c_on_cols and bq > 64:
                    continue
                yield _fwd_config(d, c_on_cols, bq)
                yield _bwd_config(d, c_on_cols, bq)
    yield _sum_config()


def _view(y: torch.Tensor):
    """(N, P, Q, c_on_cols) for a dense y that is NCHW- or channels_last-contiguous."""
    n, ch, h, w = y.shape
    if y.is_contiguous():
        return n, ch, h * w, False
    return n, h * w, ch, True


def modsilu_forward(y, c):
    N, P, Q, c_on_cols = _view(y)
    bp, bq = _tile(Q, c_on_cols)
    out = C.empty_like_dense(y)
    npb, nqb = C.cdiv(P, bp), C.cdiv(Q, bq)
    C.launch(_fwd_config(y.dtype, c_on_cols, bq), (N * npb * nqb,), y, c, c.stride(0), out, P, Q, npb, nqb)
    return out


def modsilu_backward(g, y, c):
    g = C.like(g, y)
    N, P, Q, c_on_cols = _view(y)
    bp, bq = _tile(Q, c_on_cols)
    n_blocks = C.cdiv(Q, bq) if c_on_cols else C.cdiv(P, bp)
    loop_len, loop_block = (P, bp) if c_on_cols else (Q, bq)
    splits = max(1, min(C.cdiv(loop_len, loop_block), C.cdiv(TARGET_PROGRAMS, N * n_blocks)))
    split_len = C.cdiv(C.cdiv(loop_len, splits), loop_block) * loop_block
    splits = C.cdiv(loop_len, split_len)
    dy = C.empty_like_dense(y)
    n_ch = y.shape[1]
    dc = torch.empty((N, n_ch), dtype=torch.float32, device=y.device)
    # One split: the kernel's partial sums are dc itself; several: a second launch adds them up.
    part = dc if splits == 1 else torch.empty((splits, N, n_ch), dtype=torch.float32, device=y.device)
    C.launch(_bwd_config(y.dtype, c_on_cols, bq), (N * n_blocks * splits,), g, y, c, c.stride(0), dy, part, N, P, Q,
             n_blocks, splits, split_len)
    if splits > 1:
        C.launch(_sum_config(), (C.cdiv(N * n_ch, SUM_BLOCK),), part, dc, N * n_ch, splits)
    return dy, dc


_fwd_op = kernel_op("triton_modulated_mp_silu", "(Tensor y, Tensor c) -> Tensor", impl=modsilu_forward,
                    fake=lambda y, c: torch.empty_like(y))
_bwd_op = kernel_op("triton_modulated_mp_silu_backward", "(Tensor g, Tensor y, Tensor c) -> (Tensor, Tensor)",
                    impl=modsilu_backward, fake=lambda g, y, c: (torch.empty_like(y), torch.empty_like(c)))
with_backward(_fwd_op, _bwd_op, num_outputs=1, saved_inputs=(0, 1), grads_for=(0, 1))


def modulated_mp_silu(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    if not (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)):
        y = y.contiguous()
    c = c.float()
    if c.stride(1) != 1 and c.shape[1] != 1:  # rows may be strided (a Block's columns of all the c's)
        c = c.contiguous()
    return _fwd_op(y, c)


def _fits_int32(y) -> bool:
    """Offsets within a tile (``BLOCK_P`` rows of ``Q``) and pixel/channel indices fit int32."""
    n, ch, h, w = y.shape
    c_on_cols = not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
    p, q = (h * w, ch) if c_on_cols else (ch, h * w)
    bp, _ = _tile(q, c_on_cols)
    return (bp + 1) * q < 2 ** 31 and max(p, q) < 2 ** 31 - TILE


def supports(y, c) -> bool:
    return C.supported_dtype(y, c) and _fits_int32(y)
