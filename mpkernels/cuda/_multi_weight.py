"""``mp_weights`` on the extension (``csrc/multi_weight*``): all effective weights in one launch per
output dtype group, all their gradients in one launch per group plus one for the tensor gains.

Forward, for every weight ``w`` (fp32 math, one rounding to the output dtype)::

    out = w / (eps + ||w_row|| / sqrt(fan_in)) * gain / sqrt(fan_in)      (spec §1, MPConv 3-4)

with the rows of a qkv weight written head-contiguous (input row ``h*3D + 3d + j`` to output row
``h*3D + j*D + d``) by the same launch, and the fp32 rms of every row saved in one flat buffer.
Backward: ``d w = k (g r - w (g . w) r^2 / (fan_in rms))`` per row (``k = gain / sqrt(fan_in)``,
``r = 1 / (eps + rms)``), the gradient ``g`` read in the output dtype (a result that got no
gradient counts as zero), and ``d gain = sum_rows r (g . w) / sqrt(fan_in)`` reduced in a fixed
order from per-row terms (deterministic, no atomics).

Launches: a CUDA launch carries the pointers and sizes of its weights in its kernel parameters
(4 KB: 86 weights forward, 73 backward), so a longer group takes a few launches (an EDM2 network
has about 160 weights: 2 forward, 3 backward); nothing is copied to the device first (safe to
capture in a CUDA graph).

Custom ops (``Tensor[]`` lists), one call per output dtype group, so that the launch accounting
on the meta device counts what a GPU launches: ``mpkernels::cuda_mp_weights`` (forward),
``cuda_mp_weights_backward`` (weight gradients and the per-row gain terms) and
``cuda_mp_weights_gain_grads`` (only with tensor gains). A gain that is a number travels in
``gain_values``; the tensor gains travel in ``gains`` (each used by one weight, ``gain_index[i]``
says which, -1 for a number), so that autograd gives each its gradient. The output dtype is a
code (0 = float32, 1 = float16, 2 = bfloat16). The fake functions allocate as
``csrc/multi_weight_bindings.cpp`` does: the weight's layout when each row is one contiguous
block, else contiguous. Eager calls on plain tensors skip the custom-op machinery (see
:class:`_LeanMpWeights`) exactly where :mod:`mpkernels._library`'s lean path does.
"""

from __future__ import annotations

import torch

from .. import _library
from .._dispatch import register
from .._library import is_dense, kernel_op

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPES = tuple(_CODES)
_OF_CODE = {c: d for d, c in _CODES.items()}
_MAX_NUMEL = 2 ** 31 - 1


def _ext():
    from . import _EXT  # the loaded extension (set by mpkernels.cuda at load or build time)
    if _EXT is None:
        raise RuntimeError("the mpkernels extension is not loaded; call mpkernels.cuda.build() first")
    return _EXT


def _row_dense(t: torch.Tensor) -> bool:
    """Each index of dim 0 owns one contiguous block of ``numel / size(0)`` elements."""
    if not is_dense(t):
        return False
    return t.shape[0] <= 1 or t.stride(0) == t.numel() // t.shape[0]


