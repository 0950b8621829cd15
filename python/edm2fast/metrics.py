"""The paper's evaluation: FID and FD_DINOv2 against reference statistics (EDM2 §5, App. D).

Two feature detectors turn uint8 RGB images ``[N, 3, H, W]`` into float32 features:

* ``fid``: the Inception-v3 of the original TensorFlow FID (graph 2015-12-05), 2048-d pool3
  features. The network is torch-fidelity's PyTorch port, whose features are documented to
  match the TensorFlow reference; it resizes to 299x299 with TensorFlow 1.x's bilinear rule
  and maps pixels to ``(x - 128) / 128`` itself.
* ``fd_dinov2``: DINOv2 ViT-L/14 (timm's ``vit_large_patch14_dinov2``), the 1024-d CLS token
  after the final norm. Images are resized to 224x224 (bicubic, antialiased), scaled to
  [0, 1] and normalised with the ImageNet mean/std, as the release's ``DINOv2Detector``.
  The official weights hold a 37x37 position embedding (518 px); at 224 px the release's
  torch-hub model resamples it on the fly (bicubic, no antialias, scale factor
  ``(16 + 0.1) / 37``); :func:`dinov2_pos_embed` does the same once, when loading.

Weights: a local file (or a folder holding it) from ``weights=``, else the environment
variable (``EDM2FAST_FID_WEIGHTS``, ``EDM2FAST_DINOV2_WEIGHTS``), else the cache folder
(``$EDM2FAST_CACHE_DIR/metrics``), else a download into it when the machine has internet. Files
are read with ``torch.load(weights_only=True)`` or safetensors, never unpickled freely.
``weights='random'`` builds the same architecture with fixed random weights (tests, smoke
runs: the numbers then mean nothing).

Statistics: features are summed in float64 (sum and sum of outer products), over batches and,
under ``torchrun``, over ranks with an all-reduce; ``mu = S / n`` and
``sigma = (S2 - n mu mu^T) / (n - 1)``. The Fréchet distance
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)`` is computed in float64 with
``scipy.linalg.sqrtm`` (see :func:`frechet_distance` for singular covariances).

Reference statistics: the authors' ``dataset-refs/img512.pkl`` style pickles (read with a
restricted unpickler that admits numpy arrays, dicts and scalars only), ``.npz`` files with
``mu``/``sigma`` (pytorch-fid, TTUR), and this project's ``.npz`` written by
:func:`save_stats` (``<metric>.mu``, ``<metric>.sigma`` plus JSON metadata).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import hashlib
import json
import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "METRICS", "FEATURE_DIMS", "frechet_distance", "FeatureStats", "load_stats", "save_stats", "get_detector",
    "InceptionV3FID", "DINOv2Detector", "dinov2_pos_embed", "dinov2_state_dict_for_timm", "resolve_weights",
    "weights_cache_dir", "accumulate_features", "check_images",
]

METRICS = ("fid", "fd_dinov2")
FEATURE_DIMS = {"fid": 2048, "fd_dinov2": 1024}
STATS_FORMAT = "edm2fast-feature-stats"
STATS_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Fréchet distance

def _as_stats(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{which}: statistics contain NaN or infinity")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)`` in float64 (FID's formula).

    The matrix square root is ``scipy.linalg.sqrtm`` of ``S1 S2``, as in the TensorFlow FID,
    pytorch-fid and the EDM2 release. Covariances of fewer samples than dimensions are
    singular, so round-off can give the square root small imaginary parts or make it fail:

    * if ``sqrtm`` returns non-finite values, retry with ``1e-6 * I`` added to both
      covariances (pytorch-fid's rule);
    * imaginary parts are dropped (the release's ``np.real``); a ``RuntimeWarning`` says so
      when one on the diagonal exceeds 1e-3 (pytorch-fid raises there; for features of tens
      of thousands of images it never happens).

    The result is not clipped at 0: a set against itself gives 0 up to round-off.
    """
    import scipy.linalg

    mu1, s1 = _as_stats(mu1, sigma1, "mu1/sigma1")
    mu2, s2 = _as_stats(mu2, sigma2, "mu2/sigma2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics: feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]})")

    def sqrtm(a):
        with warnings.catch_warnings():  # singular / ill-conditioned: handled below
            warnings.simplefilter("ignore")
            out = scipy.linalg.sqrtm(a)
        return out[0] if isinstance(out, tuple) else out

    covmean = sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.abs(np.diagonal(covmean).imag).max()) if covmean.size else 0.0
        if imag > 1e-3:
            warnings.warn(f"frechet_distance: dropped an imaginary part up to {imag:.3g} from sqrtm(S1 S2) "
                          "(too few samples for the feature dimension?)", RuntimeWarning, stacklevel=2)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
