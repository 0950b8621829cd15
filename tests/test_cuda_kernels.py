"""Backend 'cuda' (the compiled extension) against the reference, forward and backward.

Every test runs on CPU (the C++ twins) and on CUDA (the CUDA kernels; skipped without a GPU,
with the reason). The error rule is STYLE.md's: the kernel's max error against a float64
oracle (the reference evaluated in float64) is at most twice eager PyTorch's at the same dtype,
plus a small floor (``conftest.assert_close_to_oracle``). ``strict=True`` makes sure the
extension really ran instead of a silent fallback to the reference.
"""

from __future__ import annotations

import pytest
import torch

import mpkernels as mk
from mpkernels import reference as R
from conftest import DTYPES, assert_close_to_oracle

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="CUDA kernels: no GPU here"))]
# C = 3, 5, 13, 192 and H*W = 1, 49, 64, 256 (more than one CPU pixel block), batch 1 too.
SHAPES = [(2, 3, 1, 1), (3, 5, 7, 7), (1, 13, 8, 8), (2, 192, 8, 8), (2, 3, 16, 16)]
LAYOUTS = ["nchw", "channels_last", "sliced", "transposed"]


@pytest.fixture(scope="module", autouse=True)
def ext(cuda_backend):
    return cuda_backend


def make(shape, dtype, layout="nchw", device="cpu", seed=0, scale=1.0):
    """A tensor of `shape` in `layout`; values exactly representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "sliced":  # not dense: every other column of a wider tensor
        base = torch.randn(n, c, h, 2 * w, generator=g) * scale
        return base.to(dtype).to(device)[..., ::2]
    if layout == "transposed":  # dense, but H and W swapped in memory (spatial dims do not collapse)
        return (torch.randn(n, c, w, h, generator=g) * scale).to(dtype).to(device).transpose(2, 3)
    x = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def run_case(op_ours, op_ref, inputs, grad_seed=1, factor=2.0, floor=None, names=None):
    """Forward outputs and input gradients of `op_ours` vs the float64 oracle, judged by eager."""
    def run(fn, xs):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
              for x in xs]
        outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return xs, outs

    xs_o, outs_o = run(op_ours, inputs)
    xs_e, outs_e = run(op_ref, inputs)
    xs_r, outs_r = run(op_ref, [x.double() if isinstance(x, torch.Tensor) else x for x in inputs])
    gen = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(o.shape, generator=gen).to(o.dtype).to(o.device) for o in outs_e]
    for i, (o, e, r) in enumerate(zip(outs_o, outs_e, outs_r)):
        assert o.dtype == e.dtype and o.shape == e.shape, f"output {i}: {o.dtype} {tuple(o.shape)}"
        assert_close_to_oracle(o.detach(), r.detach(), e.detach(), factor=factor, floor=floor, name=f"output {i}")
    for xs, outs, gs in ((xs_o, outs_o, grads), (xs_e, outs_e, grads), (xs_r, outs_r, [g.double() for g in grads])):
        torch.autograd.backward(list(outs), gs)
    for i, (a, e, r) in enumerate(zip(xs_o, xs_e, xs_r)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert a.grad is not None, f"input {i}: no gradient"
            assert a.grad.dtype == e.grad.dtype and a.grad.shape == a.shape
            assert_close_to_oracle(a.grad, r.grad, e.grad, factor=factor, floor=floor,
                                   name=f"grad of input {names[i] if names else i}")


def ours(fn):
    def call(*args):
        with mk.use_backend("cuda", strict=True):
            return fn(*args)
    return call


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
class TestPointwiseAndPixelOps:
    def test_mp_silu(self, dtype, shape, layout, device):
        x = make(shape, dtype, layout, device, scale=3.0)
        run_case(ours(mk.mp_silu), R.mp_silu, [x])

    def test_pixel_norm(self, dtype, shape, layout, device):
        x = make(shape, dtype, layout, device, scale=2.0)
        run_case(ours(lambda x: mk.pixel_norm(x, 1e-4)), lambda x: R.pixel_norm(x, 1e-4), [x])

    def test_pixel_norm_mp_silu(self, dtype, shape, layout, device):
        x = make(shape, dtype, layout, device, scale=2.0)
        run_case(ours(lambda x: mk.pixel_norm_mp_silu(x, 1e-4)), lambda x: R.pixel_norm_mp_silu(x, 1e-4), [x])

    def test_modulated_mp_silu(self, dtype, shape, layout, device):
        y = make(shape, dtype, layout, device, scale=2.0)
        c = make((shape[0], shape[1], 1, 1), torch.float32, "nchw", device, seed=3)[:, :, 0, 0] + 1
        run_case(ours(mk.modulated_mp_silu), R.modulated_mp_silu, [y, c], names=("y", "c"))

    def test_mp_sum_clip(self, dtype, shape, layout, device):
        a = make(shape, dtype, layout, device, scale=2.0)
        b = make(shape, dtype, "nchw", device, seed=5, scale=2.0)  # a layout different from a's, mostly
        # clip = 1.5 clips a good part of the values: both sides of the mask are exercised
        run_case(ours(lambda a, b: mk.mp_sum_clip(a, b, 0.3, 1.5)), lambda a, b: R.mp_sum_clip(a, b, 0.3, 1.5),
                 [a, b], names=("a", "b"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_mp_sum(dtype, t, device):
    a, b = make((2, 5, 7, 7), dtype, "channels_last", device), make((2, 5, 7, 7), dtype, "nchw", device, seed=2)
    run_case(ours(lambda a, b: mk.mp_sum(a, b, t)), lambda a, b: R.mp_sum(a, b, t), [a, b])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_modulated_mp_silu_mixed_dtype_and_strided_c(dtype, c_dtype, device):
    y = make((3, 13, 8, 8), dtype, "channels_last", device)
    c = (make((13, 3, 1, 1), c_dtype, "nchw", device, seed=4)[:, :, 0, 0] + 1).t()  # [N, C] with strides (1, N)
    assert not c.is_contiguous()
    run_case(ours(mk.modulated_mp_silu), R.modulated_mp_silu, [y, c], names=("y", "c"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pixel_norm_other_ranks(dtype, device):
    """pixel_norm works on any rank >= 2: [N, C] and [N, C, D, H, W]."""
    for shape in [(4, 13), (2, 5, 3, 4, 5)]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(dtype).to(device)
        run_case(ours(lambda x: mk.pixel_norm_mp_silu(x, 1e-4)), lambda x: R.pixel_norm_mp_silu(x, 1e-4), [x])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_many_channels(dtype, layout, device):
    """C = 1040: past the CUDA kernels' register / shared-memory caches (they re-read instead)."""
    x = make((2, 1040, 4, 4), dtype, layout, device, scale=2.0)
    c = torch.randn(2, 1040, generator=torch.Generator().manual_seed(1)).to(device) + 1
    run_case(ours(lambda x: mk.pixel_norm_mp_silu(x, 1e-4)), lambda x: R.pixel_norm_mp_silu(x, 1e-4), [x])
    run_case(ours(mk.modulated_mp_silu), R.modulated_mp_silu, [x, c], names=("y", "c"))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_pixels_and_only_one_output_used(device):
    """A zero pixel has gradient 0 (like PyTorch's norm); unused outputs get zero gradients."""
    x = make((2, 5, 4, 4), torch.float32, "nchw", device)
    x[0, :, 1, 1] = 0
    run_case(ours(lambda x: mk.pixel_norm(x, 1e-4)), lambda x: R.pixel_norm(x, 1e-4), [x])
    for pick in (0, 1):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        with mk.use_backend("cuda", strict=True):
            mk.pixel_norm_mp_silu(xa)[pick].sum().backward()
        R.pixel_norm_mp_silu(xb)[pick].sum().backward()
        assert_close_to_oracle(xa.grad, xb.grad.double(), floor=1e-5)


