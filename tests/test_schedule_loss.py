"""Learning-rate schedule (spec §6) and EDM2 loss (spec §6, paper Eqs. 14-21)."""

import math

import numpy as np
import pytest
import torch

from edm2fast import loss, schedule


# ----------------------------------------------------------------------------- schedule

@pytest.mark.parametrize('cur_nimg, kwargs, expected', [
    # ramp-up: t << t_ref, so only the linear warm-up acts
    (0, dict(), 0.0),
    (5e6, dict(ref_lr=0.01), 0.005),                    # half of the 10 Mimg ramp
    (2.5e6, dict(ref_lr=0.012, rampup_Mimg=5), 0.006),
    # plateau: ramp finished, t < t_ref
    (10e6, dict(ref_lr=0.01), 0.01),
    (2048 * 70000, dict(ref_lr=0.01), 0.01),            # exactly t = t_ref
    # decay: t = 4 t_ref -> lr / 2; t = 9 t_ref -> lr / 3
    (2048 * 280000, dict(ref_lr=0.01), 0.005),
    (2048 * 630000, dict(ref_lr=0.009), 0.003),
    (2048 * 35000 * 16, dict(ref_lr=0.01, ref_batches=35000), 0.0025),
    # no ramp-up
    (0, dict(ref_lr=0.017, rampup_Mimg=0), 0.017),
])
def test_learning_rate_values(cur_nimg, kwargs, expected):
    lr = schedule.learning_rate(cur_nimg, 2048, **kwargs)
    assert isinstance(lr, float)
    assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_learning_rate_default_ref_lr_and_ramp_with_decay():
    assert schedule.learning_rate(20e6, 2048) == pytest.approx(100e-4)
    # Both factors at once: small batch, so decay already during the ramp.
    # t = 1e6 / 4 = 250000 = 4 * t_ref(62500) -> /2; ramp 1e6 / 2e6 -> * 0.5
    lr = schedule.learning_rate(1e6, 4, ref_lr=1.0, ref_batches=62500, rampup_Mimg=2)
    assert lr == pytest.approx(0.25)


@pytest.mark.parametrize('kwargs, name', [
    (dict(cur_nimg=-1, batch_size=8), 'cur_nimg'),
    (dict(cur_nimg=0, batch_size=0), 'batch_size'),
    (dict(cur_nimg=0, batch_size=-8), 'batch_size'),
    (dict(cur_nimg=0, batch_size=8, ref_lr=-1e-3), 'ref_lr'),
    (dict(cur_nimg=0, batch_size=8, ref_batches=0), 'ref_batches'),
    (dict(cur_nimg=0, batch_size=8, rampup_Mimg=-1), 'rampup_Mimg'),
    (dict(cur_nimg=float('nan'), batch_size=8), 'cur_nimg'),
])
def test_learning_rate_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        schedule.learning_rate(**kwargs)


# ----------------------------------------------------------------------------- loss

class StandInNet(torch.nn.Module):
    """D = c * x + bias (elementwise), logvar = a + b * log(sigma): enough to test the formula."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(0.7))
        self.bias = torch.nn.Parameter(torch.tensor(0.1))
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.2))
        self.calls = []

    def forward(self, x, sigma, labels=None, return_logvar=False):
        self.calls.append((x.detach().clone(), sigma.detach().clone(), labels, return_logvar))
        D = self.c * x + self.bias
        logvar = (self.a + self.b * sigma.log()).reshape(-1, 1, 1, 1)
        return (D, logvar) if return_logvar else D


@pytest.mark.parametrize('P_mean, P_std', [(-0.4, 1.0), (-0.8, 1.6)])
def test_edm2_loss_matches_formula_in_float64(P_mean, P_std):
    sd = 0.5
    images = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.eye(5)
    net = StandInNet()
    out = loss.EDM2Loss(P_mean=P_mean, P_std=P_std, sigma_data=sd)(
        net, images, labels, generator=torch.Generator().manual_seed(123))
    assert out.shape == images.shape and out.dtype == torch.float32

    # Redraw the same randoms independently: per-sample normals first, then the noise.
    g = torch.Generator().manual_seed(123)
    n = torch.randn(5, 1, 1, 1, generator=g).double()
    eps = torch.randn(images.shape, generator=g).double()
    y = images.double()
    sigma = torch.exp(P_mean + P_std * n)
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    x_noisy = y + eps * sigma
    D = 0.7 * x_noisy + 0.1
    u = 0.3 - 0.2 * torch.log(sigma)
    expected = weight / torch.exp(u) * (D - y) ** 2 + u

    x_seen, sigma_seen, labels_seen, flag = net.calls[0]
    assert flag is True and labels_seen is labels
    assert sigma_seen.shape == (5, 1, 1, 1)
    torch.testing.assert_close(sigma_seen.double(), sigma, rtol=1e-6, atol=0)
    torch.testing.assert_close(x_seen.double(), x_noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_edm2_loss_reproducible_with_generator_and_differentiable():
    images = torch.randn(3, 2, 2, 2)
    net = StandInNet()
    fn = loss.EDM2Loss()
    a = fn(net, images, generator=torch.Generator().manual_seed(7))
    b = fn(net, images, generator=torch.Generator().manual_seed(7))
    c = fn(net, images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    a.sum().backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs() > 0


def test_edm2_loss_sigma_distribution_is_log_normal():
    net = StandInNet()
    images = torch.zeros(4000, 1, 1, 1)
    loss.EDM2Loss(P_mean=-0.4, P_std=1.0)(net, images, generator=torch.Generator().manual_seed(0))
    log_sigma = net.calls[0][1].log().flatten().double()
    assert abs(log_sigma.mean().item() + 0.4) < 0.06
    assert abs(log_sigma.std().item() - 1.0) < 0.05


@pytest.mark.parametrize('kwargs, name', [
    (dict(P_std=-1.0), 'P_std'), (dict(sigma_data=0.0), 'sigma_data'),
    (dict(P_mean=float('nan')), 'P_mean'),
])
def test_edm2_loss_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        loss.EDM2Loss(**kwargs)
