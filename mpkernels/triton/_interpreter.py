"""Fixes for running the kernels under ``TRITON_INTERPRET=1`` (CPU tests only).

The interpreter stores bfloat16 tensors as raw ``uint16`` numpy arrays and its ``tl.dot``
multiplies those integers. On a GPU a bf16 dot multiplies the values exactly and accumulates
in fp32; here the operands are widened to fp32 first, which computes the same thing. The
kernels themselves are unchanged, so the code tested is the GPU code. Imported only when the
interpreter is active.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl

try:
    from triton.runtime import interpreter as _interp
except ImportError:  # pragma: no cover - very old Triton
    _interp = None


def _patch() -> None:
    builder = getattr(_interp, "InterpreterBuilder", None) if _interp is not None else None
    if builder is None or getattr(builder, "_mpkernels_bf16_dot", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def widen(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h.data.astype(np.float32)
                return (h.data.astype(np.uint32) << 16).view(np.float32)
            out = np.matmul(widen(a), widen(b), dtype=np.float32).astype(d.data.dtype) + d.data
            return _interp.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, *args, **kwargs)

    builder.create_dot = create_dot
    builder._mpkernels_bf16_dot = True


_patch()
