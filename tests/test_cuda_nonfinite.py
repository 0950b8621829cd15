"""Backend 'cuda' with NaN and infinite inputs and gradients: exactly the reference's NaN / inf pattern.

A diverging training run must stay visibly diverged: min/max/clamp written with ``fminf`` /
``fmaxf`` (or ``min.f32`` / ``max.f32`` on the GPU) return the non-NaN operand, turning a NaN into
``±clip`` and its gradient into 0, while ``torch.clamp`` keeps the NaN. Each op is compared with
the reference (eager PyTorch) element by element: the same positions are NaN, the same are ±inf,
and the finite values agree. CPU tensors run the C++ twins; CUDA tensors (with a GPU) the kernels.
"""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from conftest import kernel_device
from mpkernels import reference as R

NAN, INF = float("nan"), float("inf")
# The C++ twins run everywhere; the CUDA kernels wherever kernel tests run on CUDA (a GPU machine, or
# MPKERNELS_TEST_DEVICE=cuda, which then fails rather than skips without one).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(kernel_device().type != "cuda",
                                                                 reason="CUDA kernels: no GPU here"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def ext(cuda_backend):
    return cuda_backend


def special(shape, dtype, device, seed=0, scale=1.0):
    """Random values with NaN, +inf, -inf, zeros and values far past any clip at fixed positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    specials = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 1e4, -1e4, 300.0, -300.0, 1e-30])
    idx = torch.randperm(flat.numel(), generator=g)[: min(flat.numel() // 2, 3 * len(specials))]
    flat[idx] = specials.repeat(3)[: len(idx)]
    return x.to(dtype).to(device)


def assert_same_nonfinite(ours: torch.Tensor, ref: torch.Tensor, name: str, rtol: float, atol: float):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, name
    o, r = ours.detach().float().cpu(), ref.detach().float().cpu()
    for what, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        diff = (fn(o) != fn(r)).nonzero()
        assert diff.numel() == 0, (f"{name}: {what} pattern differs at {diff[:4].tolist()} "
                                   f"(ours {o[tuple(diff[0])].item()}, reference {r[tuple(diff[0])].item()})")
    fin = torch.isfinite(r)
    err = (o[fin] - r[fin]).abs()
    bound = atol + rtol * r[fin].abs()
    bad = (err > bound).nonzero()
    assert bad.numel() == 0, f"{name}: finite values differ, worst {float((err - bound).max()):.3g}"


TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)}  # ~2 ulp


def run_both(op_ours, op_ref, inputs, grads_seed=5, nonfinite_grads=True):
    """Forward outputs and input gradients of the backend 'cuda' op and of the reference.

    The reference runs in float32 on the same (upcast) values, and its results are rounded to the
    inputs' dtype: the kernels compute in fp32 too, so that even an element next to the clip
    boundary is clipped (or not) alike, and only the NaN / inf handling can differ.
    """
    def leaf(x, dtype=None):
        if not isinstance(x, torch.Tensor):
            return x
        return (x.to(dtype) if dtype is not None else x).detach().clone().requires_grad_(True)

    xs_o = [leaf(x) for x in inputs]
    with mk.use_backend("cuda", strict=True):
        outs_o = op_ours(*xs_o)
    xs_r = [leaf(x, torch.float32) for x in inputs]
    outs_r = op_ref(*xs_r)
    outs_o = outs_o if isinstance(outs_o, tuple) else (outs_o,)
    outs_r = outs_r if isinstance(outs_r, tuple) else (outs_r,)
    gs = [special(o.shape, o.dtype, o.device, seed=grads_seed + i) if nonfinite_grads
          else torch.randn(o.shape, generator=torch.Generator().manual_seed(grads_seed + i)).to(o)
          for i, o in enumerate(outs_o)]
    torch.autograd.backward(list(outs_o), gs)
    torch.autograd.backward(list(outs_r), [g.float() for g in gs])
    g_o = [x.grad for x in xs_o if isinstance(x, torch.Tensor)]
    g_r = [x.grad.to(o.dtype) for x, o in zip(xs_r, g_o) if isinstance(x, torch.Tensor)]
    return outs_o, [r.to(o.dtype) for r, o in zip(outs_r, outs_o)], g_o, g_r


def check(op_ours, op_ref, inputs, dtype, **kw):
    outs_o, outs_r, g_o, g_r = run_both(op_ours, op_ref, inputs, **kw)
    rtol, atol = TOL[dtype]
    for i, (o, r) in enumerate(zip(outs_o, outs_r)):
        assert_same_nonfinite(o, r, f"output {i}", rtol, atol)
    for i, (o, r) in enumerate(zip(g_o, g_r)):
        assert_same_nonfinite(o, r, f"grad of input {i}", rtol, atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", [1.0, 256.0])
def test_mp_sum_clip_keeps_nan_like_torch_clamp(device, dtype, clip):
    """NaN stays NaN (not ±clip); the gradient is torch.clamp's `where(-c <= x <= c, g, 0)`, so a NaN or
    inf gradient at a clipped element is 0, and one inside the range passes through."""
    a, b = special((4, 8, 5, 5), dtype, device, seed=1, scale=200), special((4, 8, 5, 5), dtype, device, seed=2)
    check(mk.mp_sum_clip, R.mp_sum_clip, [a, b, 0.3, clip], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mp_sum_passes_nan_gradients(device, dtype):
    """Plain mp_sum runs as mp_sum_clip with clip = inf: no clipping at all, so a NaN sum still gets
    its (NaN or finite) gradient, as in the reference (no clamp there)."""
    a, b = special((3, 16, 4, 4), dtype, device, seed=3), special((3, 16, 4, 4), dtype, device, seed=4)
    check(mk.mp_sum, R.mp_sum, [a, b, 0.5], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_mp_silu_of_infinities(device):
    """silu(-inf) is NaN in PyTorch (-inf * sigmoid(-inf) = -inf * 0), silu(+inf) = +inf; gradients too."""
    x = special((2, 16, 4, 4), torch.float32, device, seed=6, scale=100)
    check(mk.mp_silu, R.mp_silu, [x], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pixel_norm_mp_silu_nonfinite_pixels(device, layout):
    """A pixel with a NaN or inf channel normalises to NaN/0 as in the reference, and its gradient is
    NaN, not silently 0 (the zero-row rule must not catch NaN statistics)."""
    x = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(7))
    x[0, 3, 1, 2] = NAN
    x[1, 5, 0, 0] = INF
    x[1, :, 2, 4] = 0.0  # a zero pixel: gradient 0 in both
    x = x.to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check(mk.pixel_norm_mp_silu, R.pixel_norm_mp_silu, [x], torch.float32, nonfinite_grads=False)
    check(mk.pixel_norm, R.pixel_norm, [x], torch.float32, nonfinite_grads=False)


@pytest.mark.parametrize("device", DEVICES)
def test_modulated_mp_silu_nonfinite(device):
    y = special((2, 16, 4, 4), torch.float32, device, seed=8)
    c = torch.randn(2, 16, generator=torch.Generator().manual_seed(9)).to(device)
    c[1, 3] = NAN
    check(mk.modulated_mp_silu, R.modulated_mp_silu, [y, c], torch.float32, nonfinite_grads=False)


@pytest.mark.parametrize("device", DEVICES)
def test_mp_weight_nonfinite_row(device):
    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(10))
    w[1, 2, 0, 0] = NAN
    w[3, 0, 1, 1] = INF
    w[4] = 0.0
    check(mk.mp_weight, R.mp_weight, [w.to(device)], torch.float32, nonfinite_grads=False)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_tensor_ops_nonfinite(device):
    w = torch.randn(4, 24, generator=torch.Generator().manual_seed(11))
    w[0, 3], w[2, 5] = NAN, INF
    ours, ref = w.clone().to(device), w.clone().to(device)
    with mk.use_backend("cuda", strict=True):
        mk.force_normalize_([ours])
    R.force_normalize_([ref])
    assert_same_nonfinite(ours, ref, "force_normalize_", *TOL[torch.float32])
    src = special((4, 24), torch.float32, device, seed=12)
    ours, ref = w.clone().to(device), w.clone().to(device)
    for weight in (0.25, 0.75):
        with mk.use_backend("cuda", strict=True):
            mk.ema_lerp_([ours], [src], weight)
        R.ema_lerp_([ref], [src], weight)
        assert_same_nonfinite(ours, ref, f"ema_lerp_ (weight {weight})", *TOL[torch.float32])
