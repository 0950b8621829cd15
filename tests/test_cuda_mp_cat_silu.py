"""Backend 'cuda': the extension's fused ``mp_cat_mp_silu`` (one kernel forward, one backward).

Runs the C++ twins on CPU tensors (and the CUDA kernels where a GPU is present). ``x`` is the
reference's ``mp_cat`` bit for bit (one rounding of input * coefficient); ``y`` and the gradients
follow STYLE.md's rule: max error against a float64 oracle at most twice eager PyTorch's at the
same dtype plus a small floor (``conftest.assert_close_to_oracle``). The fused backward sums the
two gradients in fp32, so it is at least as close as the reference's rounded sum. Launch
accounting on the meta device under ``simulate('cuda')`` counts what a GPU would launch.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mpkernels as mk
from mpkernels import _dispatch
from mpkernels import reference as R
from conftest import DTYPES, assert_close_to_oracle

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="CUDA kernels: no GPU here"))]


@pytest.fixture(scope="module", autouse=True)
def ext(cuda_backend):
    return cuda_backend


def make(shape, dtype, layout="nchw", device="cpu", seed=0):
    """A tensor of `shape` in `layout` (4-d layouts: nchw, channels_last, sliced = not dense)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        n, c, h, w = shape
        return torch.randn(n, c, h, 2 * w, generator=g).to(dtype).to(device)[..., ::2]
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def run(backend, a, b, dim=1, t=0.3, use=("x", "y"), seed=7):
    """x, y and the input gradients of ``sum(x * wx) + sum(y * wy)`` (only the outputs in ``use``)."""
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with mk.use_backend(backend, strict=backend != "reference"):
        x, y = mk.mp_cat_mp_silu(a, b, dim=dim, t=t)
    g = torch.Generator().manual_seed(seed)
    wx = torch.randn(x.shape, generator=g).to(x.dtype).to(x.device)
    wy = torch.randn(x.shape, generator=g).to(x.dtype).to(x.device)
    loss = sum((out * w).sum() for name, out, w in (("x", x, wx), ("y", y, wy)) if name in use)
    loss.backward()
    return x.detach(), y.detach(), a.grad, b.grad


def check_against_oracle(a, b, dim=1, t=0.3, use=("x", "y")):
    got = run("cuda", a, b, dim, t, use)
    eager = run("reference", a, b, dim, t, use)
    oracle = run("reference", a.double(), b.double(), dim, t, use)
    assert torch.equal(got[0], eager[0]), "x is the reference's mp_cat bit for bit"
    for name, o, e, r in zip(("y", "grad a", "grad b"), got[1:], eager[1:], oracle[1:]):
        assert o.dtype == e.dtype and o.shape == e.shape, name
        assert_close_to_oracle(o, r, e, name=name)
    return got