def _out_like(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty_like(w, dtype=dtype)
    return out if _row_dense(out) else w.new_empty(w.shape, dtype=dtype)


def _fwd_fake(weights, gains, gain_index, gain_values, eps, qkv_heads, dtype):
    outs = [_out_like(w, _OF_CODE[dtype]) for w in weights]
    return outs, weights[0].new_empty((sum(w.shape[0] for w in weights),), dtype=torch.float32)


def _bwd_fake(grads, weights, gains, gain_index, gain_values, rms, eps, qkv_heads, dtype):
    rows = sum(w.shape[0] for w in weights) if gains else 0
    return [_out_like(w, w.dtype) for w in weights], weights[0].new_empty((rows,), dtype=torch.float32)


_ARGS = "Tensor[] gains, int[] gain_index, float[] gain_values"
_forward = kernel_op(
    "cuda_mp_weights",
    f"(Tensor[] weights, {_ARGS}, float eps, int[] qkv_heads, int dtype) -> (Tensor[], Tensor)",
    impl=lambda w, g, gi, gv, eps, qkv, dt: tuple(_ext().mp_weights_fwd(w, g, gi, gv, eps, qkv, [dt] * len(w))),
    fake=_fwd_fake)
_backward = kernel_op(
    "cuda_mp_weights_backward",
    f"(Tensor?[] grads, Tensor[] weights, {_ARGS}, Tensor rms, float eps, int[] qkv_heads, int dtype) "
    "-> (Tensor[], Tensor)",
    impl=lambda gr, w, g, gi, gv, rms, eps, qkv, dt: tuple(_ext().mp_weights_bwd(gr, w, g, gi, gv, rms, eps, qkv,
                                                                                  [dt] * len(w))),
    fake=_bwd_fake)
_gain_grads = kernel_op(
    "cuda_mp_weights_gain_grads",
    "(Tensor partial, Tensor[] weights, Tensor[] gains, int[] gain_index) -> Tensor[]",
    impl=lambda partial, w, g, gi: _ext().mp_weights_gain_grads(partial, w, g, gi),
    fake=lambda partial, w, g, gi: [torch.empty_like(t) for t in g])


def _setup_context(ctx, inputs, output):
    weights, gains, gain_index, gain_values, eps, qkv_heads, dtype = inputs
    ctx.save_for_backward(output[1], *weights, *gains)
    ctx.num_weights = len(weights)
    ctx.args = (gain_index, gain_values, eps, qkv_heads, dtype)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # an unused result costs no zeros (the kernel reads None as 0)


def _backward_fn(ctx, grads, _grad_rms):
    if grads is None or all(g is None for g in grads):
        return None, None, None, None, None, None, None
    n = ctx.num_weights
    rms, *saved = ctx.saved_tensors
    weights, gains = list(saved[:n]), list(saved[n:])
    gain_index, gain_values, eps, qkv_heads, dtype = ctx.args
    grads = [g if g is None or is_dense(g) else g.contiguous() for g in grads]
    if _lean([*weights, *gains, rms]):  # eager: the ops' implementations, without the dispatcher
        ext = _ext()
        gw, partial = ext.mp_weights_bwd(grads, weights, gains, gain_index, gain_values, rms, eps, qkv_heads,
                                         [dtype] * n)
        ggains = ext.mp_weights_gain_grads(partial, weights, gains, gain_index) if gains else []
    else:
        gw, partial = _backward(grads, weights, gains, gain_index, gain_values, rms, eps, qkv_heads, dtype)
        ggains = _gain_grads(partial, weights, gains, gain_index) if gains else []
    return list(gw), list(ggains), None, None, None, None, None


_forward.register_autograd(_backward_fn, setup_context=_setup_context)


class _LeanMpWeights(torch.autograd.Function):
    """The forward op's autograd as a plain ``autograd.Function`` for eager calls: same extension
    calls, same ``_setup_context`` and ``_backward_fn``, without the ``torch.library`` machinery
    for ``Tensor[]`` arguments (pytree flattening, dispatcher: 3-5 µs per weight on CPU here)."""

    @staticmethod
    def forward(ctx, args, *tensors):
        gain_index, gain_values, eps, qkv, dtype = args
        n = len(gain_index)
        inputs = (list(tensors[:n]), list(tensors[n:]), gain_index, gain_values, eps, qkv, dtype)
        outs, rms = _ext().mp_weights_fwd(*inputs[:6], [dtype] * n)
        _setup_context(ctx, inputs, (outs, rms))
        return (*outs, rms)

    @staticmethod
    def backward(ctx, *grads):
        gw, ggains = _backward_fn(ctx, list(grads[:-1]), grads[-1])[:2]
        n_gains = len(ctx.saved_tensors) - 1 - ctx.num_weights
        return (None, *(gw if gw is not None else [None] * ctx.num_weights),
                *(ggains if ggains is not None else [None] * n_gains))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _lean(tensors) -> bool:
    """Eager call on plain CPU / CUDA tensors with nothing intercepting ops: the lean path gives what
    the custom op gives (the rules of mpkernels._library's lean path; never while tracing, under a
    dispatch or function mode, or on the meta device, so compile and launch accounting see the ops)."""
    if torch.compiler.is_compiling():  # first: Dynamo folds it (and cannot trace the checks below)
        return False
    intercepted = getattr(_library, "_intercepted", None)
    if intercepted is None or not getattr(_library, "_LEAN", [False])[0] or intercepted():
        return False
    return all(type(t) in _PLAIN and not t.is_meta for t in tensors)


def mp_weights(weights, gains, eps, qkv_heads, dtypes):
    """The dispatcher's ``mp_weights`` (arguments validated and normalized by mpkernels.multi_weight).

    One forward op per output dtype (in order of first use), each one launch on a GPU.
    """
    groups: dict[torch.dtype, list[int]] = {}
    for i, d in enumerate(dtypes):
        groups.setdefault(d, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(weights)
    for dtype, idx in groups.items():
        tensor_gains, gain_index, gain_values = [], [], []
        for i in idx:
            g = gains[i]
            if isinstance(g, torch.Tensor):
                gain_index.append(len(tensor_gains))
                tensor_gains.append(g)
                gain_values.append(1.0)
            else:
                gain_index.append(-1)
                gain_values.append(float(g))
        qkv = [0 if qkv_heads[i] is None else int(qkv_heads[i]) for i in idx]
        ws = [weights[i] for i in idx]
        args = (gain_index, gain_values, float(eps), qkv, _CODES[dtype])
        if not _lean(ws + tensor_gains):
            res = _forward(ws, tensor_gains, *args)[0]
        elif torch.is_grad_enabled() and any(t.requires_grad for t in ws + tensor_gains):
            res = _LeanMpWeights.apply(args, *ws, *tensor_gains)[:-1]
        else:
            res = _ext().mp_weights_fwd(ws, tensor_gains, *args[:4], [args[4]] * len(ws))[0]
        for i, r in zip(idx, res):
            out[i] = r
    return out


def _supports(weights, gains, eps, qkv_heads, dtypes) -> bool:
    from . import _EXT
    if _library.list_results_unsupported():  # Inductor's C++ wrapper: no Tensor[] results
        return False
    for t in list(weights) + [g for g in gains if isinstance(g, torch.Tensor)]:
        if t.dtype not in _DTYPES or t.numel() > _MAX_NUMEL:
            return False
        if t.device.type == "cuda" and not (_EXT is not None and _EXT.with_cuda):
            return False
    if any(isinstance(g, torch.Tensor) and g.numel() != 1 for g in gains):
        return False
    return all(d in _DTYPES for d in dtypes) and sum(w.shape[0] for w in weights) <= _MAX_NUMEL


register("mp_weights", "cuda", mp_weights, devices=("cuda", "cpu"), supports=_supports)
