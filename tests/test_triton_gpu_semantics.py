"""What the Triton kernels do on a GPU that the CPU interpreter does not show (issue 9).

* NaN and infinities: ``mp_sum_clip`` must keep NaN like ``torch.clamp`` and follow
  ``torch.lerp`` on infinite inputs. The interpreter computes with NumPy, whose ``maximum`` /
  ``minimum`` already propagate NaN, so the forward/backward parity test below is completed by
  a check of the sm_80 / sm_90 PTX: the clamp must be ``min.NaN`` / ``max.NaN`` (plain
  ``min.f32`` / ``max.f32`` return the non-NaN operand, clipping a NaN to ``-clip``).
* 64-bit offsets: one sample of ``mp_cat`` / ``modulated_mp_silu`` may exceed 2^31 elements.
  No such tensor fits here, so the Triton IR is checked instead: every int32 offset added to a
  data pointer must not depend on the program id or a loop counter (those tile positions go
  into 64-bit scalar offsets), and ``supports`` sends the rest (rows near 2^31) to the reference.
* Fake (meta) functions of the resample ops must give the strides the kernels give, or
  ``torch.compile`` fails its stride assertions.

The compile checks run in a subprocess without ``TRITON_INTERPRET`` (this file is the script:
``python tests/test_triton_gpu_semantics.py < jobs.json``), like ``tests/triton_aot.py``;
they need no device. The op tests run on ``conftest.kernel_device()``: CUDA tensors (the real
kernels) on a GPU machine, the interpreter on CPU tensors otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- compiling in a subprocess -------------------------------------------------------------------

def _compile_jobs(jobs: list[dict]) -> list[dict]:
    """Script side: compile each ``{module, config, args, cc, aligned}`` job; its TTIR and PTX."""
    import triton
    from triton.backends.compiler import GPUTarget

    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    import importlib

    import triton_aot
    triton_aot._skip_triton_ptxas()  # the PTX is all these checks read
    out = []
    for job in jobs:
        mod = importlib.import_module(job["module"])
        args = [DTYPE_NAMES.get(a, a) if isinstance(a, str) else a for a in job["args"]]
        cfg = getattr(mod, job["config"])(*args)
        src = triton.compiler.ASTSource(fn=cfg.kernel, signature=dict(cfg.signature),
                                        constexprs=dict(cfg.constexprs),
                                        attrs=triton_aot._attrs_for(cfg.signature) if job["aligned"] else None)
        k = triton.compile(src, target=GPUTarget("cuda", job["cc"], 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                    "maxnreg": cfg.maxnreg})
        out.append(dict(job, name=cfg.name, ttir=k.asm["ttir"], ptx=k.asm["ptx"],
                        args_in_order=[n for n, t in cfg.signature if t != "constexpr"]))
    return out


def compile_in_subprocess(jobs: list[dict]) -> list[dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real JIT functions, not interpreted ones
    env["TRITON_CACHE_DIR"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mpk-gpu-semantics-{os.getpid()}")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"compile failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia"))


needs_compiler = pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend is not installed")


def kernel_device() -> torch.device:
    """``conftest.kernel_device()``, imported late: the compile subprocess runs this file as a script
    and must not import conftest (it would set ``TRITON_INTERPRET`` again)."""
    from conftest import kernel_device
    return kernel_device()


def require_backend(name: str) -> None:
    """``conftest.require_backend``: skip on CPU when ``name`` is missing, fail on a GPU machine."""
    from conftest import require_backend
    require_backend(name)


# --- NaN and infinities in mp_sum / mp_sum_clip -----------------------------------------------------

SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, 1.5, -2.0, 300.0, -300.0]


def _special_pairs(dtype, kind):
    """Every pair of special values, as two [2, 2, 4, 4] tensors (64 elements) on the kernel device."""
    v = torch.tensor(SPECIALS, dtype=torch.float64)
    a = v[:, None].expand(8, 8).reshape(2, 2, 4, 4).to(dtype).to(kernel_device())
    b = v[None, :].expand(8, 8).reshape(2, 2, 4, 4).to(dtype).to(kernel_device())
    fmt = torch.channels_last if kind == "cl" else torch.contiguous_format
    return a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)


def _run(fn, a, b, backend, g):
    import mpkernels as mk
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    with mk.use_backend(backend, strict=backend != "reference"):
        y = fn(a, b)
        y.backward(g)
    return y.detach(), a.grad, b.grad


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, in the interpreter
@pytest.mark.parametrize("kind", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("clip", [None, 2.5], ids=["mp_sum", "mp_sum_clip"])
def test_mp_sum_nan_inf_match_reference(clip, t, dtype, kind):
    import mpkernels as mk
    pytest.importorskip("mpkernels.triton")
    require_backend("triton")
    a, b = _special_pairs(dtype, kind)
    g = torch.linspace(-1, 1, a.numel(), dtype=torch.float64).reshape(a.shape).to(dtype).to(a.device)
    fn = (lambda x, y: mk.mp_sum(x, y, t)) if clip is None else (lambda x, y: mk.mp_sum_clip(x, y, t, clip))
    ref = _run(fn, a, b, "reference", g)
    tri = _run(fn, a, b, "triton", g)
    for name, r, o in zip(("output", "grad a", "grad b"), ref, tri):
        assert o.dtype == r.dtype and o.device == a.device
        bad = torch.isnan(r) != torch.isnan(o)
        assert not bad.any(), (f"{name}: NaN where the reference has none or vice versa at "
                               f"a={a[bad].tolist()} b={b[bad].tolist()}: reference {r[bad].tolist()}, "
                               f"triton {o[bad].tolist()}")
        torch.testing.assert_close(o, r, equal_nan=True, msg=lambda m: f"{name}: {m}")


# The clamp as the GPU runs it: min/max that propagate NaN (``min.NaN.f32``, ``max.NaN.f32``,
# ``min.NaN.xorsign.abs.f32`` on sm_86+), never a bare float min/max.
BARE_FLOAT_MINMAX = re.compile(r"\b(?:min|max)(?:\.ftz)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b")
NAN_MINMAX = re.compile(r"\b(?:min|max)\.(?:ftz\.)?NaN\.")


NAN_JOBS = [dict(module="mpkernels.triton.mp_sum", config="_fwd_config", args=[d, True], cc=cc, aligned=aligned)
            for d, cc, aligned in (("float32", 80, False), ("bfloat16", 90, True))]


@pytest.fixture(scope="module")
def compiled():
    """NAN_JOBS and WIDE_JOBS compiled in one subprocess: ``(nan results, wide results)``."""
    wide = [dict(module=f"mpkernels.triton.{m}", config=c, args=a, cc=90, aligned=True) for m, c, a, _ in WIDE_JOBS]
    results = compile_in_subprocess(NAN_JOBS + wide)
    return results[:len(NAN_JOBS)], results[len(NAN_JOBS):]


@needs_compiler
@pytest.mark.slow
def test_mp_sum_clip_ptx_propagates_nan(compiled):
    for r in compiled[0]:
        where = f"{r['name']} sm_{r['cc']}"
        bare = sorted(set(BARE_FLOAT_MINMAX.findall(r["ptx"])))
        assert not bare, f"{where}: {bare} in the PTX turn a NaN into a finite value (use a NaN-propagating clamp)"
        assert NAN_MINMAX.search(r["ptx"]), f"{where}: no NaN-propagating min/max in the PTX"


@needs_compiler
@pytest.mark.slow
def test_no_bare_float_min_max_in_elementwise_kernels():
    """No kernel of the element-wise ops may clip a NaN silently (every configuration, sm_90)."""
    from mpkernels.triton import modulated_mp_silu, mp_cat, mp_fourier, mp_silu, mp_sum, resample  # noqa: F401
    jobs = []
    for mod, config, args in (
            ("mp_sum", "_fwd_config", [["float32", True], ["float32", False]]),
            ("mp_sum", "_bwd_config", [["float32", True]]),
            ("mp_silu", "_fwd_config", [["float32"]]), ("mp_silu", "_bwd_config", [["float32"]]),
            ("mp_cat", "_config", [["float32", 16], ["float32", 1024]]),
            ("modulated_mp_silu", "_fwd_config", [["float32", False, 256], ["float32", True, 64]]),
            ("modulated_mp_silu", "_bwd_config", [["float32", False, 256], ["float32", True, 64]]),
            ("modulated_mp_silu", "_sum_config", [[]]),
            ("resample", "_config", [["float32", cl, down] for cl in (False, True) for down in (False, True)]),
            ("mp_fourier", "_fwd_config", [["float32"]]), ("mp_fourier", "_bwd_config", [["float32"]])):
        for a in args:
            jobs.append(dict(module=f"mpkernels.triton.{mod}", config=config, args=a, cc=90, aligned=True))
    for r in compile_in_subprocess(jobs):
        bare = sorted(set(BARE_FLOAT_MINMAX.findall(r["ptx"])))
        assert not bare, f"{r['name']}: {bare} in the PTX"


# --- 64-bit offsets -----------------------------------------------------------------------------------

_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*(.*)$")
_VALUE = re.compile(r"%[\w.$-]+")
_FOR = re.compile(r"scf\.for\s+(%[\w.$-]+)\s*=(.*)")
_ITER_ARG = re.compile(r"(%[\w.$-]+)\s*=\s*%")
_ADDPTR = re.compile(r"tt\.addptr\s+(%[\w.$-]+),\s*(%[\w.$-]+)\s*:\s*[^,]+,\s*(.+)$")
_FUNC_ARG = re.compile(r"(%[\w.$-]+):\s*(!tt\.ptr<[^>]*>|i32|i64|f32|f16|bf16|i1)")


def _strip_locations(line: str) -> str:
    """``line`` without its ``loc(...)`` annotations (balanced parentheses)."""
    out, i = [], 0
    while True:
        j = line.find("loc(", i)
        if j < 0 or (j > 0 and (line[j - 1].isalnum() or line[j - 1] == "_")):
            if j < 0:
                return "".join(out) + line[i:]
            out.append(line[i:j + 4])
            i = j + 4
            continue
        out.append(line[i:j])
        depth, k = 0, j + 3
        while k < len(line):
            depth += {"(": 1, ")": -1}.get(line[k], 0)
            k += 1
            if depth == 0:
                break
        i = k


def int32_offsets_by_position(ttir: str, arg_names: list[str], pointers: set[str]) -> list[str]:
    """TTIR lines that add an int32 offset depending on the program id or a loop counter to one of
    ``pointers`` (kernel argument names): offsets that grow with the tensor, not the tile.

    A small taint analysis over the SSA text: sources are ``tt.get_program_id`` results and the
    induction variables and iteration arguments of ``scf.for``; a value is tainted when any operand
    is. Each pointer value remembers the kernel argument it was derived from."""
    lines = [_strip_locations(ln) for ln in ttir.splitlines() if not ln.startswith("#loc")]
    func = next(ln for ln in lines if "tt.func" in ln)
    params = [m.group(1) for m in _FUNC_ARG.finditer(func)]
    assert len(params) == len(arg_names), f"kernel arguments {params} vs {arg_names}"
    root = {p: name for p, name in zip(params, arg_names)}
    tainted: set[str] = set()
    bad = []
    for ln in lines:
        m = _FOR.search(ln)
        if m:  # induction variable and loop-carried values change from iteration to iteration
            tainted.add(m.group(1))
            tainted.update(_ITER_ARG.findall(m.group(2)))
        d = _DEF.match(ln)
        if not d:
            continue
        name, rhs = d.group(1), d.group(2)
        if m:
            rhs = ""
        operands = [v for v in _VALUE.findall(rhs)]
        if "tt.get_program_id" in rhs or any(v in tainted for v in operands):
            tainted.add(name)
        else:
            tainted.discard(name)  # a name reused in a sibling region
        op = rhs.split()[0] if rhs.split() else ""
        if op in ("tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims") and operands and operands[0] in root:
            root[name] = root[operands[0]]
        a = _ADDPTR.search(rhs)
        if a and root.get(a.group(1)) in pointers and a.group(3).strip().endswith(("xi32>", "i32")) \
                and a.group(2) in tainted:
            bad.append(ln.strip())
    return bad


WIDE_JOBS = [
    ("mp_cat", "_config", ["float32", 1024], {"src1_ptr", "dst1_ptr", "src2_ptr", "dst2_ptr"}),
    ("modulated_mp_silu", "_fwd_config", ["float32", False, 256], {"y_ptr", "out_ptr"}),
    ("modulated_mp_silu", "_fwd_config", ["bfloat16", True, 64], {"y_ptr", "out_ptr"}),
    ("modulated_mp_silu", "_bwd_config", ["float32", False, 256], {"g_ptr", "y_ptr", "dy_ptr"}),
    ("modulated_mp_silu", "_bwd_config", ["bfloat16", True, 64], {"g_ptr", "y_ptr", "dy_ptr"}),
]


@needs_compiler
@pytest.mark.slow
def test_tile_positions_use_64bit_offsets(compiled):
    report = []
    for r, (_, _, _, ptrs) in zip(compiled[1], WIDE_JOBS):
        bad = int32_offsets_by_position(r["ttir"], r["args_in_order"], ptrs)
        report += [f"{r['name']}: {ln}" for ln in bad]
    assert not report, "int32 offsets that grow with the tensor (wrap past 2^31 elements):\n" + "\n".join(report)


def test_offset_analysis_catches_position_dependent_int32():
    """The analysis flags ``ptr + (pid * BLOCK + arange)`` in int32 and accepts an int64 corner."""
    wrapping = """
  tt.func public @k(%x_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32}, %n: i32) {
    %pid = tt.get_program_id x : i32
    %c = arith.muli %pid, %n : i32
    %r = tt.make_range {end = 16 : i32, start = 0 : i32} : tensor<16xi32>
    %o = tt.splat %c : i32 -> tensor<16xi32>
    %o_1 = arith.addi %o, %r : tensor<16xi32>
    %p = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>>
    %p_2 = tt.addptr %p, %o_1 : tensor<16x!tt.ptr<f32>>, tensor<16xi32>
"""
    wide = """
  tt.func public @k(%x_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32}, %n: i32) {
    %pid = tt.get_program_id x : i32
    %c = arith.extsi %pid : i32 to i64
    %q = tt.addptr %x_ptr, %c : !tt.ptr<f32>, i64
    %r = tt.make_range {end = 16 : i32, start = 0 : i32} : tensor<16xi32>
    %p = tt.splat %q : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>>
    %p_2 = tt.addptr %p, %r : tensor<16x!tt.ptr<f32>>, tensor<16xi32>
"""
    assert int32_offsets_by_position(wrapping, ["x_ptr", "n"], {"x_ptr"})
    assert not int32_offsets_by_position(wide, ["x_ptr", "n"], {"x_ptr"})


def _meta(shape, cl=False, dtype=torch.bfloat16):
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def test_supports_refuses_rows_past_int32():
    """Shapes whose offsets within one tile would pass 2^31 go to the reference; big samples with
    ordinary rows stay on Triton (their tile corners are 64-bit)."""
    from mpkernels import _dispatch
    tri = pytest.importorskip("mpkernels.triton")
    mp_cat, modsilu = tri.mp_cat, tri.modulated_mp_silu
    # mp_cat: NCHW along dim 1, a row is one sample: (Ca + Cb) * H * W elements.
    assert mp_cat.supports(_meta((2, 256, 64, 64)), _meta((2, 256, 64, 64)), 1, 0.5)
    assert not mp_cat.supports(_meta((2, 2 ** 20, 32, 32)), _meta((2, 2 ** 20, 32, 32)), 1, 0.5)
    # channels_last along dim 1: a row is one pixel's channels, whatever the sample size.
    assert mp_cat.supports(_meta((1, 2 ** 20, 64, 64), True), _meta((1, 2 ** 20, 64, 64), True), 1, 0.5)
    # along the last dim of an NCHW tensor a row is W.
    assert mp_cat.supports(_meta((1, 2 ** 20, 64, 64)), _meta((1, 2 ** 20, 64, 64)), 3, 0.5)
    # modulated_mp_silu: 2^32 elements in one sample, 2^20-pixel planes: fine; 2^30-pixel planes: not.
    c = torch.empty((1, 4096), device="meta")
    assert modsilu.supports(_meta((1, 4096, 1024, 1024)), c)
    assert not modsilu.supports(_meta((1, 4, 2 ** 15, 2 ** 15)), c[:, :4])
    assert modsilu.supports(_meta((1, 4, 2 ** 15, 2 ** 15), True), c[:, :4])  # 2^30 pixels of 4 channels
    assert not modsilu.supports(_meta((1, 4, 2 ** 16, 2 ** 15), True), c[:, :4])  # 2^31 pixels
    with _dispatch.simulate("triton", "cpu" if tri.INTERPRET else "cuda"):
        big = _meta((2, 2 ** 20, 32, 32))
        assert _dispatch.implementation("mp_cat", (big, big, 1, 0.5))[0] == "reference"
        ok = _meta((2, 256, 64, 64))
        assert _dispatch.implementation("mp_cat", (ok, ok, 1, 0.5))[0] == "triton"


# --- resample: fake strides == real strides -------------------------------------------------------------

RESAMPLE_CASES = [(2, 3, 2, 2), (1, 3, 1, 1), (2, 1, 4, 4), (1, 1, 2, 2), (2, 4, 6, 6), (1, 5, 2, 2)]


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["down", "up"])
@pytest.mark.parametrize("shape", RESAMPLE_CASES, ids=lambda s: "x".join(map(str, s)))
def test_resample_fake_strides_match_kernel(shape, mode, cl):
    tri = pytest.importorskip("mpkernels.triton")
    require_backend("triton")
    R = tri.resample
    if mode == "down" and (shape[2] % 2 or shape[3] % 2):
        pytest.skip("odd size")
    fmt = torch.channels_last if cl else torch.contiguous_format
    dev = kernel_device()
    x = torch.randn(shape).to(dev).contiguous(memory_format=fmt)
    fwd, bwd = (R._down_op, R._down_bwd_op) if mode == "down" else (R._up_op, R._up_bwd_op)
    y = fwd(x)
    assert y.device == x.device
    y_fake = fwd(x.to("meta"))
    assert (y_fake.shape, y_fake.stride()) == (y.shape, y.stride()), "forward"
    layout = R._layout(x)
    # the gradient as autograd may hand it over: in the output's layout, or in either format
    for g in (torch.randn_like(y), torch.randn(y.shape).to(dev), torch.randn(y.shape).to(dev).contiguous(
            memory_format=torch.channels_last)):
        dx = bwd(g, layout)
        dx_fake = bwd(g.to("meta"), layout)
        assert (dx_fake.shape, dx_fake.stride()) == (dx.shape, dx.stride()), \
            f"backward: fake strides {dx_fake.stride()} != kernel's {dx.stride()} (g strides {g.stride()})"
        torch.library.opcheck(bwd, (g, layout), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_resample_compiles_channels_last_down_to_1x1():
    """torch.compile(fullgraph=True), forward and backward, channels_last [2, C, 2, 2] -> 1x1."""
    import mpkernels as mk
    pytest.importorskip("mpkernels.triton")
    require_backend("triton")
    x = torch.randn(2, 3, 2, 2).to(kernel_device()).contiguous(memory_format=torch.channels_last)

    def f(x):  # ops on both sides, so compiled code reads the op's outputs with the fake's strides
        return (mk.resample(x * 2.0 + 1.0, "down") * 3.0).sin()

    def run(fn, backend):
        xx = x.clone().requires_grad_(True)
        with mk.use_backend(backend, strict=backend == "triton"):
            y = fn(xx)
            y.backward(torch.ones_like(y))
        return y.detach(), xx.grad

    torch._dynamo.reset()
    ref = run(f, "reference")
    with mk.use_backend("triton", strict=True):
        compiled = torch.compile(f, fullgraph=True)
    # No compile caches: a cached graph keeps the strides of the fake function it was built with.
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        out = run(compiled, "triton")
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


if __name__ == "__main__":
    print(json.dumps(_compile_jobs(json.load(sys.stdin))))
