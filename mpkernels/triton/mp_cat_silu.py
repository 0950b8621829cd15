"""``mp_cat_mp_silu`` (decoder Block input, spec §2): ``x = mp_cat(a, b)`` and ``y = mp_silu(x)`` in one pass.

The decoder Block reads the concatenation twice: MP-SiLU of it feeds the first convolution and
the concatenation itself feeds the skip convolution (or the residual). Unfused that is three
kernels forward (cat, silu) and backward (silu, the gradient sum of the two uses, cat). Here:

* forward: one launch writes ``x`` (rounded to the dtype, like the reference's ``cat``) and
  ``y = silu(x) / 0.596`` computed from that rounded ``x``;
* backward: one launch reads the gradients of ``x`` and ``y`` and the saved ``x`` and writes
  ``da``, ``db``: ``g = gx + gy * silu'(x) / 0.596`` in fp32, scaled by the cat coefficient.

The ``[M, K]`` view of :mod:`.mp_cat` (one memory order for all tensors): rows ``m``, ``x[m] =
[a[m] * ca | b[m] * cb]``; ``y`` and the gradients share ``x``'s layout. Either gradient may be
absent (flags), so an unused output costs nothing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._library import cat_rows, kernel_op
from . import _common as C
from .mp_cat import BLOCK_KS, TILE, _block_k, supports  # noqa: F401  (supports: same limits)


@triton.jit
def _tile(pid, M, K, n_kblocks, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pm = pid // n_kblocks
    pk = pid % n_kblocks
    row0 = pm.to(tl.int64) * BLOCK_M  # int64 corner, int32 offsets inside the tile (see mp_cat.py)
    col0 = pk.to(tl.int64) * BLOCK_K
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    m_left = tl.minimum(M - row0, BLOCK_M).to(tl.int32)
    k_left = tl.minimum(K - col0, BLOCK_K).to(tl.int32)
    mask = (rows < m_left)[:, None] & (cols < k_left)[None, :]
    return row0, col0, rows, cols, mask


@triton.jit
def _fwd_block(src_ptr, x_ptr, y_ptr, pid, M, K, src_stride, dst_stride, scale, n_kblocks,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    row0, col0, rows, cols, mask = _tile(pid, M, K, n_kblocks, BLOCK_M, BLOCK_K)
    s = tl.load(src_ptr + (row0 * src_stride + col0) + (rows[:, None] * src_stride + cols[None, :]), mask=mask,
                other=0.0)
    x = (s.to(tl.float32) * scale).to(x_ptr.dtype.element_ty)
    xf = x.to(tl.float32)
    y = xf / (1.0 + tl.exp(-xf)) * (1.0 / 0.596)
    off = (row0 * dst_stride + col0) + (rows[:, None] * dst_stride + cols[None, :])
    tl.store(x_ptr + off, x, mask=mask)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mp_cat_silu_fwd_kernel(a_ptr, b_ptr, x_ptr, y_ptr, M, Ka, Kb, K, scale_a, scale_b, n_kblocks_a, n_kblocks_b, n_programs_a,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_programs_a:
        _fwd_block(a_ptr, x_ptr, y_ptr, pid, M, Ka, Ka, K, scale_a, n_kblocks_a, BLOCK_M, BLOCK_K)
    else:
        _fwd_block(b_ptr, x_ptr + Ka, y_ptr + Ka, pid - n_programs_a, M, Kb, Kb, K, scale_b, n_kblocks_b,
                   BLOCK_M, BLOCK_K)


@triton.jit
def _bwd_block(gx_ptr, gy_ptr, x_ptr, d_ptr, pid, M, Kpart, K, d_stride, scale, n_kblocks,
               HAS_GX: tl.constexpr, HAS_GY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    row0, col0, rows, cols, mask = _tile(pid, M, Kpart, n_kblocks, BLOCK_M, BLOCK_K)
    off = (row0 * K + col0) + (rows[:, None] * K + cols[None, :])
    g = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_GX:
        g += tl.load(gx_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_GY:
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-x))
        g += tl.load(gy_ptr + off, mask=mask, other=0.0).to(tl.float32) * (sig * (1.0 + x * (1.0 - sig)) *
                                                                           (1.0 / 0.596))
    doff = (row0 * d_stride + col0) + (rows[:, None] * d_stride + cols[None, :])
    tl.store(d_ptr + doff, (g * scale).to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mp_cat_silu_bwd_kernel(gx_ptr, gy_ptr, x_ptr, da_ptr, db_ptr, M, Ka, Kb, K, scale_a, scale_b, n_kblocks_a, n_kblocks_b,
                n_programs_a, HAS_GX: tl.constexpr, HAS_GY: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_programs_a:
        _bwd_block(gx_ptr, gy_ptr, x_ptr, da_ptr, pid, M, Ka, K, Ka, scale_a, n_kblocks_a, HAS_GX, HAS_GY,
                   BLOCK_M, BLOCK_K)
    else:
        _bwd_block(gx_ptr + Ka, gy_ptr + Ka, x_ptr + Ka, db_ptr, pid - n_programs_a, M, Kb, K, Kb, scale_b,
                   n_kblocks_b, HAS_GX, HAS_GY, BLOCK_M, BLOCK_K)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(d, block_k):
    return C.make_config(_mp_cat_silu_fwd_kernel, ptrs=dict(a_ptr=d, b_ptr=d, x_ptr=d, y_ptr=d), floats=("scale_a", "scale_b"),
                         constexprs=dict(BLOCK_M=TILE // block_k, BLOCK_K=block_k), num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)
def _bwd_config(d, block_k, has_gx, has_gy):
    return C.make_config(_mp_cat_silu_bwd_kernel, ptrs=dict(gx_ptr=d, gy_ptr=d, x_ptr=d, da_ptr=d, db_ptr=d),
                         floats=("scale_a", "scale_b"),
                         constexprs=dict(HAS_GX=has_gx, HAS_GY=has_gy, BLOCK_M=TILE // block_k, BLOCK_K=block_k),
                         num_warps=4, num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        for bk in BLOCK_KS:
            yield _fwd_config(d, bk)
            for has_gx, has_gy in ((True, True), (True, False), (False, True)):
                yield _bwd_config(d, bk, has_gx, has_gy)


def _grid(M: int, Ka: int, Kb: int):
    bk = _block_k(max(Ka, Kb))
    nk_a, nk_b = C.cdiv(Ka, bk), C.cdiv(Kb, bk)
    nm = C.cdiv(M, TILE // bk)
    return bk, nk_a, nk_b, nm * nk_a, nm * (nk_a + nk_b)


def forward(a2: torch.Tensor, b2: torch.Tensor, ca: float, cb: float):
    a2, b2 = a2.contiguous(), b2.contiguous()  # no-ops on the views mp_cat_mp_silu builds
    M, Ka = a2.shape
    Kb = b2.shape[1]
    x = torch.empty((M, Ka + Kb), dtype=a2.dtype, device=a2.device)
    y = torch.empty_like(x)
    bk, nk_a, nk_b, n_a, n = _grid(M, Ka, Kb)
    C.launch(_fwd_config(a2.dtype, bk), (n,), a2, b2, x, y, M, Ka, Kb, Ka + Kb, float(ca), float(cb), nk_a, nk_b,
             n_a)
    return x, y


def backward(gx: torch.Tensor | None, gy: torch.Tensor | None, x: torch.Tensor, ka: int, ca: float, cb: float):
    M, K = x.shape
    kb = K - ka
    da = torch.empty((M, ka), dtype=x.dtype, device=x.device)
    db = torch.empty((M, kb), dtype=x.dtype, device=x.device)
    if gx is None and gy is None:
        return da.zero_(), db.zero_()
    gx = gx.contiguous() if gx is not None else None
    gy = gy.contiguous() if gy is not None else None
    bk, nk_a, nk_b, n_a, n = _grid(M, ka, kb)
    cfg = _bwd_config(x.dtype, bk, gx is not None, gy is not None)
    C.launch(cfg, (n,), gx if gx is not None else x, gy if gy is not None else x, x, da, db, M, ka, kb, K,
             float(ca), float(cb), nk_a, nk_b, n_a)
    return da, db


_fwd_op = kernel_op("triton_mp_cat_mp_silu", "(Tensor a, Tensor b, float ca, float cb) -> (Tensor, Tensor)",
                    impl=forward,
                    fake=lambda a, b, ca, cb: (a.new_empty((a.shape[0], a.shape[1] + b.shape[1])),
                                               a.new_empty((a.shape[0], a.shape[1] + b.shape[1]))))
_bwd_op = kernel_op("triton_mp_cat_mp_silu_backward",
                    "(Tensor? gx, Tensor? gy, Tensor x, int ka, float ca, float cb) -> (Tensor, Tensor)",
                    impl=backward,
                    fake=lambda gx, gy, x, ka, ca, cb: (x.new_empty((x.shape[0], ka)),
                                                        x.new_empty((x.shape[0], x.shape[1] - ka))))


def _setup(ctx, inputs, output):
    ctx.ka = inputs[0].shape[1]
    ctx.ca, ctx.cb = inputs[2], inputs[3]
    ctx.save_for_backward(output[0])
    ctx.set_materialize_grads(False)


def _backward(ctx, gx, gy):
    if gx is None and gy is None:
        return None, None, None, None
    (x,) = ctx.saved_tensors
    da, db = _bwd_op(gx, gy, x, ctx.ka, ctx.ca, ctx.cb)
    return da, db, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def mp_cat_mp_silu(a, b, dim: int, t: float):
    a2, b2, ca, cb, back = cat_rows(a, b, dim, t)
    x2, y2 = _fwd_op(a2, b2, ca, cb)
    return back(x2), back(y2)


register("mp_cat_mp_silu", "triton", mp_cat_mp_silu, devices=("cuda", "cpu") if C.INTERPRET else ("cuda",),
         supports=supports)
