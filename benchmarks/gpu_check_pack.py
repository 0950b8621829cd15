"""Packing step of ``benchmarks/gpu_check.sh``: at most 8 files directly in the output folder.

The validation machine returns only plain files directly in the folder it is given (at most 8),
so everything the stages wrote in a scratch folder is reduced to:

* ``summary.md``  per-stage result and time, test counts per group, key speed-ups, environment
* ``tests.log``   every test group's pytest output, one after the other
* ``tests.xml``   every group's junit xml merged into one ``<testsuites>``
* ``report.json``, ``report.md``, ``speedup.png``  the benchmark's own outputs (when it ran)
* ``logs.tar.gz`` everything else (install, memcheck, benchmark log, memcheck's reports)

The summary is printed too. Exit status 0 when every stage that ran passed, else 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import tarfile
import xml.etree.ElementTree as ET

MAX_FILES = 8
BENCH_FILES = ("report.json", "report.md", "speedup.png")


def merge_junit(paths: list[str]) -> tuple[ET.Element, dict[str, dict]]:
    """One ``<testsuites>`` holding every group's suites, and per-group counts."""
    root = ET.Element("testsuites")
    counts = {}
    for p in sorted(paths):
        group = os.path.basename(p)[len("tests-"):-len(".xml")]
        try:
            tree = ET.parse(p).getroot()
        except (ET.ParseError, OSError) as e:
            counts[group] = {"error": f"unreadable junit xml: {e}"}
            continue
        suites = [tree] if tree.tag == "testsuite" else list(tree.iter("testsuite"))
        c = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
        for s in suites:
            s.set("name", group)
            for k in c:
                c[k] += float(s.get(k, 0)) if k == "time" else int(s.get(k, 0))
            root.append(s)
        c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        counts[group] = c
    return root, counts


def key_speedups(report: dict) -> list[str]:
    """Per backend: geometric mean, min and max of the fwd+bwd (else fwd) speed-up over eager."""
    by_backend: dict[str, list[tuple[float, str]]] = {}
    for r in report.get("timing", []):
        sp = r.get("speedup", {})
        v = sp.get("fwd_bwd", sp.get("fwd"))
        if v and r.get("backend") not in (None, "reference"):
            by_backend.setdefault(r["backend"], []).append((float(v), f"{r.get('op')} {r.get('shape', '')}".strip()))
    lines = []
    for b, vals in sorted(by_backend.items()):
        gm = math.exp(sum(math.log(v) for v, _ in vals) / len(vals))
        lo, hi = min(vals), max(vals)
        lines.append(f"- {b}: geometric mean {gm:.2f}x over {len(vals)} op/shape rows "
                     f"(min {lo[0]:.2f}x {lo[1]}, max {hi[0]:.2f}x {hi[1]})")
    steps = [r for r in report.get("train_step", {}).get("rows", []) if "images_per_s" in r]
    base = next((r["images_per_s"] for r in steps if r.get("variant") == "reference"), None)
    for r in steps:
        rel = f" ({r['images_per_s'] / base:.2f}x reference)" if base else ""
        lines.append(f"- training step, {r.get('variant')}: {r['images_per_s']:.1f} images/s{rel}")
    if "parity_failures" in report:
        lines.append(f"- parity failures: {report['parity_failures']}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="the stages' scratch folder")
    ap.add_argument("--out", required=True, help="the output folder (gets at most 8 files)")
    ap.add_argument("--stage", action="append", default=[], help="NAME=RESULT=SECONDS, once per stage")
    ap.add_argument("--elapsed", type=int, default=0)
    ap.add_argument("--mode", default="gpu")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.work):
        raise ValueError(f"--work: not a folder: {args.work!r}")
    os.makedirs(args.out, exist_ok=True)
    stages = []
    for s in args.stage:
        name, result, secs = s.split("=", 2)
        stages.append((name, result, secs))
    order = ["env", "install", "memcheck", "bench"]
    stages.sort(key=lambda s: (order.index(s[0]) if s[0] in order else 2, s[0]))

    made = []
    logs = sorted(glob.glob(os.path.join(args.work, "tests-*.log")))
    if logs:
        with open(os.path.join(args.out, "tests.log"), "w") as f:
            for p in logs:
                f.write(f"===== {os.path.basename(p)} =====\n")
                with open(p, errors="replace") as g:
                    f.write(g.read())
        made.append("tests.log")
    xmls = sorted(glob.glob(os.path.join(args.work, "tests-*.xml")))
    counts = {}
    if xmls:
        root, counts = merge_junit(xmls)
        ET.ElementTree(root).write(os.path.join(args.out, "tests.xml"), encoding="utf-8", xml_declaration=True)
        made.append("tests.xml")
    report = None
    for name in BENCH_FILES:
        p = os.path.join(args.work, "bench", name)
        if os.path.isfile(p):
            shutil.copy(p, os.path.join(args.out, name))
            made.append(name)
    if os.path.isfile(os.path.join(args.work, "bench", "report.json")):
        with open(os.path.join(args.work, "bench", "report.json")) as f:
            report = json.load(f)
    packed = [p for p in sorted(glob.glob(os.path.join(args.work, "**"), recursive=True))
              if os.path.isfile(p) and not os.path.basename(p).startswith("tests-")
              and os.path.relpath(p, args.work) not in {os.path.join("bench", n) for n in BENCH_FILES}]
    if packed:
        with tarfile.open(os.path.join(args.out, "logs.tar.gz"), "w:gz") as tar:
            for p in packed:
                tar.add(p, arcname=os.path.relpath(p, args.work))
        made.append("logs.tar.gz")

    ok = all(r == "PASS" or r.startswith("SKIPPED") for _, r, _ in stages)
    lines = [f"# gpu_check ({args.mode}): {'PASS' if ok else 'FAIL'} in {args.elapsed} s", "",
             "| stage | result | seconds |", "| --- | --- | --- |"]
    lines += [f"| {n} | {r} | {s} |" for n, r, s in stages]
    if counts:
        lines += ["", "| test group | passed | failed | errors | skipped | seconds |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for g, c in sorted(counts.items()):
            if "error" in c:
                lines.append(f"| {g} | {c['error']} | | | | |")
            else:
                lines.append(f"| {g} | {c['passed']} | {c['failures']} | {c['errors']} | {c['skipped']} "
                             f"| {c['time']:.0f} |")
    if report is not None:
        lines += ["", "Key speed-ups (benchmark, vs eager reference):"]
        lines += key_speedups(report) or ["- (no timing rows)"]
    env = os.path.join(args.work, "env.txt")
    if os.path.isfile(env):
        with open(env, errors="replace") as f:
            lines += ["", "Environment:", "```", f.read().rstrip(), "```"]
    made.insert(0, "summary.md")
    lines += ["", f"Files: {', '.join(made)}"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    entries = os.listdir(args.out)
    assert len(entries) <= MAX_FILES and all(os.path.isfile(os.path.join(args.out, e)) for e in entries), entries
    print(text, end="")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
