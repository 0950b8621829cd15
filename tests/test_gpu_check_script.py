"""``benchmarks/gpu_check.sh`` fits the validation machine: at most 8 plain files in the output
folder, every stage reported, bad command lines refused. The full dry run (CPU mode) is slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check_pack as pack  # noqa: E402


def _junit(path, name, tests, failures, skipped):
    suite = ET.Element("testsuite", name="pytest", tests=str(tests), failures=str(failures), errors="0",
                       skipped=str(skipped), time="1.5")
    for i in range(tests):
        ET.SubElement(suite, "testcase", classname="t", name=f"test_{i}")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path)


def _work(tmp_path):
    w = tmp_path / "work"
    (w / "bench").mkdir(parents=True)
    (w / "memcheck-bench").mkdir()
    for g, (n, f, s) in {"triton": (5, 1, 0), "cuda": (3, 0, 1), "gpu": (2, 0, 0), "rest": (4, 0, 0)}.items():
        _junit(w / f"tests-{g}.xml", g, n, f, s)
        (w / f"tests-{g}.log").write_text(f"{g}: {n} tests\n")
    for name in ("env.txt", "install.log", "memcheck.log", "bench.log", "memcheck-bench/report.json",
                 "memcheck-bench/report.md", "memcheck-bench/speedup.png", "bench/report.md", "bench/speedup.png"):
        (w / name).write_text(name)
    (w / "bench" / "report.json").write_text(json.dumps({
        "timing": [{"op": "mp_silu", "backend": "triton", "shape": "[32,192,64,64]", "speedup": {"fwd_bwd": 2.0}},
                   {"op": "mp_sum", "backend": "triton", "shape": "[32,192,64,64]", "speedup": {"fwd_bwd": 8.0}},
                   {"op": "mp_sum", "backend": "reference", "speedup": {"fwd_bwd": 1.0}}],
        "train_step": {"rows": [{"variant": "reference", "images_per_s": 100.0},
                                {"variant": "triton", "images_per_s": 150.0}]},
        "parity_failures": 0}))
    return w


def test_pack_gives_at_most_8_plain_files(tmp_path, capsys):
    w, out = _work(tmp_path), tmp_path / "out"
    rc = pack.main(["--work", str(w), "--out", str(out), "--elapsed", "400", "--stage", "env=PASS=3",
                    "--stage", "install=PASS=90", "--stage", "tests[triton]=FAIL (exit 1)=150",
                    "--stage", "memcheck=TIMEOUT=170", "--stage", "bench=PASS=160"])
    assert rc == 1  # a failed and a timed-out stage
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    assert set(files) == {"summary.md", "tests.log", "tests.xml", "report.json", "report.md", "speedup.png",
                          "logs.tar.gz"}
    merged = ET.parse(out / "tests.xml").getroot()
    assert sorted(s.get("name") for s in merged.iter("testsuite")) == ["cuda", "gpu", "rest", "triton"]
    summary = (out / "summary.md").read_text()
    assert "FAIL" in summary and "| memcheck | TIMEOUT | 170 |" in summary
    assert "| triton | 4 | 1 | 0 | 0 | 2 |" in summary
    assert "geometric mean 4.00x" in summary and "1.50x reference" in summary
    assert summary in capsys.readouterr().out
    import tarfile
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"install.log", "memcheck.log", "bench.log", "env.txt", "memcheck-bench/report.json"} <= names


def test_pack_passes_when_every_stage_passed_or_was_skipped(tmp_path):
    w = tmp_path / "work"
    w.mkdir()
    rc = pack.main(["--work", str(w), "--out", str(tmp_path / "out"), "--stage", "env=PASS=1",
                    "--stage", "memcheck=SKIPPED (compute-sanitizer not found)=0"])
    assert rc == 0
    assert os.listdir(tmp_path / "out") == ["summary.md"]


def test_pack_refuses_a_missing_work_folder(tmp_path):
    with pytest.raises(ValueError, match="--work"):
        pack.main(["--work", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("args,message", [([], "OUT_DIR"), (["{out}", "--only", "tests,lunch"], "unknown stage"),
                                          (["{out}", "--bogus"], "unknown option"),
                                          (["{full}"], "not empty")])
def test_script_refuses_bad_command_lines(tmp_path, args, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    args = [a.format(out=tmp_path / "out", full=full) for a in args]
    proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_dry_run_packs_every_stage_within_the_limits(tmp_path):
    """The whole script in CPU mode (about 2 minutes on 2 cores)."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run"], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = os.listdir(out)
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    summary = (out / "summary.md").read_text()
    for stage in ("env", "install", "tests[triton]", "tests[gpu]", "memcheck", "bench"):
        assert f"| {stage} |" in summary, summary
    assert {"summary.md", "tests.xml", "report.json"} <= set(files)
    assert "# gpu_check (dry-run): PASS" in proc.stdout
