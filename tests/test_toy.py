"""The 2D guidance demo (`edm2fast toy`): data, denoiser, training, guided sampling and the plot, at a small size."""

from __future__ import annotations

import os

import pytest
import torch

from edm2fast import cli, toy


def test_data_is_two_classes_on_branches():
    g = torch.Generator().manual_seed(0)
    x, cls = toy.sample_data(4000, g)
    assert x.shape == (4000, 2) and set(cls.tolist()) == {0, 1}
    # Class 0 grows to the left, class 1 to the right (mirrored trees).
    assert x[cls == 0, 0].mean() < -0.3 < 0.3 < x[cls == 1, 0].mean()
    only1, c1 = toy.sample_data(100, g, classes=1)
    assert (c1 == 1).all() and only1.shape == (100, 2)
    with pytest.raises(ValueError, match="n:"):
        toy.sample_data(0)


def test_denoiser_preconditioning_limits():
    torch.manual_seed(0)
    net = toy.ToyDenoiser(hidden=8, label_dim=2)
    x = torch.randn(5, 2)
    labels = torch.eye(2)[[0, 1, 0, 1, 0]]
    # sigma -> 0: c_skip -> 1, c_out -> 0, so D(x) -> x (EDM preconditioning).
    torch.testing.assert_close(net(x, torch.full([5], 1e-6), labels), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="labels"):
        net(x, torch.ones(5))


def test_train_plot_and_guidance_changes_samples(tmp_path, capsys):
    assert cli.main(["toy", "train", "--outdir", str(tmp_path), "--iters", "40", "--batch", "128"]) == 0
    nets = toy.load_models(str(tmp_path))
    assert set(nets) == {"main", "uncond", "guide"}
    assert nets["guide"].hidden < nets["main"].hidden and nets["uncond"].label_dim == 0
    plain = toy.sample(nets["main"], 64, 0, num_steps=8)
    same = toy.sample(nets["main"], 64, 0, nets["guide"], 1.0, num_steps=8)
    cfg = toy.sample(nets["main"], 64, 0, nets["uncond"], 3.0, num_steps=8)
    auto = toy.sample(nets["main"], 64, 0, nets["guide"], 3.0, num_steps=8)
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, cfg) and not torch.allclose(plain, auto) and not torch.allclose(cfg, auto)
    assert cli.main(["toy", "plot", "--outdir", str(tmp_path), "--num", "200"]) == 0
    png = tmp_path / "toy-guidance.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10000
    assert cli.main(["toy", "plot", "--outdir", str(tmp_path / "empty")]) == 2  # nothing trained there
    assert "toy train" in capsys.readouterr().err
