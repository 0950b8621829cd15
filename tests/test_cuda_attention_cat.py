"""Backend 'cuda': ``cosine_attention`` (extension normalization + PyTorch's fused attention) and
``mp_cat`` (one extension kernel each way) against the reference, forward and backward.

Runs the C++ twins on CPU tensors (and the CUDA kernels where a GPU is present). Error rule of
STYLE.md: max error against a float64 oracle at most twice eager PyTorch's at the same dtype, plus
a small floor (``conftest.assert_close_to_oracle``). ``strict=True`` makes sure the extension ran.
Launch accounting on the meta device under ``simulate('cuda')`` counts what a GPU would launch.
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
LAYOUTS = ["nchw", "channels_last", "sliced", "transposed"]


@pytest.fixture(scope="module", autouse=True)
def ext(cuda_backend):
    return cuda_backend


def make(shape, dtype, layout="nchw", device="cpu", seed=0, scale=1.0):
    """A 4-d tensor of `shape` in `layout`; values exactly representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "sliced":  # not dense: every other column of a wider tensor
        return (torch.randn(n, c, h, 2 * w, generator=g) * scale).to(dtype).to(device)[..., ::2]
    if layout == "transposed":  # dense, H and W swapped in memory (spatial dims do not collapse)
        return (torch.randn(n, c, w, h, generator=g) * scale).to(dtype).to(device).transpose(2, 3)
    x = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def strict(fn):
    def call(*args):
        with mk.use_backend("cuda", strict=True):
            return fn(*args)
    return call


def check_against_oracle(op, inputs, factor=2.0):
    """Output and input gradients of ``op`` on backend 'cuda' vs the float64 reference, judged by eager."""
    def run(backend, xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        with mk.use_backend(backend, strict=backend != "reference"):
            out = op(*xs)
        return xs, out

    xs_o, out_o = run("cuda", inputs)
    xs_e, out_e = run("reference", inputs)
    xs_r, out_r = run("reference", [x.double() for x in inputs])
    assert out_o.dtype == out_e.dtype and out_o.shape == out_e.shape
    assert_close_to_oracle(out_o.detach(), out_r.detach(), out_e.detach(), factor=factor, name="output")
    grad = torch.randn(out_e.shape, generator=torch.Generator().manual_seed(1)).to(out_e.dtype).to(out_e.device)
    for out, g in ((out_o, grad), (out_e, grad), (out_r, grad.double())):
        out.backward(g)
    for i, (a, e, r) in enumerate(zip(xs_o, xs_e, xs_r)):
        assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape
        assert_close_to_oracle(a.grad, r.grad, e.grad, factor=factor, name=f"grad of input {i}")
    return out_o, xs_o


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


# --- mp_cat --------------------------------------------------------------------------------------

CAT_SHAPES = [((2, 3, 5, 5), (2, 7, 5, 5)), ((1, 8, 4, 4), (1, 16, 4, 4)), ((3, 1, 1, 1), (3, 2, 1, 1))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shapes", CAT_SHAPES, ids=str)
def test_mp_cat_matches_reference_exactly(shapes, layout, dtype, device):
    """One rounding of x * coefficient, as the reference's scalar multiply: bit-identical."""
    a = make(shapes[0], dtype, layout, device, seed=0)
    b = make(shapes[1], dtype, layout, device, seed=1)
    out_o, (ga_o, gb_o) = _cat_with_grads("cuda", a, b, dim=1, t=0.3)
    out_r, (ga_r, gb_r) = _cat_with_grads("reference", a, b, dim=1, t=0.3)
    assert torch.equal(out_o, out_r)
    assert torch.equal(ga_o, ga_r) and torch.equal(gb_o, gb_r)
    if layout == "channels_last":  # a's layout carries over, no copy back to NCHW
        assert out_o.is_contiguous(memory_format=torch.channels_last)


def _cat_with_grads(backend, a, b, dim, t):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with mk.use_backend(backend, strict=backend != "reference"):
        out = mk.mp_cat(a, b, dim=dim, t=t)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype).to(out.device)
    out.backward(g)
    return out.detach(), (a.grad, b.grad)


@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mp_cat_any_dim(dim, dtype):
    shape_a, shape_b = [2, 3, 5, 4], [2, 3, 5, 4]
    shape_b[dim] = 6
    a, b = make(tuple(shape_a), dtype, seed=3), make(tuple(shape_b), dtype, seed=4)
    out_o, grads_o = _cat_with_grads("cuda", a, b, dim=dim, t=0.7)
    out_r, grads_r = _cat_with_grads("reference", a, b, dim=dim, t=0.7)
    assert torch.equal(out_o, out_r)
    assert all(torch.equal(x, y) for x, y in zip(grads_o, grads_r))


def test_mp_cat_other_ranks_and_mixed_layouts():
    a = torch.randn(4, 5)
    b = torch.randn(4, 3)
    out_o, _ = _cat_with_grads("cuda", a, b, dim=1, t=0.5)
    assert torch.equal(out_o, R.mp_cat(a, b, 1, 0.5))
    a = make((2, 6, 3, 3), torch.float32, "channels_last")
    b = make((2, 2, 3, 3), torch.float32, "nchw", seed=5)  # b is brought to a's layout
    out_o, grads_o = _cat_with_grads("cuda", a, b, dim=1, t=0.4)
    out_r, grads_r = _cat_with_grads("reference", a, b, dim=1, t=0.4)
    assert torch.equal(out_o, out_r) and all(torch.equal(x, y) for x, y in zip(grads_o, grads_r))


def test_mp_cat_errors(ext):
    e = ext._EXT
    with pytest.raises(ValueError, match="a: expected 2 dims"):
        e.mp_cat_fwd(torch.zeros(2, 3, 4), torch.zeros(2, 3), 1.0, 1.0)
    with pytest.raises(TypeError, match="b: dtype"):
        e.mp_cat_fwd(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16), 1.0, 1.0)
    with pytest.raises(ValueError, match="b: has 3 rows"):
        e.mp_cat_fwd(torch.zeros(2, 3), torch.zeros(3, 3), 1.0, 1.0)
    with pytest.raises(TypeError, match="a: unsupported dtype"):
        e.mp_cat_fwd(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), 1.0, 1.0)
    with pytest.raises(ValueError, match="ka: must be in"):
        e.mp_cat_bwd(torch.zeros(2, 3), 4, 1.0, 1.0)
    with pytest.raises(ValueError, match="ca: must be finite"):
        e.mp_cat_fwd(torch.zeros(2, 3), torch.zeros(2, 3), float("nan"), 1.0)
    # float64 is not the extension's: strict mode refuses, the default falls back to the reference
    a = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    with mk.use_backend("cuda", strict=True), pytest.raises(mk.BackendUnavailableError):
        mk.mp_cat(a, a)
    with mk.use_backend("cuda"):
        assert mk.mp_cat(a, a).dtype == torch.float64


