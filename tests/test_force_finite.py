"""``mk.force_finite_``: the training step's gradient clean-up (spec §6) as one multi-tensor op.

Every backend must give what ``torch.nan_to_num(t, nan=0, posinf=0, neginf=0, out=t)`` gives on
each tensor, bit for bit (finite elements keep their bits, -0.0 and subnormals included; inf and
NaN become +0), in every dtype and layout, for lists that mix dtypes, layouts, sizes and empty
tensors; the 'cuda' backend through its C++ twin (and its CUDA kernel on a GPU), 'triton' through
the interpreter (its kernel on a GPU). Plus: bad input names the argument, the written tensors'
version counters move, ``torch.compile(fullgraph=True)`` traces it, the meta device counts one op,
and the trainer's step uses it.
"""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from conftest import kernel_device
from mpkernels import _library
from mpkernels import reference as R

NAN, INF = float("nan"), float("inf")
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so that NaN payloads, -0.0 and subnormals compare exactly)."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().cpu().contiguous().view(view)


def _specials(dtype: torch.dtype) -> list[float]:
    fi = torch.finfo(dtype)
    return [NAN, INF, -INF, -0.0, 0.0, fi.max, -fi.max, fi.tiny, fi.tiny / 4, -fi.tiny / 4]


def _sprinkle(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``t`` (any layout) with special values at random places: every kind at least once."""
    flat = t.detach().reshape(-1).clone()
    specials = torch.tensor(_specials(t.dtype), dtype=torch.float64).to(t.dtype)
    k = min(flat.numel(), max(len(specials), flat.numel() // 50))
    idx = torch.randperm(flat.numel(), generator=g)[:k]
    flat[idx] = specials.repeat(k // len(specials) + 1)[:k]
    with torch.no_grad():
        t.copy_(flat.view(t.shape))
    return t


def _mixed_list(device, seed=0, dtypes=FLOATS) -> list[torch.Tensor]:
    """Contiguous, channels_last, strided (not dense), transposed (dense, not contiguous), empty,
    one-element and chunk-crossing (> 16K elements) tensors of every dtype."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for dt in dtypes:
        base = [
            torch.randn(6, 5, 3, 3, generator=g),
            torch.randn(4, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last),
            torch.randn(7, 12, generator=g)[:, ::3],            # not dense
            torch.randn(9, 11, generator=g).t(),                # dense, not contiguous
            torch.randn(0, 4, generator=g),
            torch.randn(1, generator=g),
            torch.randn(40000, generator=g),                    # several chunks, across task boundaries
            torch.randn(33, 17, generator=g),
        ]
        for t in base:
            t = t.to(dt)
            if t.numel():
                _sprinkle(t, g)
            out.append(t.to(device))
    return out


def _expected(ts):
    ref = [t.clone() for t in ts]
    for t in ref:
        torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0, out=t)
    return ref


