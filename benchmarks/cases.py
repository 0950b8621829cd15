"""Benchmark cases: every mpkernels op at the shapes that occur in an EDM2 network.

The shapes are not typed in by hand: the preset's network is run once on the meta
device while every ``mk.*`` call is recorded, so the cases are exactly the (op,
shapes, scalar arguments) the network uses, with how often each occurs per forward.
The multi-tensor ops get the network's full weight list.

Bytes: each case declares the bytes its op *must* move (read every input once,
write every output once, plus the fp32 statistics a fused backward needs); GB/s and
% of copy bandwidth are computed from these, never from what a given kernel
happens to move.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import torch

import mpkernels as mk
import mpkernels.functional as mkf
import mpkernels.multi_weight as mkw
import mpkernels.sum_cat_silu as mk_sum_cat
import mpkernels.sum_norm_silu as mk_sum_norm
import mpkernels.up_silu as mk_up

# Modules whose public ops call ``dispatch`` (the recorder below replaces it in each).
_DISPATCHING = (mkf, mkw, mk_sum_cat, mk_sum_norm, mk_up)

OPS = ["normalize", "pixel_norm", "mp_silu", "mp_sum", "mp_cat", "mp_cat_mp_silu", "mp_fourier", "mp_weight",
       "mp_weights", "mp_conv2d", "mp_linear", "cosine_attention", "pixel_norm_mp_silu", "modulated_mp_silu",
       "mp_sum_clip", "resample", "force_normalize_", "ema_lerp_", "force_finite_",
       "mp_sum_clip_pixel_norm_mp_silu", "mp_sum_clip_mp_cat_mp_silu", "resample_up_mp_silu"]
INPLACE_OPS = {"force_normalize_", "ema_lerp_", "force_finite_"}

# A small network for CPU runs (interpreter parity, CPU timing): every op and code path of
# the full network (attention, skips, up/down) at a size a 2-core machine handles in seconds.
SMALL_CONFIG = dict(img_resolution=16, img_channels=4, label_dim=10, model_channels=32, channel_mult=[1, 2],
                    num_blocks=1, attn_resolutions=[8], channels_per_head=32)


@dataclasses.dataclass
class Spec:
    """One recorded call: tensor args as (shape, role) and the non-tensor args."""
    op: str
    args: tuple  # tensors as ("T", shape, role) with role 'act' (compute dtype) or 'fp32'; others as values
    count: int = 1
    kwargs: tuple = ()  # keyword args as sorted (name, value) pairs (e.g. the attention's qkv layout)


@dataclasses.dataclass
class Case:
    op: str
    label: str
    count: int  # occurrences per network forward
    make: Callable[[torch.dtype, torch.device, torch.Generator], list]  # -> call args
    diff: tuple[int, ...]  # indices of args that get gradients (empty: no backward)
    bytes_fwd: Callable[[torch.dtype], int]
    bytes_bwd: Callable[[torch.dtype], int]
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    kwargs: dict = dataclasses.field(default_factory=dict)
    # Ops whose arguments are lists (mp_weights): ``make`` returns flat tensors (so every weight and
    # gain gets its own gradient), ``caller`` rebuilds the public call, ``dispatch_args`` the
    # arguments the dispatcher sees (to ask whether a backend serves the case natively).
    caller: Callable | None = None
    dispatch_args: Callable[[list], tuple] | None = None

    def call(self, *args):
        if self.caller is not None:
            return self.caller(*args)
        return getattr(mk, self.op)(*args, **self.kwargs)


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- recording the network's calls ------------------------------------------------------------

# Public ops whose keyword-only arguments the functional layer hands to dispatch positionally.
_NUM_POSITIONAL = {"cosine_attention": 2}
_KEYWORD_ONLY = {"cosine_attention": ("layout",)}


@contextlib.contextmanager
def _recording(calls: list):
    real = mkf.dispatch

    def recorder(op, *args, **kwargs):
        rec_args, rec_kwargs = args, dict(kwargs)
        for i, name in enumerate(_KEYWORD_ONLY.get(op, ())):  # passed positionally to dispatch, keyword-only in mk
            pos = _NUM_POSITIONAL[op] + i
            if len(args) > pos:
                rec_kwargs[name] = args[pos]
        rec_args = args[:_NUM_POSITIONAL[op]] if op in _NUM_POSITIONAL else args
        calls.append((op, rec_args, tuple(sorted(rec_kwargs.items()))))
        return real(op, *args, **kwargs)

    for m in _DISPATCHING:
        m.dispatch = recorder
    try:
        yield
    finally:
        for m in _DISPATCHING:
            m.dispatch = real


@contextlib.contextmanager
def _recording_layers(calls: list):
    """Also record each MPConv that runs on a precomputed effective weight (the network computes
    them all with one ``mp_weights`` call) as the ``mp_conv2d`` / ``mp_linear`` call it stands for,
    so the single-layer ops stay benchmarked at the network's shapes."""
    from mpkernels.nn import MPConv
    real = MPConv.forward

    def forward(self, x, gain=1, *, qkv_heads=None, weight=None):
        if weight is not None:
            op = "mp_conv2d" if self.weight.ndim == 4 else "mp_linear"
            calls.append((op, (x, self.weight.detach(), 1.0), ()))
        return real(self, x, gain, qkv_heads=qkv_heads, weight=weight)

    MPConv.forward = forward
    try:
        yield
    finally:
        MPConv.forward = real


