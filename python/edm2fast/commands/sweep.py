"""``edm2fast sweep``: the paper's EMA-length experiment in miniature.

Reconstructs several sigma_rel values post hoc from a digits run's snapshots, samples each
reconstruction with the same seeds, measures class accuracy and Frechet distance
(``edm2fast eval``) and plots both against sigma_rel.

Example::

    edm2fast sweep --indir runs/digits --std 0.01,0.02,0.04,0.07,0.1,0.15,0.2 --num 500

Writes ``sweep.json``, ``sweep.png`` and one sample grid per sigma_rel to ``--outdir``
(default: INDIR/sweep).
"""

from __future__ import annotations

import argparse
import json
import os

from ..cli import UserError
from .generate import _device, apply_malloc_tuning, class_labels_for, generate_images, \
    make_grid, parse_seeds, save_png, set_backend, to_uint8
from .train import add_malloc_tuning_argument, nimg_arg, positive_int, std_list

DESCRIPTION = __doc__.replace("``", "").replace("::", ":")
DEFAULT_STDS = "0.010,0.020,0.030,0.050,0.070,0.100,0.150,0.200"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.add_argument("--indir", required=True, metavar="DIR", help="the training run's snapshot folder")
    parser.add_argument("--std", type=std_list, default=std_list(DEFAULT_STDS), metavar="S1,S2,...",
                        help=f"sigma_rel values (default: {DEFAULT_STDS})")
    parser.add_argument("--nimg", type=nimg_arg, default=None, metavar="NIMG",
                        help="training time to reconstruct at (default: the latest snapshot)")
    parser.add_argument("--prefix", default=None, help="snapshot prefix, when INDIR holds several runs")
    parser.add_argument("--outdir", default=None, metavar="DIR", help="output folder (default: INDIR/sweep)")
    parser.add_argument("--num", type=positive_int, default=500, help="samples per sigma_rel (default: 500)")
    parser.add_argument("--steps", type=positive_int, default=32, help="sampler steps (default: 32)")
    parser.add_argument("--batch", type=positive_int, default=250, help="images per sampler batch (default: 250)")
    parser.add_argument("--save-nets", action="store_true", help="also write the reconstructed snapshots")
    parser.add_argument("--cache", default=None, metavar="DIR", help="classifier cache folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_malloc_tuning_argument(parser, "after every network evaluation")
    parser.add_argument("--backend", default="auto", help="mpkernels backend (default: auto)")


def plot_sweep(results: list[dict], path: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .. import io as edm_io

    stds = [r["sigma_rel"] for r in results]
    fig, ax1 = plt.subplots(figsize=(6, 3.8))
    ax1.plot(stds, [r["fd"] for r in results], "o-", color="C0", label="Frechet distance")
    ax1.set_xlabel("EMA length sigma_rel (post hoc)")
    ax1.set_ylabel("Frechet distance (lower is better)", color="C0")
    best = min(results, key=lambda r: r["fd"])
    ax1.axvline(best["sigma_rel"], color="C0", ls=":", lw=1)
    if all("accuracy" in r for r in results):
        ax2 = ax1.twinx()
        ax2.plot(stds, [100 * r["accuracy"] for r in results], "s--", color="C3", label="class accuracy")
        ax2.set_ylabel("class accuracy of samples (%)", color="C3")
    ax1.set_title(title or "post-hoc EMA sweep", fontsize=10)
    fig.tight_layout()
    with edm_io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def run(args) -> int:
    from .. import evaluate, posthoc
    from .eval import check_digits_net
    set_backend(args.backend)
    device = _device(args.device)
    apply_malloc_tuning(args, device)
    outdir = args.outdir or os.path.join(args.indir, "sweep")
    try:
        snaps = posthoc.list_snapshots(args.indir, args.prefix)
        inputs, _, nimg = posthoc.solve(snaps, args.std, args.nimg)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    kw = inputs[0].net_kwargs
    if kw.get("img_channels") != 1 or kw.get("img_resolution") not in (16, 32):
        raise UserError(f"--indir: sweep evaluates digits models (1 channel, 16/32 px); these snapshots are "
                        f"{kw.get('img_channels')}x{kw.get('img_resolution')}px")
    os.makedirs(outdir, exist_ok=True)
    try:
        model = evaluate.load_classifier(args.cache, verbose=True)
    except OSError as e:
        raise UserError(f"--cache: {e}") from None
    print(f"sweep: {len(args.std)} EMA lengths at {nimg} images from {len(inputs)} snapshots, {args.num} samples "
          f"each, {args.steps} steps")
    seeds = parse_seeds(f"0-{args.num - 1}")
    results = []
    compute_dtype = "fp32" if device.type == "cpu" else None
    for std, net in posthoc.iter_networks(snaps, args.std, args.nimg, device=device, max_outputs=4,
                                          compute_dtype=compute_dtype):
        check_digits_net(net, "--indir")
        classes = class_labels_for(net, seeds, "cycle")
        images = generate_images(net, seeds, classes, num_steps=args.steps, batch=args.batch, device=device)
        metrics = evaluate.evaluate_samples(images, classes, model=model)
        metrics["sigma_rel"] = std
        results.append(metrics)
        acc = f"accuracy {metrics['accuracy'] * 100:5.1f}%  " if "accuracy" in metrics else ""
        print(f"sigma_rel {std:.3f}: {acc}FD {metrics['fd']:.3f}", flush=True)
        save_png(make_grid(to_uint8(images[:100]), 10), os.path.join(outdir, f"grid-{std:.3f}.png"),
                 scale=max(1, 64 // images.shape[-1]))
        if args.save_nets:
            from .. import io as edm_io
            from ..train import snapshot_name
            meta = dict(net.snapshot_metadata)
            edm_io.save(net, os.path.join(outdir, snapshot_name(inputs[0].prefix, nimg, std)), **meta)
        del net
    from .. import io as edm_io
    with edm_io.atomic_open(os.path.join(outdir, "sweep.json"), "w") as f:
        json.dump({"nimg": nimg, "num": args.num, "steps": args.steps, "results": results}, f, indent=2)
    best = min(results, key=lambda r: r["fd"])
    plot = plot_sweep(results, os.path.join(outdir, "sweep.png"),
                      f"digits at {nimg / 1000:g} kimg: best FD {best['fd']:.2f} at sigma_rel {best['sigma_rel']:.3f}")
    print(f"best sigma_rel {best['sigma_rel']:.3f} (FD {best['fd']:.3f}); wrote {plot} and sweep.json")
    return 0
