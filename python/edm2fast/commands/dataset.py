"""``edm2fast dataset``: make training datasets the way the paper's release does (spec §9).

Subcommands:

  convert   images (folder or zip, class subfolders or dataset.json labels) -> PNG dataset
            (folder or .zip) with dataset.json, cropped and resized by --transform
  encode    images -> sd-vae-ft-mse latents (posterior mean and std per image, .npy) for the
            latent (img512) models; needs diffusers (pip install 'mpkernels[latent]')
  decode    latents -> PNGs of the decoded means, to check an encoded dataset

ImageNet-512 as in the paper::

    edm2fast dataset convert --source ILSVRC/Data/CLS-LOC/train --dest img512.zip \\
        --transform center-crop-dhariwal --resolution 512x512
    edm2fast dataset encode --source img512.zip --dest img512-sd.zip

Without a subcommand, the older form packs a folder into a zip with the center-crop
transform: ``edm2fast dataset --source DIR --dest OUT.zip --resolution R`` (= convert
--transform center-crop --resolution RxR).
"""

from __future__ import annotations

import argparse
import contextlib
import os

from ..cli import UserError
from ..cli import resolve_device as _device

DESCRIPTION = __doc__.replace("``", "").replace("::", ":")
_ARG_PREFIXES = ("source", "dest", "resolution", "transform", "channels", "max_images", "vae", "batch_size",
                 "images", "z", "workers")


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return v


def add_vae_arguments(parser, what: str = "the VAE", dtype_flag: str = "--dtype") -> None:
    """``--vae/--model-url``, ``--download`` and a VAE precision flag (shared with ``generate``)."""
    from ..vae import DEFAULT_VAE
    parser.add_argument("--vae", "--model-url", dest="vae", default=DEFAULT_VAE, metavar="DIR|ID",
                        help=f"{what}: a diffusers AutoencoderKL folder, or a Hugging Face model id / URL found "
                             f"in the local cache (default: {DEFAULT_VAE}, the paper's)")
    parser.add_argument("--download", action="store_true",
                        help="allow downloading the VAE from the Hugging Face Hub when it is not cached")
    parser.add_argument(dtype_flag, dest="vae_dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="VAE precision (default: fp32, as the release; keep it to make training data; bf16/fp16 "
                             "are faster on GPUs)")


def open_vae(args, device=None, batch_size: int = 8):
    """The VAE the arguments of :func:`add_vae_arguments` name; :class:`UserError` when it cannot load."""
    from .. import vae as vae_module
    try:
        return vae_module.load_vae(args.vae, device=device, dtype=args.vae_dtype, batch_size=batch_size,
                                   allow_download=True if args.download else None)
    except ImportError as e:
        raise UserError(str(e)) from None
    except (FileNotFoundError, ValueError) as e:
        raise UserError(_flag_message(e)) from None


def _flag_message(e: Exception) -> str:
    msg = str(e)
    for prefix in _ARG_PREFIXES:
        if msg.startswith(prefix + ":"):
            flag = {"max_images": "max-images", "batch_size": "batch", "images": "source", "z": "source"}.get(prefix,
                                                                                                          prefix)
            return f"--{flag}{msg[len(prefix):]}"
    return msg


@contextlib.contextmanager
def _as_user_errors():
    try:
        yield
    except ImportError as e:
        raise UserError(str(e)) from None
    except (FileNotFoundError, ValueError) as e:
        raise UserError(_flag_message(e)) from None


def add_arguments(parser) -> None:
    from ..datatool import TRANSFORMS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    g = parser.add_argument_group("the older form (no subcommand): pack a folder into a zip, center-crop")
    g.add_argument("--source", metavar="DIR", default=None, help="folder of PNG/JPEG images (searched recursively)")
    g.add_argument("--dest", metavar="OUT.zip", default=None, help="zip file to write")
    g.add_argument("--resolution", metavar="R", type=int, default=None, help="output size R x R in pixels")
    g.add_argument("--channels", type=int, choices=[1, 3], default=3, help="3: RGB (default), 1: grayscale")
    g.add_argument("--max-images", metavar="N", type=int, default=None, help="pack at most N images")
    g.add_argument("--no-labels", action="store_true", help="ignore class subfolders")

    sub = parser.add_subparsers(dest="dataset_command", metavar="{convert,encode,decode}")
    sub.required = False

    p = sub.add_parser("convert", help="images -> cropped, resized PNG dataset with labels",
                       description="Images (folder or zip) -> a PNG dataset (folder or .zip) with dataset.json. "
                                   "Labels: the source's dataset.json, else class subfolders (sorted names are "
                                   "classes 0, 1, ...; ImageNet's synset folders give the standard indices).")
    p.add_argument("--source", required=True, metavar="DIR|ZIP", help="images, searched recursively")
    p.add_argument("--dest", required=True, metavar="DIR|ZIP", help="new (or empty) folder, or a .zip file")
    p.add_argument("--transform", choices=TRANSFORMS, default=None,
                   help="center-crop: centre square, Lanczos resize; center-crop-wide: centre band pasted on a "
                        "black square; center-crop-dhariwal: ADM's ImageNet crop (box halvings, bicubic). "
                        "Default: Lanczos resize to WxH")
    p.add_argument("--resolution", metavar="WxH", default=None, help="output size, e.g. 512x512")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3, help="3: RGB (default), 1: grayscale")
    p.add_argument("--max-images", metavar="N", type=_positive_int, default=None, help="write at most N images")
    p.add_argument("--no-labels", action="store_true", help="write no labels")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images (and report how many) instead of stopping at the first")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    for name, text in (("encode", "images -> VAE latents (mean and std per image) for latent models"),
                       ("decode", "latents -> PNGs of the decoded means, to check an encoded dataset")):
        p = sub.add_parser(name, help=text, description=text + ". Needs diffusers (pip install 'mpkernels[latent]').")
        p.add_argument("--source", required=True, metavar="DIR|ZIP",
                       help="image dataset" if name == "encode" else "latent dataset (from encode)")
        p.add_argument("--dest", required=True, metavar="DIR|ZIP", help="new (or empty) folder, or a .zip file")
        add_vae_arguments(p)
        p.add_argument("--batch", type=_positive_int, default=8, metavar="N", help="images per VAE call (default: 8)")
        p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--workers", type=int, default=2, metavar="N",
                       help="processes reading items ahead of the VAE (default: 2; 0: none)")
        p.add_argument("--max-images", metavar="N", type=_positive_int, default=None,
                       help=f"{name} at most N items")
        p.add_argument("--no-labels", action="store_true", help="write no labels")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    command = getattr(args, "dataset_command", None)
    if command is None:
        return _run_pack(args)
    if command == "convert":
        return _run_convert(args)
    return _run_latents(args, command)


