"""``edm2fast toy train|plot``: the release's 2D guidance demo in miniature (CPU, about a minute).

Examples::

    edm2fast toy train --outdir runs/toy                # three small MLP denoisers
    edm2fast toy plot --outdir runs/toy --guidance 3    # runs/toy/toy-guidance.png

The plot compares sample clouds of one class without guidance, with classifier-free guidance
(guide: an unconditional model) and with autoguidance (guide: a smaller, shorter-trained
conditional model). See :mod:`edm2fast.toy`.
"""

from __future__ import annotations

import argparse

from .train import nonneg_int, positive_float, positive_int

DESCRIPTION = __doc__.replace("``", "").replace("::", ":").replace(":mod:", "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.add_argument("action", choices=["train", "plot"], help="train the networks, or plot their samples")
    parser.add_argument("--outdir", required=True, metavar="DIR", help="where the networks and the plot go")
    parser.add_argument("--iters", type=positive_int, default=3000, help="training iterations (default: 3000)")
    parser.add_argument("--batch", type=positive_int, default=1024, help="training batch (default: 1024)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--guidance", type=positive_float, default=3.0, help="guidance weight (default: 3)")
    parser.add_argument("--num", type=positive_int, default=2000, help="samples per panel (default: 2000)")
    parser.add_argument("--class", dest="cls", type=int, choices=[0, 1], default=0, help="class to draw (0 or 1)")
    parser.add_argument("--out", default=None, metavar="PNG", help="plot path (default: OUTDIR/toy-guidance.png)")


def run(args) -> int:
    from .. import toy
    if args.action == "train":
        path = toy.train(args.outdir, iters=args.iters, batch=args.batch, seed=args.seed)
        print(f"wrote {path}")
    else:
        path = toy.plot(args.outdir, args.out, guidance=args.guidance, n=args.num, cls=args.cls, seed=args.seed + 1)
        print(f"wrote {path}")
    return 0
