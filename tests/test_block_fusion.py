"""The U-Net's fused Block boundaries (networks.UNet.forward): the same network as the Blocks run
one by one, standalone (each computing its own last residual sum and its own input), in values
and gradients, on every available backend; and the Block's ``pre`` / ``defer`` arguments."""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from edm2fast.networks import Block, UNet, _local, effective_weights
from mpkernels.nn import MPConv

_KW = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=(1, 2, 2),
           num_blocks=2, attn_resolutions=(8,), channels_per_head=16)


def _unfused(net: UNet, x, noise_labels, class_labels, weights):
    """UNet.forward written the plain way: every Block called standalone (no pre, no defer)."""
    emb = net.emb_noise(net.emb_fourier(noise_labels), weight=weights["emb_noise"])
    emb = mk.mp_sum(emb, net.emb_label(class_labels, weight=weights["emb_label"]).to(emb.dtype),
                    t=net.label_balance)
    emb = mk.mp_silu(emb)
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for name, block in net.enc.items():
        if isinstance(block, MPConv):
            x = block(x, weight=weights[f"enc.{name}"])
        else:
            x = block(x, emb, weights={**_local(weights, f"enc.{name}.", block),
                                       "emb_linear": weights[f"enc.{name}.emb_linear"]})
        skips.append(x)
    for name, block in net.dec.items():
        if "block" in name:
            x = mk.mp_cat(x, skips.pop(), t=net.concat_balance)
        x = block(x, emb, weights={**_local(weights, f"dec.{name}.", block),
                                   "emb_linear": weights[f"dec.{name}.emb_linear"]})
    return net.out_conv(x, weight=weights["out_conv"])


@pytest.mark.parametrize("backend,cl", [(b, cl) for b in mk.available_backends() for cl in (False, True)
                                        if b != "triton" or not cl])  # triton: the interpreter, slow on CPU
def test_fused_boundaries_match_blocks_run_one_by_one(backend, cl):
    torch.manual_seed(0)
    net = UNet(**_KW).train()
    with torch.no_grad():
        net.out_gain.fill_(0.7)
        for m in net.modules():
            if isinstance(m, Block):
                m.emb_gain.fill_(0.3)
    x = torch.randn(2, 3, 16, 16)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    noise, labels = torch.randn(2), torch.eye(10)[[3, 7]]
    layers = net.mp_layers(x.dtype, noise.dtype, labels.dtype)
    for m in net.modules():
        if isinstance(m, MPConv):
            m.forced_weight_norm = False  # the weights stay fixed between the two runs
    outs, grads = [], []
    for fused in (True, False):
        net.zero_grad(set_to_none=True)
        with mk.use_backend(backend):
            w = effective_weights(net, layers)
            if fused:
                y = net(x, noise, labels, weights=w)
            else:
                y = _unfused(net, x, noise, labels, w)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in net.parameters()])
    # fp32: the fused kernels round nothing the unfused ops round, and sum gradients in another order
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_block_pre_and_defer():
    torch.manual_seed(0)
    enc = Block(8, 8, 16, flavor="enc")
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    px, py, t, clip = enc(x, emb, defer=True)
    assert (t, clip) == (enc.res_balance, enc.clip_act)
    torch.testing.assert_close(enc(x, emb), mk.mp_sum_clip(px, py, t, clip))
    xn, xs = mk.pixel_norm_mp_silu(x)
    torch.testing.assert_close(enc(None, emb, pre=(xn, xs)), enc(x, emb))
    with pytest.raises(ValueError, match="^pre:"):
        Block(8, 8, 16, flavor="enc", resample_mode="down")(None, emb, pre=(xn, xs))
    with pytest.raises(ValueError, match="^pre:"):
        Block(8, 12, 16, flavor="enc")(None, emb, pre=(xn, xs))
    up = Block(8, 8, 16, flavor="dec", resample_mode="up")
    u, us = mk.resample_up_mp_silu(x)
    torch.testing.assert_close(up(None, emb, pre=(u, us)), up(x, emb))
    with pytest.raises(ValueError, match="^x_silu:"):
        up(x, emb, x_silu=x)
