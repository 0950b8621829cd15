"""``mk.resample_up_mp_silu``: the public op on every backend, low-precision parity, errors, launch count, opcheck."""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from mpkernels import _dispatch
from conftest import OpNames, assert_close_to_oracle, kernel_device

BACKENDS = mk.available_backends()
HAS_TRITON = "triton" in BACKENDS
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="backend 'triton' not available")


def _x(shape, dtype=torch.float32, kind="nchw", seed=0):
    """A seeded ``x`` (values rounded to ``dtype``) on the kernel device, NCHW, channels_last or a slice."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(kernel_device())
    if kind == "cl":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "slice":  # neither layout: the op makes it dense first
        n, c, h, w = shape
        big = torch.zeros((n, c + 1, h, w + 2), dtype=dtype, device=x.device)
        big[:, 1:, :, 1:w + 1] = x
        return big[:, 1:, :, 1:w + 1]
    return x


def _loss(u, h, use):
    """A loss using ``u``, ``h`` or both (non-trivial gradient for each: not all ones)."""
    terms = []
    if use in ("both", "u"):
        terms.append((u * u.detach().cos()).sum() * 0.7)
    if use in ("both", "h"):
        terms.append((h * h).sum())
    return sum(terms)


def _composition(x, use):
    """``mk.resample(x, 'up')`` then ``mk.mp_silu`` on the reference backend: values and ``x.grad``."""
    x = x.detach().clone().requires_grad_()
    with mk.use_backend("reference"):
        u = mk.resample(x, "up")
        h = mk.mp_silu(u)
        _loss(u, h, use).backward()
    return u.detach(), h.detach(), x.grad


@pytest.mark.parametrize("use", ["both", "u", "h"])
@pytest.mark.parametrize("kind", ["nchw", "cl", "slice"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 3), (1, 4, 2, 2), (1, 2, 1, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_resample_then_silu(backend, shape, kind, use):
    x = _x(shape, kind=kind).requires_grad_()
    with mk.use_backend(backend, strict=backend == "triton"):  # strict: the Triton kernels really ran
        u, h = mk.resample_up_mp_silu(x)
        _loss(u, h, use).backward()
    u2, h2, g2 = _composition(x, use)
    for name, got, want in (("u", u, u2), ("h", h, h2), ("x.grad", x.grad, g2)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # same memory format as mk.resample 'up' gives today
    assert u.stride() == u2.stride() and h.stride() == u2.stride(), (u.stride(), h.stride(), u2.stride())


@needs_triton
@pytest.mark.parametrize("kind", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_vs_fp64_oracle(dtype, kind):
    """Within the conftest rule (twice eager PyTorch's own error vs fp64); forward bit-equal to the
    composition of the Triton resample and mp_silu kernels (same fp32 math, one rounding)."""
    x = _x((2, 3, 5, 3), dtype, kind, seed=1)
    gen = torch.Generator().manual_seed(2)
    gu, gh = (torch.randn((2, 3, 10, 6), generator=gen, dtype=torch.float64).to(x.device) for _ in range(2))

    def run(xin, backend, strict=False):
        xin = xin.detach().clone().requires_grad_()
        with mk.use_backend(backend, strict=strict):
            u, h = mk.resample_up_mp_silu(xin)
            ((u.double() * gu).sum() + (h.double() * gh).sum()).backward()
        return u.detach(), h.detach(), xin.grad

    oracle = run(x.double(), "reference")
    eager = run(x, "reference")
    got = run(x, "triton", strict=True)
    for name, t, o, e in zip(("u", "h", "x.grad"), got, oracle, eager):
        assert t.dtype == dtype, f"{name}: dtype {t.dtype}"
        assert_close_to_oracle(t, o, e, name=name)
    with mk.use_backend("triton", strict=True):
        u_c = mk.resample(x, "up")
        h_c = mk.mp_silu(u_c)
    assert torch.equal(got[0], u_c) and torch.equal(got[1], h_c)


@needs_triton
def test_float64_falls_back_to_reference():
    x = _x((1, 2, 3, 3), torch.float64).requires_grad_()
    with mk.use_backend("triton"):
        u, h = mk.resample_up_mp_silu(x)
    torch.testing.assert_close(h, mk.reference.mp_silu(mk.reference.resample(x, "up")), rtol=0, atol=0)
    with mk.use_backend("triton", strict=True), pytest.raises(mk.BackendUnavailableError):
        mk.resample_up_mp_silu(x)
    assert torch.autograd.gradcheck(lambda t: mk.resample_up_mp_silu(t), (x,))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="^x: expected a 4-d"):
        mk.resample_up_mp_silu(torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match="^x: unsupported dtype"):
        mk.resample_up_mp_silu(torch.zeros(1, 2, 2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor"):
        mk.resample_up_mp_silu([[1.0]])
    with pytest.raises(ValueError, match="^x: empty"):
        mk.resample_up_mp_silu(torch.randn(0, 2, 2, 2))


@pytest.mark.parametrize("use", ["both", "u", "h"])
@pytest.mark.parametrize("cl", [False, True])
def test_triton_is_one_launch_each_way(cl, use):
    """On the meta device as the Triton backend on a GPU: one op forward, one backward, no gradient sum."""
    pytest.importorskip("mpkernels.triton")
    x = torch.empty(2, 6, 4, 4, device="meta")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with _dispatch.simulate("triton"):
        with OpNames() as fwd:
            u, h = mk.resample_up_mp_silu(x)
        loss = {"both": u.sum() + h.sum(), "u": u.sum(), "h": h.sum()}[use]
        with OpNames() as bwd:
            (dx,) = torch.autograd.grad(loss, [x])
    assert [n for n in fwd.names if "mpkernels" in n] == ["mpkernels.triton_resample_up_mp_silu"], fwd.names
    assert [n for n in bwd.names if "mpkernels" in n] == ["mpkernels.triton_resample_up_mp_silu_backward"], bwd.names
    assert not [n for n in bwd.names if n == "aten.add"], bwd.names
    assert u.stride() == h.stride() == mk.resample(x.detach(), "up").stride()
    assert dx.stride() == x.stride()


@needs_triton
@pytest.mark.parametrize("cl", [False, True])
def test_custom_ops_pass_opcheck(cl):
    """Schema, fake functions (strides included), autograd registration of both custom ops."""
    from mpkernels.triton import up_silu as U
    x = _x((1, 3, 3, 2), kind="cl" if cl else "nchw").requires_grad_()
    torch.library.opcheck(U._fwd_op, (x,))
    g = torch.randn(1, 3, 6, 4, device=x.device)
    xd = x.detach()
    for gu, gh in ((g, g * 0.5), (g, None), (None, g), (g.contiguous(memory_format=torch.channels_last), g)):
        torch.library.opcheck(U._bwd_op, (gu, gh, xd), test_utils=("test_schema", "test_faketensor"))


@needs_triton
def test_launches_declared_configs(declared_triton_launches):
    """Every configuration the launchers pick is in all_configs() (what the AOT test compiles; checked
    by the fixture)."""
    seen = declared_triton_launches
    for dtype in (torch.float32, torch.bfloat16):
        for kind in ("nchw", "cl"):
            for use in ("both", "u", "h"):
                x = _x((1, 2, 2, 3), dtype, kind).requires_grad_()
                with mk.use_backend("triton", strict=True):
                    u, h = mk.resample_up_mp_silu(x)
                    _loss(u.float(), h.float(), use).backward()
    assert len({c.name for c in seen}) == 2 * 2 * (1 + 3)  # dtypes x layouts x (forward + 3 gradient flags)
