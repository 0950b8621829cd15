"""edm2fast.accelerate on a release-style EDM2 network and on this project's own network.

The network below is written here from shared/EDM2_SPEC.md §1-4 with the release's module and
parameter names and forward semantics, in plain PyTorch (no mpkernels): it stands in for the
authors' classes, which accelerate() must handle without importing them.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import edm2fast
import mpkernels as mk
from benchmarks.model import _Counter
from conftest import assert_close_to_oracle, kernel_device, max_err, require_backend
from edm2fast.accelerate import AccelerateReport, undo

# ------------------------------------------------------------------------------------------------
# A release-style network in plain PyTorch, from the spec.


def normalize(x, dim=None, eps=1e-4):
    dims = tuple(range(1, x.ndim)) if dim is None else (dim,)
    k = math.prod(x.shape[d] for d in dims)
    rms = x.float().square().sum(dims, keepdim=True).sqrt() / math.sqrt(k)
    return x / (eps + rms).to(x.dtype)


def mp_silu(x):
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], dim=dim)


def resample(x, mode="keep"):
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return x


class MPFourier(torch.nn.Module):
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = torch.outer(x.float(), self.freqs.float()) + self.phases.float()
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalization (spec §1 step 2)
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep",
                 attention=False, channels_per_head=64, dropout=0, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = [1, 1]
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads != 0:
            n, c3, h, w = (x.shape[0], 3 * x.shape[1], x.shape[2], x.shape[3])
            qkv = self.attn_qkv(x).reshape(n, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)
            a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, c3 // 3, h, w)
            x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x


class UNet(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, model_channels=8, channel_mult=(1, 2),
                 num_blocks=1, attn_resolutions=(4,), label_balance=0.5, concat_balance=0.5, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(label_dim, cemb, []) if label_dim else None
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, "enc", "down", **block_kwargs)
            for i in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{i}"] = Block(cin, cout, cemb, "enc",
                                                          attention=res in attn_resolutions, **block_kwargs)
        self.dec = torch.nn.ModuleDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, "dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, "dec", "up", **block_kwargs)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{i}"] = Block(cin, cout, cemb, "dec",
                                                          attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, sigma_data=0.5, logvar_channels=16, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, [])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False):
        x = x.float()
        sigma = sigma.float().reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4
        F_x = self.unet(c_in * x, c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.float()
        if return_logvar:
            return D_x, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x


# ------------------------------------------------------------------------------------------------

def _release_net(seed=0, **kw):
    torch.manual_seed(seed)
    net = Precond(8, 2, 3, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                  channels_per_head=4, **kw)
    with torch.no_grad():  # nonzero gains, so every branch carries signal and gets a gradient
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net


def _inputs(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, net.img_channels, 8, 8, generator=g)
    sigma = torch.tensor([0.4, 3.0])
    labels = torch.eye(net.label_dim)[torch.tensor([0, 2])]
    return x, sigma, labels


def _step(net, x, sigma, labels, autocast=None, channels_last=False):
    """Forward (D and logvar) and backward of a fixed random projection; returns outputs and grads."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        D, logvar = net(x, sigma, labels, return_logvar=True)
    g = torch.randn(D.shape, generator=torch.Generator().manual_seed(5)).to(D.device)
    ((D * g).sum() + logvar.float().sum()).backward()
    named = [(n.removeprefix("_orig_mod."), p) for n, p in net.named_parameters()]  # torch.compile's wrapper
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in named}
    params = {n: p.detach().clone() for n, p in named}
    return D.detach(), logvar.detach().float(), grads, params


def _mean_rel_err(got: dict, want: dict) -> float:
    errs = [float((got[n].double() - want[n].double()).norm() / want[n].double().norm()) for n in want]
    return sum(errs) / len(errs)


def _block_names(net):
    return [n for n, m in net.named_modules() if isinstance(m, Block)]


