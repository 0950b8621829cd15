"""``resample_up_mp_silu`` (decoder 'up' Block input, spec §2): ``u = resample(x, 'up')``, ``h = mp_silu(u)``.

The 'up' Block reads the upsampled ``u`` twice (residual, and MP-SiLU before the first
convolution). Unfused that is resample + mp_silu forward and mp_silu + the gradient sum +
resample backward. Here:

* forward: one launch reads ``x`` once and writes ``u`` (``x`` replicated 2x2: no rounding) and
  ``h = silu(u) / 0.596`` computed in fp32 from the same values, rounded once;
* backward: one launch reads ``g_u``, ``g_h`` (either may be absent: flags) and the saved
  low-resolution ``x`` (``u`` is ``x`` replicated, so ``mp_silu'(u)`` is recomputed from ``x``) and
  writes ``dx = sum over the 2x2 block of (g_u + g_h * silu'(x) / 0.596)`` in fp32, rounded once.

Indexing is that of :mod:`.resample`: one program element per low-resolution element ``(r, j, k)``
with ``k`` the channel in channels_last (flag ``CL``), high-resolution elements ``(2r + a, 2j + b,
k)``. ``x``, ``u``, ``h``, the gradients and ``dx`` all share ``x``'s layout (NCHW or channels_last,
as :func:`.resample._layout` decides; anything else is made NCHW-contiguous first).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._library import kernel_op
from . import _common as C
from .resample import _canon, _fake, _layout, _quad


@triton.jit
def _up_silu_fwd_kernel(x_ptr, u_ptr, h_ptr, n_small, Ws, K, CL: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # low-resolution element (int32: see supports)
    m = e < n_small
    big, step_a, step_b = _quad(e, Ws, K, CL)
    u = tl.load(x_ptr + e, mask=m, other=0.0)
    xf = u.to(tl.float32)
    h = (xf / (1.0 + tl.exp(-xf)) * (1.0 / 0.596)).to(h_ptr.dtype.element_ty)
    tl.store(u_ptr + big, u, mask=m)
    tl.store(u_ptr + big + step_b, u, mask=m)
    tl.store(u_ptr + big + step_a, u, mask=m)
    tl.store(u_ptr + big + step_a + step_b, u, mask=m)
    tl.store(h_ptr + big, h, mask=m)
    tl.store(h_ptr + big + step_b, h, mask=m)
    tl.store(h_ptr + big + step_a, h, mask=m)
    tl.store(h_ptr + big + step_a + step_b, h, mask=m)


@triton.jit
def _grad_at(gu_ptr, gh_ptr, off, m, dsilu, HAS_GU: tl.constexpr, HAS_GH: tl.constexpr):
    """``g_u + g_h * mp_silu'`` at the high-resolution offsets ``off``, in fp32."""
    g = tl.zeros_like(dsilu)
    if HAS_GU:
        g += tl.load(gu_ptr + off, mask=m, other=0.0).to(tl.float32)
    if HAS_GH:
        g += tl.load(gh_ptr + off, mask=m, other=0.0).to(tl.float32) * dsilu
    return g


@triton.jit
def _up_silu_bwd_kernel(gu_ptr, gh_ptr, x_ptr, dx_ptr, n_small, Ws, K, HAS_GU: tl.constexpr,
                        HAS_GH: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < n_small
    big, step_a, step_b = _quad(e, Ws, K, CL)
    dsilu = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_GH:
        x = tl.load(x_ptr + e, mask=m, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-x))
        dsilu = sig * (1.0 + x * (1.0 - sig)) * (1.0 / 0.596)
    acc = _grad_at(gu_ptr, gh_ptr, big, m, dsilu, HAS_GU, HAS_GH)
    acc += _grad_at(gu_ptr, gh_ptr, big + step_b, m, dsilu, HAS_GU, HAS_GH)
    acc += _grad_at(gu_ptr, gh_ptr, big + step_a, m, dsilu, HAS_GU, HAS_GH)
    acc += _grad_at(gu_ptr, gh_ptr, big + step_a + step_b, m, dsilu, HAS_GU, HAS_GH)
    tl.store(dx_ptr + e, acc.to(dx_ptr.dtype.element_ty), mask=m)


