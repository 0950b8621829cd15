"""The paper's evaluation (edm2fast.metrics, `edm2fast metrics`): Fréchet distance, statistics,
reference files, the FID and DINOv2 detectors (random weights: nothing is downloaded)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edm2fast import cli, evaluate, metrics
from edm2fast.convert import UnsafePickleError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]), OMP_NUM_THREADS="1")


def _gaussian_features(n, dim, seed, offset=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + offset


# ----------------------------------------------------------------------------------------------- distance

def test_frechet_distance_of_a_set_to_itself_is_zero():
    mu, sigma = evaluate.feature_statistics(_gaussian_features(400, 32, 0))
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    # Commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # A full covariance against a scaled copy of itself: (1 - c)^2 tr(S).
    m = rng.normal(size=(8, 8))
    s = m @ m.T + 0.1 * np.eye(8)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - 1.7) ** 2 * np.trace(s)
    assert metrics.frechet_distance(mu1, s, mu2, 1.7 ** 2 * s) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_singular_covariances_match_an_eigen_oracle():
    """Fewer samples than dimensions (rank-deficient covariances): real, finite, and equal to the
    symmetric formula tr((S1^1/2 S2 S1^1/2)^1/2) computed with eigh."""
    mu1, s1 = evaluate.feature_statistics(_gaussian_features(12, 40, 2))
    mu2, s2 = evaluate.feature_statistics(_gaussian_features(15, 40, 3, offset=0.5))
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float) and np.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_bad_statistics():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.frechet_distance(mu, s, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mu1/sigma1"):
        metrics.frechet_distance(mu, np.eye(3), mu, s)
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(mu, s, np.full(4, np.nan), s)


def test_digits_eval_uses_the_fid_code_path():
    assert evaluate.frechet_distance is metrics.frechet_distance


# ----------------------------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("num_batches", [1, 3, 7])
def test_feature_stats_over_uneven_batches_equal_one_pass(num_batches):
    feats = _gaussian_features(53, 6, 4, offset=30.0)
    cuts = np.sort(np.random.default_rng(num_batches).choice(np.arange(1, 53), num_batches - 1, replace=False))
    stats = metrics.FeatureStats(6)
    for part in np.split(feats, cuts):
        stats.append(torch.from_numpy(part))
    mu, sigma = stats.mean_cov()
    assert stats.num == 53 and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-10)


def test_feature_stats_rejects_bad_input():
    stats = metrics.FeatureStats(4)
    with pytest.raises(ValueError, match=r"feats: expected \[N, 4\]"):
        stats.append(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="feats"):
        stats.append(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        stats.append(torch.full((2, 4), float("nan")))
    stats.append(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()
    with pytest.raises(ValueError, match="dim"):
        metrics.FeatureStats(0)


@pytest.mark.slow
def test_feature_stats_two_gloo_ranks_equal_one_pass(tmp_path):
    from metrics_gloo_worker import make_features
    out = tmp_path / "stats.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "metrics_gloo_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = np.load(out)
    feats = make_features()
    assert int(got["world"]) == 2 and int(got["num"]) == len(feats)
    np.testing.assert_allclose(got["mu"], feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(got["sigma"], np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------- reference files

def _authors_style_ref(dims=(6, 4)):
    """Built like the release's dataset-refs/img512.pkl: {metric: {'mu', 'sigma'}} of numpy arrays."""
    out = {}
    for metric, d in zip(metrics.METRICS, dims):
        mu, sigma = evaluate.feature_statistics(_gaussian_features(50, d, d))
        out[metric] = {"mu": mu, "sigma": sigma}
    return out


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_stats_reads_authors_pickles(tmp_path, protocol):
    ref = _authors_style_ref()
    ref["fd_dinov2"]["mu"] = ref["fd_dinov2"]["mu"].astype(np.float32)  # any float dtype is read as float64
    path = tmp_path / "img512.pkl"
    path.write_bytes(pickle.dumps(ref, protocol=protocol))
    got = metrics.load_stats(path)
    assert set(got) == {"fid", "fd_dinov2"}
    for m in got:
        assert got[m]["mu"].dtype == got[m]["sigma"].dtype == np.float64
        np.testing.assert_array_equal(got[m]["mu"], ref[m]["mu"].astype(np.float64))
        np.testing.assert_array_equal(got[m]["sigma"], ref[m]["sigma"])


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_stats_refuses_pickles_that_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    ref = _authors_style_ref()
    ref["fid"]["extra"] = _RunsCode(marker)
    path.write_bytes(pickle.dumps(ref))
    with pytest.raises(UnsafePickleError, match="refusing global 'posix.system'|refusing global 'os.system'"):
        metrics.load_stats(path)
    assert not marker.exists()
    # What a network pickle may hold (tensors) is still refused in a statistics file.
    path.write_bytes(pickle.dumps({"fid": {"mu": torch.zeros(3), "sigma": torch.eye(3)}}))
    with pytest.raises(UnsafePickleError, match="torch"):
        metrics.load_stats(path)
    # Object arrays and ndarray subclasses too.
    path.write_bytes(pickle.dumps({"fid": {"mu": np.array([1, "a"], dtype=object), "sigma": np.eye(2)}}))
    with pytest.raises(UnsafePickleError, match="dtype"):
        metrics.load_stats(path)
    path.write_bytes(pickle.dumps({"fid": {"mu": np.ma.masked_array(np.zeros(2)), "sigma": np.eye(2)}}))
    with pytest.raises(UnsafePickleError):
        metrics.load_stats(path)