def test_report_lists_every_block_and_state_dict_is_untouched():
    net = _release_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = edm2fast.accelerate(net)
    assert isinstance(report, AccelerateReport)
    assert sorted(report.names("Block")) == sorted(_block_names(net)) and len(_block_names(net)) == 10
    convs = [n for n, m in net.named_modules() if isinstance(m, MPConv)]
    assert sorted(report.names("MPConv")) == sorted(convs)
    assert report.names("UNet") == ["unet"] and report.names("Precond", switched=False) == [""]
    assert sorted(report.names("MPFourier")) == ["logvar_fourier", "unet.emb_fourier"]
    assert [n for n, _, _ in report.left] == [""]  # the Precond: recognised, nothing of its own to switch
    assert "switched" in str(report) and "10 Block" in str(report)
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_outputs_and_every_gradient_match(request, backend, train, autocast, channels_last):
    if backend == "cuda":
        request.getfixturevalue("cuda_backend")
    base = _release_net().train(train)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    fast = copy.deepcopy(base)
    oracle = copy.deepcopy(base)
    # 'auto' follows mpkernels' active backend, so the fused forwards run on the reference ops here;
    # the 'cuda' row pins the extension's kernels (CPU twins on this machine).
    report = edm2fast.accelerate(fast, backend="auto" if backend == "reference" else backend)
    assert len(report.names("Block")) == 10 and len(report.left) == 1
    args = _inputs(base)
    with mk.use_backend("reference"):
        got = _step(fast, *args, autocast=autocast, channels_last=channels_last)
    want = _step(base, *args, autocast=autocast, channels_last=channels_last)
    if autocast is None:
        ref = want
        eager = None
    else:  # judge bf16 by eager PyTorch's own bf16 error against the fp32 network (STYLE.md)
        ref = _step(oracle, *args, channels_last=channels_last)
        eager = want
    assert_close_to_oracle(got[0], ref[0], None if eager is None else eager[0], name="D")
    assert_close_to_oracle(got[1], ref[1], None if eager is None else eager[1], name="logvar")
    for n in ref[2]:
        # forced weight normalization rewrote the weights in training mode, exactly like the original
        assert_close_to_oracle(got[3][n], ref[3][n], name=f"param {n}")
        if eager is None:
            assert_close_to_oracle(got[2][n], ref[2][n], name=f"grad {n}")
    if eager is not None:
        # In bf16 one scalar gradient (a sum over the whole batch) is as noisy in eager PyTorch as in the
        # fused network, so compare the mean relative error over all gradients with eager's.
        ours, theirs = _mean_rel_err(got[2], ref[2]), _mean_rel_err(eager[2], ref[2])
        assert ours <= 1.5 * theirs, (ours, theirs)
    weight = dict(base.named_parameters())["unet.enc.8x8_conv.weight"]
    rms = weight.detach().flatten(1).square().mean(1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3) == train


def test_dropout_uses_the_same_random_stream():
    base = _release_net(dropout=0.3).train()
    fast = copy.deepcopy(base)
    edm2fast.accelerate(fast)
    args = _inputs(base)
    torch.manual_seed(7)
    want = _step(base, *args)
    torch.manual_seed(7)
    with mk.use_backend("reference"):
        got = _step(fast, *args)
    assert_close_to_oracle(got[0], want[0], name="D")


def test_op_count_of_forward_backward_drops(cuda_backend):
    base = _release_net().train()
    fast = copy.deepcopy(base)
    edm2fast.accelerate(fast, backend="cuda")
    args = _inputs(base)
    counts = []
    for net in (base, fast):
        with _Counter() as c:
            _step(net, *args)
        counts.append(c)
    assert any(k.startswith("mpkernels.") or "mpkernels" in k for k in counts[1].by_op), counts[1].by_op
    assert not any("mpkernels" in k for k in counts[0].by_op)
    assert counts[1].ops < 0.6 * counts[0].ops, (counts[0].ops, counts[1].ops)


def _compile_parity(backend_name, device="cpu"):
    torch._dynamo.reset()
    net = _release_net().eval().to(device)
    edm2fast.accelerate(net)
    ref = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True, backend=backend_name)
    args = [a.to(device) for a in _inputs(net)]
    with mk.use_backend("reference" if device == "cpu" else "auto"):
        got = _step(compiled, *args)
        want = _step(ref, *args)
    assert_close_to_oracle(got[0], want[0], name="D")
    for n in want[2]:
        assert_close_to_oracle(got[2][n], want[2][n], name=f"grad {n}")


@pytest.mark.slow  # ~40 s of tracing on 2 cores
def test_compile_fullgraph_aot_eager():
    _compile_parity("aot_eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor on 2 CPU cores takes minutes)")
def test_compile_fullgraph_inductor_on_gpu():
    _compile_parity("inductor", "cuda")


class _BlockWithMask(Block):
    def forward(self, x, emb, mask=None):  # a fork's block: same names, different signature
        return super().forward(x, emb)


class _BlockWithExtra(Block):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_norm = torch.nn.GroupNorm(1, self.out_channels)


def test_unexpected_blocks_and_unknown_modules_are_left_alone_and_reported():
    net = _release_net()
    old = net.unet.dec["4x4_in1"]
    odd = _BlockWithMask(8 * 2, 16, 16, "dec", channels_per_head=4)
    odd.load_state_dict(old.state_dict())
    net.unet.dec["4x4_in1"] = odd
    extra = _BlockWithExtra(8, 8, 16, "enc", channels_per_head=4)
    extra.load_state_dict(net.unet.enc["8x8_block0"].state_dict(), strict=False)
    net.unet.enc["8x8_block0"] = extra
    net.side = torch.nn.Linear(3, 3)  # unknown module with parameters
    base = copy.deepcopy(net)
    report = edm2fast.accelerate(net)
    left = {n: why for n, _, why in report.left}
    assert "signature" in left["unet.dec.4x4_in1"] and "extra_norm" in left["unet.enc.8x8_block0"]
    assert "unknown" in left["side"]
    assert "unet.dec.4x4_in1" not in report.names("Block")
    # never half-patched: nothing under a left block was switched
    for name in ("unet.dec.4x4_in1", "unet.enc.8x8_block0"):
        sub = net.get_submodule(name)
        assert all("forward" not in vars(m) for m in sub.modules()), name
        assert not any(n.startswith(name + ".") for n in report.names())
    assert len(report.names("Block")) == 8
    args = _inputs(base)
    with mk.use_backend("reference"):
        got = _step(net, *args)
    want = _step(base, *args)
    assert_close_to_oracle(got[0], want[0], name="D")


