"""Dataset preparation as the paper's release does it (spec §9): convert, encode, decode.

* :func:`convert_dataset`: images (folder or zip, any sizes) -> a dataset of PNGs (folder or
  zip) cropped and resized by one of the release's transforms, with ``dataset.json`` labels;
* :func:`encode_dataset`: a pixel dataset -> ``sd-vae-ft-mse`` latents, one float32 ``.npy``
  per image holding the posterior mean and std concatenated on channels (``[8, 64, 64]`` for
  512x512 images), the layout :class:`edm2fast.data.ImageFolderDataset` reads as latents;
* :func:`decode_dataset`: latents -> PNGs (the stored mean through the decoder), to check an
  encoded dataset.

Items are read, transformed and written one batch at a time (the dataset is never held in
memory), in sorted order, as ``{idx // 1000:05d}/img{idx:08d}.png`` (latents:
``img-mean-std-{idx:08d}.npy``). The output appears atomically: a failed run leaves nothing.

Transforms (:func:`make_transform`): ``center-crop``, ``center-crop-wide``,
``center-crop-dhariwal`` (ADM's ImageNet preprocessing, the img512 models' data); none means
a Lanczos resize to WxH.
"""

from __future__ import annotations

import contextlib
import io as _pyio
import json
import os
import secrets
import shutil
import zipfile
from typing import Callable, Iterator

import numpy as np

from .data import IMAGE_EXTENSIONS

__all__ = [
    "TRANSFORMS", "center_crop", "center_crop_wide", "center_crop_dhariwal", "resize", "make_transform",
    "parse_resolution", "list_source", "convert_dataset", "encode_dataset", "decode_dataset", "open_dest",
]

TRANSFORMS = ("center-crop", "center-crop-wide", "center-crop-dhariwal")


# ----------------------------------------------------------------------------------------------
# Transforms (Pillow images in, Pillow images out; None = skip the image)

def resize(img, width: int, height: int):
    """No transform: Lanczos resize to ``width x height`` (unchanged when already that size)."""
    from PIL import Image
    return img if img.size == (width, height) else img.resize((width, height), Image.LANCZOS)


def center_crop(img, width: int, height: int):
    """The centre square of side ``min(w, h)`` (offsets ``(size - side) // 2``), Lanczos-resized to WxH."""
    from PIL import Image
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((width, height), Image.LANCZOS)


