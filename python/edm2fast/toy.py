"""The 2D guidance demo: no guidance vs classifier-free guidance vs autoguidance on a toy distribution.

A small version of the release's 2D example (Karras et al. 2024, "Guiding a diffusion model
with a bad version of itself", Fig. 1): data from a branching, tree-like 2D distribution with
two classes; denoisers are small MLPs wrapped in the same EDM preconditioning as the image
models (``c_skip``, ``c_out``, ``c_in``, ``c_noise = log(sigma) / 4``) and trained with the
same loss weighting; sampling is :func:`edm2fast.sampler.edm_sampler`. Three networks:

- ``main``: class-conditional, the larger one, trained longest;
- ``uncond``: the same size but unconditional (the guide of classifier-free guidance);
- ``guide``: class-conditional but smaller and trained shorter (the guide of autoguidance).

Classifier-free guidance pushes samples away from the unconditional density (outwards, past
the branches' ends and off the branches' tips); autoguidance only pushes away from where the
weaker model's errors are, so samples concentrate on the branches without losing their spread.

``train(outdir)`` writes ``toy-models.safetensors``; ``plot(outdir, path)`` draws the PNG.
Command line: ``edm2fast toy train --outdir D`` then ``edm2fast toy plot --outdir D``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

__all__ = ["sample_data", "ToyDenoiser", "train_denoiser", "train", "load_models", "sample", "plot", "MODELS"]

SIGMA_DATA = 0.5
MODELS = {  # name: (hidden width, conditional, share of the iterations)
    "main": (64, True, 1.0),
    "uncond": (64, False, 1.0),
    "guide": (16, True, 0.25),
}


def _branches(depth: int = 4) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Line segments ``(start, end, class)`` of two mirrored binary trees."""
    segs = []

    def grow(p, angle, length, level, cls):
        q = p + length * np.array([math.cos(angle), math.sin(angle)])
        segs.append((p, q, cls))
        if level < depth:
            for turn in (-0.45, 0.45):
                grow(q, angle + turn, length * 0.7, level + 1, cls)

    grow(np.array([0.0, -1.3]), math.pi / 2 + 0.35, 0.8, 1, 0)
    grow(np.array([0.0, -1.3]), math.pi / 2 - 0.35, 0.8, 1, 1)
    return segs


def sample_data(n: int, generator: torch.Generator | None = None, classes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, 2], labels [n])``: points along the branches with a little noise, thinner at the tips."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    segs = _branches()
    starts = torch.tensor(np.stack([s for s, _, _ in segs]), dtype=torch.float32)
    ends = torch.tensor(np.stack([e for _, e, _ in segs]), dtype=torch.float32)
    cls = torch.tensor([c for _, _, c in segs])
    lengths = (ends - starts).norm(dim=1)
    if classes is not None:
        weights = lengths * (cls == int(classes)).float()
    else:
        weights = lengths
    idx = torch.multinomial(weights, n, replacement=True, generator=generator)
    t = torch.rand(n, 1, generator=generator)
    x = starts[idx] + t * (ends[idx] - starts[idx])
    width = 0.02 + 0.04 * lengths[idx, None]
    x = x + width * torch.randn(n, 2, generator=generator)
    return x, cls[idx]


class ToyDenoiser(torch.nn.Module):
    """``D(x; sigma, class)`` for 2D points: an MLP inside the EDM preconditioning (spec §4)."""

    def __init__(self, hidden: int = 64, label_dim: int = 0, layers: int = 3, sigma_data: float = SIGMA_DATA):
        super().__init__()
        if hidden < 1 or layers < 1:
            raise ValueError(f"hidden, layers: expected integers >= 1, got {hidden}, {layers}")
        self.hidden, self.label_dim, self.layers, self.sigma_data = hidden, label_dim, layers, sigma_data
        self.register_buffer("freqs", torch.randn(16) * 2 * math.pi)
        self.register_buffer("phases", torch.rand(16) * 2 * math.pi)
        mods, width = [], 2 + 16 + label_dim
        for _ in range(layers):
            mods += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        mods.append(torch.nn.Linear(width, 2))
        self.mlp = torch.nn.Sequential(*mods)

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        parts = [c_in * x, torch.cos(c_noise * self.freqs + self.phases) * math.sqrt(2)]
        if self.label_dim:
            if labels is None:
                raise ValueError(f"labels: required, this denoiser has label_dim={self.label_dim}")
            parts.append(labels.to(torch.float32).reshape(x.shape[0], self.label_dim))
        return c_skip * x + c_out * self.mlp(torch.cat(parts, dim=1))


