"""``edm2fast generate``: sample images with the EDM2 Heun sampler (spec §8).

Examples::

    edm2fast generate --net runs/digits/phema-0131-0.100.safetensors --seeds 0-99 --class cycle \\
        --outdir out/digits
    edm2fast generate --net big.safetensors --gnet small.safetensors --guidance 2.0 --seeds 0-15 --outdir out/ag
    edm2fast generate --preset edm2-img512-s-autog-fid --seeds 0-63 --outdir out/autog   # release model
    torchrun --standalone --nproc_per_node 8 -m edm2fast generate --preset edm2-img512-xxl-fid \\
        --seeds 0-49999 --subdirs --outdir out/fid50k

Every image has its own seed (``--seeds 0-63``, ``0,5,9``, ``0-9,100-109``), so it does not
depend on the batch it is drawn in, nor on the number of processes. Seeds follow the
release's rule: a ``torch.Generator`` on the sampling device seeded with ``seed % 2**32``
draws the noise, then (class-conditional nets) the class, then any churn noise; so the
release's networks give the release's images. ``--net``/``--gnet`` take a snapshot, an
authors' pickle or ``training-state-*.pt``, locally or as an ``https://`` URL (downloaded once
into ``$EDM2FAST_CACHE_DIR``). ``--preset`` picks one of the release's 36 generation presets
(network, guiding network, guidance weight); ``--net``/``--gnet``/``--guidance`` override parts.

Every run writes ``<seed:06d>.png`` (``--subdirs``: one folder per thousand seeds), a grid image and
``samples.json`` (seed -> class). Latent models (the img512 presets: 4-channel latents) are
decoded to PNGs with the sd-vae-ft-mse VAE as the release does (``--vae DIR|ID``; needs
``pip install 'mpkernels[latent]'`` and the weights in a folder or the Hugging Face cache,
``--download`` fetches them); ``--no-decode`` writes the raw latents to ``latents.npy``
(the VAE's own scale) instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

import numpy as np
import torch

from ..cli import UserError
from ..cli import resolve_device as _device
from .dataset import add_vae_arguments, open_vae
from .train import add_malloc_tuning_argument, bool_arg, finite_float, nonneg_float, nonneg_int, positive_float, \
    positive_int

DESCRIPTION = __doc__.replace("``", "").replace("::", ":")


def parse_seeds(value: str) -> list[int]:
    """``'0-63'``, ``'1,5,9'``, ``'0-9,100-109'`` -> list of ints (order kept, duplicates refused)."""
    seeds: list[int] = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if not m:
            raise ValueError(f"seeds: expected ranges and lists of integers >= 0 like 0-63 or 1,5,9, got {part!r}")
        if m.group(3) is not None:
            seeds.append(int(m.group(3)))
        else:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seeds: empty range {part!r}")
            seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ValueError(f"seeds: no seed in {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds: contains duplicates")
    return seeds


def seeds_arg(value: str) -> list[int]:
    try:
        return parse_seeds(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def class_arg(value: str):
    if value in ("random", "cycle"):
        return value
    try:
        return nonneg_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a class index >= 0, 'random' or 'cycle', got {value!r}") from None


def load_net(path: str, what: str = "net", device="cpu", dtype: str | None = None,
             channels_last: bool | None = None) -> torch.nn.Module:
    """A snapshot, an authors' pickle or a release training state (a path or an http(s) URL,
    downloaded once into the cache) as an eval-mode Precond; UserError for bad files.
    ``channels_last``: run the U-Net in that memory format (None: as the snapshot records)."""
    from .. import download
    from .. import io as edm_io
    if not path:
        raise UserError(f"--{what}: no file given")
    if download.is_url(path):
        try:
            path = download.fetch(path, what=f"--{what}")
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    if not os.path.exists(path):
        raise UserError(f"--{what}: {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"--{what}: {path} is a folder; give a .safetensors snapshot")
    if dtype is None and torch.device(device).type == "cpu":
        dtype = "fp32"  # a GPU-trained snapshot records fp16 compute; slow or unsupported on CPUs
    try:
        overrides = {} if channels_last is None else {"channels_last": bool(channels_last)}
        net = edm_io.load(path, device=device, compute_dtype=dtype, **overrides)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        msg = str(e)
        if path in msg:
            raise UserError(f"--{what}: {msg}") from None
        raise UserError(f"--{what}: {path}: {msg}") from None
    return net.eval().requires_grad_(False)


def _net_device(net) -> torch.device:
    try:
        return next(net.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def release_classes(seeds, label_dim: int, shape, device="cpu") -> list[int]:
    """The release's class of each seed: a generator on ``device`` seeded with ``seed % 2**32``
    draws the noise ``randn(shape)`` first, then the class ``randint(label_dim, size=[])``."""
    device = torch.device(device)
    out = []
    for s in seeds:
        g = torch.Generator(device).manual_seed(int(s) % (1 << 32))
        torch.randn(list(shape), generator=g, device=device)  # the noise comes first
        out.append(int(torch.randint(label_dim, size=[], generator=g, device=device)))
    return out


def class_labels_for(net, seeds, class_spec, device=None) -> list[int] | None:
    """The class of each seed: None (unconditional net), a fixed class, 'cycle' (seed % label_dim)
    or 'random' (default): the release's rule (:func:`release_classes`) on ``device`` (default:
    the net's), so a seed gets the class the release gives it."""
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if label_dim == 0:
        if isinstance(class_spec, int):
            raise UserError(f"--class {class_spec}: the network is unconditional (label_dim 0)")
        return None
    if class_spec is None or class_spec == "random":
        shape = [net.img_channels, net.img_resolution, net.img_resolution]
        return release_classes(seeds, label_dim, shape, device if device is not None else _net_device(net))
    if class_spec == "cycle":
        return [s % label_dim for s in seeds]
    if not 0 <= class_spec < label_dim:
        raise UserError(f"--class {class_spec}: out of range for a network with {label_dim} classes")
    return [int(class_spec)] * len(seeds)


