"""How a backend's kernels become ``torch.library`` custom ops.

A fast backend implements an op as two custom ops, ``mpkernels::<name>`` (forward)
and ``mpkernels::<name>_backward``, each with an explicit schema and a fake
(meta) function, tied together with ``register_autograd``. Dynamo and AOTAutograd
then see opaque, shape-propagating nodes, so ``torch.compile(fullgraph=True)``
traces a model built from them without graph breaks, and autograd works in eager.

The forward op may return more tensors than the user sees: the trailing ones are
statistics saved for backward (e.g. fp32 per-pixel inverse norms). Usage::

    fwd = kernel_op("triton_pixel_norm", "(Tensor x, float eps) -> (Tensor, Tensor)",
                    impl=_launch_fwd, fake=lambda x, eps: (torch.empty_like(x), x.new_empty(...)))
    bwd = kernel_op("triton_pixel_norm_backward", "(Tensor grad, Tensor x, Tensor rstd) -> Tensor",
                    impl=_launch_bwd, fake=lambda g, x, r: torch.empty_like(x))
    with_backward(fwd, bwd, num_outputs=1, saved_inputs=(0,), saved_outputs=(1,), grads_for=(0,))

The backward op is called as ``bwd(*grads_of_visible_outputs, *saved_inputs,
*saved_outputs, *nontensor_args)`` and returns one gradient per index in
``grads_for`` (the forward inputs that receive a gradient; the rest get None).

Eager calls take a lean path. The ``torch.library`` machinery (schema parsing, dispatcher,
the generated autograd function, alias checks) costs several microseconds per call, more
than a small kernel. So an op made by :func:`kernel_op` calls its implementation directly,
or through a plain ``torch.autograd.Function`` built from the same ``setup_context`` and
``backward`` when an input requires grad, whenever that is provably what the custom op
would do: plain tensors (no subclass, not on the meta device) and plain Python scalars
matching the schema, and nothing that intercepts ops: no ``torch.compile`` tracing, no
``TorchDispatchMode`` / ``FakeTensorMode`` / function mode, no functorch transform, no
forward-mode AD. Anything else calls the custom op itself, so tracing, fake tensors and the
benchmark's launch accounting see ``mpkernels::<name>`` nodes as before. :func:`lean_path`
switches the lean path off (tests compare both paths bit for bit; the benchmark times both).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
from torch._C._functorch import peek_interpreter_stack as _functorch_stack
from torch._library.custom_ops import CustomOpDef
from torch.autograd import forward_ad as _forward_ad

NAMESPACE = "mpkernels"
_DEFINED: dict[str, object] = {}
_LEAN = [True]  # lean_path() flips it

# Argument kinds the lean path can check exactly; an op with any other kind always takes the custom op.
_TENSOR, _OPT_TENSOR, _TENSOR_LIST, _FLOAT, _INT, _BOOL, _DTYPE = range(7)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


@contextlib.contextmanager
def lean_path(enabled: bool) -> Iterator[None]:
    """Scoped switch of the lean eager path (see the module docstring); for tests and benchmarks."""
    prev = _LEAN[0]
    _LEAN[0] = bool(enabled)
    try:
        yield
    finally:
        _LEAN[0] = prev


def _arg_kinds(schema) -> tuple[int, ...] | None:
    """Per-argument kinds of a schema, or None when the lean path cannot mirror it."""
    kinds = []
    for a in schema.arguments:
        t = a.type
        if a.kwarg_only or a.has_default_value() or a.alias_info is not None:
            return None
        if str(a.real_type) == "ScalarType":  # declared 'int' in the type, a torch.dtype in Python
            kinds.append(_DTYPE)
        elif isinstance(t, torch.TensorType):
            kinds.append(_TENSOR)
        elif isinstance(t, torch.OptionalType) and isinstance(t.getElementType(), torch.TensorType):
            kinds.append(_OPT_TENSOR)
        elif isinstance(t, torch.ListType) and isinstance(t.getElementType(), torch.TensorType):
            kinds.append(_TENSOR_LIST)
        elif isinstance(t, torch.FloatType):
            kinds.append(_FLOAT)
        elif isinstance(t, torch.IntType):
            kinds.append(_INT)
        elif isinstance(t, torch.BoolType):
            kinds.append(_BOOL)
        else:
            return None
    return tuple(kinds)


def _plain_tensor(t, devices) -> bool:
    return type(t) in _PLAIN_TENSORS and not t.is_meta and (devices is None or t.device.type in devices)


def _plain_args(args, kinds, devices) -> bool:
    """True when ``args`` are exactly what the schema's kinds say (plain tensors, exact scalar types)."""
    for a, k in zip(args, kinds):
        if k == _TENSOR:
            if not _plain_tensor(a, devices):
                return False
        elif k == _FLOAT:
            if type(a) is not float:  # the custom op would convert an int (or reject other types)
                return False
        elif k == _OPT_TENSOR:
            if a is not None and not _plain_tensor(a, devices):
                return False
        elif k == _TENSOR_LIST:
            if type(a) is not list or not all(_plain_tensor(t, devices) for t in a):
                return False
        elif k == _INT:
            if type(a) is not int:
                return False
        elif k == _DTYPE:
            if type(a) is not torch.dtype:
                return False
        elif type(a) is not bool:
            return False
    return True


