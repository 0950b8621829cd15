"""Multi-tensor in-place ops: overlapping tensors are rejected on every backend, and the Triton
path is safe under CUDA graph capture (tensor EMA weight, tables built ahead and never freed
while held). Capture is simulated by patching ``torch.cuda.is_current_stream_capturing``; on a GPU
machine one test also captures and replays a real ``torch.cuda.CUDAGraph``.

Kernel tests run on ``conftest.kernel_device()``: on a GPU machine CUDA tensors (Triton's kernels
and the extension's CUDA kernels), otherwise CPU tensors (the Triton interpreter and the
extension's CPU twins). Inputs are drawn on CPU, so the values are the same everywhere."""

from __future__ import annotations

import gc
import re

import pytest
import torch

import mpkernels as mk
from conftest import kernel_device, record_triton_launches
from mpkernels import _validate as V

DEV = kernel_device()
BACKENDS = ["reference", "triton", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cuda":
        request.getfixturevalue("cuda_backend")  # builds or skips
    elif request.param == "triton":
        from conftest import require_backend
        require_backend("triton")  # skips on CPU only; a failure on a GPU machine
    return request.param


def randn(*shape) -> torch.Tensor:
    """Normal values drawn on CPU (the global seed), on the kernel device."""
    return torch.randn(*shape).to(DEV)


@pytest.fixture
def mt(monkeypatch):
    """The Triton multi-tensor module with an empty table store (earlier tests' tables may match
    recycled addresses, which would hide builds)."""
    from conftest import require_backend
    require_backend("triton")
    from mpkernels.triton import multi_tensor
    monkeypatch.setattr(multi_tensor, "_TABLES", multi_tensor._TableStore(multi_tensor._RECENT_TABLES))
    return multi_tensor


def _capture(monkeypatch, on: bool = True):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on)


# --- overlapping tensors ---------------------------------------------------------------------

def _fn_cases():
    a, b = randn(4, 6), randn(3, 5)
    buf = randn(10, 4)
    grid = randn(8, 8)
    return [
        ("duplicate", [a, b, a], "tensors[2] overlaps tensors[0]"),
        ("row ranges", [buf[0:6], b, buf[4:10]], "tensors[2] overlaps tensors[0]"),
        ("transposed view", [b, a, a.t()], "tensors[2] overlaps tensors[1]"),
        # interleaved views share no element but their byte ranges intersect: rejected on purpose
        ("interleaved columns", [grid[:, :4], grid[:, 4:]], "tensors[1] overlaps tensors[0]"),
        ("mixed storages", [buf[:5], a, buf[5:], b, buf[2:4]], "tensors[4] overlaps tensors[0]"),
    ]


@pytest.mark.parametrize("case", range(len(_fn_cases())), ids=[c[0] for c in _fn_cases()])
def test_force_normalize_rejects_overlap(backend, case):
    _, ts, message = _fn_cases()[case]
    before = [t.clone() for t in ts]
    with mk.use_backend(backend, strict=True):
        with pytest.raises(ValueError, match=re.escape(message)):
            mk.force_normalize_(ts)
    for t, b in zip(ts, before):  # rejected before anything was written
        assert torch.equal(t, b)


def test_force_normalize_accepts_disjoint_views(backend):
    flat = randn(3 * 8 + 5 * 6 + 2 * 4 * 3 * 3)  # a flat parameter buffer, as fused optimizers keep
    views = [flat[:24].view(3, 8), flat[24:54].view(5, 6), flat[54:].view(2, 4, 3, 3)]
    other = randn(7, 9)
    expected = [mk.reference.normalize(t.double()).float() for t in views + [other]]
    with mk.use_backend(backend, strict=True):
        mk.force_normalize_(views + [other])
    for i, (t, e) in enumerate(zip(views + [other], expected)):
        torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-6, msg=f"tensor {i}")


def _ema_cases():
    e1, e2, t1 = randn(4, 6), randn(3, 5), randn(4, 6)
    flat = randn(48)
    return [
        ("ema duplicate", [e1, e2, e1], [t1, randn(3, 5), t1], "ema_tensors[2] overlaps ema_tensors[0]"),
        ("ema is its source", [e1], [e1], "tensors[0] overlaps ema_tensors[0]"),
        ("ema view in sources", [flat[:24].view(4, 6), e2], [t1, flat[20:35].view(3, 5)],
         "tensors[1] overlaps ema_tensors[0]"),
        ("ema halves overlap", [flat[:24], flat[20:44]], [flat.new_zeros(24), flat.new_zeros(24)],
         "ema_tensors[1] overlaps ema_tensors[0]"),
    ]