# Odd channel counts take the scalar kernel, multiples of 8 the vector one (on a GPU).
SHAPES = [((2, 3, 5, 5), (2, 7, 5, 5)), ((1, 8, 4, 4), (1, 16, 4, 4)), ((3, 1, 1, 1), (3, 2, 1, 1))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_values_and_gradients_match_oracle(shapes, layout, dtype, device):
    a = make(shapes[0], dtype, layout, device, seed=0)
    b = make(shapes[1], dtype, layout, device, seed=1)
    x, y, _, _ = check_against_oracle(a, b)
    if layout == "channels_last":  # a's layout carries over to both outputs, no copy to NCHW
        assert x.is_contiguous(memory_format=torch.channels_last) and y.stride() == x.stride()


def test_float32_matches_reference_closely():
    """fp32: x exact, y and the gradients within a few ulp of the reference (only the exp differs)."""
    a, b = make((2, 5, 3, 3), torch.float32, seed=2), make((2, 4, 3, 3), torch.float32, seed=3)
    for got, want in zip(run("cuda", a, b), run("reference", a, b)):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_cpu_instruction_sets(ext, isa):
    """The fused CPU rows are compiled for SSE2, AVX2 and AVX-512; each variant this CPU runs is right,
    on rows long enough to take the vector loops and their remainders."""
    e = ext._EXT
    prev = e.cpu_isa()
    if not e._set_cpu_isa(isa):
        pytest.skip(f"this CPU does not run the {isa} variant")
    try:
        for dtype in DTYPES:
            for use in (("x", "y"), ("x",), ("y",)):
                a, b = make((2, 5, 7, 9), dtype, seed=10), make((2, 3, 7, 9), dtype, seed=11)
                check_against_oracle(a, b, use=use)
    finally:
        e._set_cpu_isa(prev)


@pytest.mark.parametrize("use", [("x",), ("y",)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_only_one_output_used(use, dtype):
    a, b = make((2, 3, 4, 4), dtype, seed=4), make((2, 5, 4, 4), dtype, seed=5)
    check_against_oracle(a, b, use=use)


@pytest.mark.parametrize("use", [("x",), ("y",), ("x", "y")], ids=str)
def test_unused_output_costs_nothing(use):
    """One backward launch and no zeros for the unused output, nor an autograd gradient sum."""
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 5, 4, 4, requires_grad=True)
    with mk.use_backend("cuda", strict=True):
        x, y = mk.mp_cat_mp_silu(a, b, dim=1, t=0.5)
    outs = [o for name, o in (("x", x), ("y", y)) if name in use]
    counter = OpCounter()
    with counter:
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    ops = [o for o in counter.ops if o != "aten.ones_like"]
    assert ops == ["mpkernels.cuda_mp_cat_mp_silu_backward"], ops


@pytest.mark.parametrize("dim", [0, 2, 3, -1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_dim(dim, dtype):
    shape_a, shape_b = [2, 3, 5, 4], [2, 3, 5, 4]
    shape_b[dim] = 6
    check_against_oracle(make(tuple(shape_a), dtype, seed=6), make(tuple(shape_b), dtype, seed=7), dim=dim, t=0.7)


def test_other_ranks_and_mixed_layouts():
    check_against_oracle(torch.randn(4, 5), torch.randn(4, 3), t=0.5)
    check_against_oracle(torch.randn(3, 4, 6), torch.randn(3, 2, 6), dim=1, t=0.5)
    a = make((2, 6, 3, 3), torch.float32, "channels_last")
    b = make((2, 2, 3, 3), torch.float32, "nchw", seed=5)  # b is brought to a's layout
    x, y, ga, gb = check_against_oracle(a, b, t=0.4)  # the outputs take a's layout (mp_cat's rule)
    assert x.is_contiguous(memory_format=torch.channels_last) and y.stride() == x.stride()
    assert ga.stride() == a.stride()


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_extreme_blend(t):
    """t = 0 or 1 weighs one input by zero: its gradient is exactly zero."""
    a, b = make((2, 3, 2, 2), torch.float32, seed=8), make((2, 4, 2, 2), torch.float32, seed=9)
    _, _, ga, gb = check_against_oracle(a, b, t=t)
    assert not (gb if t == 0.0 else ga).any()


def test_errors(ext):
    e = ext._EXT
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="a: expected 2 dims"):
        e.mp_cat_silu_fwd(torch.zeros(2, 3, 4), torch.zeros(2, 3), 1.0, 1.0)
    with pytest.raises(TypeError, match="b: dtype"):
        e.mp_cat_silu_fwd(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16), 1.0, 1.0)
    with pytest.raises(ValueError, match="b: has 3 rows"):
        e.mp_cat_silu_fwd(torch.zeros(2, 3), torch.zeros(3, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="cb: must be finite"):
        e.mp_cat_silu_fwd(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, float("inf"))
    with pytest.raises(ValueError, match="ka: must be in"):
        e.mp_cat_silu_bwd(x, None, x, 9, 1.0, 1.0)
    with pytest.raises(ValueError, match="grad_y: shape"):
        e.mp_cat_silu_bwd(None, torch.zeros(2, 7), x, 3, 1.0, 1.0)
    with pytest.raises(TypeError, match="grad_x: dtype"):
        e.mp_cat_silu_bwd(x.half(), None, x, 3, 1.0, 1.0)
    with pytest.raises(TypeError, match="x: unsupported dtype"):
        e.mp_cat_silu_bwd(None, None, x.double(), 3, 1.0, 1.0)
    da, db = e.mp_cat_silu_bwd(None, None, x, 3, 1.0, 1.0)  # no gradient at all: zeros
    assert da.shape == (2, 3) and db.shape == (2, 5) and not da.any() and not db.any()
    # The public op names the argument; float64 is not the extension's (strict refuses it).
    a = torch.zeros(2, 3, 4, 4)
    with mk.use_backend("cuda", strict=True), pytest.raises(ValueError, match="^b: shape"):
        mk.mp_cat_mp_silu(a, torch.zeros(2, 3, 4, 2))
    with mk.use_backend("cuda", strict=True), pytest.raises(mk.BackendUnavailableError):
        mk.mp_cat_mp_silu(a.double(), a.double())
    with mk.use_backend("cuda"):
        assert mk.mp_cat_mp_silu(a.double(), a.double())[1].dtype == torch.float64


def test_compile_fullgraph_matches_eager():
    a, b = make((2, 3, 4, 4), torch.float32, "channels_last", seed=1), make((2, 5, 4, 4), torch.float32, seed=2)

    def step(a, b):
        x, y = mk.mp_cat_mp_silu(a, b, dim=1, t=0.3)
        return (x * 0.5).sum() + y.square().sum()

    def grads(fn):
        xs = [t.detach().clone().requires_grad_() for t in (a, b)]
        with mk.use_backend("cuda", strict=True):
            loss = fn(*xs)
        loss.backward()
        return loss.detach(), [x.grad for x in xs]

    torch._dynamo.reset()
    loss_e, g_e = grads(step)
    loss_c, g_c = grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(loss_c, loss_e)
    for x, y in zip(g_c, g_e):
        torch.testing.assert_close(x, y)


class OpCounter(TorchDispatchMode):
    """Aten and custom ops that move data (what the benchmark's accounting counts as launches)."""
    FREE = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like, torch.ops.aten.detach}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False) and func.overloadpacket not in self.FREE:
            self.ops.append(str(func.overloadpacket))
        return out


@pytest.mark.parametrize("mem", ["nchw", "channels_last"])
def test_meta_accounting_one_launch_each_way(mem):
    """Under simulate('cuda'): one fused op forward, one backward, no aten.add of the two gradients."""
    a = torch.empty(8, 256, 16, 16, device="meta", dtype=torch.bfloat16)
    b = torch.empty(8, 128, 16, 16, device="meta", dtype=torch.bfloat16)
    if mem == "channels_last":
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    a.requires_grad_()
    b.requires_grad_()
    counter = OpCounter()
    with _dispatch.simulate("cuda"), counter:
        x, y = mk.mp_cat_mp_silu(a, b, dim=1, t=0.5)
        torch.autograd.backward([x, y], [torch.empty_like(x), torch.empty_like(y)])
    assert counter.ops == ["mpkernels.cuda_mp_cat_mp_silu", "mpkernels.cuda_mp_cat_mp_silu_backward"], counter.ops
    assert x.stride() == y.stride() and a.grad.stride() == a.stride() and b.grad.stride() == b.stride()
