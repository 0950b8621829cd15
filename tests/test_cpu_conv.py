"""mpkernels.cpu_conv: convolutions with a fixed weight packed once for oneDNN (CPU inference), small
1x1 convolutions as one GEMM, and the EDM2 network's use of both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mpkernels as mk
from mpkernels import cpu_conv

needs_packing = pytest.mark.skipif(not cpu_conv.fixed_weight_packing_available(),
                                   reason="this torch build has no oneDNN weight packing")


def _case(k, layout, shape=(2, 6, 7, 5), out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    w = torch.randn(out, shape[1], k, k, generator=g) / (shape[1] * k * k) ** 0.5
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w


@needs_packing
@pytest.mark.parametrize("k", [1, 3])
def test_matches_conv2d_and_packs_once_per_shape(k):
    layout = "cl"
    x, w = _case(k, layout)
    packs = {}
    with torch.no_grad():
        want = F.conv2d(x, w, padding=k // 2)
        got = cpu_conv.conv2d_fixed_weight(x, w, packs)
        assert list(packs) == [tuple(x.shape)]
        first = packs[tuple(x.shape)]
        again = cpu_conv.conv2d_fixed_weight(x, w, packs)
        assert packs[tuple(x.shape)] is first  # reused, not packed again
        x2 = x[:1].clone(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
        cpu_conv.conv2d_fixed_weight(x2, w, packs)
        assert len(packs) == 2  # one packing per input shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again)
    assert got.shape == want.shape
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("why", ["grad", "fp64", "even kernel", "no mkldnn", "strided", "nchw", "one channel"])
def test_falls_back_to_conv2d(why):
    """Where the packed call would not be the same convolution, it is F.conv2d, nothing packed."""
    x, w = _case(3, "nchw" if why == "nchw" else "cl", shape=(2, 1, 7, 5) if why == "one channel" else (2, 6, 7, 5))
    packs = {}
    ctx = torch.no_grad()
    if why == "grad":
        x.requires_grad_()
        ctx = torch.enable_grad()
    elif why == "fp64":
        x, w = x.double(), w.double()
    elif why == "even kernel":
        w = w[..., :2, :2].contiguous()
    elif why == "no mkldnn":
        ctx = torch.backends.mkldnn.flags(enabled=False)
    elif why == "strided":
        x = x[..., ::2]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    with ctx:
        got = cpu_conv.conv2d_fixed_weight(x, w, packs)
        want = F.conv2d(x, w, padding=w.shape[-1] // 2)
    assert packs == {}
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=fmt) == want.is_contiguous(memory_format=fmt)
    if why == "grad":
        got.sum().backward()
        assert x.grad is not None


def _net(channels_last=False):
    from edm2fast.networks import Precond
    torch.manual_seed(0)
    return Precond(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], channels_per_head=8,
                   channels_last=channels_last).eval()


@needs_packing
@pytest.mark.parametrize("channels_last", [False, True])
def test_network_eval_cache_packs_its_convolutions(channels_last):
    """In eval mode under no_grad the cached convolution weights are packed once and reused (where the
    activations are channels_last: the NCHW network runs F.conv2d); the outputs match the unpacked evaluation (oneDNN disabled for the packing only) within fp32 rounding."""
    from edm2fast.networks import clear_weight_cache
    net = _net(channels_last)
    x = torch.randn(2, 2, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.eye(3)[[0, 2]]
    with torch.no_grad(), mk.use_backend("reference"):
        got = net(x, sigma, labels)
        cache = net.__dict__["_mp_weight_cache"][1]
        convs = [w for w in cache.values() if w.ndim == 4]
        assert convs and all(isinstance(w._mk_conv_packs, dict) for w in convs)
        assert all(len(w._mk_conv_packs) <= 1 for w in convs)
        packed = sum(len(w._mk_conv_packs) for w in convs)
        assert (packed >= len(convs) // 2) if channels_last else packed == 0
        packs = [list(w._mk_conv_packs.values()) for w in convs]
        again = net(x, sigma, labels)
        assert all(list(w._mk_conv_packs.values()) == p for w, p in zip(convs, packs))
        clear_weight_cache(net)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_conv, "fixed_weight_packing_available", lambda: False)
            want = net(x, sigma, labels)
    assert torch.equal(got, again)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_and_autograd_weights_are_not_marked():
    net = _net().train()
    x = torch.randn(2, 2, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.eye(3)[[0, 2]]
    with mk.use_backend("reference"):
        net(x, sigma, labels).sum().backward()
        net.eval()
        net(x, sigma, labels)  # eval with autograd: nothing cached
    assert net.__dict__.get("_mp_weight_cache") is None


def test_availability_check_leaves_the_global_generator_alone():
    cpu_conv.fixed_weight_packing_available.cache_clear()
    state = torch.get_rng_state()
    cpu_conv.fixed_weight_packing_available()
    assert torch.equal(torch.get_rng_state(), state)


# ---- 1x1 convolutions as one GEMM ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 6, 7, 5), (1, 3, 1, 1), (4, 16, 16, 16)])
def test_1x1_gemm_matches_conv2d_forward_and_backward(shape):
    """Forward, both gradients and the output/gradient layouts equal F.conv2d's (fp64 oracle: the GEMM
    is no further from it than F.conv2d at fp32)."""
    x, w = _case(1, "cl", shape=shape, out=5, seed=1)
    assert cpu_conv.conv2d_1x1_gemm_eligible(x, w)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = F.conv2d(x64, w64)
    g = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gx64, gw64 = torch.autograd.grad(y64, (x64, w64), g)
    results = {}
    for name, fn in (("gemm", cpu_conv.conv2d_1x1_gemm), ("conv", F.conv2d)):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xr, wr)
        gx, gw = torch.autograd.grad(y, (xr, wr), g.float())
        results[name] = (y, gx, gw)
    for got, want, oracle in zip(results["gemm"], results["conv"], (y64, gx64, gw64)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        err = (got.double() - oracle).abs().max().item()
        assert err <= 4 * max((want.double() - oracle).abs().max().item(), 1e-7)
    y, gx, _ = results["gemm"]
    if shape[2] * shape[3] > 1:  # with H = W = 1 both layouts are the same memory
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("why", ["nchw", "3x3", "fp64", "one channel", "too many pixels", "cuda-like", "channels"])
def test_1x1_gemm_eligibility(why):
    """Only float32 CPU channels_last inputs with C > 1, a [O, C, 1, 1] weight and at most
    GEMM_1X1_MAX_PIXELS output pixels are eligible."""
    x, w = _case(1, "cl", shape=(2, 6, 7, 5))
    assert cpu_conv.conv2d_1x1_gemm_eligible(x, w)
    if why == "nchw":
        x = x.contiguous()
    elif why == "3x3":
        w = torch.randn(4, 6, 3, 3)
    elif why == "fp64":
        x, w = x.double(), w.double()
    elif why == "one channel":
        x, w = _case(1, "cl", shape=(2, 1, 7, 5))
    elif why == "too many pixels":
        n = cpu_conv.GEMM_1X1_MAX_PIXELS // 35 + 1
        x = torch.randn(n, 6, 7, 5).contiguous(memory_format=torch.channels_last)
    elif why == "cuda-like":
        x = torch.empty(2, 6, 7, 5, device="meta").contiguous(memory_format=torch.channels_last)
    elif why == "channels":
        w = torch.randn(4, 5, 1, 1)
    assert not cpu_conv.conv2d_1x1_gemm_eligible(x, w)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_network_1x1_convolutions_as_gemm(backend):
    """A channels_last network's 1x1 convolutions run as GEMMs with a fused backend only (the reference
    backend keeps F.conv2d); training outputs and gradients match the F.conv2d run within fp32 rounding."""
    if backend not in mk.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    calls = []
    real = cpu_conv.conv2d_1x1_gemm

    def counting(x, w):
        calls.append(tuple(w.shape))
        return real(x, w)

    x = torch.randn(2, 2, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.eye(3)[[0, 2]]
    outs = []
    for limit in (cpu_conv.GEMM_1X1_MAX_PIXELS, 0):
        net = _net(channels_last=True).train()
        with pytest.MonkeyPatch.context() as mp, mk.use_backend(backend):
            mp.setattr(cpu_conv, "conv2d_1x1_gemm", counting)
            mp.setattr(cpu_conv, "GEMM_1X1_MAX_PIXELS", limit)
            y = net(x, sigma, labels)
            y.square().sum().backward()
        outs.append((y, [p.grad for p in net.parameters()]))
        if limit:
            if backend == "reference":
                assert calls == []
            else:
                assert calls and all(s[-2:] == (1, 1) for s in calls)
            calls.clear()
    assert calls == []
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