def center_crop_wide(img, width: int, height: int):
    """The centre band of height ``round(W * h / w)``, Lanczos-resized to WxH and pasted vertically
    centred on a black WxW canvas. ``None`` (skip) when ``w < W`` or the band is shorter than H."""
    from PIL import Image
    w, h = img.size
    band = int(round(width * h / w))
    if w < width or band < height:
        return None
    top = (h - band) // 2
    img = img.crop((0, top, w, top + band)).resize((width, height), Image.LANCZOS)
    canvas = Image.new(img.mode, (width, width))  # black
    canvas.paste(img, (0, (width - height) // 2))
    return canvas


def center_crop_dhariwal(img, size: int):
    """ADM's ImageNet crop (square): halve with a box filter while the short side is at least
    ``2 * size``; scale the short side to ``size`` (bicubic, sides rounded); crop the centre."""
    from PIL import Image
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def parse_resolution(value) -> tuple[int, int] | None:
    """``'512x512'``, ``'512'``, ``512`` or ``(w, h)`` -> ``(width, height)``; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        w, h = value
    elif isinstance(value, int) and not isinstance(value, bool):
        w = h = value
    else:
        parts = str(value).lower().split("x")
        try:
            w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
            if len(parts) > 2:
                raise ValueError
        except ValueError:
            raise ValueError(f"resolution: expected WxH like 512x512, got {value!r}") from None
    if not (isinstance(w, int) and isinstance(h, int)) or not (1 <= w <= 16384 and 1 <= h <= 16384):
        raise ValueError(f"resolution: expected sides of 1..16384 pixels, got {value!r}")
    return int(w), int(h)


def make_transform(name: str | None, resolution) -> Callable:
    """The release's transform ``name`` (or ``None``: plain resize) at ``resolution`` WxH.

    Outputs must be square (the trainer's datasets are): ``center-crop-wide`` always is (WxW);
    the others need W == H. ``resolution`` None with no transform keeps the images' size.
    """
    res = parse_resolution(resolution)
    if name is not None and name not in TRANSFORMS:
        raise ValueError(f"transform: expected one of {', '.join(TRANSFORMS)}, got {name!r}")
    if res is None:
        if name is not None:
            raise ValueError(f"resolution: the {name} transform needs a resolution WxH")
        return lambda img: img
    w, h = res
    if name == "center-crop-wide":
        if h > w:
            raise ValueError(f"resolution: center-crop-wide pastes a WxH band on a WxW canvas, so H <= W; got {w}x{h}")
        return lambda img: center_crop_wide(img, w, h)
    if w != h:
        raise ValueError(f"resolution: datasets must be square, got {w}x{h}"
                         + (f" (the {name} transform keeps WxH)" if name else ""))
    if name == "center-crop":
        return lambda img: center_crop(img, w, h)
    if name == "center-crop-dhariwal":
        return lambda img: center_crop_dhariwal(img, w)
    return lambda img: resize(img, w, h)


# ----------------------------------------------------------------------------------------------
# Sources and destinations

def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class _Source:
    """A folder or zip of images: sorted relative names, their bytes, and the labels it declares."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.zip = None
            names = []
            for root, _dirs, files in os.walk(self.path):
                names += [os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, "/") for f in files]
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            self.zip = zipfile.ZipFile(self.path)
            names = [n for n in self.zip.namelist() if not n.endswith("/")]
        elif os.path.exists(self.path):
            raise ValueError(f"source: {self.path} is neither a folder nor a zip file")
        else:
            raise FileNotFoundError(f"source: {self.path}: no such folder or zip file")
        self.names = set(names)
        self.images = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(n))

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(name)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def metadata(self) -> dict:
        if "dataset.json" not in self.names:
            return {}
        try:
            meta = json.loads(self.read("dataset.json"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"source: {self.path}/dataset.json: not valid JSON ({e})") from None
        return meta if isinstance(meta, dict) else {}

    def close(self):
        if self.zip is not None:
            self.zip.close()


def list_source(path, use_labels: bool = True) -> tuple[list[str], list[int] | None, list[str] | None]:
    """Sorted image names of a folder or zip, their class indices and class names.

    Labels come from the source's ``dataset.json`` (``{"labels": [[name, index], ...]}``), else
    from first-level subfolders when every image lies in one: the sorted folder names are
    classes 0, 1, ... (ImageNet's synset folders give its 1000 standard indices).
    """
    src = _Source(path)
    try:
        return _labels_of(src, use_labels)
    finally:
        src.close()


def _labels_of(src: _Source, use_labels: bool):
    files = src.images
    if not use_labels or not files:
        return files, None, None
    meta = src.metadata()
    if meta.get("labels") is not None:
        try:
            table = {str(n).replace("\\", "/"): int(k) for n, k in meta["labels"]}
        except (TypeError, ValueError):
            raise ValueError(f"source: {src.path}/dataset.json: 'labels' must be [[name, class_index], ...]") from None
        missing = [f for f in files if f not in table]
        if missing:
            raise ValueError(f"source: {src.path}/dataset.json: no label for {missing[0]}"
                             + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        classes = meta.get("classes") if isinstance(meta.get("classes"), list) else None
        return files, [table[f] for f in files], classes
    if all("/" in f for f in files):
        classes = sorted({f.split("/", 1)[0] for f in files})
        index = {c: i for i, c in enumerate(classes)}
        return files, [index[f.split("/", 1)[0]] for f in files], classes
    return files, None, None


@contextlib.contextmanager
def open_dest(dest) -> Iterator[Callable[[str, bytes], None]]:
    """``with open_dest('out.zip') as write: write(name, data)``: a zip (``.zip``) or a folder.

    The zip's folder must exist; a folder dest must be new or empty. Everything is written
    under a temporary name and renamed into place on success, removed on failure.
    """
    from . import io as edm_io
    dest = os.fspath(dest)
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"dest: folder {parent} does not exist")
    if dest.lower().endswith(".zip"):
        if os.path.isdir(dest):
            raise ValueError(f"dest: {dest} is a folder")
        with edm_io.atomic_path(dest) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                yield zf.writestr
        return
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise ValueError(f"dest: {dest} exists and is not an empty folder")
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(dest))}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.makedirs(tmp)

    def write(name: str, data: bytes) -> None:
        path = os.path.join(tmp, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    try:
        yield write
        if os.path.isdir(dest):
            os.rmdir(dest)  # empty (checked above)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _item_name(idx: int, stem: str, ext: str) -> str:
    return f"{idx // 1000:05d}/{stem}{idx:08d}.{ext}"


def _png_bytes(img) -> bytes:
    buf = _pyio.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = _pyio.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _metadata(labels: list | None, classes, **extra) -> bytes:
    meta = {"labels": labels}
    if classes is not None and labels is not None:
        meta["classes"] = list(classes)
    meta.update(extra)
    return json.dumps(meta).encode()


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, unit="img", desc=desc, leave=False)
        except ImportError:
            pass
    return None


