"""The thin nn.Module wrappers of mpkernels.nn: same results as the functional ops, forward and
backward; clear errors for bad settings; extra_repr; torch.jit.script and torch.compile accept them."""

from __future__ import annotations

import warnings

import pytest
import torch

import mpkernels as mk
import mpkernels.nn as mn


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


# (module, functional equivalent, input shapes): odd sizes on purpose (C=3, H*W=35, batch 1)
CASES = {
    "MPSiLU": (lambda: mn.MPSiLU(), lambda x: mk.mp_silu(x), [(1, 3, 5, 7)]),
    "PixelNorm": (lambda: mn.PixelNorm(eps=1e-3), lambda x: mk.pixel_norm(x, 1e-3), [(2, 3, 5, 7)]),
    "Normalize": (lambda: mn.Normalize(), lambda x: mk.normalize(x), [(3, 3, 5)]),
    "Normalize-dim": (lambda: mn.Normalize(dim=[1, 2], eps=1e-2), lambda x: mk.normalize(x, [1, 2], 1e-2),
                      [(2, 3, 5, 7)]),
    "MPSum": (lambda: mn.MPSum(t=0.3), lambda a, b: mk.mp_sum(a, b, 0.3), [(1, 3, 5, 7), (1, 3, 5, 7)]),
    "MPCat": (lambda: mn.MPCat(t=0.7, dim=1), lambda a, b: mk.mp_cat(a, b, dim=1, t=0.7), [(2, 3, 5, 7), (2, 5, 5, 7)]),
    "MPSumClip": (lambda: mn.MPSumClip(t=0.3, clip=0.5), lambda a, b: mk.mp_sum_clip(a, b, 0.3, 0.5),
                  [(1, 3, 5, 7), (1, 3, 5, 7)]),
    "PixelNormMPSiLU": (lambda: mn.PixelNormMPSiLU(eps=1e-4), lambda x: mk.pixel_norm_mp_silu(x, 1e-4), [(2, 3, 5, 7)]),
    "ModulatedMPSiLU": (lambda: mn.ModulatedMPSiLU(), lambda y, c: mk.modulated_mp_silu(y, c), [(2, 3, 5, 7), (2, 3)]),
    "CosineAttention": (lambda: mn.CosineAttention(num_heads=2), lambda q: mk.cosine_attention(q, 2), [(1, 12, 5, 7)]),
    "Resample-down": (lambda: mn.Resample("down"), lambda x: mk.resample(x, "down"), [(1, 3, 4, 6)]),
    "Resample-up": (lambda: mn.Resample(mode="up"), lambda x: mk.resample(x, "up"), [(1, 3, 5, 7)]),
}


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_module_matches_functional_forward_and_backward(request, case, backend):
    if backend == "cuda":
        request.getfixturevalue("cuda_backend")
    make, fn, shapes = CASES[case]
    inputs = [_x(*s, seed=i) for i, s in enumerate(shapes)]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    with mk.use_backend(backend):
        got = _flat(make()(*inputs))
        want = _flat(fn(*twins))
        g = [torch.randn(o.shape, generator=torch.Generator().manual_seed(9)) for o in want]
        sum((o * gi).sum() for o, gi in zip(got, g)).backward()
        sum((o * gi).sum() for o, gi in zip(want, g)).backward()
    for a, b in zip(got, want):
        assert torch.equal(a, b), case
    for a, b in zip(inputs, twins):
        assert torch.equal(a.grad, b.grad), case


def test_extra_repr_and_exports():
    assert repr(mn.PixelNorm(1e-3)) == "PixelNorm(eps=0.001)"
    assert repr(mn.Normalize(dim=1)) == "Normalize(dim=1, eps=0.0001)"
    assert repr(mn.Normalize(dim=(1, 2))) == "Normalize(dim=[1, 2], eps=0.0001)"
    assert repr(mn.MPSum(0.3)) == "MPSum(t=0.3)"
    assert repr(mn.MPCat(0.5, dim=2)) == "MPCat(t=0.5, dim=2)"
    assert repr(mn.MPSumClip(0.3, 256)) == "MPSumClip(t=0.3, clip=256)"
    assert repr(mn.PixelNormMPSiLU()) == "PixelNormMPSiLU(eps=0.0001)"
    assert repr(mn.CosineAttention(4)) == "CosineAttention(num_heads=4)"
    assert repr(mn.Resample("up")) == "Resample(mode='up')"
    assert repr(mn.MPSiLU()) == "MPSiLU()" and repr(mn.ModulatedMPSiLU()) == "ModulatedMPSiLU()"
    for name in ("MPSiLU", "PixelNorm", "Normalize", "MPSum", "MPCat", "MPSumClip", "PixelNormMPSiLU",
                 "ModulatedMPSiLU", "CosineAttention", "Resample", "MPConv", "MPFourier"):
        assert name in mn.__all__ and mn.__dict__[name].__doc__, name


