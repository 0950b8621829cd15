"""``edm2fast metrics``: FID and FD_DINOv2 as in the EDM2 paper (ref, calc, gen).

Examples::

    # reference statistics of a dataset (a folder or zip of images), once per dataset
    edm2fast metrics ref --data datasets/img512.zip --dest refs/img512.npz

    # metrics of a folder (or zip) of 50,000 generated images against the authors' statistics
    edm2fast metrics calc --images out/img512-s --ref refs/img512.pkl --metrics fid,fd_dinov2

    # generate and evaluate in one streaming pass, writing no images, on 8 GPUs
    torchrun --standalone --nproc_per_node 8 -m edm2fast metrics gen \\
        --net edm2-img512-s.safetensors --ref refs/img512.pkl --seeds 0-49999

Detector weights: --fid-weights / --dinov2-weights (a file or a folder holding it), else
$EDM2FAST_FID_WEIGHTS / $EDM2FAST_DINOV2_WEIGHTS, else the cache folder, else a download on
first use. 'random' builds the detectors with fixed random weights (smoke tests only: the
numbers then mean nothing). Under torchrun the images are sharded across ranks and the
statistics all-reduced in float64; the result does not depend on the number of ranks (up to
floating-point summation order). Rank 0 prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from ..cli import UserError
from .dataset import add_vae_arguments, open_vae
from .generate import class_arg, parse_seeds, seeds_arg
from .train import nonneg_float, nonneg_int, positive_int

DESCRIPTION = __doc__.replace("``", "").replace("::", ":")


def metrics_arg(value: str) -> list[str]:
    from ..metrics import METRICS
    names = [m.strip() for m in str(value).split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(METRICS)}, got {value!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"duplicate metric in {value!r}")
    return names


def _common(p: argparse.ArgumentParser, stats_out: bool = False) -> None:
    p.add_argument("--metrics", type=metrics_arg, default=["fid", "fd_dinov2"], metavar="LIST",
                   help="comma-separated: fid, fd_dinov2 (default: both)")
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="Inception weights (weights-inception-2015-12-05-6726825d.pth) or a folder holding them; "
                        "'random' for a smoke test (default: $EDM2FAST_FID_WEIGHTS, cache, download)")
    p.add_argument("--dinov2-weights", default=None, metavar="PATH",
                   help="DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth) or a folder holding them; 'random' "
                        "for a smoke test (default: $EDM2FAST_DINOV2_WEIGHTS, cache, download)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="weights and downloads cache (default: $EDM2FAST_CACHE_DIR/metrics, "
                        "else ~/.cache/edm2fast/metrics)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per batch and rank (default: 64)")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    if stats_out:
        p.add_argument("--save-stats", default=None, metavar="STATS",
                       help="also write the statistics of the evaluated images (.npz), to compare them again later")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    sub = parser.add_subparsers(dest="metrics_command", metavar="subcommand", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("ref", help="statistics of a dataset, for later comparison", formatter_class=fmt,
                       description="Reference statistics of a dataset (a folder or zip of images, e.g. the output "
                                   "of edm2fast dataset), written as .npz.\n\nExample:\n  edm2fast metrics ref "
                                   "--data datasets/img512.zip --dest refs/img512.npz")
    p.add_argument("--data", required=True, metavar="DATASET", help="folder or zip of images")
    p.add_argument("--dest", required=True, metavar="STATS", help="output statistics file (.npz)")
    p.add_argument("--max-images", type=positive_int, default=None, metavar="N", help="use only the first N images")
    p.add_argument("--workers", type=nonneg_int, default=2, help="data loading processes per rank (default: 2)")
    _common(p)

    p = sub.add_parser("calc", help="metrics of a folder or zip of generated images", formatter_class=fmt,
                       description="Metrics of a folder or zip of generated images against reference statistics "
                                   "(.pkl from the authors, .npz from metrics ref, or a URL).\n\nExample:\n  "
                                   "edm2fast metrics calc --images out/img512-s --ref refs/img512.pkl --num 50000")
    p.add_argument("--images", required=True, metavar="DIR_OR_ZIP", help="folder or zip of generated images")
    p.add_argument("--ref", required=True, metavar="STATS", help="reference statistics (.pkl, .npz or URL)")
    p.add_argument("--num", type=positive_int, default=50000,
                   help="images to evaluate (default: 50000); fewer available is an error, more uses a seeded "
                        "random subset")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of that subset (default: 0)")
    p.add_argument("--workers", type=nonneg_int, default=2, help="data loading processes per rank (default: 2)")
    _common(p, stats_out=True)

    p = sub.add_parser("gen", help="generate and evaluate in one pass (no images written)", formatter_class=fmt,
                       description="Sample one image per seed and evaluate them without writing images; seeds "
                                   "are sharded across torchrun ranks.\n\nExample:\n  torchrun --standalone "
                                   "--nproc_per_node 8 -m edm2fast metrics gen --net net.safetensors --ref "
                                   "refs/img512.pkl --seeds 0-49999 --gnet small.safetensors --guidance 1.4")
    p.add_argument("--net", required=True, metavar="NET", help="network snapshot (.safetensors) or authors' pickle")
    p.add_argument("--ref", required=True, metavar="STATS", help="reference statistics (.pkl, .npz or URL)")
    p.add_argument("--seeds", type=seeds_arg, default=parse_seeds("0-49999"), metavar="LIST",
                   help="one image per seed (default: 0-49999)")
    p.add_argument("--gnet", default=None, metavar="G", help="guiding network (autoguidance or unconditional)")
    p.add_argument("--guidance", type=nonneg_float, default=None, metavar="W",
                   help="guidance weight (default: 1, or 2 with --gnet)")
    p.add_argument("--class", dest="class_idx", type=class_arg, default="random", metavar="C",
                   help="class of every image: an index, 'cycle' or 'random' (default: random, from each seed)")
    p.add_argument("--steps", type=positive_int, default=32, help="sampler steps (default: 32)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="network compute precision (default: the snapshot's on CUDA, fp32 on CPU)")
    add_vae_arguments(p, "decoder of a latent model's samples", dtype_flag="--vae-dtype")
    p.add_argument("--backend", default="auto", help="mpkernels backend (default: auto)")
    _common(p, stats_out=True)


# ----------------------------------------------------------------------------------------------
# Distributed setup

class _Dist:
    """Rank, world size and device under torchrun (or a single process)."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg is None:
            device_arg = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device_arg)
        except RuntimeError as e:
            raise UserError(f"--device: {e}") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--device {device_arg}: CUDA is not available on this machine")
            if self.device.index is None:
                self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
            # Full fp32 in the detectors (cuDNN convolutions default to TF32 on Ampere and later).
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.owns_group = False
        dist = torch.distributed
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _detectors(args, names, dist: _Dist) -> dict:
    """Build the detectors on every rank; rank 0 first, so only it downloads missing weights."""
    from .. import metrics
    weights = {"fid": args.fid_weights, "fd_dinov2": args.dinov2_weights}
    flags = {"fid": "--fid-weights", "fd_dinov2": "--dinov2-weights"}
    out = {}
    if dist.rank != 0:
        dist.barrier()
    try:
        for name in names:
            try:
                out[name] = metrics.get_detector(name, weights[name], device=dist.device, cache_dir=args.cache)
            except ImportError as e:
                raise UserError(str(e)) from None
            except (FileNotFoundError, ValueError, TypeError) as e:
                raise UserError(f"{flags[name]}: {e}") from None
    finally:
        if dist.rank == 0:
            dist.barrier()
    if any(getattr(d, "weights", None) == "random" for d in out.values()) and dist.rank == 0:
        print("warning: detectors with random weights: the metrics are meaningless (smoke test)", file=sys.stderr)
    return out


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None, None
    try:
        from tqdm import tqdm
    except ImportError:
        return None, None
    bar = tqdm(total=total, unit="img", desc=desc, leave=False, file=sys.stderr)
    return bar, bar.update


