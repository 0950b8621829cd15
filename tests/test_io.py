"""Snapshots and checkpoints: round trips, metadata, clear errors, and atomic writes."""

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edm2fast import io, networks

KW = dict(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
          attn_resolutions=[4], channels_per_head=8)




def make_net(seed=0, **overrides):
    torch.manual_seed(seed)
    net = networks.Precond(**{**KW, **overrides})
    with torch.no_grad():  # nonzero gains so every parameter matters for the output
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.2 + 0.2 * torch.rand([]).item())
    return net.eval()


def outputs(net, label_dim=3, channels=2, res=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, res, res, generator=g)
    labels = torch.eye(label_dim)[:2] if label_dim else None
    return net(x, torch.tensor([0.1, 3.0]), labels, return_logvar=True)


def assert_same_outputs(a, b, **kw):
    for x, y in zip(outputs(a, **kw), outputs(b, **kw)):
        assert torch.equal(x, y), f"max diff {(x - y).abs().max().item()}"


def dir_listing(path):
    return sorted(p.name for p in path.iterdir())


# ----------------------------------------------------------------------------------------------
# Snapshots

def test_save_load_fp32_identical(tmp_path):
    net = make_net()
    path = tmp_path / "snap.safetensors"
    io.save(net, path, dtype="fp32", preset="tiny", nimg=4096, sigma_rel=0.05, dataset="digits16",
            note={"any": ["json", 1]})
    loaded = io.load(path)
    assert isinstance(loaded, networks.Precond) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert_same_outputs(loaded, net)
    meta = io.read_metadata(path)
    assert meta["preset"] == "tiny" and meta["nimg"] == 4096 and meta["sigma_rel"] == 0.05
    assert meta["dataset"] == "digits16" and meta["note"] == {"any": ["json", 1]}
    assert meta["net_kwargs"]["model_channels"] == 8
    assert loaded.snapshot_metadata["nimg"] == 4096
    assert dir_listing(tmp_path) == ["snap.safetensors"]


def test_fp16_default_keeps_buffers_fp32(tmp_path):
    net = make_net(1)
    path = tmp_path / "snap.safetensors"
    io.save(net, path)
    with safe_open(str(path), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["unet.out_conv.weight"] == "F16" and dtypes["unet.out_gain"] == "F16"
    assert dtypes["unet.emb_fourier.freqs"] == "F32" and dtypes["logvar_fourier.phases"] == "F32"
    loaded = io.load(path)
    buffers = {k for k, _ in net.named_buffers()}
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v if k in buffers else v.half().float()), k
    half = io.load(path, dtype="fp16", compute_dtype="fp32")
    assert half.unet.out_conv.weight.dtype == torch.float16 and half.unet.emb_fourier.freqs.dtype == torch.float32
    assert half.dtype == "fp32"