class UnreadableImageError(ValueError):
    """An image the converter cannot decode (its path is in the message)."""


# ----------------------------------------------------------------------------------------------
# convert

def convert_dataset(source, dest, transform: str | None = None, resolution=None, channels: int = 3,
                    max_images: int | None = None, use_labels: bool = True, skip_bad: bool = False,
                    progress: bool = False) -> dict:
    """Images (folder or zip) -> a PNG dataset (folder or zip) with ``dataset.json``; see the module doc.

    Every image is converted to RGB (``channels=1``: grayscale) and transformed; images the
    transform refuses (``center-crop-wide``) are skipped. An unreadable image raises
    :class:`UnreadableImageError` naming it, or is skipped with ``skip_bad``. Returns counts.
    """
    from PIL import Image, UnidentifiedImageError
    fn = make_transform(transform, resolution)
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    if max_images is not None and int(max_images) < 1:
        raise ValueError(f"max_images: expected >= 1, got {max_images}")
    src = _Source(source)
    try:
        files, labels, classes = _labels_of(src, use_labels)
        if not files:
            raise ValueError(f"source: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {src.path}")
        mode = "RGB" if channels == 3 else "L"
        out_labels, bad, refused, size = [], [], 0, None
        bar = _progress(len(files) if max_images is None else min(len(files), max_images), "convert", progress)
        with open_dest(dest) as write:
            for k, rel in enumerate(files):
                if max_images is not None and len(out_labels) >= max_images:
                    break
                try:
                    with Image.open(_pyio.BytesIO(src.read(rel))) as im:
                        img = im.convert(mode)
                except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                    if not skip_bad:
                        raise UnreadableImageError(f"source: cannot read image {src.path}/{rel} ({e})") from None
                    bad.append(rel)
                    continue
                img = fn(img)
                if img is None:
                    refused += 1
                    continue
                if size is None:
                    size = img.size
                    if size[0] != size[1]:
                        raise ValueError(f"source: {rel} is {size[0]}x{size[1]}; datasets must be square "
                                         "(give --resolution WxW or a --transform)")
                elif img.size != size:
                    raise ValueError(f"source: {rel} is {img.size[0]}x{img.size[1]}, the first image "
                                     f"{size[0]}x{size[1]}; give --resolution to make them one size")
                name = _item_name(len(out_labels), "img", "png")
                write(name, _png_bytes(img))
                out_labels.append([name, labels[k] if labels is not None else None])
                if bar is not None:
                    bar.update(1)
            if not out_labels:
                raise ValueError(f"source: no image of {src.path} survived the {transform} transform "
                                 f"({refused} refused, {len(bad)} unreadable)")
            write("dataset.json", _metadata(out_labels if labels is not None else None, classes))
        if bar is not None:
            bar.close()
    finally:
        src.close()
    return {"images": len(out_labels), "skipped_unreadable": len(bad), "skipped_by_transform": refused,
            "size": size, "channels": channels, "labels": labels is not None,
            "classes": len(classes) if classes is not None and labels is not None else None}


# ----------------------------------------------------------------------------------------------
# encode / decode

