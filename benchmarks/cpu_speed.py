"""CPU model-level speed (issue 10): training step and sampler per variant, interleaved, with ratios.

The same training step as :func:`benchmarks.model.train_step` (forced weight normalization,
forward, backward, force-finite gradients, Adam, power-function EMA), for the variants

* ``reference``: the reference ops, forced weight normalization inside every MPConv forward, eager;
* ``reference+compile``: the reference network under ``torch.compile``, one ``force_normalize_`` per step;
* ``<backend>``: a fused backend (on CPU, ``cuda`` is the extension's C++ CPU twins), eager;
* ``<backend>+compile``: the network under ``torch.compile`` with the fused backend active;
* ``<backend>+step``: the whole training step as one ``torch.compile(fullgraph=True)`` region, the
  trainer's ``--step-mode compile`` (:class:`edm2fast.graphs.CompiledStep`; any backend, ``reference``
  included, and with ``+cl``);

at two settings of the small network (:data:`benchmarks.cases.SMALL_CONFIG`, 16x16): the default
CPU batch (2, host-bound) and batch 32 (compute-bound). Every variant is built first, then the
variants are timed in turns (``--rounds`` rounds of ``--reps`` steps each), so that a machine
shared with other work slows them all alike; the table gives medians over all steps and each
variant's speed-up over ``reference`` and ``reference+compile``. The sampler (Heun, ``--sampler-steps``
steps) is timed the same way for ``reference`` and each fused backend.

``--profile VARIANT`` prints, instead, where one variant's step time goes: the torch profiler's
table grouped by op (with shapes) and the top Python functions under cProfile.

``--breakdown`` prints each variant's self CPU time per step by group (convolutions, attention,
mpkernels ops, optimizer, rest) and the ceiling that the library kernels (convolutions and
attention, the same calls in every variant) put on the speed-up over ``reference``.

Usage: ``python -m benchmarks.cpu_speed [--batches 2 32] [--variants ...] [--threads 1]
[--profile cuda | --breakdown]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import mpkernels as mk

from . import cases as C
from . import model as M

# The issue's CPU targets: the fused step's speed-up over each reference variant, and the sampler's.
TARGETS = {"reference": 1.5, "reference+compile": 1.1}
SAMPLER_TARGET = 1.5


_backend = M.variant_backend
make_train_step = M.make_train_step


def make_sampler(net_kwargs: dict, batch: int, dtype: torch.dtype, device: torch.device, variant: str,
                 num_steps: int):
    """The run closure of :func:`benchmarks.model.sampling` for ``variant`` (``<backend>[+cl][+compile]``,
    see :func:`benchmarks.model.variant_backend`): the network in eval mode under ``no_grad``, as
    ``edm2fast generate`` runs it (``--channels-last``, ``--eval-mode compile``)."""
    from edm2fast.sampler import edm_sampler

    backend = _backend(variant)
    if "+step" in variant:
        raise ValueError(f"variant: '+step' (the whole training step compiled) has no sampler, got {variant!r}")
    if "+cl" in variant:
        net_kwargs = {**net_kwargs, "channels_last": True}
    net = M._build(net_kwargs, dtype, device).eval()
    model = torch.compile(net) if "+compile" in variant else net
    x, labels = M._batch(net, batch, device)

    def run():
        with torch.no_grad(), mk.use_backend(backend):
            edm_sampler(model, x, labels, num_steps=num_steps)

    return run


def interleaved(fns: dict, rounds: int, reps: int, warmup: int = 2) -> dict:
    """``{name: {'median_ms', 'p20_ms', 'p80_ms', 'n', 'page_faults'}}``: every fn run ``rounds x reps``
    times, in turns; ``page_faults``: the process's minor page faults per run of fn (mean)."""
    from edm2fast.hostmem import minor_page_faults

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    faults = dict.fromkeys(fns, 0)
    for _ in range(rounds):
        for name, fn in fns.items():
            f0 = minor_page_faults()
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
            faults[name] += minor_page_faults() - f0
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[name] = {"median_ms": statistics.median(ts), "p20_ms": q[1], "p80_ms": q[7], "n": len(ts),
                     "page_faults": faults[name] / len(ts)}
    return out


