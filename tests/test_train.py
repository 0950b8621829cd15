"""The trainer (spec §6-7): short CPU runs, bit-exact resume, atomic checkpoints, 2-process Gloo DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from edm2fast import io as edm_io
from edm2fast import schedule, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]), OMP_NUM_THREADS="1")

# A small, fast configuration: 16 px digits, 0.17M parameters (two levels, attention only in the middle).
SMALL_NET = dict(model_channels=16, channel_mult=[1, 2], attn_resolutions=[], channels_per_head=32)
FAST = dict(data="digits16", preset="tiny", network=SMALL_NET, batch=32, duration=1024, snapshot=1024,
            checkpoint=512, status=256, progress=False, lr=0.01, rampup=0.001)


def _config(run_dir, **overrides):
    return train.TrainConfig(run_dir=str(run_dir), **dict(FAST, **overrides))


def _quiet(msg):
    pass


def _final_state(run_dir):
    (nimg, path), *_ = train.find_checkpoints(str(run_dir))
    state, meta = edm_io.load_state(path)
    return nimg, state, meta


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max abs diff {(a[k].double() - b[k].double()).abs().max()})"


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, n", [("4096", 4096), ("128Ki", 128 * 1024), ("8Mi", 8 << 20), ("100k", 100_000),
                                     ("2.5M", 2_500_000), ("3kimg", 3000), (512, 512)])
def test_parse_nimg(text, n):
    assert train.parse_nimg(text) == n


@pytest.mark.parametrize("bad", ["", "12x", "-5", "1.5", "Mi", True])
def test_parse_nimg_rejects(bad):
    with pytest.raises(ValueError, match="duration"):
        train.parse_nimg(bad, "duration")


def test_snapshot_name():
    assert train.snapshot_name("phema", 2_097_152, 0.05) == "phema-0002097-0.050.safetensors"


@pytest.mark.parametrize("overrides, match", [
    (dict(snapshot=512), "snapshot"), (dict(ema_stds=(0.05, 0.3)), "ema_stds"), (dict(preset="nope"), "preset"),
    (dict(batch=0), "batch"), (dict(dropout=1.5), "dropout"), (dict(dtype="fp8"), "dtype"),
    (dict(ema_stds=(0.05, 0.0501)), "ema_stds"), (dict(lr=-1.0), "lr"), (dict(prefix="a/b"), "prefix"),
])
def test_config_validation(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train.Trainer(_config(tmp_path, **overrides), log=_quiet)


def test_batch_gpu_must_divide_batch(tmp_path):
    with pytest.raises(ValueError, match="batch_gpu"):
        train.Trainer(_config(tmp_path, batch=32, batch_gpu=12), log=_quiet)


def test_short_cpu_training_run(tmp_path):
    lines = []
    result = train.train(_config(tmp_path, duration=2048, snapshot=1024), log=lines.append)
    assert result["finished"] and result["cur_nimg"] == 2048
    files = sorted(os.listdir(tmp_path))
    snaps = [f for f in files if f.startswith("phema-")]
    assert snaps == ["phema-0000001-0.050.safetensors", "phema-0000001-0.100.safetensors",
                     "phema-0000002-0.050.safetensors", "phema-0000002-0.100.safetensors"]
    assert "training_options.json" in files
    assert [n for n, _ in train.find_checkpoints(str(tmp_path))] == [2048, 1536]  # keep_checkpoints=2
    assert not [f for f in files if ".tmp" in f]

    # Snapshots rebuild their network from the file alone, with the trainer's metadata.
    meta = edm_io.read_metadata(tmp_path / snaps[-1])
    assert meta["nimg"] == 2048 and meta["sigma_rel"] == pytest.approx(0.1)
    assert meta["preset"] == "tiny" and meta["dataset"] == "digits16"
    assert meta["net_kwargs"]["label_dim"] == 10 and meta["net_kwargs"]["img_resolution"] == 16
    assert meta["net_kwargs"]["channel_mult"] == [1, 2]
    net = edm_io.load(tmp_path / snaps[-1])
    assert not net.training
    x = torch.randn(2, 1, 16, 16)
    out = net(x, torch.tensor([1.0, 2.0]), torch.eye(10)[:2])
    assert out.shape == x.shape and torch.isfinite(out).all()

    # stats.jsonl: one record per status interval, with the schedule's learning rate; loss decreases.
    stats = [json.loads(line) for line in open(tmp_path / "stats.jsonl")]
    assert [r["nimg"] for r in stats] == list(range(256, 2049, 256))
    for r in stats:
        assert r["lr"] == pytest.approx(schedule.learning_rate(r["nimg"] - 32, 32, 0.01, 2000, 0.001))
        assert r["sec_per_kimg"] > 0 and r["peak_mem_gib"] > 0
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert any("sec/kimg" in line and "loss" in line for line in lines)

    # Rerunning a finished run does nothing and keeps the result.
    again = train.train(_config(tmp_path, duration=2048, snapshot=1024), log=_quiet)
    assert again["cur_nimg"] == 2048 and again["fingerprint"] == result["fingerprint"]


def test_resume_is_bit_identical(tmp_path):
    """Stopping with --slice at odd points and resuming gives the uninterrupted run's weights, bit for bit."""
    cfg = dict(duration=640, dropout=0.1)  # dropout: the global RNG must be reseeded every step too
    full = train.train(_config(tmp_path / "full", **cfg), log=_quiet)
    sliced_dir = tmp_path / "sliced"
    results = []
    while not results or not results[-1]["finished"]:
        results.append(train.train(_config(sliced_dir, slice=192, **cfg), log=_quiet))
        assert len(results) < 10
    assert [r["cur_nimg"] for r in results] == [192, 384, 576, 640]
    assert results[-1]["fingerprint"] == full["fingerprint"]
    _, a, meta_a = _final_state(tmp_path / "full")
    _, b, meta_b = _final_state(sliced_dir)
    _assert_same_tensors(a["net"], b["net"], "net")
    _assert_same_tensors(a["ema"], b["ema"], "ema")
    _assert_same_tensors(a["optimizer"]["state"][0], b["optimizer"]["state"][0], "adam state")
    for std in ("0.050", "0.100"):
        name = f"phema-0000000-{std}.safetensors"
        _assert_same_tensors(edm_io.load_state_dict(tmp_path / "full" / name),
                             edm_io.load_state_dict(sliced_dir / name), name)


