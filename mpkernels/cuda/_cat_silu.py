"""``mp_cat_mp_silu`` (decoder Block input, spec §2) on the extension (``csrc/cat*``): one launch each way.

The decoder Block reads the concatenation twice: MP-SiLU of it feeds the first convolution, the
concatenation itself the skip convolution (or the residual). As on the Triton backend
(``mpkernels/triton/mp_cat_silu.py``):

* forward: one kernel writes ``x = [a * ca | b * cb]`` rounded to the dtype (the reference's
  ``mp_cat``) and ``y = mp_silu(x)`` computed from that rounded ``x``;
* backward: one kernel reads the gradients of ``x`` and ``y`` (either may be absent: an unused
  output costs nothing) and the saved ``x``, and writes ``da``, ``db``:
  ``g = gx + gy * mp_silu'(x)`` in fp32, times the cat coefficient. No autograd gradient sum.

``a``, ``b``, ``x`` and ``y`` share ``a``'s memory order of dims, in which each is a row-major
``[M, K]`` matrix (``M`` = the dims before ``dim``; ``mpkernels/cuda/_attention.py``'s ``mp_cat``),
so NCHW and channels_last inputs take no copy and the outputs keep ``a``'s layout.
"""

from __future__ import annotations

from .._dispatch import register
from .._library import cat_rows, kernel_op
from ._attention import _cat_ok, _ext


def _fwd_fake(a, b, ca, cb):
    shape = (a.shape[0], a.shape[1] + b.shape[1])
    return a.new_empty(shape), a.new_empty(shape)


def _bwd_fake(gx, gy, x, ka, ca, cb):
    return x.new_empty((x.shape[0], ka)), x.new_empty((x.shape[0], x.shape[1] - ka))


_fwd = kernel_op("cuda_mp_cat_mp_silu", "(Tensor a, Tensor b, float ca, float cb) -> (Tensor, Tensor)",
                 impl=lambda a, b, ca, cb: tuple(_ext().mp_cat_silu_fwd(a, b, ca, cb)), fake=_fwd_fake)
_bwd = kernel_op("cuda_mp_cat_mp_silu_backward",
                 "(Tensor? gx, Tensor? gy, Tensor x, int ka, float ca, float cb) -> (Tensor, Tensor)",
                 impl=lambda gx, gy, x, ka, ca, cb: tuple(_ext().mp_cat_silu_bwd(gx, gy, x, ka, ca, cb)),
                 fake=_bwd_fake)


def _setup(ctx, inputs, output):
    ctx.ka = inputs[0].shape[1]
    ctx.ca, ctx.cb = inputs[2], inputs[3]
    ctx.save_for_backward(output[0])
    ctx.set_materialize_grads(False)  # an unused x or y arrives as None, not as zeros to read


def _grad(ctx, gx, gy):
    if gx is None and gy is None:
        return None, None, None, None
    (x,) = ctx.saved_tensors
    da, db = _bwd(gx, gy, x, ctx.ka, ctx.ca, ctx.cb)
    return da, db, None, None


_fwd.register_autograd(_grad, setup_context=_setup)


def mp_cat_mp_silu(a, b, dim, t):
    a2, b2, ca, cb, back = cat_rows(a, b, dim, t)
    x2, y2 = _fwd(a2, b2, ca, cb)
    return back(x2), back(y2)


register("mp_cat_mp_silu", "cuda", mp_cat_mp_silu, devices=("cuda", "cpu"), supports=_cat_ok)