def _role(t: torch.Tensor) -> str:
    # The network is recorded with an fp16 U-Net: fp16 tensors are activations (they take the
    # benchmark's compute dtype); fp32 ones (weights, embeddings, noise levels) stay fp32.
    return "act" if t.dtype == torch.float16 else "fp32"


def _key(a):
    """A recorded argument in hashable form: tensors by shape and role, lists entry by entry."""
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), _role(a))
    if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
        return ("L", tuple(tuple(t.shape) for t in a))
    if isinstance(a, (list, tuple)):  # per-weight gains, qkv heads, output dtypes of mp_weights
        return ("V", tuple("tensor" if isinstance(v, torch.Tensor) else
                           ("act" if v == torch.float16 else "fp32") if isinstance(v, torch.dtype) else v for v in a))
    return a


def record_network_calls(net_kwargs: dict, batch: int) -> list[Spec]:
    """Run the network once on the meta device and return the distinct mk calls it makes."""
    from edm2fast.networks import Precond

    with torch.device("meta"):
        net = Precond(**{**net_kwargs, "dtype": "fp16"}).eval()
    x = torch.empty(batch, net.img_channels, net.img_resolution, net.img_resolution, device="meta")
    sigma = torch.empty(batch, device="meta")
    labels = torch.empty(batch, net.label_dim, device="meta") if net.label_dim else None
    calls: list = []
    with _recording(calls), _recording_layers(calls), mk.use_backend("reference"), torch.no_grad():
        net(x, sigma, labels, return_logvar=True)
    specs: dict = {}
    for op, args, kwargs in calls:
        key_args = tuple(_key(a) for a in args)
        key = (op, key_args, kwargs)
        if key in specs:
            specs[key].count += 1
        else:
            specs[key] = Spec(op, key_args, kwargs=kwargs)
    out = list(specs.values())
    weights = [tuple(p.shape) for n, p in net.named_parameters() if p.ndim >= 2]
    params = [tuple(p.shape) for p in net.parameters()]
    out.append(Spec("force_normalize_", (("L", weights), 1e-4)))
    out.append(Spec("ema_lerp_", (("L", params), ("L", params), 0.01)))
    out.append(Spec("force_finite_", (("L", params),)))  # the gradients, one per parameter
    return out


def network_specs(net_kwargs: dict, batch: int) -> list[Spec]:
    """The network's calls, plus the public ops the fused network does not call on its own at
    the same shapes (pixel_norm, normalize, mp_weight), minus identity resampling."""
    specs = [s for s in record_network_calls(net_kwargs, batch) if not (s.op == "resample" and s.args[1] == "keep")]
    extra = []
    todo = list(specs)
    while todo:  # a fused op's parts may be fused ops with parts of their own
        s = todo.pop()
        first = len(extra)
        _add_parts(s, extra)
        todo.extend(extra[first:])
    merged: dict = {}
    for s in extra:
        key = (s.op, s.args, s.kwargs)
        if key in merged:
            merged[key].count += s.count
        else:
            merged[key] = s
    return specs + list(merged.values())


