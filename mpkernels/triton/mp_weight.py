"""``mp_weight`` and the MPConv layers built on it: ``mp_conv2d``, ``mp_linear`` (spec §1 "MPConv").

``w_eff = normalize(w) * gain / sqrt(fan_in)`` in one kernel: per output row an fp32 norm, the
scale, and the cast to the compute dtype (fp32 for :func:`mpkernels.mp_weight`, ``x.dtype``
for the layers, so no separate cast kernel). cuDNN / cuBLAS do the convolution itself
(``F.conv2d`` / ``F.linear``), so autograd, channels_last and ``torch.compile`` treat it as usual.

Backward through the normalization (the kernels of :mod:`.normalize`, flag ``GAIN``):
``dw = s*gain*(inv*g - w*inv^2*<g,w>/(K*rms))``, ``s = 1/sqrt(fan_in)``; for a tensor gain
``dgain = s * sum_rows inv*<g,w>`` (per-row partials from the kernel, summed by one small
reduction). Saved: the weight (a parameter, no copy), the gain, and fp32 ``inv`` per row.

Weights are normalized in fp32: a half-precision weight is widened first (parameters are
fp32 in practice).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._library import kernel_op, with_backward
from . import _common as C
from . import normalize as NZ

ONE_PASS_R = 1024  # weights are small: one block for every row length up to 1024, two passes above


def _blocks(R: int, bwd: bool):
    """(ONE_PASS, BLOCK_R, BLOCK_R2, BLOCK_I, num_warps): a fixed choice per pass count (few configurations)."""
    nominal = NZ._PER_THREAD[bwd] * 32 * NZ.MAX_WARPS
    if R <= ONE_PASS_R:
        return True, ONE_PASS_R, 0, nominal // ONE_PASS_R, NZ._warps(nominal, bwd)
    return False, nominal, 0, 1, NZ._warps(nominal, bwd)


@C.declare_configs
def configs():
    for yd in C.DTYPES:
        for gain in (False, True):
            for perm in (False, True):
                for R in (ONE_PASS_R, ONE_PASS_R + 1):
                    yield NZ._fwd_config(True, False, gain, perm, *_blocks(R, False), torch.float32, yd)
                    yield NZ._bwd_config(True, False, gain, perm, *_blocks(R, True), torch.float32, yd)


def _forward(w2: torch.Tensor, gain: torch.Tensor | None, scale: float, eps: float, dtype: torch.dtype, qkv_d: int):
    x3 = w2.unsqueeze(-1)
    y, _, inv = NZ.normalize_forward(x3, eps, out_dtype=dtype, scale=scale, gain=gain, qkv_d=qkv_d,
                                     blocks=_blocks(x3.shape[1], False))
    return y.squeeze(-1), inv.reshape(-1)


def _backward(g: torch.Tensor, w2: torch.Tensor, gain: torch.Tensor | None, inv: torch.Tensor, scale: float,
              eps: float, qkv_d: int):
    x3 = w2.unsqueeze(-1)
    dx, dgain = NZ.normalize_backward(g.contiguous().unsqueeze(-1), None, x3, inv.reshape(-1, 1, 1), eps,
                                      scale=scale, gain=gain, qkv_d=qkv_d, blocks=_blocks(x3.shape[1], True))
    return dx.squeeze(-1), (dgain.sum() if dgain is not None else None)


def _fake_fwd(w2, *args):
    dtype = args[-2]
    return w2.new_empty(w2.shape, dtype=dtype), w2.new_empty((w2.shape[0],), dtype=torch.float32)


# ``qkv_d``: 0, or the head dim D of a qkv weight whose rows come out head-contiguous (flag PERM).
_fwd_op = kernel_op(
    "triton_mp_weight", "(Tensor w, float scale, float eps, ScalarType dtype, int qkv_d) -> (Tensor, Tensor)",
    impl=lambda w, scale, eps, dtype, qkv_d: _forward(w, None, scale, eps, dtype, qkv_d), fake=_fake_fwd)
_bwd_op = kernel_op(
    "triton_mp_weight_backward", "(Tensor g, Tensor w, Tensor inv, float scale, float eps, int qkv_d) -> Tensor",
    impl=lambda g, w, inv, scale, eps, qkv_d: _backward(g, w, None, inv, scale, eps, qkv_d)[0],
    fake=lambda g, w, inv, scale, eps, qkv_d: torch.empty_like(w))
with_backward(_fwd_op, _bwd_op, num_outputs=1, saved_inputs=(0,), saved_outputs=(1,), nontensor_args=(1, 2, 4),
              grads_for=(0,))

_fwd_gain_op = kernel_op(
    "triton_mp_weight_gain",
    "(Tensor w, Tensor gain, float scale, float eps, ScalarType dtype, int qkv_d) -> (Tensor, Tensor)",
    impl=lambda w, gain, scale, eps, dtype, qkv_d: _forward(w, gain, scale, eps, dtype, qkv_d), fake=_fake_fwd)
_bwd_gain_op = kernel_op(
    "triton_mp_weight_gain_backward",
    "(Tensor g, Tensor w, Tensor gain, Tensor inv, float scale, float eps, int qkv_d) -> (Tensor, Tensor)",
    impl=lambda g, w, gain, inv, scale, eps, qkv_d: _backward(g, w, gain, inv, scale, eps, qkv_d),
    fake=lambda g, w, gain, inv, scale, eps, qkv_d: (torch.empty_like(w), gain.new_empty(())))
with_backward(_fwd_gain_op, _bwd_gain_op, num_outputs=1, saved_inputs=(0, 1), saved_outputs=(1,),
              nontensor_args=(2, 3, 5), grads_for=(0, 1))


def _rows(w: torch.Tensor):
    """``w`` as a contiguous ``[out, fan_in]`` matrix by views alone when each output row is one
    contiguous block of memory (NCHW or channels_last weights alike; the order inside a row does
    not matter to a per-row norm), plus the function that maps a result back to ``w``'s layout."""
    order = C.memory_order(w) if C.is_dense(w) else None
    if order is None or order[0] != 0:
        order = list(range(w.ndim))
        wp = w.contiguous()
    else:
        wp = w.permute(order)
    inverse = [order.index(d) for d in range(w.ndim)]
    shape = wp.shape
    return wp.reshape(shape[0], -1), lambda y2: y2.reshape(shape).permute(inverse)


