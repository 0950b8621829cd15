"""Sample quality you can measure on a laptop: a digits classifier, class accuracy, Frechet distance.

For the built-in scikit-learn digits (``digits16`` / ``digits32``), a small CNN trained once
on the real images (deterministically, then cached on disk) gives

1. the accuracy of class-conditional samples: the fraction classified as the requested class;
2. the Frechet distance (as in FID) between real and generated images in the feature space of
   its penultimate layer: ``|mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^1/2)``, computed by
   the same float64 code as FID (:func:`edm2fast.metrics.frechet_distance`).

Every image is classified at 16x16 (32 px inputs are average-pooled 2x2), so one classifier
serves both resolutions. Images are float tensors in [-1, 1], ``[N, 1, H, W]``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import frechet_distance  # the FID code path: float64, SciPy sqrtm

__all__ = [
    "DigitsClassifier", "load_classifier", "default_cache_dir", "real_digits", "classify", "features",
    "accuracy", "frechet_distance", "feature_statistics", "evaluate_samples",
]

CLASSIFIER_VERSION = 2
CLASSIFIER_RES = 16


def default_cache_dir() -> str:
    """``$EDM2FAST_CACHE``, else ``$XDG_CACHE_HOME/edm2fast``, else ``~/.cache/edm2fast``."""
    if os.environ.get("EDM2FAST_CACHE"):
        return os.environ["EDM2FAST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edm2fast")


# ----------------------------------------------------------------------------------------------
# Real data.

def _digits_module_dataset(resolution: int):
    from . import data
    return data.open_dataset(f"digits{resolution}")


def real_digits(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as the trainer sees them: ``([N, 1, R, R] in [-1, 1], labels [N])``."""
    if resolution not in (16, 32):
        raise ValueError(f"resolution: the built-in digits come at 16 or 32 px, got {resolution}")
    ds = _digits_module_dataset(resolution)
    xs, ys = [], []
    for i in range(len(ds)):
        x, y = ds[i]
        xs.append(torch.from_numpy(np.array(x)))
        y = np.asarray(y)
        ys.append(int(y) if y.ndim == 0 else int(y.argmax()))
    x = torch.stack(xs).to(torch.float32) / 127.5 - 1
    return x, torch.tensor(ys, dtype=torch.int64)


