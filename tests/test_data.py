"""Datasets, pixel/latent mappings, the resumable sharded sampler and `edm2fast dataset`."""

import argparse
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from edm2fast import data
from edm2fast.cli import UserError
from edm2fast.commands import dataset as dataset_cmd




def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def rgb(seed, h=6, w=6):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Mappings

def test_pixel_mapping_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = data.pixels_to_model(x)
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    assert torch.equal(y, x.float() / 127.5 - 1)
    assert torch.equal(data.model_to_pixels(y), x)
    assert torch.equal(data.model_to_pixels(torch.tensor([[-5.0, 5.0]])), torch.tensor([[0, 255]], dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        data.pixels_to_model(torch.zeros(1, 1, 2, 2))


def test_latent_mapping_matches_spec():
    mean = torch.tensor([5.81, 3.25, 0.12, -2.15]).reshape(1, 4, 1, 1).expand(2, 4, 3, 3)
    raw = torch.cat([mean + 1.0, torch.full_like(mean, 0.5)], dim=1)
    g = torch.Generator().manual_seed(0)
    z = data.latents_to_model(raw, g)
    eps = torch.randn([2, 4, 3, 3], generator=torch.Generator().manual_seed(0))
    std = torch.tensor([4.17, 4.62, 3.71, 3.28]).reshape(1, 4, 1, 1)
    expected = ((mean + 1.0 + 0.5 * eps) - mean) / std * 0.5
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)
    # zero std: deterministic, and model_to_latents inverts the scaling
    raw0 = torch.cat([mean + 2.0, torch.zeros_like(mean)], dim=1)
    torch.testing.assert_close(data.model_to_latents(data.latents_to_model(raw0)), mean + 2.0, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="raw"):
        data.latents_to_model(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="4 latent channels"):
        data.latents_to_model(torch.zeros(1, 6, 2, 2))


# ----------------------------------------------------------------------------------------------
# Image folders and zips

@pytest.fixture
def labeled_folder(tmp_path):
    root = tmp_path / "imgs"
    for i in range(5):
        write_png(root / "sub" / f"{i}.png", rgb(i))
    (root / "dataset.json").write_text(json.dumps({"labels": [[f"sub/{i}.png", i % 3] for i in range(5)]}))
    (root / "notes.txt").write_text("ignored")
    return root


def check_labeled(ds, root):
    assert len(ds) == 5 and ds.kind == "pixels" and ds.label_dim == 3 and ds.has_labels
    assert ds.image_shape == (3, 6, 6) and ds.resolution == 6 and ds.num_channels == 3
    for i in range(5):
        x, label = ds[i]
        assert x.dtype == np.uint8 and x.shape == (3, 6, 6)
        np.testing.assert_array_equal(x, rgb(i).transpose(2, 0, 1))
        np.testing.assert_array_equal(label, np.eye(3, dtype=np.float32)[i % 3])


def test_image_folder_with_labels(labeled_folder):
    check_labeled(data.ImageFolderDataset(labeled_folder), labeled_folder)
    ds = data.open_dataset(str(labeled_folder), use_labels=False)
    assert ds.label_dim == 0 and ds[0][1].shape == (0,)


def test_image_zip_with_labels_and_loader(labeled_folder, tmp_path):
    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(labeled_folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(labeled_folder).as_posix())
    ds = data.open_dataset(zpath)
    assert isinstance(ds, data.ImageFolderDataset)
    check_labeled(ds, labeled_folder)
    it = data.infinite_loader(ds, batch_size=4, seed=1)
    x, labels = next(it)
    assert x.shape == (4, 3, 6, 6) and x.dtype == torch.uint8 and labels.shape == (4, 3)
    y = ds.encode(x)
    assert y.dtype == torch.float32 and y.abs().max() <= 1


def test_grayscale_xflip_and_max_size(tmp_path):
    root = tmp_path / "gray"
    for i in range(3):
        write_png(root / f"{i}.png", rgb(i)[:, :, 0])
    ds = data.ImageFolderDataset(root, xflip=True, max_size=2)
    assert len(ds) == 4 and ds.image_shape == (1, 6, 6) and not ds.has_labels
    np.testing.assert_array_equal(ds[3][0], ds[1][0][:, :, ::-1])
    with pytest.raises(IndexError):
        ds[4]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.open_dataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.ImageFolderDataset(empty)
    odd = tmp_path / "odd"
    write_png(odd / "a.png", rgb(0))
    write_png(odd / "b.png", rgb(1, 8, 8))
    ds = data.ImageFolderDataset(odd)
    with pytest.raises(ValueError, match="b.png.*differs"):
        ds[1]
    rect = tmp_path / "rect"
    write_png(rect / "a.png", rgb(0, 4, 6))
    with pytest.raises(ValueError, match="square"):
        data.ImageFolderDataset(rect)
    nolabel = tmp_path / "nolabel"
    write_png(nolabel / "a.png", rgb(0))
    write_png(nolabel / "b.png", rgb(1))
    (nolabel / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0]]}))
    with pytest.raises(ValueError, match="no label for b.png"):
        data.ImageFolderDataset(nolabel)
    (nolabel / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json"):
        data.ImageFolderDataset(nolabel)
    broken = tmp_path / "broken"
    write_png(broken / "a.png", rgb(0))
    (broken / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="b.png: cannot read"):
        data.ImageFolderDataset(broken)[1]


def test_latent_folder(tmp_path):
    root = tmp_path / "lat"
    root.mkdir()
    rng = np.random.default_rng(0)
    items = [rng.standard_normal((8, 4, 4)).astype(np.float32) for _ in range(3)]
    for i, item in enumerate(items):
        np.save(root / f"img-mean-std-{i:08d}.npy", item)
    ds = data.open_dataset(root)
    assert ds.kind == "latents" and ds.image_shape == (4, 4, 4)
    np.testing.assert_array_equal(ds[2][0], items[2])
    z = ds.encode(torch.from_numpy(np.stack(items)), torch.Generator().manual_seed(0))
    assert z.shape == (3, 4, 4, 4)


# ----------------------------------------------------------------------------------------------
# Arrays

def test_array_datasets(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 7, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", nhwc)
    ds = data.open_dataset(tmp_path / "a.npy")
    assert ds.image_shape == (3, 7, 7) and not ds.has_labels
    np.testing.assert_array_equal(ds[4][0], nhwc[4].transpose(2, 0, 1))
    labels = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "b.npz", images=nhwc.transpose(0, 3, 1, 2), labels=labels)
    ds = data.open_dataset(tmp_path / "b.npz")
    assert ds.label_dim == 3
    np.testing.assert_array_equal(ds[1][1], [0, 1, 0])
    assert data.open_dataset(tmp_path / "b.npz", use_labels=False).label_dim == 0
    np.testing.assert_array_equal(ds[4][0], nhwc[4].transpose(2, 0, 1))
    gray = data.ArrayDataset(rng.integers(0, 256, (2, 5, 5), dtype=np.uint8), labels=np.eye(4)[[1, 3]])
    assert gray.image_shape == (1, 5, 5) and gray.label_dim == 4
    lat = data.ArrayDataset(rng.standard_normal((3, 8, 2, 2)).astype(np.float16))
    assert lat.kind == "latents" and lat[0][0].dtype == np.float32 and lat.image_shape == (4, 2, 2)
    with pytest.raises(ValueError, match="labels for"):
        data.ArrayDataset(nhwc, labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="dtype"):
        data.ArrayDataset(nhwc.astype(np.int32))
    with pytest.raises(ValueError, match="latents"):
        data.ArrayDataset(np.zeros((2, 3, 4, 4), np.float32))
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.npy"):
        data.open_dataset(tmp_path / "bad.npy")


# ----------------------------------------------------------------------------------------------
# Digits

def test_digits():
    ds = data.open_dataset("digits16")
    assert len(ds) == 1797 and ds.label_dim == 10 and ds.image_shape == (1, 16, 16) and ds.name == "digits16"
    x, label = ds[0]
    assert x.dtype == np.uint8 and label.argmax() == 0 and x.max() > 200 and x.min() == 0
    labels = np.stack([ds[i][1] for i in range(0, len(ds), 7)])
    assert set(labels.argmax(1)) == set(range(10)) and np.all(labels.sum(1) == 1)
    ds32 = data.DigitsDataset(resolution=32, channels=3)
    assert ds32.image_shape == (3, 32, 32) and np.array_equal(ds32[5][0][0], ds32[5][0][2])
    np.testing.assert_array_equal(data.DigitsDataset(32)[5][0], ds32[5][0][:1])  # deterministic
    with pytest.raises(ValueError, match="resolution"):
        data.DigitsDataset(resolution=24)
    with pytest.raises(ValueError, match="channels"):
        data.DigitsDataset(channels=2)


# ----------------------------------------------------------------------------------------------
# Sampler

def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_epochs_are_permutations():
    s = take(data.InfiniteSampler(7, seed=3), 21)
    for e in range(3):
        assert sorted(s[7 * e: 7 * e + 7]) == list(range(7))
    assert s[:7] != s[7:14]
    assert take(data.InfiniteSampler(7, seed=3), 21) == s
    assert take(data.InfiniteSampler(7, seed=4), 21) != s
    assert take(data.InfiniteSampler(5, shuffle=False), 7) == [0, 1, 2, 3, 4, 0, 1]


def test_sampler_sharding_and_resume():
    n, R, total = 11, 3, 60
    single = take(data.InfiniteSampler(n, seed=9), total)
    shards = [take(data.InfiniteSampler(n, rank=r, num_replicas=R, seed=9), total // R) for r in range(R)]
    for r in range(R):  # rank r reads positions r, r+R, ... of the one global stream
        assert shards[r] == single[r::R]
    start = 27  # resume after 27 images seen (a multiple of R)
    for r in range(R):
        resumed = take(data.InfiniteSampler(n, rank=r, num_replicas=R, seed=9, start_idx=start), 5)
        assert resumed == single[start + r::R][:5]
    with pytest.raises(ValueError, match="start_idx"):
        data.InfiniteSampler(n, rank=0, num_replicas=R, start_idx=28)
    with pytest.raises(ValueError, match="rank"):
        data.InfiniteSampler(n, rank=3, num_replicas=R)
    with pytest.raises(ValueError, match="dataset_len"):
        data.InfiniteSampler(0)


# ----------------------------------------------------------------------------------------------
# `edm2fast dataset`

def parse(argv):
    parser = argparse.ArgumentParser()
    dataset_cmd.add_arguments(parser)
    return parser.parse_args(argv)


def test_dataset_command_with_classes(tmp_path, capsys):
    src = tmp_path / "src"
    write_png(src / "cat" / "a.png", rgb(0, 10, 20))  # wide: center-cropped
    write_png(src / "cat" / "b.jpg", rgb(1, 12, 12))
    write_png(src / "dog" / "c.png", rgb(2, 20, 10)[:, :, 0])  # tall grayscale -> RGB
    (src / "dog" / "readme.txt").write_text("skip")
    dest = tmp_path / "out.zip"
    assert dataset_cmd.run(parse(["--source", str(src), "--dest", str(dest), "--resolution", "8"])) == 0
    assert "3 images" in capsys.readouterr().out
    ds = data.open_dataset(dest)
    assert len(ds) == 3 and ds.image_shape == (3, 8, 8) and ds.label_dim == 2
    assert [int(ds[i][1].argmax()) for i in range(3)] == [0, 0, 1]
    # the crop of the wide image is its centre
    expected = data.center_crop_resize(Image.fromarray(rgb(0, 10, 20)), 8)
    np.testing.assert_array_equal(ds[0][0], np.asarray(expected).transpose(2, 0, 1))
    with zipfile.ZipFile(dest) as zf:
        assert json.loads(zf.read("dataset.json"))["classes"] == ["cat", "dog"]


def test_dataset_command_flat_gray_and_errors(tmp_path):
    src = tmp_path / "flat"
    for i in range(3):
        write_png(src / f"{i}.png", rgb(i, 9, 9))
    dest = tmp_path / "g.zip"
    assert dataset_cmd.run(parse(["--source", str(src), "--dest", str(dest), "--resolution", "4",
                                  "--channels", "1", "--max-images", "2"])) == 0
    ds = data.open_dataset(dest)
    assert len(ds) == 2 and ds.image_shape == (1, 4, 4) and not ds.has_labels
    with pytest.raises(FileNotFoundError, match="--source"):
        dataset_cmd.run(parse(["--source", str(tmp_path / "none"), "--dest", str(dest), "--resolution", "4"]))
    with pytest.raises(UserError, match="--resolution"):
        dataset_cmd.run(parse(["--source", str(src), "--dest", str(dest), "--resolution", "0"]))
    with pytest.raises(UserError, match="--dest"):
        dataset_cmd.run(parse(["--source", str(src), "--dest", str(tmp_path / "x.tar"), "--resolution", "4"]))
    with pytest.raises(UserError, match="--dest"):
        dataset_cmd.run(parse(["--source", str(src), "--dest", str(tmp_path / "no" / "x.zip"), "--resolution", "4"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        dataset_cmd.run(parse(["--source", str(empty), "--dest", str(dest), "--resolution", "4"]))
    (src / "9.png").write_bytes(b"broken")
    before = dest.read_bytes()
    with pytest.raises(UserError, match="9.png"):
        dataset_cmd.run(parse(["--source", str(src), "--dest", str(dest), "--resolution", "4"]))
    assert dest.read_bytes() == before  # the failed run left the previous zip alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "flat", "g.zip"]


def test_cli_dataset_help_and_error(tmp_path, capsys):
    from edm2fast import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(["dataset", "--help"])
    assert exc.value.code == 0 and "--resolution" in capsys.readouterr().out
    assert cli.main(["dataset", "--source", str(tmp_path / "none"), "--dest", str(tmp_path / "o.zip"),
                     "--resolution", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edm2fast dataset: error: --source") and "\n" not in err