# Bound once: these run on every eager call (Dynamo still recognizes is_compiling by identity).
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack
_grad_enabled = torch.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad


def _intercepted() -> bool:
    """True when something may see or transform op calls: then only the custom op is equivalent."""
    return (_dispatch_modes() > 0 or _function_modes() > 0 or _functorch_stack() is not None
            or _forward_ad._current_level >= 0)


class KernelOp(CustomOpDef):
    """A custom op whose eager calls skip the ``torch.library`` machinery when that is equivalent.

    :func:`kernel_op` turns the ``CustomOpDef`` it defines into this class (same object, so the
    dispatcher registration, ``opcheck`` and Dynamo see a regular custom op).
    """

    _lean_impl: Callable
    _lean_kinds: tuple[int, ...] | None
    _lean_devices: tuple[str, ...] | None
    _lean_function: type | None  # autograd.Function of the lean path (None: no autograd, or list args)
    _lean_tensors_only: bool  # every argument a Tensor, any device: the inline check suffices

    def __call__(self, *args, **kwargs):
        if _is_compiling():  # first, so that Dynamo folds it and traces nothing else here
            return self._opoverload(*args, **kwargs)
        kinds = self._lean_kinds
        if kwargs or not _LEAN[0] or kinds is None or len(args) != len(kinds) or _intercepted():
            return self._opoverload(*args, **kwargs)
        if self._lean_tensors_only:  # the common schema, checked inline
            for a in args:
                if type(a) not in _PLAIN_TENSORS or a.is_meta:
                    return self._opoverload(*args)
        elif not _plain_args(args, kinds, self._lean_devices):
            return self._opoverload(*args)
        if _grad_enabled() and _any_requires_grad(*args):
            if self._lean_function is None:
                return self._opoverload(*args)
            return self._lean_function.apply(*args)
        out = self._lean_impl(*args)
        return tuple(out) if type(out) is list else out

    def register_kernel(self, device_types, fn=None, /):
        self._lean_kinds = None  # a kernel registered later replaces the implementation the lean path calls
        return super().register_kernel(device_types, fn)

    def register_autograd(self, backward, /, *, setup_context=None):
        super().register_autograd(backward, setup_context=setup_context)
        self._lean_function = None
        if self._lean_kinds is not None and _TENSOR_LIST not in self._lean_kinds:
            self._lean_function = _lean_function(self, backward, setup_context)


def _lean_function(op: KernelOp, backward: Callable, setup_context: Callable | None) -> type:
    """The autograd of the custom op as a plain ``autograd.Function``: same implementation, same
    ``setup_context`` (so the same saved tensors and flags), same ``backward``."""

    def forward(ctx, *args):
        out = op._lean_impl(*args)
        if type(out) is list:
            out = tuple(out)
        if setup_context is not None:
            setup_context(ctx, args, out)
        return out

    def lean_backward(ctx, *grads):
        return backward(ctx, *grads)

    return type(f"Lean_{op._name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(lean_backward)})


def kernel_op(name: str, schema: str, *, impl: Callable, fake: Callable, device_types=None):
    """Define ``mpkernels::<name>`` with an explicit ``schema`` and register its fake function.

    Idempotent per process (a module imported twice returns the op defined first).
    ``device_types=None`` lets the implementation run on any device (it must check
    what it supports itself; the dispatch layer only routes supported calls here).
    Returns a :class:`KernelOp` (eager calls take the lean path where equivalent).
    """
    if name in _DEFINED:
        return _DEFINED[name]
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema,
                                 device_types=device_types)
    op.register_fake(fake)
    op.__class__ = KernelOp  # same object and state, eager __call__ and register_autograd extended
    op._lean_impl = impl
    op._lean_kinds = _arg_kinds(op._opoverload._schema)
    op._lean_devices = None if device_types is None else (
        (device_types,) if isinstance(device_types, str) else tuple(device_types))
    op._lean_function = None
    op._lean_tensors_only = op._lean_devices is None and op._lean_kinds is not None and all(
        k == _TENSOR for k in op._lean_kinds)
    _DEFINED[name] = op
    return op


