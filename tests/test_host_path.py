"""The lean eager path of the kernel ops (mpkernels._library) and the dispatch cache.

Eager calls of an op made by ``kernel_op`` skip the ``torch.library`` machinery when that is
equivalent; these tests check that it is: bit-identical outputs and gradients against the
custom-op path for every op of the 'cuda' backend (its CPU twins) and a few Triton ops (under
the interpreter), and that the custom op still runs wherever something watches or transforms
op calls (dispatch modes, fake and meta tensors, torch.compile, functorch).
No timing here: host time per call is measured by ``python -m benchmarks`` (host_overhead).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mpkernels as mk
from mpkernels import _dispatch, _library


class _Recorder(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, cl=False):
        t = torch.randn(shape, generator=g).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if cl else t

    return dict(x=r(2, 5, 4, 4), x2=r(2, 5, 4, 4, cl=True), x3=r(2, 3, 4, 4), c=r(2, 5), w=r(6, 5, 3, 3),
                wl=r(6, 5), xl=r(3, 5), gain=torch.tensor(1.3).to(dtype), qkv=r(2, 12, 4, 4))


# name -> (call, names of the differentiable inputs); every public op a fast backend implements
CASES = {
    "mp_silu": (lambda d: mk.mp_silu(d["x"]), ("x",)),
    "pixel_norm": (lambda d: mk.pixel_norm(d["x2"], 1e-3), ("x2",)),
    "pixel_norm_mp_silu": (lambda d: mk.pixel_norm_mp_silu(d["x"]), ("x",)),
    "modulated_mp_silu": (lambda d: mk.modulated_mp_silu(d["x2"], d["c"]), ("x2", "c")),
    "mp_sum": (lambda d: mk.mp_sum(d["x"], d["x2"], 0.3), ("x", "x2")),
    "mp_sum_clip": (lambda d: mk.mp_sum_clip(d["x"], d["x2"], 0.3, 0.5), ("x", "x2")),
    "mp_weight": (lambda d: mk.mp_weight(d["w"], 1.5), ("w",)),
    "mp_weight_tensor_gain": (lambda d: mk.mp_weight(d["w"], d["gain"]), ("w", "gain")),
    "mp_conv2d": (lambda d: mk.mp_conv2d(d["x"], d["w"], 0.7), ("x", "w")),
    "mp_linear": (lambda d: mk.mp_linear(d["xl"], d["wl"]), ("xl", "wl")),
    "mp_cat": (lambda d: mk.mp_cat(d["x"], d["x3"], 1, 0.3), ("x", "x3")),
    "mp_cat_mp_silu": (lambda d: mk.mp_cat_mp_silu(d["x"], d["x3"], 1, 0.3), ("x", "x3")),
    "cosine_attention": (lambda d: mk.cosine_attention(d["qkv"], 2), ("qkv",)),
    "resample_down": (lambda d: mk.resample(d["x2"], "down"), ("x2",)),
}


def _run(backend: str, case: str, dtype, lean: bool):
    """Outputs and input gradients of ``case`` on ``backend`` (strict: no silent fallback)."""
    call, diff = CASES[case]
    d = _inputs(dtype)
    for k in diff:
        d[k].requires_grad_(True)
    with mk.use_backend(backend, strict=True), _library.lean_path(lean):
        out = call(d)
        outs = list(out) if isinstance(out, tuple) else [out]
        g = torch.Generator().manual_seed(1)
        cots = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, [d[k] for k in diff], cots)
        with torch.no_grad():
            out_ng = call(d)
    return outs, list(grads), list(out_ng) if isinstance(out_ng, tuple) else [out_ng]


def _assert_identical(a: list[torch.Tensor], b: list[torch.Tensor], what: str):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride(), f"{what}[{i}]"
        assert torch.equal(x, y), f"{what}[{i}]: max diff {(x.double() - y.double()).abs().max().item()}"


def _compare(backend: str, case: str, dtype):
    try:
        slow = _run(backend, case, dtype, lean=False)
    except (mk.BackendUnavailableError, AttributeError) as e:  # op not served by this backend (build)
        pytest.skip(f"{case} not served by {backend!r} here: {e}")
    fast = _run(backend, case, dtype, lean=True)
    for what, a, b in zip(("output", "grad", "no-grad output"), fast, slow):
        _assert_identical(a, b, f"{case} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_backend_lean_path_is_bit_identical(cuda_backend, case, dtype):
    _compare("cuda", case, dtype)


@pytest.mark.parametrize("case", ["mp_silu", "pixel_norm_mp_silu", "mp_sum_clip", "resample_down"])
def test_triton_lean_path_is_bit_identical(case):
    if "triton" not in mk.available_backends():
        pytest.skip("Triton backend not available (needs TRITON_INTERPRET=1 on CPU)")
    _compare("triton", case, torch.float32)


@pytest.mark.parametrize("case", ["pixel_norm_mp_silu", "mp_conv2d", "mp_sum_clip"])
def test_lean_path_under_autocast_is_bit_identical(cuda_backend, case):
    def run(lean):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _run("cuda", case, torch.float32, lean)

    for what, a, b in zip(("output", "grad", "no-grad output"), run(True), run(False)):
        _assert_identical(a, b, f"{case} autocast {what}")


def _silu_op(cuda_backend):
    return cuda_backend._ops.get().mp_silu


def test_lean_path_is_taken_in_plain_eager(cuda_backend, monkeypatch):
    """Plain eager calls take the lean path (with and without autograd); with it off, none do."""
    op = _silu_op(cuda_backend)
    calls = []  # the lean path calls op._lean_impl; the custom op calls its registered kernel
    real = op._lean_impl
    monkeypatch.setattr(op, "_lean_impl", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with mk.use_backend("cuda", strict=True):
        y = mk.mp_silu(x)
        assert type(y.grad_fn).__name__.startswith("Lean_")
        mk.mp_silu(x.detach())
        assert len(calls) == 2
        with _library.lean_path(False):
            y = mk.mp_silu(x)
            mk.mp_silu(x.detach())
        assert len(calls) == 2 and not type(y.grad_fn).__name__.startswith("Lean_")


def test_parameters_take_the_lean_path(cuda_backend):
    w = torch.nn.Parameter(torch.randn(6, 5, 3, 3))
    with mk.use_backend("cuda", strict=True):
        y = mk.mp_weight(w, 1.5)
    assert type(y.grad_fn).__name__.startswith("Lean_")


def test_dispatch_mode_sees_the_custom_op(cuda_backend):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with mk.use_backend("cuda", strict=True), _Recorder() as rec:
        y = mk.mp_silu(x)
        y.sum().backward()
    assert "mpkernels.cuda_mp_silu" in rec.names and "mpkernels.cuda_mp_silu_backward" in rec.names
    assert not type(y.grad_fn).__name__.startswith("Lean_")


def test_meta_tensors_and_simulate_see_the_custom_op(cuda_backend):
    """The benchmark's launch accounting: meta tensors under a dispatch mode and ``simulate``."""
    x = torch.randn(2, 3, 4, 4, device="meta", requires_grad=True)
    with _dispatch.simulate("cuda"), _Recorder() as rec:
        y = mk.pixel_norm_mp_silu(x)[1]
        y.sum().backward()
    assert y.device.type == "meta"
    assert "mpkernels.cuda_pixel_norm_mp_silu" in rec.names
    assert "mpkernels.cuda_pixel_norm_mp_silu_backward" in rec.names
    # meta tensors without a mode: the custom op's fake function, not the kernel
    with _dispatch.simulate("cuda"):
        y = mk.mp_silu(x)
    assert y.device.type == "meta" and not type(y.grad_fn).__name__.startswith("Lean_")