def _add_parts(s: Spec, extra: list) -> None:
    """Append to ``extra`` the public ops that ``s`` computes in one call, at its shapes."""
    if s.op == "pixel_norm_mp_silu":
        extra.append(Spec("pixel_norm", s.args, s.count))
        extra.append(Spec("normalize", (s.args[0], (1,), s.args[1]), s.count))
    if s.op in ("mp_conv2d", "mp_linear"):
        extra.append(Spec("mp_weight", (s.args[1], s.args[2], 1e-4), s.count, kwargs=s.kwargs))
    if s.op == "mp_cat_mp_silu":  # its two parts, as public ops of their own
        a, b, dim, t = s.args
        out = list(a[1])
        out[dim] += b[1][dim]
        extra.append(Spec("mp_cat", s.args, s.count))
        extra.append(Spec("mp_silu", (("T", tuple(out), a[2]),), s.count))
    if s.op == "mp_sum_clip_pixel_norm_mp_silu":  # the ops it fuses, as public ops of their own
        x, y, t, clip, eps = s.args
        extra.append(Spec("mp_sum_clip", (x, y, t, clip), s.count))
        extra.append(Spec("pixel_norm_mp_silu", (x, eps), s.count))
    if s.op == "mp_sum_clip_mp_cat_mp_silu":
        x, y, skip, t, clip, cat_t, dim = s.args
        extra.append(Spec("mp_sum_clip", (x, y, t, clip), s.count))
        extra.append(Spec("mp_cat_mp_silu", (x, skip, dim, cat_t), s.count))
    if s.op == "resample_up_mp_silu":
        (x,) = s.args
        up = ("T", x[1][:2] + (2 * x[1][2], 2 * x[1][3]), x[2])
        extra.append(Spec("resample", (x, "up"), s.count))
        extra.append(Spec("mp_silu", (up,), s.count))
    if s.op == "mp_weights":  # the single-weight op at every weight shape the network has
        (_, shapes), (_, gains), eps, (_, heads) = s.args[:4]
        for shape, gain, qkv in zip(shapes, gains, heads):
            g = ("T", (), "fp32") if gain == "tensor" else gain
            extra.append(Spec("mp_weight", (("T", shape, "fp32"), g, eps), s.count,
                              kwargs=(("qkv_heads", qkv),) if qkv else ()))


# --- bytes and flops each op must move / do ---------------------------------------------------

def _numel(shape) -> int:
    return math.prod(shape)


def must_move_bytes(op: str, args: tuple, es: int) -> tuple[int, int]:
    """(forward, backward) bytes an ideal fused implementation of ``op`` reads and writes.

    ``args`` are the recorded args (tensors as ("T", shape, role)); ``es`` the element size
    of the compute dtype. fp32 tensors (weights, embeddings) count 4 bytes per element.
    Backward reads the incoming gradient(s) and what it must recompute from, and writes
    one gradient per differentiable input.
    """
    def nbytes(a):
        return _numel(a[1]) * (4 if a[2] == "fp32" else es)

    t = [a for a in args if isinstance(a, tuple) and a and a[0] == "T"]
    if op == "mp_silu":
        n = nbytes(t[0])
        return 2 * n, 3 * n
    if op in ("pixel_norm", "normalize"):
        n = nbytes(t[0])
        stats = _numel(t[0][1]) // t[0][1][1] * 4 if op == "pixel_norm" else 0  # fp32 inverse norm per pixel
        return 2 * n + stats, 3 * n + stats
    if op == "pixel_norm_mp_silu":
        n = nbytes(t[0])
        stats = _numel(t[0][1]) // t[0][1][1] * 4
        return 3 * n + stats, 4 * n + stats  # fwd: x -> xn, y; bwd: g_xn, g_y, x (+stats) -> dx
    if op == "modulated_mp_silu":
        n, c = nbytes(t[0]), nbytes(t[1])
        return 2 * n + c, 3 * n + 2 * c  # bwd: g, y, c -> dy, dc
    if op == "mp_sum":
        n = nbytes(t[0])
        return 3 * n, 3 * n  # bwd: g -> da, db
    if op == "mp_sum_clip":
        n = nbytes(t[0])
        return 3 * n, 4 * n  # bwd also reads the output for the clip mask
    if op == "mp_cat":
        n = nbytes(t[0]) + nbytes(t[1])
        return 2 * n, 2 * n
    if op == "mp_cat_mp_silu":
        n = nbytes(t[0]) + nbytes(t[1])
        return 3 * n, 4 * n  # fwd: a, b -> x, y; bwd: g_x, g_y, x -> da, db
    if op == "mp_sum_clip_pixel_norm_mp_silu":
        n = nbytes(t[0])
        stats = _numel(t[0][1]) // t[0][1][1] * 4
        return 5 * n + stats, 6 * n + stats  # fwd: x, y -> s, n, h; bwd: g_s, g_n, g_h, s (+stats) -> dx, dy
    if op == "mp_sum_clip_mp_cat_mp_silu":
        n, k = nbytes(t[0]), nbytes(t[2])
        return 4 * n + 3 * k, 6 * n + 4 * k  # fwd: x, y, skip -> c, h; bwd: g_c, g_h, c -> dx, dy, dskip
    if op == "resample_up_mp_silu":
        n = nbytes(t[0])
        return 9 * n, 9 * n  # fwd: x -> u, h (4x each); bwd: g_u, g_h (4x each), x -> dx
    if op == "mp_weights":  # fwd: fp32 w -> w_eff in its dtype; bwd: grad, w -> fp32 dw
        (_, shapes), _, _, _, (_, roles) = args
        fwd = bwd = 0
        for shape, role in zip(shapes, roles):
            n, out = _numel(shape), (es if role == "act" else 4)
            fwd += n * (4 + out)
            bwd += n * (out + 4 + 4)
        return fwd, bwd
    if op == "resample":
        n = nbytes(t[0])
        mode = args[1]
        m = n // 4 if mode == "down" else (n * 4 if mode == "up" else n)
        return n + m, n + m
    if op == "mp_fourier":
        x, f, p = t
        out = x[1][0] * f[1][0] * 4
        return nbytes(x) + nbytes(f) + nbytes(p) + out, out + nbytes(x) * 2 + nbytes(f) + nbytes(p)
    if op == "mp_weight":
        n = _numel(t[0][1]) * 4
        return 2 * n, 3 * n
    if op in ("mp_conv2d", "mp_linear"):
        x, w = t[0], t[1]
        xb, wb = nbytes(x), _numel(w[1]) * 4
        if op == "mp_conv2d":
            out = x[1][0] * w[1][0] * x[1][2] * x[1][3] * es
        else:
            out = _numel(x[1][:-1]) * w[1][0] * es
        return xb + wb + out, out + xb + wb + xb + wb  # bwd: g, x, w -> dx, dw
    if op == "cosine_attention":
        q = t[0]
        n = nbytes(q)
        out = n // 3
        heads = args[1]
        lse = q[1][0] * heads * q[1][2] * q[1][3] * 4
        norms = 3 * q[1][0] * heads * q[1][2] * q[1][3] * 4
        return n + out + lse + norms, n + 2 * out + lse + norms + n  # bwd: qkv, out, g, stats -> dqkv
    if op == "force_normalize_":
        n = sum(_numel(s) for s in args[0][1]) * 4
        return 2 * n, 0
    if op == "ema_lerp_":
        n = sum(_numel(s) for s in args[0][1]) * 4
        return 3 * n, 0
    if op == "force_finite_":
        n = sum(_numel(s) for s in args[0][1]) * 4
        return 2 * n, 0
    raise KeyError(op)