def test_resume_with_different_config_is_a_clear_error(tmp_path):
    train.train(_config(tmp_path, slice=64), log=_quiet)
    with pytest.raises(train.ConfigMismatchError, match=r"lr: 0\.01 in the checkpoint, 0\.02 now"):
        train.train(_config(tmp_path, lr=0.02), log=_quiet)
    # Changing only what does not affect the weights is fine (here: the duration and intervals).
    r = train.train(_config(tmp_path, slice=32, duration=2048, status=32), log=_quiet)
    assert r["cur_nimg"] == 96


def test_data_loader_workers_follow_the_same_order(tmp_path):
    """--workers > 0 reads through a DataLoader; the batches (so the weights) must not change."""
    a = train.train(_config(tmp_path / "a", duration=96, workers=0), log=_quiet)
    b = train.train(_config(tmp_path / "b", duration=96, workers=1), log=_quiet)
    assert a["fingerprint"] == b["fingerprint"]


_KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from edm2fast import io as edm_io, train

    def dying_write(tensors, path, header):
        with open(path, "wb") as f:          # half a file, then the process is killed
            f.write(b"\\0" * 1000)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    edm_io._write_safetensors = dying_write
    cfg = train.TrainConfig(**{json_cfg})
    train.train(cfg, log=lambda m: None)