@pytest.mark.skipif(not HAS_GPU, reason="CUDA kernels: no GPU here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pixel_norm_nchw_split_channels(ext, dtype):
    """EDM2's 8x8 level at batch 32 (N=32, C=512): too few pixel tiles for the GPU, so the NCHW
    kernels split C over blocks (two phases, csrc/launch_shapes.h); forward and backward parity."""
    N, C, H, W = 32, 512, 8, 8
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    optin = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 2 * optin)
    budget = min(optin, per_sm // 2 - 2048)  # as csrc/cuda_common.cuh's device_info
    elem = torch.empty((), dtype=dtype).element_size()
    for forward in (True, False):
        plan = ext._EXT._plan_pixel_norm_nchw(N, C, H * W, 8, elem, props.multi_processor_count, budget, forward)
        assert plan["splits"] > 1, plan
    x = make((N, C, H, W), dtype, "nchw", "cuda", scale=2.0)
    run_case(ours(lambda x: mk.pixel_norm(x, 1e-4)), lambda x: R.pixel_norm(x, 1e-4), [x])
    run_case(ours(lambda x: mk.pixel_norm_mp_silu(x, 1e-4)), lambda x: R.pixel_norm_mp_silu(x, 1e-4), [x])


# ------------------------------------------------------------------------------------------------
# mp_weight

WEIGHTS = [(6, 5, 3, 3), (7, 13), (4, 3, 1, 1), (16, 8, 3, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", WEIGHTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gain", ["number", "tensor", "zero_tensor"])
def test_mp_weight(dtype, shape, gain, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(dtype).to(device)
    if len(shape) == 4 and shape[0] == 16:
        w = w.contiguous(memory_format=torch.channels_last)
    if gain == "number":
        run_case(ours(lambda w: mk.mp_weight(w, 0.7)), lambda w: R.mp_weight(w, 0.7), [w])
    else:
        gt = torch.full((), 0.0 if gain == "zero_tensor" else 0.7, device=device)
        run_case(ours(mk.mp_weight), R.mp_weight, [w, gt], names=("w", "gain"))


@pytest.mark.parametrize("device", DEVICES)
def test_mp_weight_transposed_and_conv(device):
    """A non-row-dense weight (transposed view) and the mp_conv2d / mp_linear wrappers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 7, generator=g).to(device).t()  # [7, 9] with strides (1, 7)
    run_case(ours(lambda w: mk.mp_weight(w, 1.3)), lambda w: R.mp_weight(w, 1.3), [w])
    x = torch.randn(2, 5, 6, 6, generator=g).to(device)
    wc = torch.randn(4, 5, 3, 3, generator=g).to(device)
    gain = torch.tensor(0.5, device=device)
    run_case(ours(mk.mp_conv2d), R.mp_conv2d, [x, wc, gain], names=("x", "w", "gain"), factor=4.0)
    xl = torch.randn(3, 5, generator=g).to(device)
    run_case(ours(mk.mp_linear), R.mp_linear, [xl, torch.randn(4, 5, generator=g).to(device), gain],
             names=("x", "w", "gain"), factor=4.0)


# ------------------------------------------------------------------------------------------------
# Multi-tensor ops

def weight_list(device):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return (torch.randn(shape, generator=g) * 3).to(dtype).to(device)

    return [
        r(6, 5, 3, 3),
        r(7, 13, dtype=torch.bfloat16),
        r(4, 3, 1, 1, dtype=torch.float16),
        r(64, 32, 3, 3).contiguous(memory_format=torch.channels_last),
        r(9, 4).t(),                      # not row-dense: goes through a dense copy
        r(1000, 8),                       # many rows
        r(3, 2048, dtype=torch.bfloat16),  # long rows
        r(2, 7, 1, 1, dtype=torch.float16),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_force_normalize_mixed_list(device):
    ts = weight_list(device)
    ours_ = [t.clone() for t in ts]
    eager = [t.clone() for t in ts]
    oracle = [t.double() for t in ts]
    with mk.use_backend("cuda", strict=True):
        mk.force_normalize_(ours_)
    R.force_normalize_(eager)
    R.force_normalize_(oracle)
    for i, (o, e, r) in enumerate(zip(ours_, eager, oracle)):
        assert o.dtype == ts[i].dtype and o.stride() == ts[i].stride()
        assert_close_to_oracle(o, r, e, name=f"tensors[{i}]")
    # the params are updated in place (same storage)
    p = torch.nn.Parameter(torch.randn(5, 4, device=device) * 3)
    ptr = p.data_ptr()
    with mk.use_backend("cuda", strict=True):
        mk.force_normalize_([p])
    assert p.data_ptr() == ptr and abs(float(p.detach().pow(2).mean()) - 1) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", [0.0, 0.0123, 0.37, 0.5, 0.9, 1.0])
def test_ema_lerp_mixed_list(device, weight):
    ts = weight_list(device)
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16,
              torch.float32, torch.float16]
    emas = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)).to(dt).to(device)
            for i, (t, dt) in enumerate(zip(ts, dtypes))]
    emas[3] = emas[3].contiguous(memory_format=torch.channels_last)
    emas[4] = torch.randn(9, 4, device=device).t()  # dense but transposed, like its source
    ts.append(torch.randn(6, 3, device=device, dtype=torch.bfloat16))
    emas.append(torch.randn(6, 3, device=device))

    def clone_into_view(e):  # the last one is updated through a non-dense view of a bigger tensor
        base = torch.zeros(e.shape[0], 2 * e.shape[1], dtype=e.dtype, device=device)
        base[:, ::2] = e
        return base, base[:, ::2]

    ours_ = [e.clone() for e in emas[:-1]]
    base, view = clone_into_view(emas[-1])
    ours_.append(view)
    eager = [e.clone() for e in emas]
    oracle = [e.double() for e in emas]
    with mk.use_backend("cuda", strict=True):
        mk.ema_lerp_(ours_, ts, weight)
    R.ema_lerp_(eager, ts, weight)
    R.ema_lerp_(oracle, [t.double() for t in ts], weight)
    for i, (o, e, r) in enumerate(zip(ours_, eager, oracle)):
        assert o.dtype == emas[i].dtype
        assert_close_to_oracle(o, r, e, name=f"ema_tensors[{i}]")
    assert torch.equal(base[:, 1::2], torch.zeros_like(base[:, 1::2]))  # nothing outside the view
    if weight == 1.0:  # exact at the end points, like torch.lerp
        for o, t in zip(ours_, ts):
            assert torch.equal(o, t.to(o.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_multi_tensor_many_tensors(device):
    """More tensors than one launch takes (64): every one is updated."""
    ts = [torch.randn(3 + i % 5, 4, device=device) * 2 for i in range(150)]
    src = [torch.randn_like(t) for t in ts]
    a = [t.clone() for t in ts]
    with mk.use_backend("cuda", strict=True):
        mk.force_normalize_(a)
        mk.ema_lerp_(a, src, 0.25)
    b = [t.clone() for t in ts]
    R.force_normalize_(b)
    R.ema_lerp_(b, src, 0.25)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_cpu_instruction_sets(ext, isa):
    """The CPU twins are compiled for SSE2, AVX2 and AVX-512; each variant this CPU runs is right."""
    e = ext._EXT
    prev = e.cpu_isa()
    if not e._set_cpu_isa(isa):
        pytest.skip(f"this CPU does not run the {isa} variant")
    try:
        for dtype in DTYPES:
            for layout in ("nchw", "channels_last"):
                x = make((2, 13, 8, 8), dtype, layout, scale=2.0)
                b = make((2, 13, 8, 8), dtype, "nchw", seed=4, scale=2.0)
                c = torch.randn(2, 13, generator=torch.Generator().manual_seed(2)) + 1
                run_case(ours(lambda x: mk.pixel_norm_mp_silu(x, 1e-4)), lambda x: R.pixel_norm_mp_silu(x, 1e-4), [x])
                run_case(ours(mk.modulated_mp_silu), R.modulated_mp_silu, [x, c])
                run_case(ours(lambda a, b: mk.mp_sum_clip(a, b, 0.3, 1.5)), lambda a, b: R.mp_sum_clip(a, b, 0.3, 1.5),
                         [x, b])
            run_case(ours(lambda w: mk.mp_weight(w, 0.7)), lambda w: R.mp_weight(w, 0.7),
                     [make((16, 8, 3, 3), dtype, "channels_last")])
        test_force_normalize_mixed_list("cpu")
        test_ema_lerp_mixed_list("cpu", 0.37)
    finally:
        e._set_cpu_isa(prev)


# ------------------------------------------------------------------------------------------------
# Dispatch, autograd plumbing, compile


def test_auto_picks_the_extension_and_falls_back():
    x = torch.randn(2, 3, 4, 4)
    assert "cuda" in mk.available_backends()
    with mk.use_backend("auto"):
        assert mk._dispatch.implementation("pixel_norm_mp_silu", (x, 1e-4))[0] == "cuda"
        assert mk._dispatch.implementation("pixel_norm_mp_silu", (x.double(), 1e-4))[0] == "reference"
    with mk.use_backend("cuda"):  # float64 is not the extension's: falls back, without strict
        xn, y = mk.pixel_norm_mp_silu(x.double())
        assert xn.dtype == torch.float64


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_float32_against_finite_differences():
    """A direct check of the backward formulas (not just agreement with the reference)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    c = torch.randn(2, 5, requires_grad=True)
    with mk.use_backend("cuda", strict=True):
        for fn, args in [(lambda x: mk.pixel_norm_mp_silu(x)[1], (x,)), (mk.modulated_mp_silu, (x, c))]:
            assert torch.autograd.gradcheck(fn, args, eps=1e-2, atol=5e-2, rtol=5e-2, nondet_tol=1e-5)


def test_in_place_updates_bump_versions():
    """force_normalize_ / ema_lerp_ declare what they mutate: autograd sees the in-place update."""
    w = torch.randn(4, 6, requires_grad=True)
    x = torch.randn(3, 6)
    with mk.use_backend("cuda", strict=True):
        y = mk.mp_linear(x, w)
        mk.force_normalize_([w])
        e = torch.zeros(4, 6)
        v = e._version
        mk.ema_lerp_([e], [w], 0.5)
        assert e._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _opcheck_cases():
    x = make((2, 13, 8, 8), torch.float32, "channels_last")
    xb = make((3, 5, 7, 7), torch.bfloat16, "sliced")
    c = torch.randn(2, 13) + 1
    w = torch.randn(6, 5, 3, 3)
    ops = torch.ops.mpkernels
    return [
        ("mp_silu", ops.cuda_mp_silu.default, (xb,)),
        ("pixel_norm", ops.cuda_pixel_norm.default, (x, 1e-4)),
        ("pixel_norm_mp_silu", ops.cuda_pixel_norm_mp_silu.default, (xb, 1e-4)),
        ("modulated_mp_silu", ops.cuda_modulated_mp_silu.default, (x, c)),
        ("mp_sum_clip", ops.cuda_mp_sum_clip.default, (x, make((2, 13, 8, 8), torch.float32, "nchw"), 0.3, 1.0)),
        ("mp_weight", ops.cuda_mp_weight.default, (w, 0.5, 1e-4)),
        ("mp_weight_tensor_gain", ops.cuda_mp_weight_tensor_gain.default, (w, torch.tensor(0.5), 1e-4)),
        ("force_normalize_", ops.cuda_force_normalize_.default, ([w.clone(), torch.randn(3, 4).bfloat16()], 1e-4)),
        ("ema_lerp_", ops.cuda_ema_lerp_.default, ([torch.zeros(3, 4)], [torch.randn(3, 4)], 0.3)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    """torch.library.opcheck: schema, fake (meta) functions with the real strides, autograd registration."""
    name, op, args = _opcheck_cases()[case]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and name not in ("force_normalize_", "ema_lerp_")
                 else a for a in args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph(backend):
    """The custom ops trace into one graph (no graph break) and give eager's values and grads."""
    torch._dynamo.reset()

    def block(x, c, a):
        xn, y = mk.pixel_norm_mp_silu(x)
        y = mk.modulated_mp_silu(y, c)
        return mk.mp_sum_clip(xn, y + a, 0.3, 2.0)

    x = make((2, 13, 8, 8), torch.float32, "channels_last").requires_grad_()
    c = torch.randn(2, 13, requires_grad=True)
    a = torch.randn(2, 13, 8, 8)
    with mk.use_backend("cuda", strict=True):
        fn = torch.compile(block, fullgraph=True, backend=backend)
        out = fn(x, c, a)
        out.square().sum().backward()
        gx, gc = x.grad.clone(), c.grad.clone()
        x.grad = c.grad = None
        ref = block(x, c, a)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gc, c.grad)
    assert out.stride() == ref.stride()


def test_compile_inplace_multi_tensor():
    torch._dynamo.reset()
    ws = [torch.randn(4, 3), torch.randn(5, 2, 3, 3)]
    es = [torch.zeros(4, 3), torch.zeros(5, 2, 3, 3, dtype=torch.bfloat16)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ws, es):
        mk.force_normalize_(ws)
        mk.ema_lerp_(es, ws, 0.5)

    ref_w = [w.clone() for w in ws]
    ref_e = [e.clone() for e in es]
    R.force_normalize_(ref_w)
    R.ema_lerp_(ref_e, ref_w, 0.5)
    with mk.use_backend("cuda", strict=True):
        step(ws, es)
    for a, b in zip(ws + es, ref_w + ref_e):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