@torch.no_grad()
def generate_images(net, seeds, classes=None, *, gnet=None, guidance: float = 1.0, num_steps: int = 32,
                    batch: int = 64, device="cpu", sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0,
                    S_max=float("inf"), S_noise=1, progress=None, eval_mode: str = "auto") -> torch.Tensor:
    """Sample one image per seed (``[N, C, H, W]`` float32 on the CPU, model space).

    The initial noise and any churn noise of image ``k`` come from a generator seeded with
    ``seeds[k]`` alone (:class:`~edm2fast.sampler.StackedRandomGenerator`), so batching does
    not change an image (up to floating-point reduction order). As in the release, a
    class-conditional net's generators draw the noise, then one class each (used when
    ``classes`` is None; drawn anyway so churn noise matches), then the churn noise.
    ``eval_mode``: how the network evaluations run (:func:`edm2fast.graphs.graphed_denoiser`).
    """
    from ..sampler import StackedRandomGenerator, edm_sampler
    device = torch.device(device)
    seeds = [int(s) for s in seeds]
    if classes is not None and len(classes) != len(seeds):
        raise ValueError(f"classes: {len(classes)} labels for {len(seeds)} seeds")
    res, ch = net.img_resolution, net.img_channels
    if gnet is not None and (gnet.img_resolution, gnet.img_channels) != (res, ch):
        raise ValueError(f"gnet: makes {gnet.img_channels}x{gnet.img_resolution}px images, the net "
                         f"{ch}x{res}px")
    out = []
    for start in range(0, len(seeds), batch):
        bseeds = seeds[start:start + batch]
        rnd = StackedRandomGenerator(device, bseeds)
        noise = rnd.randn([len(bseeds), ch, res, res], device=device)
        labels = None
        if net.label_dim:
            drawn = rnd.randint(0, net.label_dim, size=[len(bseeds)], device=device)
            idx = drawn if classes is None else torch.as_tensor(classes[start:start + batch], device=device)
            labels = torch.nn.functional.one_hot(idx.long(), num_classes=net.label_dim).to(torch.float32)
        x = edm_sampler(net, noise, labels, gnet=gnet, num_steps=num_steps, sigma_min=sigma_min,
                        sigma_max=sigma_max, rho=rho, guidance=guidance, S_churn=S_churn, S_min=S_min, S_max=S_max,
                        S_noise=S_noise, randn_like=rnd.randn_like, eval_mode=eval_mode)
        out.append(x.float().cpu())
        if progress is not None:
            progress(min(start + batch, len(seeds)), len(seeds))
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[-1, 1]`` float ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]``."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images_uint8: np.ndarray, cols: int | None = None, pad: int = 1) -> np.ndarray:
    n, h, w, c = images_uint8.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images_uint8[k]
    return grid


