"""``mp_cat`` (spec §1): magnitude-preserving concatenation, forward and backward.

``out = cat([a * ca, b * cb], dim)`` with ``ca = C/sqrt(Na)*(1-t)``, ``cb = C/sqrt(Nb)*t``,
``C = sqrt((Na+Nb)/((1-t)^2+t^2))``.

``a``, ``b`` and ``out`` share one memory order of their dims (``a``'s; ``b`` is copied into it
only when it differs). In that order every tensor is a row-major ``[M, K]`` matrix, ``M`` the
product of the dims before ``dim`` and ``K`` that of ``dim`` and the dims after it, so that
``out[m] = [a[m] * ca | b[m] * cb]`` (NCHW, dim 1: ``M = N``, ``K = C*H*W``; channels_last:
``M = N*H*W``, ``K = C``). One kernel copies two scaled ``[M, K]`` blocks between matrices of
different row strides; the forward gathers ``a`` and ``b`` into ``out``, the backward scatters
``g`` back into ``da`` and ``db``, one launch each. Nothing is saved for backward.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._library import cat_rows, kernel_op
from . import _common as C


@triton.jit
def _copy_block(src_ptr, dst_ptr, pid, M, K, src_stride, dst_stride, scale, n_kblocks,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pm = pid // n_kblocks
    pk = pid % n_kblocks
    # The tile's corner in int64 (a row may hold most of a sample: row * stride passes 2^31); the
    # offsets within the tile stay int32 (supports() bounds them by the row length).
    row0 = pm.to(tl.int64) * BLOCK_M
    col0 = pk.to(tl.int64) * BLOCK_K
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    m_left = tl.minimum(M - row0, BLOCK_M).to(tl.int32)
    k_left = tl.minimum(K - col0, BLOCK_K).to(tl.int32)
    m = (rows < m_left)[:, None] & (cols < k_left)[None, :]
    x = tl.load(src_ptr + (row0 * src_stride + col0) + (rows[:, None] * src_stride + cols[None, :]), mask=m,
                other=0.0)
    y = x.to(tl.float32) * scale
    tl.store(dst_ptr + (row0 * dst_stride + col0) + (rows[:, None] * dst_stride + cols[None, :]),
             y.to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mp_cat_kernel(src1_ptr, dst1_ptr, src2_ptr, dst2_ptr, M, K1, K2, src1_stride, dst1_stride, src2_stride,
                   dst2_stride, scale1, scale2, n_kblocks1, n_kblocks2, n_programs1,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Two scaled block copies in one launch: programs [0, n_programs1) do block 1, the rest block 2."""
    pid = tl.program_id(0)
    if pid < n_programs1:
        _copy_block(src1_ptr, dst1_ptr, pid, M, K1, src1_stride, dst1_stride, scale1, n_kblocks1, BLOCK_M, BLOCK_K)
    else:
        _copy_block(src2_ptr, dst2_ptr, pid - n_programs1, M, K2, src2_stride, dst2_stride, scale2, n_kblocks2,
                    BLOCK_M, BLOCK_K)


TILE = 2048  # 16 elements per thread
BLOCK_KS = (16, 64, 256, 1024)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _config(d, block_k):
    return C.make_config(_mp_cat_kernel, ptrs=dict(src1_ptr=d, dst1_ptr=d, src2_ptr=d, dst2_ptr=d),
                         floats=("scale1", "scale2"), constexprs=dict(BLOCK_M=TILE // block_k, BLOCK_K=block_k),
                         num_warps=4, num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        for bk in BLOCK_KS:
            yield _config(d, bk)


def _block_k(k: int) -> int:
    return next(b for b in BLOCK_KS if b >= min(k, BLOCK_KS[-1]))


def _launch(src1, dst1, src2, dst2, M, K1, K2, s1, d1, s2, d2, scale1, scale2):
    bk = _block_k(max(K1, K2))
    bm = TILE // bk
    nk1, nk2 = C.cdiv(K1, bk), C.cdiv(K2, bk)
    nm = C.cdiv(M, bm)
    n1 = nm * nk1
    C.launch(_config(src1.dtype, bk), (n1 + nm * nk2,), src1, dst1, src2, dst2, M, K1, K2, s1, d1, s2, d2,
             float(scale1), float(scale2), nk1, nk2, n1)


def mp_cat_forward(a2, b2, ca: float, cb: float):
    a2, b2 = a2.contiguous(), b2.contiguous()  # no-ops on the views mp_cat builds
    M, Ka = a2.shape
    Kb = b2.shape[1]
    out = torch.empty((M, Ka + Kb), dtype=a2.dtype, device=a2.device)
    _launch(a2, out, b2, out[:, Ka:], M, Ka, Kb, Ka, Ka + Kb, Kb, Ka + Kb, ca, cb)
    return out


def mp_cat_backward(g2, ka: int, ca: float, cb: float):
    g2 = g2.contiguous()
    M, K = g2.shape
    kb = K - ka
    da = torch.empty((M, ka), dtype=g2.dtype, device=g2.device)
    db = torch.empty((M, kb), dtype=g2.dtype, device=g2.device)
    _launch(g2, da, g2[:, ka:], db, M, ka, kb, K, ka, K, kb, ca, cb)
    return da, db


_fwd_op = kernel_op("triton_mp_cat", "(Tensor a, Tensor b, float ca, float cb) -> Tensor",
                    impl=mp_cat_forward,
                    fake=lambda a, b, ca, cb: a.new_empty((a.shape[0], a.shape[1] + b.shape[1])))
_bwd_op = kernel_op("triton_mp_cat_backward", "(Tensor g, int ka, float ca, float cb) -> (Tensor, Tensor)",
                    impl=mp_cat_backward,
                    fake=lambda g, ka, ca, cb: (g.new_empty((g.shape[0], ka)),
                                                g.new_empty((g.shape[0], g.shape[1] - ka))))


def _setup(ctx, inputs, output):
    ctx.ka = inputs[0].shape[1]
    ctx.ca, ctx.cb = inputs[2], inputs[3]


def _backward(ctx, g):
    da, db = _bwd_op(g, ctx.ka, ctx.ca, ctx.cb)
    return da, db, None, None


# The backward needs only sizes and scalars, so it is tied here directly rather than through
# with_backward (whose non-tensor arguments come from the forward's inputs).
_fwd_op.register_autograd(_backward, setup_context=_setup)


def mp_cat(a, b, dim: int, t: float):
    a2, b2, ca, cb, back = cat_rows(a, b, dim, t)
    return back(_fwd_op(a2, b2, ca, cb))


# Offsets within one tile are int32: at most (BLOCK_M - 1) * row length + BLOCK_K, so rows of
# (almost) 2^31 elements or more go to the reference.
MAX_ROW = 2 ** 31 - TILE


def _row_length(a, b, dim: int) -> int:
    """Length of an output row of the ``[M, K]`` matrices mp_cat works on (``K`` of ``out``)."""
    order = C.memory_order(a) if C.is_dense(a) else list(range(a.ndim))
    p = order.index(dim % a.ndim)
    k = a.shape[dim] + b.shape[dim]
    for d in order[p + 1:]:  # a plain loop: torch.compile traces supports() and cannot trace generators
        k *= a.shape[d]
    return k


def supports(a, b, dim: int = 1, *args) -> bool:
    return C.supported_dtype(a, b) and _row_length(a, b, dim) < MAX_ROW
