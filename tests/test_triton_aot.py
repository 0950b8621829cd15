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

Real launches specialise by their shapes (ints equal to 1 become constants, unaligned views get
no divisibility facts): ``tests/triton_aot_specs.py`` records, once per session, the
specialisations EDM2 networks produce, and those are compiled too (each for one architecture by
default, both in the slow test). Every compile must also fit the architecture's shared memory.

The two exhaustive tests (every variant for both architectures, about twice the default's
compiles) are marked ``exhaustive``: CI leaves them out (``-m "not exhaustive"``); run them
with ``bash scripts/test.sh -m exhaustive tests/test_triton_aot.py``.
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


def run_aot(*args: str, **extra_env: str) -> tuple[list[dict], dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real JIT functions, not interpreted ones
    env.pop("TRITON_CACHE_DIR", None)  # the script compiles into a private temporary cache
    env.update(extra_env)
    proc = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=1800,
                          cwd=ROOT)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = next((r for r in rows if r.get("summary")), None)
    assert summary is not None, f"no summary (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return [r for r in rows if not r.get("summary")], summary


def _bad(r: dict) -> bool:
    over = r.get("shared_limit") is not None and (r.get("shared") or 0) > r["shared_limit"]
    return bool(r.get("error") or r.get("ptxas_rc") or r.get("spill_stores") or r.get("spill_loads") or over)


def _check(rows, summary):
    bad = [r for r in rows if _bad(r)]
    report = "\n".join(f"{r['name']} sm_{r['cc']} {r.get('spec') or ('aligned' if r['aligned'] else 'generic')}: "
                       f"{r.get('error') or r.get('log') or ''} spills {r.get('spill_stores')}/{r.get('spill_loads')} "
                       f"regs {r.get('registers')} shared {r.get('shared')}/{r.get('shared_limit')} "
                       f"from {r.get('origin')}" for r in bad)
    assert not bad, f"{len(bad)} of {summary['compiles']} compiles failed or spill:\n{report}"
    assert {r["cc"] for r in rows} == {80, 90}


def test_all_configs_compile_for_sm80_sm90_without_spills():
    rows, summary = run_aot("--skip-fp16-twins")
    _check(rows, summary)
    from mpkernels.triton import all_configs
    assert summary["declared"] == len(all_configs())
    assert summary["configs"] + summary["skipped_twins"] == summary["declared"]


@pytest.mark.slow
@pytest.mark.exhaustive
def test_every_variant_compiles_without_spills():
    rows, summary = run_aot("--all")
    _check(rows, summary)


def test_shared_memory_limit_is_checked():
    """A compile over the per-block shared memory of its architecture counts as a failure."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import triton_aot
    ok = dict(name="k", cc=80, shared=166912, shared_limit=triton_aot.SHARED_LIMIT[80])
    assert not triton_aot.is_bad(ok) and not _bad(ok)
    over = dict(ok, shared=166913)
    assert triton_aot.is_bad(over) and _bad(over)
    assert triton_aot.SHARED_LIMIT[90] == 232448


@pytest.fixture(scope="session")
def recorded_specs(tmp_path_factory):
    """The specialisations EDM2 launches produce (recorded once per session, in the interpreter)."""
    path = tmp_path_factory.mktemp("aot") / "specs.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_aot_specs.py")], env=env,
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    path.write_text(proc.stdout)
    return path, json.loads(proc.stdout)


def test_recorded_specialisations_cover_real_shapes(recorded_specs):
    """What the fixed-divisibility check missed: ints equal to 1 and not divisible by 16, and
    XXL's 21-head attention, all from real launches. (Pointers are recorded too; the launchers
    pass views as base pointer plus offsets, so none are unaligned today.)"""
    _, specs = recorded_specs
    facts = [f for s in specs for f in s["args"].values()]
    assert ["int", "one"] in facts and ["int", ""] in facts and ["int", "16"] in facts
    attn = [s for s in specs if "attn" in s["config"]]
    assert any("edm2-img512-xxl" in s["networks"] for s in attn)
    assert any(s["origin"]["ints"].get("L") == 1 and "tiny-1x1" in s["networks"] for s in attn)
    assert len({(s["config"], json.dumps(s["args"], sort_keys=True)) for s in specs}) == len(specs)  # deduplicated


def test_recorded_specialisations_compile(recorded_specs):
    path, specs = recorded_specs
    rows, summary = run_aot("--specs", str(path))
    _check(rows, summary)
    assert summary["specialisations"] == len(specs) and summary["compiles"] == len(specs)
    assert any(r.get("spec", "").count("=1") for r in rows)  # constant-1 ints really compiled as such


@pytest.mark.slow
@pytest.mark.exhaustive
def test_recorded_specialisations_compile_for_both_architectures(recorded_specs):
    path, specs = recorded_specs
    rows, summary = run_aot("--specs", str(path), "--all")
    _check(rows, summary)
    assert summary["compiles"] == 2 * len(specs)
