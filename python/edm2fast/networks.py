"""The EDM2 network: :class:`Block`, :class:`UNet` and :class:`Precond` (spec §2-4, paper Fig. 21).

Every magnitude-preserving layer is an ``mk.*`` call, so choosing an mpkernels
backend swaps every layer at once. Module and parameter names follow the spec,
so state dicts map key-for-key onto the authors' released checkpoints.

A whole forward computes the effective weight of every MPConv (spec §1 MPConv steps
1-4) with one :func:`mpkernels.mp_weights` call (one launch per dtype group on a fused
backend, and one for all their gradients) and hands them down; the 36 ``emb_linear``
layers run as one matmul. Block and MPConv still work standalone, computing their own.

Block boundaries are fused: a Block returns its last residual sum unevaluated, and the next
Block's input preparation evaluates it in one kernel together with what reads it
(:func:`mpkernels.mp_sum_clip_pixel_norm_mp_silu` in the encoder, where the sum is also a skip;
:func:`mpkernels.mp_sum_clip_mp_cat_mp_silu` in the decoder; the 'up' Blocks take
:func:`mpkernels.resample_up_mp_silu`). Each fused op's backward takes the gradients of all its
outputs, so a tensor used twice needs no separate gradient sum.
"""

from __future__ import annotations

import math

import torch

import mpkernels as mk
from mpkernels.nn import MPConv, MPFourier

__all__ = ["Block", "UNet", "Precond", "set_forced_weight_norm", "forced_norm_weights", "fold_forced_norm",
           "effective_weights", "clear_weight_cache"]

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

    def mp_layers(self):
        """``(name, MPConv, gain, qkv_heads, on_emb)`` of every MPConv, for :func:`effective_weights`."""
        layers = [("conv_res0", self.conv_res0, 1, None, False),
                  ("emb_linear", self.emb_linear, self.emb_gain, None, True),
                  ("conv_res1", self.conv_res1, 1, None, False)]
        if self.conv_skip is not None:
            layers.append(("conv_skip", self.conv_skip, 1, None, False))
        if self.num_heads:
            # The qkv weight's rows come out head-contiguous (the parameter keeps the release's
            # interleaved order): the same attention, read as contiguous q, k, v tiles.
            layers += [("attn_qkv", self.attn_qkv, 1, self.num_heads, False),
                       ("attn_proj", self.attn_proj, 1, None, False)]
        return layers

    def takes_fused_input(self) -> bool:
        """Whether the caller may hand this Block its prepared input ``pre`` (see :meth:`forward`): an
        encoder Block that keeps the resolution and has no skip convolution (input = pixel norm of
        the previous output), or a decoder Block (input = the concatenation, or the upsampled x)."""
        if self.flavor == "enc":
            return self.resample_mode == "keep" and self.conv_skip is None
        return self.resample_mode in ("keep", "up")

    def forward(self, x: torch.Tensor | None, emb: torch.Tensor | None, *, weights: dict | None = None,
                c: torch.Tensor | None = None, x_silu: torch.Tensor | None = None, pre=None, defer: bool = False):
        """``weights``: effective weights by local name (``'conv_res0'``, ...; see :meth:`mp_layers`),
        as :func:`effective_weights` makes them; None: each MPConv computes its own. ``c``: the
        modulation ``emb_linear(emb, gain=emb_gain) + 1`` ([N, out_channels], any strides), computed
        by the caller for all blocks at once; ``emb`` is then unused. ``x_silu`` (decoder blocks
        without resampling): ``mp_silu(x)``, computed by the caller together with ``x``
        (:func:`mpkernels.mp_cat_mp_silu`).

        ``pre = (xr, xs)``: the residual-branch input already prepared by the caller (``x`` is then
        unused), for Blocks where :meth:`takes_fused_input`: ``xr`` the pixel-normalized input
        (encoder), the upsampled input (decoder 'up') or the concatenation (decoder), and
        ``xs = mp_silu(xr)``. The caller computes them fused with the previous Block's last sum.

        ``defer=True`` returns ``(x, y, t, clip)`` instead of ``mp_sum_clip(x, y, t, clip)`` (``clip``
        may be None: a plain ``mp_sum``), the last residual sum, for the caller to fuse it with what
        reads the result.
        """
        w = weights if weights is not None else {}
        if x_silu is not None:
            if self.flavor != "dec" or self.resample_mode != "keep":
                raise ValueError("x_silu: only for decoder blocks that keep the resolution")
            if pre is not None:
                raise ValueError("x_silu: give either x_silu or pre, not both")
            pre = (x, x_silu)
        if pre is not None:
            if not self.takes_fused_input():
                raise ValueError("pre: this Block prepares its own input (resampling down, or a skip convolution "
                                 "before the pixel norm)")
            x, y = pre
        else:
            x = mk.resample(x, self.resample_mode)
            if self.flavor == "enc":
                if self.conv_skip is not None:
                    x = self.conv_skip(x, weight=w.get("conv_skip"))
                x, y = mk.pixel_norm_mp_silu(x)  # pixel norm, then MP-SiLU for the residual branch, fused
            else:
                y = mk.mp_silu(x)
        y = self.conv_res0(y, weight=w.get("conv_res0"))
        if c is None:
            if "emb_linear" in w:
                c = self.emb_linear(emb, weight=w["emb_linear"]) + 1
            else:
                c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mk.modulated_mp_silu(y, c)
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y, weight=w.get("conv_res1"))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x, weight=w.get("conv_skip"))
        if self.num_heads:
            x = mk.mp_sum(x, y, self.res_balance)
            if "attn_qkv" in w:
                qkv = self.attn_qkv(x, weight=w["attn_qkv"])  # rows already head-contiguous (mp_layers)
            else:
                qkv = self.attn_qkv(x, qkv_heads=self.num_heads)
            y = self.attn_proj(mk.cosine_attention(qkv, self.num_heads, layout="head_contiguous"),
                               weight=w.get("attn_proj"))
        t = self.attn_balance if self.num_heads else self.res_balance
        # clip only after the last sum (spec §2 step 7)
        return (x, y, t, self.clip_act) if defer else _settle((x, y, t, self.clip_act))


