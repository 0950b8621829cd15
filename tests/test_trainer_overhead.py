"""The trainer's own per-step work (issue 10, "the trainer itself"): same results, less waiting.

* the run loop keeps its loss sums on the device and reads them once per status line, not once
  per step (on a GPU every read waits for the device), with the same float64 sums as before;
* data indices come from arithmetic, a gather and a select, with no op that makes a GPU wait
  (``unique``, ``.item()``, boolean masks), in the sampler's order;
* the power-function EMA solves its exponents once, not at every update, bit for bit as before.

Timing is measured by ``python -m benchmarks.trainer_overhead``, not here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mpkernels as mk
from edm2fast import data as data_module
from edm2fast import phema, train

SMALL_NET = dict(model_channels=16, channel_mult=[1, 2], attn_resolutions=[], channels_per_head=32)
FAST = dict(data="digits16", preset="tiny", network=SMALL_NET, batch=16, duration=128, snapshot=1024,
            checkpoint=1024, status=64, progress=False, lr=0.01, rampup=0.001)

# Ops after which a CUDA host waits for the device: a value read back, or an output whose size
# depends on the data.
_WAITING_OPS = ("_local_scalar_dense", "item", "nonzero", "unique", "_unique", "masked_select")


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops that run while ``enabled``, with whether any index was boolean."""

    def __init__(self):
        super().__init__()
        self.enabled = True
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.enabled:
            name = func.overloadpacket.__name__
            flat = [a for a in args if isinstance(a, (list, tuple))]
            if name.startswith("index") and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                for seq in flat for t in seq):
                name += "[bool mask]"
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _waiting(ops: list[str]) -> list[str]:
    return [op for op in ops if op.startswith(_WAITING_OPS) or op.endswith("[bool mask]")]


def _quiet(msg):
    pass


# ----------------------------------------------------------------------------------------------
# The run loop

def test_run_reads_the_loss_once_per_status_line_not_per_step(tmp_path):
    trainer = train.Trainer(train.TrainConfig(run_dir=str(tmp_path), **FAST), log=_quiet)
    recorder = _OpRecorder()
    inner_step = trainer.step

    def step():  # what the step itself reads is the step's business (edm2fast.graphs), not the loop's
        recorder.enabled = False
        try:
            return inner_step()
        finally:
            recorder.enabled = True

    trainer.step = step
    with recorder:
        trainer.run()
    steps, status_lines = 128 // 16, 128 // 64
    reads = recorder.ops.count("_local_scalar_dense")
    assert reads <= 2 * status_lines, (f"the run loop read {reads} device values over {steps} steps and "
                                       f"{status_lines} status lines")


def test_run_reports_the_same_float64_loss_sums_as_the_steps(tmp_path):
    """stats.jsonl holds what summing every step's float64 loss sums on the host gives, bit for bit,
    and run() trains exactly what calling step() does."""
    cfg = dict(FAST, duration=96, status=48, dropout=0.1)
    result = train.train(train.TrainConfig(run_dir=str(tmp_path / "run"), **cfg), log=_quiet)
    stats = [json.loads(line) for line in open(tmp_path / "run" / "stats.jsonl")]

    manual = train.Trainer(train.TrainConfig(run_dir=str(tmp_path / "manual"), **cfg), log=_quiet)
    manual._prepare()
    expected = []
    for _ in range(2):  # two status windows of three steps
        loss, sq, count = 0.0, 0.0, 0
        for _ in range(3):
            loss_sum, n = manual.step()
            loss += float(loss_sum)
            sq += float(manual._last_loss_sq)
            count += n
        mean = loss / count
        expected.append((mean, math.sqrt(max(sq / count - mean ** 2, 0.0))))
    assert [(r["loss"], r["Loss/loss_std"]) for r in stats] == expected
    assert result["fingerprint"] == manual.check_ranks_in_sync()


# ----------------------------------------------------------------------------------------------
# Data indices

def _tiny_data(length: int, rank: int = 0, world: int = 1, seed: int = 3):
    images = np.arange(length * 16, dtype=np.uint8).reshape(length, 1, 4, 4)
    dataset = data_module.ArrayDataset(images, labels=np.arange(length) % 3, name="tiny")
    return train._Data(dataset, use_labels=True, seed=seed, rank=rank, world=world)


def _sampler_stream(length: int, rank: int, world: int, seed: int, start: int, count: int) -> list[int]:
    it = iter(data_module.InfiniteSampler(length, rank, world, seed))
    stream = [next(it) for _ in range(start + count)]
    return stream[start:]


@pytest.mark.parametrize("length, rank, world, start, count", [
    (7, 0, 1, 0, 7),     # exactly one epoch
    (7, 0, 1, 5, 4),     # across an epoch boundary
    (5, 1, 2, 3, 23),    # many epochs in one batch, second of two ranks
    (1797, 0, 1, 1792, 128),
    (6, 2, 3, 11, 1),
])
def test_indices_follow_the_sampler_across_epochs_and_ranks(length, rank, world, start, count):
    data = _tiny_data(length, rank, world)
    got = data.indices(start, count)
    assert got.dtype == torch.int64 and got.device.type == "cpu"
    assert got.tolist() == _sampler_stream(length, rank, world, 3, start, count)
    # Asking again, out of order (a resumed run), gives the same answer.
    data.indices(start + 5 * length, count)
    assert data.indices(start, count).tolist() == got.tolist()