def _run_convert(args) -> int:
    from ..datatool import convert_dataset
    with _as_user_errors():
        r = convert_dataset(args.source, args.dest, transform=args.transform, resolution=args.resolution,
                            channels=args.channels, max_images=args.max_images, use_labels=not args.no_labels,
                            skip_bad=args.skip_bad, progress=args.progress)
    w, h = r["size"]
    desc = f"{r['classes']} classes" if r["classes"] else ("labels" if r["labels"] else "no labels")
    skipped = [f"{r['skipped_by_transform']} skipped by {args.transform}"] if r["skipped_by_transform"] else []
    skipped += [f"{r['skipped_unreadable']} unreadable skipped"] if r["skipped_unreadable"] else []
    print(f"wrote {args.dest}: {r['images']} images, {w}x{h}x{r['channels']}, {desc}"
          + (f" ({', '.join(skipped)})" if skipped else ""))
    return 0


def _run_latents(args, command: str) -> int:
    from .. import datatool
    if not os.path.exists(args.source):
        raise UserError(f"--source: {args.source}: no such file or folder")
    device = _device(args.device)
    vae = open_vae(args, device, batch_size=args.batch)
    fn = datatool.encode_dataset if command == "encode" else datatool.decode_dataset
    with _as_user_errors():
        r = fn(args.source, args.dest, vae, max_images=args.max_images, use_labels=not args.no_labels,
               batch_size=args.batch, progress=args.progress, workers=args.workers)
    what = "latents" if command == "encode" else "images"
    shape = "x".join(str(s) for s in r["shape"])
    print(f"wrote {args.dest}: {r['items']} {what} ({shape}), {'labels' if r['labels'] else 'no labels'}")
    return 0


def _run_pack(args) -> int:
    """The older form: a folder -> a zip, center-crop at R x R (``convert --transform center-crop``)."""
    from ..datatool import convert_dataset, list_source
    if args.source is None or args.dest is None or args.resolution is None:
        raise UserError("--source, --dest and --resolution are required (or use a subcommand: convert, encode, "
                        "decode; see edm2fast dataset --help)")
    source, dest = os.fspath(args.source), os.fspath(args.dest)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--source: {source}: no such folder")
    if args.resolution < 1 or args.resolution > 8192:
        raise UserError(f"--resolution: expected 1..8192 pixels, got {args.resolution}")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images: expected >= 1, got {args.max_images}")
    if not dest.lower().endswith(".zip"):
        raise UserError(f"--dest: expected a .zip file name, got {dest}")
    folder = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(folder):
        raise UserError(f"--dest: folder {folder} does not exist")
    if os.path.abspath(dest).startswith(os.path.abspath(source) + os.sep) and os.path.exists(dest):
        raise UserError(f"--dest: {dest} lies inside --source and already exists")
    if not list_source(source, use_labels=False)[0]:
        raise UserError(f"--source: no images (.png, .jpg, ...) found in {source}")
    with _as_user_errors():
        r = convert_dataset(source, dest, transform="center-crop", resolution=args.resolution,
                            channels=args.channels, max_images=args.max_images, use_labels=not args.no_labels)
    desc = f"{r['classes']} classes" if r["classes"] else ("labels" if r["labels"] else "no labels")
    print(f"wrote {dest}: {r['images']} images, {args.resolution}x{args.resolution}x{args.channels}, {desc}")
    return 0
