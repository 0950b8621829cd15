"""The CUDA extension's ``mp_weights`` (issue 10, item 2): all effective weights of a list in one
launch per output dtype group, their gradients in one more (plus one for the tensor gains).

On CPU the C++ twins run (same launchers, same per-row math); they are compared with the per-weight
``mk.mp_weight(w, gain, eps, qkv_heads=h).to(dtype)`` of the same backend for values and gradients
(weights and tensor gains), over mixed dtype groups, qkv rows, channels_last weights, a zero gain
and a list longer than one CUDA launch takes. Also: errors naming the argument, a
``torch.compile(fullgraph=True)`` trace, the ops counted on the meta device under
``simulate('cuda')`` (what a GPU launches), and the compiled kernels' SASS (the weight table read
in place from the kernel parameters). On a GPU the same comparisons run on CUDA tensors.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mpkernels as mk
from mpkernels import _dispatch
from mpkernels.cuda import _build

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="CUDA kernels: no GPU here"))]
EPS = 1e-4


@pytest.fixture(scope="module")
def ext(cuda_backend):
    ext = cuda_backend._EXT
    if not hasattr(ext, "mp_weights_fwd"):
        pytest.fail("the loaded extension has no mp_weights_fwd: it predates csrc/multi_weight*")
    return ext


def _cases(device, seed=0):
    """(weight, gain, qkv_heads, out dtype): odd row lengths, a 4-d qkv weight, channels_last,
    16-bit weights, number and tensor gains (0.0 and a [1]-shaped bf16 one), three dtype groups."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    def gain(v, dtype=torch.float32, shape=()):
        return torch.full(shape, v, dtype=dtype, device=device)

    cl = rnd(6, 5, 3, 3).to(memory_format=torch.channels_last)
    return [
        (rnd(8, 3, 3, 3), 1.0, None, torch.bfloat16),
        (rnd(12, 5), gain(0.7), None, torch.float32),
        (rnd(24, 8, 1, 1), 2.0, 2, torch.float16),          # qkv: 2 heads of D = 4
        (cl, gain(0.0), None, torch.bfloat16),               # zero gain: zero weight, finite gain grad
        (rnd(5, 9, dtype=torch.bfloat16), 0.5, None, torch.float32),
        (rnd(4, 16, dtype=torch.float16), gain(1.3, torch.bfloat16, (1,)), None, torch.bfloat16),
        (rnd(36, 40), gain(-0.4), 3, torch.bfloat16),        # qkv, vector path (40 % 8 == 0)
        (rnd(7, 1), 3.0, None, torch.float16),               # one element per row
    ]


def _leaves(cases):
    ws = [w.detach().clone().requires_grad_() for w, *_ in cases]
    gains = [g.detach().clone().requires_grad_() if isinstance(g, torch.Tensor) else g for _, g, *_ in cases]
    return ws, gains


