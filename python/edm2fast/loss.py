"""EDM2 training loss with learned uncertainty weighting (spec §6; paper Eqs. 14-21)."""

import torch

__all__ = ['EDM2Loss']


class EDM2Loss:
    """Per-element uncertainty-weighted denoising loss (spec §6, paper Eq. 21).

    For every sample: `sigma = exp(P_mean + P_std * n)`, `n ~ N(0, 1)` (log-normal noise level,
    Eq. 14); `weight = (sigma^2 + sd^2) / (sigma * sd)^2` (lambda(sigma), Eq. 15);
    `y_noisy = y + sigma * eps`; `D, u = net(y_noisy, sigma, labels, return_logvar=True)`;
    `loss = weight / exp(u) * (D - y)^2 + u` (Eq. 21, u = learned log-variance).

    The caller reduces it (`loss.sum() / batch_total` in the reference trainer).
    """

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        P_mean, P_std, sigma_data = float(P_mean), float(P_std), float(sigma_data)
        if not P_std >= 0:
            raise ValueError(f'P_std must be >= 0, got {P_std}')
        if not sigma_data > 0:
            raise ValueError(f'sigma_data must be > 0, got {sigma_data}')
        if P_mean != P_mean or abs(P_mean) == float('inf'):
            raise ValueError(f'P_mean must be finite, got {P_mean}')
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __repr__(self):
        return (f'{type(self).__name__}(P_mean={self.P_mean}, P_std={self.P_std}, '
                f'sigma_data={self.sigma_data})')

    def __call__(self, net, images, labels=None, *, generator=None):
        """Return the loss of every element, fp32, shaped like `images`.

        Args:
            net: called as `net(x, sigma, labels, return_logvar=True) -> (D, logvar)`;
                `sigma` is fp32 and shaped `[N, 1, ..., 1]` (broadcastable against `images`).
            images: clean data `y`, `[N, ...]`; computed on in fp32.
            labels: passed through to `net`.
            generator: optional `torch.Generator` (on `images.device`) for reproducible noise;
                the per-sample normals for sigma are drawn first, then the noise `eps`.
        """
        if not isinstance(images, torch.Tensor) or images.ndim < 1 or images.shape[0] == 0:
            raise ValueError('images must be a tensor with a non-empty batch dimension')
        if not images.is_floating_point():
            raise ValueError(f'images must be a floating-point tensor, got {images.dtype}')
        images = images.to(torch.float32)
        sd = self.sigma_data
        kwargs = dict(device=images.device, dtype=torch.float32, generator=generator)
        rnd_normal = torch.randn([images.shape[0]] + [1] * (images.ndim - 1), **kwargs)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()                   # Eq. 14
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2                    # Eq. 15
        noise = torch.randn(images.shape, **kwargs) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        logvar = logvar.to(torch.float32)
        return (weight / logvar.exp()) * (denoised.to(torch.float32) - images) ** 2 + logvar  # Eq. 21
