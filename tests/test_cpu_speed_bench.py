"""benchmarks/cpu_speed.py: variant parsing, interleaved timing, ratios, and that its step trains."""

import pytest
import torch

from benchmarks import cpu_speed as S

TINY = dict(img_resolution=8, img_channels=2, label_dim=0, model_channels=8, channel_mult=[1],
            num_blocks=1, attn_resolutions=[], channels_per_head=8)


@pytest.mark.parametrize("variant, backend", [("reference", "reference"), ("reference+compile", "reference"),
                                              ("cuda", "cuda"), ("triton+compile", "triton"),
                                              ("cuda+cl", "cuda"), ("reference+cl+compile", "reference"),
                                              ("cuda+step", "cuda"), ("reference+cl+step", "reference")])
def test_backend_of_variant(variant, backend):
    assert S._backend(variant) == backend


@pytest.mark.parametrize("bad", ["", "nope", "reference+eager", "cuda+compile+compile", "cuda+cl+cl", "cuda+step+step",
                                 "cuda+compile+step"])
def test_bad_variant_names_the_argument(bad):
    with pytest.raises(ValueError, match="variant"):
        S._backend(bad)
    with pytest.raises(TypeError, match="variant"):
        S._backend(3)


def test_interleaved_runs_every_fn_in_turns():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    res = S.interleaved(fns, rounds=3, reps=2, warmup=1)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then rounds in turns
    assert {k: r["n"] for k, r in res.items()} == {"a": 6, "b": 6}
    assert all(r["median_ms"] >= 0 for r in res.values())


def test_interleaved_counts_page_faults_per_run():
    import torch
    # 64 MiB written per run: above any malloc mmap threshold, so mapped afresh every time (16,384 faults
    # of 4 KiB pages, or 32 where transparent huge pages back it)
    fns = {"touch": lambda: torch.ones(1 << 24).sum(), "none": lambda: None}
    res = S.interleaved(fns, rounds=2, reps=2, warmup=0)
    assert res["none"]["page_faults"] < 16
    assert res["touch"]["page_faults"] >= 30


def test_ratios_and_targets():
    res = {"reference": {"median_ms": 150.0}, "reference+compile": {"median_ms": 110.0},
           "cuda": {"median_ms": 100.0}}
    rows = {r["variant"]: r for r in S.with_ratios(res)}
    assert rows["cuda"]["x_reference"] == pytest.approx(1.5)
    assert rows["cuda"]["x_reference+compile"] == pytest.approx(1.1)
    assert rows["cuda"]["met_reference"] and rows["cuda"]["met_reference+compile"]
    assert "met_reference" not in rows["reference+compile"]  # targets are for the fused variants
    res["cuda"]["median_ms"] = 101.0
    rows = {r["variant"]: r for r in S.with_ratios(res)}
    assert not rows["cuda"]["met_reference"] and not rows["cuda"]["met_reference+compile"]


