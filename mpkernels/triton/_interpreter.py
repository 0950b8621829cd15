"""Fixes for running the kernels under ``TRITON_INTERPRET=1`` (CPU tests only).

The interpreter stores bfloat16 tensors as raw ``uint16`` numpy arrays, and two of its bf16
paths differ from what the GPU does:

* ``tl.dot`` multiplies those raw integers. On a GPU a bf16 dot multiplies the values exactly
  and accumulates in fp32; here the operands are widened to fp32 first, which is the same.
* ``x.to(tl.bfloat16)`` from fp32 truncates the mantissa. The GPU rounds to nearest even
  (``cvt.rn.bf16.f32``); here it does too.

The kernels themselves are unchanged, so the code tested is the GPU code. Imported only when
the interpreter is active.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl

try:
    from triton.runtime import interpreter as _interp
except ImportError:  # pragma: no cover - very old Triton
    _interp = None


def _bf16_bits_rtne(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):
        rounded = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded


def _widen_bf16(h) -> np.ndarray:
    if h.dtype.scalar != tl.bfloat16:
        return h.data.astype(np.float32)
    return (h.data.astype(np.uint32) << 16).view(np.float32)


def _patch() -> None:
    builder = getattr(_interp, "InterpreterBuilder", None) if _interp is not None else None
    if builder is None or getattr(builder, "_mpkernels_patched", False):
        return
    original_dot = builder.create_dot
    original_cast = builder.cast_impl

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            out = np.matmul(_widen_bf16(a), _widen_bf16(b), dtype=np.float32).astype(d.data.dtype) + d.data
            return _interp.TensorHandle(out, d.dtype.scalar)
        return original_dot(self, a, b, d, *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar == tl.float32:
            return _interp.TensorHandle(_bf16_bits_rtne(src.data), dst_type.scalar)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._mpkernels_patched = True


_patch()
