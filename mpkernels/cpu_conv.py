"""CPU convolutions of the EDM2 network's effective weights, where a faster call computes the same
convolution:

* :func:`conv2d_1x1_gemm`: a 1x1 convolution of a small channels_last activation as one matrix
  product (forward and, through autograd, backward), instead of oneDNN's convolution;
* :func:`conv2d_fixed_weight`: a convolution with a fixed weight, the weight reordered once into
  oneDNN's blocked layout and reused (what inductor does for frozen inference graphs).

1x1 as a GEMM: a channels_last ``[N, C, H, W]`` activation is, in memory, the matrix
``[N*H*W, C]``, so ``conv2d(x, w)`` with ``w: [O, C, 1, 1]`` is ``x2d @ w2d.T``, a ``[N*H*W, O]``
matrix that is the channels_last output, with no copy either way; autograd's matrix-product
backward gives both gradients with two more GEMMs (the input gradient channels_last, as
``F.conv2d``'s). At the EDM2 network's small activations oneDNN's convolution has a fixed cost
that the GEMM does not: on the benchmark's 2-vCPU machine, forward and backward of
``[2, 64, 8, 8] x [64, 64, 1, 1]`` took 244 us with ``F.conv2d`` and 93 us as a GEMM, while at
``N*H*W = 2048`` and above the two were within 10 % of each other, ``F.conv2d`` ahead. The GEMM is
used up to :data:`GEMM_1X1_MAX_PIXELS` output pixels, for float32 CPU tensors with more than one
input channel; results equal ``F.conv2d``'s up to float32 rounding (the summation order of the
GEMM and of oneDNN may differ).

``F.conv2d`` on a CPU tensor reorders its weight into oneDNN's blocked layout on every call;
at the small spatial sizes of an EDM2 sampler run on a CPU that is a fifth or more of the
convolution's time. :func:`conv2d_fixed_weight` does the reorder once per (weight, input shape)
and keeps the packed weight in a dictionary the caller owns and drops with the weight (the
EDM2 network keeps it next to its cached eval-mode effective weights, see
``edm2fast.networks.effective_weights``).

Used only where it is the same convolution: float32 CPU tensors, no autograd, a channels_last
input with more than one channel (the packed call returns channels_last, as ``F.conv2d`` does for
such an input; one channel leaves the layout ambiguous), a 4-D
weight with odd square kernel and ``padding = k // 2``, oneDNN enabled. The results equal
``F.conv2d``'s up to float32 rounding (oneDNN may pick another blocking for the packed weight);
everything else, and any failure of the private oneDNN entry points (checked once), goes to
``F.conv2d``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["conv2d_1x1_gemm", "conv2d_1x1_gemm_eligible", "conv2d_fixed_weight", "fixed_weight_packing_available",
           "GEMM_1X1_MAX_PIXELS"]

# Largest N*H*W for which a 1x1 convolution runs as one GEMM (see the module docstring).
GEMM_1X1_MAX_PIXELS = 1024


def conv2d_1x1_gemm_eligible(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`conv2d_1x1_gemm` computes ``F.conv2d(x, w)`` here: float32 CPU tensors, a
    ``[O, C, 1, 1]`` weight, a channels_last ``[N, C, H, W]`` input with ``C > 1`` (one channel
    leaves the layout ambiguous) and ``0 < N*H*W <= GEMM_1X1_MAX_PIXELS``."""
    return (x.ndim == 4 and w.ndim == 4 and w.shape[-1] == 1 and w.shape[-2] == 1
            and x.device.type == "cpu" and w.device.type == "cpu"
            and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.shape[1] == w.shape[1] and x.shape[1] > 1
            and 0 < x.shape[0] * x.shape[2] * x.shape[3] <= GEMM_1X1_MAX_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last))


def conv2d_1x1_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, w)`` for a 1x1 ``w`` and a channels_last ``x`` as one matrix product (autograd
    included); the result is channels_last. Callers check :func:`conv2d_1x1_gemm_eligible`."""
    n, c, h, wd = x.shape
    y = torch.mm(x.permute(0, 2, 3, 1).reshape(n * h * wd, c), w.reshape(w.shape[0], c).t())
    return y.view(n, h, wd, w.shape[0]).permute(0, 3, 1, 2)


@functools.cache
def fixed_weight_packing_available() -> bool:
    """Whether this torch build has the oneDNN weight packing this module uses (checked once)."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
            return False
        g = torch.Generator().manual_seed(0)  # not the global generator: no side effect on a user's stream
        x = torch.randn(1, 3, 5, 5, generator=g)
        w = torch.randn(4, 3, 3, 3, generator=g)
        got = _packed_call(x, _pack(w, x.shape, 1), 1)
        return bool(torch.allclose(got, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return False


def _pack(w: torch.Tensor, input_shape, pad: int) -> torch.Tensor:
    return torch._C._nn.mkldnn_reorder_conv2d_weight(w.detach().contiguous().to_mkldnn(), [pad, pad], [1, 1],
                                                     [1, 1], 1, list(input_shape))


def _packed_call(x: torch.Tensor, packed: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, packed, None, [pad, pad], [1, 1], [1, 1], 1, "none", [], "")


def _eligible(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.ndim == 4 and w.ndim == 4 and w.shape[-1] == w.shape[-2]
            and w.shape[-1] % 2 == 1 and x.shape[1] == w.shape[1] and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling()
            and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last))


def conv2d_fixed_weight(x: torch.Tensor, w: torch.Tensor, packs: dict) -> torch.Tensor:
    """``F.conv2d(x, w, padding=w.shape[-1] // 2)``, with ``w``'s oneDNN packing kept in ``packs``
    (one entry per input shape) when that is the same convolution (see the module docstring)."""
    pad = w.shape[-1] // 2
    if not (_eligible(x, w) and fixed_weight_packing_available()):
        return torch.nn.functional.conv2d(x, w, padding=pad)
    key = tuple(x.shape)
    packed = packs.get(key)
    if packed is None:
        packed = packs[key] = _pack(w, x.shape, pad)
    return _packed_call(x, packed, pad)
