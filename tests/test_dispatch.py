"""The backend registry, backend selection, and the custom-op helper (tested with one op)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mpkernels as mk
from mpkernels import _dispatch
from mpkernels._library import is_dense, kernel_op, with_backward
from conftest import ROOT


def test_reference_always_available():
    assert "reference" in mk.available_backends()
    assert mk.available_backends() == sorted(mk.available_backends(),
                                             key=lambda b: -_dispatch._BACKENDS[b].priority)
    assert mk.get_backend() in ["auto"] + mk.available_backends()


def test_set_backend_errors_and_scoping():
    with pytest.raises(ValueError, match="backend: unknown backend 'nope'"):
        mk.set_backend("nope")
    with pytest.raises(TypeError):
        mk.set_backend(3)
    mk.set_backend("reference")
    assert mk.get_backend() == "reference"
    with mk.use_backend("auto"):
        assert mk.get_backend() == "auto"
        with mk.use_backend("reference"):
            assert mk.get_backend() == "reference"
        assert mk.get_backend() == "auto"
    assert mk.get_backend() == "reference"
    with pytest.raises(RuntimeError):
        with mk.use_backend("auto"):
            raise RuntimeError("boom")
    assert mk.get_backend() == "reference", "use_backend must restore on exceptions"


def test_unavailable_backend_is_refused():
    mk.register_backend("test_never", priority=-5, is_available=lambda: False)
    try:
        assert "test_never" in mk.registered_backends() and "test_never" not in mk.available_backends()
        with pytest.raises(ValueError, match="not available"):
            mk.set_backend("test_never")
    finally:
        _dispatch._BACKENDS.pop("test_never")
        _dispatch.refresh_availability()


def test_env_var_sets_default_and_bad_value_is_reported():
    env = dict(os.environ, MPKERNELS_BACKEND="reference", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", "import mpkernels as mk; print(mk.get_backend())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    env["MPKERNELS_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", "import mpkernels"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "MPKERNELS_BACKEND='bogus'" in out.stderr


class _Counter:
    def __init__(self):
        self.fwd = self.bwd = 0


@pytest.fixture(scope="module")
def test_backend():
    """A toy backend 'test_custom' whose mp_silu is a custom op built with the helper.

    Its forward returns an extra fp32 tensor (sigmoid(x)) saved for backward, which exercises
    the 'saved statistics' path of ``with_backward``.
    """
    calls = _Counter()

    def fwd_impl(x):
        calls.fwd += 1
        s = torch.sigmoid(x.float())
        return (x.float() * s / 0.596).to(x.dtype), s

    def bwd_impl(grad, x, s):
        calls.bwd += 1
        d = s * (1 + x.float() * (1 - s)) / 0.596
        return (grad.float() * d).to(x.dtype)

    fwd = kernel_op("test_mp_silu", "(Tensor x) -> (Tensor, Tensor)", impl=fwd_impl,
                    fake=lambda x: (torch.empty_like(x), torch.empty_like(x, dtype=torch.float32)))
    bwd = kernel_op("test_mp_silu_backward", "(Tensor grad, Tensor x, Tensor s) -> Tensor", impl=bwd_impl,
                    fake=lambda g, x, s: torch.empty_like(x))
    with_backward(fwd, bwd, num_outputs=1, saved_inputs=(0,), saved_outputs=(1,), grads_for=(0,))
    mk.register_backend("test_custom", priority=-1, auto_devices=())
    mk.register("mp_silu", "test_custom", lambda x: fwd(x)[0], devices=("cpu",),
                supports=lambda x: x.dtype != torch.float64)
    yield fwd, calls
    _dispatch._BACKENDS.pop("test_custom")
    _dispatch._IMPLS.pop(("mp_silu", "test_custom"))
    _dispatch.refresh_availability()


def test_custom_op_helper_eager_autograd(test_backend):
    fwd, calls = test_backend
    torch.library.opcheck(fwd, (torch.randn(3, 4, 5),))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with mk.use_backend("test_custom", strict=True):
        y = mk.mp_silu(x)
    y_ref = mk.reference.mp_silu(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert calls.fwd >= 1 and calls.bwd >= 1
    # 'auto' never picks it (auto_devices=()), float64 falls back to the reference...
    with mk.use_backend("test_custom"):
        n = calls.fwd
        mk.mp_silu(torch.randn(3, dtype=torch.float64))
        assert calls.fwd == n
    # ...but strict mode refuses to fall back silently.
    with mk.use_backend("test_custom", strict=True):
        with pytest.raises(mk.BackendUnavailableError):
            mk.mp_silu(torch.randn(3, dtype=torch.float64))
        with pytest.raises(mk.BackendUnavailableError):
            mk.pixel_norm(torch.randn(2, 3, 1, 1))  # op not implemented by the backend


def test_custom_op_helper_compiles_fullgraph(test_backend):
    _, calls = test_backend

    def f(x):
        return mk.mp_silu(x * 2).sum()

    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with mk.use_backend("test_custom", strict=True):
        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        n_fwd, n_bwd = calls.fwd, calls.bwd
        out = cf(x)
        out.backward()
    assert calls.fwd > n_fwd and calls.bwd > n_bwd, "the compiled graph must call the custom op"
    x2 = x.detach().clone().requires_grad_()
    mk.reference.mp_silu(x2 * 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_is_dense():
    x = torch.randn(2, 3, 4, 5)
    assert is_dense(x) and is_dense(x.to(memory_format=torch.channels_last)) and is_dense(x.permute(3, 1, 0, 2))
    assert not is_dense(x[:, :2]) and not is_dense(torch.randn(3, 1).expand(3, 4))


def test_dispatch_picks_by_device_and_priority():
    name, fn = _dispatch.implementation("mp_silu", (torch.randn(2),), backend="auto")
    assert name in mk.available_backends()
    assert _dispatch.implementation("mp_silu", (torch.randn(2),), backend="reference")[0] == "reference"