def with_backward(fwd, bwd, *, num_outputs: int = 1, saved_inputs: Sequence[int] = (),
                  saved_outputs: Sequence[int] = (), nontensor_args: Sequence[int] = (),
                  grads_for: Sequence[int] = (0,)) -> None:
    """Register autograd for ``fwd`` in terms of the custom op ``bwd`` (see module docstring).

    ``num_outputs``: leading outputs of ``fwd`` that are differentiable; later ones
    are saved statistics and are marked non-differentiable.
    """
    saved_inputs, saved_outputs = tuple(saved_inputs), tuple(saved_outputs)
    nontensor_args, grads_for = tuple(nontensor_args), tuple(grads_for)

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*[inputs[i] for i in saved_inputs], *[outs[i] for i in saved_outputs])
        ctx.nontensor = [inputs[i] for i in nontensor_args]
        ctx.num_inputs = len(inputs)
        # Metadata of the visible outputs, to make zeros only for a visible output that got no
        # gradient; saved statistics never need one (no materialized zeros for them: no launches).
        # With one visible output, a missing gradient means no gradient at all: nothing to keep.
        if num_outputs > 1:
            ctx.visible = [(o.shape, o.dtype, o.device) for o in outs[:num_outputs]]
        ctx.set_materialize_grads(False)
        if len(outs) > num_outputs:
            extra = [o for o in outs[num_outputs:] if isinstance(o, torch.Tensor)]
            if extra:
                ctx.mark_non_differentiable(*extra)

    def backward(ctx, *grads):
        if num_outputs == 1:  # the common case, without the loop
            g = grads[0]
            if g is None:
                return (None,) * ctx.num_inputs
            dense = [g if is_dense(g) else g.contiguous()]
        else:
            if all(g is None for g in grads[:num_outputs]):
                return (None,) * ctx.num_inputs
            dense = []
            for i, g in enumerate(grads[:num_outputs]):
                if g is None:
                    shape, dtype, device = ctx.visible[i]
                    g = torch.zeros(shape, dtype=dtype, device=device)
                elif not is_dense(g):  # e.g. an expanded view from ``sum()``: kernels need dense memory
                    g = g.contiguous()
                dense.append(g)
        res = bwd(*dense, *ctx.saved_tensors, *ctx.nontensor)
        if not isinstance(res, (tuple, list)):
            res = (res,)
        full: list[torch.Tensor | None] = [None] * ctx.num_inputs
        for i, g in zip(grads_for, res):
            full[i] = g
        return tuple(full)

    fwd.register_autograd(backward, setup_context=setup_context)


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` is non-overlapping and dense (contiguous in some order of its dims)."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    pairs = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in pairs:
        if s != expected:
            return False
        expected *= n
    return True


def memory_order(t: torch.Tensor) -> list[int]:
    """Dims of a dense ``t`` from outermost to innermost in memory: ``t.permute(order)`` is contiguous."""
    order = sorted(range(t.ndim), key=lambda d: (-t.stride(d), d))
    if not t.permute(order).is_contiguous():  # size-1 dims with odd strides: fall back to a logical order
        order = list(range(t.ndim))
    return order


def cat_rows(a: torch.Tensor, b: torch.Tensor, dim: int, t: float):
    """``mp_cat``'s view of its operands, shared by every backend's concatenation kernels.

    In ``a``'s memory order (``a`` made dense first, ``b`` copied into that order only when it
    differs) both are row-major ``[M, K]`` matrices, ``M`` the product of the dims before ``dim``,
    and a concatenated row is ``[a[m] * ca | b[m] * cb]`` (spec §1: ``C = sqrt((Na + Nb) /
    ((1-t)^2 + t^2))``, ``ca = C / sqrt(Na) * (1-t)``, ``cb = C / sqrt(Nb) * t``).

    Returns ``(a2, b2, ca, cb, back)``: ``back(y2)`` turns an ``[M, Ka + Kb]`` result into the
    concatenation's shape with ``a``'s layout (a view).
    """
    if not is_dense(a):
        a = a.contiguous()
    order = memory_order(a)
    ap, bp = a.permute(order), b.permute(order)
    if not bp.is_contiguous():
        bp = bp.contiguous()
    p = order.index(dim)
    m = math.prod(ap.shape[:p])
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    shape = list(ap.shape)
    shape[p] = na + nb
    inverse = [order.index(d) for d in range(a.ndim)]
    return (ap.reshape(m, -1), bp.reshape(m, -1), c / math.sqrt(na) * (1 - t), c / math.sqrt(nb) * t,
            lambda y2: y2.reshape(shape).permute(inverse))


@torch.compiler.assume_constant_result
def _inductor_cpp_wrapper() -> bool:
    from torch._inductor import config as inductor_config
    return bool(inductor_config.cpp_wrapper)


def list_results_unsupported() -> bool:
    """True while ``torch.compile`` traces with Inductor's C++ wrapper on (``torch._inductor.config.cpp_wrapper``,
    set globally, by ``config.patch`` around the call, or by ``TORCHINDUCTOR_CPP_WRAPPER=1``).

    That wrapper cannot call a Python custom op whose result is a list of tensors ("fallback kernels
    with runtime lookup currently only support tensor returns"), so the ops with ``Tensor[]`` results
    (``mp_weights``) report themselves unsupported then and the call runs on the reference's aten ops,
    which Inductor compiles itself. ``torch.compile(options={"cpp_wrapper": True})`` applies its
    options only after tracing and is not seen here: set the config instead."""
    return torch.compiler.is_compiling() and _inductor_cpp_wrapper()


def fake_like(*tensors: torch.Tensor):
    """Fake function helper: outputs shaped, typed and strided like the given inputs."""
    outs = tuple(torch.empty_like(t) for t in tensors)
    return outs if len(outs) > 1 else outs[0]


__all__ = ["kernel_op", "with_backward", "fake_like", "is_dense", "memory_order", "cat_rows", "lean_path", "KernelOp", "NAMESPACE",
           "list_results_unsupported"]