@pytest.mark.parametrize("make, exc, arg", [
    (lambda: mn.PixelNorm(eps=-1), ValueError, "eps"),
    (lambda: mn.PixelNorm(eps="x"), TypeError, "eps"),
    (lambda: mn.Normalize(dim="1"), TypeError, "dim"),
    (lambda: mn.Normalize(dim=[]), TypeError, "dim"),
    (lambda: mn.MPSum(t=1.5), ValueError, "t"),
    (lambda: mn.MPCat(t=-0.1), ValueError, "t"),
    (lambda: mn.MPCat(dim=1.0), TypeError, "dim"),
    (lambda: mn.MPSumClip(0.3, clip=0), ValueError, "clip"),
    (lambda: mn.PixelNormMPSiLU(eps=float("nan")), ValueError, "eps"),
    (lambda: mn.CosineAttention(0), ValueError, "num_heads"),
    (lambda: mn.CosineAttention(True), ValueError, "num_heads"),
    (lambda: mn.Resample("sideways"), ValueError, "mode"),
])
def test_bad_settings_name_the_argument(make, exc, arg):
    with pytest.raises(exc, match=f"^{arg}"):
        make()


def test_bad_input_is_reported_by_the_functional_op():
    with pytest.raises(ValueError, match="num_heads"):
        mn.CosineAttention(5)(torch.randn(1, 12, 2, 2))
    with pytest.raises(ValueError, match="^b"):
        mn.MPSum()(torch.randn(2, 3), torch.randn(3, 3))


def test_torch_jit_script_accepts_every_module():
    x = torch.randn(2, 6, 4, 4)
    mods = [(mn.MPSiLU(), (x,)), (mn.PixelNorm(), (x,)), (mn.Normalize(), (x,)), (mn.Normalize(1), (x,)),
            (mn.MPSum(0.3), (x, x)), (mn.MPCat(0.3), (x, x)), (mn.MPSumClip(0.3, 1.0), (x, x)),
            (mn.PixelNormMPSiLU(), (x,)), (mn.ModulatedMPSiLU(), (x, x[:, :, 0, 0])), (mn.CosineAttention(2), (x,)),
            (mn.Resample("down"), (x,))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in recent torch
        for m, args in mods:
            scripted = torch.jit.script(m)
            for a, b in zip(_flat(scripted(*args)), _flat(m(*args))):
                assert torch.equal(a, b), type(m).__name__


class _Tiny(torch.nn.Module):
    """A block-shaped chain of every wrapper, for the compile test."""

    def __init__(self):
        super().__init__()
        self.down = mn.Resample("down")
        self.norm_silu = mn.PixelNormMPSiLU()
        self.mod = mn.ModulatedMPSiLU()
        self.qkv = mn.MPConv(4, 12, [1, 1])
        self.attn = mn.CosineAttention(2)
        self.sum = mn.MPSum(0.3)
        self.cat = mn.MPCat(0.5)
        self.clip = mn.MPSumClip(0.3, 2.0)
        self.act = mn.MPSiLU()
        self.pn = mn.PixelNorm()
        self.norm = mn.Normalize(dim=1)
        self.up = mn.Resample("up")

    def forward(self, x, c):
        x = self.down(x)
        x, y = self.norm_silu(x)
        y = self.mod(y, c)
        x = self.sum(x, self.attn(self.qkv(y)))
        x = self.clip(x, self.act(self.pn(x)))
        return self.cat(self.up(self.norm(x)), self.up(x))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    net = _Tiny().eval()
    x, c = _x(2, 4, 6, 6), _x(2, 4, seed=1)
    want = net(x, c)
    want.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    got = torch.compile(net, fullgraph=True, backend="aot_eager")(x, c)
    got.square().sum().backward()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6) and torch.allclose(x.grad, gx, rtol=1e-5, atol=1e-6)
