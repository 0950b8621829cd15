"""``edm2fast`` command line: ``edm2fast <command> --help``.

Each command lives in ``edm2fast.commands.<name>`` and exposes ``add_arguments(parser)``
and ``run(args) -> int``. Errors a user can fix (bad argument, bad file) are printed as
one line on stderr with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "train an EDM2 model (one GPU, many GPUs with torchrun, or CPU)",
    "generate": "sample images with the EDM2 Heun sampler (guidance, autoguidance)",
    "phema": "reconstruct EMA networks of any length post hoc from snapshots",
    "convert": "convert the authors' released pickles to safetensors, executing no code",
    "dataset": "make datasets: convert images (crop, resize), encode to / decode from VAE latents",
    "eval": "evaluate samples of a digits model: class accuracy and Frechet distance",
    "sweep": "post-hoc EMA sweep: reconstruct, sample, evaluate and plot vs sigma_rel",
    "metrics": "FID and FD_DINOv2 as in the paper: reference statistics, image folders, generate-and-evaluate",
    "toy": "the 2D guidance demo: no guidance vs classifier-free guidance vs autoguidance (CPU, a minute)",
}


class UserError(Exception):
    """A problem the user can fix; reported as one line, exit status 2."""


def resolve_device(name):
    """``--device`` of the commands: None picks CUDA when present, else the CPU; an unusable name is a UserError."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edm2fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, help_text in COMMANDS.items():
        mod = importlib.import_module(f"edm2fast.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"edm2fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