def _finish(stats: dict, dist: _Dist) -> dict:
    """All-reduce the statistics; ``{metric: {'mu', 'sigma', 'num_images'}}``."""
    out = {}
    for name, s in stats.items():
        s.all_reduce()
        mu, sigma = s.mean_cov()
        out[name] = {"mu": mu, "sigma": sigma, "num_images": s.num}
    return out


def _detector_info(det) -> dict:
    w = getattr(det, "weights", None)
    return {"detector": type(det).__name__, "weights": "random" if w == "random" else os.path.basename(str(w))}


def _load_ref(path: str, names, detectors, cache) -> dict:
    from .. import metrics
    try:
        ref = metrics.load_stats(path, cache_dir=cache)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise UserError(f"--ref: {e}") from None
    missing = [m for m in names if m not in ref]
    if missing:
        raise UserError(f"--ref: {path} has no statistics for {', '.join(missing)} (it has {', '.join(ref)}); "
                        "choose --metrics accordingly")
    for m in names:
        dim = ref[m]["mu"].shape[0]
        if detectors is not None and dim != detectors[m].feature_dim:
            raise UserError(f"--ref: {m} statistics are {dim}-d, the detector gives {detectors[m].feature_dim}-d")
        if detectors is not None and (ref[m].get("weights") == "random") != (detectors[m].weights == "random"):
            raise UserError(f"--ref: {m} statistics and detector disagree on random weights; recompute the "
                            "reference with the same detector weights")
    return ref


