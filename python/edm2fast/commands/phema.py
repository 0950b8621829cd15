"""``edm2fast phema``: reconstruct EMA networks of any length post hoc from training snapshots (spec §7).

Examples::

    edm2fast phema --indir runs/digits --std 0.02,0.05,0.1,0.15 --plot
    edm2fast phema --indir runs/img512 --std 0.1 --nimg 64Mi --outdir runs/img512/phema-64Mi
    edm2fast phema --indir raw-snapshots/edm2-img512-xs --outdir out --outstd 0.010,0.015,...,0.250 \\
        --outkimg 2147483                                         # the release's spelling works too

Uses the snapshots taken at or before the wanted time (default: the latest snapshot). Each
input is read once per batch of ``--batch`` outputs, so memory stays at a few networks.
Inputs are our snapshots or the release's pickles (``network-snapshot-<kimg>-<std>.pkl``,
``<preset>-<kimg>-<std>.pkl``; read without running code); ``--indir`` may be an ``https://``
folder listing (the files are downloaded once into the cache). Outputs are snapshots named
like the inputs, in ``--outdir`` (default: INDIR/posthoc).
"""

from __future__ import annotations

import argparse
import hashlib
import os

from ..cli import UserError
from .train import nimg_arg, positive_int

DESCRIPTION = __doc__.replace("``", "").replace("::", ":")


def parse_float_list(value: str) -> list[float]:
    """``'0.05,0.1'``; ``...`` continues the step of the two values before it up to the one after:
    ``'0.010,0.015,...,0.030'`` -> ``[0.010, 0.015, 0.020, 0.025, 0.030]`` (as the release)."""
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    out: list[float] = []
    k = 0
    while k < len(parts):
        if parts[k] == "...":
            if len(out) < 2 or k + 1 >= len(parts) or parts[k + 1] == "...":
                raise ValueError(f"'...' needs two values before it and one after, as in 0.010,0.015,...,0.250; "
                                 f"got {value!r}")
            a, b = out[-2], out[-1]
            end = _number(parts[k + 1], value)
            step = b - a
            if step == 0 or (end - b) * step < 0:
                raise ValueError(f"'...' from {a:g},{b:g} never reaches {end:g} in {value!r}")
            n = round((end - b) / step)
            if abs(b + n * step - end) > 1e-6 * max(1.0, abs(end)):
                raise ValueError(f"'...': {end:g} is not {b:g} plus a whole number of steps {step:g} in {value!r}")
            decimals = max(_decimals(parts[k - 1]), _decimals(parts[k - 2]), _decimals(parts[k + 1]))
            out += [round(b + i * step, decimals + 6) for i in range(1, n)]
            out.append(end)
            k += 2
            continue
        out.append(_number(parts[k], value))
        k += 1
    if not out:
        raise ValueError(f"expected comma-separated sigma_rel values, got {value!r}")
    return out


def _number(part: str, value: str) -> float:
    try:
        return float(part)
    except ValueError:
        raise ValueError(f"expected a number (or '...'), got {part!r} in {value!r}") from None


def _decimals(part: str) -> int:
    return len(part.split(".", 1)[1]) if "." in part else 0


