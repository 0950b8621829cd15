"""EDM sampler: Heun's 2nd-order ODE solver with optional churn and guidance (spec §8).

Karras et al. 2022 (EDM) Algorithm 2 with the EDM2 defaults, plus guidance
`D(x) = D_g(x) + w (D_main(x) - D_g(x))` (classifier-free guidance or autoguidance).
"""

import math

import torch

__all__ = ['sigma_steps', 'edm_sampler', 'StackedRandomGenerator']


def _check_steps(num_steps, sigma_min, sigma_max, rho):
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}')
    sigma_min, sigma_max, rho = float(sigma_min), float(sigma_max), float(rho)
    if not (0 < sigma_min < math.inf):
        raise ValueError(f'sigma_min must be > 0 and finite, got {sigma_min}')
    if not (sigma_min < sigma_max < math.inf):
        raise ValueError(f'sigma_max must be finite and > sigma_min ({sigma_min}), got {sigma_max}')
    if not (0 < rho < math.inf):
        raise ValueError(f'rho must be > 0, got {rho}')
    return int(num_steps), sigma_min, sigma_max, rho


def sigma_steps(num_steps=32, sigma_min=0.002, sigma_max=80, rho=7):
    """Noise levels `t_0 > ... > t_{n-1}` and the final `t_n = 0` (spec §8, EDM Eq. 5).

        t_i = (smax^(1/rho) + i/(n-1) * (smin^(1/rho) - smax^(1/rho)))^rho,  i < n;  t_n = 0.

    Returns a float64 tensor of `num_steps + 1` values: `t_0 = sigma_max`,
    `t_{n-1} = sigma_min`, `t_n = 0`. With `num_steps == 1` it is `[sigma_max, 0]`.
    """
    num_steps, sigma_min, sigma_max, rho = _check_steps(num_steps, sigma_min, sigma_max, rho)
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t[0] = sigma_max  # exact endpoints despite the root/power round trip
    if num_steps > 1:
        t[-1] = sigma_min
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80,
                rho=7, guidance=1, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
                dtype=torch.float32, randn_like=torch.randn_like, eval_mode='auto'):
    """Generate samples from `noise` (spec §8).

    Args:
        net: main denoiser, called `net(x, sigma, labels)` -> denoised `D(x; sigma)`;
            `sigma` is a tensor of `dtype` shaped `[N, 1, ..., 1]` (like in `EDM2Loss`).
        noise: unit-variance normal noise `[N, ...]`; `x_0 = noise * t_0`.
        labels: passed to `net` and to `gnet`.
        gnet: guiding denoiser (unconditional net for CFG, or a weaker net for autoguidance);
            it receives `labels` too. Never called when `guidance == 1`.
        num_steps, sigma_min, sigma_max, rho: time discretization (`sigma_steps`);
            `2 * num_steps - 1` network evaluations (Heun except on the last step).
        guidance: `w` in `D = D_g + w (D_main - D_g)`; 1 means no guidance.
        S_churn, S_min, S_max, S_noise: stochastic churn (EDM Algorithm 2); off by default.
        dtype: dtype of the state `x` and of `sigma` given to the nets.
        randn_like: source of the churn noise; pass `StackedRandomGenerator.randn_like`
            to make each image depend on its own seed only.
        eval_mode: how the network evaluations run (`edm2fast.graphs.graphed_denoiser`):
            'auto' (one CUDA graph per batch shape on CUDA for eval-mode modules, else eager,
            noted once), 'eager', 'graph' or 'compile'. A replayed graph runs the eager
            kernels, so the images are the eager ones.

    Returns:
        the final `x_n` (`dtype`, shaped like `noise`).
    """
    num_steps, sigma_min, sigma_max, rho = _check_steps(num_steps, sigma_min, sigma_max, rho)
    guidance = float(guidance)
    if not math.isfinite(guidance):
        raise ValueError(f'guidance must be finite, got {guidance}')
    if gnet is None and guidance != 1:
        raise ValueError(f'guidance={guidance} needs a guiding network gnet (got None)')
    S_churn, S_noise = float(S_churn), float(S_noise)
    if not S_churn >= 0:
        raise ValueError(f'S_churn must be >= 0, got {S_churn}')
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1 or not noise.is_floating_point():
        raise ValueError('noise must be a floating-point tensor [N, ...]')
    use_guidance = gnet is not None and guidance != 1
    from .graphs import graphed_denoiser
    net = graphed_denoiser(net, noise.device, eval_mode)
    if use_guidance:
        gnet = graphed_denoiser(gnet, noise.device, eval_mode)
    sigma_shape = [noise.shape[0]] + [1] * (noise.ndim - 1)

    def denoise(x, t):
        sigma = t.to(dtype).repeat(sigma_shape)
        D = net(x, sigma, labels).to(dtype)
        if use_guidance:
            D_g = gnet(x, sigma, labels).to(dtype)
            D = D_g.lerp(D, guidance)  # D_g + w (D - D_g)
        return D

    # Noise levels and the state in `dtype` (float32 by default), computed as the release does, so the
    # same seeds give the same images; `sigma_steps` is the float64 form of the same schedule.
    i = torch.arange(num_steps, dtype=dtype, device=noise.device)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    t_steps = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    gamma_churn = min(S_churn / num_steps, math.sqrt(2) - 1)
    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = gamma_churn if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            x_hat = x_cur

        # Euler step.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun (2nd-order) correction, except when stepping to sigma = 0.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


class StackedRandomGenerator:
    """One `torch.Generator` per image, so an image depends on its own seed only (spec §8).

    `randn` / `randn_like` / `randint` draw row `k` of the batch from the generator seeded
    with `seeds[k]`; the batch size must equal `len(seeds)`.
    """

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError('seeds must not be empty')
        self.generators = [torch.Generator(self.device).manual_seed(s % (1 << 32))
                           for s in self.seeds]

    def _check_size(self, size):
        size = list(size)
        if not size or size[0] != len(self.generators):
            raise ValueError(f'size[0] must equal the number of seeds ({len(self.generators)}), '
                             f'got size {size}')
        return size

    def randn(self, size, **kwargs):
        """Like `torch.randn(size, **kwargs)`, one generator per row."""
        size = self._check_size(size)
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x):
        """Like `torch.randn_like(x)`, one generator per row."""
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, low, high, size, **kwargs):
        """Like `torch.randint(low, high, size, **kwargs)`, one generator per row."""
        size = self._check_size(size)
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randint(low, high, size[1:], generator=g, **kwargs)
                            for g in self.generators])