""")


def test_killed_write_never_corrupts_the_previous_checkpoint(tmp_path):
    first = train.train(_config(tmp_path, slice=64), log=_quiet)
    (nimg, path), = train.find_checkpoints(str(tmp_path))
    before = open(path, "rb").read()
    cfg = _config(tmp_path, slice=64).__dict__
    script = _KILL_MID_WRITE.replace("{json_cfg}", repr(cfg))
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    # The previous checkpoint is untouched and still the newest valid one; no torn file took its place.
    assert open(path, "rb").read() == before
    assert [n for n, _ in train.find_checkpoints(str(tmp_path))] == [64]
    assert any(".tmp-" in f for f in os.listdir(tmp_path))  # the killed writer's temporary file
    # Resuming continues from it and reaches the uninterrupted result.
    resumed = train.train(_config(tmp_path, slice=64), log=_quiet)
    assert resumed["cur_nimg"] == 128
    straight = train.train(_config(tmp_path / "straight", slice=128), log=_quiet)
    assert resumed["fingerprint"] == straight["fingerprint"]
    assert first["cur_nimg"] == 64


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    train.train(_config(tmp_path, slice=64, checkpoint=32), log=_quiet)
    (n_new, newest), (n_old, _) = train.find_checkpoints(str(tmp_path))
    assert (n_new, n_old) == (64, 32)
    with open(newest, "r+b") as f:  # truncate it, as a full disk would
        f.truncate(4096)
    lines = []
    trainer = train.Trainer(_config(tmp_path), log=lines.append)
    assert trainer.resume() and trainer.cur_nimg == 32
    assert any("skipping unreadable checkpoint" in m for m in lines)


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    """torchrun, 2 CPU processes with Gloo: trains, rank 0 alone writes, identical weights on both ranks."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edm2fast", "train", "--outdir", str(out), "--data", "digits16", "--preset", "tiny",
           "--batch", "32", "--batch-gpu", "8", "--duration", "128", "--snapshot", "1024", "--checkpoint", "64",
           "--status", "64", "--no-progress", "--lr", "0.01", "--rampup", "0.001"]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    assert "batch 32 (2 x 8 x 2 processes)" in log
    assert log.count("training finished") == 1  # status lines come from rank 0 only
    assert log.count("identical on 2 processes") == 2  # checkpoints at 64 and 128: ranks compared each time
    files = sorted(os.listdir(out))
    assert files == ["log.txt", "phema-0000000-0.050.safetensors", "phema-0000000-0.100.safetensors", "stats.jsonl",
                     "training-state-000000000064.safetensors", "training-state-000000000128.safetensors",
                     "training_options.json"]
    assert open(out / "log.txt").read().count("training finished") == 1  # rank 0's console output
    stats = [json.loads(line) for line in open(out / "stats.jsonl")]
    assert [r["nimg"] for r in stats] == [64, 128]  # written once, not once per rank
    assert json.load(open(out / "training_options.json"))["world_size"] == 2
    # The fingerprint both ranks agreed on is the checkpoint's network.
    fp = log.split("weights sha256 ")[-1].split()[0]
    state, meta = edm_io.load_state(out / "training-state-000000000128.safetensors")
    net = edm_io.build_net(**meta["network_kwargs"], dtype="fp32")  # the 'tiny' preset (CLI run)
    net.load_state_dict(state["net"])
    assert train._fingerprint(net) == fp


def test_final_snapshot_never_replaces_an_interval_snapshot(tmp_path):
    lines = []
    trainer = train.Trainer(_config(tmp_path), log=lines.append)
    os.makedirs(tmp_path, exist_ok=True)
    trainer.cur_nimg = 1024
    first = trainer.save_snapshots()
    assert [os.path.basename(p) for p in first] == ["phema-0000001-0.050.safetensors",
                                                    "phema-0000001-0.100.safetensors"]
    trainer.cur_nimg = 1536  # the end of training, same kimg: the interval snapshot stays
    assert trainer.save_snapshots() == []
    assert edm_io.read_metadata(first[0])["nimg"] == 1024
    assert any("no final snapshot" in m for m in lines)


def test_channels_last_run_matches_the_default_run(tmp_path):
    """--channels-last: the U-Net trains in channels_last (its activations too), and the weights after a
    few steps match the default run's up to convolution rounding (fp32, stated tolerance 1e-4 relative);
    its snapshot loads as an ordinary one and may be resumed without it."""
    cfg = dict(duration=128, snapshot=None, checkpoint=128)
    seen = []
    real_build = edm_io.build_net
    import edm2fast.train as T
    orig = T.edm_io.build_net
    T.edm_io.build_net = lambda *a, **k: seen.append(k.get("channels_last")) or real_build(*a, **k)
    try:
        cl = train.Trainer(_config(tmp_path / "cl", channels_last=True, **cfg), log=_quiet)
    finally:
        T.edm_io.build_net = orig
    assert seen == [True] and cl.net.channels_last
    conv = next(m for m in cl.net.modules() if isinstance(m, torch.nn.Module) and getattr(m, "weight", None) is not None
                and m.weight.ndim == 4 and m.weight.shape[-1] == 3)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    cl.run()
    train.train(_config(tmp_path / "nchw", **cfg), log=_quiet)
    _, a, _ = _final_state(tmp_path / "cl")
    _, b, _ = _final_state(tmp_path / "nchw")
    for k in b["net"]:
        ref = b["net"][k].double()
        err = (a["net"][k].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert err < 1e-4, f"{k}: relative difference {err:.2e}"
    # channels_last is a runtime choice: resuming without it is allowed
    r = train.train(_config(tmp_path / "cl", **dict(cfg, duration=160)), log=_quiet)
    assert r["cur_nimg"] == 160


def test_channels_last_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match="channels_last"):
        train.Trainer(_config(tmp_path, channels_last="yes"), log=_quiet)
