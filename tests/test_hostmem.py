"""edm2fast.hostmem: glibc keeps freed tensor memory, so a repeated allocation pattern stops faulting
pages in; the trainer and generate apply it on CPU devices unless told not to."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from edm2fast import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]), OMP_NUM_THREADS="1")

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt only")

# The benchmark's training step of the small network (batch 32, reference ops, one thread), in a fresh
# process: with glibc's defaults each step faults about 5,400 pages in (memory handed back to the
# system by the previous step), with retain_freed_memory() 0-430.
_STEP = textwrap.dedent("""
    import sys, torch
    from edm2fast import hostmem
    if sys.argv[1] == "tuned":
        applied, msg = hostmem.retain_freed_memory()
        assert applied, msg
    torch.set_num_threads(1)
    from benchmarks import cases as C, model as M
    step = M.make_train_step(C.SMALL_CONFIG, 32, torch.float32, torch.device("cpu"), "reference")
    for _ in range(3):
        step()
    f0 = hostmem.minor_page_faults()
    for _ in range(3):
        step()
    print((hostmem.minor_page_faults() - f0) / 3)
""")


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _STEP, mode], env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_a_training_step_stops_faulting_pages_in():
    default, tuned = _faults_per_step("default"), _faults_per_step("tuned")
    assert default >= 1500, f"glibc's defaults: {default} page faults per step (measured about 5,400)"
    assert tuned <= default / 5, f"retain_freed_memory: {tuned} page faults per step, {default} without"


def test_a_refused_value_is_reported_not_an_error(monkeypatch):
    class RefusingLibc:  # glibc before 2.26 refuses an mmap threshold above 32 MiB on 64-bit systems
        calls = []

        def mallopt(self, param, value):
            self.calls.append(param)
            return 0

    monkeypatch.setattr(hostmem, "_glibc", RefusingLibc)
    applied, msg = hostmem.retain_freed_memory(mmap_threshold=64 << 20)
    assert not applied and "refused M_MMAP_THRESHOLD" in msg and "67108864" in msg
    assert RefusingLibc.calls == [hostmem._M_MMAP_THRESHOLD]  # the trim threshold is left alone then


@pytest.mark.parametrize("kwargs, error, match", [
    ({"mmap_threshold": -1}, ValueError, "mmap_threshold"),
    ({"trim_threshold": 2 ** 31}, ValueError, "trim_threshold"),
    ({"trim_threshold": 1.5}, TypeError, "trim_threshold"),
    ({"mmap_threshold": True}, TypeError, "mmap_threshold"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        hostmem.retain_freed_memory(**kwargs)


def test_not_glibc_is_reported_not_an_error(monkeypatch):
    monkeypatch.setattr(hostmem, "_glibc", lambda: None)
    applied, msg = hostmem.retain_freed_memory()
    assert not applied and "not glibc" in msg


def _tiny_config(run_dir, **overrides):
    from edm2fast import train
    cfg = dict(data="digits16", preset="tiny", batch=32, duration=64, snapshot=1024, checkpoint=1024, status=32,
               progress=False, device="cpu",
               network=dict(model_channels=16, channel_mult=[1, 2], attn_resolutions=[], channels_per_head=32))
    return train.TrainConfig(run_dir=str(run_dir), **dict(cfg, **overrides))


@pytest.mark.parametrize("tuning", [True, False])
def test_trainer_applies_it_on_cpu_unless_told_not_to(tmp_path, monkeypatch, tuning):
    from edm2fast import train
    calls = []
    monkeypatch.setattr(hostmem, "retain_freed_memory", lambda: calls.append(1) or (True, "host memory: test"))
    lines = []
    train.train(_tiny_config(tmp_path, malloc_tuning=tuning), log=lines.append)
    assert len(calls) == int(tuning)
    assert ("host memory: test" in lines) == tuning


def test_trainer_setting_is_checked_and_resumable(tmp_path):
    from edm2fast import train
    with pytest.raises(ValueError, match="malloc_tuning"):
        train.Trainer(_tiny_config(tmp_path, malloc_tuning="yes"))
    assert "malloc_tuning" in train._RESUMABLE_CHANGES  # a speed setting: resuming with the other value is fine


def test_cli_flag():
    from edm2fast.cli import build_parser
    from edm2fast.commands.train import config_from_args
    parser = build_parser()
    base = ["train", "--outdir", "o", "--data", "digits16"]
    assert config_from_args(parser.parse_args(base)).malloc_tuning is True
    assert config_from_args(parser.parse_args(base + ["--malloc-tuning", "0"])).malloc_tuning is False
    for argv in (["generate", "--net", "n.safetensors", "--outdir", "g"], ["sweep", "--indir", "r"],
                 ["eval", "--net", "n.safetensors"]):
        assert parser.parse_args(argv).malloc_tuning is True, argv
        assert parser.parse_args(argv + ["--malloc-tuning", "0"]).malloc_tuning is False, argv


@pytest.mark.parametrize("device, flag, applied", [("cpu", True, True), ("cpu", False, False), ("meta", True, False)])
def test_sampling_commands_apply_it_on_cpu_only(monkeypatch, device, flag, applied):
    import argparse

    import torch

    from edm2fast.commands.generate import apply_malloc_tuning
    calls = []
    monkeypatch.setattr(hostmem, "retain_freed_memory", lambda: calls.append(1) or (True, ""))
    apply_malloc_tuning(argparse.Namespace(malloc_tuning=flag), torch.device(device))
    assert len(calls) == int(applied)
