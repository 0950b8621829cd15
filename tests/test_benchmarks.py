"""The benchmark suite: hand-computed byte counts, and a quick CPU run that must pass parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from benchmarks import cases as C
from benchmarks import model as M
from conftest import ROOT


def T(*shape, role="act"):
    return ("T", shape, role)


def test_must_move_bytes_by_hand():
    # mp_silu on [32, 192, 64, 64] bf16: read x, write y; backward reads g and x, writes dx.
    n = 32 * 192 * 64 * 64
    assert C.must_move_bytes("mp_silu", (T(32, 192, 64, 64),), 2) == (2 * n * 2, 3 * n * 2)
    # pixel_norm_mp_silu fp16: x -> (xn, y) plus one fp32 inverse norm per pixel (32*64*64 pixels)
    px = 32 * 64 * 64
    assert C.must_move_bytes("pixel_norm_mp_silu", (T(32, 192, 64, 64), 1e-4), 2) == \
        (3 * n * 2 + 4 * px, 4 * n * 2 + 4 * px)
    # modulated_mp_silu bf16 with fp32 c [32, 192]: fwd reads y and c, writes out
    c = 32 * 192 * 4
    assert C.must_move_bytes("modulated_mp_silu", (T(32, 192, 64, 64), T(32, 192, role="fp32")), 2) == \
        (2 * n * 2 + c, 3 * n * 2 + 2 * c)
    # mp_sum_clip fp32: read a, b, write out; backward reads g and out, writes da, db
    assert C.must_move_bytes("mp_sum_clip", (T(4, 8, 2, 2), T(4, 8, 2, 2), 0.3, 256.0), 4) == \
        (3 * 128 * 4, 4 * 128 * 4)
    # mp_cat: [2,3,4,4] + [2,5,4,4] -> [2,8,4,4] in fp16
    assert C.must_move_bytes("mp_cat", (T(2, 3, 4, 4), T(2, 5, 4, 4), 1, 0.5), 2) == (2 * 256 * 2, 2 * 256 * 2)
    # ema_lerp_ over two fp32 tensors of 10 and 6 elements: read e and t, write e
    assert C.must_move_bytes("ema_lerp_", (("L", [(10,), (2, 3)]), ("L", [(10,), (2, 3)]), 0.1), 2) == (3 * 16 * 4, 0)
    # force_normalize_: read and write every weight once
    assert C.must_move_bytes("force_normalize_", (("L", [(4, 3, 3, 3)]), 1e-4), 2) == (2 * 108 * 4, 0)
    # resample 'down' on fp32 [1, 2, 4, 4]: read 32 elements, write 8
    assert C.must_move_bytes("resample", (T(1, 2, 4, 4), "down"), 4) == (40 * 4, 40 * 4)


def test_flops_by_hand():
    f, b = C.flops("mp_conv2d", (T(2, 3, 5, 5), T(4, 3, 3, 3, role="fp32"), 1.0))
    assert f == 2 * 2 * 4 * 25 * 27 and b == 2 * f
    f, b = C.flops("cosine_attention", (T(1, 3 * 64, 8, 8), 1))
    assert f == 4 * 64 * 64 * 64 and b == 2.5 * f


def test_network_recording_covers_the_block_ops():
    specs = C.network_specs({**C.SMALL_CONFIG, "num_blocks": 2}, 2)  # as benchmarks/run.py records it
    ops = {s.op for s in specs}
    for op in ["mp_fourier", "mp_linear", "mp_conv2d", "pixel_norm_mp_silu", "modulated_mp_silu", "mp_sum_clip",
               "mp_sum", "mp_cat", "mp_silu", "cosine_attention", "resample", "force_normalize_", "ema_lerp_", "mp_weight",
               "pixel_norm", "normalize", "mp_sum_clip_pixel_norm_mp_silu", "mp_sum_clip_mp_cat_mp_silu",
               "resample_up_mp_silu", "mp_cat_mp_silu"]:
        assert op in ops, op
    # forward FLOPs of EDM2-S per image: the paper's 102 G multiply-adds (we count 2 flops per MAC)
    from edm2fast import presets
    fl = M.forward_flops(presets.network_kwargs("edm2-img512-s"))
    assert 195e9 < fl < 210e9


def test_reference_step_accounting_matches_performance_notes():
    from edm2fast import presets
    acc = M.account_step(presets.network_kwargs("edm2-img512-s"), 32, torch.float16, "reference")
    # PERFORMANCE.md: ~6,200 non-view ops and ~124 GiB for forward+backward; we also count weight norm + EMA.
    assert 5500 < acc["ops"] < 8000 and 110 < acc["GiB"] < 140


def test_quick_suite_runs_and_passes_parity(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parity_failures"] == 0
    backends = set(report["config"]["backends"]) - {"compile"}
    seen = {(r["op"], r["backend"]) for r in report["parity"]}
    for op in C.OPS:
        assert (op, "reference") in seen, op
    for b in backends:
        assert any(r["backend"] == b for r in report["parity"]), b
    assert (tmp_path / "report.md").exists() and (tmp_path / "speedup.png").stat().st_size > 1000
    assert report["timing"] and report["accounting"]["rows"][0]["ops"] > 0
