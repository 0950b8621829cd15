"""Power-function EMA and post-hoc reconstruction (spec §7; paper Section 3, Appendix C)."""

import io
import math
import sys
import types

import numpy as np
import pytest
import torch

from edm2fast import phema


def _trapezoid(y, x):
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


# ----------------------------------------------------------------------------- std <-> exp

def test_std_to_exp_known_values():
    # Paper: sigma_rel 0.05 <-> gamma ~ 16.97, sigma_rel 0.10 <-> gamma ~ 6.94.
    assert phema.std_to_exp(0.05) == pytest.approx(16.9722, abs=1e-3)
    assert phema.std_to_exp(0.10) == pytest.approx(6.9372, abs=1e-3)
    assert isinstance(phema.std_to_exp(0.05), float)
    assert isinstance(phema.exp_to_std(7.0), float)


def test_std_exp_round_trip_over_grid():
    stds = np.linspace(0.005, 0.28, 56).reshape(7, 8)
    gammas = phema.std_to_exp(stds)
    assert isinstance(gammas, np.ndarray) and gammas.shape == stds.shape
    assert np.all(gammas > 0)
    np.testing.assert_allclose(phema.exp_to_std(gammas), stds, rtol=1e-12)
    # The root satisfies the cubic of spec §7.
    c = stds ** -2.0
    residual = gammas ** 3 + 7 * gammas ** 2 + (16 - c) * gammas + (12 - c)
    assert np.max(np.abs(residual / c / gammas)) < 1e-12
    g = np.array([0.01, 0.5, 3.0, 10.0, 100.0, 1000.0])
    np.testing.assert_allclose(phema.std_to_exp(phema.exp_to_std(g)), g, rtol=1e-9)


def test_exp_to_std_is_the_relative_std_of_the_profile():
    gamma, t = 5.0, 3.0
    tau = np.linspace(0, t, 200001)
    p = phema.profile(t, gamma, tau)
    assert _trapezoid(p, tau) == pytest.approx(1.0, abs=1e-8)
    mean = _trapezoid(p * tau, tau)
    std = math.sqrt(_trapezoid(p * (tau - mean) ** 2, tau))
    assert std / t == pytest.approx(phema.exp_to_std(gamma), rel=1e-6)


@pytest.mark.parametrize('bad', [0.0, -0.1, math.sqrt(1 / 12), 0.3, float('nan'), [0.05, 0.5]])
def test_std_to_exp_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match='sigma_rel'):
        phema.std_to_exp(bad)


def test_exp_to_std_rejects_bad_gamma():
    with pytest.raises(ValueError, match='gamma'):
        phema.exp_to_std(-1.0)


# ----------------------------------------------------------------------------- beta, profiles

def test_power_function_beta_matches_formula():
    for std in (0.05, 0.1, 0.2):
        gamma = phema.std_to_exp(std)
        for t_next, dt in ((2048, 2048), (4096, 2048), (1e6, 2048), (37.0, 3.0)):
            expected = (1 - dt / t_next) ** (gamma + 1)
            assert phema.power_function_beta(std, t_next, dt) == pytest.approx(expected, rel=1e-12)
    assert phema.power_function_beta(0.05, 2048, 2048) == 0.0  # first step copies the net
    ts = np.array([10.0, 20.0, 40.0])
    np.testing.assert_allclose(phema.power_function_beta(0.1, ts, 10.0),
                               (1 - 10.0 / ts) ** (phema.std_to_exp(0.1) + 1))
    with pytest.raises(ValueError, match='t_delta'):
        phema.power_function_beta(0.1, 10, 20)
    with pytest.raises(ValueError, match='t_next'):
        phema.power_function_beta(0.1, 0, 0)


@pytest.mark.parametrize('t_a, g_a, t_b, g_b', [
    (3.0, 5.0, 7.0, 2.0), (7.0, 2.0, 3.0, 5.0), (5.0, 16.97, 5.0, 6.94), (1.0, 0.5, 1.5, 30.0),
])
def test_inner_product_matches_numerical_integration(t_a, g_a, t_b, g_b):
    tau = np.linspace(0, min(t_a, t_b), 400001)
    numeric = _trapezoid(phema.profile(t_a, g_a, tau) * phema.profile(t_b, g_b, tau), tau)
    assert phema.inner_product(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-6)
    assert phema.inner_product(t_a, g_a, t_b, g_b) == pytest.approx(
        phema.inner_product(t_b, g_b, t_a, g_a), rel=1e-12)


def test_profile_is_zero_outside_support():
    p = phema.profile(2.0, 3.0, np.array([-1.0, 0.0, 1.0, 2.0, 2.5]))
    np.testing.assert_allclose(p, [0.0, 0.0, 4 * 1 / 16, 4 * 8 / 16, 0.0])


