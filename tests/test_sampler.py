"""EDM sampler (spec §8)."""

import math

import pytest
import torch

from edm2fast import sampler

SD = 0.5


class GaussianOracle(torch.nn.Module):
    """Exact denoiser for data ~ N(0, sd^2): D(x, sigma) = x * sd^2 / (sigma^2 + sd^2)."""

    def __init__(self, sd=SD, scale=1.0):
        super().__init__()
        self.sd, self.scale, self.calls = sd, scale, 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        assert sigma.shape == (x.shape[0],) + (1,) * (x.ndim - 1)
        return self.scale * x * self.sd ** 2 / (sigma ** 2 + self.sd ** 2)


class MustNotBeCalled(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError('gnet was called')


def test_sigma_steps_endpoints_and_formula():
    t = sampler.sigma_steps(32, 0.002, 80, 7)
    assert t.shape == (33,) and t.dtype == torch.float64
    assert t[0].item() == 80.0 and t[31].item() == 0.002 and t[32].item() == 0.0
    assert torch.all(t[1:] < t[:-1])
    i = 10
    expected = (80 ** (1 / 7) + i / 31 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t[i].item() == pytest.approx(expected, rel=1e-12)
    assert sampler.sigma_steps(1, 0.002, 80, 7).tolist() == [80.0, 0.0]


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_steps=0), 'num_steps'), (dict(num_steps=2.5), 'num_steps'),
    (dict(sigma_min=1.0, sigma_max=0.5), 'sigma_max'), (dict(sigma_min=0.0), 'sigma_min'),
    (dict(rho=0), 'rho'),
])
def test_sampler_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sampler.edm_sampler(GaussianOracle(), torch.randn(2, 1), **kwargs)


def test_guidance_without_gnet_is_an_error():
    with pytest.raises(ValueError, match='gnet'):
        sampler.edm_sampler(GaussianOracle(), torch.randn(2, 1), guidance=2.0)


def _exact_ode_solution(noise, sigma_max, sd=SD):
    # dx/dsigma = (x - D) / sigma = x sigma / (sigma^2 + sd^2)  =>  x ~ sqrt(sigma^2 + sd^2)
    return noise.double() * sigma_max * sd / math.sqrt(sigma_max ** 2 + sd ** 2)


def test_heun_integrates_gaussian_oracle_ode():
    noise = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    exact = _exact_ode_solution(noise, 80.0)
    errors = {}
    for n in (16, 32, 64):
        x = sampler.edm_sampler(GaussianOracle(), noise, num_steps=n, dtype=torch.float64)
        assert x.dtype == torch.float64 and x.shape == noise.shape
        errors[n] = ((x - exact).abs().max() / exact.abs().max()).item()
    # The rho=7 schedule is coarse around sigma ~ sd for this ODE: ~1.6% at 32 steps.
    assert errors[32] < 0.025
    assert errors[64] < errors[32] / 3 < errors[16] / 9  # second order: ~4x per halving
    x = sampler.edm_sampler(GaussianOracle(), noise, num_steps=32)
    assert x.dtype == torch.float32
    assert abs(x.std().item() / (SD * noise.std().item()) - 1) < 0.025
    assert abs(x.std().item() - SD) < 0.05 * SD


def test_network_evaluation_count():
    net = GaussianOracle()
    sampler.edm_sampler(net, torch.randn(3, 2), num_steps=5)
    assert net.calls == 2 * 5 - 1


def test_stochastic_sampling_keeps_the_data_distribution():
    rnd = sampler.StackedRandomGenerator('cpu', range(2000))
    noise = rnd.randn([2000, 1])
    x = sampler.edm_sampler(GaussianOracle(), noise, num_steps=64, S_churn=20, S_min=0.05,
                            S_max=50, randn_like=rnd.randn_like)
    assert abs(x.std().item() - SD) < 0.06 * SD
    assert abs(x.mean().item()) < 0.05
    # Churn really changed the samples.
    y = sampler.edm_sampler(GaussianOracle(), noise, num_steps=64)
    assert (x - y).abs().max() > 0.05


def test_deterministic_for_fixed_seeds():
    def run(seeds):
        rnd = sampler.StackedRandomGenerator('cpu', seeds)
        return sampler.edm_sampler(GaussianOracle(), rnd.randn([3, 2, 4, 4]), num_steps=6,
                                   S_churn=10, randn_like=rnd.randn_like)
    a, b = run([3, 1, 4]), run([3, 1, 4])
    assert torch.equal(a, b)
    c = run([3, 1, 5])
    assert torch.equal(a[:2], c[:2]) and not torch.allclose(a[2], c[2])


