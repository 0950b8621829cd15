"""Datasets, the pixel/latent mappings of spec §5, and a resumable sharded sampler.

Every dataset returns ``(x, label)`` per index as numpy arrays:

* pixel datasets (``kind == 'pixels'``): ``x`` uint8 ``[C, H, W]``;
* latent datasets (``kind == 'latents'``): ``x`` float32 ``[2*C, H, W]``, the stored raw VAE
  latent distribution, mean channels then std channels (spec §5);
* ``label``: float32 one-hot ``[label_dim]`` (``[0]`` when unlabeled).

Batches become network inputs with ``dataset.encode(batch, generator)``:
:func:`pixels_to_model` (``x/127.5 - 1``) or :func:`latents_to_model` (draw
``mean + randn*std``, then ``(z - raw_mean)/raw_std * 0.5``). :func:`model_to_pixels` and
:func:`model_to_latents` go back.

Sources (:func:`open_dataset`): a folder or zip of PNG/JPEG images (or of ``.npy`` latents)
with an optional ``dataset.json`` (``{"labels": [[relative_path, class_index], ...]}``), a
``.npy``/``.npz`` array file, or the built-in ``'digits16'``/``'digits32'`` (scikit-learn's
handwritten digits, no download).
"""

from __future__ import annotations

import functools
import json
import os
import zipfile

import numpy as np
import torch