def with_ratios(results: dict) -> list[dict]:
    """Rows with each variant's speed-up over the reference variants (and whether a fused one meets
    the issue's target)."""
    rows = []
    for name, r in results.items():
        row = {"variant": name, **r}
        for ref, target in TARGETS.items():
            if ref in results:
                ratio = results[ref]["median_ms"] / r["median_ms"]
                row[f"x_{ref}"] = ratio
                if not name.startswith("reference"):
                    row[f"met_{ref}"] = ratio >= target
        rows.append(row)
    return rows


def train_table(net_kwargs: dict, batch: int, variants, dtype=torch.float32, device=torch.device("cpu"),
                rounds: int = 5, reps: int = 4, fused_adam: bool | None = None) -> list[dict]:
    steps = {v: make_train_step(net_kwargs, batch, dtype, device, v, fused_adam) for v in variants}
    return with_ratios(interleaved(steps, rounds, reps))


def sampler_table(net_kwargs: dict, batch: int, variants, num_steps: int, dtype=torch.float32,
                  device=torch.device("cpu"), rounds: int = 3, reps: int = 1) -> list[dict]:
    """The sampler's time per variant, timed in turns, with each fused variant's speed-up over
    ``reference`` (the target, :data:`SAMPLER_TARGET`) and over ``reference+compile`` when timed."""
    runs = {v: make_sampler(net_kwargs, batch, dtype, device, v, num_steps) for v in variants}
    res = interleaved(runs, rounds, reps, warmup=1)
    rows = []
    for name, r in res.items():
        row = {"backend": _backend(name), "variant": name, **r}
        for ref in ("reference", "reference+compile"):
            if ref in res:
                row[f"x_{ref}"] = res[ref]["median_ms"] / r["median_ms"]
        if "x_reference" in row and _backend(name) != "reference":
            row["met_reference"] = row["x_reference"] >= SAMPLER_TARGET
        rows.append(row)
    return rows


def profile(net_kwargs: dict, batch: int, variant: str, steps: int = 5, top: int = 25) -> str:
    """Where ``variant``'s step time goes: torch profiler by op (self CPU time) and cProfile."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    step = make_train_step(net_kwargs, batch, torch.float32, torch.device("cpu"), variant)
    for _ in range(3):
        step()
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    out = [f"== torch.profiler, {variant}, batch {batch}, {steps} steps (self CPU time) =="]
    out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    out.append(f"== by op and shape, {variant}, batch {batch} ==")
    out.append(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=top))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    out.append(f"== cProfile, {variant}, batch {batch}, {steps} steps (tottime) ==")
    out.append(s.getvalue())
    return "\n".join(out)


# Self-CPU-time groups of :func:`breakdown` (first match wins). Library kernels are the same calls in
# every variant: what they take bounds the speed-up any fusion of the rest can give.
_GROUPS = (("convolution", ("conv",)), ("attention", ("attention", "aten::bmm", "softmax")),
           ("mpkernels ops", ("Lean", "mpkernels", "MpWeights")),
           ("optimizer", ()))


def breakdown(net_kwargs: dict, batch: int, variants, steps: int = 3) -> list[dict]:
    """Per variant: ms per step of self CPU time (torch profiler) in each of :data:`_GROUPS` and the
    rest, and ``ceiling_x_reference``: the speed-up over ``reference`` a variant would reach if
    everything but its convolutions and attention took no time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    rows = []
    for v in variants:
        step = make_train_step(net_kwargs, batch, torch.float32, torch.device("cpu"), v)
        for _ in range(2):
            step()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        row = {"variant": v, **{g: 0.0 for g, _ in _GROUPS}, "rest": 0.0}
        for e in prof.key_averages():
            ms = e.self_cpu_time_total / 1e3 / steps
            if e.key.startswith("Optimizer.step"):
                # the whole optimizer step; its element-wise children (addcdiv_, lerp_, ...) would
                # otherwise land in "rest"
                inner = (e.cpu_time_total - e.self_cpu_time_total) / 1e3 / steps
                row["optimizer"] += ms + inner
                row["rest"] -= inner
                continue
            group = next((g for g, keys in _GROUPS if any(k in e.key for k in keys)), "rest")
            row[group] += ms
        row["total"] = sum(row[g] for g, _ in _GROUPS) + row["rest"]
        rows.append(row)
    ref = next((r["total"] for r in rows if r["variant"] == "reference"), None)
    for r in rows:
        if ref is not None:
            r["ceiling_x_reference"] = ref / max(1e-9, r["convolution"] + r["attention"])
    return rows