def test_undo_and_reference_backend_restore_the_original_forwards():
    net = _release_net().eval()
    base = copy.deepcopy(net)
    args = _inputs(net)
    want = _step(base, *args)
    for restore in ("undo", "reference"):
        edm2fast.accelerate(net)
        edm2fast.accelerate(net)  # idempotent
        assert sum("forward" in vars(m) for m in net.modules()) == 10 + 48 + 2 + 1
        if restore == "undo":
            assert undo(net) == 61
        else:
            report = edm2fast.accelerate(net, backend="reference")
            assert report.names() == [] and len(report.left) == 62
        assert all("forward" not in vars(m) for m in net.modules())
        got = _step(net, *args)
        assert torch.equal(got[0], want[0]) and all(torch.equal(got[2][n], want[2][n]) for n in want[2])


def test_accelerated_network_survives_deepcopy_and_pickle():
    net = _release_net().eval()
    edm2fast.accelerate(net)
    args = _inputs(net)
    with mk.use_backend("reference"):
        want = _step(net, *args)[0]
        for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
            assert clone.unet.forward.args[1] is clone.unet  # bound to the copy, not to the original
            assert torch.equal(_step(clone, *args)[0], want)


def test_own_network_is_recognised_and_its_backend_pinned(cuda_backend):
    from edm2fast.networks import Block as OwnBlock
    from edm2fast.networks import Precond as OwnPrecond
    torch.manual_seed(0)
    net = OwnPrecond(8, 2, 3, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                     channels_per_head=4, dtype="fp32").eval()
    blocks = [n for n, m in net.named_modules() if isinstance(m, OwnBlock)]
    report = edm2fast.accelerate(net)
    assert sorted(report.names("Block")) == sorted(blocks) and not report.left
    assert all("already fused" in why for _, _, why in report.switched) and report.names("Precond") == [""]
    assert all("forward" not in vars(m) for m in net.modules())  # 'auto': nothing to install
    args = _inputs(net)

    def ops(backend_global):
        with mk.use_backend(backend_global), _Counter() as c, torch.no_grad():
            net(*args[:2], args[2])
        return [k for k in c.by_op if "mpkernels" in k]

    report = edm2fast.accelerate(net, backend="cuda")
    assert "pinned to backend 'cuda'" in report.switched[0][2]
    assert ops("reference")  # the pin wins over the global choice
    edm2fast.accelerate(net, backend="reference")
    assert not ops("cuda")


def test_triton_backend_dispatches_on_the_kernel_device():
    """Backend 'triton' pinned by accelerate() runs Triton kernels: CUDA tensors on a GPU machine,
    the interpreter on CPU tensors otherwise (conftest.kernel_device)."""
    require_backend("triton")
    dev = kernel_device()
    torch.manual_seed(0)
    block = Block(4, 4, 4, "dec", attention=True, channels_per_head=4).eval()
    with torch.no_grad():
        block.emb_gain.fill_(0.5)
    block = block.to(dev)
    ref = copy.deepcopy(block)
    edm2fast.accelerate(block, backend="triton")
    x, emb = torch.randn(1, 4, 4, 4).to(dev), torch.randn(1, 4).to(dev)
    with torch.no_grad(), _Counter() as c:
        got = block(x, emb)
    assert any("triton" in k for k in c.by_op), c.by_op
    with torch.no_grad():
        want = ref(x, emb)
    assert max_err(got, want)[0] < 1e-4


def test_bad_arguments():
    with pytest.raises(TypeError, match="net"):
        edm2fast.accelerate("not a network")
    with pytest.raises(ValueError, match="backend"):
        edm2fast.accelerate(_release_net(), backend="nope")
    with pytest.raises(TypeError, match="backend"):
        edm2fast.accelerate(_release_net(), backend=3)
    with pytest.raises(TypeError, match="net"):
        undo(None)


def test_benchmark_row_your_network_accelerated():
    from benchmarks import model as M
    make = M.load_user_net("test_accelerate:_release_net")
    rows = M.accelerated_train_step(make, 2, torch.device("cpu"), min_time=0.01)
    assert [r["variant"] for r in rows] == ["your network", "your network, accelerated"]
    assert rows[0]["switched"] == 0 and rows[1]["switched"] == 61 and rows[1]["speedup"] > 0
    with pytest.raises(ValueError, match="--user-net"):
        M.load_user_net("no_colon_here")
    with pytest.raises(TypeError, match="--user-net"):
        M.load_user_net("math:pi")
