"""A drop-in for the authors' release (issue 13): same seeds -> same noise and classes, release flags,
generation presets, downloads (local HTTP server), the authors' files everywhere, phema's release
options, and train's release semantics (DDP gradients, --data/--preset, --cond, log.txt, stats.jsonl)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from edm2fast import cli, convert, download, release_presets, train
from edm2fast import io as edm_io
from edm2fast.commands import generate
from edm2fast.commands import phema as phema_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]), OMP_NUM_THREADS="1")
NET = dict(img_resolution=8, img_channels=3, label_dim=5, model_channels=8, channel_mult=[1, 1], num_blocks=1,
           attn_resolutions=[], channels_per_head=8, dtype="fp32")


def _net(seed=0, **overrides):
    torch.manual_seed(seed)
    net = edm_io.build_net(**dict(NET, **overrides))
    with torch.no_grad():
        net.unet.out_gain.fill_(0.5)
        for name, p in net.named_parameters():
            if name.endswith("emb_gain"):
                p.fill_(0.3)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    edm_io.save(_net(0), d / "main.safetensors", dtype="fp32")
    edm_io.save(_net(1, model_channels=4, channels_per_head=4), d / "guide.safetensors", dtype="fp32")
    return d


# ----------------------------------------------------------------------------------------------
# Same seeds, same images

def release_seed_rule(seed, shape, label_dim, device="cpu"):
    """The release's generate_images.py, literally: one generator per seed draws noise, then class."""
    gen = torch.Generator(device).manual_seed(seed % (1 << 32))
    noise = torch.randn(shape, generator=gen, device=device)
    cls = torch.randint(label_dim, size=[], generator=gen, device=device)
    return noise, int(cls), gen


def _capture_sampler(monkeypatch):
    from edm2fast import sampler
    calls = []
    real = sampler.edm_sampler

    def spy(net, noise, labels=None, **kwargs):
        calls.append({"noise": noise.clone(), "labels": None if labels is None else labels.clone(),
                      "churn": kwargs["randn_like"](noise)})
        return real(net, noise, labels, **dict(kwargs, num_steps=1))
    monkeypatch.setattr(sampler, "edm_sampler", spy)
    return calls


@pytest.mark.parametrize("seeds", [[0, 1, 2, 3, 4, 5], [7, 2 ** 32 + 7, 123456]])
def test_seed_to_noise_and_class_is_the_releases(monkeypatch, seeds):
    net = _net()
    calls = _capture_sampler(monkeypatch)
    generate.generate_images(net, seeds, None, num_steps=1, batch=4)
    noise = torch.cat([c["noise"] for c in calls])
    labels = torch.cat([c["labels"] for c in calls])
    churn = torch.cat([c["churn"] for c in calls])
    for k, s in enumerate(seeds):
        want_noise, want_cls, gen = release_seed_rule(s, [3, 8, 8], 5)
        assert torch.equal(noise[k], want_noise), s
        assert torch.equal(labels[k], torch.nn.functional.one_hot(torch.tensor(want_cls), 5).float()), s
        # The same generator drives the sampler's randn_like after the class draw.
        assert torch.equal(churn[k], torch.randn([3, 8, 8], generator=gen)), s
    # samples.json's classes follow the same rule, whatever the batch.
    assert generate.class_labels_for(net, seeds, None) == [release_seed_rule(s, [3, 8, 8], 5)[1] for s in seeds]


def test_fixed_class_still_draws_the_release_class_first(monkeypatch):
    """With --class the release still draws the random class, so churn noise stays the same."""
    net = _net()
    calls = _capture_sampler(monkeypatch)
    generate.generate_images(net, [3, 4], [1, 1], num_steps=1)
    assert calls[0]["labels"].argmax(1).tolist() == [1, 1]
    for k, s in enumerate([3, 4]):
        _, _, gen = release_seed_rule(s, [3, 8, 8], 5)
        assert torch.equal(calls[0]["churn"][k], torch.randn([3, 8, 8], generator=gen))


