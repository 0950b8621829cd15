"""Argument checks shared by every public op.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong value, shape or device) with a message that starts with the argument's
name, before any kernel is launched.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def tensor(x, name: str, *, ndim: int | None = None, min_ndim: int | None = None,
           allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {x.dtype}; expected {_DTYPE_NAMES}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(x.shape)}")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name}: empty tensor (shape {tuple(x.shape)}) is not supported")
    return x


def same_device(pairs: list[tuple[str, torch.Tensor]]) -> None:
    (n0, t0), rest = pairs[0], pairs[1:]
    for n, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{n}: on device {t.device} but {n0} is on {t0.device}; all tensors must share a device")


def same_shape(na: str, a: torch.Tensor, nb: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{nb}: shape {tuple(b.shape)} does not match {na} shape {tuple(a.shape)}")


def same_dtype(na: str, a: torch.Tensor, nb: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{nb}: dtype {b.dtype} does not match {na} dtype {a.dtype}")


def number(v, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if type(v) is not float and type(v) is not int:  # the common cases first: no ABC check
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {v}")
    return v


def interp_t(t, name: str = "t") -> float:
    """Blend factor of mp_sum / mp_cat: a number in [0, 1]."""
    return number(t, name, lo=0.0, hi=1.0)


def eps(v, name: str = "eps") -> float:
    return number(v, name, lo=0.0)


def gain(g, name: str = "gain", device: torch.device | None = None):
    """A gain is a real number or a one-element floating tensor (e.g. a learned scalar parameter)."""
    if isinstance(g, torch.Tensor):
        if g.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: unsupported dtype {g.dtype}; expected {_DTYPE_NAMES}")
        if g.numel() != 1:
            raise ValueError(f"{name}: a tensor gain must have exactly one element, got shape {tuple(g.shape)}")
        if device is not None and g.device != device:
            raise ValueError(f"{name}: on device {g.device} but the weight is on {device}")
        return g
    return number(g, name)


def dim(d: int, ndim: int, name: str = "dim") -> int:
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"{name}: expected an int, got {type(d).__name__}")
    if not -ndim <= d < ndim:
        raise ValueError(f"{name}: {d} out of range for a {ndim}-d tensor")
    return d % ndim


def dims(d, ndim: int, name: str = "dim") -> tuple[int, ...] | None:
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        out = tuple(dim(i, ndim, name) for i in d)
        if len(set(out)) != len(out):
            raise ValueError(f"{name}: repeated dimension in {d}")
        if not out:
            raise ValueError(f"{name}: empty list of dimensions")
        return out
    return (dim(d, ndim, name),)


_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)


def tensor_list(ts, name: str) -> list[torch.Tensor]:
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple of tensors, got {type(ts).__name__}")
    ts = list(ts)
    # One pass without building entry names (about 0.2 us per tensor); on a failure, the per-entry
    # checks name the first bad one.
    if not all(isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPE_SET for t in ts):
        for i, t in enumerate(ts):
            tensor(t, f"{name}[{i}]", allow_empty=True)
    return ts


def same_device_lists(lists: list[tuple[str, list[torch.Tensor]]]) -> None:
    """:func:`same_device` over named lists (``ValueError`` naming ``name[i]``), names built only on
    a failure."""
    first = next((ts[0] for _, ts in lists if ts), None)
    if first is None:
        return
    dev = first.device
    if all(t.device == dev for _, ts in lists for t in ts):
        return
    same_device([(f"{name}[{i}]", t) for name, ts in lists for i, t in enumerate(ts)])


def lerp_weight(w, name: str = "weight", device: torch.device | None = None):
    """Blend weight of ``ema_lerp_``: a number in [0, 1], or a 0-d floating tensor on ``device``.

    A tensor weight is what a CUDA graph needs (a replay reads its current value). Its range is
    checked only where that is free: on the CPU. A CUDA tensor is not range-checked, since reading
    it would synchronize with the device (and is illegal while a graph is being captured).
    """
    if isinstance(w, torch.Tensor):
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: unsupported dtype {w.dtype}; expected {_DTYPE_NAMES}")
        if w.dim() != 0:
            raise ValueError(f"{name}: a tensor weight must be 0-d, got shape {tuple(w.shape)}")
        if device is not None and w.device != device:
            raise ValueError(f"{name}: on device {w.device} but the tensors are on {device}")
        if w.device.type == "cpu" and not torch.compiler.is_compiling():
            number(float(w), name, lo=0.0, hi=1.0)
        return w
    return number(w, name, lo=0.0, hi=1.0)


def writable_in_place(t: torch.Tensor, name: str, i: int) -> None:
    """``ValueError`` naming ``name[i]`` when ``t`` has internally overlapping memory (a dim of
    stride 0 and size > 1, as an expanded view has): an in-place write would race with itself.
    Contiguous tensors (the common case) pass at the cost of one C call."""
    if t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return
    if any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride())):
        raise ValueError(f"{name}[{i}]: has internally overlapping memory (an expanded view?) and cannot be "
                         f"updated in place; pass a tensor that owns its elements (e.g. .clone())")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last + 1)`` byte addresses ``t`` can reach: from ``data_ptr`` (storage start plus
    ``storage_offset * itemsize``) over ``1 + sum((size - 1) * stride)`` elements."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.nbytes
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


def no_overlap(lists: list[tuple[str, list[torch.Tensor], bool]]) -> None:
    """Raise ``ValueError`` naming two entries whose memory overlaps, unless both are read-only.

    ``lists``: ``(name, tensors, written)``, all on one device; entries of a ``written`` list are
    updated in place. Two tensors overlap when their reachable byte ranges intersect
    (:func:`_byte_span`): for tensors of one storage that is ``[storage_offset * itemsize,
    (storage_offset + extent) * itemsize)``, so disjoint views of one buffer (the pieces of a flat
    parameter buffer) pass, while interleaved views (``w[:, :4]``, ``w[:, 4:]``) are refused even
    though they share no element. Ranges are compared as absolute addresses: live storages never
    share addresses unless they alias one memory block (``from_blob``, DLPack), which is a real
    overlap too. Empty tensors never overlap. One sort of all ranges, then one sweep: O(n log n),
    about 1 us per tensor.

    Skipped on the meta device and while ``torch.compile`` traces (no memory to compare).
    """
    if torch.compiler.is_compiling() or any(ts and ts[0].device.type == "meta" for _, ts, _ in lists):
        return
    spans = []
    for li, (_, ts, written) in enumerate(lists):
        for i, t in enumerate(ts):
            start, end = _byte_span(t)
            if end > start:
                spans.append((start, end, li, i, written))
    spans.sort()
    # Furthest-reaching range so far among written entries and among read-only ones: any range
    # that starts before it ends overlaps it (or another range that also overlaps the new one).
    w_end, w_who, r_end, r_who = -1, None, -1, None
    for start, end, li, i, written in spans:
        hit = w_who if w_end > start else (r_who if written and r_end > start else None)
        if hit is not None:
            _overlap_error(lists, hit, (li, i))
        if written:
            if end > w_end:
                w_end, w_who = end, (li, i)
        elif end > r_end:
            r_end, r_who = end, (li, i)


def _overlap_error(lists, a: tuple[int, int], b: tuple[int, int]) -> None:
    later, earlier = max(a, b), min(a, b)  # name the entry that comes later in the arguments first

    def describe(who):
        name, ts, _ = lists[who[0]]
        t = ts[who[1]]
        return f"{name}[{who[1]}]", t.storage_offset() * t.element_size(), _byte_span(t)[1] - t.data_ptr()

    (n1, o1, l1), (n2, o2, l2) = describe(later), describe(earlier)
    raise ValueError(f"{n1} overlaps {n2} in memory (storage bytes [{o1}, {o1 + l1}) and [{o2}, {o2 + l2})): "
                     f"an in-place multi-tensor op needs every updated tensor in memory of its own; "
                     f"pass each tensor once")
