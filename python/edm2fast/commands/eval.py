"""``edm2fast eval``: quality of a digits model: class accuracy of samples and Frechet distance.

Examples::

    edm2fast eval --net runs/digits/phema-0131-0.100.safetensors --num 500
    edm2fast eval --samples out/digits          # PNGs + samples.json written by edm2fast generate

A small classifier trained once on the built-in scikit-learn digits (deterministic, cached
in ~/.cache/edm2fast or --cache) classifies the samples: accuracy = fraction recognised as
the requested class; FD = Frechet distance between real and generated images in the
classifier's 128-d feature space (lower is better; real vs real is near 0).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from ..cli import UserError
from .generate import _device, apply_malloc_tuning, class_labels_for, generate_images, \
    load_net, parse_seeds, seeds_arg, set_backend
from .train import add_malloc_tuning_argument, nonneg_float, positive_int

DESCRIPTION = __doc__.replace("``", "").replace("::", ":")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--net", metavar="PATH", help="a digits model snapshot: sample it and evaluate")
    src.add_argument("--samples", metavar="DIR", help="a folder written by edm2fast generate (PNGs + samples.json)")
    parser.add_argument("--num", type=positive_int, default=500, help="samples to draw with --net (default: 500)")
    parser.add_argument("--seeds", type=seeds_arg, default=None, metavar="LIST",
                        help="seeds to draw with --net (default: 0 .. num-1); classes cycle through 0-9")
    parser.add_argument("--gnet", default=None, metavar="PATH", help="guiding network (with --net)")
    parser.add_argument("--guidance", type=nonneg_float, default=None, metavar="W", help="guidance weight")
    parser.add_argument("--steps", type=positive_int, default=32, help="sampler steps (default: 32)")
    parser.add_argument("--batch", type=positive_int, default=250, help="images per sampler batch (default: 250)")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="classifier cache folder (default: $EDM2FAST_CACHE or ~/.cache/edm2fast)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_malloc_tuning_argument(parser, "after every network evaluation")
    parser.add_argument("--backend", default="auto", help="mpkernels backend (default: auto)")


def check_digits_net(net, what="--net") -> None:
    if net.img_channels != 1 or net.img_resolution not in (16, 32):
        raise UserError(f"{what}: eval measures models of the built-in digits (1 channel, 16 or 32 px); this one "
                        f"makes {net.img_channels}x{net.img_resolution}px images")
    if net.label_dim not in (0, 10):
        raise UserError(f"{what}: a digits model has 10 classes (or none), this one {net.label_dim}")


def load_samples(folder: str) -> tuple[torch.Tensor, list[int] | None]:
    """PNG samples and their classes from a ``generate`` output folder."""
    from PIL import Image
    if not os.path.isdir(folder):
        raise UserError(f"--samples: {folder}: no such folder")
    meta_path = os.path.join(folder, "samples.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"--samples: {folder} has no samples.json (write it with edm2fast generate)")
    try:
        with open(meta_path) as f:
            info = json.load(f)
        seeds = [int(s) for s in info["seeds"]]
        classes = info.get("classes")
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--samples: {meta_path}: unreadable ({e})") from None
    images = []
    for s in seeds:
        path = os.path.join(folder, f"{s:06d}.png")
        if not os.path.isfile(path):
            raise UserError(f"--samples: {path} is missing (generated with --no-images?)")
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
        except Exception as e:
            raise UserError(f"--samples: {path}: not a readable image ({e})") from None
        images.append(torch.from_numpy(arr))
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1:
        raise UserError(f"--samples: images of different sizes in {folder}: {sorted(shapes)}")
    x = torch.stack(images)[:, None] / 127.5 - 1
    return x, classes


def run(args) -> int:
    from .. import evaluate
    set_backend(args.backend)
    if args.samples is not None:
        if args.gnet or args.seeds is not None:
            raise UserError("--gnet and --seeds go with --net, not --samples")
        images, classes = load_samples(args.samples)
        if images.shape[-1] not in (16, 32):
            raise UserError(f"--samples: eval measures 16 or 32 px digits, got {images.shape[-1]} px")
        source = args.samples
    else:
        device = _device(args.device)
        apply_malloc_tuning(args, device)
        net = load_net(args.net, "net", device)
        check_digits_net(net)
        gnet = load_net(args.gnet, "gnet", device) if args.gnet else None
        guidance = args.guidance if args.guidance is not None else (2.0 if gnet is not None else 1.0)
        if gnet is None and guidance != 1:
            raise UserError(f"--guidance {guidance}: needs a guiding network (--gnet)")
        if gnet is not None:
            check_digits_net(gnet, "--gnet")
        seeds = args.seeds if args.seeds is not None else parse_seeds(f"0-{args.num - 1}")
        classes = class_labels_for(net, seeds, "cycle")
        images = generate_images(net, seeds, classes, gnet=gnet, guidance=guidance, num_steps=args.steps,
                                 batch=args.batch, device=device)
        source = args.net
    if len(images) < 2:
        raise UserError("need at least 2 samples for the Frechet distance")
    try:
        model = evaluate.load_classifier(args.cache, verbose=True)
    except OSError as e:
        raise UserError(f"--cache: {e}") from None
    metrics = evaluate.evaluate_samples(images, classes, model=model)
    metrics["source"] = source
    parts = [f"{metrics['num']} samples"]
    if "accuracy" in metrics:
        parts.append(f"class accuracy {metrics['accuracy'] * 100:.1f}%")
    parts.append(f"Frechet distance {metrics['fd']:.3f}")
    print(f"{source}: " + ", ".join(parts))
    if args.json:
        from .. import io as edm_io
        with edm_io.atomic_open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0