def flops(op: str, args: tuple) -> tuple[float, float]:
    """(forward, backward) floating-point operations for the math-bound ops (2 per multiply-add)."""
    t = [a for a in args if isinstance(a, tuple) and a and a[0] == "T"]
    if op == "mp_conv2d":
        x, w = t[0][1], t[1][1]
        f = 2.0 * x[0] * w[0] * x[2] * x[3] * w[1] * w[2] * w[3]
        return f, 2 * f
    if op == "mp_linear":
        x, w = t[0][1], t[1][1]
        f = 2.0 * _numel(x[:-1]) * w[0] * w[1]
        return f, 2 * f
    if op == "cosine_attention":
        n, c3, h, w = t[0][1]
        heads = args[1]
        ch, L = c3 // 3 // heads, h * w
        f = 4.0 * n * heads * L * L * ch  # q k^T and a v
        return f, 2.5 * f  # recompute q k^T, then dv, dp, dq, dk
    return 0.0, 0.0


# --- turning specs into runnable cases ---------------------------------------------------------

def _label(args) -> str:
    parts = []
    for a in args:
        if isinstance(a, tuple) and a and a[0] == "T":
            parts.append("x".join(map(str, a[1])) + ("f32" if a[2] == "fp32" else ""))
        elif isinstance(a, tuple) and a and a[0] == "L":
            parts.append(f"{len(a[1])} tensors")
        elif a is not None:
            parts.append(str(a))
    return " ".join(parts)


def _diff_indices(op: str, args) -> tuple[int, ...]:
    if op in INPLACE_OPS:
        return ()
    idx = [i for i, a in enumerate(args) if isinstance(a, tuple) and a and a[0] == "T"]
    if op == "mp_fourier":
        return (0,)
    return tuple(idx)


