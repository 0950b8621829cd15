"""Multi-tensor, in-place ``force_normalize_``, ``ema_lerp_`` and ``force_finite_`` (spec §1 MPConv
step 2, spec §7, spec §6).

All tensors of one dtype are handled by a single launch that walks a table of work items.
Each item holds element offsets relative to a base pointer (the group's first tensor), so
the kernel does only typed pointer arithmetic (``base + offset``, int64): no integer-to-
pointer casts, which also makes the same code run under the Triton interpreter.

* ``force_normalize_``: one item per output row ``(offset, length)``, a few rows per program; the
  program computes each row's fp32 norm, then rewrites the row with ``w * 1/(eps + ||w||/sqrt(K))``.
* ``ema_lerp_``: one item per chunk of ``CHUNK`` elements ``(ema offset, src offset, count)``;
  ``e <- e + weight * (t - e)`` in fp32. The weight reaches the kernel as a 0-d fp32 tensor
  that the kernel loads, never as a launch argument, so a captured CUDA graph reads the value
  current at each replay (``beta`` changes every step). A number weight is put in a fresh 0-d
  tensor by a fill on the device (capture-safe, but then baked into the capture, as a number must be).
* ``force_finite_``: one item per chunk of ``CHUNK`` elements ``(offset, count)`` of a dense tensor
  (any layout: the op is element-wise); inf / NaN become 0, finite elements are stored unchanged.
  Under capture without a table (gradients allocated by the captured backward) it runs the
  reference's per-tensor kernels instead of raising; the ``cuda`` backend needs no table.

Rows must be contiguous blocks of memory (contiguous and channels_last weights both are) and
an EMA tensor must share its source's dense layout; other tensors (rare for parameters) are
handled one by one with the reference formula (capture-safe too).

Work tables and CUDA graphs
---------------------------
A table is built on the host (vectorized) the first time a set of tensors is seen, then copied
to the device once, from pinned memory without blocking the host, and kept in a store keyed on
the tensors' addresses, shapes and dtypes. Two rules make this safe under CUDA graph capture:

* No table is ever built while the current stream is being captured (a copy from the host is
  not allowed there): such a call raises ``RuntimeError``. Run the op once eagerly before
  capturing (the usual warm-up), or call :func:`prepare_force_normalize_`,
  :func:`prepare_ema_lerp_` or :func:`prepare_force_finite_` first.
* A table that a graph may read is never freed. The store keeps up to ``_RECENT_TABLES``
  unheld tables, least recently used evicted first; a *held* table is outside that limit.
  A table is held by each live :class:`WorkTables` handle that the ``prepare_*`` functions
  return (released by ``release()``, ``with``, or when the handle is garbage collected), and
  for good by every capture that uses it: nothing tells us when a captured graph is destroyed,
  and tables are small (16 bytes per weight row, 24 bytes per 16K-element EMA chunk).
"""

from __future__ import annotations

import collections
import functools
import weakref

import torch
import triton
import triton.language as tl

from .. import _validate as V
from .. import reference
from .._library import NAMESPACE
from . import _common as C


