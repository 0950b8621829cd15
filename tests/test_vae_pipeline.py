"""Latent diffusion end to end on CPU with a tiny random VAE: convert -> encode -> decode, a few
training steps on the encoded data, and `generate` writing decoded PNGs."""

from __future__ import annotations

import json
import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from edm2fast import cli, data, datatool, train, vae
from edm2fast import io as edm_io

from test_vae import make_tiny_autoencoder  # noqa: E402  (tests/ is on sys.path)

pytest.importorskip("diffusers")

SMALL_NET = dict(model_channels=16, channel_mult=[1, 2], attn_resolutions=[], channels_per_head=32)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Class folders -> convert (dhariwal, 16x16) -> encode with the tiny VAE; shared by the tests."""
    root = tmp_path_factory.mktemp("latent")
    vae_dir = root / "tiny-vae"
    make_tiny_autoencoder(seed=3).save_pretrained(vae_dir)
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dog", "cat"]):  # sorted: cat = 0, dog = 1
        for k, (w, h) in enumerate([(23, 17), (16, 40), (33, 33)]):
            (root / "src" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "src" / name / f"{k}.png")
    assert cli.main(["dataset", "convert", "--source", str(root / "src"), "--dest", str(root / "img.zip"),
                     "--transform", "center-crop-dhariwal", "--resolution", "16x16", "--no-progress"]) == 0
    assert cli.main(["dataset", "encode", "--source", str(root / "img.zip"), "--dest", str(root / "lat.zip"),
                     "--vae", str(vae_dir), "--device", "cpu", "--batch", "4", "--workers", "0", "--no-progress"]) == 0
    return root, vae_dir


def test_encode_keeps_order_labels_and_stores_mean_std(pipeline):
    root, vae_dir = pipeline
    images, latents = data.open_dataset(root / "img.zip"), data.open_dataset(root / "lat.zip")
    assert len(images) == len(latents) == 6 and latents.kind == "latents"
    assert latents.image_shape == (4, 8, 8) and latents.label_dim == 2
    v = vae.load_vae(vae_dir, device="cpu")
    x = torch.from_numpy(np.stack([images[i][0] for i in range(6)]))
    mean, std = v.encode(x)
    for i in range(6):
        raw, label = latents[i]
        assert raw.dtype == np.float32 and raw.shape == (8, 8, 8)
        np.testing.assert_allclose(raw[:4], mean[i].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(raw[4:], std[i].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(label, images[i][1])
    assert [int(latents[i][1].argmax()) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    with zipfile.ZipFile(root / "lat.zip") as zf:
        meta = json.loads(zf.read("dataset.json"))
    assert meta["labels"][5] == ["00000/img-mean-std-00000005.npy", 1] and meta["classes"] == ["cat", "dog"]
    assert meta["encoder"]["pixels"] == "uint8 / 255"


def test_decode_round_trip_keeps_count_order_and_labels(pipeline, tmp_path, capsys):
    root, vae_dir = pipeline
    dest = tmp_path / "decoded"
    assert cli.main(["dataset", "decode", "--source", str(root / "lat.zip"), "--dest", str(dest),
                     "--vae", str(vae_dir), "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    assert "6 images (16x16x3)" in capsys.readouterr().out
    latents, decoded = data.open_dataset(root / "lat.zip"), data.open_dataset(dest)
    assert len(decoded) == 6 and decoded.image_shape == (3, 16, 16)
    v = vae.load_vae(vae_dir, device="cpu")
    means = torch.from_numpy(np.stack([latents[i][0][:4] for i in range(6)]))
    expected = v.decode_raw(means).numpy()
    for i in range(6):
        np.testing.assert_array_equal(decoded[i][1], latents[i][1])
        assert np.abs(decoded[i][0].astype(int) - expected[i].astype(int)).max() <= 1
    # and back: encoding the decoded images again gives latents of the same shape and order
    r = datatool.encode_dataset(dest, tmp_path / "again.zip", v)
    assert r["items"] == 6 and r["shape"] == (8, 8, 8)


def test_train_on_encoded_data_then_generate_decoded_pngs(pipeline, tmp_path, capsys):
    root, vae_dir = pipeline
    run = tmp_path / "run"
    cfg = train.TrainConfig(run_dir=str(run), data=str(root / "lat.zip"), preset="tiny", network=SMALL_NET,
                            batch=4, duration=16, snapshot=1024, checkpoint=16, progress=False, lr=0.01,
                            rampup=0.0)
    result = train.train(cfg, log=lambda msg: None)
    assert result["finished"] and result["cur_nimg"] == 16
    snap = run / "phema-0000000-0.100.safetensors"
    meta = edm_io.read_metadata(snap)
    assert meta["data_kind"] == "latents" and meta["net_kwargs"]["img_channels"] == 4
    assert meta["net_kwargs"]["img_resolution"] == 8 and meta["net_kwargs"]["label_dim"] == 2
    stats = [json.loads(line) for line in open(run / "stats.jsonl")]
    assert stats and all(np.isfinite(r["loss"]) for r in stats)

    out = tmp_path / "out"
    assert cli.main(["generate", "--net", str(snap), "--seeds", "0-2", "--steps", "2", "--class", "1",
                     "--vae", str(vae_dir), "--outdir", str(out), "--device", "cpu"]) == 0
    names = sorted(os.listdir(out))
    assert names == ["000000.png", "000001.png", "000002.png", "grid.png", "samples.json"]
    pngs = [np.asarray(Image.open(out / f"{s:06d}.png")) for s in range(3)]
    assert all(p.shape == (16, 16, 3) and p.dtype == np.uint8 for p in pngs)
    assert "3 images" in capsys.readouterr().out

    # --no-decode keeps the raw latents; decoding them gives the same PNGs
    raw_dir = tmp_path / "raw"
    assert cli.main(["generate", "--net", str(snap), "--seeds", "0-2", "--steps", "2", "--class", "1",
                     "--no-decode", "--outdir", str(raw_dir), "--device", "cpu"]) == 0
    z = np.load(raw_dir / "latents.npy")
    assert z.shape == (3, 4, 8, 8) and not (raw_dir / "000000.png").exists()
    again = vae.load_vae(vae_dir, device="cpu").decode_raw(torch.from_numpy(z)).permute(0, 2, 3, 1).numpy()
    for s in range(3):
        assert np.abs(again[s].astype(int) - pngs[s].astype(int)).max() <= 1


def test_generate_latent_model_errors_early(pipeline, tmp_path, capsys, monkeypatch):
    """A missing VAE or diffusers stops generate before sampling, in one line."""
    root, vae_dir = pipeline
    net_path = tmp_path / "net.safetensors"
    torch.manual_seed(0)
    net = edm_io.build_net(img_resolution=8, img_channels=4, label_dim=0, model_channels=16, channel_mult=[1],
                           num_blocks=1, attn_resolutions=[], channels_per_head=16, dtype="fp32")
    edm_io.save(net, net_path, dtype="fp32", data_kind="latents")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("EDM2FAST_ALLOW_DOWNLOAD", raising=False)
    args = ["generate", "--net", str(net_path), "--seeds", "0", "--steps", "2", "--outdir", str(tmp_path / "o"),
            "--device", "cpu"]
    assert cli.main(args + ["--vae", "someone/absent-vae"]) == 2
    err = capsys.readouterr().err.strip()
    assert "someone/absent-vae" in err and "--download" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'mpkernels[latent]'" in err and "\n" not in err
