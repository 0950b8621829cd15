"""Bad inputs get the documented errors on the Triton backend, before any kernel launches."""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from conftest import kernel_device, require_backend

pytest.importorskip("mpkernels.triton")
require_backend("triton")

from mpkernels.triton import _common  # noqa: E402


@pytest.fixture
def no_launch(monkeypatch):
    launched = []
    monkeypatch.setattr(_common, "launch", lambda cfg, *a, **k: launched.append(cfg.name))
    with mk.use_backend("triton", strict=True):
        yield
    assert not launched, f"kernels launched before the error: {launched}"


DEV = kernel_device()  # on a GPU the Triton backend takes CUDA tensors only: bad ones must be CUDA tensors too


def randn(*shape):
    return torch.randn(*shape, device=DEV)


def ones(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype, device=DEV)


x4 = randn(2, 4, 3, 3)
meta = torch.empty(2, 4, 3, 3, device="meta")

BAD_CALLS = [
    ("mp_silu int", lambda: mk.mp_silu(ones(3, dtype=torch.int32)), TypeError, "x"),
    ("mp_silu not a tensor", lambda: mk.mp_silu([1.0, 2.0]), TypeError, "x"),
    ("mp_silu empty", lambda: mk.mp_silu(torch.empty(0, 3, device=DEV)), ValueError, "x"),
    ("pixel_norm 1-d", lambda: mk.pixel_norm(randn(5)), ValueError, "x"),
    ("normalize bad dim", lambda: mk.normalize(x4, dim=4), ValueError, "dim"),
    ("normalize repeated dim", lambda: mk.normalize(x4, dim=(1, 1)), ValueError, "dim"),
    ("normalize negative eps", lambda: mk.normalize(x4, eps=-1.0), ValueError, "eps"),
    ("mp_sum shapes", lambda: mk.mp_sum(x4, randn(2, 4, 3, 2)), ValueError, "b"),
    ("mp_sum dtypes", lambda: mk.mp_sum(x4, x4.half()), TypeError, "b"),
    ("mp_sum devices", lambda: mk.mp_sum(x4, meta), ValueError, "b"),
    ("mp_sum t > 1", lambda: mk.mp_sum(x4, x4, 1.5), ValueError, "t"),
    ("mp_sum_clip clip 0", lambda: mk.mp_sum_clip(x4, x4, 0.3, 0.0), ValueError, "clip"),
    ("mp_cat shapes", lambda: mk.mp_cat(x4, randn(2, 4, 3, 4)), ValueError, "b"),
    ("mp_cat ndim", lambda: mk.mp_cat(x4, randn(2, 4, 3)), ValueError, "b"),
    ("mp_cat t < 0", lambda: mk.mp_cat(x4, x4, t=-0.1), ValueError, "t"),
    ("modulated c shape", lambda: mk.modulated_mp_silu(x4, randn(2, 3)), ValueError, "c"),
    ("modulated y 3-d", lambda: mk.modulated_mp_silu(randn(2, 4, 3), randn(2, 4)), ValueError, "y"),
    ("mp_weight 1-d", lambda: mk.mp_weight(randn(5)), ValueError, "w"),
    ("mp_weight 2-element gain", lambda: mk.mp_weight(randn(3, 4), ones(2)), ValueError, "gain"),
    ("mp_conv2d even kernel", lambda: mk.mp_conv2d(x4, randn(5, 4, 2, 2)), ValueError, "w"),
    ("mp_conv2d channels", lambda: mk.mp_conv2d(x4, randn(5, 3, 3, 3)), ValueError, "w"),
    ("mp_linear features", lambda: mk.mp_linear(randn(3, 5), randn(4, 6)), ValueError, "w"),
    ("mp_fourier 2-d x", lambda: mk.mp_fourier(randn(2, 2), randn(4), randn(4)), ValueError, "x"),
    ("attention heads", lambda: mk.cosine_attention(randn(1, 12, 2, 2), 3), ValueError, "num_heads"),
    ("attention channels", lambda: mk.cosine_attention(randn(1, 10, 2, 2), 1), ValueError, "qkv"),
    ("attention heads type", lambda: mk.cosine_attention(randn(1, 12, 2, 2), 2.0), ValueError, "num_heads"),
    ("resample mode", lambda: mk.resample(x4, "sideways"), ValueError, "mode"),
    ("resample odd down", lambda: mk.resample(x4, "down"), ValueError, "x"),
    ("force_normalize_ 1-d", lambda: mk.force_normalize_([randn(3, 3), randn(4)]), ValueError,
     "tensors[1]"),
    ("force_normalize_ tensor", lambda: mk.force_normalize_(randn(3, 3)), TypeError, "tensors"),
    ("ema_lerp_ weight", lambda: mk.ema_lerp_([randn(3)], [randn(3)], 1.5), ValueError, "weight"),
    ("ema_lerp_ lengths", lambda: mk.ema_lerp_([randn(3)], [], 0.5), ValueError, "tensors"),
    ("ema_lerp_ shapes", lambda: mk.ema_lerp_([randn(3)], [randn(4)], 0.5), ValueError, "tensors[0]"),
]


@pytest.mark.parametrize("name,call,exc,arg", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_before_launch(name, call, exc, arg, no_launch):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith(arg), f"message does not name {arg!r}: {info.value}"
