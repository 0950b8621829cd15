"""Every bad input listed in API.md raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk

x4 = torch.randn(2, 6, 4, 4)


def _meta(*shape):
    return torch.empty(shape, device="meta")


CASES = [
    # (call, exception, text the message must contain)
    (lambda: mk.mp_silu([1.0]), TypeError, "x: expected a torch.Tensor"),
    (lambda: mk.mp_silu(torch.ones(3, dtype=torch.int32)), TypeError, "x: unsupported dtype"),
    (lambda: mk.mp_silu(torch.ones(3, dtype=torch.complex64)), TypeError, "x: unsupported dtype"),
    (lambda: mk.mp_silu(torch.empty(0, 3)), ValueError, "x: empty tensor"),
    (lambda: mk.pixel_norm(torch.empty(2, 0, 3, 3)), ValueError, "x: empty tensor"),
    (lambda: mk.pixel_norm(torch.randn(5)), ValueError, "x: expected at least 2 dims"),
    (lambda: mk.pixel_norm(x4, eps=-1), ValueError, "eps: must be >="),
    (lambda: mk.normalize(x4, dim=4), ValueError, "dim: 4 out of range"),
    (lambda: mk.normalize(x4, dim=(1, 1)), ValueError, "dim: repeated"),
    (lambda: mk.normalize(x4, dim=1.5), TypeError, "dim: expected an int"),
    (lambda: mk.mp_sum(x4, x4, t=1.5), ValueError, "t: must be <= 1"),
    (lambda: mk.mp_sum(x4, x4, t=-0.1), ValueError, "t: must be >= 0"),
    (lambda: mk.mp_sum(x4, x4, t=float("nan")), ValueError, "t: must be finite"),
    (lambda: mk.mp_sum(x4, x4, t="0.5"), TypeError, "t: expected a real number"),
    (lambda: mk.mp_sum(x4, x4[:, :3]), ValueError, "b: shape"),
    (lambda: mk.mp_sum(x4, x4.half()), TypeError, "b: dtype"),
    (lambda: mk.mp_sum(x4, _meta(2, 6, 4, 4)), ValueError, "b: on device meta"),
    (lambda: mk.mp_cat(x4, x4[:, :, :2]), ValueError, "b: shape"),
    (lambda: mk.mp_cat(x4, x4, t=2), ValueError, "t: must be <= 1"),
    (lambda: mk.mp_cat(x4, x4[0]), ValueError, "b: has 3 dims"),
    (lambda: mk.mp_cat(x4, x4, dim=7), ValueError, "dim: 7 out of range"),
    (lambda: mk.mp_sum_clip(x4, x4, 0.3, 0), ValueError, "clip: must be > 0"),
    (lambda: mk.mp_sum_clip(x4, x4, 1.3, 4), ValueError, "t: must be <= 1"),
    (lambda: mk.mp_sum_clip(x4, x4[:1], 0.3, 4), ValueError, "b: shape"),
    (lambda: mk.modulated_mp_silu(x4, torch.randn(2, 5)), ValueError, "c: shape"),
    (lambda: mk.modulated_mp_silu(x4, torch.randn(2, 6, 1)), ValueError, "c: expected a 2-d tensor"),
    (lambda: mk.modulated_mp_silu(x4[0], torch.randn(2, 6)), ValueError, "y: expected a 4-d tensor"),
    (lambda: mk.modulated_mp_silu(x4, _meta(2, 6)), ValueError, "c: on device meta"),
    (lambda: mk.cosine_attention(x4, 4), ValueError, "num_heads: 4 does not divide"),
    (lambda: mk.cosine_attention(x4, 0), ValueError, "num_heads: expected a positive int"),
    (lambda: mk.cosine_attention(x4, 1.0), ValueError, "num_heads: expected a positive int"),
    (lambda: mk.cosine_attention(torch.randn(2, 5, 4, 4), 1), ValueError, "qkv: channel count 5"),
    (lambda: mk.cosine_attention(torch.randn(2, 6, 16), 1), ValueError, "qkv: expected a 4-d tensor"),
    (lambda: mk.mp_weight(torch.randn(4)), ValueError, "w: expected at least 2 dims"),
    (lambda: mk.mp_weight(torch.randn(4, 3), gain=torch.ones(2)), ValueError, "gain: a tensor gain"),
    (lambda: mk.mp_weight(torch.randn(4, 3), gain=torch.ones(1, dtype=torch.int64)), TypeError, "gain: unsupported"),
    (lambda: mk.mp_weight(torch.randn(4, 3), gain="1"), TypeError, "gain: expected a real number"),
    (lambda: mk.mp_weight(torch.randn(4, 3), gain=_meta()), ValueError, "gain: on device meta"),
    (lambda: mk.mp_conv2d(x4, torch.randn(3, 5, 3, 3)), ValueError, "w: expects 5 input channels but x has 6"),
    (lambda: mk.mp_conv2d(x4, torch.randn(3, 6, 2, 2)), ValueError, "w: kernel must be square with odd size"),
    (lambda: mk.mp_conv2d(x4, torch.randn(3, 6)), ValueError, "w: expected a 4-d weight"),
    (lambda: mk.mp_conv2d(x4[0], torch.randn(3, 6, 1, 1)), ValueError, "x: expected a 4-d tensor"),
    (lambda: mk.mp_conv2d(x4, _meta(3, 6, 1, 1)), ValueError, "w: on device meta"),
    (lambda: mk.mp_linear(torch.randn(3, 4), torch.randn(5, 3)), ValueError, "w: expects 3 input features"),
    (lambda: mk.mp_linear(torch.randn(3, 4), torch.randn(5, 4, 1, 1)), ValueError, "w: expected a 2-d weight"),
    (lambda: mk.mp_fourier(torch.randn(3, 1), torch.randn(4), torch.randn(4)), ValueError, "x: expected a 1-d"),
    (lambda: mk.mp_fourier(torch.randn(3), torch.randn(4), torch.randn(5)), ValueError, "phases: shape"),
    (lambda: mk.mp_fourier(torch.randn(3), torch.randn(4), _meta(4)), ValueError, "phases: on device meta"),
    (lambda: mk.resample(x4, "sideways"), ValueError, "mode: expected"),
    (lambda: mk.resample(torch.randn(1, 1, 3, 3), "down"), ValueError, "x: 'down' needs even H and W"),
    (lambda: mk.force_normalize_(torch.randn(3, 3)), TypeError, "tensors: expected a list"),
    (lambda: mk.force_normalize_([torch.randn(3)]), ValueError, "tensors[0]: expected a non-empty weight"),
    (lambda: mk.force_normalize_([torch.randn(3, 3), torch.ones(2, 2, dtype=torch.int64)]), TypeError,
     "tensors[1]: unsupported dtype"),
    (lambda: mk.force_normalize_([torch.randn(3, 3), _meta(3, 3)]), ValueError, "tensors[1]: on device meta"),
    (lambda: mk.ema_lerp_([torch.randn(3)], [torch.randn(3), torch.randn(3)], 0.5), ValueError,
     "tensors: 2 tensors but ema_tensors has 1"),
    (lambda: mk.ema_lerp_([torch.randn(3)], [torch.randn(4)], 0.5), ValueError, "tensors[0]: shape"),
    (lambda: mk.ema_lerp_([torch.randn(3)], [torch.randn(3)], 1.5), ValueError, "weight: must be <= 1"),
    (lambda: mk.ema_lerp_([torch.randn(3)], [_meta(3)], 0.5), ValueError, "tensors[0]: on device meta"),
    (lambda: mk.ema_lerp_(torch.randn(3), [torch.randn(3)], 0.5), TypeError, "ema_tensors: expected a list"),
]


@pytest.mark.parametrize("call,exc,text", CASES, ids=[c[2] for c in CASES])
def test_bad_input(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value), f"message {str(info.value)!r} should contain {text!r}"


def test_modules_reject_bad_config():
    with pytest.raises(ValueError, match="kernel"):
        mk.nn.MPConv(3, 4, [3])
    with pytest.raises(ValueError, match="num_channels"):
        mk.nn.MPFourier(0)
