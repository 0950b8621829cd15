"""MPConv/MPFourier modules, the EDM2 network (spec §2-4) and the presets (spec §5)."""

from __future__ import annotations

import copy

import pytest
import torch

import mpkernels as mk
from edm2fast import networks, presets
from edm2fast.networks import Precond, forced_norm_weights, set_forced_weight_norm

EXPECTED_PARAMS = {
    "edm2-img512-xxs": 31_309_029, "edm2-img512-xs": 124_713_253, "edm2-img512-s": 280_212_837,
    "edm2-img512-m": 497_807_781, "edm2-img512-l": 777_498_085, "edm2-img512-xl": 1_119_283_749,
    "edm2-img512-xxl": 1_523_164_773,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_and_state_dict_names(name):
    net = presets.build(name, label_dim=1000, device="meta")
    assert sum(p.numel() for p in net.parameters()) == EXPECTED_PARAMS[name]
    sd = net.state_dict()
    assert len(sd) == 203
    for key in ["unet.enc.64x64_conv.weight", "unet.enc.32x32_down.conv_res0.weight", "unet.dec.8x8_in0.attn_qkv.weight",
                "unet.dec.64x64_block3.conv_skip.weight", "unet.emb_label.weight", "logvar_linear.weight",
                "unet.out_gain", "unet.enc.16x16_block0.emb_gain", "unet.emb_fourier.freqs", "logvar_fourier.phases",
                "unet.out_conv.weight", "unet.emb_noise.weight", "unet.dec.8x8_in1.conv_res1.weight"]:
        assert key in sd, key
    assert all(t.device.type == "meta" for t in sd.values())


def test_img64_preset_and_table():
    net = presets.build("edm2-img64-s", label_dim=1000, device="meta")
    assert sum(p.numel() for p in net.parameters()) == 280_209_381
    assert len(net.state_dict()) == 203 and net.img_channels == 3
    assert len(presets.PRESETS) == 12
    s = presets.PRESETS["edm2-img512-s"]
    assert s["lr"] == 0.0100 and s["decay"] == 70000 and s["duration"] == 2048 << 20 and s["P_mean"] == -0.4
    assert s["network"]["model_channels"] == 192 and s["batch"] == 2048 and s["betas"] == (0.9, 0.99)
    x = presets.PRESETS["edm2-img64-xl"]
    assert (x["lr"], x["decay"], x["duration"], x["P_mean"], x["P_std"], x["network"]["dropout"]) == \
        (0.0070, 35000, 640 << 20, -0.8, 1.6, 0.10)
    with pytest.raises(ValueError, match="name: unknown preset"):
        presets.build("edm2-img512-huge")
    with pytest.raises(ValueError, match="label_dim"):
        presets.build("edm2-img512-s", label_dim=-1, device="meta")


def small_net(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[8], channels_per_head=32)
    args.update(kw)
    return Precond(**args)


def small_batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    sigma = torch.exp(torch.randn(n, generator=g) - 0.4)
    labels = torch.eye(10)[torch.randint(0, 10, (n,), generator=g)]
    return x, sigma, labels


def test_small_precond_forward_backward():
    net = small_net()
    x, sigma, labels = small_batch()
    D, logvar = net(x, sigma, labels, return_logvar=True)
    assert D.shape == x.shape and D.dtype == torch.float32 and logvar.shape == (4, 1, 1, 1)
    (D.square().mean() + logvar.mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # out_gain starts at 0, so at init D = c_skip * x exactly (F_x is multiplied by zero gain)
    with torch.no_grad():
        D0 = net(x, sigma, labels)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(D0, c_skip.reshape(-1, 1, 1, 1) * x)
    # scalar sigma broadcasts; missing labels mean a zero label vector
    assert net(x, 1.0, labels).shape == x.shape
    torch.testing.assert_close(net(x, sigma), net(x, sigma, torch.zeros(4, 10)))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, sigma, labels[:, :5])
    with pytest.raises(ValueError, match="sigma"):
        net(x, sigma[:3], labels)


def test_block_outputs_keep_unit_magnitude_at_init():
    net = small_net().eval()
    x, sigma, labels = small_batch(8)
    rms = {}

    def record(name, out):
        if isinstance(out, tuple):  # the UNet defers each Block's last sum (Block.forward(defer=True))
            out = networks._settle(out)
        rms[name] = float(out.float().square().mean().sqrt())

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: record(n, o))
             for n, m in net.unet.named_modules() if isinstance(m, networks.Block)]
    with torch.no_grad():
        net(x, sigma, labels)
    for h in hooks:
        h.remove()
    assert len(rms) == 10
    for name, r in rms.items():
        assert 0.7 < r < 1.3, f"{name}: RMS {r:.3f} drifted from 1"