def test_image_does_not_depend_on_batch_composition():
    seeds = [11, 22, 33, 44]
    shape = [2, 4, 4]
    kwargs = dict(num_steps=6, S_churn=20, dtype=torch.float64)
    rnd = sampler.StackedRandomGenerator('cpu', seeds)
    batch = sampler.edm_sampler(GaussianOracle(), rnd.randn([4] + shape, dtype=torch.float64),
                                randn_like=rnd.randn_like, **kwargs)
    for k, seed in enumerate(seeds):
        one = sampler.StackedRandomGenerator('cpu', [seed])
        single = sampler.edm_sampler(GaussianOracle(), one.randn([1] + shape, dtype=torch.float64),
                                     randn_like=one.randn_like, **kwargs)
        torch.testing.assert_close(batch[k:k + 1], single, rtol=1e-12, atol=1e-12)
    # A different batch around the same seed: same image.
    rnd = sampler.StackedRandomGenerator('cpu', [99, 33])
    other = sampler.edm_sampler(GaussianOracle(), rnd.randn([2] + shape, dtype=torch.float64),
                                randn_like=rnd.randn_like, **kwargs)
    torch.testing.assert_close(other[1], batch[2], rtol=1e-12, atol=1e-12)


def test_stacked_random_generator_rows_and_validation():
    rnd = sampler.StackedRandomGenerator('cpu', [5, 6])
    x = rnd.randn([2, 3])
    torch.testing.assert_close(x[0], torch.randn(3, generator=torch.Generator().manual_seed(5)))
    labels = rnd.randint(0, 10, size=[2])
    assert labels.shape == (2,) and labels.dtype == torch.int64
    assert rnd.randn_like(torch.zeros(2, 4, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match='size'):
        rnd.randn([3, 3])


def test_guidance_one_is_no_guidance_and_skips_gnet():
    noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    ref = sampler.edm_sampler(GaussianOracle(), noise, num_steps=5)
    out = sampler.edm_sampler(GaussianOracle(), noise, gnet=MustNotBeCalled(), guidance=1,
                              num_steps=5)
    assert torch.equal(ref, out)


def test_guidance_combines_both_networks():
    # D_main = 1.0 * oracle, D_g = 0.8 * oracle  =>  guided = (0.8 + w (1.0 - 0.8)) * oracle.
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    w = 2.5
    labels = torch.arange(16)
    net, gnet = GaussianOracle(), GaussianOracle(scale=0.8)
    seen = []
    orig = gnet.forward
    gnet.forward = lambda x, sigma, lab=None: (seen.append(lab), orig(x, sigma, lab))[1]
    guided = sampler.edm_sampler(net, noise, labels, gnet=gnet, guidance=w, num_steps=5,
                                 dtype=torch.float64)
    equivalent = sampler.edm_sampler(GaussianOracle(scale=0.8 + w * 0.2), noise, num_steps=5,
                                     dtype=torch.float64)
    torch.testing.assert_close(guided, equivalent, rtol=1e-10, atol=1e-10)
    assert net.calls == 9 and len(seen) == 9 and all(s is labels for s in seen)
    unguided = sampler.edm_sampler(GaussianOracle(), noise, num_steps=5, dtype=torch.float64)
    assert (guided - unguided).abs().max() > 1e-3


def _release_rule_sampler(net, noise, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise,
                          randn_like):
    """The release's float32 sampler, restated step by step from its documented algorithm: noise levels
    computed as float32 tensors, churn and Heun steps on 0-d float32 tensors."""
    f32 = torch.float32
    idx = torch.arange(num_steps, dtype=f32)
    t = (sigma_max ** (1 / rho) + idx / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x = noise.to(f32) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        if S_churn > 0 and S_min <= t_cur <= S_max:  # temporary noise increase, only inside [S_min, S_max]
            t_hat = t_cur + min(S_churn / num_steps, math.sqrt(2) - 1) * t_cur
            x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
        else:
            t_hat, x_hat = t_cur, x
        d = (x_hat - net(x_hat, t_hat.repeat(x.shape[0], 1, 1, 1)).to(f32)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if i < num_steps - 1:
            d2 = (x - net(x, t_next.repeat(x.shape[0], 1, 1, 1)).to(f32)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    return x


@pytest.mark.parametrize('churn', [0.0, 30.0])
def test_float32_path_matches_the_release_rule_bit_for_bit(churn):
    """Same seeds, same images: the default float32 path must reproduce the release's arithmetic exactly."""
    def noise_and_rng():
        rnd = sampler.StackedRandomGenerator('cpu', [3, 17, 2**32 + 5])
        return rnd.randn([3, 2, 4, 4]), rnd
    kw = dict(num_steps=7, sigma_min=0.002, sigma_max=80, rho=7, S_churn=churn, S_min=0.01, S_max=10, S_noise=1.003)
    noise, rnd = noise_and_rng()
    ours = sampler.edm_sampler(GaussianOracle(), noise, randn_like=rnd.randn_like, **kw)
    noise, rnd = noise_and_rng()
    want = _release_rule_sampler(GaussianOracle(), noise, randn_like=rnd.randn_like, **kw)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, want), (ours - want).abs().max()
