"""EDM2 training loop as a library (spec §5-7): ``train(TrainConfig(...))`` or ``Trainer(config).run()``.

One step (``batch`` images, spec §6):

1. ``lr = schedule.learning_rate(cur_nimg, batch, lr, decay, rampup)``;
2. forced weight normalization of every MPConv weight, once: in eager steps inside the U-Net's
   first forward, folded into its one ``mk.mp_weights`` call (``networks.fold_forced_norm``);
   in captured or compiled steps with one multi-tensor ``mk.force_normalize_`` call before it
   (spec §1 design note: the compiled forward stays pure). The same update either way;
3. ``batch / (batch_gpu * world_size)`` accumulation rounds of ``EDM2Loss``, each seeded
   from ``(seed, rank, cur_nimg, round)``; each rank backpropagates its loss sum divided by
   its own images per step (``batch / world_size``) and DDP averages over the ranks, as the
   release does, so gradients (and Adam's epsilon relative to them) do not depend on the
   number of processes;
4. gradients forced finite, Adam (betas 0.9, 0.99) step;
5. every power-function EMA updated (spec §7).

All randomness of a step (data order, noise levels, noise, dropout) is a function of the
seed and ``cur_nimg``, so a run stopped at any checkpoint and resumed gives bit-identical
weights to an uninterrupted one. Rank 0 writes everything (atomically): EMA snapshots
``<prefix>-<kimg:07d>-<std:.3f>.safetensors``, checkpoints ``training-state-<nimg>.safetensors``,
``stats.jsonl`` (ours and the release's fields), ``log.txt`` (the console output) and
``training_options.json``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import resource
import sys
import time
from typing import Any

import numpy as np
import torch

import mpkernels as mk

from . import io as edm_io
from . import networks, phema, presets, schedule
from .loss import EDM2Loss

__all__ = [
    "SMALL_PRESETS", "TrainConfig", "Trainer", "train", "parse_nimg", "format_nimg", "resolve_preset",
    "preset_names", "find_checkpoints", "snapshot_name", "ConfigMismatchError", "describe_config",
    "RELEASE_STATUS_NIMG",
]

Ki, Mi = 1 << 10, 1 << 20

# Small configurations for quick runs (the spec's twelve presets are in ``presets.PRESETS``).
# Resolution and channels always come from the dataset; these give the rest.
_TINY_NET = {"model_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 1, "attn_resolutions": [8],
             "dropout": 0.0}
SMALL_PRESETS: dict[str, dict] = {
    # Any small dataset; a few minutes on a laptop CPU for 16-32 px images.
    "tiny": {"network": dict(_TINY_NET), "lr": 0.0100, "decay": 2000, "duration": 256 * Ki, "P_mean": -0.8,
             "P_std": 1.6, "batch": 128, "betas": (0.9, 0.99), "ema_stds": (0.050, 0.100), "rampup": 0.004,
             "snapshot": 16 * Ki, "checkpoint": 64 * Ki, "data": "pixels"},
    # The built-in scikit-learn digits (16 or 32 px, class-conditional): the README demo.
    # 64Ki images (512 steps): ~97% class accuracy of samples; 7.5 minutes on 2 shared CPU cores.
    "digits": {"network": dict(_TINY_NET), "lr": 0.0100, "decay": 1000, "duration": 64 * Ki, "P_mean": -0.8,
               "P_std": 1.6, "batch": 128, "betas": (0.9, 0.99), "ema_stds": (0.050, 0.100), "rampup": 0.002,
               "snapshot": 4 * Ki, "checkpoint": 16 * Ki, "data": "pixels"},
}

# Config fields that may differ between a checkpoint and the run resuming it: they change
# neither the trained weights nor the meaning of what is written.
_RESUMABLE_CHANGES = {"duration", "slice", "status", "checkpoint", "snapshot", "backend", "compile", "step_mode",
                      "channels_last",
                      "workers", "device", "progress", "keep_checkpoints", "batch_gpu", "run_dir", "bench",
                      "require_labels", "malloc_tuning"}

# The release prints a status line every 128 Ki images.
RELEASE_STATUS_NIMG = 128 * Ki

_CHECKPOINT_RE = re.compile(r"^training-state-(\d+)\.safetensors$")


class ConfigMismatchError(ValueError):
    """The configuration of a resumed run differs from the checkpoint's."""


# ----------------------------------------------------------------------------------------------
# Small helpers: image counts, presets, file names, atomic writes.

_NIMG_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(Ki|Mi|Gi|k|M|G|kimg|Mimg)?\s*$")
_NIMG_UNITS = {None: 1, "Ki": Ki, "Mi": Mi, "Gi": 1 << 30, "k": 1000, "kimg": 1000, "M": 10 ** 6, "Mimg": 10 ** 6,
               "G": 10 ** 9}