@triton.jit
def _force_normalize_kernel(base_ptr, table_ptr, n_rows, eps, ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    """ROWS table rows per program (possibly of different tensors and lengths), BLOCK_R columns at a time."""
    item = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = item < n_rows
    off = tl.load(table_ptr + 2 * item, mask=valid, other=0)
    R = tl.load(table_ptr + 2 * item + 1, mask=valid, other=0)
    rows = base_ptr + off[:, None]
    cols = tl.arange(0, BLOCK_R)[None, :]
    r_max = tl.max(R, axis=0)
    acc = tl.zeros([ROWS, BLOCK_R], dtype=tl.float32)
    for r0 in range(0, r_max, BLOCK_R):
        m = (r0 + cols) < R[:, None]
        x = tl.load(rows + r0 + cols, mask=m, other=0.0).to(tl.float32)
        acc += x * x
    inv = 1.0 / (eps + tl.sqrt(tl.sum(acc, axis=1)) / tl.sqrt(tl.maximum(R, 1).to(tl.float32)))
    for r0 in range(0, r_max, BLOCK_R):
        m = (r0 + cols) < R[:, None]
        x = tl.load(rows + r0 + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(rows + r0 + cols, (x * inv[:, None]).to(base_ptr.dtype.element_ty), mask=m)


@triton.jit
def _ema_lerp_kernel(e_base, t_base, table_ptr, weight_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    weight = tl.load(weight_ptr)  # fp32, read when the kernel runs (a graph replay sees the current value)
    e_ptr = e_base + tl.load(table_ptr + 3 * pid)
    t_ptr = t_base + tl.load(table_ptr + 3 * pid + 1)
    n = tl.load(table_ptr + 3 * pid + 2)
    for i in range(0, CHUNK, BLOCK):
        o = i + tl.arange(0, BLOCK)
        m = o < n
        e = tl.load(e_ptr + o, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + o, mask=m, other=0.0).to(tl.float32)
        tl.store(e_ptr + o, (e + weight * (t - e)).to(e_base.dtype.element_ty), mask=m)


@triton.jit
def _force_finite_kernel(base, table_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """inf / NaN -> 0 over one chunk ``(offset, count)``; a finite element is stored back unchanged
    (the test runs in fp32, which represents every fp16 / bf16 value exactly)."""
    pid = tl.program_id(0)
    p = base + tl.load(table_ptr + 2 * pid)
    n = tl.load(table_ptr + 2 * pid + 1)
    for i in range(0, CHUNK, BLOCK):
        o = i + tl.arange(0, BLOCK)
        m = o < n
        x = tl.load(p + o, mask=m, other=0.0)
        finite = tl.abs(x.to(tl.float32)) <= 3.4028234663852886e38  # FLT_MAX; false for NaN and inf
        tl.store(p + o, tl.where(finite, x, tl.zeros_like(x)), mask=m)


FN_ROWS = 4
FN_BLOCK_R = 512
EMA_BLOCK = 2048
EMA_CHUNK = 8 * EMA_BLOCK


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fn_config(d):
    return C.make_config(_force_normalize_kernel, ptrs=dict(base_ptr=d, table_ptr="i64"), floats=("eps",),
                         constexprs=dict(ROWS=FN_ROWS, BLOCK_R=FN_BLOCK_R), num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _ema_config(ed, td):
    return C.make_config(_ema_lerp_kernel, ptrs=dict(e_base=ed, t_base=td, table_ptr="i64", weight_ptr="fp32"),
                         constexprs=dict(CHUNK=EMA_CHUNK, BLOCK=EMA_BLOCK), num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _finite_config(d):
    return C.make_config(_force_finite_kernel, ptrs=dict(base=d, table_ptr="i64"),
                         constexprs=dict(CHUNK=EMA_CHUNK, BLOCK=EMA_BLOCK), num_warps=4, num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        yield _fn_config(d)
        yield _finite_config(d)
        for td in C.DTYPES:
            yield _ema_config(d, td)


# --- work tables -----------------------------------------------------------------------------

_RECENT_TABLES = 16  # unheld tables kept for reuse (least recently used evicted first)


class _TableStore:
    """Device work tables by key: recently used ones in a bounded LRU, held ones never evicted."""

    def __init__(self, recent_size: int):
        self.recent_size = recent_size
        self.recent: collections.OrderedDict = collections.OrderedDict()  # key -> table
        self.held: dict = {}  # key -> [table, number of holds]
        self.builds = 0  # tables built so far (tests and diagnostics)

    def get(self, key, build, op: str) -> torch.Tensor:
        """The table for ``key``, built by ``build()`` if missing; held for good when used in a capture."""
        entry = self.held.get(key)
        capturing = _capturing()
        if entry is not None:
            entry[1] += capturing
            return entry[0]
        table = self.recent.get(key)
        if table is None:
            if capturing:
                raise RuntimeError(
                    f"{op} (Triton): no work table for these tensors, and a CUDA graph is being captured, "
                    f"where the host-to-device copy that builds one is not allowed. Run the op once before "
                    f"capturing (warm-up), or keep its tables with mpkernels.triton.multi_tensor.prepare_{op}(...)")
            table = build()
            self.builds += 1
            self.recent[key] = table
        if capturing:  # the graph reads this table at every replay: never free it
            del self.recent[key]
            self.held[key] = [table, 1]
        else:
            self.recent.move_to_end(key)
            while len(self.recent) > self.recent_size:
                self.recent.popitem(last=False)
        return table

    def hold(self, key, build, op: str) -> torch.Tensor:
        table = self.get(key, build, op)
        entry = self.held.get(key)
        if entry is None:
            del self.recent[key]
            self.held[key] = [table, 1]
        else:
            entry[1] += 1
        return table

    def release(self, key) -> None:
        entry = self.held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:  # back among the recent ones, evictable
            del self.held[key]
            self.recent[key] = entry[0]
            while len(self.recent) > self.recent_size:
                self.recent.popitem(last=False)

    def __contains__(self, key) -> bool:
        return key in self.held or key in self.recent


_TABLES = _TableStore(_RECENT_TABLES)


def _capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except RuntimeError:  # no usable CUDA driver: nothing can be capturing
        return False


class WorkTables:
    """Keeps the device work tables of one tensor list alive and out of eviction (for CUDA graphs).

    Returned by the ``prepare_*`` functions of this module; the tables stay
    held until :meth:`release`, the end of a ``with`` block, or garbage collection of the handle.
    Keep it at least as long as a graph captured with those tensors (captures also hold the
    tables they use for good, so this matters only when building tables ahead of time).
    """

    def __init__(self, keys: list):
        self.keys = list(keys)
        self._finalizer = weakref.finalize(self, _release_all, self.keys)

    def release(self) -> None:
        self._finalizer()  # runs once

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _release_all(keys) -> None:
    for key in keys:
        _TABLES.release(key)


def _on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``: for CUDA through pinned memory, asynchronously on the current stream
    (the caching host allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _rows_are_blocks(w: torch.Tensor) -> bool:
    """Each output row ``w[i]`` is one contiguous block of memory, rows one after another
    (contiguous and channels_last weights alike: normalization ignores the order inside a row)."""
    return w.is_contiguous() or (C.is_dense(w) and (w.shape[0] == 1 or w.stride(0) * w.shape[0] == w.numel()))


def _elem_offset(t: torch.Tensor, base: torch.Tensor) -> int:
    diff = t.data_ptr() - base.data_ptr()
    assert diff % t.element_size() == 0
    return diff // t.element_size()


def _row_table(ws: list[torch.Tensor]) -> torch.Tensor:
    base = ws[0]
    parts = []
    for w in ws:
        rows = w.shape[0]
        k = w.numel() // rows
        offs = _elem_offset(w, base) + torch.arange(rows, dtype=torch.int64) * k
        parts.append(torch.stack([offs, torch.full_like(offs, k)], dim=1))
    return _on_device(torch.cat(parts).contiguous(), base.device)


def _chunk_table(*lists: list[torch.Tensor]) -> torch.Tensor:
    """One row per chunk of ``EMA_CHUNK`` elements of the first list's tensors: the chunk's element
    offset in each list (relative to that list's first tensor; entry ``i`` of every list has the
    same size and layout), then its element count."""
    parts = []
    for entry in zip(*lists):
        n = entry[0].numel()
        starts = torch.arange(0, n, EMA_CHUNK, dtype=torch.int64)
        offsets = [_elem_offset(t, ts[0]) + starts for t, ts in zip(entry, lists)]
        parts.append(torch.stack([*offsets, (n - starts).clamp(max=EMA_CHUNK)], dim=1))
    return _on_device(torch.cat(parts).contiguous(), lists[0][0].device)


def _key(kind: str, *lists):
    # Addresses, shapes and dtypes determine a table's content (offsets between the tensors);
    # the tensors share one device (validated by mpkernels.functional).
    return (kind, lists[0][0].device) + tuple((t.data_ptr(), tuple(t.shape), t.dtype) for ts in lists for t in ts)


def _row_groups(tensors):
    """``({dtype: tensors whose rows are blocks}, [other tensors])``."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    rest = []
    for w in tensors:
        if _rows_are_blocks(w):
            groups.setdefault(w.dtype, []).append(w)
        else:
            rest.append(w)
    return groups, rest


def _chunk_groups(ema_tensors, tensors):
    """``({(ema dtype, src dtype): (emas, srcs)}, [(ema, src) pairs of differing layouts])``."""
    groups: dict[tuple, tuple[list, list]] = {}
    rest = []
    for e, t in zip(ema_tensors, tensors):
        if (e.is_contiguous() and t.is_contiguous()) or (C.is_dense(e) and C.same_layout(e, t)):
            es, ts = groups.setdefault((e.dtype, t.dtype), ([], []))
            es.append(e)
            ts.append(t)
        else:
            rest.append((e, t))
    return groups, rest


def _flat_groups(tensors):
    """``({dtype: non-empty dense tensors}, [other non-empty tensors])``: an element-wise op runs over
    a dense tensor's memory in any layout."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    rest = []
    for t in tensors:
        if t.numel() == 0:
            continue
        if C.is_dense(t):
            groups.setdefault(t.dtype, []).append(t)
        else:
            rest.append(t)
    return groups, rest


def _force_normalize_impl(tensors: list[torch.Tensor], eps: float) -> None:
    groups, rest = _row_groups(tensors)
    if rest:
        reference.force_normalize_(rest, eps)
    for dtype, ws in groups.items():
        table = _TABLES.get(_key("rows", ws), lambda: _row_table(ws), "force_normalize_")
        n_rows = table.shape[0]
        C.launch(_fn_config(dtype), (C.cdiv(n_rows, FN_ROWS),), ws[0], table, n_rows, float(eps))


def _ema_lerp_impl(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], weight: torch.Tensor) -> None:
    groups, rest = _chunk_groups(ema_tensors, tensors)
    if rest:
        reference.ema_lerp_([e for e, _ in rest], [t for _, t in rest], weight)
    w32 = weight.to(torch.float32)  # on the device: no sync, capture-safe
    for (ed, td), (es, ts) in groups.items():
        table = _TABLES.get(_key("chunks", es, ts), lambda: _chunk_table(es, ts), "ema_lerp_")
        C.launch(_ema_config(ed, td), (table.shape[0],), es[0], ts[0], table, w32)


def _force_finite_impl(tensors: list[torch.Tensor]) -> None:
    groups, rest = _flat_groups(tensors)
    if rest:
        reference.force_finite_(rest)
    for dtype, ts in groups.items():
        key = _key("flat", ts)
        if key not in _TABLES and _capturing():
            # Gradients are usually allocated inside the captured step, so their table cannot
            # exist yet and cannot be built now: the reference's per-tensor kernels (capture-safe).
            reference.force_finite_(ts)
            continue
        table = _TABLES.get(key, lambda: _chunk_table(ts), "force_finite_")
        C.launch(_finite_config(dtype), (table.shape[0],), ts[0], table)


# Custom ops that declare what they mutate: autograd bumps the version counters (as copy_ would),
# and on the meta device (launch accounting, tracing) they are no-ops with the right signature.
_force_normalize_op = torch.library.custom_op(
    f"{NAMESPACE}::triton_force_normalize_", _force_normalize_impl, mutates_args=("tensors",),
    schema="(Tensor(a!)[] tensors, float eps) -> ()")
_force_normalize_op.register_fake(lambda tensors, eps: None)
_ema_lerp_op = torch.library.custom_op(
    f"{NAMESPACE}::triton_ema_lerp_", _ema_lerp_impl, mutates_args=("ema_tensors",),
    schema="(Tensor(a!)[] ema_tensors, Tensor[] tensors, Tensor weight) -> ()")
_ema_lerp_op.register_fake(lambda ema_tensors, tensors, weight: None)
_force_finite_op = torch.library.custom_op(
    f"{NAMESPACE}::triton_force_finite_", _force_finite_impl, mutates_args=("tensors",),
    schema="(Tensor(a!)[] tensors) -> ()")
_force_finite_op.register_fake(lambda tensors: None)


# --- public entry points --------------------------------------------------------------------

@torch.no_grad()
def force_normalize_(tensors: list[torch.Tensor], eps: float) -> None:
    _force_normalize_op(list(tensors), float(eps))


@torch.no_grad()
def ema_lerp_(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], weight) -> None:
    """``weight``: a number or a 0-d floating tensor on the tensors' device (read by the kernel)."""
    ema_tensors = list(ema_tensors)
    if not isinstance(weight, torch.Tensor):
        if not ema_tensors:
            return
        weight = torch.full((), float(weight), dtype=torch.float32, device=ema_tensors[0].device)
    _ema_lerp_op(ema_tensors, list(tensors), weight)


@torch.no_grad()
def force_finite_(tensors: list[torch.Tensor]) -> None:
    _force_finite_op(list(tensors))


def _hold_all(pieces, kind: str, build, op: str) -> WorkTables:
    """Build (if missing) and hold the table of every piece (a tuple of tensor lists: one dtype group)."""
    keys = []
    for lists in pieces:
        key = _key(kind, *lists)
        _TABLES.hold(key, lambda: build(*lists), op)
        keys.append(key)
    return WorkTables(keys)


def prepare_force_normalize_(tensors) -> WorkTables:
    """Build (eagerly) and hold the device work tables :func:`force_normalize_` uses for ``tensors``.

    Call before capturing a CUDA graph that normalizes these tensors; keep the handle while the
    graph lives. Raises ``RuntimeError`` when a table is missing and a capture is under way.
    """
    groups, _ = _row_groups(V.tensor_list(tensors, "tensors"))
    return _hold_all([(ws,) for ws in groups.values()], "rows", _row_table, "force_normalize_")


def prepare_ema_lerp_(ema_tensors, tensors) -> WorkTables:
    """Build (eagerly) and hold the device work tables :func:`ema_lerp_` uses for these lists;
    see :func:`prepare_force_normalize_`."""
    es, ts = V.tensor_list(ema_tensors, "ema_tensors"), V.tensor_list(tensors, "tensors")
    if len(es) != len(ts):
        raise ValueError(f"tensors: {len(ts)} tensors but ema_tensors has {len(es)}")
    groups, _ = _chunk_groups(es, ts)
    return _hold_all(groups.values(), "chunks", _chunk_table, "ema_lerp_")


def prepare_force_finite_(tensors) -> WorkTables:
    """Build (eagerly) and hold the device work tables :func:`force_finite_` uses for ``tensors``;
    see :func:`prepare_force_normalize_`."""
    groups, _ = _flat_groups(V.tensor_list(tensors, "tensors"))
    return _hold_all([(ts,) for ts in groups.values()], "flat", _chunk_table, "force_finite_")


def supports_force_finite(tensors) -> bool:
    return all(t.dtype in C.DTYPES for t in tensors)


def supports_force_normalize(tensors, eps) -> bool:
    return all(t.dtype in C.DTYPES for t in tensors)


def supports_ema_lerp(ema_tensors, tensors, weight) -> bool:
    return all(t.dtype in C.DTYPES for t in list(ema_tensors) + list(tensors))