def test_fake_tensor_mode_sees_the_custom_op(cuda_backend):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, mk.use_backend("cuda", strict=True):
        x = mode.from_tensor(torch.randn(2, 3, 4, 4))
        y = mk.mp_sum_clip(x, x, 0.3, 1.0)
    assert type(y).__name__ == "FakeTensor" and y.shape == (2, 3, 4, 4)


def test_compile_fullgraph_traces_the_custom_ops(cuda_backend):
    """Dynamo never takes the lean path: the graph holds the custom ops, with no graph break."""
    targets: list[str] = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def block(x, c, a):
        xn, y = mk.pixel_norm_mp_silu(x)
        y = mk.modulated_mp_silu(y, c)
        return mk.mp_sum_clip(y, a, 0.3, 2.0), xn

    torch._dynamo.reset()
    x, a = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    c = torch.randn(2, 5, requires_grad=True)
    with mk.use_backend("cuda", strict=True):
        eager = block(x, c, a)
        out = torch.compile(block, backend=backend, fullgraph=True)(x, c, a)
        explain = torch._dynamo.explain(block)(x, c, a)
    assert explain.graph_break_count == 0
    assert any("cuda_pixel_norm_mp_silu" in t for t in targets), targets
    assert any("cuda_mp_sum_clip" in t for t in targets), targets
    _assert_identical(list(out), list(eager), "compiled")


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_functorch_transforms_behave_as_the_custom_op(cuda_backend, transform):
    """Under torch.func the custom op runs (lean or not): same result, or the same error."""
    x = torch.randn(3, 2, 4, 4)

    def run(lean):
        with mk.use_backend("cuda", strict=True), _library.lean_path(lean):
            try:
                if transform == "grad":
                    return torch.func.grad(lambda t: mk.mp_silu(t).sum())(x)
                return torch.func.vmap(mk.mp_silu)(x)
            except Exception as e:  # noqa: BLE001  (the same failure on both paths is what we check)
                return type(e)

    a, b = run(True), run(False)
    if isinstance(b, type):
        assert a is b
    else:
        _assert_identical([a], [b], transform)


