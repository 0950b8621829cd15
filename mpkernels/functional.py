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
    "normalize", "pixel_norm", "mp_silu", "mp_sum", "mp_cat", "mp_cat_mp_silu", "mp_fourier", "mp_weight", "mp_conv2d",
    "mp_linear", "cosine_attention", "pixel_norm_mp_silu", "modulated_mp_silu", "mp_sum_clip", "resample",
    "force_normalize_", "ema_lerp_", "force_finite_",
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
    d = _cat_args(a, b, dim)
    return dispatch("mp_cat", a, b, d, V.interp_t(t))


def _cat_args(a, b, dim) -> int:
    _pair(a, b)
    if a.ndim != b.ndim:
        raise ValueError(f"b: has {b.ndim} dims but a has {a.ndim}")
    d = V.dim(dim, a.ndim)
    if a.shape[:d] + a.shape[d + 1:] != b.shape[:d] + b.shape[d + 1:]:
        raise ValueError(f"b: shape {tuple(b.shape)} does not match a {tuple(a.shape)} outside dim {d}")
    return d



def mp_cat_mp_silu(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, mp_silu(x))`` with ``x = mp_cat(a, b, dim, t)`` in one pass (decoder Block input, spec §2).

    Both results are differentiable; the backward takes both gradients in one pass (no separate
    gradient sum for the two uses of ``x``)."""
    d = _cat_args(a, b, dim)
    return dispatch("mp_cat_mp_silu", a, b, d, V.interp_t(t))

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


def _qkv_heads(qkv_heads, w: torch.Tensor) -> dict:
    """``{'qkv_heads': n}`` for the dispatch (nothing when None: backends without the option still serve)."""
    if qkv_heads is None:
        return {}
    if isinstance(qkv_heads, bool) or not isinstance(qkv_heads, int) or qkv_heads < 1:
        raise ValueError(f"qkv_heads: expected a positive int or None, got {qkv_heads!r}")
    if w.shape[0] % (3 * qkv_heads) != 0:
        raise ValueError(f"qkv_heads: {qkv_heads} heads of q, k and v do not divide the {w.shape[0]} output rows of w")
    return {"qkv_heads": qkv_heads}


def mp_weight(w: torch.Tensor, gain=1.0, eps: float = 1e-4, *, qkv_heads: int | None = None) -> torch.Tensor:
    """``normalize(w) * gain / sqrt(fan_in)`` in fp32, differentiable in ``w`` and a tensor ``gain``; spec §1.

    ``qkv_heads``: ``w`` projects to attention q, k, v for that many heads in the release's
    interleaved channel order (spec §1); the result's rows come out head-contiguous
    (``head*3*D + j*D + d``), the layout ``cosine_attention(..., layout='head_contiguous')``
    reads. The parameter itself keeps its layout (state dicts unchanged).
    """
    _weight(w)
    extra = _qkv_heads(qkv_heads, w)
    return dispatch("mp_weight", w, V.gain(gain, device=w.device), V.eps(eps), **extra)


def mp_conv2d(x: torch.Tensor, w: torch.Tensor, gain=1.0, *, qkv_heads: int | None = None) -> torch.Tensor:
    """``conv2d(x, mp_weight(w, gain).to(x.dtype), padding=k//2)``; ``w: [out, in, k, k]`` with odd ``k``.

    ``qkv_heads``: output channels in head-contiguous q, k, v order (see :func:`mp_weight`).
    """
    V.tensor(x, "x", ndim=4)
    _weight(w, ndim=4)
    V.same_device([("x", x), ("w", w)])
    if w.shape[2] != w.shape[3] or w.shape[2] % 2 != 1:
        raise ValueError(f"w: kernel must be square with odd size, got {tuple(w.shape[2:])}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"w: expects {w.shape[1]} input channels but x has {x.shape[1]}")
    extra = _qkv_heads(qkv_heads, w)
    return dispatch("mp_conv2d", x, w, V.gain(gain, device=w.device), **extra)


def mp_linear(x: torch.Tensor, w: torch.Tensor, gain=1.0) -> torch.Tensor:
    """``x @ mp_weight(w, gain).to(x.dtype).T``; ``w: [out, in]``."""
    V.tensor(x, "x", min_ndim=1)
    _weight(w, ndim=2)
    V.same_device([("x", x), ("w", w)])
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"w: expects {w.shape[1]} input features but x has {x.shape[-1]}")
    return dispatch("mp_linear", x, w, V.gain(gain, device=w.device))


def cosine_attention(qkv: torch.Tensor, num_heads: int, *, layout: str = "interleaved") -> torch.Tensor:
    """Cosine attention on the raw qkv conv output ``[N, 3C, H, W]`` (spec §1) -> ``[N, C, H, W]``.

    ``layout``: channel order of ``qkv``: ``'interleaved'`` (spec §1 and the released models,
    ``head*3*D + 3*d + j``, j = q, k, v) or ``'head_contiguous'`` (``head*3*D + j*D + d``, what
    ``mp_conv2d(..., qkv_heads=num_heads)`` produces; faster for channels_last on the Triton backend).
    """
    if layout not in ("interleaved", "head_contiguous"):
        raise ValueError(f"layout: expected 'interleaved' or 'head_contiguous', got {layout!r}")
    V.tensor(qkv, "qkv", ndim=4)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    if qkv.shape[1] % 3 != 0:
        raise ValueError(f"qkv: channel count {qkv.shape[1]} is not a multiple of 3")
    c = qkv.shape[1] // 3
    if c % num_heads != 0:
        raise ValueError(f"num_heads: {num_heads} does not divide the {c} channels of the attention")
    if layout == "interleaved":  # the two-argument call every backend implements
        return dispatch("cosine_attention", qkv, num_heads)
    return dispatch("cosine_attention", qkv, num_heads, layout)


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
    """In place, without autograd: each ``w <- normalize(w)`` (forced weight normalization, spec §1).

    The tensors must not overlap in memory (disjoint views of one buffer are fine): an overlapping
    pair raises ``ValueError`` naming both entries, whatever the backend.
    """
    ts = V.tensor_list(tensors, "tensors")
    for i, w in enumerate(ts):
        if w.ndim < 2 or w.numel() == 0:
            raise ValueError(f"tensors[{i}]: expected a non-empty weight with >= 2 dims, got shape {tuple(w.shape)}")
    if ts:
        V.same_device_lists([("tensors", ts)])
        V.no_overlap([("tensors", ts, True)])
        dispatch("force_normalize_", ts, V.eps(eps))


def ema_lerp_(ema_tensors, tensors, weight) -> None:
    """In place, without autograd: each ``e <- e + weight * (t - e)``; ``weight`` in [0, 1] (spec §7).

    ``weight``: a number, or a 0-d floating tensor on the tensors' device, read when the kernels
    run, so a captured CUDA graph picks up a new value at each replay (a number is baked into
    the capture). A CUDA tensor weight is not range-checked (that would synchronize).

    No ``ema_tensors`` entry may overlap another one or any ``tensors`` entry in memory
    (``ValueError`` naming both); the ``tensors`` are only read and may alias each other.
    """
    es = V.tensor_list(ema_tensors, "ema_tensors")
    ts = V.tensor_list(tensors, "tensors")
    if len(es) != len(ts):
        raise ValueError(f"tensors: {len(ts)} tensors but ema_tensors has {len(es)}")
    for i, (e, t) in enumerate(zip(es, ts)):
        if e.shape != t.shape:
            raise ValueError(f"tensors[{i}]: shape {tuple(t.shape)} does not match ema_tensors[{i}] {tuple(e.shape)}")
    if es:
        V.same_device_lists([("ema_tensors", es), ("tensors", ts)])
        weight = V.lerp_weight(weight, device=es[0].device)
        V.no_overlap([("ema_tensors", es, True), ("tensors", ts, False)])
        dispatch("ema_lerp_", es, ts, weight)
    else:
        V.lerp_weight(weight)


def force_finite_(tensors) -> None:
    """In place, without autograd: every inf / NaN element of each tensor becomes 0, as
    ``torch.nan_to_num(t, nan=0, posinf=0, neginf=0, out=t)`` does (the training step's gradient
    clean-up before Adam, spec §6), for the whole list at once (one launch on a GPU).

    The tensors must not overlap in memory (``ValueError`` naming both entries); a tensor with
    internally overlapping memory (an expanded view) cannot be written in place (``ValueError``).
    """
    ts = V.tensor_list(tensors, "tensors")
    if ts:
        V.same_device_lists([("tensors", ts)])
        for i, t in enumerate(ts):
            V.writable_in_place(t, "tensors", i)
        V.no_overlap([("tensors", ts, True)])
        dispatch("force_finite_", ts)