def weight(w: torch.Tensor, gain, eps: float, dtype: torch.dtype, qkv_heads: int | None = None) -> torch.Tensor:
    """``normalize(w) * gain / sqrt(fan_in)`` cast to ``dtype``, differentiable in ``w`` and a tensor gain.

    The result has ``w``'s memory layout (a channels_last weight gives a channels_last one).
    ``qkv_heads``: the output rows come out head-contiguous (reference ``head_contiguous_rows``),
    permuted by the same launch; the backward scatters the gradient rows back."""
    w2, back = _rows(w.float())
    s = 1.0 / math.sqrt(w2.shape[1])
    qkv_d = w2.shape[0] // (3 * qkv_heads) if qkv_heads else 0
    if isinstance(gain, torch.Tensor):
        y, _ = _fwd_gain_op(w2, gain.float().reshape(()), s, eps, dtype, qkv_d)
    else:
        y, _ = _fwd_op(w2, float(gain) * s, eps, dtype, qkv_d)
    return back(y)


def mp_weight(w: torch.Tensor, gain, eps: float, qkv_heads: int | None = None) -> torch.Tensor:
    return weight(w, gain, eps, torch.float32, qkv_heads)


def mp_conv2d(x: torch.Tensor, w: torch.Tensor, gain, qkv_heads: int | None = None) -> torch.Tensor:
    return F.conv2d(x, weight(w, gain, 1e-4, x.dtype, qkv_heads), padding=w.shape[-1] // 2)


def mp_linear(x: torch.Tensor, w: torch.Tensor, gain) -> torch.Tensor:
    return F.linear(x, weight(w, gain, 1e-4, x.dtype))


def _gain_ok(gain) -> bool:
    return not isinstance(gain, torch.Tensor) or gain.dtype in C.DTYPES


def supports(w, gain, eps, qkv_heads=None) -> bool:
    return C.supported_dtype(w) and _gain_ok(gain) and w.numel() <= NZ.MAX_SLICE_NUMEL


def supports_conv(x, w, gain, qkv_heads=None) -> bool:
    return C.supported_dtype(x, w) and _gain_ok(gain) and w.numel() <= NZ.MAX_SLICE_NUMEL
