"""``mk.mp_weights(..., force_normalize=True)``: forced weight normalization folded into ``mp_weights``.

On every backend the call must equal ``mk.force_normalize_(ws); mk.mp_weights(ws, ...)`` on the
reference: the results, the weights it updates in place (version counters bumped) and the
gradients of weights and gains. On Triton it is one launch per output dtype forward (one
``triton_mp_weights_forced`` op) and the ordinary backward; overlapping weights are refused; and
``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import re

import pytest
import torch

import mpkernels as mk
from conftest import OpNames, kernel_device

DEV = kernel_device()
HAS_TRITON = "triton" in mk.available_backends()


@pytest.fixture(autouse=True)
def _declared_launches(declared_triton_launches):
    """Every Triton launch must be a configuration the backend declares (the AOT test compiles those)."""


def make_case(seed: int = 0, device=DEV):
    """fp32 weights of odd shapes (channels_last, a qkv weight with heads), number and tensor gains."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, cl=False, scale=1.0):
        t = torch.randn(*shape, generator=g) * scale
        if cl:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.to(device).requires_grad_(True)

    weights = [w(6, 5, 3, 3, scale=3.0), w(7, 3, 3, 3, cl=True), w(12, 9, scale=0.1), w(4, 600), w(18, 4, 1, 1)]
    gains = [1.0, torch.tensor(0.7, device=device).requires_grad_(True), 2.5,
             torch.tensor([1.3], device=device).requires_grad_(True), torch.tensor(0.4, device=device)
             .requires_grad_(True)]
    heads = [None, None, 2, None, 3]  # 12 = 3*2*2, 18 = 3*3*2
    return weights, gains, heads


def _clone(weights, gains):
    ws = [w.detach().clone(memory_format=torch.preserve_format).requires_grad_(True) for w in weights]
    gs = [g.detach().clone().requires_grad_(True) if isinstance(g, torch.Tensor) else g for g in gains]
    return ws, gs


def _leaves(weights, gains):
    return list(weights) + [g for g in gains if isinstance(g, torch.Tensor)]


def _loss(outs):
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=g).to(o.device) for o in outs]
    return sum((o.double() * u.double()).sum() for o, u in zip(outs, ups))


def _expected(weights, gains, heads, dtypes):
    """The unfused pair on the reference backend: results, updated weights, gradients of the leaves."""
    ws, gs = _clone(weights, gains)
    with mk.use_backend("reference"):
        mk.force_normalize_(ws)
        outs = mk.mp_weights(ws, gs, qkv_heads=heads, dtypes=dtypes)
    grads = torch.autograd.grad(_loss(outs), _leaves(ws, gs))
    return outs, [w.detach() for w in ws], grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", mk.available_backends())
def test_matches_force_normalize_then_mp_weights(backend, dtype):
    weights, gains, heads = make_case()
    dtypes = [dtype, torch.float32, dtype, dtype, torch.float32]  # two dtype groups when dtype is bf16
    want_outs, want_ws, want_grads = _expected(weights, gains, heads, dtypes)
    before = [w._version for w in weights]
    with mk.use_backend(backend, strict=backend != "reference"):  # strict: no silent fallback, and no error
        outs = mk.mp_weights(weights, gains, qkv_heads=heads, dtypes=dtypes, force_normalize=True)
        got_grads = torch.autograd.grad(_loss(outs), _leaves(weights, gains))
    for i, (w, v) in enumerate(zip(weights, before)):
        assert w._version > v, f"weights[{i}]: version counter not bumped by the in-place normalization"
    for i, (w, e) in enumerate(zip(weights, want_ws)):
        assert w.stride() == e.stride()
        torch.testing.assert_close(w.detach(), e, rtol=1e-6, atol=1e-6, msg=lambda m: f"weights[{i}]: {m}")
    # The effective weights of the weights as this backend updated them, and close to the oracle's
    # (fp32 weights an ulp apart may round to neighbouring bf16 values).
    with mk.use_backend("reference"):
        own = mk.mp_weights([w.detach() for w in weights], [g.detach() if isinstance(g, torch.Tensor) else g
                                                            for g in gains], qkv_heads=heads, dtypes=dtypes)
    for i, (o, a, e, w) in enumerate(zip(outs, own, want_outs, weights)):
        assert o.dtype == dtypes[i] and o.shape == w.shape and o.stride() == w.stride(), i
        torch.testing.assert_close(o, a, msg=lambda m: f"out[{i}]: {m}")
        torch.testing.assert_close(o, e, msg=lambda m: f"out[{i}] vs the oracle: {m}")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert a.shape == b.shape, i
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"gradient of leaf {i}: {m}")