# Feature statistics

class FeatureStats:
    """Mean and covariance of features seen in batches, accumulated in float64.

    Keeps ``n``, ``sum`` ``[D]`` and ``sum of outer products`` ``[D, D]`` on ``device``.
    :meth:`all_reduce` sums them over the ranks of the default process group, so each rank
    may see a different shard; :meth:`mean_cov` then gives the statistics of all features.
    """

    def __init__(self, dim: int, device="cpu"):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        self.dim = dim
        self.num = 0
        self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._sum2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def append(self, feats) -> None:
        """Add ``[N, D]`` features (any float dtype; summed in float64)."""
        f = torch.as_tensor(feats)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"feats: expected [N, {self.dim}], got {tuple(f.shape)}")
        if not f.is_floating_point():
            raise TypeError(f"feats: expected floating-point features, got {f.dtype}")
        f = f.to(self._sum.device, torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("feats: contain NaN or infinity")
        self.num += f.shape[0]
        self._sum += f.sum(0)
        self._sum2 += f.T @ f

    def all_reduce(self) -> None:
        """Sum over all ranks (no-op unless ``torch.distributed`` is initialised with world size > 1)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        n = torch.tensor([float(self.num)], dtype=torch.float64, device=self._sum.device)
        for t in (n, self._sum, self._sum2):
            dist.all_reduce(t)
        self.num = int(n.item())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu [D], sigma [D, D])`` as float64 numpy arrays; needs at least 2 features."""
        if self.num < 2:
            raise ValueError(f"statistics: need at least 2 images, got {self.num}")
        mu = self._sum / self.num
        sigma = (self._sum2 - self.num * torch.outer(mu, mu)) / (self.num - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Reference statistics files

def _stats_unpickler_class():
    """A :class:`~edm2fast.convert.RestrictedUnpickler` narrowed to what a statistics pickle holds."""
    from .convert import RestrictedUnpickler, UnsafePickleError

    def checked_dtype(d):
        d = np.dtype(d)
        if d.hasobject or d.fields is not None or d.subdtype is not None:
            raise UnsafePickleError(f"refusing numpy dtype {d!r} (statistics are plain numeric arrays)")
        return d

    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]

    def safe_reconstruct(cls, shape, dtype_code):
        if cls is not np.ndarray:
            raise UnsafePickleError(f"numpy _reconstruct: refusing class {cls!r}")
        return reconstruct(cls, shape, dtype_code)

    def safe_dtype(spec, align=False, copy=False):
        return checked_dtype(np.dtype(spec, align, copy))

    def safe_scalar(dtype, data=None):
        checked_dtype(dtype)
        return scalar(dtype, data) if data is not None else scalar(dtype)

    def safe_frombuffer(buf, dtype, shape, order):
        dtype = checked_dtype(dtype)
        return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()

    allowed = {("builtins", t.__name__): t for t in (dict, list, tuple, int, float, str, bool, bytes, bytearray)}
    allowed.update({("__builtin__", t.__name__): t for t in (dict, list, tuple)})
    allowed.update({("collections", "OrderedDict"): collections.OrderedDict,
                    ("_codecs", "encode"): codecs.encode,  # bytes in protocol <= 2
                    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): safe_dtype})
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = safe_reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = safe_scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = safe_frombuffer  # protocol 5

    class StatsUnpickler(RestrictedUnpickler):
        def find_class(self, module, name):
            obj = allowed.get((module, name))
            if obj is None:
                raise UnsafePickleError(
                    f"{self.source}: refusing global '{module}.{name}': a statistics pickle holds only numpy "
                    "arrays, dicts, numbers and strings (nothing from the file is run)")
            return obj

    return StatsUnpickler