def _gen(args, capsys=None):
    assert cli.main(["generate", "--steps", "2"] + [str(a) for a in args]) == 0


def _pngs(folder):
    from PIL import Image
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            if n.endswith(".png") and n != "grid.png":
                path = os.path.join(dirpath, n)
                out[os.path.relpath(path, folder)] = np.asarray(Image.open(path))
    return out


def test_gnet_without_guidance_is_no_guidance(nets, tmp_path, capsys):
    _gen(["--net", nets / "main.safetensors", "--seeds", "0-3", "--outdir", tmp_path / "a"])
    _gen(["--net", nets / "main.safetensors", "--gnet", nets / "guide.safetensors", "--seeds", "0-3",
          "--outdir", tmp_path / "b"])
    assert "not used with guidance 1" in capsys.readouterr().out
    _gen(["--net", nets / "main.safetensors", "--gnet", nets / "guide.safetensors", "--guidance", "2",
          "--seeds", "0-3", "--outdir", tmp_path / "c"])
    a, b, c = _pngs(tmp_path / "a"), _pngs(tmp_path / "b"), _pngs(tmp_path / "c")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_churn_flags(nets, tmp_path):
    base = ["--net", nets / "main.safetensors", "--seeds", "0-2"]
    _gen(base + ["--outdir", tmp_path / "plain"])
    _gen(base + ["--S_churn", "40", "--outdir", tmp_path / "churn"])
    # S_min above sigma_max: churn never applies; S_noise 0 with churn: t_hat moves but no noise.
    _gen(base + ["--S_churn", "40", "--S_min", "100", "--S_max", "inf", "--outdir", tmp_path / "off"])
    _gen(base + ["--S_churn", "40", "--S_noise", "0", "--outdir", tmp_path / "nonoise"])
    plain, churn, off, nonoise = (_pngs(tmp_path / d) for d in ("plain", "churn", "off", "nonoise"))
    assert all(np.array_equal(plain[k], off[k]) for k in plain)
    assert any(not np.array_equal(plain[k], churn[k]) for k in plain)
    assert any(not np.array_equal(churn[k], nonoise[k]) for k in plain)
    args = cli.build_parser().parse_args(["generate", "--net", "x", "--outdir", "o", "--sigma_min", "0.01",
                                          "--sigma_max", "60"])
    assert (args.sigma_min, args.sigma_max, args.batch) == (0.01, 60.0, 32)  # release spellings, release batch


def test_subdirs(nets, tmp_path):
    _gen(["--net", nets / "main.safetensors", "--seeds", "998-1001", "--subdirs", "--outdir", tmp_path])
    assert sorted(_pngs(tmp_path)) == ["000000/000998.png", "000000/000999.png", "001000/001000.png",
                                       "001000/001001.png"]


def test_shards_cover_every_seed_once():
    seeds = list(range(5, 5 + 103))
    for world in (1, 2, 3, 8):
        shards = [generate.shard_seeds(seeds, 4, r, world) for r in range(world)]
        assert sorted(s for sh in shards for s in sh) == seeds
    # The release's split: batches of at most `batch`, dealt round-robin.
    assert generate.shard_seeds(list(range(10)), 2, 0, 2) == [0, 1, 4, 5, 8]


