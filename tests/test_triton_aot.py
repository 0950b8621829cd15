"""Every Triton kernel configuration compiles for sm_80 and sm_90 without register spills.

No GPU is needed: ``tests/triton_aot.py`` (run in a subprocess without ``TRITON_INTERPRET``,
so the kernels are real JIT functions) lowers each configuration listed by
``mpkernels.triton.all_configs()`` to PTX with ``triton.compile(ASTSource(...),
target=GPUTarget('cuda', cc, 32))`` and assembles it with the ``ptxas -v`` shipped in Triton's
NVIDIA backend, which reports spill stores and loads. The per-op parity tests check that the
launchers only ever launch configurations from that list.

The default test compiles every configuration for both architectures (sm_80 with its first JIT
specialization, sm_90 with its last), except fp16 configurations whose bf16 twin (same code,
other 16-bit float type) is compiled; the slow test compiles everything, every specialization.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "triton_aot.py")

triton = pytest.importorskip("triton")


def _ptxas_available() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")


def run_aot(*args: str) -> tuple[list[dict], dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real JIT functions, not interpreted ones
    env.pop("TRITON_CACHE_DIR", None)  # the script compiles into a private temporary cache
    proc = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=1800,
                          cwd=ROOT)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = next((r for r in rows if r.get("summary")), None)
    assert summary is not None, f"no summary (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return [r for r in rows if not r.get("summary")], summary


def _check(rows, summary):
    bad = [r for r in rows if r.get("error") or r.get("ptxas_rc") or r.get("spill_stores") or r.get("spill_loads")]
    report = "\n".join(f"{r['name']} sm_{r['cc']} {'aligned' if r['aligned'] else 'generic'}: "
                       f"{r.get('error') or r.get('log') or ''} spills {r.get('spill_stores')}/{r.get('spill_loads')} "
                       f"regs {r.get('registers')}" for r in bad)
    assert not bad, f"{len(bad)} of {summary['compiles']} compiles failed or spill:\n{report}"
    assert {r["cc"] for r in rows} == {80, 90}


def test_all_configs_compile_for_sm80_sm90_without_spills():
    rows, summary = run_aot("--skip-fp16-twins")
    _check(rows, summary)
    from mpkernels.triton import all_configs
    assert summary["declared"] == len(all_configs())
    assert summary["configs"] + summary["skipped_twins"] == summary["declared"]


@pytest.mark.slow
def test_every_variant_compiles_without_spills():
    rows, summary = run_aot("--all")
    _check(rows, summary)
