"""Multi-tensor ``mp_weights``: every effective weight of one output dtype in one launch (spec §1 MPConv).

``out_i = normalize(w_i) * gain_i / sqrt(fan_in_i)`` in fp32, one rounding to the output dtype at
the store, in ``w_i``'s memory layout. The work is a table of weight rows ``(w offset, length,
tensor, output row offset)`` covering all weights of a dtype group; each program takes ``ROWS``
rows (of any tensors and lengths) ``BLOCK_R`` columns at a time: a pass for the fp32 norm, a pass
that writes. A qkv weight's head-contiguous row order (reference ``head_contiguous_rows``) is
just another output row offset in the table: no gather launch. Saved for backward: the weights
(parameters, no copy), the fp32 gains and one flat fp32 buffer of per-row inverse norms.

Backward (:mod:`.normalize`'s formula, per row): ``dw = m*(inv*g - w*inv^2*<g,w>/(K*rms))``,
``m = gain/sqrt(K)``; all weight gradients of a group in one launch, plus one small launch that
sums the per-row partials ``inv*<g,w>/sqrt(K)`` of every tensor gain. A result without gradient
gives its weight (and gain) none, as the per-weight op would; a gradient in another layout than its
result (an expanded view, say) is copied once.

Like :mod:`.multi_tensor`, the kernels address every tensor of a group as ``base + offset``
(element offsets from a base tensor: the first weight, the first output; for gains and gradients,
which may be absent, the one at the lowest address, so offsets are >= 0 and -1 marks "none"). No
integer-to-pointer casts, so the interpreter runs the kernels too. Two kinds of tables:

* the row table (per weight set: addresses, shapes, heads, gains), built on the host the first
  time and kept on the device (a :class:`.multi_tensor._TableStore`);
* a per-call table of output (forward) or gradient and weight-gradient (backward) offsets, one or
  two int64 per weight, looked up by those tensors' addresses. The caching allocator hands out the
  same blocks step after step, so after the first steps it is found, not built.

CUDA graphs: no table is built while a graph is being captured (the host-to-device copy is not
allowed there). When a table is missing during capture (outputs come from the graph's own pool,
so the per-call table usually is), that call runs the single-weight kernels of :mod:`.mp_weight`
weight by weight instead: same math, more (captured) launches, nothing copied from the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference
from ..multi_weight import FORCE_EPS
from .._library import NAMESPACE, list_results_unsupported
from . import _common as C
from . import mp_weight as MW
from . import multi_tensor as MT
from .multi_tensor import _TableStore, _capturing, _elem_offset, _on_device, _rows_are_blocks


@triton.jit
def _row_items(rows_ptr, item, valid):
    """Row table entry of each item: (weight offset, length, tensor index, output row offset)."""
    w_off = tl.load(rows_ptr + 4 * item, mask=valid, other=0)
    R = tl.load(rows_ptr + 4 * item + 1, mask=valid, other=0)
    k = tl.load(rows_ptr + 4 * item + 2, mask=valid, other=0)
    y_row = tl.load(rows_ptr + 4 * item + 3, mask=valid, other=0)
    return w_off, R, k, y_row


@triton.jit
def _gain_of(gain_base, tensors_ptr, scale_ptr, k, valid, HAS_GAIN: tl.constexpr):
    """(scale, gain * scale): scale = number gain / sqrt(K), or 1 / sqrt(K) with a tensor gain (read here)."""
    scale = tl.load(scale_ptr + 2 * k, mask=valid, other=0.0)
    mult = scale
    if HAS_GAIN:
        g_off = tl.load(tensors_ptr + 2 * k, mask=valid, other=-1)
        has = valid & (g_off >= 0)
        mult = scale * tl.load(gain_base + tl.where(has, g_off, 0), mask=has, other=1.0).to(tl.float32)
    return scale, mult


@triton.jit
def _mp_weights_fwd_kernel(w_base, y_base, gain_base, rows_ptr, tensors_ptr, scale_ptr, out_ptr, inv_ptr, n_rows, eps,
                           force_eps, HAS_GAIN: tl.constexpr, FORCE: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    """ROWS table rows per program: y = w * inv * gain / sqrt(K) in the output dtype, inv (fp32) per row.

    FORCE: forced weight normalization first, in place (paper Eq. 66): a pass for the norm of w, a
    pass that writes ``n = w / (force_eps + ||w||/sqrt(K))`` back into w (the formula of
    :mod:`.multi_tensor`'s force_normalize_ kernel) and sums ``n*n``, then y and inv from n, as an
    ordinary call would compute them from the updated weight."""
    item = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = item < n_rows
    w_off, R, k, y_row = _row_items(rows_ptr, item, valid)
    _, mult = _gain_of(gain_base, tensors_ptr, scale_ptr, k, valid, HAS_GAIN)
    y_off = tl.load(out_ptr + k, mask=valid, other=0) + y_row
    w_rows = w_base + w_off[:, None]
    y_rows = y_base + y_off[:, None]
    cols = tl.arange(0, BLOCK_R)[None, :]
    r_max = tl.max(R, axis=0)
    acc = tl.zeros([ROWS, BLOCK_R], dtype=tl.float32)
    for r0 in range(0, r_max, BLOCK_R):
        m = (r0 + cols) < R[:, None]
        x = tl.load(w_rows + r0 + cols, mask=m, other=0.0).to(tl.float32)
        acc += x * x
    if FORCE:  # acc: the sum of squares of w; then of the normalized rows written back
        inv0 = 1.0 / (force_eps + tl.sqrt(tl.sum(acc, axis=1)) / tl.sqrt(tl.maximum(R, 1).to(tl.float32)))
        acc = tl.zeros([ROWS, BLOCK_R], dtype=tl.float32)
        for r0 in range(0, r_max, BLOCK_R):
            m = (r0 + cols) < R[:, None]
            x = tl.load(w_rows + r0 + cols, mask=m, other=0.0).to(tl.float32)
            n = (x * inv0[:, None]).to(w_base.dtype.element_ty)
            tl.store(w_rows + r0 + cols, n, mask=m)
            n = n.to(tl.float32)
            acc += n * n
        tl.debug_barrier()  # the updated rows are read back below, by other threads of this program
    inv_sqrt_r = tl.load(scale_ptr + 2 * k + 1, mask=valid, other=1.0)  # fp32(1/sqrt(K)), as the reference
    inv = 1.0 / (eps + tl.sqrt(tl.sum(acc, axis=1)) * inv_sqrt_r)
    for i in range(0, r_max, BLOCK_R):  # last chunk first: the most recently read are still cached
        r0 = (r_max - 1) // BLOCK_R * BLOCK_R - i
        m = (r0 + cols) < R[:, None]
        x = tl.load(w_rows + r0 + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_rows + r0 + cols, (x * (inv * mult)[:, None]).to(y_base.dtype.element_ty), mask=m)
    tl.store(inv_ptr + item, inv, mask=valid)


@triton.jit
def _mp_weights_bwd_kernel(w_base, g_base, dw_base, gain_base, rows_ptr, tensors_ptr, scale_ptr, grad_ptr, inv_ptr,
                           part_ptr, n_rows, eps, HAS_GAIN: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    """dw = m * (inv*g - w * inv^2 <g,w> / (K*rms)) per row; with HAS_GAIN the per-row partial inv*<g,w>*scale.

    The gradient of an output row is read at the output row's offset (permuted rows of a qkv
    weight), dw written at the weight row's; a tensor without gradient (offset -1) reads zeros."""
    item = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = item < n_rows
    w_off, R, k, y_row = _row_items(rows_ptr, item, valid)
    scale, mult = _gain_of(gain_base, tensors_ptr, scale_ptr, k, valid, HAS_GAIN)
    g_off = tl.load(grad_ptr + 2 * k, mask=valid, other=-1)
    has_g = valid & (g_off >= 0)
    w_row = w_off - tl.load(tensors_ptr + 2 * k + 1, mask=valid, other=0)  # row offset within its weight
    dw_off = tl.load(grad_ptr + 2 * k + 1, mask=valid, other=0) + w_row
    w_rows = w_base + w_off[:, None]
    g_rows = g_base + tl.where(has_g, g_off + y_row, 0)[:, None]
    dw_rows = dw_base + dw_off[:, None]
    inv = tl.load(inv_ptr + item, mask=valid, other=1.0)
    Rf = tl.maximum(R, 1).to(tl.float32)
    rms = 1.0 / inv - eps
    # d(inv)/dw = -inv^2 * w / (K * rms); a zero row (rms == 0) has a zero derivative, as in PyTorch.
    coef = tl.where(rms > 0.0, inv * inv / (Rf * tl.where(rms > 0.0, rms, 1.0)), 0.0)
    cols = tl.arange(0, BLOCK_R)[None, :]
    r_max = tl.max(R, axis=0)
    acc = tl.zeros([ROWS, BLOCK_R], dtype=tl.float32)
    for r0 in range(0, r_max, BLOCK_R):
        m = (r0 + cols) < R[:, None]
        x = tl.load(w_rows + r0 + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_rows + r0 + cols, mask=m & has_g[:, None], other=0.0).to(tl.float32)
        acc += g * x
    dot = tl.sum(acc, axis=1)
    a = (inv * mult)[:, None]
    b = (coef * dot * mult)[:, None]
    for i in range(0, r_max, BLOCK_R):  # last chunk first: the most recently read are still cached
        r0 = (r_max - 1) // BLOCK_R * BLOCK_R - i
        m = (r0 + cols) < R[:, None]
        x = tl.load(w_rows + r0 + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_rows + r0 + cols, mask=m & has_g[:, None], other=0.0).to(tl.float32)
        tl.store(dw_rows + r0 + cols, (g * a - x * b).to(dw_base.dtype.element_ty), mask=m)
    if HAS_GAIN:
        tl.store(part_ptr + item, inv * dot * scale, mask=valid)


