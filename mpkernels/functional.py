"""Public functional ops: validate the arguments, then dispatch to the active backend.

Every function here accepts float16, bfloat16 and float32 tensors (float64 too,
which runs on the reference path and exists for gradcheck), on CPU or CUDA, in
any layout, and supports autograd. See :mod:`mpkernels.reference` for the math.
"""

from __future__ import annotations

import torch

from . import _validate as V
from ._dispatch import dispatch

__all__ = [
    "normalize", "pixel_norm", "mp_silu", "mp_sum", "mp_cat", "mp_fourier", "mp_weight", "mp_conv2d",
    "mp_linear", "cosine_attention", "pixel_norm_mp_silu", "modulated_mp_silu", "mp_sum_clip", "resample",
    "force_normalize_", "ema_lerp_",
]


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """``x / (eps + ||x|| / sqrt(K))`` over ``dim`` (default: every dim but the first); spec §1."""
    V.tensor(x, "x", min_ndim=1 if dim is not None else 2)
    dims = V.dims(dim, x.ndim)
    return dispatch("normalize", x, dims, V.eps(eps))


def pixel_norm(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """:func:`normalize` over dim 1 (channels), per pixel; spec §1."""
    V.tensor(x, "x", min_ndim=2)
    return dispatch("pixel_norm", x, V.eps(eps))


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x) / 0.596``; spec §1."""
    V.tensor(x, "x")
    return dispatch("mp_silu", x)


def _pair(a, b, na="a", nb="b"):
    V.tensor(a, na)
    V.tensor(b, nb)
    V.same_device([(na, a), (nb, b)])
    V.same_dtype(na, a, nb, b)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``lerp(a, b, t) / sqrt((1-t)^2 + t^2)``; ``t`` in [0, 1]; spec §1."""
    _pair(a, b)
    V.same_shape("a", a, "b", b)
    return dispatch("mp_sum", a, b, V.interp_t(t))


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation along ``dim``; spec §1."""
    _pair(a, b)
    if a.ndim != b.ndim:
        raise ValueError(f"b: has {b.ndim} dims but a has {a.ndim}")
    d = V.dim(dim, a.ndim)
    if a.shape[:d] + a.shape[d + 1:] != b.shape[:d] + b.shape[d + 1:]:
        raise ValueError(f"b: shape {tuple(b.shape)} does not match a {tuple(a.shape)} outside dim {d}")
    return dispatch("mp_cat", a, b, d, V.interp_t(t))


def mp_fourier(x: torch.Tensor, freqs: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """``sqrt(2) * cos(outer(x, freqs) + phases)`` in fp32, returned in ``x.dtype``: ``[N] -> [N, C]``; spec §1."""
    V.tensor(x, "x", ndim=1)
    V.tensor(freqs, "freqs", ndim=1)
    V.tensor(phases, "phases", ndim=1)
    V.same_device([("x", x), ("freqs", freqs), ("phases", phases)])
    V.same_shape("freqs", freqs, "phases", phases)
    return dispatch("mp_fourier", x, freqs, phases)


def _weight(w: torch.Tensor, name="w", ndim=None):
    V.tensor(w, name, min_ndim=2)
    if ndim is not None and w.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d weight, got shape {tuple(w.shape)}")


def mp_weight(w: torch.Tensor, gain=1.0, eps: float = 1e-4) -> torch.Tensor:
    """``normalize(w) * gain / sqrt(fan_in)`` in fp32, differentiable in ``w`` and a tensor ``gain``; spec §1."""
    _weight(w)
    return dispatch("mp_weight", w, V.gain(gain, device=w.device), V.eps(eps))


def mp_conv2d(x: torch.Tensor, w: torch.Tensor, gain=1.0) -> torch.Tensor:
    """``conv2d(x, mp_weight(w, gain).to(x.dtype), padding=k//2)``; ``w: [out, in, k, k]`` with odd ``k``."""
    V.tensor(x, "x", ndim=4)
    _weight(w, ndim=4)
    V.same_device([("x", x), ("w", w)])
    if w.shape[2] != w.shape[3] or w.shape[2] % 2 != 1:
        raise ValueError(f"w: kernel must be square with odd size, got {tuple(w.shape[2:])}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"w: expects {w.shape[1]} input channels but x has {x.shape[1]}")
    return dispatch("mp_conv2d", x, w, V.gain(gain, device=w.device))


def mp_linear(x: torch.Tensor, w: torch.Tensor, gain=1.0) -> torch.Tensor:
    """``x @ mp_weight(w, gain).to(x.dtype).T``; ``w: [out, in]``."""
    V.tensor(x, "x", min_ndim=1)
    _weight(w, ndim=2)
    V.same_device([("x", x), ("w", w)])
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"w: expects {w.shape[1]} input features but x has {x.shape[-1]}")
    return dispatch("mp_linear", x, w, V.gain(gain, device=w.device))


def cosine_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Cosine attention on the raw qkv conv output ``[N, 3C, H, W]`` (spec §1) -> ``[N, C, H, W]``."""
    V.tensor(qkv, "qkv", ndim=4)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    if qkv.shape[1] % 3 != 0:
        raise ValueError(f"qkv: channel count {qkv.shape[1]} is not a multiple of 3")
    c = qkv.shape[1] // 3
    if c % num_heads != 0:
        raise ValueError(f"num_heads: {num_heads} does not divide the {c} channels of the attention")
    return dispatch("cosine_attention", qkv, num_heads)


def pixel_norm_mp_silu(x: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_norm(x), mp_silu(pixel_norm(x)))`` in one pass (encoder Block, spec §2)."""
    V.tensor(x, "x", min_ndim=2)
    return dispatch("pixel_norm_mp_silu", x, V.eps(eps))


def modulated_mp_silu(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``mp_silu(y * c[:, :, None, None])``; ``y: [N, C, H, W]``, ``c: [N, C]`` (any float dtype)."""
    V.tensor(y, "y", ndim=4)
    V.tensor(c, "c", ndim=2)
    V.same_device([("y", y), ("c", c)])
    if tuple(c.shape) != tuple(y.shape[:2]):
        raise ValueError(f"c: shape {tuple(c.shape)} must be [N, C] = {tuple(y.shape[:2])}")
    return dispatch("modulated_mp_silu", y, c)


def mp_sum_clip(a: torch.Tensor, b: torch.Tensor, t: float, clip: float) -> torch.Tensor:
    """``clip(mp_sum(a, b, t), -clip, clip)`` (Block residual, spec §2 steps 5-7); ``clip > 0``."""
    _pair(a, b)
    V.same_shape("a", a, "b", b)
    return dispatch("mp_sum_clip", a, b, V.interp_t(t), V.number(clip, "clip", lo=0.0, lo_open=True))


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """``'keep'``, ``'down'`` (2x2 average pool) or ``'up'`` (2x nearest), spec §1."""
    V.tensor(x, "x", ndim=4)
    if mode not in ("keep", "up", "down"):
        raise ValueError(f"mode: expected 'keep', 'up' or 'down', got {mode!r}")
    if mode == "down" and (x.shape[2] % 2 or x.shape[3] % 2):
        raise ValueError(f"x: 'down' needs even H and W, got {tuple(x.shape[2:])}")
    return dispatch("resample", x, mode)


def force_normalize_(tensors, eps: float = 1e-4) -> None:
    """In place, without autograd: each ``w <- normalize(w)`` (forced weight normalization, spec §1)."""
    ts = V.tensor_list(tensors, "tensors")
    for i, w in enumerate(ts):
        if w.ndim < 2 or w.numel() == 0:
            raise ValueError(f"tensors[{i}]: expected a non-empty weight with >= 2 dims, got shape {tuple(w.shape)}")
    if ts:
        V.same_device([(f"tensors[{i}]", w) for i, w in enumerate(ts)])
        dispatch("force_normalize_", ts, V.eps(eps))


def ema_lerp_(ema_tensors, tensors, weight: float) -> None:
    """In place, without autograd: each ``e <- e + weight * (t - e)``; ``weight`` in [0, 1] (spec §7)."""
    es = V.tensor_list(ema_tensors, "ema_tensors")
    ts = V.tensor_list(tensors, "tensors")
    if len(es) != len(ts):
        raise ValueError(f"tensors: {len(ts)} tensors but ema_tensors has {len(es)}")
    for i, (e, t) in enumerate(zip(es, ts)):
        if e.shape != t.shape:
            raise ValueError(f"tensors[{i}]: shape {tuple(t.shape)} does not match ema_tensors[{i}] {tuple(e.shape)}")
    if es:
        V.same_device([(f"ema_tensors[{i}]", e) for i, e in enumerate(es)] +
                      [(f"tensors[{i}]", t) for i, t in enumerate(ts)])
        dispatch("ema_lerp_", es, ts, V.number(weight, "weight", lo=0.0, hi=1.0))
