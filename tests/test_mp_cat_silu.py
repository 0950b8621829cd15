"""``mk.mp_cat_mp_silu``: the public op on every backend, its errors, and its launch count."""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from conftest import OpNames
from mpkernels import _dispatch


def _pair(dtype=torch.float32, cl=False):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 4, generator=g).to(dtype)
    b = torch.randn(2, 5, 4, 4, generator=g).to(dtype)
    if cl:
        a, b = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    return a.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("backend", [b for b in mk.available_backends() if b != "triton"])
@pytest.mark.parametrize("cl", [False, True])
def test_matches_cat_then_silu(backend, cl):
    a, b = _pair(cl=cl)
    a2, b2 = (t.detach().clone().requires_grad_() for t in (a, b))
    with mk.use_backend(backend):
        x, y = mk.mp_cat_mp_silu(a, b, dim=1, t=0.3)
        ((x * 0.7).sum() + (y * y).sum()).backward()
    with mk.use_backend("reference"):
        x2 = mk.mp_cat(a2, b2, dim=1, t=0.3)
        y2 = mk.mp_silu(x2)
        ((x2 * 0.7).sum() + (y2 * y2).sum()).backward()
    for got, want in ((x, x2), (y, y2), (a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_errors_name_the_argument():
    a, b = _pair()
    with pytest.raises(ValueError, match="^b: shape"):
        mk.mp_cat_mp_silu(a, b[:, :, :2], dim=1)
    with pytest.raises(ValueError, match="^t:"):
        mk.mp_cat_mp_silu(a, b, t=1.5)
    with pytest.raises(TypeError, match="^b: dtype"):
        mk.mp_cat_mp_silu(a, b.double())
    with pytest.raises(ValueError, match="^dim:"):
        mk.mp_cat_mp_silu(a, b, dim=4)


def test_triton_is_one_launch_each_way():
    """On the meta device as the Triton backend on a GPU: one op forward, one backward, no gradient sum."""
    pytest.importorskip("mpkernels.triton")
    a = torch.empty(2, 6, 8, 8, device="meta", requires_grad=True)
    b = torch.empty(2, 10, 8, 8, device="meta", requires_grad=True)
    with _dispatch.simulate("triton"):
        with OpNames() as fwd:
            x, y = mk.mp_cat_mp_silu(a, b)
        loss = x.sum() + y.sum()
        with OpNames() as bwd:
            torch.autograd.grad(loss, [a, b], allow_unused=False)
    assert [n for n in fwd.names if "mpkernels" in n] == ["mpkernels.triton_mp_cat_mp_silu"], fwd.names
    assert [n for n in bwd.names if "mpkernels" in n] == ["mpkernels.triton_mp_cat_mp_silu_backward"], bwd.names
    assert not [n for n in bwd.names if n == "aten.add"], bwd.names
