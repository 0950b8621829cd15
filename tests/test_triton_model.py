"""A small EDM2 ``Precond`` on the Triton backend matches the reference backend.

Same initial weights, same inputs: the denoised output ``D``, the ``logvar`` head and every
parameter gradient must agree, in eager mode (training mode, with the in-forward forced
weight normalization, NCHW and channels_last) and under ``torch.compile(fullgraph=True)``
(one compilation; forced normalization applied outside the compiled forward, as the trainer
does). On a GPU machine everything runs on CUDA tensors; without one the kernels run in the
Triton interpreter on CPU tensors (``conftest.kernel_device``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import mpkernels as mk
from conftest import assert_close_to_oracle, kernel_device, require_backend

pytest.importorskip("mpkernels.triton")
require_backend("triton")
DEV = kernel_device()

from edm2fast import networks  # noqa: E402


def make_net(channels_last=False):
    torch.manual_seed(0)
    net = networks.Precond(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=32,
                           channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=32,
                           channels_last=channels_last)
    # Non-zero learned gains, so every branch of the network contributes to D and to the gradients.
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net.to(DEV)


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.3, 2.5])
    labels = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
    gd = torch.randn(2, 3, 16, 16, generator=g)
    gl = torch.randn(2, 1, 1, 1, generator=g)
    return tuple(t.to(DEV) for t in (x, sigma, labels, gd, gl))


def step(net, backend, strict=True, model=None):
    x, sigma, labels, gd, gl = inputs()
    net.zero_grad(set_to_none=True)
    with mk.use_backend(backend, strict=strict):
        D, logvar = (model if model is not None else net)(x, sigma, labels, return_logvar=True)
        ((D * gd).sum() + (logvar * gl).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    return D.detach(), logvar.detach(), grads


def assert_same(a, b, what, rtol=2e-5):
    """``|a - b| <= rtol * max|b|`` (fp32 end to end; differences are rounding-order only)."""
    scale = max(float(b.abs().max()), 1e-6)
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"{what}: max abs diff {err:.3g} vs scale {scale:.3g}"


def compare(ref, tri):
    (D_r, lv_r, g_r), (D_t, lv_t, g_t) = ref, tri
    assert_same(D_t, D_r, "D")
    assert_same(lv_t, lv_r, "logvar")
    assert g_t.keys() == g_r.keys()
    assert len(g_r) > 30
    for name in g_r:
        assert_same(g_t[name], g_r[name], f"grad of {name}", rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_precond_eager_matches_reference(channels_last):
    net_ref = make_net(channels_last).train()
    net_tri = copy.deepcopy(net_ref)
    ref = step(net_ref, "reference")
    tri = step(net_tri, "triton")
    compare(ref, tri)
    # The forced weight normalization (run in the forward in training mode) updated both alike.
    for (n, p_r), (_, p_t) in zip(net_ref.named_parameters(), net_tri.named_parameters()):
        assert_same(p_t.detach(), p_r.detach(), f"parameter {n} after forced normalization")


def test_precond_compiled_matches_reference():
    net_ref = make_net().train()
    net_tri = copy.deepcopy(net_ref)
    for net in (net_ref, net_tri):
        networks.set_forced_weight_norm(net, False)
    with mk.use_backend("triton", strict=True):
        mk.force_normalize_(networks.forced_norm_weights(net_tri))
    mk.reference.force_normalize_(networks.forced_norm_weights(net_ref))
    ref = step(net_ref, "reference")
    torch._dynamo.reset()
    with mk.use_backend("triton", strict=True):
        compiled = torch.compile(net_tri, fullgraph=True)
    tri = step(net_tri, "triton", model=compiled)
    compare(ref, tri)


def test_precond_autocast_bf16():
    """Under ``torch.autocast`` (bf16 convolutions, custom ops on whatever dtype reaches them) the
    Triton model is as close to the fp32 result as the reference model under autocast."""
    net = make_net().train()
    networks.set_forced_weight_norm(net, False)
    x, sigma, labels, _, _ = inputs()
    with torch.no_grad():
        with mk.use_backend("reference"):
            oracle = net(x, sigma, labels)
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            with mk.use_backend("reference"):
                eager = net(x, sigma, labels)
            with mk.use_backend("triton", strict=True):
                mine = net(x, sigma, labels)
    assert mine.dtype == eager.dtype == torch.float32
    assert_close_to_oracle(mine, oracle, eager, floor=1e-2 * float(oracle.abs().max()), name="D")