@triton.jit
def _segment_sum_kernel(part_ptr, seg_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[j] = sum of partials[first_j : first_j + count_j] (one program per tensor gain, fixed order)."""
    pid = tl.program_id(0)
    first = tl.load(seg_ptr + 2 * pid)
    count = tl.load(seg_ptr + 2 * pid + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, count, BLOCK):
        o = i + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + first + o, mask=o < count, other=0.0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


ROWS = 4
BLOCK_R = 512
SEG_BLOCK = 1024


def _fwd_config(yd, has_gain: bool, force: bool = False):
    return C.make_config(_mp_weights_fwd_kernel, ptrs=dict(w_base="fp32", y_base=yd, gain_base="fp32", rows_ptr="i64",
                                                           tensors_ptr="i64", scale_ptr="fp32", out_ptr="i64",
                                                           inv_ptr="fp32"),
                         floats=("eps", "force_eps"),
                         constexprs=dict(HAS_GAIN=has_gain, FORCE=force, ROWS=ROWS, BLOCK_R=BLOCK_R),
                         num_warps=4, num_stages=1)


def _bwd_config(gd, has_gain: bool):
    return C.make_config(_mp_weights_bwd_kernel, ptrs=dict(w_base="fp32", g_base=gd, dw_base="fp32", gain_base="fp32",
                                                           rows_ptr="i64", tensors_ptr="i64", scale_ptr="fp32",
                                                           grad_ptr="i64", inv_ptr="fp32", part_ptr="fp32"),
                         floats=("eps",), constexprs=dict(HAS_GAIN=has_gain, ROWS=ROWS, BLOCK_R=BLOCK_R),
                         num_warps=4, num_stages=1)


_CONFIGS = {}


def _config(kind: str, *key):
    """Configurations are immutable; build each once."""
    cfg = _CONFIGS.get((kind,) + key)
    if cfg is None:
        if kind == "fwd":
            cfg = _fwd_config(*key)
        elif kind == "bwd":
            cfg = _bwd_config(*key)
        else:
            cfg = C.make_config(_segment_sum_kernel, ptrs=dict(part_ptr="fp32", seg_ptr="i64", out_ptr="fp32"),
                                constexprs=dict(BLOCK=SEG_BLOCK), num_warps=4, num_stages=1)
        _CONFIGS[(kind,) + key] = cfg
    return cfg


@C.declare_configs
def configs():
    for d in C.DTYPES:
        for has_gain in (False, True):
            yield _config("fwd", d, has_gain)
            yield _config("fwd", d, has_gain, True)  # mp_weights(..., force_normalize=True)
            yield _config("bwd", d, has_gain)
    yield _config("seg")


# --- work tables -----------------------------------------------------------------------------

_TABLES = _TableStore(16)  # row tables, per weight set
_CALL_TABLES = _TableStore(64)  # per-call offsets of outputs / gradients (a few live variants per step)


class _Rows:
    """The device tables of one weight set: rows, per tensor (gain offset or -1, weight offset) and
    (number gain / sqrt(K) or 1 / sqrt(K), 1 / sqrt(K)), per tensor gain (first row, rows)."""

    def __init__(self, rows, tensors, scales, segs, n_rows):
        self.rows, self.tensors, self.scales, self.segs, self.n_rows = rows, tensors, scales, segs, n_rows


def _build_rows(ws, gains, gain_values, gain_slots, heads) -> _Rows:
    rows, tensors, scales, segs = [], [], [], []
    first = 0
    for k, (w, value, slot, h) in enumerate(zip(ws, gain_values, gain_slots, heads)):
        n_out = w.shape[0]
        R = w.numel() // n_out
        w_toff = _elem_offset(w, ws[0])
        r = torch.arange(n_out, dtype=torch.int64)
        dest = r
        if h:  # output row p reads weight row perm[p]: weight row perm[p] goes to output row p
            perm = reference.head_contiguous_rows(n_out, h)
            dest = torch.empty_like(perm)
            dest[perm] = r
        rows.append(torch.stack([w_toff + r * R, torch.full_like(r, R), torch.full_like(r, k), dest * R], dim=1))
        s = 1.0 / math.sqrt(R)
        if slot >= 0:
            tensors.append((_elem_offset(gains[slot], _lowest(gains)), w_toff))
            scales.append((s, s))
            segs.append((first, n_out))
        else:
            tensors.append((-1, w_toff))
            scales.append((value * s, s))
        first += n_out
    device = ws[0].device
    segs_t = torch.tensor(segs or [(0, 0)], dtype=torch.int64)
    return _Rows(_on_device(torch.cat(rows).contiguous(), device),
                 _on_device(torch.tensor(tensors, dtype=torch.int64), device),
                 _on_device(torch.tensor(scales, dtype=torch.float32), device), _on_device(segs_t, device), first)


def _lowest(ts):
    """The tensor at the lowest address: offsets from it are >= 0 (a negative one marks "none")."""
    return min(ts, key=lambda t: t.data_ptr())


def _rows_key(ws, gains, gain_values, gain_slots, heads):
    # Addresses, shapes, gain numbers, slots and heads determine the content (offsets between tensors).
    return ((ws[0].device, tuple(gain_values), tuple(gain_slots), tuple(heads))
            + tuple((w.data_ptr(), tuple(w.shape)) for w in ws) + tuple(g.data_ptr() for g in gains))


def _offsets_key(kind, device, lists):
    return (kind, device) + tuple(None if t is None else t.data_ptr() for ts in lists for t in ts)


def _offsets_table(device, *columns) -> torch.Tensor:
    return _on_device(torch.tensor(list(zip(*columns)), dtype=torch.int64).reshape(len(columns[0]), -1), device)


def _lookup(store, key, build, *, capturing: bool):
    """The table for ``key``; None when it is missing and a graph is being captured (no host copy there)."""
    if capturing and key not in store:
        return None
    return store.get(key, build, "mp_weights")


# --- launchers -------------------------------------------------------------------------------

def _forward_impl(ws, gains, gain_values, gain_slots, eps, heads, dtype):
    return _forward_launch(ws, gains, gain_values, gain_slots, eps, heads, dtype, None)


def _forced_impl(ws, gains, gain_values, gain_slots, eps, force_eps, heads, dtype):
    """``force_normalize_(ws, force_eps)`` then :func:`_forward_impl`, in the one launch of the FORCE kernel."""
    return _forward_launch(ws, gains, gain_values, gain_slots, eps, heads, dtype, force_eps)


def _forward_launch(ws, gains, gain_values, gain_slots, eps, heads, dtype, force_eps):
    """Outputs and the flat fp32 inverse norms; ``force_eps`` not None: normalize ``ws`` in place first."""
    outs = [C.empty_like_dense(w, dtype) for w in ws]
    capturing = _capturing()
    tab = _lookup(_TABLES, _rows_key(ws, gains, gain_values, gain_slots, heads),
                  lambda: _build_rows(ws, gains, gain_values, gain_slots, heads), capturing=capturing)
    offs = None
    if tab is not None:
        offs = _lookup(_CALL_TABLES, _offsets_key("out", ws[0].device, [outs]),
                       lambda: _offsets_table(ws[0].device, [_elem_offset(o, outs[0]) for o in outs]),
                       capturing=capturing)
    if offs is None:
        if force_eps is not None:
            _force_normalize_per_weight(ws, force_eps, capturing)
        return _forward_per_weight(ws, gains, gain_values, gain_slots, eps, heads, outs)
    inv = torch.empty((tab.n_rows,), dtype=torch.float32, device=ws[0].device)
    gain_base = _lowest(gains) if gains else ws[0]
    force = force_eps is not None
    C.launch(_config("fwd", dtype, bool(gains), force), (C.cdiv(tab.n_rows, ROWS),), ws[0], outs[0], gain_base,
             tab.rows, tab.tensors, tab.scales, offs, inv, tab.n_rows, float(eps), float(force_eps if force else 0.0))
    return outs + [inv]


def _backward_impl(grads, ws, gains, inv, gain_values, gain_slots, eps, heads):
    grads = [None if g is None else C.like(g, w) for g, w in zip(grads, ws)]  # a copy only for another layout
    dws = [C.empty_like_dense(w) for w in ws]
    dgain = inv.new_empty((len(gains),))
    present = sorted((g for g in grads if g is not None), key=lambda g: g.data_ptr())  # lowest first
    if not present:
        for dw in dws:
            dw.zero_()
        dgain.zero_()
        return dws + [dgain]
    capturing = _capturing()
    tab = _lookup(_TABLES, _rows_key(ws, gains, gain_values, gain_slots, heads),
                  lambda: _build_rows(ws, gains, gain_values, gain_slots, heads), capturing=capturing)
    offs = None
    if tab is not None:
        offs = _lookup(_CALL_TABLES, _offsets_key("grad", ws[0].device, [grads, dws]),
                       lambda: _offsets_table(ws[0].device,
                                              [-1 if g is None else _elem_offset(g, present[0]) for g in grads],
                                              [_elem_offset(dw, dws[0]) for dw in dws]), capturing=capturing)
    if offs is None:
        return _backward_per_weight(grads, ws, gains, inv, gain_values, gain_slots, eps, heads, dws, dgain)
    part = inv.new_empty((tab.n_rows,)) if gains else inv
    gain_base = _lowest(gains) if gains else ws[0]
    C.launch(_config("bwd", present[0].dtype, bool(gains)), (C.cdiv(tab.n_rows, ROWS),), ws[0], present[0], dws[0],
             gain_base, tab.rows, tab.tensors, tab.scales, offs, inv, part, tab.n_rows, float(eps))
    if gains:
        C.launch(_config("seg"), (len(gains),), part, tab.segs, dgain)
    return dws + [dgain]


# --- weight by weight (while capturing a CUDA graph without a table) --------------------------

def _force_normalize_per_weight(ws, force_eps, capturing):
    """The forced normalization before :func:`_forward_per_weight`: :mod:`.multi_tensor`'s kernel when its
    table exists (or may be built), else the reference formula weight by weight (capture-safe)."""
    if not capturing or MT._key("rows", ws) in MT._TABLES:
        MT._force_normalize_impl(ws, force_eps)
    else:
        reference.force_normalize_(ws, force_eps)


def _single(w, gains, value, slot, h):
    w2, back = MW._rows(w)
    s = 1.0 / math.sqrt(w2.shape[1])
    qkv_d = w2.shape[0] // (3 * h) if h else 0
    gain = gains[slot].reshape(()) if slot >= 0 else None
    return w2, back, gain, (s if slot >= 0 else value * s), qkv_d


def _forward_per_weight(ws, gains, gain_values, gain_slots, eps, heads, outs):
    invs = []
    for w, o, value, slot, h in zip(ws, outs, gain_values, gain_slots, heads):
        w2, back, gain, scale, qkv_d = _single(w, gains, value, slot, h)
        y2, inv = MW._forward(w2, gain, scale, eps, o.dtype, qkv_d)
        o.copy_(back(y2))
        invs.append(inv)
    return outs + [torch.cat(invs)]


def _backward_per_weight(grads, ws, gains, inv, gain_values, gain_slots, eps, heads, dws, dgain):
    first = 0
    for w, g, dw, value, slot, h in zip(ws, grads, dws, gain_values, gain_slots, heads):
        w2, back, gain, scale, qkv_d = _single(w, gains, value, slot, h)
        n_out = w2.shape[0]
        if g is None:
            dw.zero_()
            if slot >= 0:
                dgain[slot].zero_()
        else:
            g2 = MW._rows(g)[0]
            dx2, dg = MW._backward(g2, w2, gain, inv[first:first + n_out], scale, eps, qkv_d)
            dw.copy_(back(dx2))
            if slot >= 0:
                dgain[slot].copy_(dg)
        first += n_out
    return dws + [dgain]


# --- custom ops ------------------------------------------------------------------------------

def _n_rows(ws) -> int:
    return sum(w.shape[0] for w in ws)


def _fake_fwd(ws, gains, gain_values, gain_slots, eps, heads, dtype):
    return [C.empty_like_dense(w, dtype) for w in ws] + [ws[0].new_empty((_n_rows(ws),), dtype=torch.float32)]


def _fake_bwd(grads, ws, gains, inv, gain_values, gain_slots, eps, heads):
    return [C.empty_like_dense(w) for w in ws] + [inv.new_empty((len(gains),))]


_fwd_op = torch.library.custom_op(
    f"{NAMESPACE}::triton_mp_weights", _forward_impl, mutates_args=(),
    schema="(Tensor[] ws, Tensor[] gains, float[] gain_values, int[] gain_slots, float eps, int[] qkv_heads, "
           "ScalarType dtype) -> Tensor[]")
_fwd_op.register_fake(_fake_fwd)
_bwd_op = torch.library.custom_op(
    f"{NAMESPACE}::triton_mp_weights_backward", _backward_impl, mutates_args=(),
    schema="(Tensor?[] grads, Tensor[] ws, Tensor[] gains, Tensor inv, float[] gain_values, int[] gain_slots, "
           "float eps, int[] qkv_heads) -> Tensor[]")
_bwd_op.register_fake(_fake_bwd)


def _setup_context(ctx, inputs, output):
    ws, gains, gain_values, gain_slots, eps, heads, _ = inputs
    ctx.n, ctx.n_gains = len(ws), len(gains)
    ctx.gain_shapes = [g.shape for g in gains]
    ctx.args = (list(gain_values), list(gain_slots), eps, list(heads))
    ctx.save_for_backward(*ws, *gains, output[-1])
    ctx.mark_non_differentiable(output[-1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grads):
    n, n_gains = ctx.n, ctx.n_gains
    if all(g is None for g in grads[:n]):
        return None, None, None, None, None, None, None
    saved = ctx.saved_tensors
    ws, gains, inv = list(saved[:n]), list(saved[n:n + n_gains]), saved[-1]
    res = _bwd_op(list(grads[:n]), ws, gains, inv, *ctx.args)
    # A weight whose result got no gradient gets none either (as with the per-weight ops), not zeros.
    dws = [None if g is None else dw for g, dw in zip(grads[:n], res[:n])]
    used = [False] * n_gains
    for g, slot in zip(grads[:n], ctx.args[1]):
        if slot >= 0 and g is not None:
            used[slot] = True
    dgain = res[n]
    dgains = [dgain[j].reshape(s) if used[j] else None for j, s in enumerate(ctx.gain_shapes)]
    return dws, dgains, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)

# Forced weight normalization folded into the forward (mp_weights(..., force_normalize=True)): an op
# that mutates its inputs cannot have autograd registered through torch.library, so the mutating op
# has none and a plain autograd.Function around it saves what _setup_context saves (the weights,
# now normalized, the gains and inv) and runs the ordinary backward op.
_forced_op = torch.library.custom_op(
    f"{NAMESPACE}::triton_mp_weights_forced", _forced_impl, mutates_args=("ws",),
    schema="(Tensor(a!)[] ws, Tensor[] gains, float[] gain_values, int[] gain_slots, float eps, float force_eps, "
           "int[] qkv_heads, ScalarType dtype) -> Tensor[]")
_forced_op.register_fake(lambda ws, gains, gain_values, gain_slots, eps, force_eps, heads, dtype:
                         _fake_fwd(ws, gains, gain_values, gain_slots, eps, heads, dtype))


class _ForcedMpWeights(torch.autograd.Function):
    """``force_normalize_(ws)`` then the ``triton_mp_weights`` op's forward and backward; ``tensors`` = ws + gains."""

    @staticmethod
    def forward(ctx, args, n, *tensors):
        ws, gains = list(tensors[:n]), list(tensors[n:])
        gain_values, gain_slots, eps, force_eps, heads, dtype = args
        out = _forced_op([w.detach() for w in ws], [g.detach() for g in gains], gain_values, gain_slots, eps,
                         force_eps, heads, dtype)
        _setup_context(ctx, (ws, gains, gain_values, gain_slots, eps, heads, dtype), out)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        dws, dgains = _backward(ctx, list(grads))[:2]
        if dws is None:
            return (None, None) + (None,) * (ctx.n + ctx.n_gains)
        return (None, None, *dws, *dgains)


def _split_gains(gains, idx):
    """(tensor gains in fp32, number per weight (1.0 for a tensor gain), slot per weight (-1: a number))."""
    tensor_gains, values, slots = [], [], []
    for i in idx:
        g = gains[i]
        if isinstance(g, torch.Tensor):
            slots.append(len(tensor_gains))
            tensor_gains.append(g if g.dtype == torch.float32 else g.float())
            values.append(1.0)
        else:
            slots.append(-1)
            values.append(float(g))
    return tensor_gains, values, slots


def _groups(dtypes) -> dict:
    groups: dict[torch.dtype, list[int]] = {}
    for i, d in enumerate(dtypes):
        groups.setdefault(d, []).append(i)
    return groups


# --- public entry point (receives the validated lists of mpkernels.mp_weights) ----------------

def mp_weights(weights, gains, eps, qkv_heads, dtypes) -> list[torch.Tensor]:
    """One custom-op call (one launch) per output dtype."""
    out: list[torch.Tensor | None] = [None] * len(weights)
    for dtype, idx in _groups(dtypes).items():
        tensor_gains, values, slots = _split_gains(gains, idx)
        res = _fwd_op([weights[i] for i in idx], tensor_gains, values, slots, float(eps),
                      [qkv_heads[i] or 0 for i in idx], dtype)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out


def mp_weights_forced(weights, gains, eps, qkv_heads, dtypes) -> list[torch.Tensor]:
    """``force_normalize_(weights)`` then :func:`mp_weights`: one launch per output dtype for both.

    While ``torch.compile`` traces, the two ops run one after the other (compiled graphs keep the
    ops they had: a mutating op cannot carry registered autograd)."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            MT.force_normalize_(weights, FORCE_EPS)
        return mp_weights(weights, gains, eps, qkv_heads, dtypes)
    out: list[torch.Tensor | None] = [None] * len(weights)
    for dtype, idx in _groups(dtypes).items():
        tensor_gains, values, slots = _split_gains(gains, idx)
        args = (values, slots, float(eps), float(FORCE_EPS), [qkv_heads[i] or 0 for i in idx], dtype)
        res = _ForcedMpWeights.apply(args, len(idx), *[weights[i] for i in idx], *tensor_gains)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out


def supports(weights, gains, eps, qkv_heads, dtypes) -> bool:
    """fp32 weights whose rows are contiguous blocks (contiguous or channels_last), outputs in
    float32/float16/bfloat16; anything else (float64, a transposed weight) runs on the reference.
    Neither while Inductor's C++ wrapper compiles (:func:`mpkernels._library.list_results_unsupported`)."""
    if list_results_unsupported():
        return False
    return (all(w.dtype == torch.float32 and _rows_are_blocks(w) for w in weights)
            and all(d in C.DTYPES for d in dtypes)
            and all(g.dtype in C.DTYPES for g in gains if isinstance(g, torch.Tensor)))