def _score(result: dict, stats: dict, ref: dict, args, dist: _Dist, detectors: dict) -> None:
    """Rank 0: Frechet distances into ``result``; ``--save-stats`` writes the statistics."""
    from .. import metrics
    if dist.rank != 0:
        return
    for m in args.metrics:
        result[m] = metrics.frechet_distance(stats[m]["mu"], stats[m]["sigma"], ref[m]["mu"], ref[m]["sigma"])
    if args.save_stats:
        for m in stats:
            stats[m].update(_detector_info(detectors[m]))
        metrics.save_stats(args.save_stats, stats, dataset=result.get("images") or result.get("net"))


def _report(result: dict, args, dist: _Dist) -> None:
    if dist.rank != 0:
        return
    scores = "  ".join(f"{m} {result[m]:.4f}" for m in result.get("metrics", []))
    if scores:
        print(f"{result['num_images']} images: {scores}", file=sys.stderr)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        from .. import io as edm_io
        with edm_io.atomic_open(args.json, "w") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------------------------
# Images from a dataset

def _open_images(path: str, what: str, max_images=None):
    from .. import data
    try:
        ds = data.open_dataset(path, use_labels=False, max_size=max_images)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{what}: {e}") from None
    if ds.kind != "pixels" or ds.num_channels not in (1, 3):
        raise UserError(f"{what}: {path} holds {ds.kind} with {ds.num_channels} channels; the metrics need RGB "
                        "(or grayscale) images")
    return ds


def _stack_images(items) -> torch.Tensor:
    return torch.from_numpy(np.stack([x for x, _label in items]))


def _image_batches(ds, indices: np.ndarray, batch: int, workers: int):
    subset = torch.utils.data.Subset(ds, indices.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=workers, shuffle=False,
                                         collate_fn=_stack_images)
    yield from loader


def _dataset_stats(args, ds, indices: np.ndarray, dist: _Dist, detectors: dict, desc: str) -> dict:
    from .. import metrics
    shard = indices[dist.rank::dist.world]
    bar, progress = _progress(len(shard), dist.rank == 0 and not args.no_progress, desc)
    try:
        stats = metrics.accumulate_features(detectors, _image_batches(ds, shard, args.batch, args.workers),
                                            device=dist.device, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    return _finish(stats, dist)


def _check_dest(path, flag: str) -> None:
    if path is None:
        return
    if not path.endswith(".npz"):
        raise UserError(f"{flag}: statistics are written as .npz, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag}: folder {folder} does not exist")


def run_ref(args, dist: _Dist) -> int:
    from .. import metrics
    _check_dest(args.dest, "--dest")
    ds = _open_images(args.data, "--data", args.max_images)
    if len(ds) < 2:
        raise UserError(f"--data: {args.data} has {len(ds)} image(s); statistics need at least 2")
    detectors = _detectors(args, args.metrics, dist)
    stats = _dataset_stats(args, ds, np.arange(len(ds)), dist, detectors, "ref")
    if dist.rank == 0:
        for m in stats:
            stats[m].update(_detector_info(detectors[m]))
        metrics.save_stats(args.dest, stats, dataset=os.path.abspath(args.data))
    _report({"dest": args.dest, "data": args.data, "num_images": len(ds), "metrics": []}, args, dist)
    return 0


def subset_indices(n: int, num: int, seed: int) -> np.ndarray:
    """``num`` of ``n`` image indices, sorted: all of them, or a random subset drawn from ``seed``."""
    if num > n:
        raise ValueError(f"num: {num} images asked for, only {n} available")
    if num == n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, num, replace=False))


