"""The trainer's own overhead: ``Trainer.run`` against a bare loop over the same network and batch.

    python -m benchmarks.trainer_overhead [--preset digits] [--data digits16] [--kimg 8] [--backend auto]

One process, one ``Trainer.run()`` of ``--kimg`` thousand images (the preset's status,
snapshot and checkpoint cadence, so their cost is counted where a real run pays it). Before
or after every trainer step (alternating, so neither always runs on a warm cache) one step
of a bare loop runs on a second copy of the network: forward, ``loss.sum() / batch``,
backward, Adam, on one fixed batch; nothing else (no forced weight normalization, EMA,
data, seeding, gradient clean-up or logging). The bare steps are timed on their own and
subtracted from the run's wall time, so the trainer's number is everything ``run()`` spends,
its steps and its maintenance. Printed: seconds per 1,000 images for each (total and
median step), and the ratio trainer / bare (totals, medians, and the median over adjacent
step pairs, the steadiest on a busy machine).
The trainer's results are unaffected: every step reseeds its own randomness.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from .measure import cpu_name


class BareLoop:
    """Forward, backward and Adam over a network built like the trainer's, on one fixed batch."""

    def __init__(self, trainer):
        from edm2fast import io as edm_io
        from edm2fast import networks
        from edm2fast.loss import EDM2Loss

        cfg = trainer.cfg
        torch.manual_seed(cfg["seed"])
        self.net = edm_io.build_net(dtype=cfg["dtype"], **trainer.network_kwargs).to(trainer.device)
        self.net.train().requires_grad_(True)
        networks.set_forced_weight_norm(self.net, False)  # the trainer's forward, without its per-step work
        self.net.load_state_dict(trainer.net.state_dict())
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-4, betas=tuple(cfg["betas"]), eps=1e-8,
                                          fused=trainer.device.type == "cuda" or None)
        self.loss_fn = EDM2Loss(P_mean=cfg["P_mean"], P_std=cfg["P_std"])
        self.batch = cfg["batch"]
        gen = torch.Generator(trainer.device).manual_seed(1)
        self.images, self.labels = trainer.data.fetch(0, self.batch, trainer.device, gen)
        self.device = trainer.device

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.net, self.images, self.labels)
        (loss.sum() / self.batch).backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(preset: str = "digits", data: str = "digits16", kimg: float = 8.0, backend: str = "auto",
            warmup: int = 2, run_dir: str | None = None, **overrides) -> dict:
    """Run the trainer for ``kimg`` thousand images with a bare step beside every trainer step.

    ``overrides``: other :class:`edm2fast.train.TrainConfig` fields (``batch``, ``network``, ...).
    """
    from edm2fast.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = run_dir or os.path.join(tmp, "run")
        trainer = Trainer(TrainConfig(run_dir=run_dir, data=data, preset=preset, backend=backend, progress=False,
                                      duration=int(kimg * 1000), **overrides), log=lambda msg: None)
        bare = BareLoop(trainer)
        for _ in range(warmup):
            bare.step()
        step_times, bare_times = [], []
        inner_step = trainer.step

        def step():
            bare_first = len(step_times) % 2 == 0
            if bare_first:
                t0 = time.perf_counter()
                bare.step()
                bare_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = inner_step()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            step_times.append(time.perf_counter() - t0)
            if not bare_first:
                t0 = time.perf_counter()
                bare.step()
                bare_times.append(time.perf_counter() - t0)
            return out

        trainer.step = step
        t0 = time.perf_counter()
        trainer.run()
        total = time.perf_counter() - t0
        trainer.close()
    batch = trainer.cfg["batch"]
    images = len(step_times) * batch
    # The first steps warm caches and allocators up; the medians leave them out.
    steady_steps, steady_bare = step_times[warmup:], bare_times[warmup:]
    trainer_total = total - sum(bare_times)
    per_kimg = lambda seconds, n: seconds / n * 1000  # noqa: E731
    result = {
        "preset": preset, "data": data, "backend": backend, "batch": batch, "steps": len(step_times),
        "images": images,
        "trainer_s_per_kimg": per_kimg(trainer_total, images),
        "trainer_steps_s_per_kimg": per_kimg(sum(step_times), images),
        "trainer_median_step_s_per_kimg": per_kimg(statistics.median(steady_steps), batch),
        "bare_s_per_kimg": per_kimg(sum(bare_times), images),
        "bare_median_step_s_per_kimg": per_kimg(statistics.median(steady_bare), batch),
        "maintenance_s": trainer_total - sum(step_times),
        "machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    result["ratio_total"] = result["trainer_s_per_kimg"] / result["bare_s_per_kimg"]
    result["ratio_median_step"] = result["trainer_median_step_s_per_kimg"] / result["bare_median_step_s_per_kimg"]
    # Each trainer step against the bare step run right beside it: the two share the machine's load
    # of the moment, so on a busy machine this is the steadiest of the three ratios.
    result["ratio_median_pair"] = statistics.median(a / b for a, b in zip(steady_steps, steady_bare))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--data", default="digits16")
    parser.add_argument("--kimg", type=float, default=8.0, help="thousands of training images (default 8)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.kimg <= 0:
        parser.error(f"--kimg: expected a positive number, got {args.kimg}")
    r = measure(args.preset, args.data, args.kimg, args.backend)
    print(f"{r['machine']}, {r['threads']} threads, torch {r['torch']}; preset {r['preset']}, data {r['data']}, "
          f"backend {r['backend']}, batch {r['batch']}, {r['steps']} steps")
    print(f"  trainer   {r['trainer_s_per_kimg']:7.3f} s/kimg in all ({r['maintenance_s']:.2f} s outside the steps), "
          f"median step {r['trainer_median_step_s_per_kimg']:7.3f} s/kimg")
    print(f"  bare loop {r['bare_s_per_kimg']:7.3f} s/kimg in all, "
          f"median step {r['bare_median_step_s_per_kimg']:7.3f} s/kimg")
    print(f"  ratio     {r['ratio_total']:.3f} in all, {r['ratio_median_step']:.3f} median step, "
          f"{r['ratio_median_pair']:.3f} median of adjacent pairs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
