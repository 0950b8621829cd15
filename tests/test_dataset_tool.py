"""`edm2fast dataset convert` and the release's transforms (spec §9), checked against literal
re-implementations on synthetic images of awkward sizes."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from edm2fast import cli, data, datatool

# (width, height): odd, portrait, tiny, extreme aspect ratios both ways, exact, large (box halvings)
SIZES = [(37, 23), (20, 51), (3, 2), (300, 7), (7, 300), (16, 16), (1000, 300), (129, 130)]


def rgb(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --- literal re-implementations, written from spec §9 with numpy slicing ------------------------

def ref_center_crop(a, W, H):
    h, w = a.shape[:2]
    s = min(h, w)
    a = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.asarray(Image.fromarray(a).resize((W, H), Image.LANCZOS))


def ref_center_crop_wide(a, W, H):
    h, w = a.shape[:2]
    band = int(np.round(W * h / w))
    if w < W or band < H:
        return None
    a = a[(h - band) // 2:(h - band) // 2 + band]
    canvas = np.zeros((W, W, 3), np.uint8)
    canvas[(W - H) // 2:(W - H) // 2 + H] = np.asarray(Image.fromarray(a).resize((W, H), Image.LANCZOS))
    return canvas


def ref_center_crop_dhariwal(a, S):
    im = Image.fromarray(a)
    while min(im.width, im.height) >= 2 * S:
        im = im.resize((im.width // 2, im.height // 2), Image.BOX)
    k = S / min(im.width, im.height)
    im = im.resize((round(im.width * k), round(im.height * k)), Image.BICUBIC)
    b = np.asarray(im)
    y, x = (b.shape[0] - S) // 2, (b.shape[1] - S) // 2
    return b[y:y + S, x:x + S]


@pytest.mark.parametrize("w, h", SIZES)
def test_transforms_match_literal_reimplementations(w, h):
    a = rgb(w, h, seed=w * 1000 + h)
    img = Image.fromarray(a)
    np.testing.assert_array_equal(np.asarray(datatool.center_crop(img, 9, 9)), ref_center_crop(a, 9, 9))
    np.testing.assert_array_equal(np.asarray(datatool.center_crop(img, 12, 7)), ref_center_crop(a, 12, 7))
    for W, H in [(16, 8), (12, 12), (5, 3)]:
        got, ref = datatool.center_crop_wide(img, W, H), ref_center_crop_wide(a, W, H)
        assert (got is None) == (ref is None), (W, H)
        if ref is not None:
            np.testing.assert_array_equal(np.asarray(got), ref)
    for S in [8, 13, 64]:
        out = np.asarray(datatool.center_crop_dhariwal(img, S))
        assert out.shape == (S, S, 3)
        np.testing.assert_array_equal(out, ref_center_crop_dhariwal(a, S))


def test_dhariwal_halves_with_a_box_filter_first():
    # 1000x300 at 64: 300 >= 128 -> 500x150 -> 250x75 (box), then bicubic to round(250*64/75)=213 x 64.
    # Stripes 2 px wide average out to flat grey only through both box halvings (one halving, or
    # bicubic straight from 1000x300, leaves ripples of +-6).
    a = np.zeros((300, 1000, 3), np.uint8)
    a[:, (np.arange(1000) // 2) % 2 == 0] = 200
    out = np.asarray(datatool.center_crop_dhariwal(Image.fromarray(a), 64))
    assert out.shape == (64, 64, 3) and np.all(out == 100)


def test_center_crop_wide_skips_and_paste_position():
    assert datatool.center_crop_wide(Image.fromarray(rgb(15, 40)), 16, 8) is None  # narrower than W
    assert datatool.center_crop_wide(Image.fromarray(rgb(300, 7)), 16, 8) is None  # band round(16*7/300)=0 < 8
    out = np.asarray(datatool.center_crop_wide(Image.fromarray(np.full((20, 40, 3), 255, np.uint8)), 16, 8))
    assert out.shape == (16, 16, 3)
    assert np.all(out[4:12] == 255) and np.all(out[:4] == 0) and np.all(out[12:] == 0)


def test_resolution_and_transform_arguments():
    assert datatool.parse_resolution("512x512") == (512, 512)
    assert datatool.parse_resolution("64") == (64, 64) and datatool.parse_resolution(32) == (32, 32)
    assert datatool.parse_resolution("16X8") == (16, 8) and datatool.parse_resolution(None) is None
    for bad in ["", "x", "12x", "0x4", "4x4x4", "-3"]:
        with pytest.raises(ValueError, match="resolution"):
            datatool.parse_resolution(bad)
    with pytest.raises(ValueError, match="transform"):
        datatool.make_transform("center-crop-imagenet", "64x64")
    with pytest.raises(ValueError, match="resolution: datasets must be square"):
        datatool.make_transform("center-crop-dhariwal", "64x32")
    with pytest.raises(ValueError, match="H <= W"):
        datatool.make_transform("center-crop-wide", "32x64")
    with pytest.raises(ValueError, match="needs a resolution"):
        datatool.make_transform("center-crop", None)


# --- convert ------------------------------------------------------------------------------------

def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def class_folders(tmp_path):
    """ImageNet-like synset folders (sorted names -> class indices), awkward sizes, a stray text file."""
    src = tmp_path / "train"
    sizes = iter(SIZES[:6] + [(40, 30), (31, 60)])
    for c, synset in enumerate(["n01443537", "n01440764", "n02000000"]):
        for k in range(2 if c < 2 else 4):
            w, h = next(sizes)
            write_png(src / synset / f"{synset}_{k}.JPEG.png", rgb(w, h, seed=10 * c + k))
    (src / "n01440764" / "notes.txt").write_text("not an image")
    return src


def open_images(path):
    ds = data.open_dataset(path)
    return ds, [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("transform", ["center-crop", "center-crop-wide", "center-crop-dhariwal"])
def test_convert_command_all_transforms(class_folders, tmp_path, transform, capsys):
    dest = tmp_path / f"{transform}.zip"
    res = "16x8" if transform == "center-crop-wide" else "12x12"
    assert cli.main(["dataset", "convert", "--source", str(class_folders), "--dest", str(dest),
                     "--transform", transform, "--resolution", res, "--no-progress"]) == 0
    out = capsys.readouterr().out
    files = sorted(p.relative_to(class_folders).as_posix() for p in class_folders.rglob("*.png"))
    W, H = map(int, res.split("x"))
    expected, labels = [], []
    for f in files:
        a = np.asarray(Image.open(class_folders / f).convert("RGB"))
        e = {"center-crop": lambda: ref_center_crop(a, W, H), "center-crop-wide": lambda: ref_center_crop_wide(a, W, H),
             "center-crop-dhariwal": lambda: ref_center_crop_dhariwal(a, W)}[transform]()
        if e is not None:
            expected.append(e)
            labels.append(sorted(["n01443537", "n01440764", "n02000000"]).index(f.split("/")[0]))
    ds, items = open_images(dest)
    assert len(ds) == len(expected) and ds.label_dim == 3
    for (x, y), e, k in zip(items, expected, labels):
        np.testing.assert_array_equal(x, e.transpose(2, 0, 1))
        assert int(y.argmax()) == k
    with zipfile.ZipFile(dest) as zf:
        meta = json.loads(zf.read("dataset.json"))
        assert meta["classes"] == ["n01440764", "n01443537", "n02000000"]
        assert meta["labels"][0][0] == "00000/img00000000.png"
    assert f"{len(expected)} images" in out
    if transform == "center-crop-wide":
        assert len(expected) < len(files) and f"{len(files) - len(expected)} skipped by" in out


def test_convert_zip_to_folder_with_dataset_json_labels(tmp_path):
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as zf:
        for i, (w, h) in enumerate([(10, 14), (9, 9), (30, 11)]):
            buf = io.BytesIO()
            Image.fromarray(rgb(w, h, i)).save(buf, format="PNG")
            zf.writestr(f"x/{i}.png", buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [["x/0.png", 7], ["x/1.png", 2], ["x/2.png", 7]]}))
    dest = tmp_path / "out"
    r = datatool.convert_dataset(src, dest, resolution="8x8", max_images=2)
    assert r["images"] == 2 and r["labels"]
    assert sorted(os.listdir(dest)) == ["00000", "dataset.json"]
    ds, items = open_images(dest)
    assert [int(y.argmax()) for _, y in items] == [7, 2]
    # no transform: a plain Lanczos resize of the whole image
    np.testing.assert_array_equal(items[0][0], np.asarray(Image.fromarray(rgb(10, 14, 0)).resize((8, 8), Image.LANCZOS))
                                  .transpose(2, 0, 1))
    with pytest.raises(ValueError, match="dest: .* not an empty folder"):
        datatool.convert_dataset(src, dest, resolution="8x8")


def test_convert_unreadable_images_and_atomic_output(class_folders, tmp_path, capsys):
    (class_folders / "n02000000" / "zz_broken.png").write_bytes(b"not a png")
    dest = tmp_path / "out"
    assert cli.main(["dataset", "convert", "--source", str(class_folders), "--dest", str(dest),
                     "--resolution", "8x8", "--transform", "center-crop", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "zz_broken.png" in err and err.startswith("edm2fast dataset: error: --source") and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == ["train"]  # nothing left behind, not even a temporary folder
    assert cli.main(["dataset", "convert", "--source", str(class_folders), "--dest", str(dest),
                     "--resolution", "8x8", "--transform", "center-crop", "--skip-bad", "--no-progress"]) == 0
    assert "1 unreadable skipped" in capsys.readouterr().out
    assert len(data.open_dataset(dest)) == 8
    # errors name the argument
    assert cli.main(["dataset", "convert", "--source", str(tmp_path / "none"), "--dest", str(tmp_path / "o.zip"),
                     "--resolution", "8x8"]) == 2
    assert "--source" in capsys.readouterr().err
    assert cli.main(["dataset", "convert", "--source", str(class_folders), "--dest", str(tmp_path / "o.zip"),
                     "--resolution", "8x6"]) == 2
    assert "--resolution" in capsys.readouterr().err
    assert cli.main(["dataset", "convert", "--source", str(class_folders), "--dest", str(tmp_path / "o.zip")]) == 2
    assert "n01440764_0.JPEG.png is 3x2; datasets must be square" in capsys.readouterr().err  # no --resolution


def test_convert_without_resolution_keeps_equal_square_images(tmp_path):
    src = tmp_path / "sq"
    for i in range(3):
        write_png(src / f"{i}.png", rgb(6, 6, i))
    r = datatool.convert_dataset(src, tmp_path / "o.zip")
    assert r["images"] == 3 and r["size"] == (6, 6) and not r["labels"]
    np.testing.assert_array_equal(data.open_dataset(tmp_path / "o.zip")[2][0], rgb(6, 6, 2).transpose(2, 0, 1))
    write_png(src / "3.png", rgb(7, 6, 3))
    with pytest.raises(ValueError, match="3.png"):
        datatool.convert_dataset(src, tmp_path / "p.zip")


def test_older_form_is_convert_center_crop(tmp_path):
    src = tmp_path / "src"
    write_png(src / "a" / "0.png", rgb(13, 9, 0))
    write_png(src / "b" / "1.png", rgb(9, 21, 1))
    assert cli.main(["dataset", "--source", str(src), "--dest", str(tmp_path / "old.zip"), "--resolution", "8"]) == 0
    assert cli.main(["dataset", "convert", "--source", str(src), "--dest", str(tmp_path / "new.zip"),
                     "--transform", "center-crop", "--resolution", "8x8", "--no-progress"]) == 0
    old, new = data.open_dataset(tmp_path / "old.zip"), data.open_dataset(tmp_path / "new.zip")
    for i in range(2):
        np.testing.assert_array_equal(old[i][0], new[i][0])
        np.testing.assert_array_equal(old[i][1], new[i][1])
    assert cli.main(["dataset", "--source", str(src)]) == 2
