"""Backend ``'cuda'``: the compiled extension in ``csrc/`` (CUDA kernels and their CPU twins).

Ops: ``mp_silu``, ``pixel_norm``, ``pixel_norm_mp_silu``, ``modulated_mp_silu``, ``mp_sum``,
``mp_sum_clip``, ``mp_weight`` (and through it ``mp_conv2d`` / ``mp_linear``), forward and
backward, plus the multi-tensor in-place ``force_normalize_``, ``ema_lerp_`` and ``force_finite_``. They run on
CUDA tensors and on CPU tensors (C++ twins sharing the per-element math, parallel with
``at::parallel_for``), in float32, float16 and bfloat16, any layout; other calls (float64,
tensors of 2^31 elements or more) fall back to the reference.

Availability (see :mod:`mpkernels.cuda._build` for the environment variables):

* ``pip install`` builds the extension when the toolchain is complete (nvcc of torch's CUDA major
  version, ninja, a CUDA build of torch); the backend is then available at import. It never fails
  the install: otherwise, or on a compile error, it skips the extension and says why on stderr
  (``pip install -v``). ``MPKERNELS_BUILD_EXT=1`` / ``MPKERNELS_REQUIRE_EXT=1`` make that an error,
  ``MPKERNELS_BUILD_EXT=0`` skips it.
* Otherwise an earlier just-in-time build that is still current is loaded at import (cheap: no
  compiling, no GPU initialisation).
* Otherwise :func:`build` (or ``mk.set_backend('cuda')`` once :mod:`mpkernels._dispatch`
  calls a backend's ``prepare`` hook) compiles it just in time with ninja, or raises one
  :class:`ExtensionBuildError` naming what is missing. :func:`status` says which case holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _dispatch
from .._dispatch import register, register_backend
from . import _build, _ops
from ._build import ExtensionBuildError

__all__ = ["build", "is_available", "status", "ExtensionBuildError"]

_EXT = None            # the loaded extension module
_SOURCE = None         # 'prebuilt' | 'jit'
_REASONS: list[str] = []  # why nothing was loaded


def _activate(mod, source: str) -> None:
    global _EXT, _SOURCE
    _ops.define(mod)
    _EXT, _SOURCE = mod, source
    _dispatch.refresh_availability()  # availability is cached per process; a later build must show


def _load_existing() -> None:
    """Load a prebuilt or still-current just-in-time build; compiles nothing."""
    _REASONS.clear()
    for source, loader in (("prebuilt", _build.load_prebuilt), ("jit", _build.load_cached)):
        try:
            mod, reason = loader()
        except Exception as e:  # a broken build directory must not break `import mpkernels`
            mod, reason = None, f"{type(e).__name__}: {e}"
        if mod is not None:
            _activate(mod, source)
            return
        _REASONS.append(reason)


def is_available() -> bool:
    """True when the extension is loaded (cheap; never compiles, never touches a GPU)."""
    return _EXT is not None


def status() -> str:
    """Where the extension came from, or why it is not loaded."""
    if _EXT is not None:
        kind = "with CUDA kernels" if _EXT.with_cuda else "CPU kernels only"
        return f"loaded ({_SOURCE}, {kind}) from {getattr(_EXT, '__file__', '?')}"
    return "not loaded: " + "; ".join(_REASONS)


def build(verbose: bool = False):
    """Make the backend available: compile the extension just in time if needed, then load it.

    Reuses a current build (prebuilt or cached) without compiling. The first compile takes a few
    minutes (``MAX_JOBS`` parallel jobs). Raises :class:`ExtensionBuildError` with what is missing.
    Returns the extension module.
    """
    if _EXT is None:
        _load_existing()
    if _EXT is None:
        _activate(_build.build(verbose=verbose), "jit")
    return _EXT


def _prepare() -> None:
    """Hook for ``set_backend('cuda')``: build on explicit request."""
    build()


# ------------------------------------------------------------------------------------------------
# Implementations registered with the dispatcher. They receive the validated arguments of the
# public op (mpkernels.functional) and call the custom ops.

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_NUMEL = 2 ** 31 - 1


def _ok(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t.dtype not in _DTYPES or t.numel() > _MAX_NUMEL:
            return False
        if t.is_cuda and not (_EXT is not None and _EXT.with_cuda):
            return False
    return True


def _gain_ok(gain, w: torch.Tensor) -> bool:
    return not isinstance(gain, torch.Tensor) or (_ok(gain) and gain.dim() <= w.dim())


def mp_silu(x):
    return _ops.get().mp_silu(x)


def pixel_norm(x, eps=1e-4):
    return _ops.get().pixel_norm(x, eps)[0]


def pixel_norm_mp_silu(x, eps=1e-4):
    xn, y, _ = _ops.get().pixel_norm_mp_silu(x, eps)
    return xn, y


def modulated_mp_silu(y, c):
    return _ops.get().modulated_mp_silu(y, c)


def mp_sum(a, b, t=0.5):
    return _ops.get().mp_sum_clip(a, b, t, math.inf)


def mp_sum_clip(a, b, t, clip):
    return _ops.get().mp_sum_clip(a, b, t, clip)


def mp_weight(w, gain=1.0, eps=1e-4, qkv_heads=None):
    if isinstance(gain, torch.Tensor):
        y = _ops.get().mp_weight_t(w, gain, eps)[0]
    else:
        y = _ops.get().mp_weight(w, float(gain), eps)[0]
    if qkv_heads is not None:  # head-contiguous q, k, v rows: a gather of the (small) weight
        from ..reference import head_contiguous_rows
        y = y.index_select(0, head_contiguous_rows(w.shape[0], qkv_heads, w.device))
    return y


def mp_conv2d(x, w, gain=1.0, qkv_heads=None):
    return F.conv2d(x, mp_weight(w, gain, qkv_heads=qkv_heads).to(x.dtype), padding=w.shape[-1] // 2)


def mp_linear(x, w, gain=1.0):
    return F.linear(x, mp_weight(w, gain).to(x.dtype))


def _lean_inplace(tensors) -> bool:
    """Eager call on plain CPU / CUDA tensors with nothing intercepting ops: the in-place multi-tensor
    ops call the extension directly (and bump the version counters of what they wrote, as the
    custom op's functionalization does) instead of going through the ``torch.library`` custom op,
    whose argument handling costs about 3 us per tensor on the CPU here. Same rules as the other
    lean paths (:func:`mpkernels.cuda._multi_weight._lean`): never while tracing, under a dispatch
    or function mode, or on the meta device."""
    from ._multi_weight import _lean
    return _ops._EXT is not None and _lean(tensors)


def force_normalize_(tensors, eps=1e-4):
    tensors = list(tensors)
    with torch.no_grad():
        if _lean_inplace(tensors):
            _ops._EXT.force_normalize_(tensors, eps)
            torch.autograd.graph.increment_version(tensors)
        else:
            _ops.get().force_normalize_(tensors, eps)


def ema_lerp_(ema_tensors, tensors, weight):
    ema_tensors, tensors = list(ema_tensors), list(tensors)
    with torch.no_grad():
        if not isinstance(weight, torch.Tensor) and _lean_inplace(ema_tensors + tensors):
            _ops._EXT.ema_lerp_(ema_tensors, tensors, float(weight))
            torch.autograd.graph.increment_version(ema_tensors)
        else:
            _ops.get().ema_lerp_(ema_tensors, tensors, weight)


def force_finite_(tensors):
    tensors = list(tensors)
    with torch.no_grad():
        if _lean_inplace(tensors):
            _ops._EXT.force_finite_(tensors)
            torch.autograd.graph.increment_version(tensors)
        else:
            _ops.get().force_finite_(tensors)


_DESCRIPTION = "compiled extension (csrc/): CUDA kernels and C++ CPU twins"
# prepare: an explicit set_backend('cuda') builds the extension just in time when it is missing.
register_backend("cuda", priority=30, is_available=is_available, auto_devices=("cuda", "cpu"),
                 description=_DESCRIPTION, prepare=_prepare)

_DEVICES = ("cuda", "cpu")
register("mp_silu", "cuda", mp_silu, devices=_DEVICES, supports=lambda x: _ok(x))
register("pixel_norm", "cuda", pixel_norm, devices=_DEVICES, supports=lambda x, eps=1e-4: _ok(x))
register("pixel_norm_mp_silu", "cuda", pixel_norm_mp_silu, devices=_DEVICES, supports=lambda x, eps=1e-4: _ok(x))
register("modulated_mp_silu", "cuda", modulated_mp_silu, devices=_DEVICES, supports=lambda y, c: _ok(y, c))
register("mp_sum", "cuda", mp_sum, devices=_DEVICES, supports=lambda a, b, t=0.5: _ok(a, b))
register("mp_sum_clip", "cuda", mp_sum_clip, devices=_DEVICES, supports=lambda a, b, t, clip: _ok(a, b))
register("mp_weight", "cuda", mp_weight, devices=_DEVICES,
         supports=lambda w, gain=1.0, eps=1e-4, qkv_heads=None: _ok(w) and _gain_ok(gain, w))
register("mp_conv2d", "cuda", mp_conv2d, devices=_DEVICES,
         supports=lambda x, w, gain=1.0, qkv_heads=None: _ok(w) and x.dtype in _DTYPES and _gain_ok(gain, w))
register("mp_linear", "cuda", mp_linear, devices=_DEVICES,
         supports=lambda x, w, gain=1.0: _ok(w) and x.dtype in _DTYPES and _gain_ok(gain, w))
register("force_normalize_", "cuda", force_normalize_, devices=_DEVICES,
         supports=lambda tensors, eps=1e-4: _ok(*tensors))
register("ema_lerp_", "cuda", ema_lerp_, devices=_DEVICES,
         supports=lambda ema_tensors, tensors, weight: _ok(*ema_tensors, *tensors))
register("force_finite_", "cuda", force_finite_, devices=_DEVICES, supports=lambda tensors: _ok(*tensors))

_load_existing()

from . import _cat_silu  # noqa: E402,F401  (mp_cat_mp_silu from the extension's mp_cat + mp_silu)
from . import _attention  # noqa: E402,F401  (cosine_attention and mp_cat on the extension)
from . import _multi_weight  # noqa: E402,F401  (mp_weights: all effective weights in one launch per dtype)
from . import _compositions  # noqa: E402,F401  (the fused block-boundary ops as sequences of the extension's ops)
