"""Triton backend: forward and backward parity of every op against the fp64 reference.

On a GPU machine the kernels run on CUDA tensors; without one they run under
``TRITON_INTERPRET=1`` (set by conftest) on CPU tensors (``conftest.kernel_device``).
Each case runs the op three ways: the reference in float64 (the oracle, on exactly the
rounded inputs), the reference in the low dtype (eager PyTorch's own error, the yardstick),
and the Triton backend in strict mode (a silent fallback to the reference fails). The
Triton error may be at most twice eager's plus a small floor (STYLE.md).

Every launch is recorded and checked against the configurations the backend declares
(``mpkernels.triton.all_configs()``), which is the list the AOT test compiles.
"""

from __future__ import annotations

import math

import pytest
import torch

import mpkernels as mk
from conftest import DTYPES, assert_close_to_oracle, kernel_device, require_backend

triton_mod = pytest.importorskip("mpkernels.triton")
require_backend("triton")
DEV = kernel_device()

@pytest.fixture(autouse=True)
def launches(declared_triton_launches):
    """Every kernel launch of the test; after it, each must be a declared configuration."""
    return declared_triton_launches


# --- harness ---------------------------------------------------------------------------------

def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` (same values) as NCHW-contiguous, channels_last, or a non-contiguous slice."""
    if kind == "nchw" or t.ndim != 4:
        return t.contiguous()
    if kind == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    assert kind == "slice"
    n, c, h, w = t.shape
    big = torch.zeros((n, c + 2, h, w + 3), dtype=t.dtype, device=t.device)
    out = big[:, 1:c + 1, :, 2:w + 2]
    out.copy_(t)
    assert not out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)
    return out


def _outputs(y):
    return list(y) if isinstance(y, (tuple, list)) else [y]


def run_op(fn, args, backend, *, strict=False, grads_out=None):
    """Run ``fn(*args)`` on ``backend``; backprop ``grads_out`` (one per output) if given.

    Returns (outputs, grads of the tensor args that require grad)."""
    with mk.use_backend(backend, strict=strict):
        outs = _outputs(fn(*args))
        if grads_out is not None:
            loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, grads_out))
            loss.backward()
    grads = [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return [o.detach() for o in outs], grads


def check_op(fn, make_args, dtype, *, grad=True, factor=2.0, seed=0, out_dtype=None):
    """Parity of ``fn`` on args built by ``make_args(dtype) -> list`` (tensors get requires_grad).

    ``make_args`` is called with the low dtype; the oracle runs on float64 copies of exactly
    those (rounded) values; each backend gets its own fresh leaf copies."""
    torch.manual_seed(seed)
    base = make_args(dtype)

    def leaves(cast):
        out = []
        for a in base:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                t = cast(a)
                out.append(t.detach().clone().requires_grad_(grad and a.requires_grad))
            else:
                out.append(a)
        return out

    def as_double(a):
        return a.detach().double()

    def same(a):
        return layout_like(a.detach(), a)

    oracle_args = leaves(as_double)
    with mk.use_backend("reference"):
        probe = _outputs(fn(*leaves(same)))
    gens = torch.Generator().manual_seed(seed + 1)
    grads_out = ([torch.randn(p.shape, generator=gens, dtype=torch.float64).to(p.dtype).to(p.device) for p in probe]
                 if grad else None)
    oracle_out, oracle_g = run_op(fn, oracle_args, "reference", grads_out=grads_out)
    eager_out, eager_g = run_op(fn, leaves(same), "reference", grads_out=grads_out)
    tri_out, tri_g = run_op(fn, leaves(same), "triton", strict=True, grads_out=grads_out)
    for i, (t, o, e) in enumerate(zip(tri_out, oracle_out, eager_out)):
        assert t.dtype == e.dtype, f"output {i}: dtype {t.dtype} != reference {e.dtype}"
        assert_close_to_oracle(t, o, e, factor=factor, name=f"output {i}")
    if grad:
        assert len(tri_g) == len(oracle_g)
        for i, (t, o, e) in enumerate(zip(tri_g, oracle_g, eager_g)):
            assert t is not None, f"grad {i}: missing"
            assert t.dtype == e.dtype, f"grad {i}: dtype {t.dtype} != reference {e.dtype}"
            assert_close_to_oracle(t, o, e, factor=factor, name=f"grad {i}")
    return tri_out, tri_g


def layout_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of ``values`` with the strides of ``like`` (slices stay slices)."""
    if like.is_contiguous() or values.ndim != 4:
        return values.clone()
    if like.is_contiguous(memory_format=torch.channels_last):
        return values.clone().contiguous(memory_format=torch.channels_last)
    return layout(values.contiguous(), "slice")


def rand(shape, dtype, kind="nchw", scale=1.0, requires_grad=True):
    """Random values drawn on CPU (the same on every machine), on the kernel device in ``kind``'s layout."""
    t = layout((torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(DEV), kind)
    t.requires_grad_(requires_grad)
    return t


# Odd channel counts, 1x1 / 7x7 / 8x8 / 16x16 pixels, batch 1 and 3, three layouts.
CASES = [
    ((1, 3, 1, 1), "nchw"),
    ((3, 5, 7, 7), "nchw"),
    ((3, 5, 7, 7), "cl"),
    ((3, 5, 7, 7), "slice"),
    ((1, 192, 8, 8), "nchw"),
    ((1, 192, 8, 8), "cl"),
    ((3, 5, 16, 16), "cl"),
    ((3, 192, 16, 16), "nchw"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{k}" for s, k in CASES]


# --- element-wise and normalization ops -----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=CASE_IDS)
def test_mp_silu(shape, kind, dtype):
    check_op(mk.mp_silu, lambda d: [rand(shape, d, kind, 2.0)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=CASE_IDS)
def test_pixel_norm(shape, kind, dtype):
    check_op(lambda x: mk.pixel_norm(x), lambda d: [rand(shape, d, kind, 3.0)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=CASE_IDS)
def test_pixel_norm_mp_silu(shape, kind, dtype):
    check_op(lambda x: mk.pixel_norm_mp_silu(x), lambda d: [rand(shape, d, kind, 3.0)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [None, 1, (2, 3), (1, 3), -1], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "cl", "slice"])
def test_normalize_dims(kind, dim, dtype):
    check_op(lambda x: mk.normalize(x, dim=dim, eps=1e-3), lambda d: [rand((3, 5, 4, 6), d, kind, 2.0)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 3000), (6, 1024), (2, 7)], ids=str)
def test_normalize_rows(shape, dtype):
    """Rows longer than one block (two passes over each row) and shorter than one."""
    check_op(lambda x: mk.normalize(x), lambda d: [rand(shape, d)], dtype)


def test_normalize_zero_rows():
    """All-zero rows: finite output and a zero gradient, as in PyTorch."""
    x = torch.zeros(2, 8, 3, 3, device=DEV, requires_grad=True)
    with mk.use_backend("triton", strict=True):
        y = mk.pixel_norm(x)
        y.sum().backward()
    assert torch.isfinite(y).all() and (y == 0).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=CASE_IDS)
def test_mp_sum(shape, kind, dtype):
    check_op(lambda a, b: mk.mp_sum(a, b, 0.3), lambda d: [rand(shape, d, kind), rand(shape, d)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=CASE_IDS)
def test_mp_sum_clip(shape, kind, dtype):
    # clip well inside the range of the values, so the mask matters; 0.7 is not representable,
    # so no rounded sum sits exactly on the bound.
    check_op(lambda a, b: mk.mp_sum_clip(a, b, 0.3, 0.7), lambda d: [rand(shape, d, kind), rand(shape, d, kind)],
             dtype)


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_mp_sum_endpoints(t):
    check_op(lambda a, b: mk.mp_sum(a, b, t), lambda d: [rand((2, 3, 4, 4), d), rand((2, 3, 4, 4), d)],
             torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=CASE_IDS)
def test_mp_cat(shape, kind, dtype):
    n, c, h, w = shape
    check_op(lambda a, b: mk.mp_cat(a, b, dim=1, t=0.3),
             lambda d: [rand(shape, d, kind), rand((n, c + 2, h, w), d, kind)], dtype)


@pytest.mark.parametrize("dim", [0, 2, -1])
def test_mp_cat_other_dims(dim):
    check_op(lambda a, b: mk.mp_cat(a, b, dim=dim, t=0.6),
             lambda d: [rand((2, 3, 4, 5), d, "cl"), rand((2, 3, 4, 5), d)], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=CASE_IDS)
def test_modulated_mp_silu(shape, kind, dtype):
    check_op(mk.modulated_mp_silu, lambda d: [rand(shape, d, kind, 2.0), rand(shape[:2], d)], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_modulated_mp_silu_fp32_modulation(dtype):
    """``c`` in fp32 with a low-precision ``y``: ``dc`` comes back in fp32."""
    _, grads = check_op(mk.modulated_mp_silu, lambda d: [rand((2, 6, 5, 5), d, "cl"),
                                                         rand((2, 6), torch.float32)], dtype)
    assert grads[1].dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["down", "up"])
@pytest.mark.parametrize("shape,kind", [((1, 3, 2, 2), "nchw"), ((3, 5, 8, 6), "cl"), ((3, 5, 8, 8), "slice"),
                                        ((1, 192, 16, 16), "nchw"), ((1, 192, 16, 16), "cl")],
                         ids=["1x3x2x2-nchw", "3x5x8x6-cl", "3x5x8x8-slice", "1x192x16x16-nchw", "1x192x16x16-cl"])
def test_resample(shape, kind, mode, dtype):
    out, _ = check_op(lambda x: mk.resample(x, mode), lambda d: [rand(shape, d, kind)], dtype)
    if kind == "cl":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


def test_resample_keep_is_identity():
    x = torch.randn(1, 2, 3, 3, device=DEV)
    with mk.use_backend("triton", strict=True):
        assert mk.resample(x, "keep") is x


@pytest.mark.parametrize("shape,kind", [((2, 6, 5, 5), "nchw"), ((2, 6, 5, 5), "cl")])
def test_layouts_preserved(shape, kind):
    """Element-wise ops return the input's layout (no hidden conversion to NCHW)."""
    x = rand(shape, torch.float32, kind, requires_grad=False)
    with mk.use_backend("triton", strict=True):
        for y in (mk.mp_silu(x), mk.pixel_norm(x), mk.mp_sum(x, x, 0.5), mk.pixel_norm_mp_silu(x)[1],
                  mk.modulated_mp_silu(x, torch.ones(shape[:2], device=DEV))):
            assert y.stride() == x.stride()


# --- weights and layers -----------------------------------------------------------------------

WEIGHT_SHAPES = [((4, 3, 3, 3), "nchw"), ((4, 3, 3, 3), "cl"), ((192, 5, 1, 1), "nchw"), ((7, 20), "nchw"),
                 ((3, 1200), "nchw"), ((5, 130, 3, 3), "cl"), ((6, 4, 3, 3), "slice")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", WEIGHT_SHAPES, ids=[f"{s}-{k}" for s, k in WEIGHT_SHAPES])
@pytest.mark.parametrize("gain", ["float", "tensor"])
def test_mp_weight(shape, kind, gain, dtype):
    def make(d):
        g = 1.3 if gain == "float" else torch.tensor(0.7, dtype=torch.float32, device=DEV, requires_grad=True)
        return [rand(shape, d, kind), g]
    out, _ = check_op(lambda w, g: mk.mp_weight(w, g), make, dtype)
    if kind == "cl":  # a channels_last weight gives a channels_last effective weight, without a copy
        assert out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["nchw", "cl", "slice"])
@pytest.mark.parametrize("k", [1, 3])
def test_mp_conv2d(k, kind, dtype):
    def make(d):
        return [rand((2, 5, 6, 6), d, kind), rand((4, 5, k, k), torch.float32, "cl" if kind == "cl" else "nchw"),
                torch.tensor(0.8, device=DEV, requires_grad=True)]
    out, _ = check_op(mk.mp_conv2d, make, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("xshape", [(3, 20), (2, 3, 20)], ids=str)
def test_mp_linear(xshape, dtype):
    check_op(lambda x, w: mk.mp_linear(x, w, 1.7), lambda d: [rand(xshape, d), rand((6, 20), torch.float32)],
             dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mp_fourier(dtype):
    freqs = (2 * math.pi * torch.randn(17)).to(DEV)
    phases = (2 * math.pi * torch.rand(17)).to(DEV)
    check_op(lambda x: mk.mp_fourier(x, freqs, phases), lambda d: [rand((5,), d, scale=0.5)], dtype)


# --- attention ---------------------------------------------------------------------------------

# (N, C, heads, H, W, layout): head dims 16/32/64/128, L from 1 to 256, aligned and odd sizes.
ATTN_CASES = [
    (2, 32, 2, 8, 8, "nchw"),     # D=16, L=64 (aligned path)
    (1, 64, 1, 7, 7, "cl"),       # D=64, L=49 (odd path)
    (1, 256, 2, 4, 4, "nchw"),    # D=128, L=16
    (2, 96, 3, 3, 5, "slice"),    # D=32, L=15, copied to contiguous
    (1, 128, 2, 16, 16, "cl"),    # D=64, L=256: several key and query blocks
    (1, 64, 2, 1, 1, "nchw"),     # L=1
    (3, 48, 1, 5, 5, "nchw"),     # D=48 (padded head dim), batch 3
]
# fp32 runs 16x16 tiles: L=256 is slow in the interpreter (multi-block fp32 is covered by L=64).
ATTN_PARAMS = [pytest.param(c, d, marks=[pytest.mark.slow] if (d == torch.float32 and c[3] * c[4] > 64) else [],
                            id="-".join(map(str, c)) + f"-{d}") for c in ATTN_CASES for d in DTYPES]


@pytest.mark.parametrize("case,dtype", ATTN_PARAMS)
def test_cosine_attention(case, dtype):
    n, c, heads, h, w, kind = case
    out, _ = check_op(lambda q: mk.cosine_attention(q, heads), lambda d: [rand((n, 3 * c, h, w), d, kind, 2.0)],
                      dtype)
    if kind == "cl":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


def test_cosine_attention_saves_no_matrix():
    """Backward keeps O(L) statistics, not the L x L attention matrix."""
    qkv = rand((1, 3 * 32, 16, 16), torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with mk.use_backend("triton", strict=True), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mk.cosine_attention(qkv, 2)
    L = 256
    assert saved and all(t.numel() < L * L for t in saved), [tuple(t.shape) for t in saved]


# --- multi-tensor in-place ops ---------------------------------------------------------------------

def _weights(dtypes):
    shapes = [(4, 3, 3, 3), (7, 20), (3, 1200), (2, 5, 1, 1), (1, 9)]
    out = []
    for i, s in enumerate(shapes):
        out.append((torch.randn(s, dtype=torch.float64) * (i + 1)).to(dtypes[i % len(dtypes)]))
    out.append(torch.randn(6, 8, dtype=torch.float64).to(dtypes[0]).t())  # rows not contiguous: reference path
    out.append(torch.randn(5, 4, 3, 3, dtype=torch.float64).to(dtypes[-1]).contiguous(
        memory_format=torch.channels_last))  # rows contiguous in another order: kernel path
    return [w.to(DEV) for w in out]  # .to keeps strides (transposed and channels_last stay so)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["fp32", "mixed"])
def test_force_normalize_(dtypes, launches):
    torch.manual_seed(0)
    ws = _weights(dtypes)
    oracle = [mk.reference.normalize(w.double()).to(w.dtype) for w in ws]
    eager = [w.clone() for w in ws]
    mk.reference.force_normalize_(eager)
    mine = [w.clone() for w in ws]
    with mk.use_backend("triton", strict=True):
        mk.force_normalize_(mine, eps=1e-4)
    for i, (m, o, e) in enumerate(zip(mine, oracle, eager)):
        assert m.stride() == ws[i].stride()
        assert_close_to_oracle(m, o, e, name=f"tensor {i}")
    assert len(launches) == len(set(dtypes))  # one launch per dtype, whatever the number of tensors


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["fp32", "mixed"])
def test_ema_lerp_(dtypes, launches):
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (7, 20), (40000,), (1,), (3, 1200)]
    ts = [torch.randn(s).to(dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]
    es = [torch.randn(s).to(dtypes[(i + 1) % len(dtypes)]) for i, s in enumerate(shapes)]
    es.append(torch.randn(6, 8).t())  # layouts differ: reference path
    ts.append(torch.randn(8, 6))
    es.append(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))  # same dense layout: kernel
    ts.append(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
    ts, es = [t.to(DEV) for t in ts], [e.to(DEV) for e in es]
    w = 0.0123
    oracle = [(e.double() + w * (t.double() - e.double())).to(e.dtype) for e, t in zip(es, ts)]
    eager = [e.clone() for e in es]
    mk.reference.ema_lerp_(eager, ts, w)
    mine = [e.clone() for e in es]
    with mk.use_backend("triton", strict=True):
        mk.ema_lerp_(mine, ts, w)
    for i, (m, o, e) in enumerate(zip(mine, oracle, eager)):
        assert_close_to_oracle(m, o, e, name=f"tensor {i}")
    assert len(launches) <= len(set(dtypes)) ** 2


def test_force_normalize_bumps_version():
    """Like ``copy_``, the in-place update is visible to autograd's saved-tensor check."""
    w = torch.randn(4, 6, device=DEV, requires_grad=True)
    x = torch.randn(3, 6, device=DEV)
    with mk.use_backend("triton", strict=True):
        y = mk.mp_linear(x, w)
        mk.force_normalize_([w])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# --- dispatch ---------------------------------------------------------------------------------------

def test_auto_never_picks_the_interpreter():
    from mpkernels._dispatch import implementation
    name, _ = implementation("mp_silu", (torch.randn(3),), backend="auto")
    assert name != "triton"  # other backends (e.g. compiled CPU kernels) may serve CPU tensors


def test_float64_falls_back_to_reference():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEV)
    with mk.use_backend("triton"):
        y = mk.pixel_norm(x)
    torch.testing.assert_close(y, mk.reference.pixel_norm(x))
    with mk.use_backend("triton", strict=True), pytest.raises(mk.BackendUnavailableError):
        mk.pixel_norm(x)


def test_every_op_is_registered():
    from mpkernels import _dispatch
    from mpkernels.functional import __all__ as ops
    missing = [op for op in ops if ("triton" not in [b for (o, b) in _dispatch._IMPLS if o == op])]
    assert not missing


# --- mp_cat_mp_silu (decoder Block input: cat and MP-SiLU fused) ---------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=CASE_IDS)
def test_mp_cat_mp_silu(shape, kind, dtype):
    n, c, h, w = shape
    check_op(lambda a, b: mk.mp_cat_mp_silu(a, b, dim=1, t=0.3),
             lambda d: [rand(shape, d, kind, 2.0), rand((n, c + 2, h, w), d, kind, 2.0)], dtype)


@pytest.mark.parametrize("dim", [0, 2, -1])
def test_mp_cat_mp_silu_other_dims(dim):
    check_op(lambda a, b: mk.mp_cat_mp_silu(a, b, dim=dim, t=0.6),
             lambda d: [rand((2, 3, 4, 5), d, "cl"), rand((2, 3, 4, 5), d)], torch.float32)


@pytest.mark.parametrize("which", [0, 1])
def test_mp_cat_mp_silu_one_output_used(which):
    """Only ``x`` or only ``y`` reaches the loss: the other gradient is absent (kernel flag), not zeros."""
    check_op(lambda a, b: mk.mp_cat_mp_silu(a, b, dim=1, t=0.5)[which],
             lambda d: [rand((2, 3, 4, 4), d, "cl"), rand((2, 5, 4, 4), d, "cl")], torch.bfloat16)
