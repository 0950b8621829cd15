"""The twelve EDM2 configurations of the paper (spec §5): network kwargs plus training hyperparameters.

``PRESETS[name]`` is a plain dict::

    {'network': {img_resolution, img_channels, model_channels, dropout},
     'lr': ref_lr, 'decay': t_ref in iterations (ref_batches), 'duration': total images,
     'P_mean', 'P_std', 'batch': 2048, 'betas': (0.9, 0.99), 'ema_stds': (0.050, 0.100),
     'data': 'latents' (img512: 64x64x4 VAE latents) or 'pixels' (img64: 64x64x3)}

``build(name, label_dim=1000, **overrides)`` returns the :class:`~edm2fast.networks.Precond`.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .networks import Precond

__all__ = ["PRESETS", "build", "network_kwargs"]

Mi = 1 << 20

# name: (channels, dropout, ref lr, decay t_ref in iterations, duration in Mi images, P_mean, P_std)
_TABLE = {
    "edm2-img512-xxs": (64, 0.00, 0.0170, 70000, 2048, -0.4, 1.0),
    "edm2-img512-xs": (128, 0.00, 0.0120, 70000, 2048, -0.4, 1.0),
    "edm2-img512-s": (192, 0.00, 0.0100, 70000, 2048, -0.4, 1.0),
    "edm2-img512-m": (256, 0.10, 0.0090, 70000, 2048, -0.4, 1.0),
    "edm2-img512-l": (320, 0.10, 0.0080, 70000, 1792, -0.4, 1.0),
    "edm2-img512-xl": (384, 0.10, 0.0070, 70000, 1280, -0.4, 1.0),
    "edm2-img512-xxl": (448, 0.10, 0.0065, 70000, 896, -0.4, 1.0),
    "edm2-img64-xs": (128, 0.00, 0.0120, 35000, 1024, -0.8, 1.6),
    "edm2-img64-s": (192, 0.00, 0.0100, 35000, 1024, -0.8, 1.6),
    "edm2-img64-m": (256, 0.10, 0.0090, 35000, 2048, -0.8, 1.6),
    "edm2-img64-l": (320, 0.10, 0.0080, 35000, 1024, -0.8, 1.6),
    "edm2-img64-xl": (384, 0.10, 0.0070, 35000, 640, -0.8, 1.6),
}


def _preset(name: str, row) -> dict:
    channels, dropout, lr, decay, duration_mi, p_mean, p_std = row
    latent = name.startswith("edm2-img512")
    return {
        "network": {"img_resolution": 64, "img_channels": 4 if latent else 3, "model_channels": channels,
                    "dropout": dropout},
        "lr": lr, "decay": decay, "duration": duration_mi * Mi, "P_mean": p_mean, "P_std": p_std,
        "batch": 2048, "betas": (0.9, 0.99), "ema_stds": (0.050, 0.100),
        "data": "latents" if latent else "pixels",
    }


PRESETS: dict[str, dict] = {name: _preset(name, row) for name, row in _TABLE.items()}


def network_kwargs(name: str, label_dim: int = 1000, **overrides) -> dict:
    """Constructor kwargs of :class:`Precond` for preset ``name`` (``overrides`` win)."""
    if name not in PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if isinstance(label_dim, bool) or not isinstance(label_dim, int) or label_dim < 0:
        raise ValueError(f"label_dim: expected an int >= 0, got {label_dim!r}")
    kwargs = copy.deepcopy(PRESETS[name]["network"])
    kwargs["label_dim"] = label_dim
    kwargs.update(overrides)
    return kwargs


def build(name: str, label_dim: int = 1000, device=None, **overrides) -> Precond:
    """Build the :class:`Precond` of preset ``name``; ``device='meta'`` allocates no memory."""
    kwargs = network_kwargs(name, label_dim, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Precond(**kwargs)