def _pil(array: np.ndarray):
    from PIL import Image
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, "L" if array.shape[2] == 1 else "RGB")


def save_png(array: np.ndarray, path: str, scale: int = 1) -> None:
    from .. import io as edm_io
    img = _pil(array)
    if scale > 1:
        from PIL import Image
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with edm_io.atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def is_latent_model(net) -> bool:
    meta = getattr(net, "snapshot_metadata", {}) or {}
    kind = meta.get("data_kind")
    if kind is not None:
        return kind == "latents"
    return net.img_channels == 4


def latents_to_vae_scale(x: torch.Tensor) -> torch.Tensor:
    """Undo spec §5's latent scaling: ``z = x / 0.5 * raw_std + raw_mean`` (what the VAE decodes)."""
    from ..data import model_to_latents
    return model_to_latents(x)


def samples_to_uint8(images: torch.Tensor, vae=None, batch: int | None = None) -> np.ndarray:
    """Model-space samples -> uint8 ``[N, H, W, C]``: pixels ``x * 127.5 + 128``; latents through
    ``vae`` (an :class:`edm2fast.vae.VAE`: the release's decode, ``clamp(0, 1) * 255``)."""
    if vae is None:
        return to_uint8(images)
    return vae.decode(images, batch_size=batch).permute(0, 2, 3, 1).numpy()


LATENT_GRID_MAX = 64  # decoded latent models: the grid shows the first 64 images (512 px each)


def image_path(outdir: str, seed: int, subdirs: bool = False) -> str:
    """``OUTDIR/<seed:06d>.png``; with ``subdirs`` one folder per thousand seeds as the release
    (``OUTDIR/001000/001234.png``)."""
    if subdirs:
        return os.path.join(outdir, f"{seed // 1000 * 1000:06d}", f"{seed:06d}.png")
    return os.path.join(outdir, f"{seed:06d}.png")


def write_samples(images: torch.Tensor, seeds, classes, outdir: str, latent: bool, grid: str | None = None,
                  grid_cols: int | None = None, write_images: bool = True, vae=None, subdirs: bool = False,
                  write_grid: bool = True, write_info: bool = True) -> dict:
    """Write PNGs + grid + samples.json; returns what was written (``grid_images``: the grid's uint8 images).

    Latent samples are decoded with ``vae`` when given (a chunk at a time, so 50k images never
    sit in memory as pixels; the grid then shows the first ``LATENT_GRID_MAX``), else written
    raw to ``latents.npy``. ``subdirs``: PNGs in one folder per thousand seeds.
    """
    from .. import io as edm_io
    os.makedirs(outdir, exist_ok=True)
    written = {"outdir": outdir}
    info = {"seeds": list(seeds), "classes": classes}
    if latent and vae is None:
        path = os.path.join(outdir, "latents.npy")
        z = latents_to_vae_scale(images).numpy().astype(np.float32)
        with edm_io.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, z)
        written["latents"] = path
        info["latents"] = "latents.npy: [N, 4, H, W] in the sd-vae-ft-mse latent scale (decode with that VAE)"
    else:
        if not latent and images.shape[1] not in (1, 3):
            raise UserError(f"cannot write {images.shape[1]}-channel images as PNG")
        chunk = max(1, vae.batch_size) * 4 if latent else len(seeds)
        grid_images = []
        for start in range(0, len(seeds), chunk):
            arr = samples_to_uint8(images[start:start + chunk], vae if latent else None)
            if write_images:
                for k, s in enumerate(seeds[start:start + chunk]):
                    path = image_path(outdir, s, subdirs)
                    if subdirs:
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                    save_png(arr[k], path)
            room = LATENT_GRID_MAX - sum(len(a) for a in grid_images) if latent else len(arr)
            if room > 0:
                grid_images.append(arr[:room])
        arr = np.concatenate(grid_images) if grid_images else np.zeros((0, 1, 1, 1), np.uint8)
        written["grid_images"] = arr
        if write_grid:
            written["grid"] = write_grid_png(arr, grid or os.path.join(outdir, "grid.png"), grid_cols)
        written["images"] = len(seeds) if write_images else 0
    if write_info:
        with edm_io.atomic_open(os.path.join(outdir, "samples.json"), "w") as f:
            json.dump(info, f)
    return written