def std_list_arg(value: str) -> list[float]:
    """sigma_rel values with ``...`` ranges, each in (0, 0.2887)."""
    from ..phema import MAX_STD
    try:
        out = parse_float_list(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    for v in out:
        if not 0 < v < MAX_STD:
            raise argparse.ArgumentTypeError(f"sigma_rel {v:g} is outside (0, {MAX_STD:.4f})")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.add_argument("--indir", required=True, metavar="DIR|URL",
                        help="folder (or http(s) folder listing) with the training run's EMA snapshots")
    parser.add_argument("--std", "--outstd", dest="std", required=True, type=std_list_arg, metavar="S1,S2,...",
                        help="sigma_rel values to reconstruct, each in (0, 0.2887): 0.05,0.1 or 0.010,0.015,...,0.250")
    parser.add_argument("--outdir", default=None, metavar="DIR", help="output folder (default: INDIR/posthoc)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--nimg", type=nimg_arg, default=None, metavar="NIMG",
                   help="training time of the reconstruction, in images (default: the latest snapshot)")
    g.add_argument("--outkimg", type=positive_int, default=None, metavar="KIMG",
                   help="the same in thousands of images, as the release (its snapshot names)")
    parser.add_argument("--prefix", "--inprefix", dest="prefix", default=None,
                        help="input snapshot prefix, when INDIR holds several runs")
    parser.add_argument("--instd", type=std_list_arg, default=None, metavar="S1,S2",
                        help="use only inputs of these sigma_rel (default: all)")
    parser.add_argument("--out-prefix", "--outprefix", dest="out_prefix", default=None,
                        help="output file prefix (default: the inputs')")
    parser.add_argument("--skip", action="store_true", help="skip outputs whose file already exists")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                        help="storage precision of the outputs (default: fp16)")
    parser.add_argument("--batch", type=positive_int, default=8, metavar="N",
                        help="outputs reconstructed per pass over the inputs (memory: N+1 networks; default: 8)")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PATH",
                        help="also draw the input and reconstructed EMA profiles (default path: "
                             "OUTDIR/phema-profiles.png)")


def fetch_url_folder(url: str, prefix: str | None = None, in_stds=None) -> str:
    """Download the snapshots an http(s) folder listing links to (filtered by ``prefix`` and
    ``in_stds`` before downloading) into the cache; returns a local folder of links to them."""
    from .. import download, posthoc
    names = []
    for name in download.list_url_folder(url):
        info = posthoc.snapshot_name_info(name)
        if info is None or (prefix is not None and info["prefix"] != prefix):
            continue
        if in_stds is not None and not any(abs(info["sigma_rel"] - s) < 5e-4 for s in in_stds):
            continue
        names.append(name)
    if not names:
        raise ValueError(f"{url}: the folder listing links to no EMA snapshots")
    folder = os.path.join(download.cache_dir(), "folders", hashlib.sha256(url.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    for name in names:
        path = download.fetch(download.url_join(url, name), what="--indir")
        link = os.path.join(folder, name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(path), link)
    return folder


def run(args) -> int:
    from .. import download, posthoc
    if download.is_url(args.indir) and args.outdir is None:
        raise UserError("--outdir: required when --indir is a URL")
    outdir = args.outdir or os.path.join(args.indir, "posthoc")
    try:
        indir = fetch_url_folder(args.indir, args.prefix, args.instd) if download.is_url(args.indir) else args.indir
        snaps = posthoc.list_snapshots(indir, args.prefix, in_stds=args.instd)
        nimg = args.nimg
        if args.outkimg is not None:  # a snapshot of that kimg gives its exact time, else kimg * 1000
            exact = [s.nimg for s in snaps if s.nimg // 1000 == args.outkimg]
            nimg = max(exact) if exact else args.outkimg * 1000
        inputs, coefs, nimg = posthoc.solve(snaps, args.std, nimg)
        print(f"reconstructing sigma_rel {', '.join(f'{s:.3f}' for s in args.std)} at {nimg} images from "
              f"{len(inputs)} snapshots in {args.indir}")
        paths = posthoc.reconstruct_to_files(snaps, outdir, args.std, nimg, out_prefix=args.out_prefix,
                                             dtype=args.dtype, max_outputs=args.batch, skip_existing=args.skip)
        for p in paths:
            print(f"wrote {p}")
        if args.skip and len(paths) < len(args.std):
            print(f"skipped {len(args.std) - len(paths)} existing outputs (--skip)")
        if args.plot is not None:
            plot_path = args.plot or os.path.join(outdir, "phema-profiles.png")
            posthoc.plot_profiles(snaps, args.std, plot_path, nimg)
            print(f"wrote {plot_path}")
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    return 0


