"""``mk.mp_weights``: many effective weights in one call, on every backend.

Each backend's ``mp_weights`` is checked against the per-weight path it replaces,
``mk.mp_weight(w, gain, eps, qkv_heads=...).to(dtype)`` on the reference backend: values and
the gradients of every weight and tensor gain (a gain of 0.0 included), for 2-d and 4-d weights
(NCHW and channels_last), qkv weights with head-contiguous rows, and mixed output dtypes.
"""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from conftest import OpNames, kernel_device

DEV = kernel_device()


@pytest.fixture(autouse=True)
def _declared_launches(declared_triton_launches):
    """Every Triton launch must be a configuration the backend declares (the AOT test compiles those)."""


def _backends() -> list[str]:
    return mk.available_backends()


def make_case(seed: int = 0, device=DEV):
    """Weights of odd shapes and layouts, with numbers and tensor gains (one of them 0.0)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, cl=False):
        t = torch.randn(*shape, generator=g)
        if cl:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.to(device).requires_grad_(True)

    def gain(v):
        return torch.tensor(v, device=device).requires_grad_(True)

    weights = [w(6, 5, 3, 3), w(7, 3, 3, 3, cl=True), w(12, 9), w(4, 130), w(18, 4, 1, 1), w(3, 70, 3, 3, cl=True),
               w(24, 8)]
    gains = [1.0, gain(0.7), 2.5, gain(0.0), 0.5, gain([1.3]), 1.0]
    heads = [None, None, None, None, 2, None, 4]  # 18 = 3*2*3, 24 = 3*4*2
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float32,
              torch.bfloat16]
    return weights, gains, heads, dtypes


def _leaves(weights, gains):
    return list(weights) + [g for g in gains if isinstance(g, torch.Tensor)]


def _clone(weights, gains):
    ws = [w.detach().clone(memory_format=torch.preserve_format).requires_grad_(True) for w in weights]
    gs = [g.detach().clone().requires_grad_(True) if isinstance(g, torch.Tensor) else g for g in gains]
    return ws, gs


def _upstream(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]


def _per_weight(weights, gains, heads, dtypes, eps=1e-4):
    with mk.use_backend("reference"):
        return [mk.mp_weight(w, g, eps, qkv_heads=h).to(d) for w, g, h, d in zip(weights, gains, heads, dtypes)]


def _backward(outs, ups, leaves):
    loss = sum((o.double() * u.double()).sum() for o, u in zip(outs, ups))
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend", _backends())
def test_matches_per_weight_mp_weight(backend):
    weights, gains, heads, dtypes = make_case()
    ws2, gs2 = _clone(weights, gains)
    expected = _per_weight(ws2, gs2, heads, dtypes)
    with mk.use_backend(backend, strict=backend == "triton"):
        outs = mk.mp_weights(weights, gains, qkv_heads=heads, dtypes=dtypes)
    for i, (o, e, w) in enumerate(zip(outs, expected, weights)):
        assert o.dtype == e.dtype and o.shape == w.shape, i
        assert o.stride() == w.stride(), f"out[{i}] has strides {o.stride()}, weight {w.stride()}"
        torch.testing.assert_close(o, e, msg=lambda m: f"out[{i}]: {m}")
    ups = _upstream(outs)
    with mk.use_backend(backend, strict=backend == "triton"):
        got = _backward(outs, ups, _leaves(weights, gains))
    want = _backward(expected, ups, _leaves(ws2, gs2))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, i
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"gradient of leaf {i}: {m}")


@pytest.mark.parametrize("backend", _backends())
def test_qkv_rows_are_head_contiguous(backend):
    w = torch.randn(12, 5, device=DEV)
    with mk.use_backend(backend):
        out, = mk.mp_weights([w], qkv_heads=[2])
    ref = mk.reference.mp_weight(w).index_select(0, mk.reference.head_contiguous_rows(12, 2, DEV))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", _backends())
def test_some_outputs_without_gradient(backend):
    """Weights (and gains) whose results take no part in the loss get no gradient (None, as with
    the per-weight ops), the others theirs."""
    weights, gains, heads, dtypes = make_case(3)
    ws2, gs2 = _clone(weights, gains)
    with mk.use_backend(backend):
        outs = mk.mp_weights(weights, gains, qkv_heads=heads, dtypes=dtypes)
        used = [0, 3, 5]
        loss = sum(outs[i].float().square().sum() for i in used)
        loss.backward()
    exp = _per_weight(ws2, gs2, heads, dtypes)
    sum(exp[i].float().square().sum() for i in used).backward()
    for i, (a, b) in enumerate(zip(_leaves(weights, gains), _leaves(ws2, gs2))):
        assert (a.grad is None) == (b.grad is None), f"leaf {i}: gradient {a.grad is not None}, expected {b.grad}"
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"leaf {i}: {m}")


@pytest.mark.parametrize("backend", _backends())
def test_non_contiguous_upstream_gradients(backend):
    """Gradients reaching the outputs may be expanded or transposed views."""
    w1 = torch.randn(6, 4, 3, 3, device=DEV, requires_grad=True)
    w2 = torch.randn(5, 8, device=DEV, requires_grad=True)
    r1, r2 = w1.detach().clone().requires_grad_(True), w2.detach().clone().requires_grad_(True)
    up = torch.randn(8, 5, device=DEV)
    with mk.use_backend(backend):
        a, b = mk.mp_weights([w1, w2], dtypes=torch.float32)
        (a.sum() + (b * up.t()).sum()).backward()  # a.sum(): an expanded gradient; up.t(): transposed
    ra, rb = _per_weight([r1, r2], [1.0, 1.0], [None, None], [torch.float32] * 2)
    (ra.sum() + (rb * up.t()).sum()).backward()
    torch.testing.assert_close(w1.grad, r1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w2.grad, r2.grad, rtol=1e-4, atol=1e-5)


def test_float64_goes_to_the_reference():
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    g = torch.tensor(0.8, dtype=torch.float64, device=DEV, requires_grad=True)
    for backend in _backends():
        with mk.use_backend(backend):
            out, = mk.mp_weights([w], [g], dtypes=[torch.float64])
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, mk.reference.mp_weight(w, g), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda w, g: mk.mp_weights([w, w[:3]], [g, 2.0], dtypes=torch.float64),
                                    (w.detach().cpu().requires_grad_(), g.detach().cpu().requires_grad_()))


def test_empty_list_and_defaults():
    assert mk.mp_weights([]) == []
    w = torch.randn(4, 6)
    out, = mk.mp_weights((w,))
    torch.testing.assert_close(out, mk.reference.mp_weight(w))


# --- argument errors -------------------------------------------------------------------------

W = [torch.randn(6, 4), torch.randn(6, 2, 3, 3)]


@pytest.mark.parametrize("call, exc, words", [
    (lambda: mk.mp_weights(W[0]), TypeError, "weights"),
    (lambda: mk.mp_weights([W[0], "x"]), TypeError, "weights[1]"),
    (lambda: mk.mp_weights([W[0], torch.randn(5)]), ValueError, "weights[1]"),
    (lambda: mk.mp_weights([W[0], torch.randn(0, 3)]), ValueError, "weights[1]"),
    (lambda: mk.mp_weights([W[0], torch.ones(3, 3, dtype=torch.int32)]), TypeError, "weights[1]"),
    (lambda: mk.mp_weights([W[0], W[1].to("meta")]), ValueError, "weights[1]"),
    (lambda: mk.mp_weights(W, [1.0]), ValueError, "gains: 1 entries but weights has 2"),
    (lambda: mk.mp_weights(W, 1.0), TypeError, "gains"),
    (lambda: mk.mp_weights(W, [1.0, "a"]), TypeError, "gains[1]"),
    (lambda: mk.mp_weights(W, [1.0, torch.ones(2)]), ValueError, "gains[1]"),
    (lambda: mk.mp_weights(W, [float("nan"), 1.0]), ValueError, "gains[0]"),
    (lambda: mk.mp_weights(W, [1.0, torch.ones(1, device="meta")]), ValueError, "gains[1]"),
    (lambda: mk.mp_weights(W, eps=-1.0), ValueError, "eps"),
    (lambda: mk.mp_weights(W, qkv_heads=[None]), ValueError, "qkv_heads: 1 entries"),
    (lambda: mk.mp_weights(W, qkv_heads=[None, 0]), ValueError, "qkv_heads[1]"),
    (lambda: mk.mp_weights(W, qkv_heads=[4, None]), ValueError, "qkv_heads[0]"),
    (lambda: mk.mp_weights(W, qkv_heads=[True, None]), ValueError, "qkv_heads[0]"),
    (lambda: mk.mp_weights(W, dtypes=torch.int8), TypeError, "dtypes"),
    (lambda: mk.mp_weights(W, dtypes=[torch.float16]), ValueError, "dtypes: 1 entries"),
    (lambda: mk.mp_weights(W, dtypes=[torch.float16, "bf16"]), TypeError, "dtypes[1]"),
])
def test_argument_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc, match=r"^" + __import__("re").escape(words)):
        call()


@pytest.mark.parametrize("backend", _backends())
def test_tensors_at_any_addresses(backend):
    """Gains and upstream gradients laid out in one buffer in reverse order (later entries at lower
    addresses): multi-tensor kernels address them by offsets that must not be mistaken for 'none'."""
    ws = [torch.randn(6, 5, device=DEV, requires_grad=True) for _ in range(3)]
    p = torch.tensor([0.7, 1.3, 0.4], device=DEV, requires_grad=True)
    buf = torch.randn(3 * 30, device=DEV)
    ups = [buf[60:].view(6, 5), buf[30:60].view(6, 5), buf[:30].view(6, 5)]
    rs = [w.detach().clone().requires_grad_(True) for w in ws]
    rp = p.detach().clone().requires_grad_(True)
    with mk.use_backend(backend, strict=backend == "triton"):
        outs = mk.mp_weights(ws, [p[2], p[1], p[0]])
        torch.autograd.backward(outs, ups)
    exp = _per_weight(rs, [rp[2], rp[1], rp[0]], [None] * 3, [torch.float32] * 3)
    torch.autograd.backward(exp, ups)
    for i, (w, r) in enumerate(zip(ws, rs)):
        torch.testing.assert_close(w.grad, r.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"weights[{i}]: {m}")
    torch.testing.assert_close(p.grad, rp.grad, rtol=1e-4, atol=1e-5)


# --- launches, tracing, capture ----------------------------------------------------------------

def test_one_op_per_dtype_group_on_meta():
    """Under ``simulate('triton')`` (launch accounting on meta tensors), ten weights in two output
    dtypes are two ops forward and at most two per group backward, whatever the gains and qkv rows."""
    from mpkernels import _dispatch
    ws = [torch.randn(12 * (i + 1), 4, 3, 3, device="meta", requires_grad=True) for i in range(10)]
    gains = [torch.ones((), device="meta", requires_grad=True) if i % 3 == 0 else 1.5 for i in range(10)]
    dtypes = [torch.bfloat16 if i % 2 else torch.float32 for i in range(10)]
    heads = [None] * 9 + [2]
    grads = [torch.empty(w.shape, dtype=d, device="meta") for w, d in zip(ws, dtypes)]
    with _dispatch.simulate("triton"):
        with OpNames() as fwd:
            outs = mk.mp_weights(ws, gains, qkv_heads=heads, dtypes=dtypes)
        with OpNames() as bwd:
            torch.autograd.backward(outs, grads)
    assert fwd.names == ["mpkernels.triton_mp_weights"] * 2, fwd.names
    assert bwd.names == ["mpkernels.triton_mp_weights_backward"] * 2, bwd.names
    assert all(w.grad is not None and w.grad.shape == w.shape for w in ws)
    assert all(g.grad is not None for g in gains if isinstance(g, torch.Tensor))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph_matches_eager(backend):
    if backend not in mk.available_backends():
        pytest.skip(f"{backend} not available")
    torch._dynamo.reset()
    weights, gains, heads, dtypes = make_case(5)

    def loss_fn(*leaves):
        ws, gs = list(leaves[:len(weights)]), list(leaves[len(weights):])
        it = iter(gs)
        gains_ = [next(it) if isinstance(g, torch.Tensor) else g for g in gains]
        outs = mk.mp_weights(ws, gains_, qkv_heads=heads, dtypes=dtypes)
        return sum((o.float() * (i + 1)).square().sum() for i, o in enumerate(outs))

    leaves = _leaves(weights, gains)
    with mk.use_backend(backend, strict=backend == "triton"):
        eager = torch.autograd.grad(loss_fn(*leaves), leaves)
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(*leaves), leaves)
    for i, (a, b) in enumerate(zip(got, eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"gradient of leaf {i}: {m}")


@pytest.mark.skipif("triton" not in mk.available_backends(), reason="triton not available")
def test_tables_are_built_once_and_capture_falls_back(monkeypatch):
    """The row table of a weight set is built once; while a CUDA graph is being captured a missing
    table is never built (no host-to-device copy there): the call runs weight by weight instead,
    with the same results."""
    from mpkernels.triton import multi_weight as M
    weights, gains, heads, dtypes = make_case(7)
    monkeypatch.setattr(M, "_TABLES", M._TableStore(16))
    with mk.use_backend("triton", strict=True):
        first = mk.mp_weights(weights, gains, qkv_heads=heads, dtypes=dtypes)
        again = mk.mp_weights(weights, gains, qkv_heads=heads, dtypes=dtypes)
        assert M._TABLES.builds == 3  # three dtype groups, each built once
        ups = _upstream(first)
        want = _backward(again, ups, _leaves(weights, gains))
        monkeypatch.setattr(M, "_capturing", lambda: True)
        monkeypatch.setattr(M, "_TABLES", M._TableStore(16))
        monkeypatch.setattr(M, "_CALL_TABLES", M._TableStore(16))
        outs = mk.mp_weights(weights, gains, qkv_heads=heads, dtypes=dtypes)
        got = _backward(outs, ups, _leaves(weights, gains))
        assert M._TABLES.builds == 0 and M._CALL_TABLES.builds == 0
    for i, (o, e) in enumerate(zip(outs, first)):
        assert o.stride() == e.stride()
        torch.testing.assert_close(o, e, msg=lambda m: f"out[{i}]: {m}")
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"gradient of leaf {i}: {m}")


@pytest.mark.skipif("triton" not in mk.available_backends(), reason="triton not available")
def test_custom_ops_pass_opcheck():
    """Schemas, fake functions (exact strides) and autograd registration of the Triton custom ops."""
    from mpkernels.triton import multi_weight as M
    ws = [torch.randn(6, 3, 3, 3, device=DEV), torch.randn(12, 5, device=DEV),
          torch.randn(4, 2, 3, 3, device=DEV).contiguous(memory_format=torch.channels_last)]
    ws = [w.requires_grad_(True) for w in ws]
    gain = torch.tensor(0.7, device=DEV, requires_grad=True)
    args = (ws, [gain], [1.0, 2.0, 0.5], [0, -1, -1], 1e-4, [0, 2, 0], torch.bfloat16)
    torch.library.opcheck(M._fwd_op, args)
    inv = M._fwd_op(*args)[-1].detach()
    grads = [torch.randn(6, 3, 3, 3, device=DEV, dtype=torch.bfloat16), None,
             torch.randn(4, 2, 3, 3, device=DEV, dtype=torch.bfloat16)]  # NCHW gradient of a channels_last weight
    torch.library.opcheck(M._bwd_op, (grads, [w.detach() for w in ws], [gain.detach()], inv) + args[2:6])
