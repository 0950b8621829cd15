"""Shared test helpers: fp64 oracles and the error rule of STYLE.md.

A low-precision result is judged against PyTorch's own error at that dtype: both the
candidate and eager PyTorch (the reference op run in the low dtype) are compared with
the float64 reference, and the candidate's max error may be at most ``factor`` times
eager's plus a small absolute floor.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _kernel_device() -> str:
    """'cuda' when a GPU is present, else 'cpu'; ``MPKERNELS_TEST_DEVICE=cpu|cuda`` forces it."""
    forced = os.environ.get("MPKERNELS_TEST_DEVICE", "").strip().lower()
    if forced:
        if forced not in ("cpu", "cuda"):
            raise ValueError(f"MPKERNELS_TEST_DEVICE must be 'cpu' or 'cuda', got {forced!r}")
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


# The device kernel tests put their tensors on: CUDA tensors for the real kernels on a GPU,
# CPU tensors for the Triton interpreter (and the CUDA backend's C++ twins) otherwise.
KERNEL_DEVICE = _kernel_device()

# Triton reads TRITON_INTERPRET when kernels are decorated, so it must be set before mpkernels
# is imported. On CPU tensors, Triton kernels then run (slowly) in the interpreter for parity
# tests; 'auto' never picks the interpreter, only tests that ask for backend 'triton' use it.
if KERNEL_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif torch.cuda.is_available():
    # fp32 oracles and eager yardsticks in true fp32: TF32 convolutions/matmuls would make the
    # reference itself ~1e-3 off and hide (or fake) kernel errors.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kernel_device() -> torch.device:
    """Where kernel tests run: ``cuda`` on a GPU machine, else ``cpu`` (the Triton interpreter).

    Build inputs on CPU (seeded generators give the same values everywhere) and move them
    here; the float64 oracle may run on either device. ``MPKERNELS_TEST_DEVICE=cpu`` on a GPU
    machine runs the interpreter instead; ``=cuda`` on a machine without one makes every such
    test fail (nothing is silently skipped)."""
    return torch.device(KERNEL_DEVICE)


@pytest.fixture
def dev() -> torch.device:
    """Fixture form of :func:`kernel_device`."""
    return kernel_device()


def require_backend(name: str) -> None:
    """Skip the calling test module when backend ``name`` cannot run here (its package is not
    installed, say) -- but never on the GPU device: there an unavailable backend is a failure,
    not a quiet skip. Call at module level."""
    import mpkernels as mk
    if name in mk.available_backends():
        return
    why = f"backend {name!r} not available: {mk._backends.load_errors().get(name, 'no device for it')}"
    if KERNEL_DEVICE == "cuda":
        raise RuntimeError(why + f" (tests run on {KERNEL_DEVICE}; see MPKERNELS_TEST_DEVICE)")
    pytest.skip(why, allow_module_level=True)


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple]:
    """Largest absolute difference and where it is."""
    d = (a.double() - b.double()).abs()
    if d.numel() == 0:
        return 0.0, ()
    idx = int(d.argmax())
    return float(d.flatten()[idx]), tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), d.shape))


def assert_close_to_oracle(out: torch.Tensor, oracle: torch.Tensor, eager: torch.Tensor | None = None,
                           factor: float = 2.0, floor: float | None = None, name: str = "output") -> None:
    """``|out - oracle|.max() <= factor * |eager - oracle|.max() + floor`` (both sides checked)."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    err, where = max_err(out, oracle)
    if floor is None:
        floor = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out.dtype]
        floor *= max(1.0, float(oracle.abs().max()))
    budget = floor + (factor * max_err(eager, oracle)[0] if eager is not None else 0.0)
    assert err <= budget, (f"{name}: max abs error {err:.3g} at {where} exceeds {budget:.3g} "
                           f"(out={float(out.flatten()[0]) if out.numel() else 0:.4g}, dtype {out.dtype})")


@pytest.fixture(autouse=True)
def _reset_backend():
    import mpkernels as mk
    prev = mk.get_backend()
    yield
    mk.set_backend(prev)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny tensors: one thread is faster than two fighting over a busy 2-core machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def cuda_backend():
    """The ``mpkernels.cuda`` module with its extension loaded (built just in time if needed), else skip
    -- but never on the GPU device: there a missing extension fails the tests instead of hiding them."""
    import mpkernels.cuda as mc
    if not mc.is_available():
        try:
            mc.build()
        except mc.ExtensionBuildError as e:
            if KERNEL_DEVICE == "cuda":
                raise RuntimeError(f"mpkernels extension unavailable on the GPU machine: {e}") from e
            pytest.skip(f"mpkernels extension unavailable: {e}")
    return mc


class OpNames(TorchDispatchMode):
    """Records the name of every op that does work (no views, no bare allocations): what the
    launch-count tests of the fused ops count."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False) and func.overloadpacket not in (torch.ops.aten.empty,
                                                                               torch.ops.aten.empty_strided):
            self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def clip_in_a_gap(x, y, t):
    """A clip value for ``mp_sum_clip(x, y, t, clip)`` far from every |s| (s in fp64 from the rounded
    inputs), so that the oracle, eager PyTorch and a kernel (each deciding on its own rounding of s)
    clip the same elements."""
    from mpkernels import reference
    s = reference.mp_sum(x.double(), y.double(), t).abs().flatten().sort().values
    s = s[(s > 0.3) & (s < 1.2)]
    gaps = s[1:] - s[:-1]
    i = int(gaps.argmax())
    assert float(gaps[i]) > 2e-2, "no clear gap for the clip value; change the seed"
    return float(s[i] + s[i + 1]) / 2


def record_triton_launches(monkeypatch, keep=lambda cfg, args: cfg) -> list:
    """Record every Triton launch (``keep(cfg, args)`` of each) for the rest of the test."""
    from mpkernels.triton import _common
    seen = []
    original = _common.launch

    def recording(cfg, grid, *args, **kwargs):
        seen.append(keep(cfg, args))
        return original(cfg, grid, *args, **kwargs)

    monkeypatch.setattr(_common, "launch", recording)
    return seen


@pytest.fixture
def declared_triton_launches(monkeypatch):
    """The test's Triton launch configurations; afterwards each must be one the backend declares in
    ``all_configs()`` (the ones the AOT test compiles). Empty where Triton is not installed."""
    try:
        from mpkernels.triton import _common
    except ImportError:
        yield []
        return
    seen = record_triton_launches(monkeypatch)
    yield seen
    declared = set(_common.all_configs())
    undeclared = [c.name for c in seen if c not in declared]
    assert not undeclared, f"launched configurations missing from all_configs(): {undeclared}"


def assert_compile_matches_eager(step, make_leaves, backend: str, tol: float = 1e-6) -> None:
    """``step(*leaves) -> loss`` under ``torch.compile(fullgraph=True)`` (aot_eager: the custom ops
    traced, no graph break) gives eager's loss and leaf gradients, with ``backend`` active (strict)."""
    import mpkernels as mk

    def grads(fn):
        leaves = make_leaves()
        with mk.use_backend(backend, strict=True):
            loss = fn(*leaves)
            loss.backward()
        return [loss.detach()] + [a.grad for a in leaves]

    torch._dynamo.reset()
    for g, w in zip(grads(torch.compile(step, fullgraph=True, backend="aot_eager")), grads(step)):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