def _check_array(x, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
        raise ValueError(f"{where}: expected a numeric numpy array, got {type(x).__name__}"
                         f"{' ' + str(x.dtype) if isinstance(x, np.ndarray) else ''}")
    return x.astype(np.float64)


def _normalise_stats(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a dict of metrics, got {type(raw).__name__}")
    if "mu" in raw and "sigma" in raw:  # a single pair: FID's older layout
        raw = {"fid": raw}
    out = {}
    for metric, entry in raw.items():
        if not isinstance(entry, dict) or "mu" not in entry or "sigma" not in entry:
            continue  # other entries (metadata) are not statistics
        mu = _check_array(entry["mu"], f"{where}: {metric}.mu")
        sigma = _check_array(entry["sigma"], f"{where}: {metric}.sigma")
        _as_stats(mu, sigma, f"{where}: {metric}")
        out[str(metric)] = dict({k: v for k, v in entry.items() if k not in ("mu", "sigma")}, mu=mu, sigma=sigma)
    if not out:
        raise ValueError(f"{where}: no statistics (expected {{metric: {{'mu', 'sigma'}}}} or mu/sigma arrays)")
    return out


def weights_cache_dir(cache_dir: str | None = None) -> str:
    """``cache_dir``, else ``metrics/`` in the download cache (``$EDM2FAST_CACHE_DIR``, default
    ``~/.cache/edm2fast``)."""
    from .download import cache_dir as download_cache_dir
    return os.path.abspath(cache_dir or os.path.join(download_cache_dir(), "metrics"))


def _download(url: str, dest: str, sha256_prefix: str | None, what: str) -> str:
    """Download ``url`` to ``dest`` (atomically), checking the SHA-256 prefix when one is known."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, dest, hash_prefix=sha256_prefix, progress=True)
    except RuntimeError as e:  # checksum mismatch
        raise ValueError(f"{what}: {url}: {e}") from None
    except OSError as e:  # URLError is an OSError: no network
        raise FileNotFoundError(f"{what}: cannot download {url} ({e}); download it elsewhere and pass the "
                                f"file, or put it at {dest}") from None
    digest = hashlib.sha256()
    with open(dest, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    with open(dest + ".sha256", "w") as f:
        f.write(f"{digest.hexdigest()}  {os.path.basename(dest)}\n")
    print(f"{what}: downloaded {url} to {dest} (sha256 {digest.hexdigest()})", file=sys.stderr, flush=True)
    return dest


def load_stats(path_or_url, cache_dir: str | None = None) -> dict:
    """Reference statistics ``{'fid': {'mu', 'sigma', ...}, 'fd_dinov2': {...}}`` (float64 arrays).

    Reads the authors' pickles (``img512.pkl``; restricted unpickler, nothing in the file
    runs), ``.npz`` files with ``mu``/``sigma`` (returned as ``'fid'``) and this project's
    ``.npz`` (:func:`save_stats`; its metadata goes into each metric's dict). An
    ``http(s)://`` URL is downloaded once into the cache folder (:func:`edm2fast.download.fetch`;
    ``cache_dir`` overrides that folder).
    """
    if not isinstance(path_or_url, (str, os.PathLike)):
        raise TypeError(f"path_or_url: expected a path or URL, got {type(path_or_url).__name__}")
    from . import download
    path = download.fetch(path_or_url, what="path_or_url", cache=cache_dir)  # a URL: downloaded once, cached
    if not os.path.exists(path):
        raise FileNotFoundError(f"path_or_url: {path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"path_or_url: {path} is a folder, expected a statistics file (.pkl or .npz)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # .npz (a zip of .npy)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as e:
            raise ValueError(f"{path}: not a plain statistics .npz ({e})") from None
        meta = {}
        if "__metadata__" in arrays:
            meta = json.loads(str(arrays.pop("__metadata__")))
        if "mu" in arrays and "sigma" in arrays:
            raw = {"fid": {"mu": arrays["mu"], "sigma": arrays["sigma"]}}
        else:
            raw = {}
            for key, value in arrays.items():
                metric, _, field = key.rpartition(".")
                if metric and field in ("mu", "sigma"):
                    raw.setdefault(metric, {})[field] = value
        for metric, entry in raw.items():
            entry.update(meta.get("metrics", {}).get(metric, {}))
            if "dataset" in meta:
                entry.setdefault("dataset", meta["dataset"])
        return _normalise_stats(raw, path)
    from .convert import UnsafePickleError
    try:
        with open(path, "rb") as f:
            raw = _stats_unpickler_class()(f, path).load()
    except (UnsafePickleError, ValueError):
        raise
    except Exception as e:  # truncated or garbage
        raise ValueError(f"{path}: not a readable statistics pickle ({type(e).__name__}: {e})") from None
    return _normalise_stats(raw, path)


def save_stats(path, stats: dict, *, dataset: str | None = None, **metadata) -> None:
    """Write ``{metric: {'mu', 'sigma', 'num_images'?, 'detector'?}}`` as ``.npz`` with JSON metadata.

    Arrays are stored as ``<metric>.mu`` / ``<metric>.sigma`` (float64); everything else
    (per-metric extras, ``dataset``, ``metadata``) goes into ``__metadata__``. Atomic.
    """
    from . import io as edm_io
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"path: statistics are written as .npz, got {path!r}")
    if not isinstance(stats, dict) or not stats:
        raise ValueError("stats: expected a non-empty dict {metric: {'mu', 'sigma', ...}}")
    arrays, meta = {}, {"format": STATS_FORMAT, "version": STATS_VERSION, "metrics": {}}
    if dataset is not None:
        meta["dataset"] = str(dataset)
    meta.update(metadata)
    for metric, entry in stats.items():
        mu, sigma = _as_stats(entry["mu"], entry["sigma"], f"stats[{metric!r}]")
        arrays[f"{metric}.mu"], arrays[f"{metric}.sigma"] = mu, sigma
        meta["metrics"][metric] = {k: v for k, v in entry.items() if k not in ("mu", "sigma")}
    arrays["__metadata__"] = np.array(json.dumps(meta))
    with edm_io.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


# ----------------------------------------------------------------------------------------------
# Weights

@dataclass(frozen=True)
class _WeightsSource:
    env: str
    filename: str
    url: str
    sha256_prefix: str | None  # verified on download when known
    sha256_env: str | None = None  # lets a user pin the full hash


_WEIGHTS = {
    # torch-fidelity's conversion of the TensorFlow graph; the hash prefix is in the file name.
    "fid": _WeightsSource("EDM2FAST_FID_WEIGHTS", "weights-inception-2015-12-05-6726825d.pth",
                          "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                          "weights-inception-2015-12-05-6726825d.pth", "6726825d"),
    # The official DINOv2 release (what torch.hub's dinov2_vitl14 loads). No hash is published:
    # the first download records its SHA-256 next to it; EDM2FAST_DINOV2_SHA256 pins one.
    "fd_dinov2": _WeightsSource("EDM2FAST_DINOV2_WEIGHTS", "dinov2_vitl14_pretrain.pth",
                                "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
                                None, "EDM2FAST_DINOV2_SHA256"),
}


def _check_metric(name) -> str:
    if name not in METRICS:
        raise ValueError(f"name: unknown metric {name!r}; expected one of {', '.join(METRICS)}")
    return name


def resolve_weights(metric: str, weights=None, cache_dir: str | None = None, download: bool = True) -> str:
    """The weights file of ``metric``'s detector, or ``'random'`` (see the module docstring)."""
    src = _WEIGHTS[_check_metric(metric)]
    if weights is None and os.environ.get(src.env):
        weights, where = os.environ[src.env], f"${src.env}"
    else:
        where = "weights"
    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"weights: expected a path or 'random', got {type(weights).__name__}")
        weights = os.fspath(weights)
        if weights == "random":
            return weights
        path = os.path.join(weights, src.filename) if os.path.isdir(weights) else weights
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: {path}: no such file (the {metric} detector's weights, "
                                    f"{src.filename}, from {src.url})")
        return path
    path = os.path.join(weights_cache_dir(cache_dir), src.filename)
    if os.path.isfile(path):
        return path
    if not download:
        raise FileNotFoundError(f"{metric}: no weights at {path}; download {src.url} there or set ${src.env}")
    path = _download(src.url, path, src.sha256_prefix, f"{metric} weights")
    pinned = os.environ.get(src.sha256_env or "", "").strip().lower()
    if pinned:
        with open(path + ".sha256") as f:
            got = f.read().split()[0]
        if got != pinned:
            os.unlink(path)
            raise ValueError(f"{metric} weights: SHA-256 {got} differs from ${src.sha256_env} {pinned}")
    return path