def _settle(pending):
    """The last residual sum of a Block from its deferred ``(x, y, t, clip)``."""
    x, y, t, clip = pending
    return mk.mp_sum(x, y, t) if clip is None else mk.mp_sum_clip(x, y, t, clip)


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

    def mp_layers(self, x_dtype: torch.dtype, emb_dtype: torch.dtype, label_dtype: torch.dtype | None = None):
        """``(name, MPConv, gain, qkv_heads, dtype)`` of every MPConv, named like ``named_modules()``:
        convolutions in the compute dtype ``x_dtype``, the embedding layers in ``emb_dtype``
        (the noise labels' dtype) and ``label_dtype``."""
        layers = [("emb_noise", self.emb_noise, 1, None, emb_dtype)]
        if self.emb_label is not None:
            layers.append(("emb_label", self.emb_label, math.sqrt(self.label_dim), None, label_dtype or emb_dtype))
        for part, blocks in (("enc", self.enc), ("dec", self.dec)):
            for name, block in blocks.items():
                if isinstance(block, MPConv):
                    layers.append((f"{part}.{name}", block, 1, None, x_dtype))
                    continue
                for local, conv, gain, heads, on_emb in block.mp_layers():
                    layers.append((f"{part}.{name}.{local}", conv, gain, heads, emb_dtype if on_emb else x_dtype))
        layers.append(("out_conv", self.out_conv, self.out_gain, None, x_dtype))
        return layers

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, *,
                weights: dict | None = None):
        """``weights``: every MPConv's effective weight by name (:meth:`mp_layers`, made by
        :func:`effective_weights`); None computes them here, in one multi-tensor call."""
        if self.emb_label is not None and class_labels is None:
            raise ValueError(f"class_labels: required, this UNet has label_dim={self.label_dim}")
        if weights is None:
            label_dtype = class_labels.dtype if self.emb_label is not None else None
            weights = effective_weights(self, self.mp_layers(x.dtype, noise_labels.dtype, label_dtype))
        emb = self.emb_noise(self.emb_fourier(noise_labels), weight=weights["emb_noise"])
        if self.emb_label is not None:
            # the release scales the labels by sqrt(label_dim); mp_layers puts it in the weight's gain
            emb = mk.mp_sum(emb, self.emb_label(class_labels, weight=weights["emb_label"]).to(emb.dtype),
                            t=self.label_balance)
        emb = mk.mp_silu(emb)

        # Every Block's modulation c = emb_linear(emb, gain=emb_gain) + 1 in one matmul over the
        # concatenated effective weights; each Block reads its columns (a row-strided view).
        blocks = [(f"{part}.{name}", block) for part, group in (("enc", self.enc), ("dec", self.dec))
                  for name, block in group.items() if isinstance(block, Block)]
        w_emb = torch.cat([weights[f"{name}.emb_linear"] for name, _ in blocks])
        c_all = torch.mm(emb, w_emb.to(emb.dtype).t()).add_(1)
        cs = dict(zip([name for name, _ in blocks], torch.split(c_all, [b.out_channels for _, b in blocks], dim=1)))

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        # Each Block hands back its last residual sum unevaluated (``pending``); the next Block's
        # input preparation evaluates it in the same kernel (encoder: the sum, which is also the
        # skip, with the next pixel norm and MP-SiLU; decoder: the sum with the concatenation and
        # MP-SiLU), so the sum is never re-read and its two uses need no separate gradient sum.
        skips = []
        pending = None
        for name, block in self.enc.items():
            if isinstance(block, MPConv):
                x = block(x, weight=weights[f"enc.{name}"])
                skips.append(x)
                continue
            pre = None
            if pending is not None:
                if block.takes_fused_input():
                    x, xn, xs = mk.mp_sum_clip_pixel_norm_mp_silu(*pending)
                    pre = (xn, xs)
                else:
                    x = _settle(pending)
                skips.append(x)
            pending = block(x, None, weights=_local(weights, f"enc.{name}.", block), c=cs[f"enc.{name}"], pre=pre,
                            defer=True)
        if pending is not None:
            x = _settle(pending)
            skips.append(x)
            pending = None
        for name, block in self.dec.items():
            if "block" in name:  # the concatenation and the Block's first MP-SiLU in one pass
                if pending is not None:
                    px, py, pt, pclip = pending
                    pre = mk.mp_sum_clip_mp_cat_mp_silu(px, py, skips.pop(), pt, pclip, self.concat_balance)
                else:
                    pre = mk.mp_cat_mp_silu(x, skips.pop(), t=self.concat_balance)
            else:
                if pending is not None:
                    x = _settle(pending)
                pre = mk.resample_up_mp_silu(x) if block.resample_mode == "up" else None
            pending = block(x, None, weights=_local(weights, f"dec.{name}.", block), c=cs[f"dec.{name}"], pre=pre,
                            defer=True)
        x = _settle(pending) if pending is not None else x
        return self.out_conv(x, weight=weights["out_conv"])