def _print_train(batch: int, rows: list[dict], fused_adam: bool = False) -> None:
    print(f"\ntraining step, small network (16x16), batch {batch}, fp32, CPU ({torch.get_num_threads()} threads)"
          + (", fused Adam" if fused_adam else ""))
    print(f"{'variant':<20} {'ms/step':>9} {'p20':>8} {'p80':>8} {'faults':>8} {'x ref':>7} {'x ref+compile':>14}")
    for r in rows:
        met = [f"x{TARGETS[k]} over {k}: {'met' if r[f'met_{k}'] else 'missed'}" for k in TARGETS if f"met_{k}" in r]
        flags = f"  ({'; '.join(met)})" if met else ""
        print(f"{r['variant']:<20} {r['median_ms']:9.2f} {r['p20_ms']:8.2f} {r['p80_ms']:8.2f} {r['page_faults']:8.0f} "
              f"{r.get('x_reference', float('nan')):7.2f} {r.get('x_reference+compile', float('nan')):14.2f}"
              + flags)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="*", default=[2, 32], help="training-step batches (none: sampler only)")
    p.add_argument("--variants", nargs="+", default=["reference", "reference+compile", "cuda", "cuda+cl"],
                   help="<backend>[+cl][+compile|+step]: +cl = the U-Net in channels_last, +compile = the network "
                        "under torch.compile, +step = the whole training step as one compiled region (the "
                        "trainer's --step-mode compile; not in the sampler table)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--sampler-steps", type=int, default=8, help="Heun steps (0: no sampler table)")
    p.add_argument("--sampler-batch", type=int, default=2)
    p.add_argument("--sampler-rounds", type=int, default=5, help="rounds of the sampler's timing (one run each)")
    p.add_argument("--profile", metavar="VARIANT", help="profile one variant instead of timing")
    p.add_argument("--fused-adam", action="store_true", help="torch's fused Adam in every variant")
    p.add_argument("--breakdown", action="store_true",
                   help="where each variant's step time goes (profiled; not a timing run)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 is steadier on a machine shared with other work)")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="host memory of the whole process, every variant alike: tuned = glibc keeps freed "
                        "memory in the heap (edm2fast.hostmem.retain_freed_memory, what the trainer and "
                        "generate do on a CPU), default = glibc's defaults (default: tuned)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "default"
    if args.malloc == "tuned":
        from edm2fast.hostmem import retain_freed_memory
        applied, msg = retain_freed_memory()
        malloc = "tuned" if applied else "default"
        print(msg)
    net_kwargs = dict(C.SMALL_CONFIG)
    if args.profile:
        for b in args.batches:
            print(profile(net_kwargs, b, args.profile))
        return {}
    if args.breakdown:
        out = {}
        for b in args.batches:
            out[b] = rows = breakdown(net_kwargs, b, args.variants)
            cols = [g for g, _ in _GROUPS] + ["rest", "total"]
            print(f"\nself CPU ms per step by group, batch {b} (torch profiler; its overhead included)")
            print(f"{'variant':<20}" + "".join(f"{c:>15}" for c in cols) + f"{'ceiling x ref':>15}")
            for r in rows:
                print(f"{r['variant']:<20}" + "".join(f"{r[c]:15.1f}" for c in cols)
                      + f"{r.get('ceiling_x_reference', float('nan')):15.2f}")
        return out
    report = {"train_step": {}, "sampling": None, "malloc": malloc}
    for b in args.batches:
        rows = train_table(net_kwargs, b, args.variants, rounds=args.rounds, reps=args.reps,
                           fused_adam=args.fused_adam or None)
        report["train_step"][b] = rows
        _print_train(b, rows, args.fused_adam)
    if args.sampler_steps:
        variants = list(dict.fromkeys(["reference", *(v for v in args.variants if "+step" not in v)]))
        rows = sampler_table(net_kwargs, args.sampler_batch, variants, args.sampler_steps,
                             rounds=args.sampler_rounds)
        report["sampling"] = rows
        print(f"\nsampler, {args.sampler_steps} Heun steps, batch {args.sampler_batch} (target x{SAMPLER_TARGET} "
              f"over reference)")
        for r in rows:
            met = "" if "met_reference" not in r else ("  (met)" if r["met_reference"] else "  (missed)")
            print(f"{r['variant']:<20} {r['median_ms']:9.2f} ms  x ref {r.get('x_reference', float('nan')):5.2f}  "
                  f"x ref+compile {r.get('x_reference+compile', float('nan')):5.2f}{met}")
    return report


if __name__ == "__main__":
    main()