def test_dispatch_cache_follows_backend_changes(cuda_backend):
    x = torch.randn(2, 3, 4, 4)
    mk.set_backend("cuda")
    assert _dispatch.implementation("mp_silu", (x,))[0] == "cuda"
    mk.mp_silu(x)  # fills the cache for ('mp_silu', 'cuda', 'cpu')
    mk.set_backend("reference")
    assert _dispatch.implementation("mp_silu", (x,))[0] == "reference"
    with mk.use_backend("cuda"):
        assert _dispatch.implementation("mp_silu", (x,))[0] == "cuda"
    assert _dispatch.implementation("mp_silu", (x,))[0] == "reference"
    mk.set_backend("auto")
    assert _dispatch.implementation("mp_silu", (x,))[0] == "cuda"


def test_dispatch_cache_follows_registrations():
    """A backend registered (or removed) after a call is seen by the next call under 'auto'."""
    x = torch.randn(2, 3)
    mk.set_backend("auto")
    before = _dispatch.implementation("mp_silu", (x,))[0]
    mk.mp_silu(x)
    mk.register_backend("test_host_path", priority=1000, auto_devices=("cpu",))
    try:
        mk.register("mp_silu", "test_host_path", lambda t: t * 0, devices=("cpu",))
        assert _dispatch.implementation("mp_silu", (x,))[0] == "test_host_path"
        assert torch.equal(mk.mp_silu(x), x * 0)
        _dispatch._IMPLS.pop(("mp_silu", "test_host_path"))  # direct edits invalidate too
        assert _dispatch.implementation("mp_silu", (x,))[0] == before
    finally:
        _dispatch._BACKENDS.pop("test_host_path", None)
        _dispatch._IMPLS.pop(("mp_silu", "test_host_path"), None)
        _dispatch.refresh_availability()
    assert _dispatch.implementation("mp_silu", (x,))[0] == before


