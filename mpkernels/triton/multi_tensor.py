"""Multi-tensor, in-place ``force_normalize_`` and ``ema_lerp_`` (spec §1 MPConv step 2, spec §7).

All tensors of one dtype are handled by a single launch that walks a table of work items.
Each item holds element offsets relative to a base pointer (the group's first tensor), so
the kernel does only typed pointer arithmetic (``base + offset``, int64): no integer-to-
pointer casts, which also makes the same code run under the Triton interpreter.

* ``force_normalize_``: one item per output row ``(offset, length)``, a few rows per program; the
  program computes each row's fp32 norm, then rewrites the row with ``w * 1/(eps + ||w||/sqrt(K))``.
* ``ema_lerp_``: one item per chunk of ``CHUNK`` elements ``(ema offset, src offset, count)``;
  ``e <- e + weight * (t - e)`` in fp32.

The tables are built on the host (vectorized) and cached per set of tensors, so a trainer
that calls these every step with the same parameters pays for one small host-to-device copy
once. Rows must be contiguous blocks of memory (contiguous and channels_last weights both are) and
an EMA tensor must share its source's dense layout; other tensors (rare for parameters) are
handled one by one with the reference formula.
"""

from __future__ import annotations

import functools
import collections

import torch
import triton
import triton.language as tl

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
def _ema_lerp_kernel(e_base, t_base, table_ptr, weight, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    e_ptr = e_base + tl.load(table_ptr + 3 * pid)
    t_ptr = t_base + tl.load(table_ptr + 3 * pid + 1)
    n = tl.load(table_ptr + 3 * pid + 2)
    for i in range(0, CHUNK, BLOCK):
        o = i + tl.arange(0, BLOCK)
        m = o < n
        e = tl.load(e_ptr + o, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + o, mask=m, other=0.0).to(tl.float32)
        tl.store(e_ptr + o, (e + weight * (t - e)).to(e_base.dtype.element_ty), mask=m)


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
    return C.make_config(_ema_lerp_kernel, ptrs=dict(e_base=ed, t_base=td, table_ptr="i64"), floats=("weight",),
                         constexprs=dict(CHUNK=EMA_CHUNK, BLOCK=EMA_BLOCK), num_warps=4, num_stages=1)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        yield _fn_config(d)
        for td in C.DTYPES:
            yield _ema_config(d, td)


# --- work tables -----------------------------------------------------------------------------

_TABLE_CACHE: collections.OrderedDict = collections.OrderedDict()
_TABLE_CACHE_SIZE = 16


def _cached(key, build):
    t = _TABLE_CACHE.get(key)
    if t is None:
        t = build()
        _TABLE_CACHE[key] = t
        while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return t


def _rows_are_blocks(w: torch.Tensor) -> bool:
    """Each output row ``w[i]`` is one contiguous block of memory, rows one after another
    (contiguous and channels_last weights alike: normalization ignores the order inside a row)."""
    return C.is_dense(w) and (w.shape[0] == 1 or w.stride(0) * w.shape[0] == w.numel())


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
    return torch.cat(parts).contiguous().to(base.device)


def _chunk_table(es: list[torch.Tensor], ts: list[torch.Tensor]) -> torch.Tensor:
    parts = []
    for e, t in zip(es, ts):
        n = e.numel()
        starts = torch.arange(0, n, EMA_CHUNK, dtype=torch.int64)
        parts.append(torch.stack([_elem_offset(e, es[0]) + starts, _elem_offset(t, ts[0]) + starts,
                                  (n - starts).clamp(max=EMA_CHUNK)], dim=1))
    return torch.cat(parts).contiguous().to(es[0].device)


def _key(*lists):
    return tuple((t.data_ptr(), tuple(t.shape), t.dtype, str(t.device)) for ts in lists for t in ts)


def _force_normalize_impl(tensors: list[torch.Tensor], eps: float) -> None:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for w in tensors:
        if _rows_are_blocks(w):
            groups.setdefault(w.dtype, []).append(w)
        else:
            reference.force_normalize_([w], eps)
    for dtype, ws in groups.items():
        table = _cached(("rows",) + _key(ws), lambda: _row_table(ws))
        n_rows = table.shape[0]
        C.launch(_fn_config(dtype), (C.cdiv(n_rows, FN_ROWS),), ws[0], table, n_rows, float(eps))


def _ema_lerp_impl(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], weight: float) -> None:
    groups: dict[tuple, tuple[list, list]] = {}
    for e, t in zip(ema_tensors, tensors):
        if C.is_dense(e) and C.same_layout(e, t):
            es, ts = groups.setdefault((e.dtype, t.dtype), ([], []))
            es.append(e)
            ts.append(t)
        else:
            reference.ema_lerp_([e], [t], weight)
    for (ed, td), (es, ts) in groups.items():
        table = _cached(("chunks",) + _key(es, ts), lambda: _chunk_table(es, ts))
        C.launch(_ema_config(ed, td), (table.shape[0],), es[0], ts[0], table, float(weight))


# Custom ops that declare what they mutate: autograd bumps the version counters (as copy_ would),
# and on the meta device (launch accounting, tracing) they are no-ops with the right signature.
_force_normalize_op = torch.library.custom_op(
    f"{NAMESPACE}::triton_force_normalize_", _force_normalize_impl, mutates_args=("tensors",),
    schema="(Tensor(a!)[] tensors, float eps) -> ()")
_force_normalize_op.register_fake(lambda tensors, eps: None)
_ema_lerp_op = torch.library.custom_op(
    f"{NAMESPACE}::triton_ema_lerp_", _ema_lerp_impl, mutates_args=("ema_tensors",),
    schema="(Tensor(a!)[] ema_tensors, Tensor[] tensors, float weight) -> ()")
_ema_lerp_op.register_fake(lambda ema_tensors, tensors, weight: None)


# --- public entry points --------------------------------------------------------------------

@torch.no_grad()
def force_normalize_(tensors: list[torch.Tensor], eps: float) -> None:
    _force_normalize_op(list(tensors), float(eps))


@torch.no_grad()
def ema_lerp_(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], weight: float) -> None:
    _ema_lerp_op(list(ema_tensors), list(tensors), float(weight))


def supports_force_normalize(tensors, eps) -> bool:
    return all(t.dtype in C.DTYPES for t in tensors)


def supports_ema_lerp(ema_tensors, tensors, weight) -> bool:
    return all(t.dtype in C.DTYPES for t in list(ema_tensors) + list(tensors))