def run_calc(args, dist: _Dist) -> int:
    _check_dest(args.save_stats, "--save-stats")
    if args.num < 2:
        raise UserError("--num: statistics need at least 2 images")
    ds = _open_images(args.images, "--images")
    if len(ds) < args.num:
        raise UserError(f"--images: {args.images} has {len(ds)} images, fewer than --num {args.num}")
    indices = subset_indices(len(ds), args.num, args.seed)
    ref = _load_ref(args.ref, args.metrics, None, args.cache)  # fail fast, before building detectors
    detectors = _detectors(args, args.metrics, dist)
    _load_ref(args.ref, args.metrics, detectors, args.cache)
    stats = _dataset_stats(args, ds, indices, dist, detectors, "calc")
    result = {"images": args.images, "ref": args.ref, "num_images": int(len(indices)), "metrics": args.metrics}
    _score(result, stats, ref, args, dist, detectors)
    _report(result, args, dist)
    return 0


# ----------------------------------------------------------------------------------------------
# Generate and evaluate

def _decoder(net, args, device):
    """samples (model space) -> uint8 RGB: direct for pixel models, the VAE for latent ones (as generate)."""
    from .generate import is_latent_model
    from ..data import model_to_pixels
    if not is_latent_model(net):
        return model_to_pixels
    vae = open_vae(args, device=device, batch_size=args.batch)
    return lambda x: vae.decode(x.to(device), batch_size=args.batch)


def run_gen(args, dist: _Dist) -> int:
    from .. import metrics
    from .generate import class_labels_for, generate_images, load_net, set_backend
    _check_dest(args.save_stats, "--save-stats")
    set_backend(args.backend)
    net = load_net(args.net, "net", dist.device, args.dtype)
    gnet = load_net(args.gnet, "gnet", dist.device, args.dtype) if args.gnet else None
    guidance = args.guidance if args.guidance is not None else (2.0 if gnet is not None else 1.0)
    if gnet is None and guidance != 1:
        raise UserError(f"--guidance {guidance}: needs a guiding network (--gnet)")
    if gnet is not None and (gnet.img_resolution, gnet.img_channels) != (net.img_resolution, net.img_channels):
        raise UserError(f"--gnet: makes {gnet.img_channels}x{gnet.img_resolution}px images, --net "
                        f"{net.img_channels}x{net.img_resolution}px")
    if len(args.seeds) < 2:
        raise UserError("--seeds: statistics need at least 2 images")
    ref = _load_ref(args.ref, args.metrics, None, args.cache)
    decode = _decoder(net, args, dist.device)
    detectors = _detectors(args, args.metrics, dist)
    _load_ref(args.ref, args.metrics, detectors, args.cache)
    class_labels_for(net, args.seeds[:1], args.class_idx)  # a bad --class fails before any sampling
    shard = np.arange(len(args.seeds))[dist.rank::dist.world]
    bar, progress = _progress(len(shard), dist.rank == 0 and not args.no_progress, "gen")

    def batches():
        for start in range(0, len(shard), args.batch):
            idx = shard[start:start + args.batch]
            seeds = [args.seeds[i] for i in idx]
            labels = class_labels_for(net, seeds, args.class_idx)  # each class depends on its seed alone
            x = generate_images(net, seeds, labels, gnet=gnet, guidance=guidance, num_steps=args.steps,
                                batch=len(seeds), device=dist.device)
            images = decode(x)
            yield images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)

    try:
        stats = metrics.accumulate_features(detectors, batches(), device=dist.device, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    stats = _finish(stats, dist)
    result = {"net": args.net, "gnet": args.gnet, "guidance": guidance, "ref": args.ref,
              "num_images": len(args.seeds), "metrics": args.metrics}
    _score(result, stats, ref, args, dist, detectors)
    _report(result, args, dist)
    return 0


def run(args) -> int:
    if args.batch < 1:
        raise UserError("--batch: must be >= 1")
    dist = _Dist(args.device)
    try:
        return {"ref": run_ref, "calc": run_calc, "gen": run_gen}[args.metrics_command](args, dist)
    finally:
        dist.close()