def _normalized(ws):
    ws = [w.detach().clone(memory_format=torch.preserve_format) for w in ws]
    with mk.use_backend("reference"):
        mk.force_normalize_(ws)
    return ws


def test_expected_is_of_normalized_weights():
    """The oracle itself: force_normalize_ then mp_weights on the reference equals mp_weights of
    weights already normalized (the in-place update really feeds the effective weights)."""
    weights, gains, heads = make_case(2)
    outs, ws, _ = _expected(weights, gains, heads, torch.float32)
    normalized = _normalized(weights)
    for a, b in zip(ws, normalized):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with mk.use_backend("reference"):
        plain = mk.mp_weights(normalized, [g.detach() if isinstance(g, torch.Tensor) else g for g in gains],
                              qkv_heads=heads)
    for a, b in zip(outs, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_triton_fused_equals_its_unfused_pair():
    """Same kernels' math: Triton's fused call gives what Triton's force_normalize_ + mp_weights give."""
    weights, gains, heads = make_case(4)
    ws2, gs2 = _clone(weights, gains)
    with mk.use_backend("triton", strict=True):
        outs = mk.mp_weights(weights, gains, qkv_heads=heads, dtypes=torch.bfloat16, force_normalize=True)
        got = torch.autograd.grad(_loss(outs), _leaves(weights, gains))
        mk.force_normalize_(ws2)
        exp = mk.mp_weights(ws2, gs2, qkv_heads=heads, dtypes=torch.bfloat16)
        want = torch.autograd.grad(_loss(exp), _leaves(ws2, gs2))
    for i, (a, b) in enumerate(zip(weights, ws2)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, msg=lambda m: f"weights[{i}]: {m}")
    for i, (a, b) in enumerate(zip(outs, exp)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"out[{i}]: {m}")
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"gradient of leaf {i}: {m}")