__all__ = [
    "Dataset", "ImageFolderDataset", "ArrayDataset", "DigitsDataset", "open_dataset", "BUILTIN_DATASETS",
    "InfiniteSampler", "infinite_loader",
    "pixels_to_model", "model_to_pixels", "latents_to_model", "model_to_latents",
    "LATENT_RAW_MEAN", "LATENT_RAW_STD", "LATENT_SCALE", "IMAGE_EXTENSIONS", "center_crop_resize",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LATENT_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # sd-vae-ft-mse latents, per channel (spec §5)
LATENT_RAW_STD = (4.17, 4.62, 3.71, 3.28)
LATENT_SCALE = 0.5  # = sigma_data: the mapped latents have std 0.5
BUILTIN_DATASETS = ("digits16", "digits32")


# ----------------------------------------------------------------------------------------------
# Pixel and latent mappings (spec §5)

def pixels_to_model(x) -> torch.Tensor:
    """uint8 pixels ``[N, C, H, W]`` -> float32 in [-1, 1]: ``x / 127.5 - 1``."""
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        raise TypeError(f"x: expected uint8 pixels, got {x.dtype}")
    return x.to(torch.float32) / 127.5 - 1


def model_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pixels_to_model`, rounded and clipped to uint8."""
    return (x.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _latent_stats(channels: int, like: torch.Tensor):
    if channels != len(LATENT_RAW_MEAN):
        raise ValueError(f"latents: expected {len(LATENT_RAW_MEAN)} latent channels (sd-vae-ft-mse), got {channels}")
    mean = torch.tensor(LATENT_RAW_MEAN, dtype=torch.float32, device=like.device).reshape(1, -1, 1, 1)
    std = torch.tensor(LATENT_RAW_STD, dtype=torch.float32, device=like.device).reshape(1, -1, 1, 1)
    return mean, std


def latents_to_model(raw, generator: torch.Generator | None = None) -> torch.Tensor:
    """Raw latent distributions ``[N, 2C, H, W]`` (mean, then std) -> model-space latents ``[N, C, H, W]``.

    Draws ``z = mean + randn * std`` (from ``generator``, on ``raw``'s device), then
    ``(z - raw_mean) / raw_std * 0.5`` per channel (spec §5).
    """
    raw = torch.as_tensor(raw).to(torch.float32)
    if raw.ndim != 4 or raw.shape[1] % 2:
        raise ValueError(f"raw: expected [N, 2*C, H, W] (mean and std channels), got {tuple(raw.shape)}")
    mean, std = raw.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=raw.device, dtype=torch.float32)
    z = mean + noise * std
    raw_mean, raw_std = _latent_stats(z.shape[1], z)
    return (z - raw_mean) / raw_std * LATENT_SCALE


def model_to_latents(x: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> raw VAE latents (for decoding): ``x / 0.5 * raw_std + raw_mean``."""
    x = x.to(torch.float32)
    raw_mean, raw_std = _latent_stats(x.shape[1], x)
    return x / LATENT_SCALE * raw_std + raw_mean


# ----------------------------------------------------------------------------------------------
# Datasets

class Dataset(torch.utils.data.Dataset):
    """Base class: ``(x, one-hot label)`` per index; see the module docstring."""

    kind = "pixels"
    name = "dataset"

    def __init__(self, num_items: int, labels: np.ndarray | None, label_dim: int | None = None,
                 xflip: bool = False, max_size: int | None = None):
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim == 1:
                if labels.size and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
                    raise ValueError(f"{self.name}: labels must be class indices >= 0")
                k = int(label_dim if label_dim is not None else (labels.max() + 1 if labels.size else 0))
                if labels.size and labels.max() >= k:
                    raise ValueError(f"{self.name}: label {int(labels.max())} >= label_dim {k}")
                onehot = np.zeros([labels.shape[0], k], dtype=np.float32)
                onehot[np.arange(labels.shape[0]), labels] = 1
                labels = onehot
            elif labels.ndim == 2:
                labels = labels.astype(np.float32)
            else:
                raise ValueError(f"{self.name}: labels must be [N] class indices or [N, K] one-hot")
            if labels.shape[0] != num_items:
                raise ValueError(f"{self.name}: {labels.shape[0]} labels for {num_items} items")
        self._labels = labels
        self._num_items = num_items
        self._index = np.arange(num_items)
        if max_size is not None:
            if max_size < 1:
                raise ValueError(f"max_size: expected >= 1, got {max_size}")
            self._index = self._index[:max_size]
        self.xflip = bool(xflip)

    # subclasses: _load(raw_index) -> np.ndarray [C, H, W]
    def _load(self, raw_index: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._index) * (2 if self.xflip else 1)

    def __getitem__(self, idx: int):
        n = len(self._index)
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {self.name} of length {len(self)}")
        idx %= len(self)
        raw = int(self._index[idx % n])
        x = self._load(raw)
        if idx >= n:  # the mirrored copy
            x = x[:, :, ::-1]
        return np.array(x), self.get_label(raw)  # a writable copy (torch warns on read-only arrays)

    def get_label(self, raw_index: int) -> np.ndarray:
        if self._labels is None:
            return np.zeros([0], dtype=np.float32)
        return self._labels[raw_index].copy()

    @property
    def label_dim(self) -> int:
        return 0 if self._labels is None else int(self._labels.shape[1])

    @property
    def has_labels(self) -> bool:
        return self.label_dim > 0

    @functools.cached_property
    def image_shape(self) -> tuple[int, int, int]:
        """``[C, H, W]`` of what ``encode`` returns (latent datasets: half the stored channels)."""
        c, h, w = self._load(int(self._index[0])).shape
        return (c // 2 if self.kind == "latents" else c, h, w)

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        return self.image_shape[1]

    def encode(self, x, generator: torch.Generator | None = None) -> torch.Tensor:
        """A batch as network input: :func:`pixels_to_model` or :func:`latents_to_model`."""
        return latents_to_model(x, generator) if self.kind == "latents" else pixels_to_model(x)

    def __repr__(self):
        c, h, w = self.image_shape
        return (f"{type(self).__name__}({self.name!r}, {len(self)} items, {self.kind} {c}x{h}x{w}, "
                f"label_dim={self.label_dim})")


def _check_chw(x: np.ndarray, where: str, expected=None) -> np.ndarray:
    if x.ndim != 3:
        raise ValueError(f"{where}: expected a [C, H, W] item, got shape {x.shape}")
    if expected is not None and tuple(x.shape) != tuple(expected):
        raise ValueError(f"{where}: shape {tuple(x.shape)} differs from the dataset's {tuple(expected)}; "
                         "pack the images with `edm2fast dataset` to give them one size")
    return x


class ImageFolderDataset(Dataset):
    """A folder or a zip of images (PNG/JPEG/...) or of latent ``.npy`` files, searched recursively.

    Images: grayscale files give 1 channel, everything else is converted to RGB. All must have
    one size and be square. Latent files: float ``[2*C, H, W]`` arrays (mean, then std).
    Labels come from ``dataset.json`` at the top: ``{"labels": [[relative_path, class_index], ...]}``
    (or ``null``); every file must then have one. ``use_labels=False`` ignores them.
    """

    def __init__(self, path, use_labels: bool = True, xflip: bool = False, max_size: int | None = None):
        self.path = os.fspath(path)
        self.name = os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]
        self._zip = None
        self._zip_pid = None
        if os.path.isdir(self.path):
            self._type = "dir"
            names = []
            for root, _dirs, files in os.walk(self.path):
                names += [os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, "/") for f in files]
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            self._type = "zip"
            names = [n for n in self._get_zip().namelist() if not n.endswith("/")]
        elif os.path.exists(self.path):
            raise ValueError(f"{self.path}: expected a folder or a .zip file of images")
        else:
            raise FileNotFoundError(f"{self.path}: no such folder or zip file")
        images = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(n))
        latents = sorted(n for n in names if n.lower().endswith(".npy") and not _hidden(n))
        if images and latents:
            raise ValueError(f"{self.path}: mixes images and .npy latents; use one kind per dataset")
        if not images and not latents:
            raise ValueError(f"{self.path}: no images ({', '.join(IMAGE_EXTENSIONS)}) or .npy latents found")
        self._files = images or latents
        self.kind = "pixels" if images else "latents"
        labels = self._read_labels(names) if use_labels else None
        super().__init__(len(self._files), labels, xflip=xflip, max_size=max_size)
        self._expected_shape = None
        first = self._load(int(self._index[0]))
        if self.kind == "pixels" and first.shape[1] != first.shape[2]:
            raise ValueError(f"{self.path}: images must be square, {self._files[0]} is "
                             f"{first.shape[2]}x{first.shape[1]}; pack them with `edm2fast dataset`")
        if self.kind == "latents" and (first.shape[0] % 2 or not np.issubdtype(first.dtype, np.floating)):
            raise ValueError(f"{self.path}: latent files must hold float [2*C, H, W] (mean, std), "
                             f"{self._files[0]} has {first.dtype} {first.shape}")
        self._expected_shape = first.shape

    def _get_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per DataLoader worker
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _open(self, name: str):
        if self._type == "dir":
            return open(os.path.join(self.path, name), "rb")
        return self._get_zip().open(name, "r")

    def _read_labels(self, names) -> np.ndarray | None:
        if "dataset.json" not in names:
            return None
        where = f"{self.path}/dataset.json"
        try:
            with self._open("dataset.json") as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        raw = data.get("labels") if isinstance(data, dict) else None
        if raw is None:
            return None
        try:
            table = {str(name).replace("\\", "/"): int(label) for name, label in raw}
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'labels' must be a list of [relative_path, class_index]") from None
        missing = [f for f in self._files if f not in table]
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{where}: no label for {missing[0]}{more}")
        labels = np.array([table[f] for f in self._files], dtype=np.int64)
        if labels.size and labels.min() < 0:
            raise ValueError(f"{where}: negative class index")
        return labels

    def _load(self, raw_index: int) -> np.ndarray:
        name = self._files[raw_index]
        where = f"{self.path}/{name}"
        try:
            with self._open(name) as f:
                if self.kind == "latents":
                    x = np.load(f, allow_pickle=False)
                else:
                    from PIL import Image
                    img = Image.open(f)
                    img = img.convert("L") if img.mode in ("L", "1", "I;16", "I", "F") else img.convert("RGB")
                    x = np.asarray(img)
                    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: cannot read ({e})") from None
        return _check_chw(x, where, self._expected_shape)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None
        return state


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class ArrayDataset(Dataset):
    """Items from an array: uint8 images ``[N, C, H, W]``, ``[N, H, W, C]`` or ``[N, H, W]``, or float latents.

    ``source``: an ndarray, or a ``.npy`` file (memory-mapped) or ``.npz`` file with the images
    under ``images``/``x``/``latents`` (else the first array) and optional labels under
    ``labels``/``y`` (class indices ``[N]`` or one-hot ``[N, K]``; ``use_labels=False`` drops
    them). Float arrays are latents
    ``[N, 2*C, H, W]`` (mean, then std). ``layout='NCHW'|'NHWC'`` overrides the guess for images.
    """

    def __init__(self, source, labels=None, layout: str | None = None, name: str | None = None,
                 use_labels: bool = True, xflip: bool = False, max_size: int | None = None):
        if isinstance(source, np.ndarray):
            array, self.name = source, name or "array"
        else:
            path = os.fspath(source)
            self.name = name or os.path.splitext(os.path.basename(path))[0]
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no such file")
            try:
                if path.lower().endswith(".npz"):
                    with np.load(path, allow_pickle=False) as z:
                        keys = list(z.keys())
                        key = next((k for k in ("images", "x", "latents") if k in keys), keys[0] if keys else None)
                        if key is None:
                            raise ValueError("empty .npz")
                        array = z[key]
                        lkey = next((k for k in ("labels", "y") if k in keys), None)
                        if labels is None and lkey is not None:
                            labels = z[lkey]
                else:
                    array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(f"{path}: cannot read as .npy/.npz ({e})") from None
        if not isinstance(array, np.ndarray) or array.ndim not in (3, 4) or not array.shape[0]:
            raise ValueError(f"{self.name}: expected an [N, C, H, W], [N, H, W, C] or [N, H, W] array with N >= 1, "
                             f"got shape {getattr(array, 'shape', None)}")
        if np.issubdtype(array.dtype, np.floating):
            self.kind = "latents"
            if array.ndim != 4 or array.shape[1] % 2:
                raise ValueError(f"{self.name}: float arrays are latents [N, 2*C, H, W] (mean, std), "
                                 f"got shape {array.shape}")
        elif array.dtype == np.uint8:
            self.kind = "pixels"
            if array.ndim == 3:
                array = array[:, None]
            else:
                if layout is None:
                    layout = "NHWC" if array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4) else "NCHW"
                if layout not in ("NCHW", "NHWC"):
                    raise ValueError(f"layout: expected 'NCHW' or 'NHWC', got {layout!r}")
                if layout == "NHWC":
                    array = array.transpose(0, 3, 1, 2)
        else:
            raise ValueError(f"{self.name}: expected uint8 images or float latents, got dtype {array.dtype}")
        self._array = array
        super().__init__(array.shape[0], labels if use_labels else None, xflip=xflip, max_size=max_size)

    def _load(self, raw_index: int) -> np.ndarray:
        x = np.asarray(self._array[raw_index])
        return x.astype(np.float32) if self.kind == "latents" else x


@functools.lru_cache(maxsize=4)
def _digits_arrays(resolution: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    small = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)  # [N, 8, 8], 0..16 -> 0..255
    big = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC)) for im in small])
    images = np.repeat(big[:, None], channels, axis=1)
    images.setflags(write=False)
    return images, digits.target.astype(np.int64)


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1797 images, 10 classes, bundled: no download).

    The 8x8 images (ink 0..16) are mapped to uint8 0..255 (white digit on black) and
    upscaled with bicubic Pillow resizing to ``resolution`` 16 or 32. One channel by
    default (the source is grayscale; smaller, faster demo models); ``channels=3``
    repeats it. Labels: one-hot of the digit, ``label_dim = 10``.
    """

    kind = "pixels"

    def __init__(self, resolution: int = 32, channels: int = 1, use_labels: bool = True, xflip: bool = False,
                 max_size: int | None = None):
        if resolution not in (16, 32):
            raise ValueError(f"resolution: the digits dataset comes in 16 or 32, got {resolution!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
        self.name = f"digits{resolution}"
        self._images, targets = _digits_arrays(resolution, channels)
        super().__init__(len(self._images), targets if use_labels else None, label_dim=10, xflip=xflip,
                         max_size=max_size)

    def _load(self, raw_index: int) -> np.ndarray:
        return self._images[raw_index]


def open_dataset(spec, **kwargs) -> Dataset:
    """A dataset from a name or path: ``'digits16'``/``'digits32'`` (see :class:`DigitsDataset`),
    a folder or ``.zip`` (:class:`ImageFolderDataset`), or a ``.npy``/``.npz`` file
    (:class:`ArrayDataset`). ``kwargs`` go to the class (``use_labels``, ``xflip``, ``max_size``, ...).
    """
    if isinstance(spec, Dataset):
        return spec
    spec = os.fspath(spec)
    if spec in BUILTIN_DATASETS:
        return DigitsDataset(resolution=int(spec[len("digits"):]), **kwargs)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"dataset: {spec}: no such file or folder (built-in datasets: "
                                f"{', '.join(BUILTIN_DATASETS)})")
    if spec.lower().endswith((".npy", ".npz")):
        return ArrayDataset(spec, **kwargs)
    return ImageFolderDataset(spec, **kwargs)


# ----------------------------------------------------------------------------------------------
# Sampling

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless, deterministic, rank-sharded stream of dataset indices.

    One global stream: position ``g`` holds ``perm_e[g % N]`` where ``e = g // N`` is the epoch
    and ``perm_e`` a permutation seeded by ``(seed, e)`` (identity with ``shuffle=False``).
    Rank ``r`` of ``num_replicas`` reads positions ``start_idx + r, start_idx + r + R, ...``.
    With ``start_idx`` = images seen so far (a multiple of ``num_replicas``), a resumed run
    reads exactly what the uninterrupted run would have, and the images visited overall do not
    depend on the number of ranks.
    """

    def __init__(self, dataset_len: int, rank: int = 0, num_replicas: int = 1, seed: int = 0, start_idx: int = 0,
                 shuffle: bool = True):
        if isinstance(dataset_len, torch.utils.data.Dataset):
            dataset_len = len(dataset_len)
        if int(dataset_len) < 1:
            raise ValueError(f"dataset_len: expected >= 1, got {dataset_len}")
        if int(num_replicas) < 1:
            raise ValueError(f"num_replicas: expected >= 1, got {num_replicas}")
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank: expected 0 <= rank < num_replicas={num_replicas}, got {rank}")
        if int(start_idx) < 0 or int(start_idx) % int(num_replicas):
            raise ValueError(f"start_idx: expected a multiple of num_replicas={num_replicas} >= 0, got {start_idx}")
        self.dataset_len, self.rank, self.num_replicas = int(dataset_len), int(rank), int(num_replicas)
        self.seed, self.start_idx, self.shuffle = int(seed), int(start_idx), bool(shuffle)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_len)
        return np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(self.dataset_len)

    def __iter__(self):
        g = self.start_idx + self.rank
        epoch, order = -1, None
        while True:
            e = g // self.dataset_len
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            yield int(order[g % self.dataset_len])
            g += self.num_replicas


def infinite_loader(dataset, batch_size: int, rank: int = 0, num_replicas: int = 1, seed: int = 0,
                    start_idx: int = 0, num_workers: int = 0, **loader_kwargs):
    """Endless iterator of ``(x, labels)`` batches for one rank (:class:`InfiniteSampler` order)."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    sampler = InfiniteSampler(len(dataset), rank, num_replicas, seed, start_idx)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(),
                                         persistent_workers=num_workers > 0, **loader_kwargs)
    return iter(loader)


# ----------------------------------------------------------------------------------------------
# Image preprocessing (for `edm2fast dataset`)

def center_crop_resize(img, resolution: int):
    """Crop the largest centred square, then resize to ``resolution`` (Lanczos); a Pillow image."""
    from PIL import Image
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return img
