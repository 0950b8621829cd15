"""Resampling with the ``[1, 1]`` filter (spec §1): ``'down'`` (2x2 average) and ``'up'`` (2x nearest).

Both directions are one kernel indexed by the low-resolution element ``(r, j, k)``: row ``r``,
column ``j``, and (channels_last only) channel ``k``. The matching high-resolution elements are
``(2r + a, 2j + b, k)``, ``a, b in {0, 1}``:

* NCHW: ``r`` runs over ``N*C*H/2`` rows, ``k`` is absent (flag ``CL=False``);
* channels_last: ``r`` runs over ``N*H/2`` rows and ``k`` over the ``C`` contiguous channels.

``DOWN``: ``small = scale * sum of the 4 big`` (forward of 'down' with ``scale = 1/4``, backward
of 'up' with ``scale = 1``); otherwise ``big = scale * small`` replicated (forward of 'up',
backward of 'down'). Nothing is saved for backward. ``'keep'`` returns ``x`` itself.
"""

from __future__ import annotations

import functools
import torch
import triton
import triton.language as tl

from .._library import kernel_op, with_backward
from . import _common as C


@triton.jit
def _quad(e, Ws, K, CL: tl.constexpr):
    """High-resolution offset (int64) of the top-left element of ``e``'s 2x2 block, and the steps
    to its right (``step_b``) and lower (``step_a``) neighbours."""
    if CL:
        rj = e // K
        k = e - rj * K
    else:
        rj = e
    r = rj // Ws
    j = rj - r * Ws
    big = (2 * r).to(tl.int64) * (2 * Ws) + 2 * j
    if CL:
        big = big * K + k
        step_b = K
        step_a = 2 * Ws * K
    else:
        step_b = 1
        step_a = 2 * Ws
    return big, step_a, step_b


@triton.jit
def _resample_kernel(src_ptr, dst_ptr, n_small, Ws, K, scale, CL: tl.constexpr, DOWN: tl.constexpr,
                     BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # low-resolution element index (int32 division)
    m = e < n_small
    big, step_a, step_b = _quad(e, Ws, K, CL)
    if DOWN:
        acc = tl.load(src_ptr + big, mask=m, other=0.0).to(tl.float32)
        acc += tl.load(src_ptr + big + step_b, mask=m, other=0.0).to(tl.float32)
        acc += tl.load(src_ptr + big + step_a, mask=m, other=0.0).to(tl.float32)
        acc += tl.load(src_ptr + big + step_a + step_b, mask=m, other=0.0).to(tl.float32)
        tl.store(dst_ptr + e, (acc * scale).to(dst_ptr.dtype.element_ty), mask=m)
    else:
        v = (tl.load(src_ptr + e, mask=m, other=0.0).to(tl.float32) * scale).to(dst_ptr.dtype.element_ty)
        tl.store(dst_ptr + big, v, mask=m)
        tl.store(dst_ptr + big + step_b, v, mask=m)
        tl.store(dst_ptr + big + step_a, v, mask=m)
        tl.store(dst_ptr + big + step_a + step_b, v, mask=m)


BLOCK = 1024


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _config(d, cl, down):
    return C.make_config(_resample_kernel, ptrs=dict(src_ptr=d, dst_ptr=d), floats=("scale",),
                         constexprs=dict(CL=cl, DOWN=down, BLOCK=BLOCK), num_warps=4, num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        for cl in (False, True):
            for down in (False, True):
                yield _config(d, cl, down)


def _layout(t: torch.Tensor) -> bool:
    """True for channels_last (C innermost and not also NCHW-contiguous), else NCHW.

    A tensor that is both (1x1 pixels, or C = 1) counts as NCHW; any other tensor is made
    NCHW-contiguous by :func:`_canon`."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _run(src, down: bool, scale: float, cl: bool):
    """Launch over the low-resolution tensor; ``src`` and the new tensor share the layout ``cl``."""
    n, c, h, w = src.shape
    small_shape = (n, c, h // 2, w // 2) if down else (n, c, h, w)
    dst_shape = small_shape if down else (n, c, 2 * h, 2 * w)
    fmt = torch.channels_last if cl else torch.contiguous_format
    dst = torch.empty(dst_shape, dtype=src.dtype, device=src.device, memory_format=fmt)
    sn, sc, sh, sw = small_shape
    n_small = sn * sc * sh * sw
    C.launch(_config(src.dtype, cl, down), (C.cdiv(n_small, BLOCK),), src, dst, n_small, sw, sc if cl else 1,
             float(scale))
    return dst


def _canon(t: torch.Tensor, cl: bool) -> torch.Tensor:
    fmt = torch.channels_last if cl else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _shape(x, down: bool):
    n, c, h, w = x.shape
    return (n, c, h // 2, w // 2) if down else (n, c, 2 * h, 2 * w)


def _fake(x, down: bool, cl: bool):
    """The output :func:`_run` makes: its layout is ``cl``, never re-derived from the new shape
    (a channels_last 1x1 gradient is also NCHW-contiguous, its 2x2 result is not)."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(_shape(x, down), dtype=x.dtype, device=x.device, memory_format=fmt)


# Forward ops take any x (made dense in its own layout first); backward ops get the forward's layout.
_down_op = kernel_op("triton_resample_down", "(Tensor x) -> Tensor",
                     impl=lambda x: _run(_canon(x, _layout(x)), True, 0.25, _layout(x)),
                     fake=lambda x: _fake(x, True, _layout(x)))
_down_bwd_op = kernel_op("triton_resample_down_backward", "(Tensor g, bool cl) -> Tensor",
                         impl=lambda g, cl: _run(_canon(g, cl), False, 0.25, cl),
                         fake=lambda g, cl: _fake(g, False, cl))
_up_op = kernel_op("triton_resample_up", "(Tensor x) -> Tensor",
                   impl=lambda x: _run(_canon(x, _layout(x)), False, 1.0, _layout(x)),
                   fake=lambda x: _fake(x, False, _layout(x)))
_up_bwd_op = kernel_op("triton_resample_up_backward", "(Tensor g, bool cl) -> Tensor",
                       impl=lambda g, cl: _run(_canon(g, cl), True, 1.0, cl),
                       fake=lambda g, cl: _fake(g, True, cl))


def _tie(fwd, bwd):
    def setup(ctx, inputs, output):
        ctx.cl = _layout(inputs[0])

    def backward(ctx, g):
        return bwd(g, ctx.cl)

    fwd.register_autograd(backward, setup_context=setup)


_tie(_down_op, _down_bwd_op)
_tie(_up_op, _up_bwd_op)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "keep":
        return x
    x = _canon(x, _layout(x))
    return _down_op(x) if mode == "down" else _up_op(x)


def supports(x, mode) -> bool:
    # Element indices are 32-bit in the kernel (integer division is much cheaper than in 64 bits).
    return C.supported_dtype(x) and x.numel() * (4 if mode == "up" else 1) < 2 ** 31
