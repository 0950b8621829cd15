"""``edm2fast train``: train an EDM2 model on one GPU, many GPUs (torchrun) or the CPU.

Examples::

    edm2fast train --outdir runs/digits --data digits16 --preset digits          # README demo
    edm2fast train --outdir runs/img64 --data imagenet64.zip --preset edm2-img64-s --batch-gpu 64
    torchrun --nproc_per_node 8 -m edm2fast train --outdir runs/img512 --data latents.npz \\
        --preset edm2-img512-xs

Re-running the same command resumes from the newest checkpoint in ``--outdir``;
``--slice 2Mi`` stops after 2 Mi more images (for time-limited jobs). As in the release,
``--data`` is required and ``--preset`` defaults to edm2-img512-s (pass ``--preset digits``
for the small demo); ``-n``/``--dry-run`` prints the resolved configuration and exits.
The release's flags ``--cond=0``, ``--fp16=0``, ``--ls``, ``--bench`` and ``--batch-gpu 0`` work as
they do there.
"""

from __future__ import annotations

import argparse

from ..cli import UserError

DESCRIPTION = __doc__.replace("``", "").replace("::", ":")


def nimg_arg(value: str) -> int:
    from ..train import parse_nimg
    try:
        return parse_nimg(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {value!r}")
    return v


def nonneg_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return v


def _float(value: str, lo=None, hi=None, lo_open=False) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise argparse.ArgumentTypeError(f"expected a number {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and v >= hi:
        raise argparse.ArgumentTypeError(f"expected a number < {hi}, got {value!r}")
    return v


def finite_float(value: str) -> float:
    return _float(value)


def nonneg_float(value: str) -> float:
    return _float(value, lo=0)


def positive_float(value: str) -> float:
    return _float(value, lo=0, lo_open=True)


def unit_float(value: str) -> float:
    return _float(value, lo=0, hi=1)


def bool_arg(value: str) -> bool:
    """The release's BOOL options: 1/0, true/false, yes/no, on/off."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false, yes/no), got {value!r}")


def add_malloc_tuning_argument(parser, when: str) -> None:
    """``--malloc-tuning BOOL`` (train, generate, sweep, eval): :mod:`edm2fast.hostmem` on CPU devices."""
    parser.add_argument("--malloc-tuning", type=bool_arg, nargs="?", const=True, default=True, metavar="BOOL",
                        help="on a CPU device, keep freed tensor memory in the process (glibc mallopt) instead of "
                             f"returning it to the system {when}: fewer page faults, more resident memory "
                             "(default: 1; edm2fast.hostmem)")


def batch_gpu_arg(value: str):
    """``--batch-gpu``: images per process per round; 0 (the release's default) = no limit."""
    v = nimg_arg(value)
    return None if v == 0 else v


def std_list(value: str) -> list[float]:
    """Comma-separated sigma_rel values, each in (0, 0.2887)."""
    from ..phema import MAX_STD
    out = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        v = _float(part)
        if not 0 < v < MAX_STD:
            raise argparse.ArgumentTypeError(f"sigma_rel {part} is outside (0, {MAX_STD:.4f})")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated sigma_rel values, got {value!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train import SMALL_PRESETS, preset_names
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    g = parser.add_argument_group("run")
    g.add_argument("--outdir", required=True, metavar="DIR",
                   help="run folder: checkpoints, EMA snapshots, stats.jsonl (resumed if it holds a checkpoint)")
    g.add_argument("--data", required=True, metavar="PATH|NAME",
                   help="image folder, zip, .npy/.npz (images or latents), or built-in 'digits16'/'digits32'")
    g.add_argument("--cond", nargs="?", const=True, default=None, type=bool_arg, metavar="BOOL",
                   help="class-conditional model: an error if the dataset has no labels; --cond=0 is --uncond "
                        "(default: conditional when the dataset has labels)")
    g.add_argument("--uncond", action="store_true", help="ignore the dataset's labels (an unconditional model, "
                   "e.g. the guiding network of classifier-free guidance)")
    g.add_argument("-n", "--dry-run", action="store_true", help="print the resolved configuration and exit")
    g.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--slice", type=nimg_arg, default=None, metavar="NIMG",
                   help="stop after this many more images (checkpoint written); run again to continue")
    g.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    g.add_argument("--workers", type=nonneg_int, default=0, help="data-loading worker processes (default: 0)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")

    g = parser.add_argument_group("model and hyperparameters (default: the preset's)")
    g.add_argument("--preset", default="edm2-img512-s", choices=preset_names(), metavar="NAME",
                   help=f"{', '.join(sorted(SMALL_PRESETS))} (small, quick) or a paper preset edm2-img512-xs ... "
                        "edm2-img64-xl (default: %(default)s, as the release)")
    g.add_argument("--channels", type=positive_int, default=None, help="model channels (model_channels)")
    g.add_argument("--dropout", type=unit_float, default=None, help="dropout probability")
    g.add_argument("--lr", type=nonneg_float, default=None, help="reference learning rate alpha_ref")
    g.add_argument("--decay", type=positive_float, default=None, metavar="ITERS",
                   help="t_ref: iterations before the 1/sqrt(t) learning-rate decay starts")
    g.add_argument("--rampup", type=nonneg_float, default=None, metavar="MIMG",
                   help="learning-rate warm-up, millions of images")
    g.add_argument("--P_mean", type=finite_float, default=None, help="mean of log sigma during training")
    g.add_argument("--P_std", type=nonneg_float, default=None, help="std of log sigma during training")
    g.add_argument("--duration", type=nimg_arg, default=None, metavar="NIMG",
                   help="training length in images: 4096, 128Ki, 8Mi, 100k ...")
    g.add_argument("--batch", type=positive_int, default=None, help="images per optimizer step, all processes")
    g.add_argument("--batch-gpu", type=batch_gpu_arg, default=None, metavar="N",
                   help="images per process per round; smaller values accumulate gradients over rounds "
                        "(default or 0: the whole per-process batch)")
    g.add_argument("--ema-stds", type=std_list, default=[0.050, 0.100], metavar="S1,S2",
                   help="sigma_rel of the tracked power-function EMAs (default: 0.050,0.100)")
    g.add_argument("--loss-scale", "--ls", dest="loss_scale", type=positive_float, default=1.0,
                   help="fixed loss scale (default: 1)")

    g = parser.add_argument_group("speed and precision")
    g.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="compute precision of the U-Net (default: fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--fp16", type=bool_arg, default=None, metavar="BOOL",
                   help="the release's switch: --fp16=1 is --dtype fp16, --fp16=0 is --dtype fp32")
    g.add_argument("--bench", type=bool_arg, nargs="?", const=True, default=True, metavar="BOOL",
                   help="cuDNN autotuning, torch.backends.cudnn.benchmark (default: 1, as the release)")
    g.add_argument("--backend", default="auto", help="mpkernels backend: auto, reference, triton, cuda")
    add_malloc_tuning_argument(g, "every step")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g.add_argument("--channels-last", type=bool_arg, nargs="?", const=True, default=False, metavar="BOOL",
                   help="run the U-Net in the channels_last memory format (faster convolutions on CPUs and tensor "
                        "cores; same weights and snapshots; default: 0)")
    g.add_argument("--step-mode", choices=["auto", "eager", "graph", "compile"], default="auto",
                   help="how a training step runs: graph = the whole step (forward, backward, Adam, forced weight "
                        "normalization, EMA) captured once as a CUDA graph and replayed, bit-identical to eager; "
                        "compile = the whole step in one torch.compile(fullgraph=True) region (float32 rounding "
                        "differs); auto (default) = graph on CUDA when safe (one process, no --batch-gpu "
                        "accumulation, no --compile), else eager, saying why in the log")

    g = parser.add_argument_group("outputs")
    g.add_argument("--snapshot", type=nimg_arg, default=None, metavar="NIMG",
                   help="images between EMA snapshots (>= 1000; default: the preset's)")
    g.add_argument("--snapshot-dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="storage precision of snapshots (default: fp16)")
    g.add_argument("--prefix", default="phema", help="snapshot file prefix (default: %(default)s)")
    g.add_argument("--checkpoint", type=nimg_arg, default=None, metavar="NIMG",
                   help="images between checkpoints (one is always written at the end)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=2, metavar="N",
                   help="checkpoints kept on disk (default: 2)")
    g.add_argument("--status", type=nimg_arg, default=None, metavar="NIMG",
                   help="images between status lines, also written to stats.jsonl and log.txt "
                        "(default: 128Ki as the release, or about 50 per run for shorter runs)")


def config_from_args(args):
    from ..train import TrainConfig
    if args.cond is not None and args.uncond and args.cond:
        raise UserError("--cond and --uncond: pick one")
    cond = not args.uncond and args.cond is not False
    dtype = args.dtype
    if args.fp16 is not None:
        if dtype is not None and dtype != ("fp16" if args.fp16 else "fp32"):
            raise UserError(f"--fp16={int(args.fp16)} contradicts --dtype {dtype}")
        dtype = "fp16" if args.fp16 else "fp32"
    return TrainConfig(
        run_dir=args.outdir, data=args.data, preset=args.preset, cond=cond, require_labels=args.cond is True,
        bench=args.bench, channels=args.channels,
        dropout=args.dropout, lr=args.lr, decay=args.decay, P_mean=args.P_mean, P_std=args.P_std,
        duration=args.duration, batch=args.batch, batch_gpu=args.batch_gpu, rampup=args.rampup, dtype=dtype,
        loss_scale=args.loss_scale, backend=args.backend, compile=args.compile, step_mode=args.step_mode,
        channels_last=bool(args.channels_last), malloc_tuning=bool(args.malloc_tuning),
        seed=args.seed,
        ema_stds=tuple(args.ema_stds), snapshot=args.snapshot, snapshot_dtype=args.snapshot_dtype,
        prefix=args.prefix, checkpoint=args.checkpoint, keep_checkpoints=args.keep_checkpoints,
        status=args.status, slice=args.slice, device=args.device, workers=args.workers, progress=args.progress)


def run(args) -> int:
    from .. import train
    try:
        config = config_from_args(args)
        if args.dry_run:
            import json
            print(json.dumps(train.describe_config(config), indent=2, sort_keys=True))
            print("dry run; exiting")
            return 0
        train.train(config)
    except (train.ConfigMismatchError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    except ImportError as e:
        raise UserError(f"missing dependency: {e}") from None
    return 0
