"""Pure-PyTorch reference of every magnitude-preserving op: the oracle.

Written straight from the equations of ``shared/EDM2_SPEC.md`` §1 (Karras et al.
2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Appendix B.2 and Eq. 66 for forced weight normalization). Every fast path is
tested against these functions; keep them short and literal.

Conventions (spec §1): statistics (norms, sums of squares) are computed in
float32, or in float64 for float64 inputs; results come back in the input
dtype. Arguments are assumed to be validated by :mod:`mpkernels.functional`.
Autograd is PyTorch's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MP_SILU_SCALE = 0.596  # std of silu(z) for z ~ N(0, 1), spec §1


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for statistics: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """``x / (eps + ||x||_2 / sqrt(K))`` over ``dim`` (spec §1, paper Eq. 66 / App. B.2).

    ``K`` is the number of elements reduced over; ``dim=None`` reduces over every
    dim but the first. The norm is taken in fp32; the denominator is cast to
    ``x.dtype`` before the division.
    """
    dims = tuple(range(1, x.ndim)) if dim is None else (tuple(dim) if isinstance(dim, (list, tuple)) else (dim,))
    k = math.prod([x.shape[d] for d in dims])
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=stat_dtype(x.dtype))
    return x / (eps + norm * (1.0 / math.sqrt(k))).to(x.dtype)


def pixel_norm(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Pixel norm: :func:`normalize` over the channel dim (spec §1, paper App. B.2)."""
    return normalize(x, dim=1, eps=eps)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU: ``silu(x) / 0.596`` (spec §1, paper App. B.2)."""
    return F.silu(x) / MP_SILU_SCALE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``lerp(a, b, t) / sqrt((1-t)^2 + t^2)`` (spec §1, paper App. B.2)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (spec §1, paper App. B.2).

    ``C = sqrt((Na + Nb) / ((1-t)^2 + t^2))``;
    result ``cat([C / sqrt(Na) * (1-t) * a, C / sqrt(Nb) * t * b], dim)``.
    """
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)



def mp_cat_mp_silu(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5):
    """``(x, mp_silu(x))`` with ``x = mp_cat(a, b, dim, t)`` (decoder Block input, spec §2)."""
    x = mp_cat(a, b, dim, t)
    return x, mp_silu(x)