def _to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images: expected a [N, 1, H, W] tensor in [-1, 1], got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    x = images.detach().to("cpu", torch.float32).clamp(-1, 1)
    h, w = x.shape[2:]
    if (h, w) == (CLASSIFIER_RES, CLASSIFIER_RES):
        return x
    if h == w and h % CLASSIFIER_RES == 0:
        return F.avg_pool2d(x, h // CLASSIFIER_RES)
    return F.interpolate(x, size=(CLASSIFIER_RES, CLASSIFIER_RES), mode="bilinear", antialias=True,
                         align_corners=False)


# ----------------------------------------------------------------------------------------------
# Classifier.

class DigitsClassifier(torch.nn.Module):
    """Small CNN on 16x16 digits; ``features()`` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 4 * 4, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _split(n: int):
    perm = np.random.RandomState(1234).permutation(n)
    n_val = n // 5
    return perm[n_val:], perm[:n_val]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts by up to 1 pixel and mild contrast jitter (samples are never perfectly centred)."""
    n = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    shift = torch.randint(0, 9, (n,), generator=gen)
    out = torch.empty_like(x)
    for s in range(9):
        dy, dx = divmod(s, 3)
        sel = shift == s
        out[sel] = pad[sel, :, dy:dy + CLASSIFIER_RES, dx:dx + CLASSIFIER_RES]
    scale = 1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    return ((out + 1) * scale - 1).clamp(-1, 1)


def _train_classifier(epochs: int = 15) -> tuple[DigitsClassifier, float]:
    """Deterministic training on 80% of the 16 px digits; returns (model, held-out accuracy).

    One thread: the result does not depend on the machine's core count, and small convolutions
    are faster that way on a busy machine.
    """
    x, y = real_digits(16)
    train_idx, val_idx = _split(len(x))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            gen = torch.Generator().manual_seed(0)
            model = DigitsClassifier()
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            xt, yt = x[train_idx], y[train_idx]
            steps_per_epoch = (len(xt) + 63) // 64
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=epochs * steps_per_epoch)
            model.train()
            for _ in range(epochs):
                perm = torch.randperm(len(xt), generator=gen)
                for k in range(0, len(xt), 64):
                    idx = perm[k:k + 64]
                    loss = F.cross_entropy(model(_augment(xt[idx], gen)), yt[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        model.eval().requires_grad_(False)
        with torch.no_grad():
            acc = float((model(x[val_idx]).argmax(1) == y[val_idx]).float().mean())
    finally:
        torch.set_num_threads(threads)
    return model, acc


_CLASSIFIERS: dict[str, DigitsClassifier] = {}


def load_classifier(cache_dir: str | None = None, verbose: bool = False) -> DigitsClassifier:
    """The digits classifier, trained on first use (about 15 s on a CPU core) and cached.

    The cache file ``digits-classifier-v{N}.safetensors`` holds the weights and, in its
    metadata, the held-out accuracy (``model.heldout_accuracy``).
    """
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    path = os.path.join(cache_dir, f"digits-classifier-v{CLASSIFIER_VERSION}.safetensors")
    if path in _CLASSIFIERS:
        return _CLASSIFIERS[path]
    model = DigitsClassifier()
    loaded = False
    if os.path.isfile(path):
        try:
            model.load_state_dict(load_file(path))
            with safe_open(path, "pt") as f:
                model.heldout_accuracy = float(json.loads(f.metadata()["info"])["heldout_accuracy"])
            loaded = True
        except Exception as e:  # damaged cache: retrain
            if verbose:
                print(f"retraining the digits classifier ({path} unreadable: {e})")
    if not loaded:
        if verbose:
            print(f"training the digits classifier once (cached in {path}) ...", flush=True)
        model, acc = _train_classifier()
        model.heldout_accuracy = acc
        from . import io as edm_io
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        meta = {"info": json.dumps({"heldout_accuracy": acc, "version": CLASSIFIER_VERSION})}
        os.makedirs(cache_dir, exist_ok=True)
        edm_io.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        if verbose:
            print(f"digits classifier: held-out accuracy {acc:.4f}")
    model.eval().requires_grad_(False)
    _CLASSIFIERS[path] = model
    return model


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)]) if len(x) else fn(x)


def classify(model: DigitsClassifier, images: torch.Tensor) -> torch.Tensor:
    """Predicted class of every image, ``[N]`` int64."""
    return _batched(model, _to_classifier_input(images)).argmax(1)


def features(model: DigitsClassifier, images: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer features, ``[N, 128]`` float32."""
    return _batched(model.features, _to_classifier_input(images))


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels) -> float:
    """Fraction of ``images`` classified as their requested ``labels``."""
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
    if labels.numel() != images.shape[0]:
        raise ValueError(f"labels: {labels.numel()} labels for {images.shape[0]} images")
    return float((classify(model, images) == labels).float().mean())


# ----------------------------------------------------------------------------------------------
# Frechet distance.

def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of ``[N, D]`` features; needs N >= 2."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: need at least 2 samples of shape [N, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


_REAL_STATS: dict[tuple, tuple] = {}


def real_statistics(model: DigitsClassifier, resolution: int = 16):
    key = (id(model), resolution)
    if key not in _REAL_STATS:
        x, _ = real_digits(resolution)
        _REAL_STATS[key] = feature_statistics(features(model, x).numpy())
    return _REAL_STATS[key]


def evaluate_samples(images: torch.Tensor, labels=None, resolution: int | None = None,
                     cache_dir: str | None = None, model: DigitsClassifier | None = None) -> dict:
    """``{'accuracy': ..., 'fd': ..., 'num': N}`` of generated digits against the real ones.

    ``labels`` (the requested classes) give the accuracy (omitted for ``None``). The real
    reference set is the whole built-in digits dataset at ``resolution`` (default: the
    images' own, 16 or 32).
    """
    model = model or load_classifier(cache_dir)
    if resolution is None:
        resolution = int(images.shape[-1]) if int(images.shape[-1]) in (16, 32) else 16
    out = {"num": int(images.shape[0])}
    if labels is not None:
        out["accuracy"] = accuracy(model, images, labels)
    mu_r, s_r = real_statistics(model, resolution)
    mu_g, s_g = feature_statistics(features(model, images).numpy())
    out["fd"] = frechet_distance(mu_r, s_r, mu_g, s_g)
    return out