@pytest.mark.parametrize("overrides", [
    {},
    dict(label_dim=0, num_blocks=2, dropout=0.1, clip_act=None),
    dict(model_channels=4, channel_mult=[2, 3], channel_mult_noise=1, channel_mult_emb=5, attn_resolutions=[8, 4],
         channels_per_head=4, label_balance=0.3, concat_balance=0.6, res_balance=0.2, attn_balance=0.4,
         logvar_channels=16),
    dict(dtype="bf16", channels_last=True, use_fp16=False, sigma_data=0.6, channels_per_head=4),
])
def test_init_kwargs_inferred_rebuild_the_network(tmp_path, overrides):
    """Without recorded kwargs, the kwargs read off the module tree rebuild an identical network."""
    net = make_net(2, **overrides)
    assert not hasattr(net, "_init_kwargs")
    kwargs = io.init_kwargs(net)
    rebuilt = networks.Precond(**kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    for name in ("dtype", "channels_last", "use_fp16", "sigma_data"):
        assert getattr(rebuilt, name) == getattr(net, name), name
    rebuilt_blocks = [m for m in rebuilt.modules() if isinstance(m, networks.Block)]
    for a, b in zip(rebuilt_blocks, [m for m in net.modules() if isinstance(m, networks.Block)]):
        assert (a.num_heads, a.dropout, a.res_balance, a.attn_balance, a.clip_act) == \
               (b.num_heads, b.dropout, b.res_balance, b.attn_balance, b.clip_act)
    path = tmp_path / "s.safetensors"
    io.save(net, path, dtype="fp32")
    loaded = io.load(path)
    label_dim = overrides.get("label_dim", 3)
    assert_same_outputs(loaded, net, label_dim=label_dim)
    assert loaded.channels_last == net.channels_last and loaded.dtype == net.dtype


def test_build_net_records_kwargs_and_wrappers_unwrap(tmp_path):
    net = io.build_net(**KW, dropout=0.0)
    assert net._init_kwargs["channel_mult"] == [1, 2]
    assert io.init_kwargs(net)["dropout"] == 0.0

    class Compiled(torch.nn.Module):  # what torch.compile returns keeps the module as _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    path = tmp_path / "w.safetensors"
    io.save(Compiled(net), path, dtype="fp32")
    assert set(io.load(path).state_dict()) == set(net.state_dict())
    with pytest.raises(ValueError, match="unknown argument.*bogus"):
        io.build_net(**KW, bogus=1)


def test_load_overrides(tmp_path):
    path = tmp_path / "s.safetensors"
    io.save(make_net(), path)
    net = io.load(path, channels_last=True, dropout=0.2)
    assert net.channels_last and net.unet.enc["8x8_block0"].dropout == 0.2
    assert net.unet.out_conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="shape mismatch|missing|unexpected"):
        io.load(path, model_channels=16)


def test_save_state_dict_for_posthoc_results(tmp_path):
    net = make_net(3)
    kwargs = io.init_kwargs(net)
    sd = {k: v * 0.5 for k, v in net.state_dict().items()}
    path = tmp_path / "phema.safetensors"
    io.save_state_dict(sd, path, kwargs, dtype="fp32", sigma_rel=0.1, nimg=10)
    loaded = io.load_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert io.read_metadata(path)["sigma_rel"] == 0.1
    bad = dict(sd)
    bad.pop("unet.out_gain")
    with pytest.raises(ValueError, match="missing unet.out_gain"):
        io.save_state_dict(bad, path, kwargs)
    with pytest.raises(ValueError, match="reserved"):
        io.save(net, path, net_kwargs=1)
    with pytest.raises(TypeError, match="metadata\\['obj'\\]"):
        io.save(net, path, obj=object())
    with pytest.raises(ValueError, match="dtype"):
        io.save(net, path, dtype="int8")
    assert io.read_metadata(path)["sigma_rel"] == 0.1  # failed saves left the file alone


def test_snapshot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        io.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is a folder"):
        io.load(tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors: not a valid safetensors file"):
        io.load(garbage)
    good = tmp_path / "good.safetensors"
    io.save(make_net(), good)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="trunc.safetensors.*(corrupt|truncated)"):
        io.load(truncated)
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="without edm2fast metadata"):
        io.load(plain)
    ckpt = tmp_path / "ckpt.safetensors"
    io.save_checkpoint(ckpt, {"a": torch.zeros(2)}, {"nimg": 1})
    with pytest.raises(ValueError, match="found a checkpoint"):
        io.load(ckpt)
    with pytest.raises(ValueError, match="found a snapshot"):
        io.load_checkpoint(good)
    with pytest.raises(ValueError, match="dtype"):
        io.load(good, dtype="fp8")


# ----------------------------------------------------------------------------------------------
# Checkpoints

