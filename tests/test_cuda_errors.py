"""Bad inputs reach the extension's bindings and come back as clear ValueError / TypeError
naming the argument, never as a crash. The bindings are called directly (the public ops
validate first, so most of these never get that far through ``mpkernels``)."""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk

HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def ext(cuda_backend):
    return cuda_backend._EXT


def x4(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape or (2, 3, 4, 4), device=device).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64])
def test_unsupported_dtype(ext, dtype):
    x = torch.zeros(2, 3, 4, 4, dtype=dtype)
    for call in (lambda: ext.mp_silu_fwd(x), lambda: ext.pixel_norm_fwd(x, 1e-4, True),
                 lambda: ext.mp_weight_fwd(x, None, 1.0, 1e-4), lambda: ext.force_normalize_([x4(), x], 1e-4)):
        with pytest.raises(TypeError, match=r"(x|w|tensors\[1\]): unsupported dtype"):
            call()


def test_mismatched_operands(ext):
    a = x4()
    with pytest.raises(ValueError, match=r"b: shape \[2, 3, 4, 5\] does not match a shape"):
        ext.mp_sum_clip_fwd(a, x4(2, 3, 4, 5), 0.5, 1.0)
    with pytest.raises(TypeError, match="b: dtype BFloat16 does not match a dtype Float"):
        ext.mp_sum_clip_fwd(a, a.bfloat16(), 0.5, 1.0)
    with pytest.raises(ValueError, match=r"grad: shape"):
        ext.mp_silu_bwd(x4(2, 3), a)
    with pytest.raises(ValueError, match=r"c: shape \[2, 4\] must be \[N, C\] = \[2, 3\]"):
        ext.modulated_mp_silu_fwd(a, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="grad_xn, grad_y: at least one gradient"):
        ext.pixel_norm_bwd(None, None, a, torch.zeros(2, 4, 4), 1e-4)
    with pytest.raises(TypeError, match="rms: expected float32"):
        ext.pixel_norm_bwd(a, None, a, torch.zeros(2, 4, 4, dtype=torch.float16), 1e-4)
    with pytest.raises(ValueError, match="rms: has 5 elements, expected 32"):
        ext.pixel_norm_bwd(a, None, a, torch.zeros(5), 1e-4)
    with pytest.raises(ValueError, match="gain: a tensor gain must have exactly one element"):
        ext.mp_weight_fwd(x4(4, 3), torch.ones(2), 1.0, 1e-4)
    with pytest.raises(ValueError, match="w: expected a weight with at least 2 dims"):
        ext.mp_weight_fwd(torch.ones(4), None, 1.0, 1e-4)
    with pytest.raises(TypeError, match="grad: mp_weight's output is float32"):
        ext.mp_weight_bwd(x4(4, 3).half(), x4(4, 3), None, torch.ones(4), 1.0, 1e-4)


def test_bad_numbers(ext):
    a = x4()
    with pytest.raises(ValueError, match=r"t: must be in \[0, 1\]"):
        ext.mp_sum_clip_fwd(a, a, 1.5, 1.0)
    with pytest.raises(ValueError, match="clip: must be > 0"):
        ext.mp_sum_clip_fwd(a, a, 0.5, 0.0)
    with pytest.raises(ValueError, match="eps: must be finite and >= 0"):
        ext.pixel_norm_fwd(a, -1.0, False)
    with pytest.raises(ValueError, match=r"weight: must be in \[0, 1\]"):
        ext.ema_lerp_([a], [a], float("nan"))


def test_lists(ext):
    a, b = x4(), x4(3, 2)
    with pytest.raises(ValueError, match="tensors: 1 tensors but ema_tensors has 2"):
        ext.ema_lerp_([a, b], [a], 0.5)
    with pytest.raises(ValueError, match=r"tensors\[1\]: shape \[2, 3\] does not match ema_tensors\[1\] shape"):
        ext.ema_lerp_([a, b], [a, b.t()], 0.5)
    with pytest.raises(TypeError, match="incompatible function arguments"):  # pybind11's own check
        ext.force_normalize_([None], 1e-4)
    with pytest.raises(ValueError, match=r"tensors\[0\]: has internally overlapping memory"):
        ext.force_normalize_([torch.ones(1, 3).expand(4, 3)], 1e-4)
    with pytest.raises(ValueError, match=r"ema_tensors\[0\]: has internally overlapping memory"):
        ext.ema_lerp_([torch.ones(1, 3).expand(4, 3)], [torch.ones(4, 3)], 0.5)
    ext.force_normalize_([], 1e-4)  # empty lists are a no-op
    ext.ema_lerp_([], [], 0.5)


def test_devices_that_cannot_be_mixed(ext):
    a, m = x4(), torch.empty(2, 3, 4, 4, device="meta")
    with pytest.raises(ValueError, match="b: tensors on meta are not supported"):
        ext.mp_sum_clip_fwd(a, m, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"tensors\[1\]: tensors on meta are not supported"):
        ext.force_normalize_([x4(3, 2), torch.empty(3, 2, device="meta")], 1e-4)


@pytest.mark.skipif(not HAS_GPU, reason="mixing CPU and CUDA tensors needs a GPU")
def test_cpu_and_cuda_mixed(ext):
    a, g = x4(), x4(device="cuda")
    with pytest.raises(ValueError, match="cannot be mixed"):
        ext.mp_sum_clip_fwd(a, g, 0.5, 1.0)
    with pytest.raises(ValueError, match="cannot be mixed"):
        ext.modulated_mp_silu_fwd(g, torch.ones(2, 3))
    with pytest.raises(ValueError, match="cannot be mixed"):
        ext.mp_weight_fwd(x4(4, 3, device="cuda"), torch.ones(()), 1.0, 1e-4)
    with pytest.raises(ValueError, match=r"tensors\[1\]: on cuda:0 but ema_tensors\[0\] is on cpu"):
        ext.ema_lerp_([x4(3, 2), x4(3, 2)], [x4(3, 2), x4(3, 2, device="cuda")], 0.5)
    with pytest.raises(ValueError, match="cannot be mixed"):
        ext.pixel_norm_bwd(g, None, g, torch.zeros(2, 4, 4), 1e-4)


def test_empty_tensors_are_fine(ext):
    e = torch.empty(0, 3, 4, 4)
    assert ext.mp_silu_fwd(e).shape == e.shape
    xn, y, rms = ext.pixel_norm_fwd(e, 1e-4, True)
    assert xn.shape == e.shape and rms.shape == (0, 4, 4)
    assert ext.mp_sum_clip_fwd(e, e, 0.5, 1.0).shape == e.shape
    gy, gc = ext.modulated_mp_silu_bwd(e, e, torch.empty(0, 3))
    assert gy.shape == e.shape and gc.shape == (0, 3)
    ext.force_normalize_([torch.empty(0, 5)], 1e-4)


def test_public_ops_still_validate_first():
    """Through mpkernels, bad arguments are caught before any kernel, with the API's messages."""
    with mk.use_backend("cuda"):
        with pytest.raises(ValueError, match="t: must be <= 1.0"):
            mk.mp_sum_clip(x4(), x4(), 2.0, 1.0)
        with pytest.raises(ValueError, match="tensors: 1 tensors but ema_tensors has 2"):
            mk.ema_lerp_([x4(), x4()], [x4()], 0.5)