def _assert_close(a, b, what, ulps=1.0, floor=0.0):
    """|a - b| <= ulps * eps(a.dtype) * |b| + floor, elementwise; reports the worst element."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    err = (a.double() - b.double()).abs()
    tol = ulps * torch.finfo(a.dtype).eps * b.double().abs() + floor
    bad = err > tol
    if bad.any():
        i = int((err - tol).argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} elements off; worst at flat index {i}: "
                             f"{a.flatten()[i].item()} vs {b.flatten()[i].item()}")


def _grad_floor(w, gain, cot):
    """Absolute slack for d w: a few fp32 ulps of the terms g r k and (coef d k) w, which cancel
    almost exactly in short rows (a one-element row's gradient is ~eps-sized)."""
    w = w.detach().double().flatten(1)
    r = 1 / (EPS + w.norm(dim=1) / w.shape[1] ** 0.5)
    k = abs(float(gain.detach() if isinstance(gain, torch.Tensor) else gain)) / w.shape[1] ** 0.5
    return 8 * torch.finfo(torch.float32).eps * cot.abs().max().item() * r.max().item() * max(k, 1e-3)


def _per_weight(ws, gains, cases):
    return [mk.mp_weight(w, gn, EPS, qkv_heads=h).to(d) for w, gn, (_, _, h, d) in zip(ws, gains, cases)]


@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients_match_mp_weight(ext, device):
    cases = _cases(device)
    ws, gains = _leaves(cases)
    ws2, gains2 = _leaves(cases)
    heads, dtypes = [c[2] for c in cases], [c[3] for c in cases]
    with mk.use_backend("cuda", strict=True):
        outs = mk.mp_weights(ws, gains, EPS, qkv_heads=heads, dtypes=dtypes)
        refs = _per_weight(ws2, gains2, cases)
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(r.shape, generator=g).to(device) for r in refs]
    for i, (o, r, w) in enumerate(zip(outs, refs, ws)):
        assert o.stride() == w.stride(), f"output {i}: strides {o.stride()}, weight {w.stride()}"
        _assert_close(o, r, f"output {i}", ulps=1.0, floor=1e-7)  # one rounding of near-equal fp32 values
    sum((o.float() * c).sum() for o, c in zip(outs, cots)).backward()
    sum((r.float() * c).sum() for r, c in zip(refs, cots)).backward()
    for i, (a, b) in enumerate(zip(ws, ws2)):
        _assert_close(a.grad, b.grad, f"d weights[{i}]", ulps=1.0, floor=_grad_floor(a, gains[i], cots[i]))
    for i, (a, b) in enumerate(zip(gains, gains2)):
        if isinstance(a, torch.Tensor):
            _assert_close(a.grad, b.grad, f"d gains[{i}]", ulps=1.0, floor=1e-5 * max(1.0, b.grad.abs().item()))
    assert torch.count_nonzero(ws[3].grad) == 0 and gains[3].grad.item() != 0.0  # gain 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_results_without_gradient_count_as_zero(ext, device):
    """Only some results of a group get a gradient: the others' weights and gains get zeros."""
    cases = [c for c in _cases(device) if c[3] == torch.bfloat16]  # one group, one backward op
    ws, gains = _leaves(cases)
    with mk.use_backend("cuda", strict=True):
        outs = mk.mp_weights(ws, gains, EPS, qkv_heads=[c[2] for c in cases], dtypes=torch.bfloat16)
    outs[0].float().square().sum().backward()
    ws2, gains2 = _leaves(cases[:1])
    with mk.use_backend("cuda", strict=True):
        mk.mp_weight(ws2[0], gains2[0], EPS).to(torch.bfloat16).float().square().sum().backward()
    _assert_close(ws[0].grad, ws2[0].grad, "d weights[0]", floor=_grad_floor(ws[0], gains[0], 2 * outs[0].float()))
    for i in range(1, len(cases)):
        assert torch.count_nonzero(ws[i].grad) == 0, f"weights[{i}] got a gradient"
        if isinstance(gains[i], torch.Tensor):
            assert gains[i].grad.item() == 0.0, f"gains[{i}] got a gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_more_weights_than_one_launch_takes(ext, device):
    """200 weights (a CUDA launch carries at most ~86): every one right, gradients too."""
    if ext.with_cuda:
        assert 64 <= ext._mp_weights_chunk(False) <= ext._mp_weights_chunk(True) < 200
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(1 + i % 13, 1 + (i * 7) % 19, generator=g).to(device).requires_grad_() for i in range(200)]
    gains = [torch.tensor(0.1 * (i % 5), device=device, requires_grad=True) if i % 3 == 0 else 1.0 + i / 100
             for i in range(200)]
    with mk.use_backend("cuda", strict=True):
        outs = mk.mp_weights(ws, gains, EPS, dtypes=torch.bfloat16)
        refs = [mk.mp_weight(w, gn, EPS).to(torch.bfloat16) for w, gn in zip(ws, gains)]
    for i, (o, r) in enumerate(zip(outs, refs)):
        _assert_close(o, r, f"output {i}", floor=1e-7)
    tg = ws + [gn for gn in gains if isinstance(gn, torch.Tensor)]
    got = torch.autograd.grad(sum(o.float().sum() for o in outs), tg)
    want = torch.autograd.grad(sum(r.float().sum() for r in refs), tg)
    for i, (a, b) in enumerate(zip(got, want)):
        _assert_close(a, b, f"gradient {i}", floor=1e-5 * max(1.0, b.abs().max().item()))


