"""Terminal tables, report.md and the speed-up / bandwidth plot."""

from __future__ import annotations


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def print_parity(rows: list[dict]) -> None:
    print(f"\n{'op':<20} {'case':<34} {'backend':<10} {'dtype':<9} {'status':<6} {'max err':>9} {'eager err':>9}"
          f" {'worst':>6}")
    for r in rows:
        print(f"{r['op']:<20} {r['case'][:34]:<34} {r['backend']:<10} {r['dtype']:<9} {r['status']:<6} "
              f"{_fmt(r.get('max_abs_err')):>9} {_fmt(r.get('eager_err')):>9} {r.get('tensor', ''):>6}"
              + (f"  {r['error']}" if "error" in r else ""))
    n_fail = sum(r["status"] != "ok" for r in rows)
    print(f"parity: {len(rows) - n_fail}/{len(rows)} rows ok\n", flush=True)


def print_timing(rows: list[dict]) -> None:
    print(f"{'op':<20} {'case':<34} {'backend':<10} {'dtype':<9} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} "
          f"{'x ref':>6} {'GB/s':>7} {'%bw':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<20} {r['case'][:34]:<34} {r['backend']:<10} {r['dtype']:<9} ERROR {r['error']}")
            continue
        f, b, fb = r.get("fwd", {}), r.get("bwd", {}), r.get("fwd_bwd", {})
        sp = r.get("speedup", {}).get("fwd_bwd", r.get("speedup", {}).get("fwd"))
        print(f"{r['op']:<20} {r['case'][:34]:<34} {r['backend']:<10} {r['dtype']:<9} "
              f"{_fmt(f.get('median_ms'), '.4f'):>8} {_fmt(b.get('median_ms'), '.4f'):>8} "
              f"{_fmt(fb.get('median_ms'), '.4f'):>8} {_fmt(sp, '.2f'):>6} {_fmt(f.get('GB_per_s'), '.1f'):>7} "
              f"{_fmt(f.get('pct_copy_bw'), '.0f'):>5}")
    print(flush=True)


def _targets_text(r: dict) -> str:
    parts = [f"{t['what']} <= {t['target']:g}: {'met' if t['met'] else 'NOT met'}" for t in r.get("targets", [])]
    return "; ".join(parts)


def _unfused_text(r: dict, n: int = 8) -> str:
    return ", ".join(f"{op.removeprefix('aten.')} x{c} ({g:.2f} GiB)" for op, (c, g) in list(r["unfused"].items())[:n])


def print_accounting(acc: dict) -> None:
    print(f"training-step accounting ({acc['network']}, batch {acc['batch']}, {acc['dtype']}; forward+backward, "
          "weight norm, EMA; traced on the meta device):")
    for r in acc["rows"]:
        if "error" in r:
            print(f"  {r['backend']:<10} not traceable: {r['error']}")
            continue
        targets = _targets_text(r)
        inplace = r.get("GiB_with_inplace_writes")
        print(f"  {r['backend']:<10} {r['ops']:>6} ops/launches  {r['GiB']:8.2f} GiB moved"
              + (f" ({inplace:.2f} with in-place writes)" if inplace is not None else "")
              + (f"  [{targets}]" if targets else ""))
        if "unfused" in r:
            print(f"             {r['library']} GEMM/attention library launches; top non-fused ops: {_unfused_text(r)}")
    print(flush=True)


def print_model(report: dict) -> None:
    ts = report.get("train_step", {})
    print(f"training step ({ts.get('forward_GFLOP_per_image', 0):.2f} forward GFLOP/image, {ts.get('dtype')}):")
    for r in ts.get("rows", []):
        if "error" in r:
            print(f"  {r['variant']:<18} ERROR {r['error']}")
        else:
            pm = r.get("peak_mem_bytes")
            print(f"  {r['variant']:<18} {r['images_per_s']:9.1f} img/s  {r['ms_per_step']:9.2f} ms/step  "
                  f"MFU {r['MFU_pct']:5.1f}%  peak {'-' if pm is None else f'{pm / 2**30:.2f} GiB'}")
    print("sampling:")
    for r in report.get("sampling", []):
        if "error" in r:
            print(f"  {r['backend']:<18} ERROR {r['error']}")
        else:
            print(f"  {r['backend']:<18} {r['images_per_s']:9.2f} img/s ({r['evaluations_per_image']} evaluations)")
    print(flush=True)