@pytest.mark.parametrize("case", range(len(_ema_cases())), ids=[c[0] for c in _ema_cases()])
def test_ema_lerp_rejects_overlap(backend, case):
    _, es, ts, message = _ema_cases()[case]
    before = [e.clone() for e in es]
    with mk.use_backend(backend, strict=True):
        with pytest.raises(ValueError, match=re.escape(message)):
            mk.ema_lerp_(es, ts, 0.25)
    for e, b in zip(es, before):
        assert torch.equal(e, b)


def test_ema_lerp_overlapping_ema_and_source_lists(backend):
    e1, e2 = randn(4, 6), randn(3, 5)
    with mk.use_backend(backend, strict=True):
        with pytest.raises(ValueError, match=re.escape("tensors[1] overlaps ema_tensors[0]")):
            mk.ema_lerp_([e1, e2], [randn(4, 6), e1[:3, :5]], 0.5)


def test_ema_lerp_sources_may_alias(backend):
    """Sources are only read: the same tensor twice, or views of one buffer, is fine."""
    flat_ema = randn(24 + 15)
    es = [flat_ema[:24].view(4, 6), flat_ema[24:].view(3, 5), randn(4, 6)]
    t = randn(4, 6)
    ts = [t, t[:3, :5], t]
    expected = [e.double() + 0.3 * (s.double() - e.double()) for e, s in zip(es, ts)]
    with mk.use_backend(backend, strict=True):
        mk.ema_lerp_(es, ts, 0.3)
    for i, (e, x) in enumerate(zip(es, expected)):
        torch.testing.assert_close(e.double(), x, rtol=1e-6, atol=1e-6, msg=f"tensor {i}")


def test_overlap_check_edges():
    base = torch.randn(20)
    V.no_overlap([("tensors", [base[:10], base[10:], torch.empty(0), base[10:10]], True)])  # touching, empty
    V.no_overlap([("tensors", [base[0:10:2], base[10:20:2]], True)])  # strided, disjoint ranges
    with pytest.raises(ValueError, match=re.escape("tensors[1] overlaps tensors[0] in memory (storage bytes [36, 80) and [0, 40))")):
        V.no_overlap([("tensors", [base[:10], base[9:]], True)])
    # aliasing sources alone are fine; a read range spanning a written one is not
    V.no_overlap([("ema", [torch.randn(3)], True), ("src", [base, base[3:], base], False)])
    with pytest.raises(ValueError, match=re.escape("src[1] overlaps ema[0]")):
        V.no_overlap([("ema", [base[5:8]], True), ("src", [base[:2], base, base[9:]], False)])
    meta = torch.empty(4, device="meta")
    V.no_overlap([("tensors", [meta, meta], True)])  # no memory to compare


# --- EMA weight as a 0-d device tensor -------------------------------------------------------

def _ema_lists(dtypes):
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (7, 20), (40000,), (1,), (3, 1200)]
    ts = [randn(s).to(dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]
    es = [randn(s).to(dtypes[(i + 1) % len(dtypes)]) for i, s in enumerate(shapes)]
    es.append(randn(6, 8).t())  # layouts differ: per-tensor reference path
    ts.append(randn(8, 6))
    return es, ts


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["fp32", "mixed"])
def test_triton_tensor_weight_matches_float_weight(mt, dtypes):
    es, ts = _ema_lists(dtypes)
    for w in (0.0, 0.0123, 0.5, 0.77, 1.0):
        by_float, by_tensor = [e.clone() for e in es], [e.clone() for e in es]
        with mk.use_backend("triton", strict=True):
            mk.ema_lerp_(by_float, ts, w)
            mk.ema_lerp_(by_tensor, ts, torch.tensor(w, device=DEV))
        for i, (a, b) in enumerate(zip(by_float, by_tensor)):
            assert torch.equal(a, b), f"weight {w}, tensor {i}: max diff {(a.double() - b.double()).abs().max()}"


