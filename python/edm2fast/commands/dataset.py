"""``edm2fast dataset --source DIR --dest OUT.zip --resolution R``: pack an image folder into a zip dataset.

Each image is center-cropped to a square and resized (Lanczos) to R x R, then stored as
PNG. When every image lies in a first-level subfolder, the subfolders are the classes
(sorted by name, index 0, 1, ...) and ``dataset.json`` records the labels.
"""

from __future__ import annotations

import io as _pyio
import json
import os
import zipfile

from ..cli import UserError


def add_arguments(parser) -> None:
    parser.epilog = ("Example: edm2fast dataset --source photos/ --dest photos-64.zip --resolution 64. "
                     "With class subfolders (photos/cat/*.jpg, photos/dog/*.jpg) the zip gets a dataset.json "
                     "with labels (classes sorted by folder name).")
    parser.add_argument("--source", metavar="DIR", required=True,
                        help="folder of PNG/JPEG images (searched recursively)")
    parser.add_argument("--dest", metavar="OUT.zip", required=True, help="zip file to write")
    parser.add_argument("--resolution", metavar="R", type=int, required=True, help="output size R x R in pixels")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3,
                        help="3: RGB (default), 1: grayscale")
    parser.add_argument("--max-images", metavar="N", type=int, default=None, help="pack at most N images")
    parser.add_argument("--no-labels", action="store_true", help="ignore class subfolders")


def _list_images(source: str) -> list[str]:
    from ..data import IMAGE_EXTENSIONS
    found = []
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                found.append(os.path.relpath(os.path.join(root, f), source).replace(os.sep, "/"))
    return found


def run(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from .. import io
    from ..data import center_crop_resize

    source, dest = os.fspath(args.source), os.fspath(args.dest)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--source: {source}: no such folder")
    if args.resolution < 1 or args.resolution > 8192:
        raise UserError(f"--resolution: expected 1..8192 pixels, got {args.resolution}")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images: expected >= 1, got {args.max_images}")
    if not dest.lower().endswith(".zip"):
        raise UserError(f"--dest: expected a .zip file name, got {dest}")
    folder = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(folder):
        raise UserError(f"--dest: folder {folder} does not exist")
    if os.path.abspath(dest).startswith(os.path.abspath(source) + os.sep) and os.path.exists(dest):
        raise UserError(f"--dest: {dest} lies inside --source and already exists")

    files = _list_images(source)
    if not files:
        raise UserError(f"--source: no images (.png, .jpg, ...) found in {source}")
    classes = None
    if not args.no_labels and all("/" in f for f in files):
        classes = sorted({f.split("/", 1)[0] for f in files})
    if args.max_images is not None:
        files = files[: args.max_images]
    mode = "RGB" if args.channels == 3 else "L"

    labels = []

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for idx, rel in enumerate(files):
                try:
                    with Image.open(os.path.join(source, rel)) as img:
                        img = center_crop_resize(img.convert(mode), args.resolution)
                except (OSError, UnidentifiedImageError, ValueError) as e:
                    raise UserError(f"--source: cannot read image {os.path.join(source, rel)} ({e})") from None
                name = f"{idx // 1000:05d}/img{idx:08d}.png"
                buf = _pyio.BytesIO()
                img.save(buf, format="PNG")
                zf.writestr(name, buf.getvalue())
                if classes is not None:
                    labels.append([name, classes.index(rel.split("/", 1)[0])])
            meta = {"labels": labels if classes is not None else None}
            if classes is not None:
                meta["classes"] = classes
            zf.writestr("dataset.json", json.dumps(meta))

    io.atomic_write(dest, write)
    desc = f"{len(classes)} classes" if classes is not None else "no labels"
    print(f"wrote {dest}: {len(files)} images, {args.resolution}x{args.resolution}x{args.channels}, {desc}")
    return 0