def parse_nimg(value, name: str = "value") -> int:
    """An image count: ``4096``, ``128Ki``, ``8Mi``, ``100k``, ``2.5M`` (Ki/Mi: powers of two)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an image count, got {value!r}")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    else:
        m = _NIMG_RE.match(str(value))
        if not m:
            raise ValueError(f"{name}: expected an image count like 4096, 128Ki, 8Mi or 100k, got {value!r}")
        n = float(m.group(1)) * _NIMG_UNITS[m.group(2)]
        if not math.isfinite(n) or abs(n - round(n)) > 1e-6 * max(1.0, n):
            raise ValueError(f"{name}: {value!r} is not a whole number of images")
        n = int(round(n))
    if n < 0:
        raise ValueError(f"{name}: must be >= 0, got {value!r}")
    return n


def format_nimg(n: int) -> str:
    """Inverse of :func:`parse_nimg` for display: ``8Mi``, ``128Ki`` or the plain count."""
    for unit, size in (("Mi", Mi), ("Ki", Ki)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def preset_names() -> list[str]:
    return sorted(SMALL_PRESETS) + sorted(presets.PRESETS)


def resolve_preset(name: str) -> dict:
    """A deep copy of preset ``name`` (the spec's presets or :data:`SMALL_PRESETS`)."""
    if name in SMALL_PRESETS:
        return copy.deepcopy(SMALL_PRESETS[name])
    if name in presets.PRESETS:
        p = copy.deepcopy(presets.PRESETS[name])
        p.setdefault("rampup", 10.0)            # Mimg, spec §6
        p.setdefault("snapshot", 8 * Mi)        # spec §7
        p.setdefault("checkpoint", 128 * Mi)
        return p
    raise ValueError(f"preset: unknown preset {name!r}; choose one of {preset_names()}")


def snapshot_name(prefix: str, nimg: int, std: float) -> str:
    """``<prefix>-<kimg:07d>-<std:.3f>.safetensors`` (kimg = nimg // 1000)."""
    return f"{prefix}-{nimg // 1000:07d}-{std:.3f}.safetensors"


def _write_json(path: str, obj) -> None:
    with edm_io.atomic_open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def find_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``[(nimg, path)]`` of the checkpoints in ``run_dir``, newest first (temporary files ignored)."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = _CHECKPOINT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(found, reverse=True)


def _step_seed(*values: int) -> int:
    """A 63-bit seed that is a pure function of ``values`` (seed, rank, cur_nimg, round, ...)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# ----------------------------------------------------------------------------------------------
# Configuration.

@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run; ``None`` means "the preset's value".

    Image counts (``duration``, ``snapshot``, ``checkpoint``, ``status``, ``slice``) accept
    ``parse_nimg`` strings (``'8Mi'``, ``'128Ki'``, ``'100k'``).
    """

    run_dir: str
    data: str = "digits16"          # dataset: a path, or 'digits16' / 'digits32' (built in)
    preset: str = "digits"
    cond: bool = True               # class-conditional when the dataset has labels
    require_labels: bool = False    # cond asked for explicitly (--cond): unlabelled data is an error
    channels: int | None = None     # model_channels override
    network: dict | None = None     # other Precond/UNet kwargs over the preset's (Python API)
    dropout: float | None = None
    lr: float | None = None         # reference learning rate (alpha_ref)
    decay: float | None = None      # t_ref, in iterations
    P_mean: float | None = None
    P_std: float | None = None
    duration: Any = None            # total training images
    batch: int | None = None        # images per optimizer step, over all ranks
    batch_gpu: int | None = None    # images per rank per accumulation round (default: all at once)
    rampup: float | None = None     # learning-rate warm-up, Mimg
    dtype: str | None = None        # 'fp16' | 'bf16' | 'fp32' (default fp16 on CUDA, fp32 on CPU)
    loss_scale: float = 1.0
    backend: str = "auto"           # mpkernels backend
    compile: bool = False
    step_mode: str = "auto"         # 'auto' | 'eager' | 'graph' | 'compile' (edm2fast.graphs)
    channels_last: bool = False     # the U-Net in the channels_last memory format (Precond(channels_last=True))
    seed: int = 0
    ema_stds: tuple = (0.050, 0.100)
    snapshot: Any = None            # images between EMA snapshots
    snapshot_dtype: str = "fp16"
    prefix: str = "phema"
    checkpoint: Any = None          # images between checkpoints
    keep_checkpoints: int = 2
    status: Any = None              # images between status lines (default: 128Ki, fewer for short runs)
    slice: Any = None               # stop after this many images in this invocation
    device: str | None = None       # default: cuda:LOCAL_RANK if available, else cpu
    workers: int = 0                # DataLoader workers (0: load in the main process)
    progress: bool = True           # tqdm progress bar (rank 0)
    bench: bool = True              # cuDNN autotuning (torch.backends.cudnn.benchmark), as the release
    malloc_tuning: bool = True      # CPU: keep freed memory in the heap (edm2fast.hostmem.retain_freed_memory)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ema_stds"] = [float(s) for s in d["ema_stds"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**d)


def _resolve(cfg: TrainConfig) -> dict:
    """Fill the preset's defaults in and validate; returns a flat JSON-able dict."""
    p = resolve_preset(cfg.preset)
    r = cfg.to_dict()
    for key in ("lr", "decay", "P_mean", "P_std", "batch", "rampup"):
        if r[key] is None:
            r[key] = p[key]
    r["duration"] = parse_nimg(r["duration"] if r["duration"] is not None else p["duration"], "duration")
    r["snapshot"] = parse_nimg(r["snapshot"] if r["snapshot"] is not None else p["snapshot"], "snapshot")
    r["checkpoint"] = parse_nimg(r["checkpoint"] if r["checkpoint"] is not None else p["checkpoint"], "checkpoint")
    r["slice"] = parse_nimg(r["slice"], "slice") if r["slice"] is not None else None
    net = dict(p["network"])
    if r["network"] is not None:
        if not isinstance(r["network"], dict):
            raise ValueError(f"network: expected a dict of network kwargs, got {r['network']!r}")
        reserved = sorted(set(r["network"]) & {"img_resolution", "img_channels", "label_dim", "dtype"})
        if reserved:
            raise ValueError(f"network: {reserved} come from the dataset and --dtype, not from network kwargs")
        net.update(copy.deepcopy(r["network"]))
    if r["channels"] is not None:
        net["model_channels"] = int(r["channels"])
    if r["dropout"] is not None:
        net["dropout"] = float(r["dropout"])
    r["network"] = net
    r["betas"] = list(p.get("betas", (0.9, 0.99)))

    def positive(name, integer=False, allow_zero=False):
        v = r[name]
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v >= 0 if allow_zero else v > 0) and (not integer or int(v) == v)
        if not ok:
            kind = "an integer" if integer else "a number"
            raise ValueError(f"{name}: expected {kind} {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    positive("batch", integer=True)
    r["batch"] = int(r["batch"])
    if r["batch_gpu"] is not None:
        positive("batch_gpu", integer=True)
        r["batch_gpu"] = int(r["batch_gpu"])
    positive("lr", allow_zero=True)
    positive("decay")
    positive("P_std", allow_zero=True)
    positive("rampup", allow_zero=True)
    positive("loss_scale")
    positive("duration", integer=True)
    positive("snapshot", integer=True)
    positive("checkpoint", integer=True)
    if not isinstance(r["P_mean"], (int, float)) or not math.isfinite(r["P_mean"]):
        raise ValueError(f"P_mean: expected a finite number, got {r['P_mean']!r}")
    if r["snapshot"] < 1000:
        raise ValueError(f"snapshot: snapshots are named by kimg, so the interval must be >= 1000 images, "
                         f"got {r['snapshot']}")
    if not isinstance(net["model_channels"], int) or net["model_channels"] < 1:
        raise ValueError(f"channels: expected a positive integer, got {net['model_channels']!r}")
    if not 0 <= net["dropout"] < 1:
        raise ValueError(f"dropout: expected a value in [0, 1), got {net['dropout']!r}")
    if r["dtype"] is not None and r["dtype"] not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"dtype: expected fp16, bf16 or fp32, got {r['dtype']!r}")
    if r["snapshot_dtype"] not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"snapshot_dtype: expected fp16, bf16 or fp32, got {r['snapshot_dtype']!r}")
    stds = [float(s) for s in np.atleast_1d(r["ema_stds"])]
    if not stds:
        raise ValueError("ema_stds: give at least one sigma_rel")
    for s in stds:
        if not 0 < s < phema.MAX_STD:
            raise ValueError(f"ema_stds: sigma_rel must be in (0, {phema.MAX_STD:.4f}), got {s}")
    if len({f"{s:.3f}" for s in stds}) != len(stds):
        raise ValueError(f"ema_stds: values must differ in the third decimal (file names), got {stds}")
    r["ema_stds"] = stds
    if not re.match(r"^[A-Za-z0-9_.]+$", str(r["prefix"])):
        raise ValueError(f"prefix: use letters, digits, '_' and '.', got {r['prefix']!r}")
    if r["status"] is not None:
        r["status"] = parse_nimg(r["status"], "status")
    if r["slice"] is not None and r["slice"] <= 0:
        raise ValueError(f"slice: expected a positive image count, got {cfg.slice!r}")
    if not isinstance(r["keep_checkpoints"], int) or r["keep_checkpoints"] < 1:
        raise ValueError(f"keep_checkpoints: expected an integer >= 1, got {r['keep_checkpoints']!r}")
    if int(r["seed"]) != r["seed"] or r["seed"] < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {r['seed']!r}")
    for key in ("channels_last", "malloc_tuning"):
        if not isinstance(r.get(key, False), bool):
            raise ValueError(f"{key}: expected True or False, got {r[key]!r}")
    if r["step_mode"] not in ("auto", "eager", "graph", "compile"):
        raise ValueError(f"step_mode: expected auto, eager, graph or compile, got {r['step_mode']!r}")
    if r["workers"] < 0:
        raise ValueError(f"workers: expected an integer >= 0, got {r['workers']!r}")
    return r