def test_triton_weight_reaches_kernel_as_tensor(mt, monkeypatch):
    """The launch gets the weight tensor itself (read by the kernel), so a replay sees its new value."""
    seen = record_triton_launches(monkeypatch, keep=lambda cfg, args: args)
    e, t = torch.zeros(100, device=DEV), torch.ones(100, device=DEV)
    w = torch.tensor(0.25, device=DEV)
    with mk.use_backend("triton", strict=True):
        mk.ema_lerp_([e], [t], w)
        w.fill_(0.5)  # what a trainer does between replays
        mk.ema_lerp_([e], [t], w)
    assert all(isinstance(args[-1], torch.Tensor) and args[-1].dtype == torch.float32 for args in seen)
    torch.testing.assert_close(e, torch.full((100,), 0.625, device=DEV), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_weight_on_reference_and_cuda(backend, dtype):
    es, ts = _ema_lists((dtype,))
    for w in (0.0, 0.0123, 0.77, 1.0):
        by_float, by_tensor = [e.clone() for e in es], [e.clone() for e in es]
        with mk.use_backend(backend, strict=True):
            mk.ema_lerp_(by_float, ts, w)
            mk.ema_lerp_(by_tensor, ts, torch.tensor(w, dtype=torch.float64, device=DEV))
        for i, (a, b) in enumerate(zip(by_float, by_tensor)):
            if dtype == torch.float32:
                assert torch.equal(a, b), f"{backend}, weight {w}, tensor {i}"
            else:  # at most one rounding step apart (fp32 lerp, then one rounding)
                torch.testing.assert_close(a, b, rtol=2 ** -7, atol=0, msg=f"{backend}, weight {w}, tensor {i}")


@pytest.mark.parametrize("weight, error, text", [
    (torch.tensor([0.5]), ValueError, "weight: a tensor weight must be 0-d"),
    (torch.tensor(1, dtype=torch.int64), TypeError, "weight: unsupported dtype"),
    (torch.tensor(1.5), ValueError, "weight: must be <= 1"),
    (torch.tensor(float("nan")), ValueError, "weight: must be finite"),
    (torch.empty((), device="meta"), ValueError, "weight: on device meta"),
    ("0.5", TypeError, "weight: expected a real number"),
])
def test_tensor_weight_validation(weight, error, text):
    with pytest.raises(error, match=re.escape(text)):
        mk.ema_lerp_([torch.zeros(3)], [torch.ones(3)], weight)


# --- work tables under (simulated) CUDA graph capture ----------------------------------------

def _weights(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 + i, 5, generator=g).to(DEV) for i in range(n)]


def _fn(ws):
    with mk.use_backend("triton", strict=True):
        mk.force_normalize_(ws)


def test_table_built_once_and_reused(mt):
    ws = _weights()
    _fn(ws)
    _fn(ws)
    assert mt._TABLES.builds == 1
    es, ts = [torch.zeros(4, 5, device=DEV)], [torch.ones(4, 5, device=DEV)]
    with mk.use_backend("triton", strict=True):
        for w in (0.1, 0.2, torch.tensor(0.3, device=DEV)):
            mk.ema_lerp_(es, ts, w)
    assert mt._TABLES.builds == 2


def test_capture_without_table_raises(mt, monkeypatch):
    ws = _weights()
    es, ts = [torch.zeros(4, 5, device=DEV)], [torch.ones(4, 5, device=DEV)]
    _capture(monkeypatch)
    with pytest.raises(RuntimeError, match=r"being captured.*prepare_force_normalize_"):
        _fn(ws)
    with pytest.raises(RuntimeError, match=r"being captured.*prepare_ema_lerp_"):
        with mk.use_backend("triton", strict=True):
            mk.ema_lerp_(es, ts, torch.tensor(0.5, device=DEV))
    with pytest.raises(RuntimeError, match="being captured"):
        mt.prepare_force_normalize_(ws)
    assert mt._TABLES.builds == 0


def test_capture_after_warmup_holds_table_for_good(mt, monkeypatch):
    ws = _weights()
    _fn(ws)  # eager warm-up builds the table
    _capture(monkeypatch)
    _fn(ws)  # "captured": uses the table, which is now held
    _capture(monkeypatch, False)
    for seed in range(mt._RECENT_TABLES + 4):  # more lists than the cache keeps
        _fn([randn(2, 3 + seed)])
    _capture(monkeypatch)
    _fn(ws)  # still there: no build, no error
    assert mt._TABLES.builds == 1 + mt._RECENT_TABLES + 4
    assert len(mt._TABLES.recent) == mt._RECENT_TABLES


def test_prepared_tables_survive_eviction_until_released(mt, monkeypatch):
    ws = _weights()
    es = [torch.zeros(4, 5, device=DEV), torch.zeros(3, device=DEV)]
    ts = [torch.ones(4, 5, device=DEV), torch.ones(3, device=DEV)]
    handle = mt.prepare_force_normalize_(ws)
    ema_handle = mt.prepare_ema_lerp_(es, ts)
    assert mt._TABLES.builds == 2
    for seed in range(mt._RECENT_TABLES + 1):
        _fn([randn(2, 3 + seed)])
    _capture(monkeypatch)
    _fn(ws)
    with mk.use_backend("triton", strict=True):
        mk.ema_lerp_(es, ts, torch.tensor(0.5, device=DEV))
    torch.testing.assert_close(es[1], torch.full((3,), 0.5, device=DEV))
    _capture(monkeypatch, False)
    # The EMA handle is released when dropped; the other explicitly. Captures above hold the
    # tables they used for good, so check release on fresh lists.
    ws2 = _weights(seed=1)
    with mt.prepare_force_normalize_(ws2) as h2:
        key = h2.keys[0]
        assert key in mt._TABLES.held
    assert key not in mt._TABLES.held and key in mt._TABLES.recent
    h3 = mt.prepare_force_normalize_(ws2)
    del h3
    gc.collect()
    assert key not in mt._TABLES.held
    for seed in range(mt._RECENT_TABLES + 1):
        _fn([randn(3, 2 + seed)])
    assert key not in mt._TABLES  # evicted once nothing holds it
    handle.release()
    del ema_handle