def train_denoiser(net: ToyDenoiser, iters: int, batch: int = 1024, lr: float = 3e-3, P_mean: float = -1.2,
                   P_std: float = 1.4, seed: int = 0) -> list[float]:
    """EDM training (log-normal sigma, weight ``(sigma^2 + sd^2) / (sigma sd)^2``); returns the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iters, 1))
    losses = []
    for _ in range(iters):
        x, cls = sample_data(batch, g)
        labels = torch.nn.functional.one_hot(cls, 2).float() if net.label_dim else None
        sigma = (torch.randn(batch, 1, generator=g) * P_std + P_mean).exp()
        weight = (sigma ** 2 + net.sigma_data ** 2) / (sigma * net.sigma_data) ** 2
        noisy = x + sigma * torch.randn(batch, 2, generator=g)
        loss = (weight * (net(noisy, sigma, labels) - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def train(outdir: str, iters: int = 3000, batch: int = 1024, seed: int = 0, log=print) -> str:
    """Train the three networks of :data:`MODELS`; writes ``OUTDIR/toy-models.safetensors``."""
    from . import io as edm_io
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected an integer >= 1, got {iters!r}")
    os.makedirs(outdir, exist_ok=True)
    tensors, meta = {}, {"models": {}, "iters": iters, "batch": batch, "seed": seed}
    for k, (name, (hidden, cond, share)) in enumerate(MODELS.items()):
        torch.manual_seed(seed + k)
        net = ToyDenoiser(hidden, label_dim=2 if cond else 0)
        n = max(1, int(iters * share))
        t0 = time.time()
        losses = train_denoiser(net, n, batch=batch, seed=seed + 100 + k)
        log(f"toy: trained {name} ({hidden} wide, {'conditional' if cond else 'unconditional'}) for {n} iterations "
            f"in {time.time() - t0:.1f}s, final loss {np.mean(losses[-50:]):.4f}")
        meta["models"][name] = {"hidden": hidden, "label_dim": net.label_dim, "layers": net.layers, "iters": n}
        tensors.update({f"{name}.{p}": t for p, t in net.state_dict().items()})
    path = os.path.join(outdir, "toy-models.safetensors")
    edm_io.save_checkpoint(path, tensors, meta)
    return path


def load_models(outdir: str) -> dict[str, ToyDenoiser]:
    """The networks :func:`train` wrote (safetensors, no pickle)."""
    from . import io as edm_io
    path = os.path.join(outdir, "toy-models.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; run 'edm2fast toy train --outdir {outdir}' first")
    tensors, meta = edm_io.load_checkpoint(path)
    nets = {}
    for name, m in meta["models"].items():
        net = ToyDenoiser(m["hidden"], label_dim=m["label_dim"], layers=m["layers"])
        net.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name})
        nets[name] = net.eval().requires_grad_(False)
    return nets


def sample(net, n: int, cls: int, gnet=None, guidance: float = 1.0, seed: int = 0, num_steps: int = 32):
    """``n`` samples of class ``cls`` (EDM Heun sampler, ``sigma_max`` 20 for this data's scale)."""
    from .sampler import edm_sampler
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=g)
    labels = torch.nn.functional.one_hot(torch.full([n], int(cls)), 2).float()
    return edm_sampler(net, noise, labels, gnet=gnet, guidance=guidance, num_steps=num_steps, sigma_min=0.002,
                       sigma_max=20)


def plot(outdir: str, path: str | None = None, guidance: float = 3.0, n: int = 2000, cls: int = 0,
         seed: int = 1) -> str:
    """No guidance, classifier-free guidance and autoguidance of class ``cls``, beside the data (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import io as edm_io
    nets = load_models(outdir)
    path = path or os.path.join(outdir, "toy-guidance.png")
    data, _ = sample_data(n, torch.Generator().manual_seed(seed), classes=cls)
    others, _ = sample_data(n, torch.Generator().manual_seed(seed + 1), classes=1 - cls)
    panels = [
        ("data (class %d)" % cls, data),
        ("no guidance", sample(nets["main"], n, cls, seed=seed)),
        (f"classifier-free guidance, w={guidance:g}", sample(nets["main"], n, cls, nets["uncond"], guidance, seed)),
        (f"autoguidance, w={guidance:g}", sample(nets["main"], n, cls, nets["guide"], guidance, seed)),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (title, pts) in zip(axes, panels):
        ax.scatter(others[:, 0], others[:, 1], s=1, color="0.85")
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, color="C1" if cls else "C0", alpha=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-2.2, 2.2)
        ax.set_ylim(-1.6, 2.4)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("2D toy: guidance with an unconditional model (CFG) vs a weaker model of the same task "
                 "(autoguidance)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with edm_io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