def test_checkpoint_round_trip_with_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))

    def step():
        opt.zero_grad()
        model(torch.ones(5, 4)).square().sum().backward()
        opt.step()

    step()
    np.random.seed(5)
    random.seed(5)
    state = {"net": model.state_dict(), "optimizer": opt.state_dict(), "nimg": 2048, "kimg": 2.048,
             "stds": (0.05, 0.1), "rng": io.rng_state(), "dtype": torch.bfloat16, "none": None,
             "array": np.arange(3, dtype=np.int32)}
    path = tmp_path / "ckpt.safetensors"
    io.save_state(path, state, meta={"preset": "tiny"})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    loaded, meta = io.load_state(path)
    assert meta == {"preset": "tiny"}
    assert loaded["nimg"] == 2048 and loaded["stds"] == (0.05, 0.1) and loaded["dtype"] is torch.bfloat16
    assert loaded["none"] is None and np.array_equal(loaded["array"], [0, 1, 2])
    assert list(loaded["optimizer"]["state"]) == [0, 1, 2, 3]  # int keys survive
    assert loaded["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    io.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]

    # resume into fresh objects: the next step is bit-identical
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2, betas=(0.9, 0.99))
    model2.load_state_dict(loaded["net"])
    opt2.load_state_dict(loaded["optimizer"])
    step()
    opt2.zero_grad()
    model2(torch.ones(5, 4)).square().sum().backward()
    opt2.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_low_level_and_errors(tmp_path):
    base = torch.arange(10.0)
    tensors = {"view": base[2:5], "same": base, "alias": base, "u8": torch.zeros(3, dtype=torch.uint8),
               "scalar": torch.tensor(7), "empty": torch.zeros(0)}
    path = tmp_path / "c.safetensors"
    io.save_checkpoint(path, tensors, {"nimg": 5, "nan": float("nan")})
    loaded, meta = io.load_checkpoint(path)
    assert meta["nimg"] == 5 and np.isnan(meta["nan"])
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    with pytest.raises(TypeError, match="state\\[a.b\\]: cannot store a set"):
        io.flatten_state({"a": {"b": {1, 2}}})
    with pytest.raises(TypeError, match="tensors\\['x'\\]"):
        io.save_checkpoint(path, {"x": [1, 2]})
    with pytest.raises(ValueError, match="save_state"):
        io.load_state(path)
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------------------------
# Atomic writes

def test_crash_mid_write_keeps_previous_snapshot(tmp_path, monkeypatch):
    path = tmp_path / "snap.safetensors"
    net = make_net()
    io.save(net, path, nimg=1)
    before = path.read_bytes()
    real = io._write_safetensors

    def crashing_write(tensors, tmp, header):
        real(tensors, tmp, header)
        with open(tmp, "r+b") as f:  # leave a torn file behind, as a crash would
            f.truncate(os.path.getsize(tmp) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(io, "_write_safetensors", crashing_write)
    with pytest.raises(OSError, match="simulated"):
        io.save(make_net(1), path, nimg=2)
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint(tmp_path / "ckpt.safetensors", {"a": torch.zeros(3)})
    assert path.read_bytes() == before
    assert dir_listing(tmp_path) == ["snap.safetensors"]  # no temporary file left
    assert io.read_metadata(path)["nimg"] == 1


def test_atomic_write_and_open(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def partial(tmp):
        with open(tmp, "w") as f:
            f.write("new but incomp")
            f.flush()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(path, partial)
    assert path.read_text() == "old" and dir_listing(tmp_path) == ["f.txt"]
    with io.atomic_open(path, "w") as f:
        json.dump({"a": 1}, f)
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.atomic_write(tmp_path / "no" / "f.txt", lambda tmp: None)
    with pytest.raises(ValueError, match="mode"):
        with io.atomic_open(path, "a"):
            pass


KILL_CHILD = """
import os, sys, time
sys.path[:0] = {paths!r}
from edm2fast import io
def slow(tmp):
    with open(tmp, 'wb') as f:
        f.write(b'partial')
        f.flush()
        print('writing', flush=True)
        time.sleep(60)
io.atomic_write({target!r}, slow)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_mid_write_keeps_previous_file(tmp_path):
    target = tmp_path / "ckpt.safetensors"
    io.save_checkpoint(target, {"a": torch.ones(4)}, {"nimg": 1})
    before = target.read_bytes()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = KILL_CHILD.format(paths=[os.path.join(root, "python"), root], target=str(target))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert target.read_bytes() == before
    tensors, meta = io.load_checkpoint(target)
    assert meta["nimg"] == 1 and torch.equal(tensors["a"], torch.ones(4))
    leftovers = [p for p in dir_listing(tmp_path) if p != target.name]
    assert len(leftovers) == 1  # the killed writer's temporary file
    assert io.remove_stale_temp_files(tmp_path) == [str(tmp_path / leftovers[0])]
    assert dir_listing(tmp_path) == [target.name]