def test_preloaded_fetch_has_no_op_that_waits_for_the_device():
    data = _tiny_data(5)
    data.preload(torch.device("cpu"))
    data.fetch(0, 4, torch.device("cpu"))  # uploads the first epoch's order
    with _OpRecorder() as recorder:
        x, labels = data.fetch(3, 4, torch.device("cpu"))  # crosses into the next epoch
        data.fetch(7, 12, torch.device("cpu"))              # spans three epochs
    assert not _waiting(recorder.ops), recorder.ops
    idx = _sampler_stream(5, 0, 1, 3, 3, 4)
    assert torch.equal(x, data_module.pixels_to_model(torch.from_numpy(data.dataset._array[idx])))
    assert torch.equal(labels.argmax(1), torch.tensor(idx) % 3)


# ----------------------------------------------------------------------------------------------
# Power-function EMA

class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 3)
        self.gain = torch.nn.Parameter(torch.tensor(0.7))
        self.register_buffer("stat", torch.zeros(3))


def test_ema_update_solves_no_cubic_and_matches_power_function_beta_bit_for_bit(monkeypatch):
    torch.manual_seed(0)
    net = _TinyNet()
    ema = phema.PowerFunctionEMA(net, stds=(0.05, 0.10, 0.2))
    expected = [[p.detach().clone() for p in net.parameters()] for _ in ema.stds]
    solved = []
    real_std_to_exp = phema.std_to_exp
    monkeypatch.setattr(phema, "std_to_exp", lambda s: solved.append(s) or real_std_to_exp(s))
    listed = []
    real_parameters = net.parameters
    real_named = net.named_parameters
    monkeypatch.setattr(net, "parameters", lambda *a, **k: listed.append(1) or real_parameters(*a, **k))
    monkeypatch.setattr(net, "named_parameters", lambda *a, **k: listed.append(1) or real_named(*a, **k))

    batch = 8
    for step in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.stat.fill_(step)
        listed.clear()
        solved_before = len(solved)
        ema.update(step * batch, batch)
        assert len(solved) == solved_before, "update solved for gamma again"
        # listed once, at the first update; later updates look the cached slots up
        assert len(listed) == (1 if step == 1 else 0), "the net's parameters were listed again"
        for k, std in enumerate(ema.stds):
            weight = 1 - phema.power_function_beta(std, step * batch, batch)
            mk.ema_lerp_(expected[k], [p.detach() for p in real_parameters()], weight)
    for k, e in enumerate(ema.emas):
        for want, got in zip(expected[k], e.parameters()):
            assert torch.equal(want, got)
        assert torch.equal(e.stat, net.stat)


def test_ema_update_still_rejects_bad_times():
    ema = phema.PowerFunctionEMA(_TinyNet(), stds=(0.05,))
    with pytest.raises(ValueError, match="t_delta"):
        ema.update(8, 16)
    with pytest.raises(ValueError, match="t_next"):
        ema.update(0, 0)


# ----------------------------------------------------------------------------------------------
# The benchmark

def test_trainer_overhead_benchmark_runs_both_loops_side_by_side():
    from benchmarks import trainer_overhead
    r = trainer_overhead.measure(preset="tiny", kimg=0.128, batch=16, network=SMALL_NET, snapshot=1024,
                                 checkpoint=1024, status=64)
    assert r["steps"] == 8 and r["images"] == 128 and r["batch"] == 16
    for key in ("trainer_s_per_kimg", "bare_s_per_kimg", "trainer_median_step_s_per_kimg",
                "bare_median_step_s_per_kimg", "ratio_total", "ratio_median_step", "ratio_median_pair"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["maintenance_s"] >= 0


def test_ema_slot_cache_follows_replaced_and_registered_entries():
    """The EMA's cached (module, name) slots see a parameter replaced in its module's table and are
    listed again after any registration; a structural change is an error, never a silent skip."""
    torch.manual_seed(0)
    net = _TinyNet()
    ema = phema.PowerFunctionEMA(net, stds=(0.1,))
    ema.update(8, 8)
    # a new Parameter object in the table (what Module.to does with overwrite-on-conversion)
    with torch.no_grad():
        net.lin._parameters["weight"] = torch.nn.Parameter(torch.full((3, 5), 2.0))
    before = ema.emas[0].lin.weight.clone()
    ema.update(16, 8)
    weight = 1 - phema.power_function_beta(0.1, 16, 8)
    torch.testing.assert_close(ema.emas[0].lin.weight, before + weight * (2.0 - before), rtol=0, atol=1e-6)
    # a buffer reassigned through the module (a registration): listed again, copied
    net.stat = torch.full((3,), 5.0)
    ema.update(24, 8)
    assert torch.equal(ema.emas[0].stat, net.stat)
    # a parameter added to the net only: the EMA refuses
    net.extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="changed structure"):
        ema.update(32, 8)
    # ... and one deleted (no registration hook fires): the lookup notices
    net2 = _TinyNet()
    ema2 = phema.PowerFunctionEMA(net2, stds=(0.1,))
    ema2.update(8, 8)
    del net2.gain
    with pytest.raises(RuntimeError, match="changed structure"):
        ema2.update(16, 8)