def test_tables_reach_cuda_through_pinned_memory(mt, monkeypatch):
    """A CUDA table is copied from pinned memory without blocking (simulated: no GPU here)."""
    calls = []

    class FakeHost:
        def pin_memory(self):
            calls.append("pin")
            return self

        def to(self, device, non_blocking=False):
            calls.append(("to", str(device), non_blocking))
            return "device table"

    assert mt._on_device(FakeHost(), torch.device("cuda", 0)) == "device table"
    assert calls == ["pin", ("to", "cuda:0", True)]
    host = torch.arange(4)
    assert mt._on_device(host, torch.device("cpu")) is host


@pytest.mark.skipif(DEV.type != "cuda", reason="needs a GPU: a real CUDA graph capture (simulated above on CPU)")
def test_cuda_graph_replay_with_changed_weight_matches_eager(mt):
    """Capture force_normalize_ and ema_lerp_ (tensor weight) in a CUDA graph after the prepare_*
    calls; each replay with a new weight value equals eager ops on copies of the same state."""
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(s, generator=g).to(DEV) for s in ((8, 3, 3, 3), (16, 40), (5, 7))]
    es = [torch.randn(s, generator=g).to(DEV) for s in ((4, 6), (40000,), (3, 1200))]
    ts = [torch.randn(e.shape, generator=g).to(DEV) for e in es]
    w = torch.tensor(0.25, device=DEV)
    ws0, es0 = [x.clone() for x in ws], [x.clone() for x in es]
    with mt.prepare_force_normalize_(ws), mt.prepare_ema_lerp_(es, ts), mk.use_backend("triton", strict=True):
        side = torch.cuda.Stream()  # warm-up (kernel compilation) off the capture, as torch advises
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            mk.force_normalize_(ws)
            mk.ema_lerp_(es, ts, w)
        torch.cuda.current_stream().wait_stream(side)
        for x, x0 in zip(ws + es, ws0 + es0):
            x.copy_(x0)  # same storage: the prepared tables stay valid
        builds = mt._TABLES.builds
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mk.force_normalize_(ws)
            mk.ema_lerp_(es, ts, w)
        assert mt._TABLES.builds == builds, "capture built a table"
        for weight in (0.25, 0.8, 0.0):
            want_w, want_e = [x.clone() for x in ws], [x.clone() for x in es]
            mk.force_normalize_(want_w)  # eager, on copies of the state the replay starts from
            mk.ema_lerp_(want_e, ts, weight)
            w.fill_(weight)  # what a trainer does between replays
            graph.replay()
            torch.cuda.synchronize()
            for i, (x, want) in enumerate(zip(ws + es, want_w + want_e)):
                torch.testing.assert_close(x, want, msg=lambda m: f"weight {weight}, tensor {i}: {m}")
        del graph


def test_force_finite_under_capture(mt, monkeypatch, declared_triton_launches):
    """force_finite_ under capture: without a table (gradients made by the captured backward) it runs
    the reference's per-tensor kernels instead of raising, building nothing; with a prepared or
    warmed-up table it launches its one kernel per dtype group and holds the table for good."""
    def grads(seed):
        g = torch.Generator().manual_seed(seed)
        ts = [torch.randn(4, 5, generator=g), torch.randn(300, generator=g)]
        ts[0][1, 2], ts[1][7], ts[1][9] = float("nan"), float("inf"), float("-inf")
        return [t.to(DEV) for t in ts]

    def expected(ts):
        return [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in ts]

    ts = grads(0)
    want = expected(ts)
    _capture(monkeypatch)
    n_launches = len(declared_triton_launches)
    with mk.use_backend("triton", strict=True):
        mk.force_finite_(ts)
    assert mt._TABLES.builds == 0 and len(declared_triton_launches) == n_launches
    for a, b in zip(ts, want):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="being captured"):
        mt.prepare_force_finite_(ts)
    _capture(monkeypatch, False)
    ts2 = grads(1)
    want2 = expected(ts2)
    handle = mt.prepare_force_finite_(ts2)
    assert mt._TABLES.builds == 1
    _capture(monkeypatch)
    with mk.use_backend("triton", strict=True):
        mk.force_finite_(ts2)
    assert len(declared_triton_launches) == n_launches + 1 and mt._TABLES.builds == 1
    for a, b in zip(ts2, want2):
        assert torch.equal(a, b)
    handle.release()
    assert handle.keys[0] in mt._TABLES.held  # used under capture: held for good
