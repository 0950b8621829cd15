"""``cosine_attention`` and ``mp_cat`` (spec §1) on the extension (``csrc/attention*``, ``csrc/cat*``).

**cosine_attention.** One extension kernel normalizes every q, k and v vector of the qkv
convolution output to unit RMS over its ``D`` channels (fp32 math, either channel order, NCHW or
channels_last input) and writes q, k, v as ``[N, L, heads, D]``, the memory layout PyTorch's fused
scaled-dot-product attention reads without a copy; the fp32 rms of every vector is saved for
backward. The attention core is PyTorch's SDPA (flash attention for fp16/bf16, memory-efficient
attention for fp32 on a GPU: one launch forward, one backward) with its default scale
``1/sqrt(D)``, the spec's. Its output ``[N, heads, L, D]`` lives in ``[N, L, heads, D]`` memory,
which is ``[N, C, H, W]`` channels_last with channel ``head*D + d``: a channels_last qkv gets it
without a copy; an NCHW one gets one NCHW copy (SDPA has no transposed output). Backward: SDPA's
backward, then the extension's normalization backward, which reads the three gradients with
their own strides and writes ``d qkv`` in qkv's layout. Ops per forward+backward: 4
(channels_last) or 5 (NCHW: the copy of the output; on a GPU SDPA's backward may add a copy of the
then transposed output gradient).

Numerics against the reference: the reference rounds q, k, v to the input dtype after a
denominator rounded to that dtype, computes ``q.k`` with fp32 accumulation, rounds the logits to
the dtype, and takes the softmax of the rounded logits (fp32 inside, rounded output), then
``A v``. Here q, k, v are rounded once from fp32, and SDPA keeps logits, the online softmax and
the output accumulator in fp32 (flash rounds the probabilities to fp16/bf16 for the ``P V``
product only), so low-precision results are at least as close to an fp64 oracle
(``tests/test_cuda_attention_cat.py`` checks the rule of STYLE.md). In fp32 on a GPU,
memory-efficient attention computes in fp32 (no TF32), like the reference's einsum by default.

On the meta device under ``mpkernels._dispatch.simulate('cuda')`` (launch accounting) the SDPA
aten op a GPU would run is called directly (``_scaled_dot_product_flash_attention`` for
fp16/bf16 with ``D % 8 == 0`` and ``D <= 256``, else ``_scaled_dot_product_efficient_attention``):
the composite ``F.scaled_dot_product_attention`` would decompose into the math path there. CPU
tensors take the normalization's CPU twin and ``F.scaled_dot_product_attention`` (PyTorch's CPU
flash kernel).

**mp_cat.** As the Triton backend: ``a``, ``b`` and the output share ``a``'s memory order of dims,
in which each is a row-major ``[M, K]`` matrix (``M`` = the dims before ``dim``); one kernel writes
both scaled blocks (forward), one writes both gradients (backward). Nothing is saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import register
from .._library import cat_rows, kernel_op
from . import _ok  # mpkernels.cuda imports this module last, after defining it

EPS = 1e-4  # normalize()'s default (spec §1)
_MAX_NUMEL = 2 ** 31 - 1


def _ext():
    from . import _EXT  # the loaded extension (set by mpkernels.cuda at load or build time)
    if _EXT is None:
        raise RuntimeError("the mpkernels extension is not loaded; call mpkernels.cuda.build() first")
    return _EXT


# ------------------------------------------------------------------------------------------------
# cosine attention

def _normalize_fake(qkv, heads, head_contiguous, eps):
    n, c3, h, w = qkv.shape
    d, L = c3 // (3 * heads), h * w
    qkv_like = tuple(qkv.new_empty((n, L, heads, d)) for _ in range(3))
    return (*qkv_like, qkv.new_empty((3, n, L, heads), dtype=torch.float32))


_normalize = kernel_op(
    "cuda_qkv_normalize", "(Tensor qkv, int heads, bool head_contiguous, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    impl=lambda qkv, heads, hc, eps: tuple(_ext().qkv_normalize_fwd(qkv, heads, hc, eps)),
    fake=_normalize_fake)
_normalize_backward = kernel_op(
    "cuda_qkv_normalize_backward",
    "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor qkv, Tensor rms, int heads, bool head_contiguous, "
    "float eps) -> Tensor",
    impl=lambda gq, gk, gv, qkv, rms, heads, hc, eps: _ext().qkv_normalize_bwd(gq, gk, gv, qkv, rms, heads, hc, eps),
    fake=lambda gq, gk, gv, qkv, rms, heads, hc, eps: torch.empty_like(qkv))


def _normalize_setup(ctx, inputs, output):
    qkv, heads, hc, eps = inputs
    ctx.save_for_backward(qkv, output[3])
    ctx.args = (heads, hc, eps)
    ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)


def _normalize_grad(ctx, gq, gk, gv, _grms=None):
    if gq is None and gk is None and gv is None:
        return None, None, None, None
    qkv, rms = ctx.saved_tensors
    heads, hc, eps = ctx.args
    n, c3, h, w = qkv.shape
    shape = (n, h * w, heads, c3 // (3 * heads))
    # The kernel reads each gradient with its own strides (SDPA may hand out views of one packed
    # buffer): no copies; a missing one is zeros.
    gq, gk, gv = (g if g is not None else qkv.new_zeros(shape) for g in (gq, gk, gv))
    return _normalize_backward(gq, gk, gv, qkv, rms, heads, hc, eps), None, None, None


_normalize.register_autograd(_normalize_grad, setup_context=_normalize_setup)


def _sdpa(q, k, v):
    """PyTorch's fused attention on [N, heads, L, D] views; default scale 1/sqrt(D) (spec §1)."""
    if q.device.type == "meta":  # launch accounting: the op a GPU runs (see the module docstring)
        d = q.shape[-1]
        if q.dtype != torch.float32 and d % 8 == 0 and d <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        need_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, need_lse)[0]
    return F.scaled_dot_product_attention(q, k, v)