def _weights_case(spec: Spec) -> Case:
    """``mp_weights`` over the network's weight list: flat tensor arguments (weights, then the tensor
    gains, then a one-element probe in the compute dtype that the 'act' outputs take)."""
    (_, shapes), (_, gains), eps, (_, heads), (_, roles) = spec.args
    n = len(shapes)
    tensor_gains = [i for i, g in enumerate(gains) if g == "tensor"]

    def make(dtype, device, gen):
        wdt = torch.float64 if dtype == torch.float64 else torch.float32
        ws = [torch.randn(s, generator=gen, dtype=torch.float32).to(device=device, dtype=wdt) for s in shapes]
        gs = [(torch.randn((), generator=gen, dtype=torch.float32) * 0.5 + 1).to(device=device, dtype=wdt)
              for _ in tensor_gains]
        return ws + gs + [torch.zeros(1, device=device, dtype=dtype)]

    def unflatten(flat):
        ws, gs, probe = list(flat[:n]), iter(flat[n:-1]), flat[-1]
        gain_list = [next(gs) if g == "tensor" else g for g in gains]
        wdt = ws[0].dtype
        dtypes = [probe.dtype if r == "act" else wdt for r in roles]
        return ws, gain_list, eps, [h if h else None for h in heads], dtypes

    def caller(*flat):
        ws, gain_list, e, qkv, dtypes = unflatten(flat)
        return mk.mp_weights(ws, gain_list, e, qkv_heads=qkv, dtypes=dtypes)

    nbytes = lambda dt: must_move_bytes("mp_weights", spec.args, _esize(dt))  # noqa: E731
    return Case(op="mp_weights", label=f"{n} weights", count=spec.count, make=make,
                diff=tuple(range(n + len(tensor_gains))), bytes_fwd=lambda dt: nbytes(dt)[0],
                bytes_bwd=lambda dt: nbytes(dt)[1], caller=caller, dispatch_args=lambda flat: unflatten(flat))


def _with_nonfinite(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``t`` with about 1 % of its elements (at least one) set to NaN, +inf or -inf in turn."""
    flat = t.reshape(-1)
    k = max(1, flat.numel() // 100)
    idx = torch.randint(0, flat.numel(), (k,), generator=gen)
    flat[idx] = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(k // 3 + 1)[:k]
    return t


def case_from_spec(spec: Spec) -> Case:
    op, args = spec.op, spec.args
    if op == "mp_weights":
        return _weights_case(spec)

    def make(dtype, device, gen):
        out = []
        for i, a in enumerate(args):
            if isinstance(a, tuple) and a and a[0] == "T":
                dt = torch.float32 if a[2] == "fp32" and dtype != torch.float64 else dtype
                t = torch.randn(a[1], generator=gen, dtype=torch.float32).to(device=device, dtype=dt)
                if op == "modulated_mp_silu" and i == 1:
                    t = t * 0.3 + 1  # like c = emb_linear(emb) + 1
                if op == "mp_sum_clip" or (op.startswith("mp_sum_clip_") and i < 2):
                    t = t * 200  # make the clip (256) active on some elements
                out.append(t)
            elif isinstance(a, tuple) and a and a[0] == "L":
                dt = torch.float32 if dtype != torch.float64 else dtype
                ts = [torch.randn(s, generator=gen, dtype=torch.float32) for s in a[1]]
                if op == "force_finite_":
                    ts = [_with_nonfinite(t, gen) for t in ts]
                out.append([t.to(device=device, dtype=dt) for t in ts])
            else:
                out.append(a)
        return out

    ff, fb = flops(op, args)
    label = _label(args) + "".join(f" {k}={v}" for k, v in spec.kwargs)
    return Case(op=op, label=label, count=spec.count, make=make, diff=_diff_indices(op, args),
                bytes_fwd=lambda dt: must_move_bytes(op, args, _esize(dt))[0],
                bytes_bwd=lambda dt: must_move_bytes(op, args, _esize(dt))[1], flops_fwd=ff, flops_bwd=fb,
                kwargs=dict(spec.kwargs))


def select(specs: list[Spec], ops: list[str] | None, max_per_op: int) -> list[Spec]:
    """Keep the requested ops and at most ``max_per_op`` shapes per op (the largest, one per size class)."""
    by_op: dict[str, list[Spec]] = {}
    for s in specs:
        if ops and s.op not in ops:
            continue
        by_op.setdefault(s.op, []).append(s)

    def size(s):
        return sum(_numel(a[1]) for a in s.args if isinstance(a, tuple) and a and a[0] == "T") + \
            sum(sum(_numel(x) for x in a[1]) for a in s.args if isinstance(a, tuple) and a and a[0] == "L")

    out = []
    for op in OPS:
        cands = sorted(by_op.get(op, []), key=size, reverse=True)
        if max_per_op > 0 and len(cands) > max_per_op:
            # spread the picks over the size range so every resolution class is represented
            step = (len(cands) - 1) / (max_per_op - 1) if max_per_op > 1 else 0
            cands = [cands[round(i * step)] for i in range(max_per_op)]
        out.extend(cands)
    return out
