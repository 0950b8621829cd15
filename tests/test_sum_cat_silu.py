"""``mk.mp_sum_clip_mp_cat_mp_silu``: the public op on every backend against the ops it fuses, low-precision
parity against the fp64 oracle, its errors, and its launch count."""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from conftest import OpNames, assert_close_to_oracle, assert_compile_matches_eager, clip_in_a_gap, kernel_device
from mpkernels import _dispatch

OP = "mp_sum_clip_mp_cat_mp_silu"
BACKENDS = mk.available_backends()  # 'triton' included: the interpreter on CPU


@pytest.fixture(autouse=True)
def _declared_launches(declared_triton_launches):
    """Every Triton launch is a declared configuration (what the AOT test compiles)."""


def _inputs(dtype=torch.float32, layout="nchw", shape=(2, 3, 4, 4), skip_channels=5, seed=0):
    """``x``, ``y``, ``skip`` drawn on CPU; 'cl': all channels_last, 'mixed': x channels_last, y and skip not,
    'slice': x a non-dense view (every other element of a wider tensor)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x, y = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    skip = torch.randn((n, skip_channels, h, w), generator=g, dtype=torch.float64)
    x, y, skip = (a.to(dtype).to(kernel_device()) for a in (x, y, skip))
    if layout in ("cl", "mixed"):
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "cl":
        y, skip = (a.contiguous(memory_format=torch.channels_last) for a in (y, skip))
    if layout == "slice":
        x = torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]
    return x, y, skip


def _leaves(tensors, dtype=None):
    return [(a.detach().to(dtype) if dtype else a.detach().clone()).requires_grad_() for a in tensors]


def _loss(c, h, which):
    """Both outputs reach the loss, or only one (the other gradient is then absent, not zeros)."""
    gen = torch.Generator().manual_seed(7)
    wc = torch.randn(c.shape, generator=gen, dtype=torch.float64).to(c.dtype).to(c.device)
    wh = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h.dtype).to(h.device)
    if which == "c":
        return (c * wc).sum()
    if which == "h":
        return (h * wh).sum()
    return (c * wc).sum() + (h * h * wh).sum()


def _composition(x, y, skip, t, clip, cat_t, dim=1):
    s = mk.mp_sum(x, y, t) if clip is None else mk.mp_sum_clip(x, y, t, clip)
    return mk.mp_cat_mp_silu(s, skip, dim, cat_t)


def _run(fn, tensors, backend, t, clip, cat_t, which, dim=1):
    leaves = _leaves(tensors)
    with mk.use_backend(backend, strict=True):
        c, h = fn(*leaves, t, clip, cat_t, dim)
        _loss(c, h, which).backward()
    return [c.detach(), h.detach()] + [a.grad for a in leaves]


# --- every backend against the composition of public ops on the reference ------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "cl", "mixed", "slice"])
@pytest.mark.parametrize("t,clip", [(0.3, None), (0.7, 0.5)], ids=["noclip", "clip"])
@pytest.mark.parametrize("which", ["both", "c", "h"])
def test_matches_sum_then_cat_silu(backend, layout, t, clip, which):
    tensors = _inputs(layout=layout)
    if clip is not None:  # the clip must bite, or the mask is untested
        s = mk.reference.mp_sum(*tensors[:2], t)
        assert 0 < int((s.abs() > clip).sum()) < s.numel()
    got = _run(mk.mp_sum_clip_mp_cat_mp_silu, tensors, backend, t, clip, 0.4, which)
    want = _run(_composition, tensors, "reference", t, clip, 0.4, which)
    names = ["c", "h", "grad x", "grad y", "grad skip"]
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    if layout in ("nchw", "cl"):  # (eager PyTorch's lerp picks its own order for mixed layouts)
        assert got[0].stride() == want[0].stride(), "c keeps x's layout, as mp_cat_mp_silu(s, skip) does"


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_dim(backend):
    """Concatenation along the last dim of a channels_last x (rows of the [M, K] view split the sample)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last).to(kernel_device())
    y = torch.randn(2, 3, 4, 5, generator=g).to(kernel_device())
    skip = torch.randn(2, 3, 4, 2, generator=g).to(kernel_device())
    got = _run(mk.mp_sum_clip_mp_cat_mp_silu, (x, y, skip), backend, 0.5, 0.8, 0.6, "both", dim=-1)
    want = _run(_composition, (x, y, skip), "reference", 0.5, 0.8, 0.6, "both", dim=-1)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs_propagate(backend):
    """NaN and inf reach c and h as through the ops in sequence (the clamp keeps NaN, no gradient passes it)."""
    x, y, skip = _inputs(layout="cl")
    x[0, 0, 0, 0], y[1, 2, 3, 1], skip[0, 4, 1, 1] = float("nan"), float("inf"), float("-inf")
    got = _run(mk.mp_sum_clip_mp_cat_mp_silu, (x, y, skip), backend, 0.7, 0.5, 0.4, "both")
    want = _run(_composition, (x, y, skip), "reference", 0.7, 0.5, 0.4, "both")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