@pytest.mark.slow
def test_torchrun_generate_gives_the_same_images(nets, tmp_path):
    single = tmp_path / "one"
    _gen(["--net", nets / "main.safetensors", "--seeds", "0-6", "--outdir", single, "--batch", "2"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "edm2fast",
           "generate", "--steps", "2", "--net", str(nets / "main.safetensors"), "--seeds", "0-6", "--batch", "2",
           "--outdir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    one, two = _pngs(single), _pngs(tmp_path / "two")
    assert sorted(one) == sorted(two) and all(np.array_equal(one[k], two[k]) for k in one)
    info = json.load(open(tmp_path / "two" / "samples.json"))
    assert info["classes"] == json.load(open(single / "samples.json"))["classes"]
    assert os.path.isfile(tmp_path / "two" / "grid.png")


# ----------------------------------------------------------------------------------------------
# Generation presets

def test_all_release_presets():
    table = os.path.join(os.path.dirname(ROOT), "shared", "data", "release_generation_presets.json")
    if not os.path.exists(table):
        table = "/work/shared/data/release_generation_presets.json"
    ref = json.load(open(table))
    assert len(release_presets.RELEASE_PRESETS) == 36 == len(ref["presets"])
    for p in ref["presets"]:
        got = release_presets.resolve(p["preset"])
        assert got["net"] == ref["model_root"] + "/" + p["net"]
        assert got["gnet"] == (None if "gnet" not in p else ref["model_root"] + "/" + p["gnet"])
        assert got["guidance"] == p.get("guidance", 1.0) and got["reported"] == p["reported_value"]
    kinds = [n for n in release_presets.RELEASE_PRESETS]
    assert sum("-guid-" in n for n in kinds) == 12 and sum("-autog-" in n for n in kinds) == 8


def test_preset_with_overrides(nets, tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--preset", "edm2-img512-s-autog-fid", "--outdir", "o"])
    net, gnet, w = generate.resolve_networks(args)
    assert net.endswith("/edm2-img512-s-2147483-0.070.pkl") and gnet.endswith("/edm2-img512-xs-0134217-0.125.pkl")
    assert w == 2.1
    args = parser.parse_args(["generate", "--preset", "edm2-img512-s-autog-fid", "--net", "a.pkl", "--gnet", "b.pkl",
                              "--guidance", "1.5", "--outdir", "o"])
    assert generate.resolve_networks(args) == ("a.pkl", "b.pkl", 1.5)
    args = parser.parse_args(["generate", "--preset", "edm2-img512-s-fid", "--outdir", "o"])
    assert generate.resolve_networks(args)[1:] == (None, 1.0)
    # End to end with local files standing in for the published ones: the preset's guidance is used.
    _gen(["--preset", "edm2-img512-s-autog-fid", "--net", nets / "main.safetensors", "--gnet",
          nets / "guide.safetensors", "--seeds", "0-1", "--outdir", tmp_path / "p"])
    _gen(["--net", nets / "main.safetensors", "--gnet", nets / "guide.safetensors", "--guidance", "2.1",
          "--seeds", "0-1", "--outdir", tmp_path / "q"])
    p, q = _pngs(tmp_path / "p"), _pngs(tmp_path / "q")
    assert all(np.array_equal(p[k], q[k]) for k in p)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--preset", "edm2-img512-s-nope", "--outdir", "o"])
    assert cli.main(["generate", "--outdir", str(tmp_path / "r")]) == 2  # neither --net nor --preset


# ----------------------------------------------------------------------------------------------
# Downloads from a local HTTP server

class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list = []
    lie_about = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name in self.lie_about:  # announce more bytes than sent: an interrupted download
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"\x00" * 100)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    handler = type("H", (_Handler,), {"requests": [], "lie_about": set()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def test_download_once_atomic_and_cached(server, tmp_path):
    root, url, handler = server
    (root / "a.bin").write_bytes(b"x" * 3000)
    p1 = download.fetch(f"{url}/a.bin", progress=False)
    p2 = download.fetch(f"{url}/a.bin", progress=False)
    assert p1 == p2 and open(p1, "rb").read() == b"x" * 3000
    assert p1.startswith(str(tmp_path / "cache")) and handler.requests == ["/a.bin"]  # fetched once
    with pytest.raises(FileNotFoundError, match="--net.*404"):
        download.fetch(f"{url}/missing.pkl", what="--net", progress=False)
    handler.lie_about.add("cut.bin")
    with pytest.raises(FileNotFoundError, match="incomplete|interrupted"):
        download.fetch(f"{url}/cut.bin", progress=False)
    folder = os.path.dirname(download.cached_path(f"{url}/cut.bin"))
    assert [n for n in os.listdir(folder) if "cut" in n] == []  # nothing torn left behind
    assert download.fetch(str(root / "a.bin")) == str(root / "a.bin")  # a local path is itself


def test_generate_and_convert_from_urls(server, nets, tmp_path):
    root, url, handler = server
    import shutil
    shutil.copy(nets / "main.safetensors", root / "main.safetensors")
    _gen(["--net", f"{url}/main.safetensors", "--seeds", "0-1", "--outdir", tmp_path / "u"])
    _gen(["--net", nets / "main.safetensors", "--seeds", "0-1", "--outdir", tmp_path / "l"])
    u, l_ = _pngs(tmp_path / "u"), _pngs(tmp_path / "l")
    assert all(np.array_equal(u[k], l_[k]) for k in u)
    assert cli.main(["generate", "--net", f"{url}/nope.pkl", "--outdir", str(tmp_path / "x")]) == 2


# ----------------------------------------------------------------------------------------------
# The authors' files everywhere

@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """An authors'-format pickle of a known network (the converter tests' stand-in for their code)."""
    from test_convert import FAKE_DNNLIB, FAKE_PERSISTENCE, KW, as_official, make_net
    root = tmp_path_factory.mktemp("authors_code")
    for pkg, src in (("torch_utils", FAKE_PERSISTENCE), ("dnnlib", FAKE_DNNLIB)):
        (root / pkg).mkdir()
        (root / pkg / "__init__.py").write_text("")
        (root / pkg / ("persistence.py" if pkg == "torch_utils" else "util.py")).write_text(src)
    sys.path.insert(0, str(root))
    import torch_utils.persistence as persistence
    d = tmp_path_factory.mktemp("authors")
    nets, kw = {}, dict(KW, img_channels=3)  # RGB: PNGs can be written
    for kimg, std, seed in ((1000, 0.050, 1), (1000, 0.100, 2), (2000, 0.050, 3), (2000, 0.100, 4)):
        net = make_net(seed, img_channels=3)
        nets[(kimg, std)] = net
        import pickle
        with open(d / f"network-snapshot-{kimg:07d}-{std:.3f}.pkl", "wb") as f:
            pickle.dump(dict(ema=as_official(net, persistence, kw)), f)
    yield d, nets, kw
    sys.path.remove(str(root))
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        sys.modules.pop(name, None)


def test_release_file_names():
    p = convert.parse_release_name
    assert p("network-snapshot-0134217-0.100.pkl") == {"kind": "snapshot", "prefix": "network-snapshot",
                                                        "kimg": 134217, "nimg": 134217000, "sigma_rel": 0.1}
    assert p("edm2-img512-xs-2147483-0.135.pkl")["preset"] == "edm2-img512-xs"
    u = p("edm2-img512-xs-uncond-2147483-0.045.pkl")
    assert (u["preset"], u["uncond"], u["sigma_rel"]) == ("edm2-img512-xs", True, 0.045)
    assert p("training-state-0134217.pt") == {"kind": "training-state", "kimg": 134217, "nimg": 134217000}
    assert p("phema-0000131-0.100.safetensors") is None
    assert convert.metadata_from_filename("edm2-img64-s-uncond-1073741-0.075.pkl")["nimg"] == 1073741000


def test_generate_with_an_authors_pickle(authors, tmp_path):
    d, nets, _ = authors
    path = d / "network-snapshot-0002000-0.100.pkl"
    net = edm_io.load(path)
    assert net.snapshot_metadata["nimg"] == 2000000 and net.snapshot_metadata["sigma_rel"] == 0.1
    edm_io.save(nets[(2000, 0.100)], tmp_path / "same.safetensors", dtype="fp32", **{})
    _gen(["--net", path, "--seeds", "0-1", "--outdir", tmp_path / "pkl"])
    _gen(["--net", tmp_path / "same.safetensors", "--seeds", "0-1", "--outdir", tmp_path / "st"])
    a, b = _pngs(tmp_path / "pkl"), _pngs(tmp_path / "st")
    assert a and all(np.array_equal(a[k], b[k]) for k in a)


def test_phema_from_authors_pickles_with_release_options(authors, tmp_path, capsys):
    d, nets, kw = authors
    # The same snapshots as our files: the reconstructions must agree.
    ours = tmp_path / "ours"
    ours.mkdir()
    for (kimg, std), net in nets.items():
        edm_io.save_state_dict(net.state_dict(), ours / train.snapshot_name("run", kimg * 1000, std),
                               dict(kw, dtype="fp32"), dtype="fp32", nimg=kimg * 1000, sigma_rel=std)
    assert cli.main(["phema", "--indir", str(d), "--outdir", str(tmp_path / "a"), "--outstd", "0.06,0.07,...,0.09",
                     "--outkimg", "2000", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "sigma_rel 0.060, 0.070, 0.080, 0.090 at 2000000 images from 4 snapshots" in out
    assert cli.main(["phema", "--indir", str(ours), "--outdir", str(tmp_path / "b"), "--std", "0.06,0.07,0.08,0.09",
                     "--dtype", "fp32"]) == 0
    a = sorted(os.listdir(tmp_path / "a"))
    assert a == [f"network-snapshot-0002000-0.0{k}0.safetensors" for k in (6, 7, 8, 9)]
    got = edm_io.load_state_dict(tmp_path / "a" / a[1])
    want = edm_io.load_state_dict(tmp_path / "b" / "run-0002000-0.070.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    # --instd keeps only some inputs; --skip leaves existing outputs alone.
    capsys.readouterr()
    assert cli.main(["phema", "--indir", str(d), "--outdir", str(tmp_path / "a"), "--outstd", "0.07,0.12",
                     "--instd", "0.100", "--skip"]) == 0
    out = capsys.readouterr().out
    assert "from 2 snapshots" in out and "skipped 1 existing" in out
    assert os.path.exists(tmp_path / "a" / "network-snapshot-0002000-0.120.safetensors")


def test_phema_indir_url(server, authors, tmp_path, capsys):
    root, url, handler = server
    d, _, _ = authors
    import shutil
    for n in os.listdir(d):
        shutil.copy(d / n, root / n)
    (root / "notes.txt").write_text("not a snapshot")
    assert cli.main(["phema", "--indir", f"{url}/", "--outdir", str(tmp_path / "o"), "--outstd", "0.08",
                     "--instd", "0.05,0.1"]) == 0
    assert os.listdir(tmp_path / "o") == ["network-snapshot-0002000-0.080.safetensors"]
    assert "/notes.txt" not in handler.requests
    assert cli.main(["phema", "--indir", f"{url}/", "--outstd", "0.08"]) == 2  # --outdir needed for a URL


def test_float_list_ranges():
    f = phema_cmd.parse_float_list
    assert f("0.010,0.015,...,0.030") == pytest.approx([0.010, 0.015, 0.020, 0.025, 0.030])
    assert len(f("0.010,0.015,...,0.250")) == 49 and f("0.010,0.015,...,0.250")[-1] == 0.25
    assert f("0.1, 0.05") == [0.1, 0.05]
    assert f("0.05,0.1,...,0.2,0.25") == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25])
    for bad in ("...,0.2", "0.1,...,0.2", "0.1,0.2,...", "0.1,0.2,...,0.05", "0.1,0.2,...,0.25"):
        with pytest.raises(ValueError):
            f(bad)


def _release_training_state(path, nets, stds=(0.05, 0.1)):
    raw = nets[0].state_dict()
    data = dict(state=dict(cur_nimg=2048000, total_elapsed_time=12.5), net=raw,
                loss_fn=dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5),
                optimizer=dict(state={}, param_groups=[dict(lr=0.01, betas=(0.9, 0.99), params=[0, 1])]),
                ema=dict(stds=list(stds), emas=[n.state_dict() for n in nets[1:]]))
    torch.save(data, path)


def test_training_state_pt(tmp_path, capsys):
    torch.manual_seed(0)
    raw, e1, e2 = _net(0), _net(1), _net(2)
    path = tmp_path / "training-state-0002048.pt"
    _release_training_state(path, [raw, e1, e2])
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    labels = torch.eye(5)[[1, 3]]
    for key, want in ((None, e1), ("ema1", e2), ("ema:0.100", e2), ("net", raw)):
        got = edm_io.load(path, key=key)
        assert torch.equal(got(x, sigma, labels), want(x, sigma, labels)), key
    meta = edm_io.load(path).snapshot_metadata
    assert meta["nimg"] == 2048000 and meta["sigma_rel"] == 0.05
    kw = convert.kwargs_from_state_dict(raw.state_dict())
    assert {k: kw[k] for k in ("img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult")} == \
        dict(img_resolution=8, img_channels=3, label_dim=5, model_channels=8, channel_mult=[1, 1])
    with pytest.raises(ValueError, match="no index 5"):
        edm_io.load(path, key="ema5")
    assert cli.main(["convert", str(path), str(tmp_path / "e.safetensors"), "--ema", "ema:0.1", "--dtype", "fp32"]) == 0
    assert torch.equal(edm_io.load(tmp_path / "e.safetensors")(x, sigma, labels), e2(x, sigma, labels))
    _gen(["--net", path, "--seeds", "0", "--outdir", tmp_path / "g"])


def test_training_state_is_read_without_running_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    torch.save(dict(net=_net().state_dict(), ema=Evil()), tmp_path / "training-state-0000001.pt")
    with pytest.raises(convert.UnsafePickleError, match="system"):
        edm_io.load(tmp_path / "training-state-0000001.pt")
    assert not os.path.exists(tmp_path / "pwned")


def test_no_import_cycle_between_io_and_convert():
    src = open(os.path.join(ROOT, "python", "edm2fast", "convert.py")).read()
    assert "import io as edm_io" not in src and "from . import io" not in src and "from .io" not in src
    code = "import sys, edm2fast.convert; print('edm2fast.io' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------------------------------
# Training semantics

def test_train_requires_data_and_defaults_to_the_releases_preset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--outdir", str(tmp_path)])
    assert "--data" in capsys.readouterr().err
    assert cli.main(["train", "--outdir", str(tmp_path / "r"), "--data", "digits16", "-n"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads(out[:out.rindex("}") + 1])
    assert cfg["preset"] == "edm2-img512-s" and cfg["network"]["model_channels"] == 192
    assert cfg["status"] == 128 * 1024 and cfg["dataset"]["label_dim"] == 10 and "dry run" in out
    assert not os.path.exists(tmp_path / "r")  # nothing written
    assert cli.main(["train", "--outdir", str(tmp_path / "r"), "--data", "digits16", "--preset", "digits",
                     "--dry-run", "--fp16=0", "--ls", "2", "--batch-gpu", "0", "--bench", "0", "--cond=0"]) == 0
    cfg = json.loads(capsys.readouterr().out.split("\ndry run")[0])
    assert (cfg["dtype"], cfg["loss_scale"], cfg["batch_gpu"], cfg["bench"], cfg["cond"]) == ("fp32", 2.0, None,
                                                                                              False, False)
    assert cfg["dataset"]["label_dim"] == 0


def test_cond_on_unlabelled_data_is_an_error(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(folder / f"{k}.png")
    assert cli.main(["train", "--outdir", str(tmp_path / "r"), "--data", str(folder), "--preset", "tiny",
                     "--cond", "-n"]) == 2
    assert "has no labels" in capsys.readouterr().err
    assert cli.main(["train", "--outdir", str(tmp_path / "r"), "--data", str(folder), "--preset", "tiny", "-n"]) == 0
    assert cli.main(["train", "--outdir", str(tmp_path / "r"), "--data", str(folder), "--preset", "tiny",
                     "--cond", "--uncond", "-n"]) == 2


SMALL_NET = dict(model_channels=16, channel_mult=[1, 2], attn_resolutions=[], channels_per_head=32)


def test_log_txt_and_release_stats_fields(tmp_path):
    cfg = train.TrainConfig(run_dir=str(tmp_path), data="digits16", preset="tiny", network=SMALL_NET, batch=32,
                            duration=64, snapshot=1024, checkpoint=64, status=32, progress=False)
    train.train(cfg, log=lambda m: None)
    log = open(tmp_path / "log.txt").read()
    assert "training tiny" not in log and "kimg" in log and "training finished" in log
    stats = [json.loads(line) for line in open(tmp_path / "stats.jsonl")]
    assert len(stats) == 2
    for key in ("Loss/loss", "Loss/loss_std", "Progress/kimg", "Progress/tick", "Progress/augment", "Progress/lr",
                "Timing/sec_per_kimg", "Timing/sec_per_tick", "Timing/total_sec", "Timing/images_per_sec",
                "Timing/maintenance_sec", "Resources/cpu_mem_gb", "Resources/peak_gpu_mem_gb", "timestamp",
                "loss", "nimg"):
        assert key in stats[-1], key
    assert stats[-1]["Progress/tick"] == 2 and stats[-1]["Progress/kimg"] == 0.064
    assert stats[-1]["Loss/loss"] == stats[-1]["loss"] and stats[-1]["Loss/loss_std"] > 0
    assert stats[-1]["Timing/total_sec"] >= stats[0]["Timing/total_sec"] > 0


DDP_WORKER = r'''
import os, sys, torch
from safetensors.torch import save_file
sys.path[:0] = [os.path.join(sys.argv[3], "tests")]
from test_release_compat import ddp_gradients
grads, rank = ddp_gradients(sys.argv[1])
if rank == 0:
    save_file(grads, sys.argv[2])
'''


def ddp_gradients(run_dir):
    """One step's gradients, with a loss that depends on each image alone (not on the rank's seeds)."""
    cfg = train.TrainConfig(run_dir=run_dir, data="digits16", preset="tiny", network=SMALL_NET, batch=16,
                            duration=1024, progress=False, batch_gpu=4)

    def loss_fn(net, images, labels, generator=None):
        sigma = torch.full([images.shape[0], 1, 1, 1], 0.7)
        noisy = images + sigma * torch.sin(3 * images + 1)  # fixed "noise" per image
        D, logvar = net(noisy, sigma, labels, return_logvar=True)
        return (D - images) ** 2 / logvar.exp() + logvar

    trainer = train.Trainer(cfg, log=lambda m: None)
    try:
        trainer.loss_fn = loss_fn
        trainer._prepare()
        trainer.accumulate_gradients()
        grads = {n: p.grad.detach().clone().contiguous() for n, p in trainer.net.named_parameters()
                 if p.grad is not None}
        return grads, trainer.rank
    finally:
        trainer.close()


@pytest.mark.slow
def test_ddp_gradients_equal_one_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path / "ddp"), str(tmp_path / "grads.safetensors"), ROOT]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file
    two = load_file(str(tmp_path / "grads.safetensors"))
    one, _ = ddp_gradients(str(tmp_path / "single"))
    assert one.keys() == two.keys() and len(one) > 10
    for k in one:
        scale = one[k].abs().max().item()
        err = (one[k] - two[k]).abs().max().item()
        assert err <= 1e-5 * max(scale, 1e-6), f"{k}: max |diff| {err:.3g} (scale {scale:.3g}, ratio " \
            f"{(two[k].norm() / one[k].norm()).item():.3f})"