def write_markdown(report: dict, path: str) -> None:
    m = report["machine"]
    lines = [f"# mpkernels benchmark report", "",
             f"- date: {m['date']}", f"- device: {m.get('gpu') or 'CPU: ' + m['cpu']} ({m['device']})",
             f"- torch {m['torch']} (CUDA {m['torch_cuda']}), Triton {m['triton']}, driver {m.get('driver')}",
             f"- command: `{m['command']}`", f"- network: {report['config']}", ""]
    fails = [r for r in report["parity"] if r["status"] != "ok"]
    lines += [f"## Parity: {len(report['parity']) - len(fails)}/{len(report['parity'])} rows ok", "",
              "| op | case | backend | dtype | status | max abs err | eager err | budget |", "|---|---|---|---|---|---|---|---|"]
    for r in report["parity"]:
        lines.append(f"| {r['op']} | {r['case']} | {r['backend']} | {r['dtype']} | {r['status']} | "
                     f"{_fmt(r.get('max_abs_err'))} | {_fmt(r.get('eager_err'))} | {_fmt(r.get('budget'))} |")
    bw = report.get("copy_bandwidth", {})
    lines += ["", f"## Op timings (copy bandwidth {bw.get('GB_per_s', 0):.1f} GB/s)", "",
              "| op | case | backend | dtype | fwd ms | bwd ms | fwd+bwd ms | speed-up | GB/s fwd | % bw fwd | % bw bwd |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("timing", []):
        if "error" in r:
            continue
        f, b, fb = r.get("fwd", {}), r.get("bwd", {}), r.get("fwd_bwd", {})
        sp = r.get("speedup", {}).get("fwd_bwd", r.get("speedup", {}).get("fwd"))
        lines.append(f"| {r['op']} | {r['case']} | {r['backend']} | {r['dtype']} | {_fmt(f.get('median_ms'), '.4f')} | "
                     f"{_fmt(b.get('median_ms'), '.4f')} | {_fmt(fb.get('median_ms'), '.4f')} | {_fmt(sp, '.2f')} | "
                     f"{_fmt(f.get('GB_per_s'), '.1f')} | {_fmt(f.get('pct_copy_bw'), '.0f')} | "
                     f"{_fmt(b.get('pct_copy_bw'), '.0f')} |")
    host = [r for r in report.get("host_overhead", []) if r.get("backend") != "reference"]
    if host:
        lines += ["", "## Host time per op call (µs, median; [2, 64, 8, 8] inputs)", "",
                  "| op | backend | fwd | fwd+bwd | reference fwd | reference fwd+bwd | raw kernel fwd | overhead fwd |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in host:
            if "error" in r:
                lines.append(f"| {r['op']} | {r['backend']} | error: {r['error'][:80]} | | | | | |")
                continue
            lines.append(f"| {r['op']} | {r['backend']} | {_fmt(r.get('host_us_fwd'), '.1f')} | "
                         f"{_fmt(r.get('host_us_fwd_bwd'), '.1f')} | {_fmt(r.get('ref_us_fwd'), '.1f')} | "
                         f"{_fmt(r.get('ref_us_fwd_bwd'), '.1f')} | {_fmt(r.get('raw_us_fwd'), '.1f')} | "
                         f"{_fmt(r.get('overhead_us'), '.1f')} |")
    cs = report.get("cpu_speed") or {}
    if cs.get("train_step"):
        lines += ["", "## CPU training step, fused path vs reference (issue 10 targets: x1.5 over reference, "
                  "x1.1 over reference+compile)", "",
                  f"Host memory of the process (every variant alike): {cs.get('malloc', 'default')} "
                  "(see `edm2fast.hostmem`); faults: minor page faults per step.", "",
                  "| batch | variant | ms/step (p20-p80) | faults | x reference | x reference+compile |",
                  "|---|---|---|---|---|---|"]
        for batch, rows in cs["train_step"].items():
            for r in rows:
                lines.append(f"| {batch} | {r['variant']} | {r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | "
                             f"{_fmt(r.get('page_faults'), '.0f')} | "
                             f"{_fmt(r.get('x_reference'), '.2f')} | {_fmt(r.get('x_reference+compile'), '.2f')} |")
        for r in cs.get("sampling") or []:
            lines.append(f"| sampler | {r.get('variant', r['backend'])} | {r['median_ms']:.2f} | "
                         f"{_fmt(r.get('page_faults'), '.0f')} | "
                         f"{_fmt(r.get('x_reference'), '.2f')} | {_fmt(r.get('x_reference+compile'), '.2f')} |")
    acc = report.get("accounting", {})
    lines += ["", f"## Training-step accounting ({acc.get('network')}, batch {acc.get('batch')}, {acc.get('dtype')})",
              "", "| backend | ops (~launches) | GiB moved (with in-place writes) | targets | GEMM/attention library launches "
              "| top non-fused ops (count, GiB) |", "|---|---|---|---|---|---|"]
    for r in acc.get("rows", []):
        if "error" in r:
            lines.append(f"| {r['backend']} | not traceable: {r['error']} | | | | |")
            continue
        inplace = r.get("GiB_with_inplace_writes")
        moved = f"{r['GiB']:.2f}" + (f" ({inplace:.2f})" if inplace is not None else "")
        lines.append(f"| {r['backend']} | {r['ops']} | {moved} | {_targets_text(r) or '-'} | "
                     f"{r.get('library', '-')} | {_unfused_text(r) if 'unfused' in r else '-'} |")
    for r in acc.get("rows", []):
        if "by_op" in r and r["backend"] != "reference":
            lines += ["", f"<details><summary>{r['backend']}: every op of the step</summary>", "",
                      "| op | count | GiB |", "|---|---|---|"]
            lines += [f"| {op} | {n} | {r['GiB_by_op'][op]:.3f} |" for op, n in r["by_op"].items()]
            lines += ["", "</details>"]
    ts = report.get("train_step")
    if ts:
        lines += ["", f"## Training step ({ts['forward_GFLOP_per_image']:.2f} forward GFLOP/image)", "",
                  "| variant | img/s | ms/step | MFU % | peak GiB |", "|---|---|---|---|---|"]
        for r in ts["rows"]:
            if "error" not in r:
                pm = r.get("peak_mem_bytes")
                lines.append(f"| {r['variant']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.2f} | {r['MFU_pct']:.1f} | "
                             f"{'-' if pm is None else f'{pm / 2**30:.2f}'} |")
        lines += ["", "| sampler backend | img/s |", "|---|---|"]
        for r in report.get("sampling", []):
            if "error" not in r:
                lines.append(f"| {r['backend']} | {r['images_per_s']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.get("timing", []) if "error" not in r and r["backend"] != "reference"]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(3, 0.25 * len(rows) + 1)))
    labels = [f"{r['op']} {r['case'][:22]} [{r['backend']}]" for r in rows]
    speed = [r.get("speedup", {}).get("fwd_bwd", r.get("speedup", {}).get("fwd", 0)) for r in rows]
    pct = [r.get("fwd", {}).get("pct_copy_bw", 0) for r in rows]
    axes[0].barh(range(len(rows)), speed, color="tab:blue")
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=6)
    axes[0].set_xlabel("speed-up vs reference (fwd+bwd, else fwd)")
    axes[1].barh(range(len(rows)), pct, color="tab:green")
    axes[1].set_yticks(range(len(rows)), [""] * len(rows))
    axes[1].set_xlabel("% of measured copy bandwidth (fwd)")
    m = report["machine"]
    fig.suptitle(f"mpkernels on {m.get('gpu') or m['cpu']} - torch {m['torch']} - {m['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