def test_triton_matches_triton_ops_in_sequence(dtype, clip):
    """The fused kernel rounds s as mp_sum_clip stores it: c and h are bit for bit those of the Triton ops
    in sequence; the gradients of x and y differ only by the sequence's rounding of g_s (fused: fp32)."""
    tensors = _inputs(dtype, "cl", shape=(2, 6, 5, 5), skip_channels=7, seed=3)
    got = _run(mk.mp_sum_clip_mp_cat_mp_silu, tensors, "triton", 0.6, clip, 0.5, "both")
    want = _run(_composition, tensors, "triton", 0.6, clip, 0.5, "both")
    for name, g, w in zip(["c", "h"], got[:2], want[:2]):
        assert torch.equal(g, w), name
    eps = torch.finfo(dtype).eps
    for name, g, w in zip(["grad x", "grad y"], got[2:4], want[2:4]):
        torch.testing.assert_close(g, w, rtol=2 * eps, atol=0.0, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(got[4], want[4]), "grad skip"


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) traces the Triton custom ops (no graph break) and gives eager's result."""
    tensors = _inputs(layout="cl")

    def step(x, y, skip):
        c, h = mk.mp_sum_clip_mp_cat_mp_silu(x, y, skip, 0.3, 0.5, 0.4)
        return (c * 0.7).sum() + (h * h).sum()

    assert_compile_matches_eager(step, lambda: _leaves(tensors), "triton")


# --- low precision against the fp64 oracle (conftest's rule: within 2x eager PyTorch's error) -----

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("clipping", [False, True], ids=["noclip", "clip"])
def test_low_precision_vs_fp64_oracle(backend, dtype, layout, clipping):
    tensors = _inputs(dtype, layout, shape=(2, 6, 5, 5), skip_channels=7, seed=3)
    t, cat_t = 0.3, 0.5
    clip = clip_in_a_gap(*tensors[:2], t) if clipping else None
    oracle = _run(mk.mp_sum_clip_mp_cat_mp_silu, [a.double() for a in tensors], "reference", t, clip, cat_t, "both")
    eager = _run(_composition, tensors, "reference", t, clip, cat_t, "both")
    got = _run(mk.mp_sum_clip_mp_cat_mp_silu, tensors, backend, t, clip, cat_t, "both")
    for name, g, o, e in zip(["c", "h", "grad x", "grad y", "grad skip"], got, oracle, eager):
        assert g.dtype == dtype, name
        assert_close_to_oracle(g, o, e, name=name)


# --- errors name the argument -----------------------------------------------------------------------

def test_errors_name_the_argument():
    x, y, skip = _inputs()
    f = mk.mp_sum_clip_mp_cat_mp_silu
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor"):
        f(x.tolist(), y, skip, 0.3, 1.0, 0.5)
    with pytest.raises(ValueError, match="^y: shape"):
        f(x, y[:, :2], skip, 0.3, 1.0, 0.5)
    with pytest.raises(TypeError, match="^y: dtype"):
        f(x, y.double(), skip, 0.3, 1.0, 0.5)
    with pytest.raises(TypeError, match="^skip: dtype"):
        f(x, y, skip.half(), 0.3, 1.0, 0.5)
    with pytest.raises(ValueError, match="^skip: shape"):
        f(x, y, skip[:, :, :2], 0.3, 1.0, 0.5)
    with pytest.raises(ValueError, match="^skip: has 3 dims"):
        f(x, y, skip[0], 0.3, 1.0, 0.5)
    with pytest.raises(TypeError, match="^skip: unsupported dtype"):
        f(x, y, skip.int(), 0.3, 1.0, 0.5)
    with pytest.raises(ValueError, match="^t:"):
        f(x, y, skip, 1.5, 1.0, 0.5)
    with pytest.raises(ValueError, match="^clip:"):
        f(x, y, skip, 0.3, 0.0, 0.5)
    with pytest.raises(TypeError, match="^clip:"):
        f(x, y, skip, 0.3, "1", 0.5)
    with pytest.raises(ValueError, match="^cat_t:"):
        f(x, y, skip, 0.3, 1.0, -0.1)
    with pytest.raises(ValueError, match="^dim:"):
        f(x, y, skip, 0.3, 1.0, 0.5, dim=4)
    with pytest.raises(TypeError, match="^dim:"):
        f(x, y, skip, 0.3, 1.0, 0.5, dim=1.0)


# --- one launch each way ----------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [None, 256.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("which", ["both", "c", "h"])
def test_triton_is_one_launch_each_way(clip, which):
    """On the meta device as the Triton backend on a GPU: one op forward, one backward, no gradient sum."""
    pytest.importorskip("mpkernels.triton")
    x, y = (torch.empty(2, 6, 8, 8, device="meta", requires_grad=True) for _ in range(2))
    skip = torch.empty(2, 10, 8, 8, device="meta", requires_grad=True)
    with _dispatch.simulate("triton"):
        with OpNames() as fwd:
            c, h = mk.mp_sum_clip_mp_cat_mp_silu(x, y, skip, 0.3, clip, 0.5)
        loss = {"both": c.sum() + h.sum(), "c": c.sum(), "h": h.sum()}[which]
        with OpNames() as bwd:
            torch.autograd.grad(loss, [x, y, skip], allow_unused=False)
    assert [n for n in fwd.names if "mpkernels" in n] == ["mpkernels.triton_mp_sum_clip_mp_cat_mp_silu"], fwd.names
    assert [n for n in bwd.names if "mpkernels" in n] == ["mpkernels.triton_mp_sum_clip_mp_cat_mp_silu_backward"], \
        bwd.names
    assert not [n for n in bwd.names if n == "aten.add"], bwd.names