def test_load_stats_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="path_or_url"):
        metrics.load_stats(tmp_path / "missing.pkl")
    with pytest.raises(TypeError, match="path_or_url"):
        metrics.load_stats(3)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="junk.pkl"):
        metrics.load_stats(tmp_path / "junk.pkl")
    (tmp_path / "empty.pkl").write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3)}}))
    with pytest.raises(ValueError, match="no statistics"):
        metrics.load_stats(tmp_path / "empty.pkl")
    (tmp_path / "shape.pkl").write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.eye(2)}}))
    with pytest.raises(ValueError, match="fid"):
        metrics.load_stats(tmp_path / "shape.pkl")


def test_load_stats_old_npz_and_our_npz(tmp_path):
    ref = _authors_style_ref()
    np.savez(tmp_path / "fid_stats.npz", mu=ref["fid"]["mu"], sigma=ref["fid"]["sigma"])
    old = metrics.load_stats(tmp_path / "fid_stats.npz")
    assert list(old) == ["fid"]
    np.testing.assert_array_equal(old["fid"]["sigma"], ref["fid"]["sigma"])

    ours = {m: dict(v, num_images=50, detector="X", weights="w.pth") for m, v in ref.items()}
    metrics.save_stats(tmp_path / "ours.npz", ours, dataset="datasets/img512.zip")
    with np.load(tmp_path / "ours.npz", allow_pickle=False) as z:  # plain arrays, no pickles inside
        assert sorted(z.files) == ["__metadata__", "fd_dinov2.mu", "fd_dinov2.sigma", "fid.mu", "fid.sigma"]
        meta = json.loads(str(z["__metadata__"]))
    assert meta["format"] == metrics.STATS_FORMAT and meta["dataset"] == "datasets/img512.zip"
    got = metrics.load_stats(tmp_path / "ours.npz")
    for m in ref:
        np.testing.assert_array_equal(got[m]["mu"], ref[m]["mu"])
        assert got[m]["num_images"] == 50 and got[m]["weights"] == "w.pth"
        assert got[m]["dataset"] == "datasets/img512.zip"
    with pytest.raises(ValueError, match="npz"):
        metrics.save_stats(tmp_path / "ours.pkl", ours)


# ----------------------------------------------------------------------------------------------- detectors