def cosine_attention(qkv, num_heads, layout="interleaved"):
    n, c3, h, w = qkv.shape
    q, k, v, _ = _normalize(qkv, num_heads, layout == "head_contiguous", EPS)
    o = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    # [N, heads, L, D] in [N, L, heads, D] memory = channels_last [N, C, H, W] (a view).
    y = o.transpose(1, 2).reshape(n, h, w, c3 // 3).permute(0, 3, 1, 2)
    if not qkv.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous()  # NCHW in, NCHW out, like the other ops of this backend
    return y


def _attention_ok(qkv, num_heads, layout="interleaved") -> bool:
    return _ok(qkv) and qkv.numel() > 0


# ------------------------------------------------------------------------------------------------
# mp_cat

_cat_fwd = kernel_op("cuda_mp_cat", "(Tensor a, Tensor b, float ca, float cb) -> Tensor",
                     impl=lambda a, b, ca, cb: _ext().mp_cat_fwd(a, b, ca, cb),
                     fake=lambda a, b, ca, cb: a.new_empty((a.shape[0], a.shape[1] + b.shape[1])))
_cat_bwd = kernel_op("cuda_mp_cat_backward", "(Tensor g, int ka, float ca, float cb) -> (Tensor, Tensor)",
                     impl=lambda g, ka, ca, cb: tuple(_ext().mp_cat_bwd(g, ka, ca, cb)),
                     fake=lambda g, ka, ca, cb: (g.new_empty((g.shape[0], ka)),
                                                 g.new_empty((g.shape[0], g.shape[1] - ka))))


def _cat_setup(ctx, inputs, output):
    ctx.ka = inputs[0].shape[1]
    ctx.ca, ctx.cb = inputs[2], inputs[3]


def _cat_grad(ctx, g):
    if g is None:
        return None, None, None, None
    da, db = _cat_bwd(g, ctx.ka, ctx.ca, ctx.cb)
    return da, db, None, None


# Only sizes and scalars are needed for backward: tied directly, not through with_backward.
_cat_fwd.register_autograd(_cat_grad, setup_context=_cat_setup)


def mp_cat(a, b, dim, t):
    a2, b2, ca, cb, back = cat_rows(a, b, dim, t)
    return back(_cat_fwd(a2, b2, ca, cb))


def _cat_ok(a, b, dim=1, t=0.5) -> bool:
    return (_ok(a, b) and a.dtype == b.dtype and a.shape[dim] > 0 and b.shape[dim] > 0
            and a.numel() + b.numel() <= _MAX_NUMEL)


_DEVICES = ("cuda", "cpu")
register("cosine_attention", "cuda", cosine_attention, devices=_DEVICES, supports=_attention_ok)
register("mp_cat", "cuda", mp_cat, devices=_DEVICES, supports=_cat_ok)