def write_grid_png(arr: np.ndarray, path: str, cols: int | None = None) -> str:
    scale = max(1, 128 // arr.shape[1])
    save_png(make_grid(arr, cols), path, scale=scale)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    from ..release_presets import preset_names
    parser.add_argument("--preset", default=None, choices=preset_names(), metavar="NAME",
                        help="one of the release's generation presets (net, gnet and guidance; the other flags "
                             "override): " + ", ".join(preset_names()))
    parser.add_argument("--net", default=None, metavar="PATH|URL",
                        help="main network: a .safetensors snapshot, an authors' .pkl or training-state-*.pt, "
                             "or an http(s) URL of one (required unless --preset)")
    parser.add_argument("--gnet", default=None, metavar="PATH|URL",
                        help="guiding network: an unconditional model (classifier-free guidance) or a smaller / "
                             "less-trained one (autoguidance)")
    parser.add_argument("--guidance", type=nonneg_float, default=None, metavar="W",
                        help="guidance weight w in D_g + w (D - D_g); 1 = none (default: the preset's, else 1: "
                             "a --gnet without --guidance is not used, as in the release)")
    parser.add_argument("--seeds", type=seeds_arg, default=parse_seeds("16-19"), metavar="LIST",
                        help="one image per seed: 0-63, 1,5,9, 0-9,100-109 (default: 16-19, as the release)")
    parser.add_argument("--class", dest="class_idx", type=class_arg, default=None, metavar="C",
                        help="class of every image (conditional nets): an index, 'cycle' (seed %% classes) "
                             "or 'random' (default: random, drawn from each seed)")
    parser.add_argument("--outdir", required=True, metavar="DIR", help="where to write the images")
    parser.add_argument("--grid", default=None, metavar="PATH", help="grid image path (default: OUTDIR/grid.png)")
    parser.add_argument("--grid-cols", type=positive_int, default=None, metavar="N", help="images per grid row")
    parser.add_argument("--no-images", action="store_true", help="write only the grid and samples.json")
    parser.add_argument("--subdirs", action="store_true",
                        help="write images into one folder per thousand seeds (OUTDIR/001000/001234.png)")
    parser.add_argument("--batch", type=positive_int, default=32, metavar="N",
                        help="maximum images per batch and process (default: 32, as the release)")
    parser.add_argument("--steps", type=positive_int, default=32, help="sampler steps (default: 32)")
    parser.add_argument("--sigma-min", "--sigma_min", dest="sigma_min", type=positive_float, default=0.002,
                        help="lowest noise level (default: 0.002)")
    parser.add_argument("--sigma-max", "--sigma_max", dest="sigma_max", type=positive_float, default=80.0,
                        help="highest noise level (default: 80)")
    parser.add_argument("--rho", type=positive_float, default=7.0, help="time step exponent (default: 7)")
    parser.add_argument("--S_churn", type=nonneg_float, default=0.0, help="stochasticity (default: 0, pure ODE)")
    parser.add_argument("--S_min", type=nonneg_float, default=0.0, help="churn only at noise levels >= S_min "
                        "(default: 0)")
    parser.add_argument("--S_max", type=lambda v: float("inf") if v.strip().lower() == "inf" else nonneg_float(v),
                        default=float("inf"), help="churn only at noise levels <= S_max (default: inf)")
    parser.add_argument("--S_noise", type=finite_float, default=1.0, help="churn noise inflation (default: 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                        help="compute precision (default: the snapshot's on CUDA, fp32 on CPU)")
    parser.add_argument("--backend", default="auto", help="mpkernels backend (default: auto)")
    parser.add_argument("--channels-last", type=bool_arg, nargs="?", const=True, default=None, metavar="BOOL",
                        help="run the U-Net in the channels_last memory format (faster convolutions on CPUs and "
                             "tensor cores; default: as the snapshot records, normally 0)")
    parser.add_argument("--eval-mode", choices=["auto", "eager", "graph", "compile"], default="auto",
                        help="how the network evaluations run: graph = one CUDA graph per batch shape, replayed "
                             "(the eager images); compile = torch.compile; auto (default) = graph on CUDA, else "
                             "eager, saying why once")
    add_malloc_tuning_argument(parser, "after every network evaluation")
    g = parser.add_argument_group("latent models")
    g.add_argument("--no-decode", action="store_true",
                   help="write the raw latents (latents.npy, the VAE's scale) instead of decoding them to PNGs")
    add_vae_arguments(g, "the decoder", dtype_flag="--vae-dtype")




def set_backend(name: str) -> None:
    import mpkernels as mk
    try:
        mk.set_backend(name)
    except (ValueError, mk.BackendUnavailableError) as e:
        raise UserError(f"--backend: {e}") from None


def resolve_networks(args) -> tuple[str, str | None, float]:
    """``(net, gnet, guidance)`` from ``--preset`` and the flags that override it."""
    from ..release_presets import resolve
    net, gnet, guidance = args.net, args.gnet, args.guidance
    if args.preset is not None:
        p = resolve(args.preset)
        net = net or p["net"]
        gnet = gnet or p["gnet"]
        guidance = guidance if guidance is not None else p["guidance"]
    if not net:
        raise UserError("--net: required (a snapshot, an authors' pickle or a URL), or pick a --preset")
    return net, gnet, 1.0 if guidance is None else float(guidance)


def shard_seeds(seeds, batch: int, rank: int, world: int) -> list[int]:
    """The seeds process ``rank`` of ``world`` draws, split into batches as the release does."""
    num_batches = max((len(seeds) - 1) // (batch * world) + 1, 1) * world
    batches = np.array_split(np.arange(len(seeds)), num_batches)[rank::world]
    return [seeds[i] for b in batches for i in b.tolist()]


def apply_malloc_tuning(args, device: torch.device) -> None:
    """:func:`edm2fast.hostmem.retain_freed_memory` for a CPU device, unless ``--malloc-tuning 0``."""
    if device.type == "cpu" and args.malloc_tuning:
        from ..hostmem import retain_freed_memory
        retain_freed_memory()


class _Dist:
    """``torchrun`` support: rank, world size, and the process group (gloo on CPU, nccl on CUDA)."""

    def __init__(self, device_name):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_name is None and self.world > 1 and torch.cuda.is_available():
            device_name = f"cuda:{local}"
        self.device = _device(device_name)
        self.owns_group = False
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj) -> list | None:
        """``obj`` of every rank on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def close(self):
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


DIST_GRID_MAX = 64  # several processes: the grid shows the first 64 seeds


def run(args) -> int:
    set_backend(args.backend)
    net_path, gnet_path, guidance = resolve_networks(args)
    dist = _Dist(args.device)
    try:
        return _run(args, dist, net_path, gnet_path, guidance)
    finally:
        dist.close()


def _run(args, dist, net_path, gnet_path, guidance) -> int:
    device = dist.device
    apply_malloc_tuning(args, device)
    net = load_net(net_path, "net", device, args.dtype, args.channels_last)
    gnet = load_net(gnet_path, "gnet", device, args.dtype, args.channels_last) if gnet_path else None
    if gnet is None and guidance != 1:
        raise UserError(f"--guidance {guidance}: needs a guiding network (--gnet)")
    if gnet is not None and guidance == 1:
        print("note: --gnet is not used with guidance 1 (no guidance); pass --guidance W to use it")
    if gnet is not None and (gnet.img_resolution, gnet.img_channels) != (net.img_resolution, net.img_channels):
        raise UserError(f"--gnet: makes {gnet.img_channels}x{gnet.img_resolution}px images, --net "
                        f"{net.img_channels}x{net.img_resolution}px")
    if gnet is not None and gnet.label_dim not in (0, net.label_dim):
        raise UserError(f"--gnet: has {gnet.label_dim} classes, --net {net.label_dim}")
    if args.sigma_min >= args.sigma_max:
        raise UserError(f"--sigma-min {args.sigma_min} must be below --sigma-max {args.sigma_max}")
    latent = is_latent_model(net)
    if latent and args.no_decode and dist.world > 1:
        raise UserError("--no-decode: writes one latents.npy, so it runs in one process; drop torchrun or "
                        "let the images be decoded")
    classes = class_labels_for(net, args.seeds, args.class_idx, device)  # every seed's: samples.json
    seeds = shard_seeds(args.seeds, args.batch, dist.rank, dist.world) if dist.world > 1 else list(args.seeds)
    my_classes = None
    if classes is not None:
        by_seed = dict(zip(args.seeds, classes))
        my_classes = [by_seed[s] for s in seeds]
    vae = None
    if latent and not args.no_decode:  # before sampling: a missing VAE should not cost a whole run
        vae = open_vae(args, device, batch_size=min(args.batch, 16))
        if vae.latent_channels != net.img_channels:
            raise UserError(f"--vae: {vae.name} has {vae.latent_channels} latent channels, the network makes "
                            f"{net.img_channels} (or pass --no-decode)")
    bar, progress = None, None
    if dist.rank == 0:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(seeds), unit="img", leave=False)
            progress = lambda done, total: bar.update(done - bar.n)  # noqa: E731
        except ImportError:
            pass
    try:
        images = generate_images(net, seeds, my_classes, gnet=gnet, guidance=guidance, num_steps=args.steps,
                                 batch=args.batch, device=device, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                                 rho=args.rho, S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max,
                                 S_noise=args.S_noise, progress=progress, eval_mode=args.eval_mode)
    finally:
        if bar is not None:
            bar.close()
    if dist.world == 1:
        written = write_samples(images, seeds, classes, args.outdir, latent, grid=args.grid,
                                grid_cols=args.grid_cols, write_images=not args.no_images, vae=vae,
                                subdirs=args.subdirs)
    else:
        if dist.rank == 0:
            os.makedirs(args.outdir, exist_ok=True)
        dist.barrier()
        written = write_samples(images, seeds, classes, args.outdir, latent, write_images=not args.no_images,
                                vae=vae, subdirs=args.subdirs, write_grid=False, write_info=False)
        grid_seeds = set(args.seeds[:DIST_GRID_MAX])
        mine = {s: written["grid_images"][k] for k, s in enumerate(seeds[:len(written["grid_images"])])
                if s in grid_seeds}
        parts = dist.gather(mine)
        if dist.rank == 0:
            every = {s: a for part in parts for s, a in part.items()}
            arr = np.stack([every[s] for s in args.seeds[:DIST_GRID_MAX] if s in every])
            written["grid"] = write_grid_png(arr, args.grid or os.path.join(args.outdir, "grid.png"), args.grid_cols)
            with edm_io_atomic_open(os.path.join(args.outdir, "samples.json")) as f:
                json.dump({"seeds": list(args.seeds), "classes": classes, "processes": dist.world}, f)
            written["images"] = len(args.seeds) if not args.no_images else 0
        dist.barrier()
    if dist.rank != 0:
        return 0
    if latent and vae is None:
        print(f"wrote {len(seeds)} raw latents to {written['latents']} (--no-decode: decode them with "
              "the sd-vae-ft-mse VAE, e.g. edm2fast.vae.load_vae(...).decode_raw)")
    else:
        procs = f" ({dist.world} processes)" if dist.world > 1 else ""
        print(f"wrote {written['images']} images and {written['grid']} to {args.outdir}{procs}")
    return 0


def edm_io_atomic_open(path):
    from .. import io as edm_io
    return edm_io.atomic_open(path, "w")