def _tf1_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """TensorFlow 1.x resize_bilinear (align_corners=False, no half-pixel centres), written out."""
    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    y0, y1, wy = axis(x.shape[2])
    x0, x1, wx = axis(x.shape[3])
    rows0, rows1 = x[:, :, y0], x[:, :, y1]
    top = rows0[..., x0] * (1 - wx) + rows0[..., x1] * wx
    bottom = rows1[..., x0] * (1 - wx) + rows1[..., x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def _images(n, h, w, seed=0, channels=3):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, channels, h, w), dtype=np.uint8))


@pytest.fixture(scope="module")
def fid_detector():
    pytest.importorskip("torch_fidelity")
    return metrics.get_detector("fid", "random")


def _capture_input(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen, handle


def test_fid_detector_shapes_preprocessing_and_batching(fid_detector):
    x = _images(3, 21, 30)  # odd, non-square: resized to 299x299 inside
    seen, handle = _capture_input(fid_detector.net.Conv2d_1a_3x3)
    try:
        feats = fid_detector(x)
    finally:
        handle.remove()
    assert feats.shape == (3, 2048) and feats.dtype == torch.float32 and feats.std() > 0
    expected = (_tf1_bilinear(x.numpy().astype(np.float64), 299) - 128) / 128
    np.testing.assert_allclose(seen[0].double().numpy(), expected, atol=2e-5, rtol=0)
    parts = torch.cat([fid_detector(x[:1]), fid_detector(x[1:])])
    torch.testing.assert_close(parts, feats, rtol=1e-4, atol=1e-5)
    gray = fid_detector(x[:1, :1])  # grayscale is repeated to RGB
    torch.testing.assert_close(gray, fid_detector(x[:1, :1].repeat(1, 3, 1, 1)))


def test_detectors_reject_bad_images(fid_detector):
    with pytest.raises(TypeError, match="images: expected uint8"):
        fid_detector(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="images"):
        fid_detector(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="images"):
        fid_detector(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="name: unknown metric"):
        metrics.get_detector("kid")


def test_fid_weights_from_a_local_file_and_the_environment(tmp_path, monkeypatch, fid_detector):
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    state = {k: v.clone() for k, v in fid_detector.net.state_dict().items()}
    state["Conv2d_1a_3x3.conv.weight"] *= -1  # weights that differ from the random ones
    torch.save(state, path)
    monkeypatch.setenv("EDM2FAST_FID_WEIGHTS", str(tmp_path))  # a folder holding the file
    det = metrics.get_detector("fid")
    assert det.weights == str(path)
    torch.testing.assert_close(det.net.Conv2d_1a_3x3.conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    monkeypatch.setenv("EDM2FAST_FID_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="EDM2FAST_FID_WEIGHTS"):
        metrics.get_detector("fid")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        metrics.get_detector("fid", tmp_path / "bad.pth")
    torch.save({"fn": os.getcwd}, tmp_path / "code.pth")  # refused by weights_only loading
    with pytest.raises(ValueError, match="code.pth"):
        metrics.get_detector("fid", tmp_path / "code.pth")


def _pil_bicubic(x: np.ndarray, size: int) -> np.ndarray:
    """PIL's antialiased bicubic resize of float images, channel by channel (the dgm-eval reference)."""
    from PIL import Image
    out = np.empty(x.shape[:2] + (size, size), np.float64)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            img = Image.fromarray(x[i, c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
            out[i, c] = np.asarray(img)
    return out


@pytest.fixture(scope="module")
def small_dinov2():
    pytest.importorskip("timm")
    return metrics.DINOv2Detector("random", arch="vit_small_patch14_dinov2")


@pytest.mark.parametrize("h, w", [(20, 20), (300, 257)])
def test_dinov2_preprocessing_matches_pil_bicubic(small_dinov2, h, w):
    x = _images(2, h, w, seed=h)
    got = small_dinov2.preprocess(x).double().numpy()
    mean = np.array(metrics.DINOv2Detector.mean).reshape(1, 3, 1, 1)
    std = np.array(metrics.DINOv2Detector.std).reshape(1, 3, 1, 1)
    expected = (_pil_bicubic(x.numpy(), 224) / 255 - mean) / std
    err = np.abs(got - expected)
    assert err.max() < 1e-3, f"max error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


def test_dinov2_detector_shapes_input_and_batching(small_dinov2):
    x = _images(3, 40, 40, seed=5)
    seen, handle = _capture_input(small_dinov2.model.patch_embed)
    try:
        feats = small_dinov2(x)
    finally:
        handle.remove()
    assert feats.shape == (3, 384) and feats.dtype == torch.float32
    torch.testing.assert_close(seen[0], small_dinov2.preprocess(x))  # what the network sees
    parts = torch.cat([small_dinov2(x[:2]), small_dinov2(x[2:])])
    torch.testing.assert_close(parts, feats, rtol=1e-4, atol=1e-5)
    assert small_dinov2.model.pos_embed.shape == (1, 1 + 16 * 16, 384)


def test_dinov2_official_checkpoint_layout_and_position_embedding(tmp_path, small_dinov2):
    """An official-layout checkpoint (518 px: 37x37 position grid, mask_token) loads strictly; its
    position embedding is resampled to 16x16 as DINOv2's interpolate_pos_encoding does."""
    state = {k: v.clone() for k, v in small_dinov2.model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384, generator=gen)
    state["mask_token"] = torch.zeros(1, 384)
    state["blocks.0.ls1.gamma"] = torch.full((384,), 0.5)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    det = metrics.DINOv2Detector(path, arch="vit_small_patch14_dinov2")
    pos = det.model.pos_embed.detach()
    # DINOv2's rule, written out: bicubic (a = -0.75), no antialias, scale (16 + 0.1) / 37.
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    want = want.permute(0, 2, 3, 1).reshape(1, 256, 384)
    torch.testing.assert_close(pos[:, 0], state["pos_embed"][:, 0])
    torch.testing.assert_close(pos[:, 1:], want)
    # ... which is not what resampling to size=16 (timm's default, antialiased) gives.
    timm_way = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True)
    assert (timm_way.permute(0, 2, 3, 1).reshape(1, 256, 384) - want).abs().max() > 1e-3
    torch.testing.assert_close(det.model.blocks[0].ls1.gamma, state["blocks.0.ls1.gamma"])
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not fit"):
        metrics.DINOv2Detector(path, arch="vit_small_patch14_dinov2")


def test_dinov2_pos_embed_rejects_non_square_grids():
    with pytest.raises(ValueError, match="pos_embed"):
        metrics.dinov2_pos_embed(torch.zeros(1, 1 + 10, 8), 4)
    same = torch.randn(1, 1 + 16, 8)
    assert metrics.dinov2_pos_embed(same, 4) is same


@pytest.mark.slow
def test_dinov2_vit_l_detector_random_weights():
    pytest.importorskip("timm")
    det = metrics.get_detector("fd_dinov2", "random")
    assert det.feature_dim == 1024 and det.model.pos_embed.shape == (1, 257, 1024)
    assert sum(p.numel() for p in det.parameters()) > 300e6
    feats = det(_images(2, 64, 64))
    assert feats.shape == (2, 1024) and feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_weights_resolution_without_network(tmp_path, monkeypatch):
    monkeypatch.delenv("EDM2FAST_DINOV2_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain.pth"):
        metrics.resolve_weights("fd_dinov2", cache_dir=str(tmp_path), download=False)
    (tmp_path / "dinov2_vitl14_pretrain.pth").write_bytes(b"")
    assert metrics.resolve_weights("fd_dinov2", cache_dir=str(tmp_path)) == str(tmp_path / "dinov2_vitl14_pretrain.pth")
    assert metrics.resolve_weights("fid", "random") == "random"
    with pytest.raises(TypeError, match="weights"):
        metrics.resolve_weights("fid", 5)


def test_weights_download_checks_the_hash(tmp_path, monkeypatch):
    """Downloads (a file:// URL here: no network) are checked against the SHA-256 prefix, or a pinned hash."""
    import dataclasses
    import hashlib
    src_file = tmp_path / "src" / "weights.pth"
    src_file.parent.mkdir()
    src_file.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(src_file.read_bytes()).hexdigest()
    url = src_file.as_uri()
    dest = tmp_path / "cache" / "weights.pth"
    metrics._download(url, str(dest), digest[:8], "test")
    assert dest.read_bytes() == src_file.read_bytes()
    assert (tmp_path / "cache" / "weights.pth.sha256").read_text().split()[0] == digest
    with pytest.raises(ValueError, match="test"):
        metrics._download(url, str(tmp_path / "cache" / "other.pth"), "00000000", "test")
    assert not (tmp_path / "cache" / "other.pth").exists()
    # No published hash for DINOv2: a pinned one is enforced, and a mismatching file is removed.
    source = dataclasses.replace(metrics._WEIGHTS["fd_dinov2"], url=url)
    monkeypatch.setitem(metrics._WEIGHTS, "fd_dinov2", source)
    monkeypatch.delenv("EDM2FAST_DINOV2_WEIGHTS", raising=False)
    monkeypatch.setenv("EDM2FAST_DINOV2_SHA256", "ab" * 32)
    cache = tmp_path / "cache2"
    with pytest.raises(ValueError, match="EDM2FAST_DINOV2_SHA256"):
        metrics.resolve_weights("fd_dinov2", cache_dir=str(cache))
    assert not (cache / source.filename).exists()
    monkeypatch.setenv("EDM2FAST_DINOV2_SHA256", digest)
    assert metrics.resolve_weights("fd_dinov2", cache_dir=str(cache)) == str(cache / source.filename)


# ----------------------------------------------------------------------------------------------- command line

def _image_folder(path, n, size=16, seed=0):
    from PIL import Image
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(path, f"{i:04d}.png"))
    return str(path)


def test_metrics_help_has_examples(capsys):
    for argv in (["metrics", "--help"], ["metrics", "calc", "--help"], ["metrics", "gen", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "torchrun --standalone --nproc_per_node 8 -m edm2fast metrics gen" in out
    assert "--save-stats" in out and "--fid-weights" in out


def test_metrics_calc_argument_errors(tmp_path, capsys):
    folder = _image_folder(tmp_path / "imgs", 5)
    ref = tmp_path / "ref.npz"
    metrics.save_stats(ref, {"fid": {"mu": np.zeros(2048), "sigma": np.eye(2048)}})
    assert cli.main(["metrics", "calc", "--images", folder, "--ref", str(ref), "--num", "6"]) == 2
    assert "has 5 images, fewer than --num 6" in capsys.readouterr().err
    assert cli.main(["metrics", "calc", "--images", folder, "--ref", str(ref), "--num", "5",
                     "--metrics", "fd_dinov2"]) == 2
    assert "no statistics for fd_dinov2" in capsys.readouterr().err
    assert cli.main(["metrics", "calc", "--images", folder, "--ref", str(tmp_path / "missing.pkl"), "--num", "5",
                     "--metrics", "fid"]) == 2
    assert "--ref" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["metrics", "calc", "--images", folder, "--ref", str(ref), "--metrics", "fid,kid"])
    assert cli.main(["metrics", "ref", "--data", folder, "--dest", str(tmp_path / "ref.pkl")]) == 2
    assert "--dest" in capsys.readouterr().err


def test_calc_subset_is_seeded_and_without_replacement():
    from edm2fast.commands.metrics import subset_indices
    a = subset_indices(203, 200, seed=3)
    assert len(a) == 200 and len(set(a.tolist())) == 200 and (np.diff(a) > 0).all() and a.max() < 203
    np.testing.assert_array_equal(a, subset_indices(203, 200, seed=3))
    assert not np.array_equal(a, subset_indices(203, 200, seed=4))
    np.testing.assert_array_equal(subset_indices(7, 7, seed=0), np.arange(7))
    with pytest.raises(ValueError, match="num"):
        subset_indices(5, 6, seed=0)


@pytest.mark.slow
def test_metrics_ref_then_calc_on_200_images_end_to_end(tmp_path, capsys):
    """Done-when: `metrics calc` on 200 random images with randomly initialised detectors, on CPU."""
    pytest.importorskip("torch_fidelity")
    folder = _image_folder(tmp_path / "imgs", 203, size=12)
    ref = tmp_path / "ref.npz"
    assert cli.main(["metrics", "ref", "--data", _image_folder(tmp_path / "real", 6, size=12, seed=1),
                     "--dest", str(ref), "--metrics", "fid", "--fid-weights", "random", "--no-progress",
                     "--workers", "0"]) == 0
    capsys.readouterr()
    real = metrics.load_stats(ref)["fid"]
    assert real["num_images"] == 6 and real["weights"] == "random" and real["mu"].shape == (2048,)
    # Compare against a point mass at the real mean: then FD = |mu - mu_r|^2 + tr(S), no sqrtm needed to check it.
    point = tmp_path / "point.npz"
    metrics.save_stats(point, {"fid": {"mu": real["mu"], "sigma": np.zeros((2048, 2048)), "weights": "random"}})
    mine = tmp_path / "mine.npz"
    assert cli.main(["metrics", "calc", "--images", folder, "--ref", str(point), "--num", "200", "--seed", "3",
                     "--metrics", "fid", "--fid-weights", "random", "--batch", "50", "--workers", "1",
                     "--no-progress", "--save-stats", str(mine), "--json", str(tmp_path / "r.json")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert result["num_images"] == 200 and result["metrics"] == ["fid"]
    assert json.loads((tmp_path / "r.json").read_text()) == result
    got = metrics.load_stats(mine)["fid"]
    assert got["num_images"] == 200 and got["weights"] == "random"
    expected = np.sum((got["mu"] - real["mu"]) ** 2) + np.trace(got["sigma"])
    assert result["fid"] == pytest.approx(expected, rel=1e-9) and result["fid"] > 0


@pytest.mark.slow
def test_metrics_gen_streams_samples_into_the_detector(tmp_path, capsys):
    pytest.importorskip("torch_fidelity")
    from test_generate_eval import _random_net
    from edm2fast import io as edm_io
    net = tmp_path / "net.safetensors"
    edm_io.save(_random_net(), net, dtype="fp32")
    ref = tmp_path / "ref.npz"
    ref_mu = np.random.default_rng(0).normal(size=2048)
    metrics.save_stats(ref, {"fid": {"mu": ref_mu, "sigma": np.zeros((2048, 2048)), "weights": "random"}})
    out = tmp_path / "gen.npz"
    argv = ["metrics", "gen", "--net", str(net), "--ref", str(ref), "--seeds", "0-4", "--steps", "2",
            "--metrics", "fid", "--fid-weights", "random", "--batch", "3", "--no-progress", "--save-stats", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_images"] == 5 and np.isfinite(result["fid"])
    # The same five samples, drawn by generate and fed to the detector directly.
    from edm2fast.commands import generate
    from edm2fast.data import model_to_pixels
    n = edm_io.load(net)
    seeds = [0, 1, 2, 3, 4]
    x = generate.generate_images(n, seeds, generate.class_labels_for(n, seeds, "random"), num_steps=2)
    det = metrics.get_detector("fid", "random")
    f = det(model_to_pixels(x)).double().numpy()
    got = metrics.load_stats(out)["fid"]
    assert got["num_images"] == 5
    np.testing.assert_allclose(got["mu"], f.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["sigma"], np.cov(f, rowvar=False), rtol=1e-3, atol=1e-5)
    expected = np.sum((got["mu"] - ref_mu) ** 2) + np.trace(got["sigma"])  # FD to a point mass
    assert result["fid"] == pytest.approx(expected, rel=1e-9)
