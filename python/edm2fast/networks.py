"""The EDM2 network: :class:`Block`, :class:`UNet` and :class:`Precond` (spec §2-4, paper Fig. 21).

Every magnitude-preserving layer is an ``mk.*`` call, so choosing an mpkernels
backend swaps every layer at once. Module and parameter names follow the spec,
so state dicts map key-for-key onto the authors' released checkpoints.
"""

from __future__ import annotations

import math

import torch

import mpkernels as mk
from mpkernels.nn import MPConv, MPFourier

__all__ = ["Block", "UNet", "Precond", "set_forced_weight_norm", "forced_norm_weights"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Block(torch.nn.Module):
    """U-Net encoder/decoder block (spec §2, paper Fig. 21)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0, res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float = 256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor: expected 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"resample_mode: expected 'keep', 'up' or 'down', got {resample_mode!r}")
        if attention and out_channels % channels_per_head != 0:
            raise ValueError(f"channels_per_head: {channels_per_head} does not divide out_channels={out_channels}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def _residual_sum(self, x, y, t):
        if self.clip_act is None:
            return mk.mp_sum(x, y, t)
        return mk.mp_sum_clip(x, y, t, self.clip_act)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = mk.resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x, y = mk.pixel_norm_mp_silu(x)  # pixel norm, then MP-SiLU for the residual branch, fused
        else:
            y = mk.mp_silu(x)
        y = self.conv_res0(y)
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mk.modulated_mp_silu(y, c)
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        if self.num_heads == 0:
            return self._residual_sum(x, y, self.res_balance)  # clip only after the last sum (spec §2 step 7)
        x = mk.mp_sum(x, y, self.res_balance)
        # The qkv weight's rows come out head-contiguous (the parameter keeps the release's
        # interleaved order): the same attention, read as contiguous q, k, v tiles.
        qkv = self.attn_qkv(x, qkv_heads=self.num_heads)
        y = self.attn_proj(mk.cosine_attention(qkv, self.num_heads, layout="head_contiguous"))
        return self._residual_sum(x, y, self.attn_balance)


class UNet(torch.nn.Module):
    """EDM2 U-Net (spec §3)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None, num_blocks: int = 3,
                 attn_resolutions=(16, 8), label_balance: float = 0.5, concat_balance: float = 0.5,
                 **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                     **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                           attention=res in attn_resolutions, **block_kwargs)

        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up",
                                                   **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                           attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError(f"class_labels: required, this UNet has label_dim={self.label_dim}")
            emb = mk.mp_sum(emb, self.emb_label(class_labels * math.sqrt(self.label_dim)).to(emb.dtype),
                            t=self.label_balance)
        emb = mk.mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mk.mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(torch.nn.Module):
    """EDM preconditioning around the U-Net, plus the learned loss-weight head u(sigma) (spec §4).

    ``use_fp16=True`` keeps the reference meaning (fp16 U-Net on CUDA, fp32
    elsewhere); ``dtype='fp16'|'bf16'|'fp32'`` chooses the compute precision
    explicitly on every device. ``channels_last=True`` runs the U-Net in the
    channels_last memory format.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, dtype: str | None = None,
                 channels_last: bool = False, **unet_kwargs):
        super().__init__()
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or None, got {dtype!r}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.dtype = dtype
        self.channels_last = channels_last
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)

    def compute_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        if force_fp32:
            return torch.float32
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        return torch.float16 if self.use_fp16 and device.type == "cuda" else torch.float32

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, force_fp32: bool = False,
                return_logvar: bool = False):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"x: expected an [N, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        elif sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma: {sigma.shape[0]} values for a batch of {x.shape[0]}")
        if self.label_dim:
            if class_labels is None:
                class_labels = torch.zeros([x.shape[0], self.label_dim], device=x.device)
            elif tuple(class_labels.shape) != (x.shape[0], self.label_dim):
                raise ValueError(f"class_labels: expected [{x.shape[0]}, {self.label_dim}], "
                                 f"got {tuple(class_labels.shape)}")
            class_labels = class_labels.to(torch.float32)
        else:
            class_labels = None
        dtype = self.compute_dtype(x.device, force_fp32)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        x_in = (c_in * x).to(dtype)
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        F_x = self.unet(x_in, c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x, logvar


def forced_norm_weights(net: torch.nn.Module) -> list[torch.Tensor]:
    """Every MPConv weight of ``net``: the tensors forced weight normalization applies to."""
    return [m.weight for m in net.modules() if isinstance(m, MPConv)]


def set_forced_weight_norm(net: torch.nn.Module, enabled: bool) -> None:
    """Turn the in-forward forced weight normalization of every MPConv on or off.

    With it off, call ``mk.force_normalize_(forced_norm_weights(net))`` once before each
    training step instead (same training, compile- and CUDA-graph-friendly forward).
    """
    for m in net.modules():
        if isinstance(m, MPConv):
            m.forced_weight_norm = bool(enabled)

