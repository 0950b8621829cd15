"""MP Fourier features ``y = sqrt(2) * cos(outer(x, freqs) + phases)`` (spec §1), forward and backward.

fp32 math, output in ``x.dtype``; ``[N] -> [N, C]`` row-major. ``freqs`` and ``phases`` are
buffers (no gradient; calls where they require one use the reference). Backward:
``dx[n] = -sqrt(2) * sum_c g[n, c] * sin(x[n] * freqs[c] + phases[c]) * freqs[c]``, one
program per block of rows looping over the channels. Saved: ``x``, ``freqs``, ``phases``.
"""

from __future__ import annotations

import functools
import torch
import triton
import triton.language as tl

from .._library import kernel_op, with_backward
from . import _common as C


@triton.jit
def _fourier_fwd_kernel(x_ptr, f_ptr, p_ptr, y_ptr, N, Cn, n_cblocks, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // n_cblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < N
    cm = cols < Cn
    x = tl.load(x_ptr + rows, mask=rm, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + cols, mask=cm, other=0.0)
    p = tl.load(p_ptr + cols, mask=cm, other=0.0)
    arg = x[:, None] * f[None, :]
    arg = arg + p[None, :]
    y = tl.cos(arg) * 1.4142135623730951
    off = rows.to(tl.int64)[:, None] * Cn + cols[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=rm[:, None] & cm[None, :])


@triton.jit
def _fourier_bwd_kernel(g_ptr, x_ptr, f_ptr, p_ptr, dx_ptr, N, Cn, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    x = tl.load(x_ptr + rows, mask=rm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, Cn, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cm = cols < Cn
        f = tl.load(f_ptr + cols, mask=cm, other=0.0)
        p = tl.load(p_ptr + cols, mask=cm, other=0.0)
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * Cn + cols[None, :], mask=rm[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)
        arg = x[:, None] * f[None, :]
        arg = arg + p[None, :]
        acc += g * tl.sin(arg) * f[None, :]
    dx = tl.sum(acc, axis=1) * -1.4142135623730951
    tl.store(dx_ptr + rows, dx.to(dx_ptr.dtype.element_ty), mask=rm)


BLOCK_N = 16
BLOCK_C = 128


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(d):
    return C.make_config(_fourier_fwd_kernel, ptrs=dict(x_ptr=d, f_ptr="fp32", p_ptr="fp32", y_ptr=d),
                         constexprs=dict(BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C), num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _bwd_config(d):
    return C.make_config(_fourier_bwd_kernel, ptrs=dict(g_ptr=d, x_ptr=d, f_ptr="fp32", p_ptr="fp32", dx_ptr=d),
                         constexprs=dict(BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C), num_warps=4, num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        yield _fwd_config(d)
        yield _bwd_config(d)


def fourier_forward(x, freqs, phases):
    N, Cn = x.shape[0], freqs.shape[0]
    y = torch.empty((N, Cn), dtype=x.dtype, device=x.device)
    ncb = C.cdiv(Cn, BLOCK_C)
    C.launch(_fwd_config(x.dtype), (C.cdiv(N, BLOCK_N) * ncb,), x, freqs, phases, y, N, Cn, ncb)
    return y


def fourier_backward(g, x, freqs, phases):
    g = g.contiguous()
    dx = torch.empty_like(x)
    C.launch(_bwd_config(x.dtype), (C.cdiv(x.shape[0], BLOCK_N),), g, x, freqs, phases, dx, x.shape[0],
             freqs.shape[0])
    return dx


_fwd_op = kernel_op("triton_mp_fourier", "(Tensor x, Tensor freqs, Tensor phases) -> Tensor", impl=fourier_forward,
                    fake=lambda x, f, p: x.new_empty((x.shape[0], f.shape[0])))
_bwd_op = kernel_op("triton_mp_fourier_backward", "(Tensor g, Tensor x, Tensor freqs, Tensor phases) -> Tensor",
                    impl=fourier_backward, fake=lambda g, x, f, p: torch.empty_like(x))
with_backward(_fwd_op, _bwd_op, num_outputs=1, saved_inputs=(0, 1, 2), grads_for=(0,))


def mp_fourier(x, freqs, phases):
    return _fwd_op(x.contiguous(), freqs.float().contiguous(), phases.float().contiguous())


def supports(x, freqs, phases) -> bool:
    return C.supported_dtype(x, freqs, phases) and not (freqs.requires_grad or phases.requires_grad)
