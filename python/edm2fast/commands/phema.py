"""``edm2fast phema``: reconstruct EMA networks of any length post hoc from training snapshots (spec §7).

Examples::

    edm2fast phema --indir runs/digits --std 0.02,0.05,0.1,0.15 --plot
    edm2fast phema --indir runs/img512 --std 0.1 --nimg 64Mi --outdir runs/img512/phema-64Mi

Uses the snapshots taken at or before the wanted time (default: the latest snapshot). Each
input is read once per batch of ``--batch`` outputs, so memory stays at a few networks.
Outputs are snapshots named like the inputs, in ``--outdir`` (default: INDIR/posthoc).
"""

from __future__ import annotations

import argparse
import os

from ..cli import UserError
from .train import nimg_arg, positive_int, std_list

DESCRIPTION = __doc__.replace("``", "").replace("::", ":")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.add_argument("--indir", required=True, metavar="DIR", help="folder with the training run's EMA snapshots")
    parser.add_argument("--std", required=True, type=std_list, metavar="S1,S2,...",
                        help="sigma_rel values to reconstruct, each in (0, 0.2887), e.g. 0.05,0.1")
    parser.add_argument("--outdir", default=None, metavar="DIR", help="output folder (default: INDIR/posthoc)")
    parser.add_argument("--nimg", type=nimg_arg, default=None, metavar="NIMG",
                        help="training time of the reconstruction, in images (default: the latest snapshot)")
    parser.add_argument("--prefix", default=None, help="input snapshot prefix, when INDIR holds several runs")
    parser.add_argument("--out-prefix", default=None, help="output file prefix (default: the inputs')")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                        help="storage precision of the outputs (default: fp16)")
    parser.add_argument("--batch", type=positive_int, default=8, metavar="N",
                        help="outputs reconstructed per pass over the inputs (memory: N+1 networks; default: 8)")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PATH",
                        help="also draw the input and reconstructed EMA profiles (default path: "
                             "OUTDIR/phema-profiles.png)")


def run(args) -> int:
    from .. import posthoc
    outdir = args.outdir or os.path.join(args.indir, "posthoc")
    try:
        snaps = posthoc.list_snapshots(args.indir, args.prefix)
        inputs, coefs, nimg = posthoc.solve(snaps, args.std, args.nimg)
        print(f"reconstructing sigma_rel {', '.join(f'{s:.3f}' for s in args.std)} at {nimg} images from "
              f"{len(inputs)} snapshots in {args.indir}")
        paths = posthoc.reconstruct_to_files(snaps, outdir, args.std, args.nimg, out_prefix=args.out_prefix,
                                             dtype=args.dtype, max_outputs=args.batch)
        for p in paths:
            print(f"wrote {p}")
        if args.plot is not None:
            plot_path = args.plot or os.path.join(outdir, "phema-profiles.png")
            posthoc.plot_profiles(snaps, args.std, plot_path, args.nimg)
            print(f"wrote {plot_path}")
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    return 0
