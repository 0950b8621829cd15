"""The `edm2fast` command line: every command's --help, and a clear error for each bad argument or file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from edm2fast import cli
from edm2fast import io as edm_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]))


def test_every_command_has_help(capsys):
    assert sorted(cli.COMMANDS) == sorted(["train", "generate", "phema", "convert", "dataset", "eval", "sweep",
                                           "metrics", "toy"])
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: edm2fast {name}"), name


def test_help_through_the_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "edm2fast", "--help"], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for name in cli.COMMANDS:
        assert name in proc.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clifiles")
    kw = dict(img_resolution=16, img_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 1], num_blocks=1,
              attn_resolutions=[], channels_per_head=16, dtype="fp32")
    torch.manual_seed(0)
    edm_io.save(edm_io.build_net(**kw), d / "digits.safetensors", nimg=1000, sigma_rel=0.1)
    edm_io.save(edm_io.build_net(**dict(kw, img_resolution=8)), d / "small8.safetensors")
    edm_io.save(edm_io.build_net(**dict(kw, img_channels=3, label_dim=0)), d / "rgb.safetensors")
    (d / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (d / "notes.txt").write_text("hello")
    (d / "emptydir").mkdir()
    (d / "nojson").mkdir()
    return d


def _error(argv, capsys):
    """Run the CLI expecting a user error: exit status 2 and a message on stderr (no traceback)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, f"{argv}: exit {rc}, stderr {err!r}"
    assert "Traceback" not in err
    return err


BAD = [
    # train
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--lr", "-1"], "expected a number >= 0"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--duration", "12x"], "image count"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--batch", "0"], "expected an integer > 0"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--ema-stds", "0.05,0.5"], "outside"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--preset", "nope"], "invalid choice"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--dtype", "fp8"], "invalid choice"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--dropout", "1"], "expected a number < 1"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--snapshot", "500"], "snapshot"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--batch", "64", "--batch-gpu", "48"], "batch_gpu"),
    (["train", "--outdir", "{tmp}/r", "--data", "{files}/missing.zip"], "no such file"),
    (["train", "--outdir", "{tmp}/r", "--data", "{files}/notes.txt"], "notes.txt"),
    (["train", "--outdir", "{tmp}/r", "--data", "{files}/emptydir"], "emptydir"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--backend", "warp-drive"], "warp-drive"),
    (["train"], "--outdir"),
    # generate
    (["generate", "--net", "{files}/missing.safetensors", "--outdir", "{tmp}/g"], "no such file"),
    (["generate", "--net", "{files}/garbage.safetensors", "--outdir", "{tmp}/g"], "garbage.safetensors"),
    (["generate", "--net", "{files}/notes.txt", "--outdir", "{tmp}/g"], "notes.txt"),
    (["generate", "--net", "{files}/emptydir", "--outdir", "{tmp}/g"], "is a folder"),
    (["generate", "--net", "{files}/digits.safetensors", "--outdir", "{tmp}/g", "--seeds", "5-1"], "seeds"),
    (["generate", "--net", "{files}/digits.safetensors", "--outdir", "{tmp}/g", "--seeds", "x"], "seeds"),
    (["generate", "--net", "{files}/digits.safetensors", "--outdir", "{tmp}/g", "--class", "12"], "out of range"),
    (["generate", "--net", "{files}/digits.safetensors", "--outdir", "{tmp}/g", "--class", "two"], "class"),
    (["generate", "--net", "{files}/rgb.safetensors", "--outdir", "{tmp}/g", "--class", "1"], "unconditional"),
    (["generate", "--net", "{files}/digits.safetensors", "--outdir", "{tmp}/g", "--guidance", "2"], "--gnet"),
    (["generate", "--net", "{files}/digits.safetensors", "--gnet", "{files}/small8.safetensors",
      "--outdir", "{tmp}/g"], "--gnet"),
    (["generate", "--net", "{files}/digits.safetensors", "--outdir", "{tmp}/g", "--steps", "0"], "--steps"),
    (["generate", "--net", "{files}/digits.safetensors", "--outdir", "{tmp}/g", "--channels-last", "maybe"],
     "--channels-last"),
    (["train", "--outdir", "{tmp}/r", "--data", "digits16", "--channels-last", "maybe"], "--channels-last"),
    (["generate", "--net", "{files}/digits.safetensors", "--outdir", "{tmp}/g", "--sigma-min", "100"],
     "--sigma-min"),
    # phema
    (["phema", "--indir", "{files}/emptydir", "--std", "0.1"], "no EMA snapshots"),
    (["phema", "--indir", "{files}/nowhere", "--std", "0.1"], "no such folder"),
    (["phema", "--indir", "{files}", "--std", "0.29"], "outside"),
    (["phema", "--indir", "{files}", "--std", ""], "sigma_rel"),
    # eval
    (["eval", "--net", "{files}/rgb.safetensors"], "digits"),
    (["eval", "--net", "{files}/missing.safetensors"], "no such file"),
    (["eval", "--samples", "{files}/nojson"], "samples.json"),
    (["eval", "--samples", "{files}/nowhere"], "no such folder"),
    (["eval"], "one of the arguments --net --samples is required"),
    (["eval", "--net", "{files}/digits.safetensors", "--samples", "{files}/nojson"], "not allowed with"),
    (["eval", "--net", "{files}/digits.safetensors", "--guidance", "3"], "--gnet"),
    # sweep
    (["sweep", "--indir", "{files}/emptydir"], "no EMA snapshots"),
    (["sweep", "--indir", "{files}", "--std", "0.4"], "outside"),
    (["sweep", "--indir", "{files}", "--num", "-3"], "expected an integer > 0"),
]


