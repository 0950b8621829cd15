"""The Stable Diffusion autoencoder, used exactly as EDM2's latent models need it (spec §5, §9).

The paper's ImageNet-512 models work on latents of Stability's ``sd-vae-ft-mse``
``AutoencoderKL`` from ``diffusers`` (an optional dependency: ``pip install 'mpkernels[latent]'``).
Everything follows the release, or released networks decode to garbage:

* :meth:`VAE.encode`: uint8 RGB ``[N, 3, H, W]`` -> ``x / 255`` (range [0, 1], *not* [-1, 1])
  -> encoder -> the posterior's ``(mean, std)``, each float32 ``[N, 4, H/8, W/8]``. Datasets
  store them concatenated on the channel axis; training draws ``mean + randn * std`` and
  scales it per channel (:func:`edm2fast.data.latents_to_model`).
* :meth:`VAE.decode`: model-space latents (what a network samples) -> ``x / 0.5 * raw_std +
  raw_mean`` -> decoder -> ``clamp(0, 1) * 255`` cast to uint8 (truncated, as the release does).

::

    from edm2fast import vae
    v = vae.load_vae("stabilityai/sd-vae-ft-mse")     # or a local folder (save_pretrained layout)
    mean, std = v.encode(images_uint8)                 # [N, 3, 512, 512] -> 2 x [N, 4, 64, 64]
    pixels = v.decode(latents)                         # [N, 4, 64, 64] model space -> uint8 [N, 3, 512, 512]
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import numpy as np
import torch

from .data import latents_to_model, model_to_latents

__all__ = ["VAE", "load_vae", "DEFAULT_VAE", "INSTALL_HINT", "cache_folder"]

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # the autoencoder of the paper's img512 models
INSTALL_HINT = ("the latent tools need the 'diffusers' package (Stable Diffusion's AutoencoderKL): "
                "pip install 'mpkernels[latent]'  (or: pip install diffusers)")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "hf://")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return AutoencoderKL


def cache_folder() -> str:
    """Where ``diffusers`` looks for downloaded models (the Hugging Face hub cache)."""
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


class VAE:
    """An ``AutoencoderKL`` in eval mode on one device, with the release's encode/decode conventions.

    ``dtype``: ``'fp32'`` (default: what the release used; use it to make training data),
    ``'bf16'`` or ``'fp16'`` (faster on GPUs, not bit-compatible with fp32 latents).
    ``batch_size``: images per encoder/decoder call.
    """

    def __init__(self, model: torch.nn.Module, device=None, dtype: str = "fp32", batch_size: int = 8,
                 name: str | None = None):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        for attr in ("encode", "decode", "config"):
            if not hasattr(model, attr):
                raise TypeError(f"model: expected a diffusers AutoencoderKL, got {type(model).__name__}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _DTYPES[dtype]
        self.batch_size = int(batch_size)
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)

    @property
    def downsample(self) -> int:
        """Pixels per latent pixel along each side (8 for sd-vae-ft-mse)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    def to(self, device) -> "VAE":
        """Move the autoencoder to ``device`` (in place); returns ``self``."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def __repr__(self):
        return (f"VAE({self.name!r}, {self.latent_channels} latent channels, /{self.downsample}, "
                f"{self.device}, {str(self.dtype).replace('torch.', '')})")

    # ------------------------------------------------------------------------------------------

    def _batches(self, n: int, batch_size: int | None, progress, desc: str):
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        starts = range(0, n, bs)
        if progress:
            try:
                from tqdm import tqdm
                bar = tqdm(total=n, unit="img", desc=desc, leave=False)
            except ImportError:
                bar = None
        else:
            bar = None
        try:
            for s in starts:
                yield slice(s, min(s + bs, n))
                if bar is not None:
                    bar.update(min(s + bs, n) - s)
        finally:
            if bar is not None:
                bar.close()

    @torch.no_grad()
    def encode(self, images, batch_size: int | None = None, progress: bool = False):
        """uint8 RGB ``[N, 3, H, W]`` (tensor or array) -> ``(mean, std)`` float32 ``[N, 4, H/8, W/8]``.

        Pixels enter the encoder as ``x / 255`` (the release's range). The results are on the
        input's device (CPU for arrays). Deterministic: the posterior is not sampled here.
        """
        x = _as_images(images)
        f = self.downsample
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"images: height and width must be multiples of {f} for this VAE, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        means, stds = [], []
        for b in self._batches(x.shape[0], batch_size, progress, "encode"):
            xb = x[b].to(self.device, non_blocking=True).to(torch.float32) / 255
            dist = self.model.encode(xb.to(self.dtype)).latent_dist
            means.append(dist.mean.to(torch.float32).to(x.device))
            stds.append(dist.std.to(torch.float32).to(x.device))
        return torch.cat(means), torch.cat(stds)

    def sample_latents(self, mean, std, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model-space latents from an encoding: ``mean + randn * std``, scaled per channel (spec §5).

        Deterministic for a given ``generator`` seed (drawn on the CPU when ``mean`` is there).
        """
        mean, std = torch.as_tensor(mean), torch.as_tensor(std)
        if mean.shape != std.shape:
            raise ValueError(f"std: shape {tuple(std.shape)} differs from mean's {tuple(mean.shape)}")
        return latents_to_model(torch.cat([mean, std], dim=1), generator)

    @torch.no_grad()
    def decode(self, latents, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Model-space latents ``[N, 4, h, w]`` (what an img512 network samples) -> uint8 ``[N, 3, 8h, 8w]``.

        Undoes spec §5's scaling (``x / 0.5 * raw_std + raw_mean``), then :meth:`decode_raw`.
        """
        z = _as_latents(latents, "latents")
        return self.decode_raw(model_to_latents(z), batch_size=batch_size, progress=progress)

    @torch.no_grad()
    def decode_raw(self, z, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Raw VAE latents (e.g. a stored ``mean``) -> uint8 RGB ``[N, 3, H, W]`` on ``z``'s device.

        ``clamp(0, 1) * 255`` then a cast to uint8, which truncates: the release's mapping.
        """
        z = _as_latents(z, "z")
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"z: expected {self.latent_channels} latent channels, got {z.shape[1]}")
        out = []
        for b in self._batches(z.shape[0], batch_size, progress, "decode"):
            y = self.model.decode(z[b].to(self.device, self.dtype)).sample
            out.append(y.to(torch.float32).clamp(0, 1).mul(255).to(torch.uint8).to(z.device))
        return torch.cat(out)


def _as_images(images) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images: expected a uint8 tensor or array [N, 3, H, W], got {type(images).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"images: expected uint8 pixels, got {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"images: expected RGB [N, 3, H, W] with N >= 1 (channels first), got {tuple(x.shape)}")
    return x


def _as_latents(z, name: str) -> torch.Tensor:
    z = torch.from_numpy(np.asarray(z)) if isinstance(z, np.ndarray) else z
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor or array [N, C, h, w], got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name}: expected floating-point latents, got {z.dtype}")
    if z.ndim != 4 or z.shape[0] == 0:
        raise ValueError(f"{name}: expected [N, C, h, w] with N >= 1, got {tuple(z.shape)}")
    return z.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Loading

def _missing_message(repo: str) -> str:
    return (f"vae: {repo} is not in the Hugging Face cache ({cache_folder()}) and downloading was not "
            f"allowed. Either allow it once on a machine with internet (--download, or "
            f"load_vae(..., allow_download=True), or EDM2FAST_ALLOW_DOWNLOAD=1), or fetch the folder "
            f"elsewhere (hf download {repo} --local-dir DIR; huggingface-cli on older versions) and pass "
            f"that folder (--vae DIR)")


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers logs advice (install accelerate, ...) at warning level on every load."""
    try:
        from diffusers.utils import logging as dlog
        level = dlog.get_verbosity()
        dlog.set_verbosity_error()
    except (ImportError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _from_pretrained(cls, src: str, local_only: bool):
    # Safetensors only: pickled .bin weights can run code when loaded.
    with _quiet_diffusers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"huggingface_hub\.")
        return cls.from_pretrained(src, local_files_only=local_only, use_safetensors=True,
                                   low_cpu_mem_usage=False)


def load_vae(name_or_path=DEFAULT_VAE, device=None, dtype: str = "fp32", batch_size: int = 8,
             allow_download: bool | None = None) -> VAE:
    """An :class:`VAE` from a local folder, a Hugging Face model id, or an ``AutoencoderKL``.

    ``name_or_path``: a folder in ``save_pretrained`` layout (``config.json`` and
    ``diffusion_pytorch_model.safetensors``); a model id such as ``'stabilityai/sd-vae-ft-mse'``
    (also as ``https://huggingface.co/...``), resolved through the Hugging Face cache; or a
    model object. A model id missing from the cache is downloaded only when ``allow_download``
    is true (default: the ``EDM2FAST_ALLOW_DOWNLOAD=1`` environment variable); otherwise a
    ``FileNotFoundError`` says what to put where. Without ``diffusers``: ``ImportError``.
    """
    if isinstance(name_or_path, torch.nn.Module):
        return VAE(name_or_path, device, dtype, batch_size)
    cls = _autoencoder_class()
    if allow_download is None:
        allow_download = os.environ.get("EDM2FAST_ALLOW_DOWNLOAD", "") == "1"
    src = os.path.expanduser(os.fspath(name_or_path))
    if not src:
        raise ValueError("name_or_path: empty; give a folder or a model id like " + DEFAULT_VAE)
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise FileNotFoundError(f"vae: {src} has no config.json; expected a diffusers AutoencoderKL folder "
                                    f"(config.json and diffusion_pytorch_model.safetensors, as save_pretrained "
                                    f"writes them)")
        try:
            model = _from_pretrained(cls, src, local_only=True)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ValueError(f"vae: cannot load {src} as an AutoencoderKL ({str(e).splitlines()[0]})") from None
        return VAE(model, device, dtype, batch_size, name=src)
    if os.path.exists(src):
        raise ValueError(f"vae: {src} is a file; expected a folder with config.json and "
                         f"diffusion_pytorch_model.safetensors, or a model id like {DEFAULT_VAE}")
    repo = src
    for prefix in _HUB_PREFIXES:
        if repo.startswith(prefix):
            repo = repo[len(prefix):].strip("/")
    if not _REPO_ID.match(repo):
        raise FileNotFoundError(f"vae: {src}: no such folder, and not a model id like {DEFAULT_VAE}")
    try:
        model = _from_pretrained(cls, repo, local_only=True)
    except (OSError, ValueError):
        if not allow_download:
            raise FileNotFoundError(_missing_message(repo)) from None
        try:
            model = _from_pretrained(cls, repo, local_only=False)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"vae: cannot download {repo} ({str(e).splitlines()[0]})") from None
    return VAE(model, device, dtype, batch_size, name=repo)
