"""mpkernels.cpu_conv: convolutions with a fixed weight packed once for oneDNN (CPU inference), and
the EDM2 network's use of it for its cached eval-mode weights."""

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
