"""edm2fast.vae: the release's encode/decode conventions (spec §5, §9) with a tiny random AutoencoderKL.

Nothing is downloaded: the VAE is built from a small config, saved with ``save_pretrained``
and loaded back through ``vae.load_vae(folder)`` as users load the real one.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from edm2fast import data, vae

# The spec's constants, written out here on purpose (not imported): spec §5 Data line and §9.
SPEC_RAW_MEAN = [5.81, 3.25, 0.12, -2.15]
SPEC_RAW_STD = [4.17, 4.62, 3.71, 3.28]
SPEC_FINAL_STD = 0.5


def make_tiny_autoencoder(seed: int = 0):
    """A 44k-parameter AutoencoderKL (downsampling 2, 4 latent channels) with random weights."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16)
    with torch.no_grad():  # centre the decoder's output in [0, 1] so decoded pixels are not all clamped
        model.decoder.conv_out.bias.fill_(0.5)
        model.decoder.conv_out.weight.mul_(0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vae")
    make_tiny_autoencoder().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_vae_dir):
    return vae.load_vae(tiny_vae_dir, device="cpu", batch_size=3)


def images(n=5, h=8, w=12, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(n, 3, h, w), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------

def test_scaling_constants_are_the_spec():
    assert list(data.LATENT_RAW_MEAN) == SPEC_RAW_MEAN
    assert list(data.LATENT_RAW_STD) == SPEC_RAW_STD
    assert data.LATENT_SCALE == SPEC_FINAL_STD
    assert vae.DEFAULT_VAE == "stabilityai/sd-vae-ft-mse"
    x = torch.randn(2, 4, 3, 5)
    expected = x / SPEC_FINAL_STD * torch.tensor(SPEC_RAW_STD).reshape(1, 4, 1, 1) + \
        torch.tensor(SPEC_RAW_MEAN).reshape(1, 4, 1, 1)
    from edm2fast.commands import generate
    torch.testing.assert_close(generate.latents_to_vae_scale(x), expected, rtol=0, atol=1e-6)


def test_load_from_folder(tiny, tiny_vae_dir):
    assert isinstance(tiny, vae.VAE)
    assert tiny.downsample == 2 and tiny.latent_channels == 4 and tiny.device.type == "cpu"
    assert tiny.dtype == torch.float32 and not tiny.model.training
    assert str(tiny_vae_dir) in repr(tiny)


def test_encode_feeds_pixels_over_255_and_returns_mean_and_std(tiny):
    x = images(5)
    mean, std = tiny.encode(x)  # batch_size 3: two batches
    assert mean.shape == std.shape == (5, 4, 4, 6) and mean.dtype == std.dtype == torch.float32
    with torch.no_grad():
        dist = tiny.model.encode(x.to(torch.float32) / 255).latent_dist  # [0, 1], not [-1, 1]
    torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, dist.std, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        wrong = tiny.model.encode(x.to(torch.float32) / 127.5 - 1).latent_dist.mean
    assert (wrong - mean).abs().max() > 1e-2  # the test would notice the [-1, 1] convention
    # numpy input, one image per call: same result; deterministic
    m2, s2 = tiny.encode(x.numpy(), batch_size=1)
    torch.testing.assert_close(m2, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, std, rtol=1e-5, atol=1e-5)


def test_decode_inverts_scaling_and_truncates_like_the_release(tiny):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 4, 5, 3, generator=g) * 0.5
    out = tiny.decode(latents)
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 10, 6)
    raw = latents / SPEC_FINAL_STD * torch.tensor(SPEC_RAW_STD).reshape(1, 4, 1, 1) + \
        torch.tensor(SPEC_RAW_MEAN).reshape(1, 4, 1, 1)
    with torch.no_grad():
        y = tiny.model.decode(raw).sample
    expected = (y.clamp(0, 1) * 255).to(torch.uint8)  # truncation, as the release does
    diff = (out.to(torch.int16) - expected.to(torch.int16)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float reduction order only
    assert 0 < out.float().mean() < 255  # not everything clamped
    torch.testing.assert_close(tiny.decode_raw(raw), out, rtol=0, atol=1)


def test_sample_latents_is_the_spec_draw_and_deterministic(tiny):
    mean, std = tiny.encode(images(2))
    a = tiny.sample_latents(mean, std, torch.Generator().manual_seed(7))
    b = tiny.sample_latents(mean, std, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    expected = (mean + eps * std - torch.tensor(SPEC_RAW_MEAN).reshape(1, 4, 1, 1)) / \
        torch.tensor(SPEC_RAW_STD).reshape(1, 4, 1, 1) * SPEC_FINAL_STD
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="std"):
        tiny.sample_latents(mean, std[:1])


def test_bad_inputs_name_the_argument(tiny):
    with pytest.raises(TypeError, match="images: expected uint8"):
        tiny.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="images: expected RGB"):
        tiny.encode(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images: height and width must be multiples of 2"):
        tiny.encode(torch.zeros(1, 3, 7, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="images"):
        tiny.encode([1, 2, 3])
    with pytest.raises(TypeError, match="latents: expected floating-point"):
        tiny.decode(torch.zeros(1, 4, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="latents"):
        tiny.decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="z: expected 4 latent channels"):
        tiny.decode_raw(torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        tiny.encode(images(1), batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        vae.VAE(tiny.model, "cpu", dtype="fp8")


def test_bf16_vae_runs(tiny_vae_dir):
    v = vae.load_vae(str(tiny_vae_dir), device="cpu", dtype="bf16")
    assert next(v.model.parameters()).dtype == torch.bfloat16
    mean, std = v.encode(images(2))
    assert mean.dtype == torch.float32 and torch.isfinite(mean).all() and (std > 0).all()
    assert v.decode(torch.zeros(2, 4, 3, 3)).shape == (2, 3, 6, 6)


def test_missing_weights_never_download_and_say_what_to_do(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only already forbids it
    monkeypatch.delenv("EDM2FAST_ALLOW_DOWNLOAD", raising=False)
    for name in ["someone/not-cached-vae", "https://huggingface.co/someone/not-cached-vae"]:
        with pytest.raises(FileNotFoundError) as exc:
            vae.load_vae(name, device="cpu")
        msg = str(exc.value)
        assert "someone/not-cached-vae" in msg and "--download" in msg and "--vae DIR" in msg
    with pytest.raises(FileNotFoundError, match="no such folder"):
        vae.load_vae(str(tmp_path / "a" / "b" / "c"), device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        vae.load_vae(tmp_path, device="cpu")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        vae.load_vae(tmp_path / "weights.bin", device="cpu")
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="cannot load"):  # no safetensors weights (pickles are refused)
        vae.load_vae(tmp_path, device="cpu")


def test_without_diffusers_one_clear_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'mpkernels\[latent\]'"):
        vae.load_vae(tmp_path)
    from edm2fast import cli
    src = tmp_path / "imgs"
    src.mkdir()
    assert cli.main(["dataset", "encode", "--source", str(src), "--dest", str(tmp_path / "lat.zip"),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edm2fast dataset: error:") and "diffusers" in err and "\n" not in err