def _local(weights: dict, prefix: str, block: Block) -> dict:
    return {name: weights[prefix + name] for name, *_ in block.mp_layers() if name != "emb_linear"}


def effective_weights(owner: torch.nn.Module, layers) -> dict:
    """The effective weight of every MPConv in ``layers`` (``(name, MPConv, gain, qkv_heads, dtype)``,
    see :meth:`UNet.mp_layers`), by name, from one :func:`mpkernels.mp_weights` call.

    Training mode first applies each MPConv's forced weight normalization (paper Eq. 66) to all
    of them at once (the same update each MPConv would make): inside the ``mp_weights`` call
    (``force_normalize=True``: one launch for both on a fused backend) when every layer has it on
    or :func:`fold_forced_norm` asked for it, else with one :func:`mpkernels.force_normalize_`
    call over those that have it. In eval mode without autograd the result is cached on ``owner`` and reused
    while no parameter changed (same tensors, same ``_version``): the sampler evaluates the
    network many times with the same weights (on a CPU the cached convolution weights are also packed
    for oneDNN once, :mod:`mpkernels.cpu_conv`). Never while compiling or capturing a CUDA graph.
    In-place writes through ``param.data`` bypass the version counter; call
    :func:`clear_weight_cache` after them.
    """
    compiling = torch.compiler.is_compiling()
    # Not while compiling: the flag is for the eager step (and torch 2.11's Dynamo cannot trace
    # ``__dict__.pop``).
    requested = not compiling and owner.__dict__.pop("_fold_forced_norm", False) and owner.training
    forced = [conv.weight for _, conv, *_ in layers if conv.training and conv.forced_weight_norm]
    fold = requested or len(forced) == len(layers)  # normalized in place inside mp_weights (spec §1 step 2)
    if requested:  # fold_forced_norm promised every MPConv weight of owner
        unlisted = _unlisted_weights(owner, layers)
        if unlisted:
            with torch.no_grad():
                mk.force_normalize_(unlisted)
    elif forced and not fold:
        with torch.no_grad():
            mk.force_normalize_(forced)
    key = None
    cacheable = not (compiling or owner.training or torch.is_grad_enabled() or _capturing(layers[0][1].weight))
    if cacheable:
        key = _weight_key(layers)
        cached = owner.__dict__.get("_mp_weight_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
    out = mk.mp_weights([conv.weight for _, conv, *_ in layers], [gain for _, _, gain, *_ in layers],
                        qkv_heads=[heads for *_, heads, _ in layers], dtypes=[dtype for *_, dtype in layers],
                        force_normalize=fold)
    weights = dict(zip([name for name, *_ in layers], out))
    if key is not None:  # fixed until a parameter changes: CPU convolutions may pack them once for oneDNN
        for w in weights.values():
            if w.ndim == 4 and w.device.type == "cpu" and w.dtype == torch.float32:
                w._mk_conv_packs = {}
    if not compiling:  # a plain attribute: not a buffer, never in the state dict
        owner.__dict__["_mp_weight_cache"] = None if key is None else (key, weights)
    return weights


def _capturing(w: torch.Tensor) -> bool:
    """A CUDA graph is being captured: the graph must compute the weights itself (a cached tensor
    would be a constant of the graph, stale once the parameters change in place)."""
    return w.is_cuda and torch.cuda.is_current_stream_capturing()


def _weight_key(layers) -> tuple:
    """What the effective weights depend on: each tensor's identity, storage and version, and the settings."""
    key = []
    for name, conv, gain, heads, dtype in layers:
        w = conv.weight
        key.append((name, id(w), w.data_ptr(), w._version, heads, dtype))
        if isinstance(gain, torch.Tensor):
            key.append((id(gain), gain.data_ptr(), gain._version))
        else:
            key.append(gain)
    return tuple(key)


def clear_weight_cache(net: torch.nn.Module) -> None:
    """Forget the effective weights cached for eval-mode inference (see :func:`effective_weights`)."""
    for m in net.modules():
        m.__dict__.pop("_mp_weight_cache", None)


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
        s2 = sigma ** 2 + sd ** 2  # shared by the coefficients: the same values, fewer launches
        root = s2.sqrt()
        c_skip = sd ** 2 / s2
        c_out = sigma * sd / root
        c_in = root.reciprocal()
        c_noise = sigma.flatten().log() / 4

        x_in = (c_in * x).to(dtype)
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        # One multi-tensor call for the U-Net's weights and (when asked for) the logvar head's.
        layers = self.unet.mp_layers(dtype, c_noise.dtype, None if class_labels is None else class_labels.dtype)
        if return_logvar:
            layers.append(("logvar_linear", self.logvar_linear, 1, None, c_noise.dtype))
        weights = effective_weights(self, layers)
        F_x = self.unet(x_in, c_noise, class_labels, weights=weights)
        D_x = c_skip * x + c_out * F_x  # F_x is widened to fp32 inside the product
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise), weight=weights["logvar_linear"]).reshape(-1, 1, 1, 1)
        return D_x, logvar