def _load_state_dict(path: str, what: str) -> dict:
    """A plain tensor state dict from ``.safetensors`` or ``torch.load(weights_only=True)``."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what}: {path}: not a readable state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path}: expected a dict of tensors")
    return state


@contextlib.contextmanager
def _seeded(seed: int = 0):
    """Fixed random weights whatever the global RNG state (and without disturbing it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_images(images) -> torch.Tensor:
    """``images`` as a uint8 ``[N, 3, H, W]`` tensor (grayscale ``[N, 1, H, W]`` is repeated to RGB)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images: expected uint8 pixels in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images: expected [N, 3, H, W] RGB (or [N, 1, H, W]) with N >= 1, got "
                         f"{tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# ----------------------------------------------------------------------------------------------
# Detectors

_TORCH_FIDELITY_LOCK = threading.Lock()


class InceptionV3FID(torch.nn.Module):
    """FID's Inception-v3 (TensorFlow graph 2015-12-05, torch-fidelity's port): uint8 -> 2048-d pool3."""

    metric = "fid"
    feature_dim = 2048
    input_size = 299

    def __init__(self, weights: str | None = None, cache_dir: str | None = None):
        super().__init__()
        try:
            import torch_fidelity.feature_extractor_inceptionv3 as tfi
        except ImportError:
            raise ImportError("the fid detector needs torch-fidelity: pip install 'mpkernels[metrics]'") from None
        path = resolve_weights("fid", weights, cache_dir)
        state = None if path == "random" else _load_state_dict(path, "fid weights")

        class Net(tfi.FeatureExtractorInceptionV3):
            def load_state_dict(self, state_dict, strict=True, assign=False):
                if state_dict is None:  # weights='random': variance-preserving random convolutions
                    for m in self.modules():  # (the default init lets activations vanish with depth)
                        if isinstance(m, torch.nn.Conv2d):
                            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    return None
                return super().load_state_dict(state_dict, strict=strict, assign=assign)

        # torch-fidelity's constructor loads its weights itself (downloading, or torch.load with
        # weights_only=False on a path); hand it the state dict read safely above instead.
        with _TORCH_FIDELITY_LOCK, _seeded(0):
            original = tfi.load_state_dict_from_url
            tfi.load_state_dict_from_url = lambda *args, **kwargs: state
            try:
                self.net = Net("inception-v3-compat", ["2048"])
            except RuntimeError as e:
                raise ValueError(f"fid weights: {path}: {str(e).splitlines()[0]}") from None
            finally:
                tfi.load_state_dict_from_url = original
        self.weights = path
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` -> float32 ``[N, 2048]`` (resize to 299 inside, TF 1.x bilinear)."""
        x = check_images(images)
        return self.net(x.contiguous())[0].to(torch.float32)


