"""Fixes for running the kernels under ``TRITON_INTERPRET=1`` (CPU tests only).

The interpreter stores bfloat16 tensors as raw ``uint16`` numpy arrays, and two of its bf16
paths differ from what the GPU does:

* ``tl.dot`` multiplies those raw integers. On a GPU a bf16 dot multiplies the values exactly
  and accumulates in fp32; here the operands are widened to fp32 first, which is the same.
* ``x.to(tl.bfloat16)`` from fp32 truncates the mantissa. The GPU rounds to nearest even
  (``cvt.rn.bf16.f32``); here it does too.

Triton 3.6's interpreter also turns a scalar into a Python int (a runtime loop bound, a
``range(0, n, BLOCK)`` over a runtime ``n``) with ``int(array)``; its scalars are 1-element
arrays of shape ``(1,)``, which NumPy >= 2.4 refuses to convert. Later Triton squeezes the
array first; here every version does.

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


def _scalar_index(self) -> int:
    """``operator.index`` of an interpreted scalar tensor (a 1-element array of any rank)."""
    data = np.asarray(self.handle.data)
    if data.size != 1:
        raise TypeError(f"only a scalar can be used as an index, got a block of shape {data.shape}")
    return int(data.reshape(()))


def _patch_index() -> None:
    """Make ``int()`` of an interpreted scalar work under NumPy >= 2.4 (Triton <= 3.6)."""
    original = getattr(_interp, "_patch_lang_tensor", None) if _interp is not None else None
    if original is None or getattr(original, "_mpkernels_patched", False):
        return

    def _patch_lang_tensor(tensor, *rest, **kwargs):
        original(tensor, *rest, **kwargs)
        scope = rest[0] if rest else kwargs.get("scope")
        if scope is not None and hasattr(scope, "set_attr"):  # restored with the rest when the launch ends
            scope.set_attr(tensor, "__index__", _scalar_index)
        else:
            tensor.__index__ = _scalar_index

    _patch_lang_tensor._mpkernels_patched = True
    _interp._patch_lang_tensor = _patch_lang_tensor


def _patch() -> None:
    _patch_index()
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