# --- cosine attention ----------------------------------------------------------------------------

# (N, heads, D, H, W): odd D (5), one pixel, L = 49, several heads, a head dim that is a multiple of 8
ATT_CASES = [(2, 2, 8, 4, 4), (1, 1, 5, 3, 5), (2, 3, 4, 7, 7), (1, 2, 16, 1, 1), (2, 1, 32, 2, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["interleaved", "head_contiguous"])
@pytest.mark.parametrize("mem", LAYOUTS)
@pytest.mark.parametrize("case", ATT_CASES, ids=str)
def test_cosine_attention_matches_oracle(case, mem, layout, dtype, device):
    n, heads, d, h, w = case
    qkv = make((n, 3 * heads * d, h, w), dtype, mem, device, scale=2.0)
    out, _ = check_against_oracle(lambda x: mk.cosine_attention(x, heads, layout=layout), [qkv])
    if mem == "channels_last":  # SDPA's output memory is channels_last already: no copy
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif mem == "nchw":
        assert out.is_contiguous()


def test_cosine_attention_zero_and_scaled_vectors():
    """A zero q/k/v vector gives zero (no NaN) forward and backward, as the reference; scale invariance."""
    qkv = make((1, 12, 3, 3), torch.float32, seed=7)
    qkv[:, :, 1, 1] = 0.0
    check_against_oracle(lambda x: mk.cosine_attention(x, 2), [qkv])
    with mk.use_backend("cuda", strict=True):
        a = mk.cosine_attention(qkv, 2)
        b = mk.cosine_attention(qkv * 8.0, 2)  # normalization removes the scale (up to eps)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_normalize_backward_reads_gradient_strides(ext):
    """SDPA may hand out gradients that are views of one packed buffer: read them in place."""
    e = ext._EXT
    n, heads, d, h, w = 2, 2, 8, 3, 3
    qkv = make((n, 3 * heads * d, h, w), torch.float32)
    q, k, v, rms = e.qkv_normalize_fwd(qkv, heads, False, 1e-4)
    assert q.shape == (n, h * w, heads, d) and q.is_contiguous() and rms.shape == (3, n, h * w, heads)
    packed = torch.randn(n, h * w, 3, heads, d)  # like memory-efficient attention's packed grads
    gq, gk, gv = packed.unbind(2)
    assert not gq.is_contiguous()
    got = e.qkv_normalize_bwd(gq, gk, gv, qkv, rms, heads, False, 1e-4)
    want = e.qkv_normalize_bwd(gq.contiguous(), gk.contiguous(), gv.contiguous(), qkv, rms, heads, False, 1e-4)
    assert torch.equal(got, want)
    # and against autograd through the reference normalization
    x = qkv.detach().clone().requires_grad_()
    ref = R.normalize(x.reshape(n, heads, d, 3, h * w), dim=2).permute(3, 0, 4, 1, 2)  # [3, N, L, heads, D]
    torch.testing.assert_close(torch.stack([q, k, v]), ref.detach(), rtol=1e-5, atol=1e-6)
    ref.backward(torch.stack([gq, gk, gv]))
    torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-5)