def dinov2_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """A ``[1, P + M*M, D]`` position embedding resampled to ``grid x grid`` patches, as DINOv2 does.

    DINOv2's ``interpolate_pos_encoding`` (torch-hub model used by the release): bicubic, no
    antialias, ``scale_factor = (grid + 0.1) / M`` (its "interpolate_offset"), computed in
    float32. timm's own resampling (``size=grid``, antialiased) gives different embeddings.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed: expected [1, tokens, dim], got {tuple(pos_embed.shape)}")
    m = math.isqrt(pos_embed.shape[1] - num_prefix_tokens)
    if m * m != pos_embed.shape[1] - num_prefix_tokens:
        raise ValueError(f"pos_embed: {pos_embed.shape[1] - num_prefix_tokens} patch tokens is not a square grid")
    if m == grid:
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    scale = float(grid + 0.1) / m
    patches = F.interpolate(patches.float().reshape(1, m, m, dim).permute(0, 3, 1, 2),
                            scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if patches.shape[-2:] != (grid, grid):
        raise ValueError(f"pos_embed: resampling {m}x{m} gave {tuple(patches.shape[-2:])}, not {grid}x{grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def dinov2_state_dict_for_timm(state: dict, model: torch.nn.Module) -> dict:
    """The official DINOv2 checkpoint (or timm's conversion of it) for a timm ViT built at 224 px.

    Names already match timm's (``blocks.N.ls1.gamma``, ``attn.qkv``, ...); ``mask_token`` (used
    only in training) is dropped, and the position embedding is resampled with
    :func:`dinov2_pos_embed`.
    """
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if "pos_embed" in out:
        grid = model.patch_embed.grid_size
        if grid[0] != grid[1]:
            raise ValueError(f"model: expected a square patch grid, got {grid}")
        out["pos_embed"] = dinov2_pos_embed(out["pos_embed"], int(grid[0]))
    return out


class DINOv2Detector(torch.nn.Module):
    """DINOv2 ViT-L/14 CLS features (timm), preprocessed as the EDM2 release's ``DINOv2Detector``.

    ``arch`` names another timm DINOv2 model of the same family (``vit_small_patch14_dinov2``,
    ...); the default is the paper's ViT-L/14. The metric is defined for ViT-L/14 only.
    """

    metric = "fd_dinov2"
    input_size = 224
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, weights: str | None = None, cache_dir: str | None = None,
                 arch: str = "vit_large_patch14_dinov2"):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ImportError("the fd_dinov2 detector needs timm: pip install 'mpkernels[metrics]'") from None
        if not str(arch).startswith("vit_") or "dinov2" not in str(arch):
            raise ValueError(f"arch: expected a timm DINOv2 ViT (vit_*_patch14_dinov2), got {arch!r}")
        path = resolve_weights("fd_dinov2", weights, cache_dir)
        with _seeded(0):
            self.model = timm.create_model(arch, pretrained=False, img_size=self.input_size, num_classes=0,
                                           global_pool="token")
        if path != "random":
            state = dinov2_state_dict_for_timm(_load_state_dict(path, "fd_dinov2 weights"), self.model)
            try:
                self.model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"fd_dinov2 weights: {path}: does not fit {arch} "
                                 f"({str(e).splitlines()[0]} ...)") from None
        self.feature_dim = int(self.model.num_features)
        self.weights = path
        self.register_buffer("_mean", torch.tensor(self.mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).reshape(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` -> normalised float32 ``[N, 3, 224, 224]`` (the network's input)."""
        x = check_images(images).to(torch.float32)
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", antialias=True,
                          align_corners=False)
        return (x / 255 - self._mean) / self._std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` -> float32 ``[N, D]`` CLS features after the final norm."""
        return self.model(self.preprocess(images)).to(torch.float32)


def get_detector(name: str, weights=None, *, device=None, cache_dir: str | None = None) -> torch.nn.Module:
    """The feature detector of metric ``name`` (``'fid'`` or ``'fd_dinov2'``), in eval mode on ``device``.

    ``weights``: a file or a folder holding it, ``'random'`` (fixed random weights), or None
    (environment variable, cache folder, download). The result maps uint8 ``[N, 3, H, W]``
    RGB images to float32 ``[N, D]`` features.
    """
    _check_metric(name)
    cls = InceptionV3FID if name == "fid" else DINOv2Detector
    det = cls(weights=weights, cache_dir=cache_dir)
    return det.to(device) if device is not None else det


@torch.no_grad()
def accumulate_features(detectors: dict, batches: Iterable, device="cpu", progress=None) -> dict:
    """Run every detector over uint8 image batches; returns ``{metric: FeatureStats}`` (not yet reduced).

    ``progress(num_images)`` is called after each batch.
    """
    device = torch.device(device)
    stats = {m: FeatureStats(int(det.feature_dim), device=device) for m, det in detectors.items()}
    for batch in batches:
        x = check_images(torch.as_tensor(batch)).to(device, non_blocking=True)
        for m, det in detectors.items():
            stats[m].append(det(x))
        if progress is not None:
            progress(x.shape[0])
    return stats

