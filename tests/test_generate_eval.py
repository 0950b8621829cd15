"""`edm2fast generate` (determinism, outputs) and the digits metrics of `edm2fast eval` (evaluate.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from edm2fast import cli, evaluate
from edm2fast import io as edm_io
from edm2fast.commands import generate

DIGITS_NET = dict(img_resolution=16, img_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 1],
                  num_blocks=1, attn_resolutions=[], channels_per_head=16, dtype="fp32")


def _random_net(seed=0, **overrides):
    torch.manual_seed(seed)
    net = edm_io.build_net(**dict(DIGITS_NET, **overrides))
    with torch.no_grad():  # a net that does something: nonzero output gain and embedding gains
        net.unet.out_gain.fill_(0.5)
        for name, p in net.named_parameters():
            if name.endswith("emb_gain"):
                p.fill_(0.3)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("nets") / "net.safetensors"
    edm_io.save(_random_net(), path, dtype="fp32", nimg=1000, sigma_rel=0.1)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    cache = os.environ.get("EDM2FAST_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    return evaluate.load_classifier(cache), cache


# ----------------------------------------------------------------------------------------------- generate

def test_parse_seeds():
    assert generate.parse_seeds("0-3,7, 10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert generate.parse_seeds("5") == [5]
    for bad in ["", "a", "5-1", "-3", "1,1", "1-2-3", "1.5"]:
        with pytest.raises(ValueError, match="seeds"):
            generate.parse_seeds(bad)


def test_generate_is_deterministic_and_batch_independent():
    net = _random_net()
    seeds = [3, 1, 4, 15, 9]
    classes = generate.class_labels_for(net, seeds, "cycle")
    assert classes == [3, 1, 4, 5, 9]
    a = generate.generate_images(net, seeds, classes, num_steps=4, batch=5)
    b = generate.generate_images(net, seeds, classes, num_steps=4, batch=5)
    assert torch.equal(a, b)
    c = generate.generate_images(net, seeds, classes, num_steps=4, batch=2)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
    single = generate.generate_images(net, [4], [4], num_steps=4, batch=1)
    torch.testing.assert_close(single[0], a[2], rtol=1e-4, atol=1e-4)
    # Churn noise comes from the per-seed generators too.
    d = generate.generate_images(net, seeds, classes, num_steps=4, batch=5, S_churn=10)
    e = generate.generate_images(net, seeds, classes, num_steps=4, batch=2, S_churn=10)
    torch.testing.assert_close(d, e, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(d, a)


def test_random_classes_come_from_the_seed():
    net = _random_net()
    a = generate.class_labels_for(net, list(range(20)), "random")
    assert a == generate.class_labels_for(net, list(range(20)), None)
    assert a[5:10] == generate.class_labels_for(net, list(range(5, 10)), "random")
    assert all(0 <= c < 10 for c in a) and len(set(a)) > 3


def test_guidance_one_equals_no_guidance_and_guidance_changes_images():
    net, gnet = _random_net(0), _random_net(1, label_dim=0)
    seeds, classes = [0, 1], [2, 7]
    plain = generate.generate_images(net, seeds, classes, num_steps=3)
    same = generate.generate_images(net, seeds, classes, gnet=gnet, guidance=1.0, num_steps=3)
    assert torch.equal(plain, same)
    guided = generate.generate_images(net, seeds, classes, gnet=gnet, guidance=2.0, num_steps=3)
    assert not torch.allclose(guided, plain)


def test_generate_command_writes_pngs_grid_and_json(net_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["generate", "--net", str(net_file), "--seeds", "0-5", "--class", "cycle", "--steps", "3",
                   "--batch", "4", "--outdir", str(out)])
    assert rc == 0
    files = sorted(os.listdir(out))
    assert files == [f"{s:06d}.png" for s in range(6)] + ["grid.png", "samples.json"]
    info = json.load(open(out / "samples.json"))
    assert info == {"seeds": list(range(6)), "classes": [0, 1, 2, 3, 4, 5]}
    from PIL import Image
    img = Image.open(out / "000002.png")
    assert img.size == (16, 16) and img.mode == "L"
    # The PNG holds exactly the sampler's image.
    net = edm_io.load(net_file)
    x = generate.generate_images(net, [2], [2], num_steps=3)
    assert np.array_equal(np.asarray(img), generate.to_uint8(x)[0, :, :, 0])
    assert "wrote 6 images" in capsys.readouterr().out


def test_generate_command_same_images_whatever_the_batch(net_file, tmp_path):
    for batch in ("1", "4"):
        assert cli.main(["generate", "--net", str(net_file), "--seeds", "0-3", "--steps", "2", "--batch", batch,
                         "--outdir", str(tmp_path / batch), "--class", "7"]) == 0
    for s in range(4):
        a = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "1" / f"{s:06d}.png"), dtype=np.int16)
        b = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "4" / f"{s:06d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # rounding at most


def test_generate_latent_model_writes_npy(tmp_path, capsys):
    net = _random_net(0, img_channels=4, label_dim=0, img_resolution=8)
    path = tmp_path / "latent.safetensors"
    edm_io.save(net, path, dtype="fp32", data_kind="latents")
    assert cli.main(["generate", "--net", str(path), "--seeds", "0-2", "--steps", "2", "--no-decode",
                     "--outdir", str(tmp_path / "o")]) == 0
    z = np.load(tmp_path / "o" / "latents.npy")
    assert z.shape == (3, 4, 8, 8) and z.dtype == np.float32
    assert "raw latents" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- evaluate

def test_frechet_distance_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.3
    mu1, s1 = evaluate.feature_statistics(a)
    mu2, s2 = evaluate.feature_statistics(b)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert evaluate.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError):
        evaluate.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_classifier_is_accurate_on_real_digits_and_cached(classifier):
    model, cache = classifier
    assert model.heldout_accuracy > 0.93
    again = evaluate.load_classifier(cache)
    assert again is model  # memoized; the file is there too
    assert any(f.startswith("digits-classifier") for f in os.listdir(cache))


def test_metrics_sanity_real_vs_noise(classifier):
    model, _ = classifier
    x16, y = evaluate.real_digits(16)
    x32, _ = evaluate.real_digits(32)
    assert x16.shape == (1797, 1, 16, 16) and float(x16.min()) >= -1 and float(x16.max()) <= 1
    assert evaluate.accuracy(model, x16, y) > 0.95
    assert evaluate.accuracy(model, x32, y) > 0.93  # 32 px images are pooled to 16
    half = torch.arange(len(y)) % 2 == 0
    real = evaluate.evaluate_samples(x16[half], y[half], model=model)
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(500, 1, 16, 16, generator=gen) * 2 - 1
    labels = torch.arange(500) % 10
    fake = evaluate.evaluate_samples(noise, labels, model=model)
    assert real["accuracy"] > 0.95 and fake["accuracy"] < 0.3
    assert real["fd"] < 0.05 * fake["fd"]
    shifted = evaluate.evaluate_samples(torch.roll(x16[half], 3, dims=-1), y[half], model=model)
    assert real["fd"] < shifted["fd"] < fake["fd"]  # a degraded copy sits in between


def test_eval_command_on_generated_samples(net_file, classifier, tmp_path, capsys):
    _, cache = classifier
    out = tmp_path / "s"
    assert cli.main(["generate", "--net", str(net_file), "--seeds", "0-9", "--class", "cycle", "--steps", "2",
                     "--outdir", str(out)]) == 0
    js = tmp_path / "m.json"
    assert cli.main(["eval", "--samples", str(out), "--cache", cache, "--json", str(js)]) == 0
    m = json.load(open(js))
    assert m["num"] == 10 and 0 <= m["accuracy"] <= 1 and m["fd"] > 0
    # --net samples the same seeds (0-9, classes cycling) itself: same numbers.
    js2 = tmp_path / "m2.json"
    assert cli.main(["eval", "--net", str(net_file), "--num", "10", "--steps", "2", "--cache", cache,
                     "--json", str(js2)]) == 0
    m2 = json.load(open(js2))
    # (the PNGs are rounded to 8 bits, so the numbers agree only closely)
    assert abs(m2["accuracy"] - m["accuracy"]) <= 0.1 and m2["fd"] == pytest.approx(m["fd"], rel=0.05)
    assert "class accuracy" in capsys.readouterr().out