def test_cosine_attention_errors(ext):
    e = ext._EXT
    qkv = torch.zeros(1, 12, 2, 2)
    with pytest.raises(ValueError, match="heads: 5 heads"):
        e.qkv_normalize_fwd(qkv, 5, False, 1e-4)
    with pytest.raises(ValueError, match="heads: must be positive"):
        e.qkv_normalize_fwd(qkv, 0, False, 1e-4)
    with pytest.raises(ValueError, match="qkv: expected 4 dims"):
        e.qkv_normalize_fwd(torch.zeros(12, 4), 2, False, 1e-4)
    with pytest.raises(TypeError, match="qkv: unsupported dtype"):
        e.qkv_normalize_fwd(qkv.double(), 2, False, 1e-4)
    with pytest.raises(ValueError, match="eps: must be finite"):
        e.qkv_normalize_fwd(qkv, 2, False, float("inf"))
    q, k, v, rms = e.qkv_normalize_fwd(qkv, 2, False, 1e-4)
    with pytest.raises(ValueError, match="grad_k: shape"):
        e.qkv_normalize_bwd(q, k[:, :1], v, qkv, rms, 2, False, 1e-4)
    with pytest.raises(TypeError, match="grad_v: dtype"):
        e.qkv_normalize_bwd(q, k, v.half(), qkv, rms, 2, False, 1e-4)
    with pytest.raises(ValueError, match="rms: has"):
        e.qkv_normalize_bwd(q, k, v, qkv, rms[:1], 2, False, 1e-4)
    with pytest.raises(ValueError, match="num_heads"):  # the public op's own validation still applies
        with mk.use_backend("cuda", strict=True):
            mk.cosine_attention(qkv, 5)


# --- torch.compile and launch accounting ---------------------------------------------------------

def test_compile_fullgraph_matches_eager():
    qkv = make((2, 24, 4, 4), torch.float32, "channels_last")
    a, b = make((2, 3, 4, 4), torch.float32, seed=1), make((2, 5, 4, 4), torch.float32, seed=2)

    def step(qkv, a, b):
        y = mk.cosine_attention(qkv, 2, layout="head_contiguous")
        return y.square().sum() + mk.mp_cat(a, b, dim=1, t=0.3).square().sum()

    def grads(fn):
        xs = [t.detach().clone().requires_grad_() for t in (qkv, a, b)]
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


@pytest.mark.parametrize("dtype, core", [(torch.bfloat16, "_scaled_dot_product_flash_attention"),
                                         (torch.float16, "_scaled_dot_product_flash_attention"),
                                         (torch.float32, "_scaled_dot_product_efficient_attention")], ids=str)
@pytest.mark.parametrize("mem", ["nchw", "channels_last"])
def test_meta_accounting_counts_gpu_launches(dtype, core, mem):
    qkv = torch.empty(4, 3 * 128, 16, 16, device="meta", dtype=dtype)
    if mem == "channels_last":
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    qkv.requires_grad_()
    counter = OpCounter()
    with _dispatch.simulate("cuda"), counter:
        y = mk.cosine_attention(qkv, 2, layout="head_contiguous")
        y.backward(torch.empty_like(y))
    ops = counter.ops
    assert len(ops) <= 6, ops
    assert ops[0] == "mpkernels.cuda_qkv_normalize" and ops[-1] == "mpkernels.cuda_qkv_normalize_backward", ops
    assert f"aten.{core}" in ops and f"aten.{core}_backward" in ops, ops
    assert len(ops) == (4 if mem == "channels_last" else 5), ops  # NCHW: one copy of the output
    assert qkv.grad.stride() == qkv.stride()


def test_meta_accounting_mp_cat_two_launches():
    a = torch.empty(8, 256, 16, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    b = torch.empty(8, 128, 16, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    counter = OpCounter()
    with _dispatch.simulate("cuda"), counter:
        y = mk.mp_cat(a, b, dim=1, t=0.5)
        y.backward(torch.empty_like(y))
    assert counter.ops == ["mpkernels.cuda_mp_cat", "mpkernels.cuda_mp_cat_backward"], counter.ops