def _assert_bits_equal(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"{what}: tensors[{i}] shape changed"
        assert torch.equal(_bits(a), _bits(b)), f"{what}: tensors[{i}] ({a.dtype}, shape {tuple(a.shape)}) differs"


BACKENDS = ["reference", "cuda", "triton"]


def _require(request, backend):
    """Skip (never on the GPU machine) when ``backend`` cannot run here; builds the extension for 'cuda'."""
    if backend == "cuda":
        request.getfixturevalue("cuda_backend")
    if backend not in mk.available_backends():
        if kernel_device().type == "cuda":
            raise RuntimeError(f"backend {backend!r} unavailable on the GPU machine")
        pytest.skip(f"backend {backend!r} not available here")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_nan_to_num_bit_for_bit(request, backend):
    _require(request, backend)
    dev = kernel_device()
    ts = _mixed_list(dev)
    want = _expected(ts)
    assert any(not torch.isfinite(t).all() for t in ts if t.numel())  # the input does have specials
    with mk.use_backend(backend, strict=True):
        mk.force_finite_(ts)
    _assert_bits_equal(ts, want, backend)
    assert all(bool(torch.isfinite(t).all()) for t in ts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors_and_float64(request, backend):
    """More tensors than one CUDA launch carries (64), and float64 (the reference's, whatever the
    backend: a fast backend's ``supports`` sends it there)."""
    _require(request, backend)
    dev = kernel_device()
    g = torch.Generator().manual_seed(3)
    ts = [_sprinkle(torch.randn(3 + i % 5, 7, generator=g), g).to(dev) for i in range(150)]
    want = _expected(ts)
    with mk.use_backend(backend):
        mk.force_finite_(ts)
    _assert_bits_equal(ts, want, backend)
    t64 = [_sprinkle(torch.randn(5, 5, generator=g, dtype=torch.float64), g).to(dev)]
    want64 = _expected(t64)
    with mk.use_backend(backend):
        mk.force_finite_(t64)
    _assert_bits_equal(t64, want64, backend + " float64")


def test_fast_backends_do_not_fall_back(cuda_backend):
    """The 'cuda' backend serves every float32/16/bf16 list itself (strict mode would raise on a fallback)."""
    ts = _mixed_list(torch.device("cpu"), seed=5)
    with mk.use_backend("cuda", strict=True):
        name, _ = mk._dispatch.implementation("force_finite_", (ts,), {})
    assert name == "cuda"


def test_finite_input_is_untouched_and_version_bumped(cuda_backend):
    """Finite values keep their bits; every written tensor's version counter moves (as nan_to_num's
    would), so autograd refuses a backward through a tensor saved before the clean-up."""
    g = torch.Generator().manual_seed(7)
    ts = [torch.randn(5, 6, generator=g), torch.randn(3, generator=g)]
    before = [t.clone() for t in ts]
    for backend in ("reference", "cuda"):
        versions = [t._version for t in ts]
        with mk.use_backend(backend, strict=True):
            mk.force_finite_(ts)
        _assert_bits_equal(ts, before, backend)
        assert all(t._version > v for t, v in zip(ts, versions)), backend
    w = torch.randn(4, requires_grad=True)
    e = torch.randn(4)
    y = (w * e).sum()  # saves e
    with mk.use_backend("cuda", strict=True):
        mk.force_finite_([e])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("lean", [True, False])
def test_lean_path_and_custom_op_agree(cuda_backend, lean, monkeypatch):
    """Plain eager calls the extension directly; with the lean path off, the custom op runs: same bits."""
    calls = []
    ops = cuda_backend._ops.get()
    real = ops.force_finite_
    monkeypatch.setattr(ops, "force_finite_", lambda *a: calls.append(1) or real(*a))
    ts = _mixed_list(torch.device("cpu"), seed=9)
    want = _expected(ts)
    with mk.use_backend("cuda", strict=True), _library.lean_path(lean):
        mk.force_finite_(ts)
    _assert_bits_equal(ts, want, f"lean={lean}")
    assert len(calls) == (0 if lean else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(request, backend):
    _require(request, backend)
    with mk.use_backend(backend):
        with pytest.raises(TypeError, match="tensors: expected a list or tuple"):
            mk.force_finite_(torch.zeros(3))
        with pytest.raises(TypeError, match=r"tensors\[1\]"):
            mk.force_finite_([torch.zeros(3), torch.zeros(3, dtype=torch.int32)])
        with pytest.raises(TypeError, match=r"tensors\[0\]"):
            mk.force_finite_(["not a tensor"])
        with pytest.raises(ValueError, match=r"tensors\[1\]"):
            mk.force_finite_([torch.zeros(3), torch.zeros(3, device="meta")])
        buf = torch.zeros(10)
        with pytest.raises(ValueError, match=r"tensors\[1\].*tensors\[0\]|tensors\[0\].*tensors\[1\]"):
            mk.force_finite_([buf[:6], buf[4:]])
        with pytest.raises(ValueError, match=r"tensors\[0\]: has internally overlapping memory"):
            mk.force_finite_([torch.zeros(3, 1).expand(3, 4)])
        mk.force_finite_([buf[:5], buf[5:]])  # disjoint views of one buffer are fine
        mk.force_finite_([])  # nothing to do


def test_extension_checks_its_arguments(cuda_backend):
    """The extension's own checks (reached by code that calls it directly) name the entry."""
    ext = cuda_backend._ops._EXT
    with pytest.raises(TypeError, match=r"tensors\[1\]: unsupported dtype"):
        ext.force_finite_([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"tensors\[0\]: has internally overlapping memory"):
        ext.force_finite_([torch.zeros(2, 1).expand(2, 3)])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compile_fullgraph_matches_eager(request, backend):
    """``torch.compile(fullgraph=True)`` traces the op (its custom op, functionalized) and gives eager's values."""
    _require(request, backend)
    dev = kernel_device()

    def step(ts):
        mk.force_finite_(ts)
        return sum(t.double().sum() for t in ts)  # float64: the specials include +-max, no overflow

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        ts = _mixed_list(dev, seed=11, dtypes=[torch.float32])
        ts = [t for t in ts if t.is_contiguous() and t.numel()]
        with mk.use_backend(backend, strict=True):
            total = fn(ts)
        outs.append((total, ts))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    _assert_bits_equal(outs[1][1], outs[0][1], f"{backend} compiled")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_meta_device_counts_one_op_per_dtype(backend):
    """Launch accounting on the meta device: the fused backends' clean-up is one op per dtype group
    (the reference: one per tensor)."""
    from benchmarks.model import _Counter
    ts = [torch.empty(5, 4, device="meta") for _ in range(7)] + [torch.empty(3, device="meta", dtype=torch.float16)]
    for name, expected in ((backend, None), ("reference", 8)):
        counter = _Counter()
        ctx = mk._dispatch.simulate(name) if name != "reference" else mk.use_backend("reference")
        with ctx, counter:
            mk.force_finite_(ts)
        if expected is None:
            assert counter.ops <= 2, counter.by_op  # cuda: one custom op; triton: one per dtype group
        else:
            assert counter.ops == expected, counter.by_op


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_trainer_step_zeroes_nonfinite_gradients_in_one_call(request, tmp_path, backend, monkeypatch):
    """A real trainer step whose gradient holds NaN and inf: one force_finite_ call gets every
    gradient, the non-finite entries reach Adam as 0 (the weights stay finite) and the finite ones
    are untouched (the same update as nan_to_num per parameter)."""
    _require(request, backend)
    from edm2fast import train
    net_kw = dict(model_channels=16, channel_mult=[1, 2], attn_resolutions=[], channels_per_head=32)
    cfg = dict(data="digits16", preset="tiny", network=net_kw, batch=16, duration=64, snapshot=1024,
               checkpoint=1024, status=64, progress=False, lr=0.01, rampup=0.001, backend=backend)
    calls, grads_seen = [], []
    real = mk.force_finite_

    def spy(ts):
        calls.append(len(ts))
        grads_seen.extend(t.clone() for t in ts)
        real(ts)

    trainer = train.Trainer(train.TrainConfig(run_dir=str(tmp_path), **cfg), log=lambda m: None)
    trainer._prepare()
    params = [p for p in trainer.net.parameters() if p.requires_grad]
    p0 = params[0]
    p0.register_hook(_poison)
    monkeypatch.setattr(mk, "force_finite_", spy)
    trainer.step()
    with_grad = [p for p in params if p.grad is not None]
    assert calls == [len(with_grad)]
    assert not bool(torch.isfinite(grads_seen[0]).all())  # the poisoned gradient reached the clean-up
    want = _expected(grads_seen)
    _assert_bits_equal([p.grad for p in with_grad], want, "trainer gradients")
    assert all(bool(torch.isfinite(p).all()) for p in trainer.net.parameters())


def _poison(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    flat = g.view(-1)
    flat[0], flat[-1] = NAN, INF
    return g


def test_cpu_twins_split_lists_across_threads(cuda_backend):
    """The C++ twins of force_finite_, ema_lerp_ and force_normalize_ run a whole list as one
    parallel region whose tasks cross tensor boundaries (and split tensors): with 4 threads the
    results equal the 1-thread run bit for bit (per-element / per-row math does not depend on the
    split), and force_finite_ equals nan_to_num."""
    sizes = [(3, 5), (70001,), (64, 64, 3, 3), (1, 1), (0, 7), (129, 257), (40000,), (5, 3, 3, 3)]

    def make():
        gg = torch.Generator().manual_seed(22)
        ts = [_sprinkle(torch.randn(s, generator=gg), gg) if _numel(s) else torch.randn(s) for s in sizes]
        es = [torch.randn(s, generator=gg) for s in sizes]
        ws = [torch.randn(s, generator=gg) for s in sizes if len(s) >= 2 and _numel(s)]
        return ts, es, ws

    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            ts, es, ws = make()
            want = _expected(ts)
            with mk.use_backend("cuda", strict=True):
                mk.force_finite_(ts)
                mk.ema_lerp_(es, ts, 0.3)
                mk.force_normalize_(ws)
            _assert_bits_equal(ts, want, f"force_finite_ ({n} threads)")
            results.append(ts + es + ws)
    finally:
        torch.set_num_threads(threads)
    _assert_bits_equal(results[1], results[0], "4 threads vs 1")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
