"""``python -m benchmarks``: is the fused path correct, and how much faster is it?

1. Parity: every op at every shape the chosen network uses, on every available backend
   and ``torch.compile`` of the reference, for fp32/fp16/bf16, forward and backward,
   against an fp64 oracle, next to eager PyTorch's own error at the same dtype.
2. Speed, bandwidth, memory of every op and backend that passed parity (GPU: the
   preset's real shapes; CPU: a small network's shapes).
3. Model level: launch and traffic accounting of the EDM2-S training step (batch 32, bf16,
   traced on the meta device: no GPU needed) against the issue's targets, with the top
   remaining non-fused ops per backend; training-step throughput, memory and MFU, and
   sampling throughput.

Writes ``report.json``, ``report.md`` and ``speedup.png`` under ``--out``; exits with
status 1 if any parity row fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import mpkernels as mk

from . import cases as C
from . import model as M
from . import ops as O
from . import report as R
from .measure import copy_bandwidth, machine_info, matmul_tflops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=None, help="output folder (default bench-out/<device>-<date>)")
    p.add_argument("--preset", default="edm2-img512-s", help="network whose shapes are benchmarked on GPU")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 32 on GPU, 2 on CPU)")
    p.add_argument("--dtype", default=None,
                   help="compute dtype(s) for timing, comma-separated (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--parity-dtypes", default="fp32,fp16,bf16", help="dtypes checked for parity")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of: {','.join(C.OPS)}")
    p.add_argument("--backends", default=None, help="comma-separated subset of backends (and 'compile')")
    p.add_argument("--max-shapes", type=int, default=None,
                   help="at most this many shapes per op (default 4 on GPU, 2 on CPU; 0 = all)")
    p.add_argument("--quick", action="store_true", help="small shapes, short timings, no torch.compile timing")
    p.add_argument("--small", action="store_true", help="use the small CPU network even on a GPU")
    p.add_argument("--no-model", action="store_true", help="skip the model-level training/sampling timings")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--user-net", default=None, metavar="MODULE:CALLABLE",
                   help="your own EDM2-style network for the 'your network, accelerated' row: an import path to a "
                        "callable returning a fresh Precond-like network (default: this project's network)")
    p.add_argument("--accelerate-backend", default="auto",
                   help="backend given to edm2fast.accelerate for that row (default auto)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    small = args.small or not gpu
    info = machine_info(device)
    if not gpu:
        print("No GPU: parity runs at small shapes (Triton kernels under the interpreter, the CUDA extension's "
              "CPU path); timings are CPU timings.", flush=True)
    net_kwargs = dict(C.SMALL_CONFIG) if small else __import__("edm2fast.presets", fromlist=["x"]).network_kwargs(
        args.preset)
    batch = args.batch or (2 if small else 32)
    timing_dtypes = [DTYPES[d] for d in (args.dtype or ("bf16" if gpu else "fp32")).split(",")]
    parity_dtypes = [DTYPES[d] for d in args.parity_dtypes.split(",") if d]
    max_shapes = args.max_shapes if args.max_shapes is not None else (4 if gpu else 2)
    if args.quick:
        max_shapes = min(max_shapes, 1) if max_shapes else 1
    ops = args.ops.split(",") if args.ops else None
    if ops:
        bad = [o for o in ops if o not in C.OPS]
        if bad:
            print(f"--ops: unknown op(s) {bad}; choose from {C.OPS}", file=sys.stderr)
            return 2

    backends = list(mk.available_backends())
    if not gpu and "triton" not in backends and "triton" in mk.registered_backends():
        print(f"note: triton backend not usable here: {mk._backends.load_errors()}", file=sys.stderr)
    use_compile = not args.no_compile
    all_backends = backends + (["compile"] if use_compile else [])
    if args.backends:
        want = args.backends.split(",")
        unknown = [b for b in want if b not in all_backends]
        if unknown:
            print(f"--backends: {unknown} not available; available: {all_backends}", file=sys.stderr)
            return 2
        all_backends = [b for b in all_backends if b in want]

    # Op shapes from the network; the small one with 2 blocks per level, so that the encoder's fused
    # Block boundary (mp_sum_clip_pixel_norm_mp_silu: a Block after a Block) occurs in it too.
    specs = C.network_specs({**net_kwargs, "num_blocks": max(2, net_kwargs.get("num_blocks", 3))} if small
                            else net_kwargs, batch)
    cases = [C.case_from_spec(s) for s in C.select(specs, ops, max_shapes)]

    out_dir = args.out or os.path.join("bench-out", f"{(info.get('gpu') or 'cpu').replace(' ', '_')}-"
                                       f"{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out_dir, exist_ok=True)
    report: dict = {"machine": info, "config": {"network": net_kwargs, "preset": None if small else args.preset,
                                                "batch": batch, "backends": all_backends,
                                                "timing_dtypes": [str(d) for d in timing_dtypes],
                                                "parity_dtypes": [str(d) for d in parity_dtypes],
                                                "quick": args.quick}}

    # 1. parity --------------------------------------------------------------------------------
    print(f"parity: {len(cases)} cases x {len(parity_dtypes)} dtypes x backends {all_backends}", flush=True)
    parity_rows = []
    parity_backends = [b for b in all_backends if not (b == "compile" and args.quick)]
    for case in cases:
        for dt in parity_dtypes:
            parity_rows.extend(O.parity(case, parity_backends, dt, device))
    report["parity"] = parity_rows
    failed = [r for r in parity_rows if r["status"] != "ok"]
    R.print_parity(parity_rows)

    # 2. op timings -----------------------------------------------------------------------------
    min_time = 0.05 if args.quick else (0.3 if gpu else 0.2)
    bw = copy_bandwidth(device, (32 << 20) if args.quick else None)
    report["copy_bandwidth"] = bw
    print(f"copy bandwidth: {bw['GB_per_s']:.1f} GB/s", flush=True)
    passed = {(r["op"], r["case"], r["backend"], r["dtype"]) for r in parity_rows if r["status"] == "ok"}
    timing_rows = []
    time_backends = [b for b in all_backends if not (b == "compile" and args.quick)]
    if not gpu:  # the Triton interpreter is a correctness tool, not something to time
        time_backends = [b for b in time_backends if b != "triton"]
    # the reference first: every other row's speed-up is measured against it in the same run
    time_backends = sorted(time_backends, key=lambda b: b != "reference")
    for dt in timing_dtypes:
        dname = str(dt).replace("torch.", "")
        for case in cases:
            ref_t = None
            for b in time_backends:
                args_probe = case.make(dt, device, torch.Generator().manual_seed(1))
                if not O.native(case, b, args_probe):
                    continue
                if (case.op, case.label, b, dname) not in passed and dt in parity_dtypes:
                    continue  # never time (or call fast) a row that failed parity
                try:
                    t = O.timing(case, b, dt, device, min_time)
                except Exception as e:
                    timing_rows.append({"op": case.op, "case": case.label, "backend": b, "dtype": dname,
                                        "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                row = {"op": case.op, "case": case.label, "count": case.count, "backend": b, "dtype": dname, **t}
                if b == "reference":
                    ref_t = t
                if ref_t is not None:
                    for k in ("fwd", "bwd", "fwd_bwd"):
                        if k in t and k in ref_t:
                            row.setdefault("speedup", {})[k] = ref_t[k]["median_ms"] / t[k]["median_ms"]
                for k in ("fwd", "bwd"):
                    if k in t:
                        t[k]["pct_copy_bw"] = 100 * t[k]["GB_per_s"] / bw["GB_per_s"]
                timing_rows.append(row)
    report["timing"] = timing_rows
    R.print_timing(timing_rows)

    # host time per op call (what each of a step's ~1,000 launches costs the CPU that issues it)
    try:
        report["host_overhead"] = O.host_overhead(device, backends, reps=200 if args.quick else 2000)
        O.print_host_overhead(report["host_overhead"])
    except Exception as e:
        report["host_overhead"] = [{"op": "*", "backend": "*", "error": f"{type(e).__name__}: {e}"[:300]}]

    # 3. model level ----------------------------------------------------------------------------
    # Always the EDM2-S step at batch 32 in bf16 (issue 10's targets), whatever the machine: it is
    # traced on the meta device, so a CPU accounts the GPU step in seconds.
    acc_backends = ["reference"] + [b for b in mk.registered_backends() if b != "reference"]
    report["accounting"] = M.account_training_step(acc_backends)
    R.print_accounting(report["accounting"])

    if not args.no_model:
        dt = timing_dtypes[0]
        fl = M.forward_flops(net_kwargs)
        peak = matmul_tflops(device, dt if gpu else torch.float32)
        report["matmul_peak"] = peak
        variants = ["reference"] + (["reference+compile"] if use_compile and not args.quick else []) + \
            [b for b in backends if b != "reference" and (gpu or b not in ("triton",))]
        steps = []
        for v in variants:
            try:
                r = M.train_step(net_kwargs, batch, dt, device, v, min_time=0.1 if args.quick else 1.0)
                r["MFU_pct"] = 100 * 3 * fl * r["images_per_s"] / (peak["TFLOP_per_s"] * 1e12)
                steps.append(r)
            except Exception as e:
                steps.append({"variant": v, "error": f"{type(e).__name__}: {e}"[:300]})
        report["train_step"] = {"forward_GFLOP_per_image": fl / 1e9, "dtype": str(dt), "rows": steps}
        samp = []
        for b in [v for v in variants if "+" not in v]:
            try:
                samp.append(M.sampling(net_kwargs, batch, dt, device, b, num_steps=4 if args.quick else 32,
                                       min_time=0.1 if args.quick else 1.0))
            except Exception as e:
                samp.append({"backend": b, "error": f"{type(e).__name__}: {e}"[:300]})
        report["sampling"] = samp
        R.print_model(report)

        # CPU: the issue-10 table, the training step at the default batch (host-bound) and at batch 32
        # (compute-bound), fused path eager (NCHW and channels_last) and compiled (channels_last)
        # against the reference eager and compiled, all variants timed in turns; and the sampler.
        if not gpu and not args.quick:
            from . import cpu_speed as CS
            fused = [b for b in backends if b not in ("reference", "triton")]
            cs_variants = ["reference"] + (["reference+compile"] if use_compile else []) + fused + \
                [f"{b}+cl" for b in fused] + ([f"{b}+cl+compile" for b in fused] if use_compile else [])
            try:
                report["cpu_speed"] = CS.main(["--variants", *cs_variants])
            except Exception as e:
                report["cpu_speed"] = {"error": f"{type(e).__name__}: {e}"[:300]}

        # "your network, accelerated": the same training step before and after edm2fast.accelerate
        try:
            if args.user_net:
                make_net, label = M.load_user_net(args.user_net), f"your network ({args.user_net})"
            else:
                make_net, label = M.default_user_net(net_kwargs, dt, device), "your network (edm2fast Precond)"
            user_rows = M.accelerated_train_step(make_net, batch, device, min_time=0.1 if args.quick else 1.0,
                                                 backend=args.accelerate_backend, label=label)
        except Exception as e:
            user_rows = [{"variant": "your network, accelerated", "error": f"{type(e).__name__}: {e}"[:300]}]
        report["user_net"] = {"user_net": args.user_net, "backend": args.accelerate_backend, "rows": user_rows}
        _print_user_net(user_rows)

    report["elapsed_s"] = time.time() - t_start
    report["parity_failures"] = len(failed)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    R.write_markdown(report, os.path.join(out_dir, "report.md"))
    if report.get("user_net"):
        with open(os.path.join(out_dir, "report.md"), "a") as f:
            f.write("\n" + _user_net_markdown(report["user_net"]["rows"]))
    R.plot(report, os.path.join(out_dir, "speedup.png"))
    print(f"wrote {out_dir}/report.json, report.md, speedup.png in {report['elapsed_s']:.0f} s", flush=True)
    if failed:
        print(f"PARITY FAILED in {len(failed)} row(s)", file=sys.stderr)
        return 1
    return 0


def _print_user_net(rows: list[dict]) -> None:
    print("your network, accelerated (training step before/after edm2fast.accelerate):")
    for r in rows:
        if "error" in r:
            print(f"  {r['variant']:<40} ERROR {r['error']}")
            continue
        extra = f"  x{r['speedup']:.2f}" if "speedup" in r else ""
        print(f"  {r['variant']:<40} {r['images_per_s']:9.1f} img/s  {r['ms_per_step']:9.2f} ms/step{extra}")
        for why in (r.get("left", [])[:5] if "speedup" in r else []):
            print(f"    left {why}")
    print(flush=True)


def _user_net_markdown(rows: list[dict]) -> str:
    lines = ["## Your network, accelerated", "",
             "| variant | backend | ms/step (p20-p80) | img/s | speed-up | modules switched / left |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | ERROR: {r['error']} | | | | |")
            continue
        spread = f"{r['ms_per_step']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f})"
        lines.append(f"| {r['variant']} | {r['backend']} | {spread} | {r['images_per_s']:.1f} | "
                     f"{r.get('speedup', 1.0):.2f}x | {r['switched']} / {len(r['left'])} |")
    return "\n".join(lines) + "\n"