def describe_config(config: TrainConfig | dict) -> dict:
    """The resolved configuration of a run (the preset's defaults filled in) and its dataset, without
    training: what ``edm2fast train --dry-run`` prints."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    r = _resolve(config)
    from . import data as data_module
    ds = data_module.open_dataset(r["data"], use_labels=r["cond"])
    label_dim = int(ds.label_dim) if r["cond"] else 0
    if r["require_labels"] and r["cond"] and label_dim == 0:
        raise ValueError(f"cond: a class-conditional model was asked for (--cond), but {r['data']} has no labels; "
                         "train an unconditional model with --uncond (or --cond=0)")
    r["dataset"] = {"name": getattr(ds, "name", str(r["data"])), "items": len(ds), "resolution": int(ds.resolution),
                    "channels": int(ds.num_channels), "label_dim": label_dim, "kind": ds.kind}
    r["network"] = dict(r["network"], img_resolution=int(ds.resolution), img_channels=int(ds.num_channels),
                        label_dim=label_dim)
    if r["status"] is None:
        r["status"] = min(RELEASE_STATUS_NIMG, max(r["batch"], r["duration"] // 50 // r["batch"] * r["batch"]))
    return r


# ----------------------------------------------------------------------------------------------
# Data.

class _Data:
    """The dataset as the trainer sees it (:mod:`edm2fast.data`): sharded batches on a device.

    Data order follows :class:`edm2fast.data.InfiniteSampler`: one global stream of indices
    (a fresh permutation per epoch, seeded by ``seed``), position ``g`` read by rank
    ``g % world``. The step at ``cur_nimg`` covers positions ``[cur_nimg, cur_nimg + batch)``,
    so the order is a function of (seed, images seen) only, and shards never overlap.
    Batches become network input through ``dataset.encode`` (pixels: ``x/127.5 - 1``;
    latents: a draw from the stored distribution, scaled as in spec §5).
    """

    def __init__(self, spec: str, use_labels: bool, seed: int, rank: int, world: int):
        from . import data as data_module
        self.module = data_module
        self.dataset = data_module.open_dataset(spec, use_labels=use_labels)
        ds = self.dataset
        self.name = getattr(ds, "name", str(spec))
        self.length = len(ds)
        if self.length == 0:
            raise ValueError(f"data: {spec!r} holds no items")
        self.resolution = int(ds.resolution)
        self.channels = int(ds.num_channels)
        self.label_dim = int(ds.label_dim) if use_labels else 0
        self.kind = ds.kind
        self.seed, self.rank, self.world = seed, rank, world
        self.order = data_module.InfiniteSampler(self.length, rank, world, seed)
        self._epochs: dict[tuple[int, torch.device], torch.Tensor] = {}  # (epoch, device) -> order
        self._cache = None
        self._loader = None
        self._loader_next = None

    def item_bytes(self) -> int:
        x, _ = self.dataset[0]
        return int(np.asarray(x).nbytes)

    def preload(self, device) -> None:
        """Keep the whole dataset on ``device`` (small datasets)."""
        self._cache = self._collate([self.dataset[i] for i in range(self.length)], device)

    def start_loader(self, cur_nimg: int, batch_gpu: int, workers: int) -> None:
        """Worker processes read ahead in exactly the order :meth:`fetch` asks for."""
        self._loader = self.module.infinite_loader(self.dataset, batch_gpu, self.rank, self.world, self.seed,
                                                   start_idx=cur_nimg, num_workers=workers)
        self._loader_next = cur_nimg // self.world

    def _collate(self, items, device):
        x = torch.stack([torch.from_numpy(np.array(item[0])) for item in items]).to(device)
        lab = None
        if self.label_dim:
            lab = torch.stack([torch.from_numpy(np.array(item[1], dtype=np.float32)) for item in items]).to(device)
        return x, lab

    def _epoch(self, e: int, device: torch.device) -> torch.Tensor:
        """Epoch ``e``'s permutation of the dataset on ``device``, uploaded once per epoch."""
        key = (e, device)
        if key not in self._epochs:
            for old in [k for k in self._epochs if k[0] not in (e - 1, e)]:  # keep this epoch and the last
                del self._epochs[old]
            order = torch.from_numpy(np.asarray(self.order.epoch_order(e), dtype=np.int64))
            # Pageable memory is staged before the copy returns, so no stream synchronization is needed.
            self._epochs[key] = order.to(device, non_blocking=True)
        return self._epochs[key]

    def indices(self, start: int, count: int, device=None) -> torch.Tensor:
        """Dataset indices this rank reads at its items ``start .. start+count`` of the stream
        beginning at global position 0 (global positions ``rank + world * k``), on ``device``
        (default: CPU). The epochs involved follow from the arithmetic alone and the lookup is
        a gather and a select per epoch, so on a GPU nothing waits for the device."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if count < 1:
            return torch.empty(0, dtype=torch.int64, device=device)
        pos = self.rank + self.world * torch.arange(start, start + count, dtype=torch.int64, device=device)
        offset = pos % self.length
        first_epoch = (self.rank + self.world * start) // self.length
        last_epoch = (self.rank + self.world * (start + count - 1)) // self.length
        out = self._epoch(first_epoch, device)[offset]
        for e in range(first_epoch + 1, last_epoch + 1):
            out = torch.where(pos >= e * self.length, self._epoch(e, device)[offset], out)
        return out

    def fetch(self, first: int, count: int, device, generator=None):
        """This rank's ``count`` items from its ``first``-th item on, encoded on ``device``."""
        if self._loader is not None:
            if first != self._loader_next:
                raise RuntimeError(f"data loader out of step: at {self._loader_next}, asked for {first}")
            x, lab = next(self._loader)
            self._loader_next += count
            x = x.to(device, non_blocking=True)
            lab = lab.to(device, non_blocking=True) if self.label_dim else None
        elif self._cache is not None:
            idx = self.indices(first, count, self._cache[0].device)
            x = self._cache[0][idx]
            lab = self._cache[1][idx] if self._cache[1] is not None else None
        else:
            idx = self.indices(first, count).tolist()
            x, lab = self._collate([self.dataset[i] for i in idx], device)
        return self.dataset.encode(x, generator), lab


