"""``edm2fast convert SRC DST``: the authors' EDM2 pickle -> an edm2fast safetensors snapshot.

SRC is any file the release publishes or writes (``edm2-img512-xs-2147483-0.135.pkl``,
``network-snapshot-<kimg>-<std>.pkl``, ``training-state-<kimg>.pt``), a local path or an
``https://`` URL (downloaded once into the cache, see :mod:`edm2fast.download`).

No code from SRC runs: the pickle is read by a restricted unpickler (see
:mod:`edm2fast.convert`) that refuses anything but tensors, containers and the
authors' persistence records.
"""

from __future__ import annotations

import os

from ..cli import UserError


def add_arguments(parser) -> None:
    parser.epilog = ("Example: edm2fast convert edm2-img512-xs-2147483-0.135.pkl xs.safetensors. "
                     "The pickle is read without executing any code from it; anything else than "
                     "tensors, containers and persistence records is refused.")
    parser.add_argument("src", metavar="SRC", help="the authors' pickle (.pkl), training-state-<kimg>.pt, or a URL")
    parser.add_argument("dst", metavar="DST", nargs="?", help="snapshot to write (.safetensors)")
    parser.add_argument("--ema", metavar="KEY", default=None,
                        help="entry of the pickle that holds the network (default: 'ema', else 'net'); for a "
                             "training-state-*.pt: 'ema' (the first EMA), 'ema<i>', 'ema:<std>' or 'net'")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                        help="storage precision of the parameters (default: fp16; buffers stay fp32)")
    parser.add_argument("--list", action="store_true", help="print the pickle's entries and exit")


def run(args) -> int:
    from .. import convert, download, io

    src = download.fetch(os.fspath(args.src), what="SRC")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"SRC: {src}: no such file")
    if args.list:
        print(convert.describe_pickle(src))
        return 0
    if not args.dst:
        raise UserError("DST: required (the .safetensors snapshot to write), or use --list")
    dst = os.fspath(args.dst)
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise UserError(f"DST: folder {folder} does not exist")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise UserError(f"DST: {dst} is the same file as SRC")
    net = io.load_official_pickle(src, key=args.ema)
    io.save(net, dst, dtype=args.dtype, **net.snapshot_metadata)
    num_params = sum(p.numel() for p in net.parameters())
    print(f"wrote {dst}: Precond {net.img_resolution}x{net.img_resolution}x{net.img_channels}, "
          f"label_dim {net.label_dim}, {num_params / 1e6:.1f}M parameters ({args.dtype})")
    return 0