def test_forced_weight_normalization_train_vs_eval():
    net = small_net()
    x, sigma, labels = small_batch()
    w = net.unet.enc["16x16_block0"].conv_res0.weight
    before = w.detach().clone()
    net.eval()
    with torch.no_grad():
        net(x, sigma, labels)
    assert torch.equal(w, before), "eval mode must never touch the weights"
    net.train()
    with torch.no_grad():
        net(x, sigma, labels)
    assert not torch.equal(w, before)
    row_rms = w.detach().pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(row_rms, torch.ones_like(row_rms), atol=1e-3, rtol=0)
    # switched off, the forward pass is pure; one multi-tensor call does the same normalization
    net2 = small_net()
    set_forced_weight_norm(net2, False)
    ref = small_net()
    with torch.no_grad():
        net2(x, sigma, labels)
    assert torch.equal(net2.unet.enc["16x16_block0"].conv_res0.weight, ref.unet.enc["16x16_block0"].conv_res0.weight)
    mk.force_normalize_(forced_norm_weights(net2))
    with torch.no_grad():
        ref(x, sigma, labels, return_logvar=True)  # train mode: every MPConv normalizes in forward
    for a, b in zip(forced_norm_weights(net2), forced_norm_weights(ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_same_seed_same_output_and_dtypes():
    x, sigma, labels = small_batch()
    a, b = small_net(seed=3).eval(), small_net(seed=3).eval()
    for p in list(a.parameters()) + list(b.parameters()):
        if p.ndim == 0:
            p.data.fill_(0.5)  # nonzero gains so the U-Net output matters
    with torch.no_grad():
        ya, yb = a(x, sigma, labels), b(x, sigma, labels)
    assert torch.equal(ya, yb)
    assert not torch.equal(ya, small_net(seed=4).eval()(x, sigma, labels))
    bf = copy.deepcopy(a)
    bf.dtype = "bf16"
    with torch.no_grad():
        yb16 = bf(x, sigma, labels)
    assert yb16.dtype == torch.float32
    assert (yb16 - ya).abs().max() < 0.1 * ya.abs().max()
    assert a.compute_dtype(torch.device("cpu")) == torch.float32  # use_fp16 means fp16 on CUDA only
    assert a.compute_dtype(torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        small_net(dtype="fp8")


def test_channels_last_matches():
    x, sigma, labels = small_batch()
    a = small_net(seed=5).eval()
    for p in a.parameters():
        if p.ndim == 0:
            p.data.fill_(0.7)
    b = small_net(seed=5, channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(x, sigma, labels), b(x, sigma, labels), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_matches_eager():
    net = small_net(seed=7)
    for p in net.parameters():
        if p.ndim == 0:
            p.data.fill_(0.6)
    set_forced_weight_norm(net, False)
    x, sigma, labels = small_batch()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    D, lv = net(x, sigma, labels, return_logvar=True)
    (D.square().mean() + lv.mean()).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    Dc, lvc = compiled(x, sigma, labels, return_logvar=True)
    (Dc.square().mean() + lvc.mean()).backward()
    torch.testing.assert_close(Dc, D, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lvc, lv, rtol=1e-4, atol=1e-5)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_mpfourier_and_mpconv_modules():
    torch.manual_seed(0)
    f = mk.nn.MPFourier(64)
    y = f(torch.randn(1000))
    assert y.shape == (1000, 64) and abs(float(y.square().mean().sqrt()) - 1) < 0.05
    conv = mk.nn.MPConv(4, 6, [3, 3])
    lin = mk.nn.MPConv(4, 6, [])
    assert conv(torch.randn(2, 4, 5, 5)).shape == (2, 6, 5, 5) and lin(torch.randn(3, 4)).shape == (3, 6)
    gain = torch.nn.Parameter(torch.tensor(0.0))
    out = lin(torch.randn(3, 4), gain=gain)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert gain.grad is not None and gain.grad != 0


def _per_layer_forward(net, x, sigma, labels):
    """The network as every layer computes its own effective weight (standalone Block / MPConv calls,
    separate emb_linear matmuls, mp_cat then mp_silu): what one mp_weights call must reproduce."""
    unet, sd = net.unet, net.sigma_data
    sigma = sigma.reshape(-1, 1, 1, 1)
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.flatten().log() / 4
    emb = unet.emb_noise(unet.emb_fourier(c_noise))
    emb = mk.mp_sum(emb, unet.emb_label(labels * unet.label_dim ** 0.5), t=unet.label_balance)
    emb = mk.mp_silu(emb)
    h = c_in * x
    h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
    skips = []
    for block in unet.enc.values():
        h = block(h) if isinstance(block, mk.nn.MPConv) else block(h, emb)
        skips.append(h)
    for name, block in unet.dec.items():
        if "block" in name:
            h = mk.mp_cat(h, skips.pop(), t=unet.concat_balance)
        h = block(h, emb)
    D = c_skip * x + c_out * unet.out_conv(h, gain=unet.out_gain)
    return D, net.logvar_linear(net.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("train", [False, True])
def test_one_call_for_all_weights_matches_the_per_layer_network(train):
    a = small_net(seed=11)
    for p in a.parameters():
        if p.ndim == 0:
            p.data.fill_(0.4)  # nonzero gains: every layer matters
    b = copy.deepcopy(a)
    a.train(train), b.train(train)
    x, sigma, labels = small_batch()
    Da, lva = a(x, sigma, labels, return_logvar=True)
    Db, lvb = _per_layer_forward(b, x, sigma, labels)
    torch.testing.assert_close(Da, Db, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lva, lvb, rtol=1e-5, atol=1e-6)
    (Da.square().mean() + lva.mean()).backward()
    (Db.square().mean() + lvb.mean()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)  # forced weight norm: same update
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_block_and_mpconv_take_precomputed_weights():
    torch.manual_seed(0)
    block = networks.Block(8, 16, 12, flavor="dec", attention=True, channels_per_head=8).eval()
    block.emb_gain.data.fill_(0.5)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    layers = [(n, conv, gain, heads, torch.float32) for n, conv, gain, heads, _ in block.mp_layers()]
    weights = networks.effective_weights(block, layers)
    assert sorted(weights) == ["attn_proj", "attn_qkv", "conv_res0", "conv_res1", "conv_skip", "emb_linear"]
    torch.testing.assert_close(block(x, emb, weights=weights), block(x, emb), rtol=1e-5, atol=1e-6)
    conv = block.conv_res0
    with pytest.raises(ValueError, match="^weight: expected an effective weight of shape"):
        conv(x, weight=weights["conv_res1"])
    with pytest.raises(ValueError, match="^weight: an effective weight already includes"):
        conv(torch.randn(2, 8, 4, 4), gain=2, weight=weights["conv_res0"])
    with pytest.raises(ValueError, match="^x_silu"):
        networks.Block(8, 8, 12, flavor="enc")(x, emb, x_silu=x)


def test_eval_weights_are_cached_until_a_parameter_changes(monkeypatch):
    net = small_net(seed=12).eval()
    for p in net.parameters():
        if p.ndim == 0:
            p.data.fill_(0.5)
    x, sigma, labels = small_batch()
    calls = []
    real = mk.mp_weights
    monkeypatch.setattr(mk, "mp_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        y1 = net(x, sigma, labels)
        y2 = net(x, sigma, labels)
    assert len(calls) == 1 and torch.equal(y1, y2)
    fresh = copy.deepcopy(net)  # the copy's parameters are new tensors: it never reuses net's cache
    with torch.no_grad():
        net.unet.out_gain.fill_(0.9)  # an in-place change bumps the version: recomputed
        y3 = net(x, sigma, labels)
        fresh.unet.out_gain.fill_(0.9)
        networks.clear_weight_cache(fresh)
        assert len(calls) == 2
        torch.testing.assert_close(y3, fresh(x, sigma, labels), rtol=0, atol=0)
        assert len(calls) == 3
        w = net.unet.enc["16x16_block0"].conv_res1.weight
        w.add_(torch.randn_like(w))
        y4 = net(x, sigma, labels)
        assert len(calls) == 4 and not torch.equal(y3, y4)
        net.load_state_dict(fresh.state_dict())  # copy_ into every parameter
        torch.testing.assert_close(net(x, sigma, labels), y3, rtol=0, atol=0)
        assert len(calls) == 5
    net(x, sigma, labels)  # with autograd: never from the cache
    net.train()
    with torch.no_grad():
        net(x, sigma, labels)
        net(x, sigma, labels)
    assert len(calls) == 8


def test_weight_cache_is_bypassed_while_a_cuda_graph_is_captured(monkeypatch):
    """A captured graph must compute the weights itself: a cached tensor would be a stale constant of it."""
    net = small_net(seed=13).eval()
    x, sigma, labels = small_batch()
    calls = []
    real = mk.mp_weights
    monkeypatch.setattr(mk, "mp_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        net(x, sigma, labels)  # warm-up fills the cache
        monkeypatch.setattr(networks, "_capturing", lambda w: True)
        net(x, sigma, labels)
        net(x, sigma, labels)
        assert len(calls) == 3
        monkeypatch.setattr(networks, "_capturing", lambda w: False)
        net(x, sigma, labels)
        net(x, sigma, labels)
    assert len(calls) == 4  # the captures computed their own (and dropped the cache); then cached again
