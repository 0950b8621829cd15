"""``mk.mp_sum_clip_pixel_norm_mp_silu``: the public op on every backend against the ops it fuses, low-precision
parity against the fp64 oracle, its errors, and its launch count."""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from conftest import OpNames, assert_close_to_oracle, assert_compile_matches_eager, clip_in_a_gap, kernel_device
from mpkernels import _dispatch

OP = "mp_sum_clip_pixel_norm_mp_silu"
BACKENDS = mk.available_backends()  # 'triton' included: the interpreter on CPU
NAMES = ["s", "n", "h", "grad x", "grad y"]
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend not available")


def _inputs(dtype=torch.float32, layout="nchw", shape=(2, 3, 4, 5), seed=0):
    """``x``, ``y`` drawn on CPU; 'cl': both channels_last, 'mixed': x channels_last, y not."""
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(kernel_device()) for _ in range(2))
    if layout in ("cl", "mixed"):
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "cl":
        y = y.contiguous(memory_format=torch.channels_last)
    return x, y


def _leaves(tensors, dtype=None):
    return [(a.detach().to(dtype) if dtype else a.detach().clone()).requires_grad_() for a in tensors]


def _loss(s, n, h, which):
    """The outputs named in ``which`` reach the loss (the others get no gradient at all, not zeros)."""
    gen = torch.Generator().manual_seed(7)
    ws = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(o.device) for o in (s, n, h)]
    terms = {"s": (s * ws[0]).sum(), "n": (n * ws[1]).sum(), "h": (h * h * ws[2]).sum()}
    return sum(terms[k] for k in which)


def _composition(x, y, t, clip, eps=1e-4):
    s = mk.mp_sum(x, y, t) if clip is None else mk.mp_sum_clip(x, y, t, clip)
    return (s, *mk.pixel_norm_mp_silu(s, eps))


def _run(fn, tensors, backend, t, clip, which="snh", eps=1e-4):
    leaves = _leaves(tensors)
    with mk.use_backend(backend, strict=True):
        s, n, h = fn(*leaves, t, clip, eps)
        _loss(s, n, h, which).backward()
    return [s.detach(), n.detach(), h.detach()] + [a.grad for a in leaves]


# --- every backend against the composition of public ops on the reference ------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "cl", "mixed"])
@pytest.mark.parametrize("t,clip", [(0.3, None), (0.7, 0.5)], ids=["noclip", "clip"])
@pytest.mark.parametrize("which", ["snh", "nh", "s", "n", "h"])
def test_matches_sum_then_pixel_norm_silu(backend, layout, t, clip, which):
    tensors = _inputs(layout=layout)
    if clip is not None:  # the clip must bite, or the mask is untested
        s = mk.reference.mp_sum(*tensors, t)
        assert 0 < int((s.abs() > clip).sum()) < s.numel()
    got = _run(mk.mp_sum_clip_pixel_norm_mp_silu, tensors, backend, t, clip, which)
    want = _run(_composition, tensors, "reference", t, clip, which)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    if layout != "mixed":  # (eager PyTorch's lerp picks its own order for mixed layouts)
        for name, g, w in zip(NAMES[:3], got, want):
            assert g.stride() == w.stride(), f"{name} keeps x's layout, as the ops in sequence do"