def mp_fourier(x: torch.Tensor, freqs: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving Fourier features ``sqrt(2) * cos(outer(x, freqs) + phases)`` (spec §1).

    ``freqs`` and ``phases`` are stored already multiplied by 2*pi. Computed in
    fp32, returned in ``x.dtype``; ``x: [N] -> [N, C]``.
    """
    sd = stat_dtype(x.dtype)
    y = torch.outer(x.to(sd), freqs.to(sd)) + phases.to(sd)
    return (y.cos() * math.sqrt(2)).to(x.dtype)


ATTENTION_LAYOUTS = ("interleaved", "head_contiguous")


def head_contiguous_rows(channels: int, num_heads: int, device=None) -> torch.Tensor:
    """Row order that takes qkv channels from the release's interleaved layout to head-contiguous.

    Entry ``head*3*D + j*D + d`` is ``head*3*D + 3*d + j`` (``D = channels / (3*num_heads)``,
    ``j`` = q, k, v): ``qkv_hc = qkv.index_select(1, head_contiguous_rows(...))``.
    """
    return torch.arange(channels, device=device).reshape(num_heads, -1, 3).transpose(1, 2).reshape(-1)


def mp_weight(w: torch.Tensor, gain=1.0, eps: float = 1e-4, qkv_heads: int | None = None) -> torch.Tensor:
    """Effective weight of an MPConv: ``normalize(w) * gain / sqrt(fan_in)`` (spec §1 MPConv steps 1, 3, 4).

    ``normalize`` is the traditional (differentiable) weight normalization over
    each output row; ``fan_in = w[0].numel()``. Returns fp32 (fp64 for fp64 ``w``);
    callers cast to the compute dtype. ``qkv_heads``: ``w`` is a qkv projection for that many
    heads; the rows come out in :func:`head_contiguous_rows` order.
    """
    w = w.to(stat_dtype(w.dtype))
    y = normalize(w, eps=eps) * (gain / math.sqrt(w[0].numel()))
    if qkv_heads is not None:
        y = y.index_select(0, head_contiguous_rows(w.shape[0], qkv_heads, w.device))
    return y


def mp_conv2d(x: torch.Tensor, w: torch.Tensor, gain=1.0, qkv_heads: int | None = None) -> torch.Tensor:
    """``conv2d(x, mp_weight(w, gain).to(x.dtype), padding=k//2)`` (spec §1 MPConv step 5)."""
    return F.conv2d(x, mp_weight(w, gain, qkv_heads=qkv_heads).to(x.dtype), padding=w.shape[-1] // 2)


def mp_linear(x: torch.Tensor, w: torch.Tensor, gain=1.0) -> torch.Tensor:
    """``x @ mp_weight(w, gain).to(x.dtype).T`` (spec §1 MPConv step 5)."""
    return F.linear(x, mp_weight(w, gain).to(x.dtype))


def cosine_attention(qkv: torch.Tensor, num_heads: int, layout: str = "interleaved") -> torch.Tensor:
    """Cosine attention of an EDM2 Block (spec §1, paper App. B.2).

    ``qkv: [N, 3C, H, W]`` with channel index ``head*(3*c_head) + c*3 + j`` (j = q, k, v), or
    ``head*(3*c_head) + j*c_head + c`` for ``layout='head_contiguous'``.
    Every q, k and v vector is normalized to unit RMS over its ``c_head`` channels,
    ``A = softmax_k(q^T k / sqrt(c_head))``, ``y = v A^T``; returns ``[N, C, H, W]``.
    """
    n, c3, h, w = qkv.shape
    d = c3 // (3 * num_heads)
    if layout == "head_contiguous":
        q, k, v = normalize(qkv.reshape(n, num_heads, 3, d, h * w), dim=3).unbind(2)
    else:
        q, k, v = normalize(qkv.reshape(n, num_heads, d, 3, h * w), dim=2).unbind(3)
    a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
    y = torch.einsum("nhqk,nhck->nhcq", a, v)
    return y.reshape(n, c3 // 3, h, w)


def pixel_norm_mp_silu(x: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_norm(x), mp_silu(pixel_norm(x)))``: encoder-block input and residual-branch input (spec §2 steps 2-3)."""
    xn = pixel_norm(x, eps)
    return xn, mp_silu(xn)


def modulated_mp_silu(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``mp_silu(y * c[:, :, None, None])``, the embedding modulation of a Block (spec §2 step 3)."""
    return mp_silu(y * c.to(y.dtype)[:, :, None, None])


def mp_sum_clip(a: torch.Tensor, b: torch.Tensor, t: float, clip: float) -> torch.Tensor:
    """``clip(mp_sum(a, b, t), -clip, clip)``: residual sum and activation clipping (spec §2 steps 5-7)."""
    return mp_sum(a, b, t).clamp(-clip, clip)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """Resampling with the [1, 1] filter (spec §1): 2x2 average pool ('down'), 2x nearest ('up')."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


@torch.no_grad()
def force_normalize_(tensors: list[torch.Tensor], eps: float = 1e-4) -> None:
    """Forced weight normalization, in place: each ``w <- normalize(w)`` (spec §1 MPConv step 2, paper Eq. 66)."""
    for w in tensors:
        w.copy_(normalize(w.to(stat_dtype(w.dtype)), eps=eps))


@torch.no_grad()
def ema_lerp_(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], weight) -> None:
    """EMA update, in place: each ``e <- e + weight * (t - e)`` (spec §7).

    ``weight``: a number, or a 0-d tensor (read on the device, e.g. by a replayed CUDA graph),
    applied in the statistics dtype.
    """
    for e, t in zip(ema_tensors, tensors):
        if isinstance(weight, torch.Tensor):
            sd = stat_dtype(e.dtype)
            e.copy_(torch.lerp(e.to(sd), t.to(sd), weight.to(sd)))
        else:
            e.lerp_(t.to(e.dtype), weight)


@torch.no_grad()
def force_finite_(tensors: list[torch.Tensor]) -> None:
    """Gradient clean-up, in place: every inf / NaN element of each tensor becomes 0
    (``torch.nan_to_num(t, nan=0, posinf=0, neginf=0)``; spec §6, before the Adam step)."""
    for t in tensors:
        torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0, out=t)


def mp_weights(weights: list[torch.Tensor], gains=None, eps: float = 1e-4, qkv_heads=None,
               dtypes=None) -> list[torch.Tensor]:
    """Effective weights of many MPConv layers: ``mp_weight(w_i, gain_i, eps, qkv_heads_i).to(dtype_i)``.

    ``gains``, ``qkv_heads``, ``dtypes``: lists with one entry per weight (None: 1.0, None, float32).
    A one-element tensor gain acts as a scalar.
    """
    n = len(weights)
    gains = [1.0] * n if gains is None else gains
    qkv_heads = [None] * n if qkv_heads is None else qkv_heads
    dtypes = [torch.float32] * n if dtypes is None else dtypes
    return [mp_weight(w, g.reshape(()) if isinstance(g, torch.Tensor) else g, eps, qkv_heads=h).to(d)
            for w, g, h, d in zip(weights, gains, qkv_heads, dtypes)]


def mp_weights_forced(weights: list[torch.Tensor], gains=None, eps: float = 1e-4, qkv_heads=None,
                      dtypes=None) -> list[torch.Tensor]:
    """Forced weight normalization of every weight in place (:func:`force_normalize_`, its default eps;
    spec §1 MPConv step 2, paper Eq. 66), then :func:`mp_weights` of the updated weights."""
    force_normalize_(weights)
    return mp_weights(weights, gains, eps, qkv_heads, dtypes)