BLOCK = 1024
GRAD_FLAGS = ((True, True), (True, False), (False, True))  # (HAS_GU, HAS_GH); neither: no launch


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(d, cl):
    return C.make_config(_up_silu_fwd_kernel, ptrs=dict(x_ptr=d, u_ptr=d, h_ptr=d),
                         constexprs=dict(CL=cl, BLOCK=BLOCK), num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)
def _bwd_config(d, cl, has_gu, has_gh):
    return C.make_config(_up_silu_bwd_kernel, ptrs=dict(gu_ptr=d, gh_ptr=d, x_ptr=d, dx_ptr=d),
                         constexprs=dict(HAS_GU=has_gu, HAS_GH=has_gh, CL=cl, BLOCK=BLOCK), num_warps=4,
                         num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        for cl in (False, True):
            yield _fwd_config(d, cl)
            for has_gu, has_gh in GRAD_FLAGS:
                yield _bwd_config(d, cl, has_gu, has_gh)


def _sizes(x: torch.Tensor, cl: bool):
    """(number of low-resolution elements, W, channels_last channel count or 1)."""
    n, c, h, w = x.shape
    return n * c * h * w, w, c if cl else 1


def forward(x: torch.Tensor):
    cl = _layout(x)
    x = _canon(x, cl)
    u, h = _fake(x, False, cl), _fake(x, False, cl)
    n_small, ws, k = _sizes(x, cl)
    C.launch(_fwd_config(x.dtype, cl), (C.cdiv(n_small, BLOCK),), x, u, h, n_small, ws, k)
    return u, h


def _dx_like(x: torch.Tensor, cl: bool) -> torch.Tensor:
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def backward(gu: torch.Tensor | None, gh: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    cl = _layout(x)
    x = _canon(x, cl)
    dx = _dx_like(x, cl)
    if gu is None and gh is None:
        return dx.zero_()
    gu = _canon(gu, cl) if gu is not None else None  # the gradients in x's layout (a copy only if not)
    gh = _canon(gh, cl) if gh is not None else None
    n_small, ws, k = _sizes(x, cl)
    cfg = _bwd_config(x.dtype, cl, gu is not None, gh is not None)
    C.launch(cfg, (C.cdiv(n_small, BLOCK),), gu if gu is not None else x, gh if gh is not None else x, x, dx,
             n_small, ws, k)
    return dx


_fwd_op = kernel_op("triton_resample_up_mp_silu", "(Tensor x) -> (Tensor, Tensor)", impl=forward,
                    fake=lambda x: (_fake(x, False, _layout(x)), _fake(x, False, _layout(x))))
_bwd_op = kernel_op("triton_resample_up_mp_silu_backward", "(Tensor? gu, Tensor? gh, Tensor x) -> Tensor",
                    impl=backward, fake=lambda gu, gh, x: _dx_like(x, _layout(x)))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.set_materialize_grads(False)


def _backward(ctx, gu, gh):
    if gu is None and gh is None:
        return (None,)
    (x,) = ctx.saved_tensors
    return (_bwd_op(gu, gh, x),)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def resample_up_mp_silu(x: torch.Tensor):
    return _fwd_op(_canon(x, _layout(x)))


def supports(x) -> bool:
    # Element indices are 32-bit in the kernel (like resample 'up': the output has 4x x's elements).
    return C.supported_dtype(x) and x.numel() * 4 < 2 ** 31


register("resample_up_mp_silu", "triton", resample_up_mp_silu, devices=("cuda", "cpu") if C.INTERPRET else ("cuda",),
         supports=supports)