@pytest.mark.parametrize("argv, match", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_arguments_and_files_give_clear_errors(argv, match, files, tmp_path, capsys):
    argv = [a.replace("{files}", str(files)).replace("{tmp}", str(tmp_path)) for a in argv]
    err = _error(argv, capsys)
    assert match in err, err
    assert err.strip().splitlines()[-1].startswith(("edm2fast", "usage")) or "error:" in err


def test_user_errors_are_one_line(files, tmp_path, capsys):
    err = _error(["generate", "--net", str(files / "garbage.safetensors"), "--outdir", str(tmp_path)], capsys)
    assert err.count("\n") == 1 and err.startswith("edm2fast generate: error: --net:")


def test_sweep_on_a_non_digits_run(tmp_path, capsys):
    kw = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 1], num_blocks=1,
              attn_resolutions=[], channels_per_head=16)
    edm_io.save(edm_io.build_net(**kw), tmp_path / "phema-0000001-0.100.safetensors", nimg=1000, sigma_rel=0.1)
    err = _error(["sweep", "--indir", str(tmp_path), "--std", "0.05"], capsys)
    assert "digits" in err


def test_generate_channels_last_gives_the_same_images(files, tmp_path, monkeypatch):
    """--channels-last runs the U-Net in channels_last; the PNGs match the default run's up to one
    8-bit level (convolution rounding, fp32 on CPU)."""
    import numpy as np
    from PIL import Image
    from edm2fast.commands import generate as gen
    loaded = []
    real = gen.load_net
    monkeypatch.setattr(gen, "load_net", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    outs = {}
    for flag in ("0", "1"):
        rc = cli.main(["generate", "--net", str(files / "digits.safetensors"), "--outdir", str(tmp_path / flag),
                       "--seeds", "0-1", "--steps", "3", "--channels-last", flag, "--device", "cpu"])
        assert rc == 0
        pngs = sorted((tmp_path / flag).rglob("0*.png"))
        assert len(pngs) == 2, sorted((tmp_path / flag).rglob("*"))
        outs[flag] = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in pngs])
    assert [n.channels_last for n in loaded] == [False, True]
    assert np.abs(outs["0"] - outs["1"]).max() <= 1
