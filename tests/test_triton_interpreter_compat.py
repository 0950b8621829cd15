"""The Triton interpreter fixes of ``mpkernels.triton._interpreter`` on every supported version.

Triton <= 3.6 turns an interpreted scalar into a Python int with ``int(array)``; its scalars
are arrays of shape ``(1,)``, which NumPy >= 2.4 refuses, so every runtime loop bound failed
(``scripts/test_compat.sh`` runs this under Triton 3.6). These tests run a kernel with a runtime
loop bound and check the patched conversion directly.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch

from conftest import KERNEL_DEVICE

pytestmark = pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="interpreter only (CPU tensors)")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from mpkernels.triton import INTERPRET  # noqa: E402

if not INTERPRET:  # pragma: no cover
    pytest.skip("TRITON_INTERPRET is not set", allow_module_level=True)
from mpkernels.triton import _interpreter  # noqa: E402
from triton.runtime import interpreter as interp  # noqa: E402


@triton.jit
def _row_sums(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):  # runtime bound: int() of an interpreted scalar
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * n + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


def test_runtime_loop_bound_runs():
    x = torch.randn(3, 37)
    out = torch.empty(3)
    _row_sums[(3,)](x, out, x.shape[1], BLOCK=16)
    torch.testing.assert_close(out, x.sum(1))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_scalar_index_of_any_rank(shape):
    t = tl.core.tensor(interp.TensorHandle(np.full(shape, 7, dtype=np.int32), tl.int32), tl.int32)
    assert _interpreter._scalar_index(t) == 7


def test_scalar_index_refuses_a_block():
    t = tl.core.tensor(interp.TensorHandle(np.arange(4, dtype=np.int32), tl.int32), tl.block_type(tl.int32, [4]))
    with pytest.raises(TypeError, match="scalar"):
        _interpreter._scalar_index(t)


def test_patch_installs_and_restores_index():
    """The patched ``_patch_lang_tensor`` sets ``__index__`` for the launch and the scope restores it."""
    assert getattr(interp._patch_lang_tensor, "_mpkernels_patched", False)
    before = getattr(tl.core.tensor, "__index__", None)
    scope = interp._LangPatchScope()
    interp._patch_lang_tensor(tl.core.tensor, scope)
    t = tl.core.tensor(interp.TensorHandle(np.array([5], dtype=np.int64), tl.int64), tl.int64)
    assert operator.index(t) == 5
    scope.restore()
    assert getattr(tl.core.tensor, "__index__", None) is before
