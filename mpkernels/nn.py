"""Magnitude-preserving modules: :class:`MPConv` and :class:`MPFourier` (spec §1)."""

from __future__ import annotations



import numpy as np
import torch

from . import functional as mkf

__all__ = ["MPConv", "MPFourier"]


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (``kernel=[k, k]``) or linear layer (``kernel=[]``), no bias.

    forward(x, gain=1), spec §1 "MPConv":

    1. training mode only, under ``no_grad``: forced weight normalization, the stored
       parameter is overwritten with ``normalize(weight)`` (paper Eq. 66);
    2. traditional weight normalization with gradient, scaled by ``gain / sqrt(fan_in)``
       and cast to ``x.dtype`` (:func:`mpkernels.mp_weight`);
    3. ``conv2d(x, w, padding=k//2)`` or ``x @ w.T``.

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

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        if self.training and self.forced_weight_norm:
            with torch.no_grad():
                mkf.force_normalize_([self.weight])
        if self.weight.ndim == 4:
            return mkf.mp_conv2d(x, self.weight, gain)
        return mkf.mp_linear(x, self.weight, gain)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}"


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