@pytest.mark.parametrize("variant", ["reference", "reference+compile"])
def test_train_step_updates_the_network(variant, monkeypatch):
    # compile is replaced by identity: this checks the step's plumbing (forced weight normalization
    # inside the forward or once per step, Adam, EMA), not torch.compile.
    monkeypatch.setattr(torch, "compile", lambda m: m)
    built = []
    real_build = S.M._build
    monkeypatch.setattr(S.M, "_build", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    step = S.make_train_step(TINY, 2, torch.float32, torch.device("cpu"), variant)
    before = [p.detach().clone() for p in built[0].parameters()]
    step()
    after = list(built[0].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(torch.isfinite(p).all() for p in after)


@pytest.mark.parametrize("variant", ["reference+step", "reference+cl+step"])
def test_whole_step_variant_trains_in_one_region(variant, monkeypatch):
    # '+step' is the trainer's CompiledStep (fullgraph: a graph break raises), here with aot_eager
    # instead of Inductor to keep it quick; the weights and both EMAs move and stay finite.
    import functools

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(_compile_aot_eager, real_compile))
    from edm2fast import phema

    built, emas = [], []
    real_build = S.M._build
    monkeypatch.setattr(S.M, "_build", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])

    class RecordedEMA(phema.PowerFunctionEMA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            emas.append(self)

    monkeypatch.setattr(phema, "PowerFunctionEMA", RecordedEMA)
    torch._dynamo.reset()
    step = S.make_train_step(TINY, 2, torch.float32, torch.device("cpu"), variant)
    net, (ema,) = built[0], emas
    before = [p.detach().clone() for p in net.parameters()]
    ema_before = [[p.detach().clone() for p in e.parameters()] for e in ema.emas]
    for _ in range(2):
        step()
    after = list(net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(torch.isfinite(p).all() for p in after)
    assert len(ema.emas) == 2
    for e, old in zip(ema.emas, ema_before):
        assert any(not torch.equal(a, b) for a, b in zip(e.parameters(), old))
        assert all(torch.isfinite(p).all() for p in e.parameters())
    assert net.training and ("+cl" not in variant or net.channels_last)


def _compile_aot_eager(real_compile, fn, **kwargs):
    assert kwargs.get("fullgraph") is True
    return real_compile(fn, **{**kwargs, "backend": "aot_eager", "mode": None})


def test_whole_step_variant_has_no_sampler():
    with pytest.raises(ValueError, match="variant"):
        S.make_sampler(TINY, 2, torch.float32, torch.device("cpu"), "cuda+step", num_steps=2)


def test_breakdown_groups_add_up(monkeypatch):
    rows = S.breakdown(TINY, 2, ["reference"], steps=1)
    (r,) = rows
    groups = [g for g, _ in S._GROUPS] + ["rest"]
    assert r["total"] == pytest.approx(sum(r[g] for g in groups))
    assert r["convolution"] > 0 and r["optimizer"] > 0 and r["rest"] >= 0
    assert r["ceiling_x_reference"] >= 1.0  # the library kernels are part of the total


@pytest.mark.parametrize("fused_adam, expected", [(None, True), (True, True), (False, False)])
def test_fused_adam_option(fused_adam, expected, monkeypatch):
    """torch's fused Adam by default (as benchmarks.model.train_step), the per-tensor loop on request."""
    made = []
    real = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda *a, **k: made.append(k) or real(*a, **k))
    S.make_train_step(TINY, 1, torch.float32, torch.device("cpu"), "reference", fused_adam=fused_adam)
    assert made[0]["fused"] is expected


def test_cl_variant_builds_a_channels_last_network(monkeypatch):
    built = []
    real = S.M._build
    monkeypatch.setattr(S.M, "_build", lambda kw, *a, **k: built.append(kw) or real(kw, *a, **k))
    S.make_train_step(TINY, 1, torch.float32, torch.device("cpu"), "reference+cl")
    S.make_train_step(TINY, 1, torch.float32, torch.device("cpu"), "reference")
    assert built[0].get("channels_last") is True and not built[1].get("channels_last")


def test_sampler_table_times_variants_with_ratios(monkeypatch):
    """Every variant (channels_last, compiled) is a sampler row with its speed-up over the reference;
    only fused variants carry the target flag; a channels_last network really runs channels_last."""
    monkeypatch.setattr(torch, "compile", lambda m: m)
    built = []
    real_build = S.M._build
    monkeypatch.setattr(S.M, "_build", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    rows = S.sampler_table(TINY, 1, ["reference", "reference+compile", "cuda+cl"], num_steps=2, rounds=1)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"reference", "reference+compile", "cuda+cl"}
    assert by["cuda+cl"]["backend"] == "cuda" and by["cuda+cl"]["n"] == 1
    assert by["reference"]["x_reference"] == pytest.approx(1.0)
    assert "met_reference" in by["cuda+cl"] and "met_reference" not in by["reference+compile"]
    assert by["cuda+cl"]["x_reference"] == pytest.approx(by["reference"]["median_ms"] / by["cuda+cl"]["median_ms"])
    assert "x_reference+compile" in by["cuda+cl"]
    assert [getattr(n, "channels_last", False) for n in built] == [False, False, True]
