"""pytest-benchmark entries for the CPU-timed paths: ``pytest benchmarks/ --benchmark-only``.

Each fused combination is timed on every CPU backend next to the reference at an EDM2-like
shape ([8, 192, 32, 32] fp32); compare the rows of one run to read off speed-ups.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_root, os.path.join(_root, "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import mpkernels as mk  # noqa: E402

CPU_BACKENDS = [b for b in mk.available_backends() if b != "triton"]
SHAPE = (8, 192, 32, 32)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    return x, torch.randn(SHAPE, generator=g) * 200, torch.randn(SHAPE[:2], generator=g) + 1


CALLS = {
    "pixel_norm_mp_silu": lambda x, b, c: mk.pixel_norm_mp_silu(x),
    "modulated_mp_silu": lambda x, b, c: mk.modulated_mp_silu(x, c),
    "mp_sum_clip": lambda x, b, c: mk.mp_sum_clip(x * 200, b, 0.3, 256.0),
    "mp_silu": lambda x, b, c: mk.mp_silu(x),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", sorted(CALLS))
def test_cpu_forward(benchmark, op, backend):
    x, b, c = _inputs()
    fn = CALLS[op]
    benchmark.group = op
    with mk.use_backend(backend):
        benchmark(fn, x, b, c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", sorted(CALLS))
def test_cpu_forward_backward(benchmark, op, backend):
    x, b, c = _inputs()
    x.requires_grad_(True)
    c.requires_grad_(True)
    fn = CALLS[op]
    benchmark.group = op + " fwd+bwd"

    def step():
        out = fn(x, b, c)
        out = out[1] if isinstance(out, tuple) else out
        torch.autograd.grad(out, [x], torch.ones_like(out))

    with mk.use_backend(backend):
        benchmark(step)