# --- launches ----------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
@pytest.mark.parametrize("tensor_gains", [False, True])
def test_triton_one_launch_forward_one_backward(declared_triton_launches, tensor_gains):
    """One op and one kernel launch forward per dtype group (normalization included), one backward
    launch (+ one segment-sum launch with tensor gains), as mp_weights without the flag."""
    weights, gains, heads = make_case(6)
    if not tensor_gains:
        gains = [0.5 * (i + 1) for i in range(len(weights))]
    launched = declared_triton_launches
    ups = [torch.randn(w.shape, device=DEV) for w in weights]
    with mk.use_backend("triton", strict=True):
        with OpNames() as fwd:
            outs = mk.mp_weights(weights, gains, qkv_heads=heads, force_normalize=True)
        fwd_launches = [c.kernel.__name__ for c in launched]
        with OpNames() as bwd:
            torch.autograd.backward(outs, ups)
    bwd_launches = [c.kernel.__name__ for c in launched[len(fwd_launches):]]
    assert fwd.names == ["mpkernels.triton_mp_weights_forced"], fwd.names
    assert fwd_launches == ["_mp_weights_fwd_kernel"], fwd_launches
    assert bwd.names == ["mpkernels.triton_mp_weights_backward"], bwd.names
    assert bwd_launches == ["_mp_weights_bwd_kernel"] + ["_segment_sum_kernel"] * tensor_gains, bwd_launches
    assert all(w.grad is not None for w in _leaves(weights, gains))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_triton_one_op_per_dtype_group_on_meta():
    """Launch accounting on meta tensors (``simulate('triton')``): one forced op per output dtype."""
    from mpkernels import _dispatch
    ws = [torch.randn(12 * (i + 1), 4, 3, 3, device="meta", requires_grad=True) for i in range(6)]
    gains = [torch.ones((), device="meta", requires_grad=True) if i % 3 == 0 else 1.5 for i in range(6)]
    dtypes = [torch.bfloat16 if i % 2 else torch.float32 for i in range(6)]
    with _dispatch.simulate("triton"):
        with OpNames() as fwd:
            outs = mk.mp_weights(ws, gains, dtypes=dtypes, force_normalize=True)
        grads = [torch.empty(o.shape, dtype=o.dtype, device="meta") for o in outs]
        with OpNames() as bwd:
            torch.autograd.backward(outs, grads)
    assert fwd.names == ["mpkernels.triton_mp_weights_forced"] * 2, fwd.names
    assert bwd.names == ["mpkernels.triton_mp_weights_backward"] * 2, bwd.names
    assert all(w.grad is not None and w.grad.shape == w.shape for w in ws)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_triton_capture_without_tables_falls_back(monkeypatch):
    """While a CUDA graph is captured and no table exists, the call runs weight by weight after a
    forced normalization (no table built), with the same results."""
    from mpkernels.triton import multi_weight as M
    weights, gains, heads = make_case(7)
    ws2, gs2 = _clone(weights, gains)
    with mk.use_backend("triton", strict=True):
        want = mk.mp_weights(weights, gains, qkv_heads=heads, force_normalize=True)
        monkeypatch.setattr(M, "_capturing", lambda: True)
        monkeypatch.setattr(M, "_TABLES", M._TableStore(16))
        monkeypatch.setattr(M, "_CALL_TABLES", M._TableStore(16))
        got = mk.mp_weights(ws2, gs2, qkv_heads=heads, force_normalize=True)
        assert M._TABLES.builds == 0 and M._CALL_TABLES.builds == 0
    for i, (a, b) in enumerate(zip(weights, ws2)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-6, msg=lambda m: f"weights[{i}]: {m}")
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, msg=lambda m: f"out[{i}]: {m}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_forced_op_passes_opcheck():
    """Schema (declared mutation of ``ws``) and fake function of the mutating custom op."""
    from mpkernels.triton import multi_weight as M
    ws = [torch.randn(6, 3, 3, 3, device=DEV), torch.randn(12, 5, device=DEV),
          torch.randn(4, 2, 3, 3, device=DEV).contiguous(memory_format=torch.channels_last)]
    gain = torch.tensor(0.7, device=DEV)
    args = (ws, [gain], [1.0, 2.0, 0.5], [0, -1, -1], 1e-4, 1e-4, [0, 2, 0], torch.bfloat16)
    torch.library.opcheck(M._forced_op, args, test_utils=("test_schema", "test_faketensor"))


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", mk.available_backends())
def test_overlapping_weights_are_refused(backend):
    buf = torch.randn(12, 4, device=DEV)
    ws = [buf[:6], buf[4:]]
    before = buf.clone()
    with mk.use_backend(backend):
        with pytest.raises(ValueError, match=r"^" + re.escape("weights[1] overlaps weights[0]")):
            mk.mp_weights(ws, force_normalize=True)
        mk.mp_weights(ws)  # only read without the flag: allowed
        mk.mp_weights([buf[:6], buf[6:]], force_normalize=True)  # disjoint views of one buffer: allowed
    assert not torch.equal(buf, before)


@pytest.mark.parametrize("flag", [1, "yes", None])
def test_force_normalize_must_be_a_bool(flag):
    w = torch.randn(4, 3)
    before = w.clone()
    with pytest.raises(TypeError, match=r"^force_normalize: expected a bool"):
        mk.mp_weights([w], force_normalize=flag)
    assert torch.equal(w, before)


def test_empty_list_with_the_flag():
    assert mk.mp_weights([], force_normalize=True) == []


# --- torch.compile -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph_matches_eager(backend):
    """``torch.compile(fullgraph=True)`` of a function calling it: the same results, updated weights
    and gradients as eager (Triton: traced as force_normalize_ then the ordinary mp_weights op)."""
    if backend not in mk.available_backends():
        pytest.skip(f"{backend} not available")
    torch._dynamo.reset()
    weights, gains, heads = make_case(5, device="cpu" if backend == "reference" else DEV)
    ws2, gs2 = _clone(weights, gains)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]

    def loss_fn(ws, gs):
        outs = mk.mp_weights(ws, gs, qkv_heads=heads, dtypes=dtypes, force_normalize=True)
        return sum((o.float() * (i + 1)).square().sum() for i, o in enumerate(outs))

    with mk.use_backend(backend, strict=backend != "reference"):
        eager = torch.autograd.grad(loss_fn(weights, gains), _leaves(weights, gains))
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(ws2, gs2), _leaves(ws2, gs2))
    for i, (a, b) in enumerate(zip(ws2, weights)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"weights[{i}]: {m}")
    for i, (a, b) in enumerate(zip(got, eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"gradient of leaf {i}: {m}")