def test_matches_the_reference_in_fp32(ext):
    """Independent of the single-weight kernel: the reference's fp32 math (spec §1), rtol 1e-6."""
    cases = [c for c in _cases("cpu") if c[0].dtype == torch.float32]
    with mk.use_backend("cuda", strict=True):
        outs = mk.mp_weights([c[0] for c in cases], [c[1] for c in cases], EPS, qkv_heads=[c[2] for c in cases])
    for i, (o, (w, gn, h, _)) in enumerate(zip(outs, cases)):
        torch.testing.assert_close(o, mk.reference.mp_weight(w, gn, EPS, qkv_heads=h), rtol=1e-6, atol=1e-7,
                                   msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_lean_eager_path_matches_the_custom_op(ext, device):
    """Eager calls skip the torch.library machinery (mpkernels._library's lean path): bit for bit
    the same results and gradients as through the custom ops."""
    from mpkernels import _library
    if not hasattr(_library, "lean_path"):
        pytest.skip("mpkernels._library has no lean path")
    cases = _cases(device)
    heads, dtypes = [c[2] for c in cases], [c[3] for c in cases]
    got = []
    for lean in (True, False):
        ws, gains = _leaves(cases)
        with _library.lean_path(lean), mk.use_backend("cuda", strict=True):
            outs = mk.mp_weights(ws, gains, EPS, qkv_heads=heads, dtypes=dtypes)
            assert ("LeanMpWeights" in type(outs[0].grad_fn).__name__) == lean, type(outs[0].grad_fn)
            sum((o.float() * (i + 1)).square().sum() for i, o in enumerate(outs[1:])).backward()
        got.append([*outs, *[w.grad for w in ws], *[gn.grad for gn in gains if isinstance(gn, torch.Tensor)]])
    for i, (a, b) in enumerate(zip(*got)):
        assert (a is None) == (b is None), f"tensor {i}"
        assert a is None or torch.equal(a, b), f"tensor {i} differs between the lean path and the custom op"


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU: a real CUDA graph capture")
def test_cuda_graph_replay_reads_the_current_weights(ext):
    """Pointers and sizes travel in the kernel parameters (no device table): a captured forward and
    backward of 100 weights (two launches each way) replays with the weights' and gain's new values."""
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(3 + i % 5, 8 + i % 3, generator=g).cuda().requires_grad_() for i in range(100)]
    gain = torch.tensor(0.5, device="cuda", requires_grad=True)
    gains = [gain if i == 7 else 1.0 for i in range(100)]

    def step():
        outs = mk.mp_weights(ws, gains, EPS, dtypes=torch.bfloat16)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return outs

    with mk.use_backend("cuda", strict=True):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm-up: grads allocated outside the graph
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        with torch.no_grad():
            for w in ws:
                w.mul_(-2.0).add_(0.25)
                w.grad.zero_()
            gain.fill_(1.5)
            gain.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ws2 = [w.detach().clone().requires_grad_() for w in ws]
        gain2 = gain.detach().clone().requires_grad_()
        refs = [mk.mp_weight(w, gain2 if i == 7 else 1.0, EPS).to(torch.bfloat16) for i, w in enumerate(ws2)]
        torch.autograd.backward(refs, [torch.ones_like(r) for r in refs])
    for i, (o, r) in enumerate(zip(outs, refs)):
        _assert_close(o, r, f"replayed output {i}", floor=1e-7)
        _assert_close(ws[i].grad, ws2[i].grad, f"replayed d weights[{i}]",
                      floor=1e-5 * ws2[i].grad.abs().max().item())
    torch.testing.assert_close(gain.grad, gain2.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input: the extension names the argument (the public function validates first, see
# tests/test_mp_weights.py; these reach the extension directly).

def _ok_args():
    ws = [torch.randn(6, 4), torch.randn(3, 2, 3, 3)]
    return dict(weights=ws, gains=[torch.tensor(0.5)], gain_index=[0, -1], gain_values=[1.0, 2.0], eps=EPS,
                qkv_heads=[0, 0], dtypes=[0, 2])


@pytest.mark.parametrize("change, error, text", [
    (dict(gain_index=[0]), ValueError, r"gain_index: 1 entries but weights has 2"),
    (dict(dtypes=[0, 0, 0]), ValueError, r"dtypes: 3 entries but weights has 2"),
    (dict(weights=[torch.randn(6, 4), torch.randn(3)]), ValueError, r"weights\[1\]: expected a weight with at least 2"),
    (dict(weights=[torch.randn(6, 4), torch.randn(0, 3)]), ValueError, r"weights\[1\]: expected a non-empty"),
    (dict(weights=[torch.randn(6, 4), torch.randn(3, 3).double()]), TypeError, r"weights\[1\]: unsupported dtype"),
    (dict(weights=[torch.randn(6, 4), torch.randn(3, 3, device="meta")]), ValueError, r"weights\[1\]: tensors on meta"),
    (dict(gains=[torch.ones(2)]), ValueError, r"gains\[0\]: a tensor gain must have exactly one element"),
    (dict(gains=[torch.tensor(1.0, dtype=torch.float64)]), TypeError, r"gains\[0\]: unsupported dtype"),
    (dict(gain_index=[1, -1]), ValueError, r"gain_index\[0\]: 1 is not -1 or the index"),
    (dict(gain_index=[-1, -1]), ValueError, r"gain_index: must refer to each tensor gain exactly once"),
    (dict(gain_index=[0, 0]), ValueError, r"gain_index: must refer to each tensor gain exactly once"),
    (dict(qkv_heads=[4, 0]), ValueError, r"qkv_heads\[0\]: weights\[0\] has 6 rows, not a multiple of 3 \* 4"),
    (dict(qkv_heads=[0, -1]), ValueError, r"qkv_heads\[1\]: must be a positive"),
    (dict(dtypes=[0, 3]), TypeError, r"dtypes\[1\]: unsupported output dtype code 3"),
    (dict(eps=float("nan")), ValueError, r"eps: must be finite"),
    (dict(weights=[]), ValueError, r"weights: expected at least one weight"),
])
def test_bad_forward_arguments_name_the_argument(ext, change, error, text):
    args = {**_ok_args(), **change}
    with pytest.raises(error, match=text):
        ext.mp_weights_fwd(**args)


def test_bad_backward_arguments_name_the_argument(ext):
    a = _ok_args()
    outs, rms = ext.mp_weights_fwd(**a)
    common = {k: a[k] for k in ("weights", "gains", "gain_index", "gain_values", "eps", "qkv_heads", "dtypes")}
    grads = [torch.ones_like(o) for o in outs]
    with pytest.raises(ValueError, match=r"grads: 1 entries but weights has 2"):
        ext.mp_weights_bwd(grads=grads[:1], rms=rms, **common)
    with pytest.raises(TypeError, match=r"grads\[1\]: dtype Float does not match the output dtype BFloat16"):
        ext.mp_weights_bwd(grads=[grads[0], grads[1].float()], rms=rms, **common)
    with pytest.raises(ValueError, match=r"grads\[0\]: shape \[4, 6\] does not match weights\[0\]"):
        ext.mp_weights_bwd(grads=[grads[0].t(), grads[1]], rms=rms, **common)
    with pytest.raises(ValueError, match=r"rms: has 8 elements, expected 9"):
        ext.mp_weights_bwd(grads=grads, rms=rms[:8], **common)
    with pytest.raises(TypeError, match=r"rms: expected float32"):
        ext.mp_weights_bwd(grads=grads, rms=rms.half(), **common)
    gw, partial = ext.mp_weights_bwd(grads=[None, grads[1]], rms=rms, **common)
    assert torch.count_nonzero(gw[0]) == 0 and partial.shape == (9,)
    with pytest.raises(ValueError, match=r"partial: has 8 elements, expected 9"):
        ext.mp_weights_gain_grads(partial[:8], a["weights"], a["gains"], a["gain_index"])


def test_public_function_rejects_bad_input_on_this_backend(ext):
    with mk.use_backend("cuda", strict=True):
        with pytest.raises(ValueError, match=r"gains: 1 entries but weights has 2"):
            mk.mp_weights([torch.randn(4, 3), torch.randn(4, 3)], [1.0])
        with pytest.raises(ValueError, match=r"qkv_heads\[0\]"):
            mk.mp_weights([torch.randn(4, 3)], qkv_heads=[2])


def test_float64_falls_back_to_the_reference(ext):
    w = torch.randn(4, 3, dtype=torch.float64)
    with mk.use_backend("cuda"):
        assert _dispatch.implementation("mp_weights", ([w], [1.0], EPS, [None], [torch.float64]))[0] == "reference"
        assert _dispatch.implementation("mp_weights", ([w.float()], [1.0], EPS, [None], [torch.float64]))[0] == \
            "reference"
        assert _dispatch.implementation("mp_weights", ([w.float()], [1.0], EPS, [None], [torch.float16]))[0] == "cuda"


# ------------------------------------------------------------------------------------------------
# Tracing and launch accounting

def _step(ws, gain, w_cl):
    outs = mk.mp_weights([*ws, w_cl], [1.0, gain, 0.5], EPS, qkv_heads=[None, 2, None],
                         dtypes=[torch.bfloat16, torch.bfloat16, torch.float32])
    return sum((o.float() * (i + 1)).square().sum() for i, o in enumerate(outs))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_fullgraph_compile_matches_eager(ext, backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(8, 3, 3, 3, generator=g), torch.randn(12, 8, generator=g)]
    base_cl = torch.randn(6, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)

    def leaves():
        return ([t.clone().requires_grad_() for t in base], torch.tensor(0.8, requires_grad=True),
                base_cl.clone().requires_grad_())

    with mk.use_backend("cuda", strict=True):
        ws, gain, wcl = leaves()
        _step(ws, gain, wcl).backward()
        ws2, gain2, wcl2 = leaves()
        torch.compile(_step, fullgraph=True, backend=backend)(ws2, gain2, wcl2).backward()
    for a, b in zip([*ws, gain, wcl], [*ws2, gain2, wcl2]):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


class _Ops(TorchDispatchMode):
    """Every non-view op with a tensor result, by name (the launch accounting of benchmarks/model.py)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        free = (torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
                torch.ops.aten.detach, torch.ops.aten.lift_fresh)
        if not getattr(func, "is_view", False) and func.overloadpacket not in free:
            self.names.append(func.overloadpacket.__name__ if hasattr(func.overloadpacket, "__name__")
                              else str(func))
        return out


def test_one_launch_per_dtype_group_on_meta():
    """Forward: one op per output dtype group, nothing else (no casts, no qkv gathers); backward: per
    group one op for the weight gradients plus one for the tensor gains. Needs only the custom ops'
    fake functions (no extension), as the benchmark's accounting."""
    with torch.device("meta"):
        ws = [torch.empty(8, 3, 3, 3, requires_grad=True), torch.empty(24, 8, requires_grad=True),
              torch.empty(6, 4, 3, 3, requires_grad=True), torch.empty(12, 5, requires_grad=True)]
        gains = [1.0, torch.empty((), requires_grad=True), 0.5, torch.empty((), requires_grad=True)]
    ops = _Ops()
    with _dispatch.simulate("cuda"), ops:
        outs = mk.mp_weights(ws, gains, EPS, qkv_heads=[None, 2, None, None],
                             dtypes=[torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16])
        fwd = list(ops.names)
        ops.names.clear()
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    assert sorted(fwd) == ["cuda_mp_weights", "cuda_mp_weights"], fwd
    bwd = [n for n in ops.names if n.startswith("cuda_mp_weights")]
    assert sorted(bwd) == ["cuda_mp_weights_backward", "cuda_mp_weights_backward", "cuda_mp_weights_gain_grads"], \
        ops.names
    assert len(ops.names) <= len(bwd) + len(gains), ops.names  # at most gradient accumulation besides


def test_a_network_worth_of_weights_is_one_forward_op():
    """An EDM2-S network's 160-odd weights (one dtype): one forward op, at most two backward ops."""
    import sys
    sys.path.insert(0, os.path.join(_build.ROOT, "python"))
    from edm2fast import presets
    from edm2fast.networks import Precond, forced_norm_weights
    with torch.device("meta"):
        net = Precond(**presets.network_kwargs("edm2-img512-s"))
    ws = forced_norm_weights(net)
    assert len(ws) > 150
    ops = _Ops()
    with _dispatch.simulate("cuda"), ops:
        outs = mk.mp_weights(ws, dtypes=torch.bfloat16)
        n_fwd = len(ops.names)
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    assert n_fwd == 1, ops.names
    assert len([n for n in ops.names[1:] if n.startswith("cuda_mp_weights")]) <= 2, ops.names


# ------------------------------------------------------------------------------------------------
# Compiled code (no GPU needed)

def test_kernels_read_the_weight_table_in_place(tmp_path):
    """multi_weight.cu for sm_90 with the extension's flags: the per-weight pointers and sizes are
    read from the kernel parameters by indexed constant loads (no copy of the ~4 KB table to local
    memory, no device table), and 16-bit forward results are stored 16 bytes at a time."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from test_cuda_codegen import _nvcc, find_cuobjdump, nvcc_flags, split_sass

    nvcc, cuobjdump = _nvcc(), find_cuobjdump()
    if not nvcc or not os.path.isfile(nvcc) or cuobjdump is None:
        pytest.skip("nvcc and cuobjdump are needed to inspect the compiled kernels")
    cubin = tmp_path / "multi_weight.cubin"
    r = subprocess.run([nvcc, *nvcc_flags(), "-cubin", "-arch=sm_90", "-o", str(cubin),
                        os.path.join(_build.CSRC, "multi_weight.cu")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"nvcc multi_weight.cu failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(cuobjdump), os.environ.get("PATH", "")]))
    r = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    kernels = split_sass(r.stdout)
    names = [n for n in kernels if "mp_weights" in n]
    assert len(names) == 7, names  # fwd and bwd for three dtypes, the gain reduction
    for name in names:
        body = kernels[name]
        assert re.search(r"\bLDC(?:\.64)?\s+R\d+, c\[0x0\]\[R\d+\+0x[0-9a-f]+\]", body), f"{name}: no indexed LDC"
        local = len(re.findall(r"\b(?:LDL|STL)\b", body))
        assert local <= 16, f"{name}: {local} local-memory accesses (a copy of the parameter table?)"
        if "fwd_kernelI6__half" in name or "fwd_kernelI13__nv_bfloat16" in name:
            assert re.search(r"\bSTG\.E\.128\b", body), f"{name}: no 16-byte store"


# ------------------------------------------------------------------------------------------------
# The custom-op and autograd plumbing alone, on a pure-PyTorch stand-in for the extension: runs
# without a build, so it also checks the GPU machine's torch (2.11) in .venv-compat:
#   .venv-compat/bin/python -m pytest -q tests/test_cuda_mp_weights.py -k stand_in

class _StandIn:
    """The extension's three mp_weights entry points in plain PyTorch (fp32 math)."""

    with_cuda = False

    @staticmethod
    def _rows(w):
        w32 = w.float().flatten(1)
        return w32, w32.norm(dim=1) / w32.shape[1] ** 0.5

    def mp_weights_fwd(self, weights, gains, gain_index, gain_values, eps, qkv_heads, dtypes):
        from mpkernels.cuda._multi_weight import _OF_CODE, _out_like
        outs, stats = [], []
        for w, gi, gv, h, d in zip(weights, gain_index, gain_values, qkv_heads, dtypes):
            w32, rms = self._rows(w)
            gain = gains[gi].float().reshape(()) if gi >= 0 else gv
            y = w32 / (eps + rms[:, None]) * (gain / w32.shape[1] ** 0.5)
            if h:
                y = y.index_select(0, mk.reference.head_contiguous_rows(w.shape[0], h, w.device))
            outs.append(_out_like(w, _OF_CODE[d]).copy_(y.view(w.shape)))
            stats.append(rms)
        return outs, torch.cat(stats)

    def mp_weights_bwd(self, grads, weights, gains, gain_index, gain_values, rms, eps, qkv_heads, dtypes):
        from mpkernels.cuda._multi_weight import _out_like
        gws, parts, first = [], [], 0
        for g, w, gi, gv, h in zip(grads, weights, gain_index, gain_values, qkv_heads):
            w32, _ = self._rows(w)
            rv = rms[first:first + w.shape[0]]
            first += w.shape[0]
            g32 = torch.zeros_like(w32) if g is None else g.float().flatten(1)
            if h:  # back to the input-row order
                g32 = g32[torch.argsort(mk.reference.head_contiguous_rows(w.shape[0], h, w.device))]
            n = w32.shape[1]
            k = (gains[gi].float().reshape(()) if gi >= 0 else gv) / n ** 0.5
            r = 1 / (eps + rv)
            d = (g32 * w32).sum(1)
            coef = torch.where(rv == 0, torch.zeros_like(rv), r * r / (n * rv))
            gws.append(_out_like(w, w.dtype).copy_(((g32 * r[:, None] - w32 * (coef * d)[:, None]) * k).view(w.shape)))
            parts.append(r * d)
        return gws, torch.cat(parts) if gains else rms.new_empty((0,))

    def mp_weights_gain_grads(self, partial, weights, gains, gain_index):
        out, first = [None] * len(gains), 0
        for w, gi in zip(weights, gain_index):
            if gi >= 0:
                n = w[0].numel()
                out[gi] = (partial[first:first + w.shape[0]].sum() / n ** 0.5).to(gains[gi].dtype).reshape(
                    gains[gi].shape)
            first += w.shape[0]
        return out


@pytest.mark.parametrize("compiled", [False, True])
def test_custom_op_plumbing_on_a_stand_in(monkeypatch, compiled):
    """Tensor[] custom ops, per-group calls, tensor-gain gradients, unused results, strides and
    torch.compile(fullgraph=True) with the stand-in above in place of the extension."""
    import mpkernels.cuda as mc
    from mpkernels.cuda import _multi_weight as MW
    monkeypatch.setattr(mc, "_EXT", _StandIn())
    torch._dynamo.reset()
    cases = _cases("cpu")
    ws, gains = _leaves(cases)
    ws2, gains2 = _leaves(cases)
    heads, dtypes = [c[2] for c in cases], [c[3] for c in cases]

    def loss_of(ws, gains):
        outs = MW.mp_weights(ws, gains, EPS, heads, dtypes)
        return outs, sum((o.float() * (i + 1)).square().sum() for i, o in enumerate(outs[:-1]))  # last: unused

    fn = torch.compile(loss_of, fullgraph=True, backend="aot_eager") if compiled else loss_of
    outs, loss = fn(ws, gains)
    loss.backward()
    refs = [mk.reference.mp_weight(w, gn, EPS, qkv_heads=h).to(d) for w, gn, h, d in zip(ws2, gains2, heads, dtypes)]
    sum((r.float() * (i + 1)).square().sum() for i, r in enumerate(refs[:-1])).backward()
    for i, (o, r, w) in enumerate(zip(outs, refs, ws)):
        assert o.stride() == w.stride(), f"output {i}"
        torch.testing.assert_close(o, r, rtol=2 * torch.finfo(r.dtype).eps, atol=1e-6)
    for i, (a, b) in enumerate(zip(ws, ws2)):
        if i == len(ws) - 1 and not compiled:
            assert torch.count_nonzero(a.grad) == 0  # a result with no gradient counts as zero
        torch.testing.assert_close(a.grad, b.grad if b.grad is not None else torch.zeros_like(a),
                                   rtol=1e-4, atol=1e-5 * max(1.0, a.grad.abs().max().item()))
    for i, (a, b) in enumerate(zip(gains, gains2)):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_gradient_with_other_strides_on_size_one_dims(cuda_backend):
    """A 1x1 weight's gradient may come strided (C, 1, 1, 1) while the weight is strided (C, 1, C, C)
    (oneDNN's weight gradient under channels_last): the same memory layout, used in place, and the
    result equals the one from a gradient laid out like the weight."""
    g = torch.Generator().manual_seed(31)
    w = torch.empty_strided((6, 4, 1, 1), (4, 1, 4, 4)).copy_(torch.randn(6, 4, 1, 1, generator=g))
    grad = torch.randn(6, 4, 1, 1, generator=g)  # strides (4, 1, 1, 1)
    assert w.stride() != grad.stride()
    results = []
    for gr in (grad, torch.empty_strided((6, 4, 1, 1), (4, 1, 4, 4)).copy_(grad)):
        ww = w.clone().requires_grad_(True)
        with mk.use_backend("cuda", strict=True):
            (out,) = mk.mp_weights([ww], [1.3])
        out.backward(gr)
        results.append(ww.grad)
    assert torch.equal(results[0], results[1])
    ref = w.clone().requires_grad_(True)
    with mk.use_backend("reference"):
        (out,) = mk.mp_weights([ref], [1.3])
    out.backward(grad)
    torch.testing.assert_close(results[0], ref.grad, rtol=1e-5, atol=1e-6)