def forced_norm_weights(net: torch.nn.Module) -> list[torch.Tensor]:
    """Every MPConv weight of ``net``: the tensors forced weight normalization applies to."""
    return [m.weight for m in net.modules() if isinstance(m, MPConv)]


def fold_forced_norm(net: torch.nn.Module) -> list[torch.Tensor]:
    """Have the next training forward of ``net`` apply forced weight normalization itself, inside
    its one :func:`mpkernels.mp_weights` call (the update ``mk.force_normalize_`` makes, without
    a launch and a pass over the weights of its own).

    The request goes to the outermost :class:`Precond` / :class:`UNet` modules of ``net`` and
    covers all their MPConv weights (those the forward does not use too). Returns the MPConv
    weights outside them: call ``mk.force_normalize_`` on those. Together that is the same update
    as ``mk.force_normalize_(forced_norm_weights(net))`` before the forward. The request holds for
    one forward (the first of a step with gradient accumulation) and is ignored while compiling.
    """
    plan = net.__dict__.get("_fold_plan")  # (owners, the weights outside them), found once per net
    if plan is None:
        owners, covered = [], set()
        for m in net.modules():  # pre-order: a Precond comes before its UNet
            if isinstance(m, (Precond, UNet)) and id(m) not in covered:
                owners.append(m)
                covered.update(id(c) for c in m.modules())
        plan = net.__dict__["_fold_plan"] = (owners, [w for w in forced_norm_weights(net)
                                                      if not any(w is c.weight for o in owners for c in o.modules()
                                                                 if isinstance(c, MPConv))])
    for o in plan[0]:
        o.__dict__["_fold_forced_norm"] = True
    return list(plan[1])


def _unlisted_weights(owner: torch.nn.Module, layers) -> list[torch.Tensor]:
    """``owner``'s MPConv weights that ``layers`` leaves out (e.g. the logvar head when unused)."""
    n = owner.__dict__.get("_n_mpconv")
    if n is None:
        n = owner.__dict__["_n_mpconv"] = len(forced_norm_weights(owner))
    if len(layers) >= n:  # the usual case (training asks for the logvar head): no walk over the modules
        return []
    listed = {id(conv.weight) for _, conv, *_ in layers}
    return [w for w in forced_norm_weights(owner) if id(w) not in listed]


def set_forced_weight_norm(net: torch.nn.Module, enabled: bool) -> None:
    """Turn the in-forward forced weight normalization of every MPConv on or off.

    With it off, call ``mk.force_normalize_(forced_norm_weights(net))`` once before each
    training step instead (same training, compile- and CUDA-graph-friendly forward).
    """
    for m in net.modules():
        if isinstance(m, MPConv):
            m.forced_weight_norm = bool(enabled)