@needs_triton
@pytest.mark.parametrize("shape,layout", [((1, 2100, 1, 3), "nchw"), ((1, 2100, 1, 2), "cl"), ((2, 70, 3, 3), "nchw"),
                                          ((1, 300, 2, 2), "cl"), ((1, 300, 1, 3), "nchw"),
                                          ((1, 800, 1, 3), "nchw"),
                                          ((3, 2100), "nchw"), ((2, 9), "nchw")], ids=str)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_triton_rows_matches_triton_ops(shape, layout, clip):
    """Other shapes and row lengths (two passes over rows longer than 2048, and in backward over NCHW rows of
    769-1024 fp32 values; two-chunk rows; 2-d input): s is bit for bit the Triton ops' in sequence, n and h
    too where the tiles are normalize.py's (same reduction order), and everything else equal up to fp32
    rounding."""
    from mpkernels.triton import normalize as N, sum_norm_silu as S
    tensors = _inputs(layout=layout, shape=shape, seed=2)
    got = _run(mk.mp_sum_clip_pixel_norm_mp_silu, tensors, "triton", 0.7, clip)
    want = _run(_composition, tensors, "triton", 0.7, clip)
    assert torch.equal(got[0], want[0]), "s"
    x3, _ = N._row_view(tensors[0], (1,))
    args = (x3.shape[1], x3.shape[2] == 1, False, 4)
    if S._blocks(*args) == N._blocks(*args):  # normalize.py's tiles: its reduction order, bit for bit
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    for name, g, w in zip(NAMES[1:], got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs_propagate(backend):
    """NaN and inf reach s, n and h as through the ops in sequence (the clamp keeps NaN)."""
    x, y = _inputs(layout="cl")
    x[0, 0, 0, 0], y[1, 2, 3, 1] = float("nan"), float("inf")
    got = _run(mk.mp_sum_clip_pixel_norm_mp_silu, (x, y), backend, 0.7, 0.5)
    want = _run(_composition, (x, y), "reference", 0.7, 0.5)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
def test_triton_forward_matches_triton_ops_in_sequence(dtype, layout, clip):
    """The fused kernel rounds s as mp_sum_clip stores it and normalizes the rounded s as pixel_norm_mp_silu
    does: s, n and h are bit for bit those of the Triton ops in sequence."""
    tensors = _inputs(dtype, layout, shape=(2, 6, 5, 5), seed=3)
    got = _run(mk.mp_sum_clip_pixel_norm_mp_silu, tensors, "triton", 0.6, clip)
    want = _run(_composition, tensors, "triton", 0.6, clip)
    for name, g, w in zip(NAMES[:3], got, want):
        assert torch.equal(g, w), name


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) traces the custom ops (no graph break) and gives eager's result."""
    backend = "triton" if "triton" in BACKENDS else "reference"
    tensors = _inputs(layout="cl")

    def step(x, y):
        s, n, h = mk.mp_sum_clip_pixel_norm_mp_silu(x, y, 0.3, 0.5)
        return (s * 0.3).sum() + (n * 0.7).sum() + (h * h).sum()

    assert_compile_matches_eager(step, lambda: _leaves(tensors), backend)


@needs_triton
def test_launches_declared_configs(declared_triton_launches):
    """Every configuration the launchers pick is in all_configs() (what the AOT test compiles; checked
    by the fixture)."""
    seen = declared_triton_launches
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("nchw", "cl"):
            for clip in (None, 0.5):
                _run(mk.mp_sum_clip_pixel_norm_mp_silu, _inputs(dtype, layout, shape=(1, 3, 2, 3)), "triton", 0.3,
                     clip, "sn")
    assert len({c.name for c in seen}) == 2 * 2 * (2 + 1)  # dtypes x layouts x (forward with/without clip + backward)


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("clip", [0.0, 0.5], ids=["noclip", "clip"])
def test_custom_ops_pass_opcheck(layout, clip):
    """Schema, fake functions (shapes and strides), autograd registration of both custom ops."""
    from mpkernels.triton import normalize as N, sum_norm_silu as S
    x, y = _inputs(layout=layout, shape=(1, 3, 3, 2))
    x3, _ = N._row_view(x, (1,))
    y3, _ = N._row_view(y.contiguous(memory_format=torch.channels_last) if layout == "cl" else y, (1,))
    torch.library.opcheck(S._fwd_op, (x3.requires_grad_(), y3, 0.3, clip, 1e-4))
    s3, _, _, inv, mask = S._fwd_op(x3.detach(), y3, 0.3, clip, 1e-4)
    g = torch.randn(s3.shape, device=s3.device)
    for gs, gn, gh in ((g, g * 0.5, g * 2), (g, None, None), (None, g, None), (None, None, g), (None, g, g)):
        torch.library.opcheck(S._bwd_op, (gs, gn, gh, s3, inv, mask, 0.3, 1e-4),
                              test_utils=("test_schema", "test_faketensor"))


