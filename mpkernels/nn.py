"""Magnitude-preserving modules (spec §1-2): :class:`MPConv`, :class:`MPFourier`, and one thin
wrapper per functional op (:class:`MPSiLU`, :class:`PixelNorm`, :class:`Normalize`, :class:`MPSum`,
:class:`MPCat`, :class:`MPSumClip`, :class:`PixelNormMPSiLU`, :class:`ModulatedMPSiLU`,
:class:`CosineAttention`, :class:`Resample`)."""

# No ``from __future__ import annotations`` here: torch.jit.script needs real annotations.
from typing import List, Optional, Tuple

import numpy as np
import torch

from . import functional as mkf

__all__ = ["MPConv", "MPFourier", "MPSiLU", "PixelNorm", "Normalize", "MPSum", "MPCat", "MPSumClip",
           "PixelNormMPSiLU", "ModulatedMPSiLU", "CosineAttention", "Resample"]


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (``kernel=[k, k]``) or linear layer (``kernel=[]``), no bias.

    forward(x, gain=1), spec §1 "MPConv":

    1. training mode only, under ``no_grad``: forced weight normalization, the stored
       parameter is overwritten with ``normalize(weight)`` (paper Eq. 66);
    2. traditional weight normalization with gradient, scaled by ``gain / sqrt(fan_in)``
       and cast to ``x.dtype`` (:func:`mpkernels.mp_weight`);
    3. ``conv2d(x, w, padding=k//2)`` or ``x @ w.T``.

    ``forward(x, weight=w_eff)`` runs step 3 only, with an effective weight the caller computed
    (the EDM2 network computes all of them with one :func:`mpkernels.mp_weights` call).

    Set ``forced_weight_norm = False`` when the trainer normalizes every weight once per
    step itself (one multi-tensor :func:`mpkernels.force_normalize_` call): the forward
    pass is then free of in-place parameter updates, which ``torch.compile`` and CUDA
    graphs prefer. Training is the same, as normalization is idempotent up to ``eps``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=(), *, device=None, dtype=None):
        super().__init__()
        kernel = tuple(int(k) for k in kernel)
        if len(kernel) not in (0, 2):
            raise ValueError(f"kernel: expected [] (linear) or [k, k] (conv), got {list(kernel)}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels/out_channels must be positive, got {in_channels}, {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.forced_weight_norm = True
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, gain=1, *, qkv_heads=None, weight=None) -> torch.Tensor:
        """``qkv_heads`` (convolutions only): output channels in head-contiguous q, k, v order, see
        :func:`mpkernels.mp_conv2d`; the stored weight keeps its layout.

        ``weight``: the effective weight, already computed by the caller (steps 1-4, e.g. one
        :func:`mpkernels.mp_weights` call for a whole network, with the gain and ``qkv_heads``
        applied there): only step 5 runs, in ``x.dtype``.
        """
        if weight is not None:
            if isinstance(gain, torch.Tensor) or gain != 1 or qkv_heads is not None:
                raise ValueError("weight: an effective weight already includes gain and qkv_heads; pass neither")
            if not isinstance(weight, torch.Tensor) or weight.shape != self.weight.shape:
                raise ValueError(f"weight: expected an effective weight of shape {tuple(self.weight.shape)}, "
                                 f"got {getattr(weight, 'shape', type(weight).__name__)}")
            weight = weight.to(x.dtype)
            if weight.ndim == 4:
                return _conv2d_effective(x, weight)
            return torch.nn.functional.linear(x, weight)
        if self.training and self.forced_weight_norm:
            with torch.no_grad():
                mkf.force_normalize_([self.weight])
        if self.weight.ndim == 4:
            if qkv_heads is not None:
                return mkf.mp_conv2d(x, self.weight, gain, qkv_heads=qkv_heads)
            return mkf.mp_conv2d(x, self.weight, gain)
        if qkv_heads is not None:
            raise ValueError("qkv_heads: only for convolution weights")
        return mkf.mp_linear(x, self.weight, gain)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}"


