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
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

NAMESPACE = "mpkernels"
_DEFINED: dict[str, object] = {}


def kernel_op(name: str, schema: str, *, impl: Callable, fake: Callable, device_types=None):
    """Define ``mpkernels::<name>`` with an explicit ``schema`` and register its fake function.

    Idempotent per process (a module imported twice returns the op defined first).
    ``device_types=None`` lets the implementation run on any device (it must check
    what it supports itself; the dispatch layer only routes supported calls here).
    """
    if name in _DEFINED:
        return _DEFINED[name]
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema,
                                 device_types=device_types)
    op.register_fake(fake)
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
        ctx.nontensor = tuple(inputs[i] for i in nontensor_args)
        ctx.num_inputs = len(inputs)
        # Metadata of the visible outputs, to make zeros only for a visible output that got no
        # gradient; saved statistics never need one (no materialized zeros for them: no launches).
        ctx.visible = [(o.shape, o.dtype, o.device) for o in outs[:num_outputs]]
        ctx.set_materialize_grads(False)
        extra = [o for o in outs[num_outputs:] if isinstance(o, torch.Tensor)]
        if extra:
            ctx.mark_non_differentiable(*extra)

    def backward(ctx, *grads):
        if all(g is None for g in grads[:num_outputs]):
            return (None,) * ctx.num_inputs
        dense = []
        for g, (shape, dtype, device) in zip(grads[:num_outputs], ctx.visible):
            if g is None:
                g = torch.zeros(shape, dtype=dtype, device=device)
            elif not is_dense(g):  # e.g. an expanded view from ``sum()``: kernels need dense memory
                g = g.contiguous()
            dense.append(g)
        res = bwd(*dense, *ctx.saved_tensors, *ctx.nontensor)
        res = res if isinstance(res, (tuple, list)) else (res,)
        full: list[torch.Tensor | None] = [None] * ctx.num_inputs
        for i, g in zip(grads_for, res):
            full[i] = g
        return tuple(full)

    fwd.register_autograd(backward, setup_context=setup_context)


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` is non-overlapping and dense (contiguous in some order of its dims)."""
    if t.numel() <= 1:
        return True
    pairs = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in pairs:
        if s != expected:
            return False
        expected *= n
    return True


def fake_like(*tensors: torch.Tensor):
    """Fake function helper: outputs shaped, typed and strided like the given inputs."""
    outs = tuple(torch.empty_like(t) for t in tensors)
    return outs if len(outs) > 1 else outs[0]


__all__ = ["kernel_op", "with_backward", "fake_like", "is_dense", "NAMESPACE"]