# ----------------------------------------------------------------------------- solve

def _residual_sq(x, in_ofs, in_g, out_ofs, out_g):
    """|| sum_i x_i p_i - p_o ||^2 in closed form from inner products."""
    A = phema.inner_product(in_ofs[:, None], in_g[:, None], in_ofs[None], in_g[None])
    b = phema.inner_product(in_ofs, in_g, out_ofs, out_g)
    c = phema.inner_product(out_ofs, out_g, out_ofs, out_g)
    return float(x @ A @ x - 2 * x @ b + c), float(c)


def test_solve_posthoc_coefficients_approximates_target_profile():
    in_ofs = np.repeat(np.arange(1, 11) * 100.0, 2)
    in_std = np.tile([0.05, 0.10], 10)
    out_ofs, out_std = np.array([1000.0, 1000.0, 800.0]), np.array([0.07, 0.15, 0.12])
    X = phema.solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std)
    assert X.shape == (20, 3) and X.dtype == np.float64
    np.testing.assert_allclose(X.sum(axis=0), 1.0, rtol=1e-12)
    in_g = phema.std_to_exp(in_std)
    for j in range(3):
        out_g = phema.std_to_exp(out_std[j])
        res, norm = _residual_sq(X[:, j], in_ofs, in_g, out_ofs[j], out_g)
        single = [_residual_sq(np.eye(20)[i], in_ofs, in_g, out_ofs[j], out_g)[0] for i in range(20)]
        assert res < 1e-3 * norm
        assert res < 0.01 * min(single)
        # The same on a grid, as functions.
        tau = np.linspace(0, out_ofs[j], 20001)
        recon = sum(X[i, j] * phema.profile(in_ofs[i], in_g[i], tau) for i in range(20))
        target = phema.profile(out_ofs[j], out_g, tau)
        assert np.max(np.abs(recon - target)) < 0.05 * target.max()


def test_solve_posthoc_coefficients_identity_and_scale_invariance():
    in_ofs, in_std = [100.0, 200.0, 200.0], [0.1, 0.05, 0.1]
    X = phema.solve_posthoc_coefficients(in_ofs, in_std, 200.0, 0.1)  # an input itself
    np.testing.assert_allclose(X[:, 0], [0.0, 0.0, 1.0], atol=1e-9)
    Y = phema.solve_posthoc_coefficients(np.array(in_ofs) * 8192, in_std, 200.0 * 8192, [0.1])
    np.testing.assert_allclose(X, Y, atol=1e-9)
    # One std for every offset broadcasts.
    Z = phema.solve_posthoc_coefficients([100, 200, 300], 0.05, [300, 250], [0.08, 0.08])
    assert Z.shape == (3, 2)


@pytest.mark.parametrize('args, name', [
    (([100, 200], [0.1, 0.1, 0.1], 200, 0.1), 'in_ofs'),
    (([100, -200], 0.1, 200, 0.1), 'in_ofs'),
    (([100, 200], 0.1, 200, 0.5), 'out_std'),
    (([100, 200], 0.1, 0, 0.1), 'out_ofs'),
])
def test_solve_posthoc_coefficients_rejects_bad_input(args, name):
    with pytest.raises(ValueError, match=name):
        phema.solve_posthoc_coefficients(*args)


def test_posthoc_reconstruction_of_synthetic_trajectory():
    """Track EMAs of a random parameter trajectory, snapshot them, rebuild another std."""
    rng = np.random.default_rng(0)
    n, bs, dim = 3000, 8, 32
    traj = np.cumsum(rng.standard_normal((n, dim)), axis=0) / math.sqrt(n)
    traj += np.sin(np.linspace(0, 6, n)[:, None] * rng.uniform(0.5, 3, dim) + rng.uniform(0, 6, dim))
    tracked, targets = [0.05, 0.10], [0.03, 0.075, 0.15, 0.2]
    stds = tracked + targets
    t = np.arange(1, n + 1) * bs
    betas = np.stack([phema.power_function_beta(s, t, bs) for s in stds])  # [len(stds), n]
    ema = np.zeros((len(stds), dim))
    snaps, snap_ofs, snap_std = [], [], []
    for k in range(n):
        ema += (1 - betas[:, k, None]) * (traj[k] - ema)
        if (k + 1) % 150 == 0:
            for j, s in enumerate(tracked):
                snaps.append(ema[j].copy())
                snap_ofs.append(t[k])
                snap_std.append(s)
    X = phema.solve_posthoc_coefficients(snap_ofs, snap_std, [t[-1]] * len(targets), targets)
    rebuilt = X.T @ np.array(snaps)
    for j, s in enumerate(targets):
        direct = ema[len(tracked) + j]
        err = np.linalg.norm(rebuilt[j] - direct) / np.linalg.norm(direct)
        assert err < 1e-2, (s, err)
    # A different std really is different (the test is not trivially satisfied).
    assert np.linalg.norm(ema[0] - ema[1]) / np.linalg.norm(ema[1]) > 5e-2