@torch.jit.ignore
def _conv2d_effective(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(x, weight, padding=k // 2)``. On the CPU with a fused backend, a small channels_last 1x1
    convolution runs as one GEMM (:func:`mpkernels.cpu_conv.conv2d_1x1_gemm`); an effective weight that its owner keeps fixed (marked
    with a ``_mk_conv_packs`` dict, e.g. the EDM2 network's eval-mode weight cache) is packed for
    oneDNN once per input shape (:func:`mpkernels.cpu_conv.conv2d_fixed_weight`)."""
    if weight.shape[-1] == 1 and x.device.type == "cpu":
        from ._dispatch import get_backend
        from .cpu_conv import conv2d_1x1_gemm, conv2d_1x1_gemm_eligible
        if get_backend() != "reference" and conv2d_1x1_gemm_eligible(x, weight):
            return conv2d_1x1_gemm(x, weight)
    packs = getattr(weight, "_mk_conv_packs", None)
    if packs is not None:
        from .cpu_conv import conv2d_fixed_weight
        return conv2d_fixed_weight(x, weight, packs)
    return torch.nn.functional.conv2d(x, weight, padding=weight.shape[-1] // 2)


class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features of a noise level (spec §1): ``[N] -> [N, C]``.

    Buffers ``freqs = 2*pi*randn(C)*bandwidth`` and ``phases = 2*pi*rand(C)``.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1, *, device=None):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels: must be positive, got {num_channels}")
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels, device=device) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mkf.mp_fourier(x, self.freqs, self.phases)




# ------------------------------------------------------------------------------------------------
# Thin module wrappers, one per public op (the functional ops do the validation and dispatch).
# The calls go through small ``torch.jit.ignore``-d helpers so ``torch.jit.script`` accepts the
# modules (the dispatch itself stays Python); ``torch.compile`` traces straight through them.

def _check_t(t, name: str = "t") -> float:
    from ._validate import interp_t
    return interp_t(t, name)


def _check_eps(eps) -> float:
    from ._validate import number
    return number(eps, "eps", lo=0.0)


@torch.jit.ignore
def _mp_silu(x: torch.Tensor) -> torch.Tensor:
    return mkf.mp_silu(x)


@torch.jit.ignore
def _pixel_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return mkf.pixel_norm(x, eps)


@torch.jit.ignore
def _normalize(x: torch.Tensor, dim: Optional[List[int]], eps: float) -> torch.Tensor:
    return mkf.normalize(x, dim, eps)


@torch.jit.ignore
def _mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return mkf.mp_sum(a, b, t)


@torch.jit.ignore
def _mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int, t: float) -> torch.Tensor:
    return mkf.mp_cat(a, b, dim=dim, t=t)


@torch.jit.ignore
def _mp_sum_clip(a: torch.Tensor, b: torch.Tensor, t: float, clip: float) -> torch.Tensor:
    return mkf.mp_sum_clip(a, b, t, clip)


@torch.jit.ignore
def _pixel_norm_mp_silu(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return mkf.pixel_norm_mp_silu(x, eps)


@torch.jit.ignore
def _modulated_mp_silu(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return mkf.modulated_mp_silu(y, c)


@torch.jit.ignore
def _cosine_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    return mkf.cosine_attention(qkv, num_heads)


@torch.jit.ignore
def _resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    return mkf.resample(x, mode)


class MPSiLU(torch.nn.Module):
    """Magnitude-preserving SiLU, ``silu(x) / 0.596`` (spec §1): :func:`mpkernels.mp_silu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mp_silu(x)


class PixelNorm(torch.nn.Module):
    """Per-pixel normalization over the channels (spec §1): :func:`mpkernels.pixel_norm`."""

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        self.eps = _check_eps(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pixel_norm(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class Normalize(torch.nn.Module):
    """``x / (eps + ||x|| / sqrt(K))`` over ``dim`` (spec §1): :func:`mpkernels.normalize`.

    ``dim=None`` reduces over every dim but the first; an int or a list of ints otherwise.
    """

    def __init__(self, dim=None, eps: float = 1e-4):
        super().__init__()
        if dim is not None:
            dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else None
            if dims is None or not dims or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
                raise TypeError(f"dim: expected None, an int or a non-empty list of ints, got {dim!r}")
            dim = dims
        self.dim: Optional[List[int]] = dim
        self.eps = _check_eps(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalize(x, self.dim, self.eps)

    def extra_repr(self) -> str:
        dim = self.dim if self.dim is None or len(self.dim) > 1 else self.dim[0]
        return f"dim={dim}, eps={self.eps:g}"


class MPSum(torch.nn.Module):
    """Magnitude-preserving sum ``lerp(a, b, t) / sqrt((1-t)^2 + t^2)`` (spec §1): :func:`mpkernels.mp_sum`."""

    def __init__(self, t: float = 0.5):
        super().__init__()
        self.t = _check_t(t)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _mp_sum(a, b, self.t)

    def extra_repr(self) -> str:
        return f"t={self.t:g}"


class MPCat(torch.nn.Module):
    """Magnitude-preserving concatenation along ``dim`` (spec §1): :func:`mpkernels.mp_cat`."""

    def __init__(self, t: float = 0.5, dim: int = 1):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
        self.t = _check_t(t)
        self.dim = dim

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _mp_cat(a, b, self.dim, self.t)

    def extra_repr(self) -> str:
        return f"t={self.t:g}, dim={self.dim}"


class MPSumClip(torch.nn.Module):
    """Residual sum of a Block, ``clip(mp_sum(a, b, t), -clip, clip)`` (spec §2 steps 5-7):
    :func:`mpkernels.mp_sum_clip`."""

    def __init__(self, t: float = 0.3, clip: float = 256):
        super().__init__()
        from ._validate import number
        self.t = _check_t(t)
        self.clip = number(clip, "clip", lo=0.0, lo_open=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _mp_sum_clip(a, b, self.t, self.clip)

    def extra_repr(self) -> str:
        return f"t={self.t:g}, clip={self.clip:g}"


class PixelNormMPSiLU(torch.nn.Module):
    """``(pixel_norm(x), mp_silu(pixel_norm(x)))`` in one pass, the encoder Block's input (spec §2):
    :func:`mpkernels.pixel_norm_mp_silu`."""

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        self.eps = _check_eps(eps)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return _pixel_norm_mp_silu(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class ModulatedMPSiLU(torch.nn.Module):
    """``mp_silu(y * c[:, :, None, None])``, a Block's embedding modulation (spec §2 step 3):
    :func:`mpkernels.modulated_mp_silu`; ``y: [N, C, H, W]``, ``c: [N, C]``."""

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return _modulated_mp_silu(y, c)


class CosineAttention(torch.nn.Module):
    """Cosine self-attention on a Block's raw qkv conv output ``[N, 3C, H, W] -> [N, C, H, W]`` (spec §1):
    :func:`mpkernels.cosine_attention`."""

    def __init__(self, num_heads: int):
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
        self.num_heads = num_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return _cosine_attention(qkv, self.num_heads)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class Resample(torch.nn.Module):
    """Resampling with the [1, 1] filter (spec §1): ``'keep'``, ``'down'`` (2x2 average pool) or
    ``'up'`` (2x nearest): :func:`mpkernels.resample`."""

    def __init__(self, mode: str = "keep"):
        super().__init__()
        if mode not in ("keep", "up", "down"):
            raise ValueError(f"mode: expected 'keep', 'up' or 'down', got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resample(x, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