# ----------------------------------------------------------------------------------------------
# Checkpoints.

_CHECKPOINT_FORMAT = "edm2fast-training-state-v1"


def _save_checkpoint(path: str, state: dict, meta: dict) -> None:
    """Safetensors (``io.save_state``): tensors plus a JSON skeleton, written atomically."""
    edm_io.save_state(path, state, dict(meta, kind=_CHECKPOINT_FORMAT))


def _load_checkpoint(path: str) -> tuple[dict, dict]:
    """``(state, meta)``; nothing is unpickled. ValueError for damaged or foreign files."""
    state, meta = edm_io.load_state(path)
    if meta.get("kind") != _CHECKPOINT_FORMAT or not isinstance(state, dict):
        raise ValueError(f"{path}: not an edm2fast training checkpoint")
    return state, meta


def _fingerprint(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, bit for bit."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The trainer.

def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss / 2 ** 20 if sys.platform != "darwin" else rss / 2 ** 30


def _cpu_memory_gib() -> float:
    """Resident memory of this process now (Linux ``/proc``), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    except (OSError, ValueError, IndexError):
        return _peak_memory_gib(torch.device("cpu"))


def _format_time(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s // 60 % 60:02d}m"


class Trainer:
    """Holds the run's state; :meth:`run` trains until ``duration`` or the end of the ``slice``.

    ``log`` receives every status line (default: print on rank 0).
    """

    def __init__(self, config: TrainConfig | dict, log=None):
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        self.config = config
        self.cfg = _resolve(config)
        self._log_fn = log
        self._setup_distributed()
        self.is_writer = self.rank == 0
        self.run_dir = os.path.abspath(self.cfg["run_dir"])

        mk.set_backend(self.cfg["backend"])
        cfg = self.cfg
        self._host_memory_note = None
        if self.device.type == "cpu" and cfg["malloc_tuning"]:
            from .hostmem import retain_freed_memory
            self._host_memory_note = retain_freed_memory()[1]  # logged once the run directory exists
        self.data = _Data(cfg["data"], cfg["cond"], int(cfg["seed"]), self.rank, self.world_size)
        if cfg["dtype"] is None:
            cfg["dtype"] = "fp16" if self.device.type == "cuda" else "fp32"
        if cfg["require_labels"] and cfg["cond"] and self.data.label_dim == 0:
            raise ValueError(f"cond: a class-conditional model was asked for (--cond), but {self.data.name} has "
                             "no labels; train an unconditional model with --uncond (or --cond=0)")
        if cfg["status"] is None:  # the release's 128Ki, or about 50 lines for short runs
            cfg["status"] = min(RELEASE_STATUS_NIMG,
                                max(cfg["batch"], cfg["duration"] // 50 // cfg["batch"] * cfg["batch"]))

        world = self.world_size
        if cfg["batch"] % world:
            raise ValueError(f"batch: {cfg['batch']} is not divisible by the number of processes ({world})")
        per_rank = cfg["batch"] // world
        batch_gpu = cfg["batch_gpu"] or per_rank
        if per_rank % batch_gpu:
            raise ValueError(f"batch_gpu: {batch_gpu} must divide the per-process batch {per_rank} "
                             f"(batch {cfg['batch']} over {world} processes)")
        self.batch_gpu = batch_gpu
        self.rounds = per_rank // batch_gpu

        label_dim = self.data.label_dim
        self.network_kwargs = dict(cfg["network"], img_resolution=self.data.resolution,
                                   img_channels=self.data.channels, label_dim=label_dim)
        res = self.data.resolution
        levels = len(self.network_kwargs.get("channel_mult", (1, 2, 3, 4)))
        if res % (1 << (levels - 1)):
            raise ValueError(f"data: resolution {res} is not divisible by 2^{levels - 1} "
                             f"(the network has {levels} levels)")

        torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
        self.net = edm_io.build_net(dtype=cfg["dtype"], channels_last=bool(cfg.get("channels_last", False)),
                                    **self.network_kwargs).to(self.device)
        self.net.train().requires_grad_(True)
        networks.set_forced_weight_norm(self.net, False)  # done once per step instead (spec §1 note)
        self._mpconv_weights = networks.forced_norm_weights(self.net)
        self.loss_fn = EDM2Loss(P_mean=cfg["P_mean"], P_std=cfg["P_std"])
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=1e-8,
                                          fused=fused or None)
        self.ema = phema.PowerFunctionEMA(self.net, stds=cfg["ema_stds"])
        self.cur_nimg = 0
        self.total_elapsed = 0.0  # seconds of training over every invocation (stats.jsonl Timing/total_sec)
        self._ddp = None
        self._forward = self.net
        self.resumed_from = None

    # -- setup ---------------------------------------------------------------------------------

    def _setup_distributed(self):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = world
        device = self.cfg["device"]
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but CUDA is not available on this machine")
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = False  # as the reference (spec §6)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = bool(self.cfg["bench"])
        self.distributed = world > 1
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self._owns_process_group = True
        else:
            self._owns_process_group = False

    def log(self, msg: str) -> None:
        """A console line (rank 0), also appended to ``RUN_DIR/log.txt``."""
        if not self.is_writer:
            return
        if os.path.isdir(self.run_dir):
            with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
                f.write(msg + "\n")
        if self._log_fn is not None:
            self._log_fn(msg)
        else:
            try:
                from tqdm import tqdm
                tqdm.write(msg, file=sys.stdout)
            except ImportError:
                print(msg, flush=True)

    # -- checkpoints and snapshots ---------------------------------------------------------------

    def _identity(self) -> dict:
        return {k: v for k, v in self.cfg.items() if k not in _RESUMABLE_CHANGES}

    def state_dict(self) -> tuple[dict, dict]:
        """``(state, meta)`` of a checkpoint: tensors and nested state, and JSON metadata."""
        state = {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "ema": self.ema.state_dict(), "rng": edm_io.rng_state()}
        meta = {"config": self.cfg, "network_kwargs": self.network_kwargs, "cur_nimg": self.cur_nimg,
                "world_size": self.world_size, "total_elapsed": self.total_elapsed}
        return state, meta

    def load_state_dict(self, state: dict, meta: dict, path: str = "checkpoint") -> None:
        saved = json.loads(json.dumps(meta["config"]))
        now = json.loads(json.dumps(self._identity()))
        saved_identity = {k: v for k, v in saved.items() if k not in _RESUMABLE_CHANGES}
        diffs = [f"{k}: {saved_identity.get(k)!r} in the checkpoint, {now.get(k)!r} now"
                 for k in sorted(set(saved_identity) | set(now)) if saved_identity.get(k) != now.get(k)]
        if diffs:
            raise ConfigMismatchError(
                f"{path} was written with a different configuration ({'; '.join(diffs)}); "
                f"resume with the same settings or train into a new --outdir")
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.cur_nimg = int(meta["cur_nimg"])
        self.total_elapsed = float(meta.get("total_elapsed", 0.0))
        if meta.get("world_size") != self.world_size:
            self.log(f"note: the checkpoint was written by {meta.get('world_size')} processes, now "
                     f"{self.world_size}; training continues correctly but not bit-identically")
        with contextlib.suppress(Exception):
            edm_io.set_rng_state(state["rng"])

    def resume(self) -> bool:
        """Load the newest checkpoint of the run directory that loads; False if there is none."""
        errors = []
        for nimg, path in find_checkpoints(self.run_dir):
            try:
                state, meta = _load_checkpoint(path)
            except Exception as e:  # a damaged file: fall back to the previous checkpoint
                errors.append(f"{os.path.basename(path)}: {type(e).__name__}: {e}")
                self.log(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__}: {e})")
                continue
            self.load_state_dict(state, meta, path)
            self.resumed_from = path
            self.log(f"resumed from {path} at {self.cur_nimg} images")
            return True
        if errors:
            raise ValueError(f"no readable checkpoint in {self.run_dir}: {'; '.join(errors)}")
        return False

    def save_checkpoint(self) -> str | None:
        path = os.path.join(self.run_dir, f"training-state-{self.cur_nimg:012d}.safetensors")
        if self.is_writer:
            _save_checkpoint(path, *self.state_dict())
            for _, old in find_checkpoints(self.run_dir)[self.cfg["keep_checkpoints"]:]:
                with contextlib.suppress(OSError):
                    os.remove(old)
        self._barrier()
        return path

    def snapshot_metadata(self, std: float) -> dict:
        return {
            "preset": self.cfg["preset"], "nimg": self.cur_nimg,
            "sigma_rel": float(std), "dataset": self.data.name, "data_kind": self.data.kind,
            "compute_dtype": self.cfg["dtype"], "batch": self.cfg["batch"], "seed": self.cfg["seed"],
        }

    def save_snapshots(self) -> list[str]:
        kimg = self.cur_nimg // 1000
        if kimg == getattr(self, "_last_snapshot_kimg", None):
            # The final snapshot would take the name of the interval snapshot a few images earlier.
            self.log(f"note: no final snapshot at {self.cur_nimg} images: kimg {kimg} already has one")
            return []
        self._last_snapshot_kimg = kimg
        paths = []
        if self.is_writer:
            for std, ema in zip(self.ema.stds, self.ema.emas):
                path = os.path.join(self.run_dir, snapshot_name(self.cfg["prefix"], self.cur_nimg, std))
                _save_snapshot(ema, path, self.cfg["snapshot_dtype"], self.snapshot_metadata(std))
                paths.append(path)
        self._barrier()
        return paths

    def _barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def check_ranks_in_sync(self) -> str:
        """sha256 of the network; raises if the ranks disagree (they must be identical)."""
        fp = _fingerprint(self.net)
        if self.distributed:
            fps = [None] * self.world_size
            torch.distributed.all_gather_object(fps, fp)
            if len(set(fps)) != 1:
                raise RuntimeError(f"network weights differ between ranks: {fps}")
        return fp

    # -- training ------------------------------------------------------------------------------

    def _prepare(self):
        if self.cfg["workers"] > 0:
            self.data.start_loader(self.cur_nimg, self.batch_gpu, self.cfg["workers"])
        elif self.data.length * self.data.item_bytes() <= (256 << 20):
            self.data.preload(self.device)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self._ddp = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self._forward = self._ddp
        if self.cfg["compile"]:
            self._forward = torch.compile(self._forward)
        self._prepare_step_mode()

    def _prepare_step_mode(self):
        """Pick the step mode (``cfg['step_mode']``, see :mod:`edm2fast.graphs`); one log line when a
        faster mode is not safe here and the step stays eager."""
        from . import graphs
        mode, note = graphs.choose_step_mode(
            self.cfg.get("step_mode", "auto"), device=self.device, distributed=self.distributed, rounds=self.rounds,
            compiled_net=bool(self.cfg["compile"]), dropout=float(self.network_kwargs.get("dropout", 0.0)))
        if note:
            self.log(note)
        self.step_mode = mode
        self._step_runner = (graphs.GraphedStep(self) if mode == "graph" else
                             graphs.CompiledStep(self) if mode == "compile" else None)

    def _round_batch(self, cur_nimg: int, j: int, generator):
        first = cur_nimg // self.world_size + j * self.batch_gpu  # this rank's items seen so far
        return self.data.fetch(first, self.batch_gpu, self.device, generator)

    def accumulate_gradients(self) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The gradients of one step at ``cur_nimg`` (all-reduced under DDP), in ``.grad``.

        Returns (sum of this rank's per-element losses, element count, sum of their squares).
        Each rank backpropagates ``loss.sum() * loss_scale / (batch / world_size)``, its own
        images per step, before DDP's all-reduce *average*: the release's semantics, so the
        gradients equal one process's on the same global batch.
        """
        cfg = self.cfg
        per_rank = cfg["batch"] // self.world_size
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros([], dtype=torch.float64, device=self.device)
        loss_sq = torch.zeros([], dtype=torch.float64, device=self.device)
        count = 0
        for j in range(self.rounds):
            seed = _step_seed(cfg["seed"], self.rank, self.cur_nimg, j)
            torch.manual_seed(seed)  # dropout draws from the global generator
            gen = torch.Generator(self.device).manual_seed(seed)
            images, labels = self._round_batch(self.cur_nimg, j, gen)
            sync = self._ddp is None or j == self.rounds - 1
            with contextlib.nullcontext() if sync else self._ddp.no_sync():
                loss = self.loss_fn(self._forward, images, labels, generator=gen)
                (loss.sum() * (cfg["loss_scale"] / per_rank)).backward()
            loss_sum += loss.detach().sum().double()
            loss_sq += loss.detach().double().square().sum()
            count += loss.numel()
        return loss_sum, count, loss_sq

    def step(self) -> tuple[torch.Tensor, int]:
        """One optimizer step; returns (sum of per-element losses of this rank, element count)."""
        cfg = self.cfg
        lr = schedule.learning_rate(self.cur_nimg, cfg["batch"], ref_lr=cfg["lr"], ref_batches=cfg["decay"],
                                    rampup_Mimg=cfg["rampup"])
        if self.device.type == "cuda":
            # The float32 a captured step's learning-rate tensor holds, eager too: the two agree bit for bit.
            lr = float(np.float32(lr))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.lr = lr
        runner = getattr(self, "_step_runner", None)
        if runner is not None:  # a captured or compiled step (edm2fast.graphs); same draws as below
            out = runner.step(lr, _step_seed(cfg["seed"], self.rank, self.cur_nimg, 0))
            if out is not None:
                loss_sum, count, self._last_loss_sq = out
                return loss_sum, count
            runner.release()
            self._step_runner, self.step_mode = None, "eager"
        return self._eager_step()

    def _eager_step(self) -> tuple[torch.Tensor, int]:
        """The step of :meth:`step` op by op, the learning rate already set."""
        cfg = self.cfg
        # Forced weight normalization (paper Eq. 66): the U-Net applies it inside its first forward's
        # mp_weights call (one pass over the weights); the few MPConv weights outside it here.
        if self._forward is self.net or self._forward is getattr(self, "_ddp", None):
            rest = networks.fold_forced_norm(self.net)
            if rest:
                mk.force_normalize_(rest)
        else:  # a compiled forward: the explicit call, as the graph expects
            mk.force_normalize_(self._mpconv_weights)
        loss_sum, count, self._last_loss_sq = self.accumulate_gradients()
        mk.force_finite_([p.grad for p in self.net.parameters() if p.grad is not None])  # one call for all
        self.optimizer.step()
        self.cur_nimg += cfg["batch"]
        self.ema.update(self.cur_nimg, cfg["batch"])
        return loss_sum, count

    def _reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def run(self) -> dict:
        """Resume if possible, then train to ``duration`` or to the end of the slice."""
        cfg = self.cfg
        if self.is_writer:
            os.makedirs(self.run_dir, exist_ok=True)
            for stale in edm_io.remove_stale_temp_files(self.run_dir):
                self.log(f"removed {stale}, left by an interrupted write")
        self._barrier()
        self.resume()
        if self.is_writer and self.resumed_from is None:
            _write_json(os.path.join(self.run_dir, "training_options.json"),
                        dict(cfg, network_kwargs=self.network_kwargs, world_size=self.world_size))
        self._prepare()
        duration = cfg["duration"]
        stop = duration if cfg["slice"] is None else min(duration, self.cur_nimg + cfg["slice"])
        batch = cfg["batch"]
        self.log(f"training {self.data.name} ({self.data.length} items, {self.data.resolution}px, "
                 f"{self.data.channels} ch, label_dim {self.network_kwargs['label_dim']}) with preset "
                 f"{cfg['preset']}: {sum(p.numel() for p in self.net.parameters()):,} parameters, batch {batch} "
                 f"({self.rounds} x {self.batch_gpu} x {self.world_size} processes), {cfg['dtype']}, "
                 f"backend {mk.get_backend()}, device {self.device}; from {self.cur_nimg} to {stop} "
                 f"of {duration} images")
        if self._host_memory_note:
            self.log(self._host_memory_note)
        start_nimg = self.cur_nimg
        bar = None
        if cfg["progress"] and self.is_writer:
            try:
                from tqdm import tqdm
                bar = tqdm(total=stop, initial=self.cur_nimg, unit="img", unit_scale=True, dynamic_ncols=True,
                           leave=False, file=sys.stderr, mininterval=1.0)
            except ImportError:
                bar = None
        stats_path = os.path.join(self.run_dir, "stats.jsonl")
        # The window's loss sums stay on the device (float64, added in the order the floats were):
        # reading them every step would wait for the device each step; they are read per status line.
        window_loss = torch.zeros([], dtype=torch.float64, device=self.device)
        window_sq = torch.zeros([], dtype=torch.float64, device=self.device)
        window_count, window_t0, window_n0 = 0, time.time(), self.cur_nimg
        maintenance, tick = 0.0, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        last_loss = float("nan")
        try:
            while self.cur_nimg < stop:
                prev = self.cur_nimg
                loss_sum, count = self.step()
                window_loss.add_(loss_sum)
                window_sq.add_(self._last_loss_sq)
                window_count += count
                if bar is not None:
                    bar.update(self.cur_nimg - prev)
                done = self.cur_nimg >= duration
                crossed = lambda interval: self.cur_nimg // interval > prev // interval  # noqa: E731
                if crossed(cfg["status"]) or self.cur_nimg >= stop:
                    tot_loss, tot_count, tot_sq = self._reduce([float(window_loss), float(window_count),
                                                                float(window_sq)])
                    last_loss = tot_loss / max(tot_count, 1)
                    loss_std = math.sqrt(max(tot_sq / max(tot_count, 1) - last_loss ** 2, 0.0))
                    now = time.time()
                    elapsed = now - window_t0
                    self.total_elapsed += elapsed
                    tick += 1
                    sec_per_kimg = elapsed / max(self.cur_nimg - window_n0, 1) * 1000
                    mem = self._reduce([_peak_memory_gib(self.device)])[0] / self.world_size
                    reserved = (torch.cuda.max_memory_reserved(self.device) / 2 ** 30
                                if self.device.type == "cuda" else 0.0)
                    rec = {"nimg": self.cur_nimg, "kimg": self.cur_nimg / 1000, "loss": last_loss, "lr": self.lr,
                           "sec_per_kimg": sec_per_kimg, "peak_mem_gib": mem, "time": now,
                           # The release's stats.jsonl fields (training_stats names), for its plotting scripts.
                           "Progress/tick": tick, "Progress/kimg": self.cur_nimg / 1000, "Progress/augment": 0,
                           "Progress/lr": self.lr, "Loss/loss": last_loss, "Loss/loss_std": loss_std,
                           "Timing/total_sec": self.total_elapsed, "Timing/sec_per_tick": elapsed,
                           "Timing/sec_per_kimg": sec_per_kimg,
                           "Timing/images_per_sec": (self.cur_nimg - window_n0) / max(elapsed, 1e-9),
                           "Timing/maintenance_sec": maintenance, "Resources/cpu_mem_gb": _cpu_memory_gib(),
                           "Resources/peak_gpu_mem_gb": mem if self.device.type == "cuda" else 0.0,
                           "Resources/peak_gpu_mem_reserved_gb": reserved, "timestamp": now}
                    self.log(f"kimg {self.cur_nimg / 1000:10.3f}  sec/kimg {sec_per_kimg:7.2f}  loss {last_loss:.4f}  "
                             f"lr {self.lr:.3g}  peak mem {mem:.2f} GiB  time {_format_time(self.total_elapsed)}")
                    if self.is_writer:
                        with open(stats_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                    window_loss.zero_()
                    window_sq.zero_()
                    window_count, window_t0, window_n0 = 0, time.time(), self.cur_nimg
                    maintenance = 0.0
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
                t_maint = time.time()
                if crossed(cfg["snapshot"]) or done:
                    self.save_snapshots()
                if crossed(cfg["checkpoint"]) or self.cur_nimg >= stop:
                    fp = self.check_ranks_in_sync()
                    path = self.save_checkpoint()
                    self.log(f"checkpoint {os.path.basename(path)} (weights sha256 {fp[:16]}, identical on "
                             f"{self.world_size} process{'es' if self.world_size > 1 else ''})")
                maintenance += time.time() - t_maint
        finally:
            if bar is not None:
                bar.close()
        fp = self.check_ranks_in_sync()
        finished = self.cur_nimg >= duration
        self.log(("training finished" if finished else "slice finished") +
                 f" at {self.cur_nimg} images ({self.cur_nimg - start_nimg} this run); weights sha256 {fp}")
        return {"cur_nimg": self.cur_nimg, "finished": finished, "loss": last_loss, "fingerprint": fp,
                "run_dir": self.run_dir}

    def close(self):
        if self._owns_process_group and torch.distributed.is_initialized():
            # Drop the DDP reducer (it holds the process group and its threads) and let every rank
            # arrive before tearing the group down: destroying it under a live reducer, or while the
            # peer still talks, aborts the process ("terminate called without an active exception").
            self._forward = self.net
            self._ddp = None
            import gc
            gc.collect()
            try:
                torch.distributed.barrier()
            finally:
                torch.distributed.destroy_process_group()
            self._owns_process_group = False


def _save_snapshot(net: torch.nn.Module, path: str, dtype: str, metadata: dict) -> None:
    edm_io.save(net, path, dtype=dtype, **metadata)


def train(config: TrainConfig | dict, log=None) -> dict:
    """Train (resuming from the newest checkpoint of ``config.run_dir``); returns a summary dict."""
    trainer = Trainer(config, log=log)
    try:
        return trainer.run()
    finally:
        trainer.close()