# ----------------------------------------------------------------------------- PowerFunctionEMA

def _loop_ema_lerp_(ema_tensors, tensors, weight):
    for e, t in zip(ema_tensors, tensors):
        e.add_(t - e, alpha=weight)


@pytest.fixture
def ema_lerp_calls(monkeypatch):
    """Count calls of mpkernels.ema_lerp_; install a loop version if it does not exist yet."""
    try:
        import mpkernels as mk
    except ImportError:
        mk = types.ModuleType('mpkernels')
        monkeypatch.setitem(sys.modules, 'mpkernels', mk)
    impl = getattr(mk, 'ema_lerp_', None) or _loop_ema_lerp_
    calls = []

    def spy(ema_tensors, tensors, weight):
        calls.append((len(ema_tensors), float(weight)))
        return impl(ema_tensors, tensors, weight)

    monkeypatch.setattr(mk, 'ema_lerp_', spy, raising=False)
    return calls


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.gain = torch.nn.Parameter(torch.tensor(0.5))
        self.register_buffer('stat', torch.zeros(2))

    def forward(self, x):
        return self.lin(x) * self.gain + self.stat


def test_power_function_ema_update_matches_manual_lerp(ema_lerp_calls):
    torch.manual_seed(0)
    net = TinyNet()
    pf = phema.PowerFunctionEMA(net, stds=(0.05, 0.10))
    assert len(pf.emas) == 2
    for ema in pf.emas:
        assert not ema.training
        assert all(not p.requires_grad for p in ema.parameters())
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.parameters(), net.parameters()))
    assert [s for _, s in pf.get()] == ['-0.050', '-0.100']
    assert [e for e, _ in pf.get()] == pf.emas

    bs = 4
    manual = [[p.detach().clone() for p in net.parameters()] for _ in pf.stds]
    for step in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.stat.fill_(step)
        pf.update(step * bs, bs)
        for k, std in enumerate(pf.stds):
            beta = (1 - bs / (step * bs)) ** (phema.std_to_exp(std) + 1)
            manual[k] = [m + (1 - beta) * (p.detach() - m) for m, p in zip(manual[k], net.parameters())]
    assert len(ema_lerp_calls) == 5 * 2  # one multi-tensor call per EMA per step
    assert all(n == 3 for n, _ in ema_lerp_calls)
    assert ema_lerp_calls[0][1] == 1.0  # first step: beta = 0
    for k, ema in enumerate(pf.emas):
        for m, e in zip(manual[k], ema.parameters()):
            torch.testing.assert_close(e, m, rtol=1e-6, atol=1e-6)
        assert torch.equal(ema.stat, net.stat)
    # The two EMAs differ, and neither equals the net.
    assert not torch.allclose(pf.emas[0].lin.weight, pf.emas[1].lin.weight)
    assert not torch.allclose(pf.emas[1].lin.weight, net.lin.weight)


def test_power_function_ema_reset_and_state_dict_round_trip(ema_lerp_calls, tmp_path):
    torch.manual_seed(1)
    net = TinyNet()
    pf = phema.PowerFunctionEMA(net, stds=(0.05, 0.10))
    with torch.no_grad():
        net.lin.weight.mul_(3)
        net.stat.fill_(2)
    pf.reset()
    for ema in pf.emas:
        assert torch.equal(ema.lin.weight, net.lin.weight) and torch.equal(ema.stat, net.stat)
    pf.update(8, 4)
    with torch.no_grad():
        net.lin.weight.add_(1)
    pf.update(12, 4)

    state = pf.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert {'stds', 'emas.0.lin.weight', 'emas.1.stat'} <= set(state)

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = phema.PowerFunctionEMA(TinyNet(), stds=(0.05, 0.10))
    other.load_state_dict(loaded)
    for a, b in zip(pf.emas, other.emas):
        for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(ta, tb)

    st = pytest.importorskip('safetensors.torch')
    path = tmp_path / 'ema.safetensors'
    st.save_file(state, str(path))
    third = phema.PowerFunctionEMA(TinyNet(), stds=(0.05, 0.10))
    third.load_state_dict(st.load_file(str(path)))
    assert torch.equal(third.emas[1].lin.weight, pf.emas[1].lin.weight)

    with pytest.raises(ValueError, match='stds'):
        phema.PowerFunctionEMA(TinyNet(), stds=(0.05, 0.20)).load_state_dict(loaded)


def test_power_function_ema_rejects_bad_stds():
    with pytest.raises(ValueError, match='stds'):
        phema.PowerFunctionEMA(TinyNet(), stds=(0.05, 0.4))