# --- low precision against the fp64 oracle (conftest's rule: within 2x eager PyTorch's error) -----

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("clipping", [False, True], ids=["noclip", "clip"])
def test_low_precision_vs_fp64_oracle(backend, dtype, layout, clipping):
    tensors = _inputs(dtype, layout, shape=(2, 6, 5, 5), seed=3)
    t = 0.3
    clip = clip_in_a_gap(*tensors, t) if clipping else None
    oracle = _run(mk.mp_sum_clip_pixel_norm_mp_silu, [a.double() for a in tensors], "reference", t, clip)
    eager = _run(_composition, tensors, "reference", t, clip)
    got = _run(mk.mp_sum_clip_pixel_norm_mp_silu, tensors, backend, t, clip)
    for name, g, o, e in zip(NAMES, got, oracle, eager):
        assert g.dtype == dtype, name
        assert_close_to_oracle(g, o, e, name=name)


# --- errors name the argument -----------------------------------------------------------------------

def test_errors_name_the_argument():
    x, y = _inputs()
    f = mk.mp_sum_clip_pixel_norm_mp_silu
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor"):
        f(x.tolist(), y, 0.3, 1.0)
    with pytest.raises(ValueError, match="^x: expected at least 2 dims"):
        f(x[0, 0, 0], y[0, 0, 0], 0.3, 1.0)
    with pytest.raises(TypeError, match="^y: expected a torch.Tensor"):
        f(x, None, 0.3, 1.0)
    with pytest.raises(ValueError, match="^y: shape"):
        f(x, y[:, :2], 0.3, 1.0)
    with pytest.raises(TypeError, match="^y: dtype"):
        f(x, y.double(), 0.3, 1.0)
    with pytest.raises(TypeError, match="^y: unsupported dtype"):
        f(x, y.int(), 0.3, 1.0)
    with pytest.raises(ValueError, match="^t:"):
        f(x, y, 1.5, 1.0)
    with pytest.raises(TypeError, match="^t:"):
        f(x, y, "0.5", 1.0)
    with pytest.raises(ValueError, match="^clip:"):
        f(x, y, 0.3, 0.0)
    with pytest.raises(ValueError, match="^clip:"):
        f(x, y, 0.3, float("inf"))
    with pytest.raises(TypeError, match="^clip:"):
        f(x, y, 0.3, "1")
    with pytest.raises(ValueError, match="^eps:"):
        f(x, y, 0.3, 1.0, eps=-1e-4)
    with pytest.raises(TypeError, match="^eps:"):
        f(x, y, 0.3, 1.0, eps=None)


# --- one launch each way ----------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [None, 256.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("which", ["snh", "nh", "s", "h"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_triton_is_one_launch_each_way(clip, which, cl):
    """On the meta device as the Triton backend on a GPU: one op forward, one backward, no gradient sum."""
    pytest.importorskip("mpkernels.triton")
    fmt = torch.channels_last if cl else torch.contiguous_format
    x, y = (torch.empty(2, 6, 8, 8, device="meta").contiguous(memory_format=fmt).requires_grad_() for _ in range(2))
    with _dispatch.simulate("triton"):
        with OpNames() as fwd:
            s, n, h = mk.mp_sum_clip_pixel_norm_mp_silu(x, y, 0.3, clip)
        loss = sum({"s": s, "n": n, "h": h}[k].sum() for k in which)
        with OpNames() as bwd:
            torch.autograd.grad(loss, [x, y], allow_unused=False)
    assert [n for n in fwd.names if "mpkernels" in n] == [f"mpkernels.triton_{OP}"], fwd.names
    assert [n for n in bwd.names if "mpkernels" in n] == [f"mpkernels.triton_{OP}_backward"], bwd.names
    assert not [n for n in bwd.names if n == "aten.add"], bwd.names
    assert s.stride() == x.stride() and n.stride() == x.stride() and h.stride() == x.stride()