def _source_classes(path) -> list | None:
    try:
        src = _Source(path)
    except (OSError, ValueError):
        return None
    try:
        classes = src.metadata().get("classes")
    except ValueError:
        return None
    finally:
        src.close()
    return classes if isinstance(classes, list) else None


def _ordered_batches(dataset, batch_size: int, workers: int):
    """``(x, one-hot labels)`` tensor batches in dataset order, read ahead by ``workers`` processes."""
    import torch
    if int(workers) < 0:
        raise ValueError(f"workers: expected >= 0, got {workers}")
    return iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=int(workers),
                                            pin_memory=torch.cuda.is_available()))


def encode_dataset(source, dest, vae, max_images: int | None = None, use_labels: bool = True,
                   batch_size: int | None = None, progress: bool = False, workers: int = 0) -> dict:
    """A pixel dataset (anything :func:`edm2fast.data.open_dataset` reads) -> latent ``.npy`` files.

    Each file holds float32 ``[2 * 4, H/8, W/8]``: the posterior mean then std of ``vae``
    (an :class:`edm2fast.vae.VAE`), fed ``x / 255`` as the release does. Grayscale images are
    repeated to RGB. Labels and item order are kept. ``workers``: processes that read and
    decode images ahead of the VAE (order unchanged).
    """
    import torch

    from .data import open_dataset
    ds = open_dataset(source, use_labels=use_labels, max_size=max_images)
    if ds.kind != "pixels":
        raise ValueError(f"source: {source} holds latents, not images")
    n = len(ds)
    bs = int(batch_size or vae.batch_size)
    labels = []
    batches = _ordered_batches(ds, bs, workers)
    bar = _progress(n, "encode", progress)
    with open_dest(dest) as write:
        for start, (x, onehot) in zip(range(0, n, bs), batches):
            idx = range(start, min(start + bs, n))
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            mean, std = vae.encode(x, batch_size=bs)
            raw = torch.cat([mean, std], dim=1).numpy().astype(np.float32)
            for j, i in enumerate(idx):
                name = _item_name(i, "img-mean-std-", "npy")
                write(name, _npy_bytes(raw[j]))
                labels.append([name, int(onehot[j].argmax()) if ds.has_labels else None])
            if bar is not None:
                bar.update(len(idx))
        write("dataset.json", _metadata(labels if ds.has_labels else None, _source_classes(source),
                                        encoder={"vae": str(vae.name), "pixels": "uint8 / 255",
                                                 "layout": "mean, std on channels"}))
    if bar is not None:
        bar.close()
    return {"items": n, "shape": tuple(raw.shape[1:]), "labels": ds.has_labels}


def decode_dataset(source, dest, vae, max_images: int | None = None, use_labels: bool = True,
                   batch_size: int | None = None, progress: bool = False, workers: int = 0) -> dict:
    """A latent dataset -> PNGs of its decoded means (a pixel dataset with the same order and labels)."""
    import torch

    from .data import open_dataset
    ds = open_dataset(source, use_labels=use_labels, max_size=max_images)
    if ds.kind != "latents":
        raise ValueError(f"source: {source} holds images, not latents (encode it first)")
    n = len(ds)
    bs = int(batch_size or vae.batch_size)
    labels = []
    batches = _ordered_batches(ds, bs, workers)
    bar = _progress(n, "decode", progress)
    from PIL import Image
    with open_dest(dest) as write:
        for start, (raw, onehot) in zip(range(0, n, bs), batches):
            idx = range(start, min(start + bs, n))
            mean = raw[:, : raw.shape[1] // 2]
            pixels = vae.decode_raw(mean, batch_size=bs).permute(0, 2, 3, 1).numpy()
            for j, i in enumerate(idx):
                name = _item_name(i, "img", "png")
                write(name, _png_bytes(Image.fromarray(pixels[j], "RGB")))
                labels.append([name, int(onehot[j].argmax()) if ds.has_labels else None])
            if bar is not None:
                bar.update(len(idx))
        write("dataset.json", _metadata(labels if ds.has_labels else None, _source_classes(source)))
    if bar is not None:
        bar.close()
    return {"items": n, "shape": tuple(pixels.shape[1:]), "labels": ds.has_labels}