def test_supports_still_decides_per_call(cuda_backend):
    """The cache holds candidates, not answers: float64 still falls back to the reference."""
    with mk.use_backend("cuda"):
        assert _dispatch.implementation("mp_silu", (torch.randn(3, 3),))[0] == "cuda"
        assert _dispatch.implementation("mp_silu", (torch.randn(3, 3, dtype=torch.float64),))[0] == "reference"
    with mk.use_backend("cuda", strict=True), pytest.raises(mk.BackendUnavailableError):
        mk.mp_silu(torch.randn(3, 3, dtype=torch.float64))


def test_host_overhead_rows(cuda_backend):
    """The benchmark's host-overhead rows: one per op for the reference and each serving backend."""
    from benchmarks import ops as O
    rows = O.host_overhead(torch.device("cpu"), ["cuda"], reps=5)
    by = {(r["op"], r["backend"]): r for r in rows}
    assert set(O.HOST_OPS) <= {op for op, b in by if b == "reference"}
    r = by[("mp_silu", "cuda")]
    for k in ("host_us_fwd", "host_us_fwd_bwd", "ref_us_fwd", "ref_us_fwd_bwd", "custom_op_us_fwd",
              "custom_op_us_fwd_bwd", "raw_us_fwd", "overhead_us"):
        assert r[k] is not None and r[k] == r[k], k
    assert by[("mp_conv2d", "cuda")]["raw_us_fwd"] is None  # several kernels: no single raw kernel



def _inplace_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(6, 5, 3, 3, generator=g), torch.randn(4, 7, generator=g)]
    es = [torch.randn(w.shape, generator=g) for w in ws]
    return ws, es


def _count_custom_op(cuda_backend, monkeypatch, name):
    """Count calls of the backend's custom op ``name`` (the lean path does not call it)."""
    ops, calls = cuda_backend._ops.get(), []
    real = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("op", ["force_normalize_", "ema_lerp_"])
def test_inplace_multi_tensor_lean_path_is_bit_identical(cuda_backend, monkeypatch, op):
    """force_normalize_ / ema_lerp_ in plain eager call the extension directly: the same values as
    the custom op, the version counters of the written tensors bumped (as the custom op does), the
    read-only ones untouched."""
    calls = _count_custom_op(cuda_backend, monkeypatch, op)
    results = []
    for lean in (True, False):
        ws, es = _inplace_args()
        before = [t._version for t in ws + es]
        with mk.use_backend("cuda", strict=True), _library.lean_path(lean):
            if op == "force_normalize_":
                mk.force_normalize_(ws)
                written = ws
            else:
                mk.ema_lerp_(es, ws, 0.25)
                written = es
        assert len(calls) == (0 if lean else 1)
        results.append([t.clone() for t in ws + es])
        for t, b in zip(ws + es, before):
            assert (t._version > b) == any(t is w for w in written)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    ws0, es0 = _inplace_args()
    untouched = es0 if op == "force_normalize_" else ws0
    assert all(torch.equal(a, b) for a, b in zip(results[0][2:] if op == "force_normalize_" else results[0][:2],
                                                  untouched))


def test_inplace_lean_path_trips_autograd_version_check(cuda_backend):
    """A tensor saved for backward and then updated by the lean path: autograd refuses the backward."""
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    e = torch.randn(6, 5, 3, 3)
    y = (w * e).sum()  # saves e for backward
    with mk.use_backend("cuda", strict=True):
        mk.ema_lerp_([e], [w.detach()], 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_inplace_lean_path_is_not_taken_with_a_tensor_weight_or_under_a_mode(cuda_backend, monkeypatch):
    """A tensor weight (read by the kernel, capture-safe) and an active dispatch mode go through the
    custom op; a number weight in plain eager does not."""
    calls = _count_custom_op(cuda_backend, monkeypatch, "ema_lerp_")
    ws, es = _inplace_args()
    with mk.use_backend("cuda", strict=True):
        mk.ema_lerp_(es, ws, 0.25)
        assert calls == []
        mk.ema_lerp_(es, ws, torch.tensor(0.25))
        assert len(calls) == 1
        with _Recorder() as rec:
            mk.ema_lerp_(es, ws, 0.25)
    assert len(calls) == 2 and "mpkernels.cuda_ema_lerp_" in rec.names
