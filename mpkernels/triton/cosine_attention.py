"""Cosine attention of an EDM2 Block (spec §1), flash-attention style, forward and backward.

Reads q, k and v straight from the qkv convolution's output ``[N, 3C, H, W]``, NCHW (tokens
contiguous) or channels_last (channels contiguous, flag ``CL``), with no reshape or transpose
copies, and writes ``[N, C, H, W]`` (channel ``head*D + d``) in the same layout. The channels
of qkv are either the release's interleaved order ``head*3*D + 3*d + j`` (``j`` = q, k, v;
spec §1) or head-contiguous ``head*3*D + j*D + d`` (flag ``HC``). Under channels_last only the
second gives contiguous [tokens, D] tiles, hence vector loads (interleaved channels sit at
stride 3 and load one element at a time); the model gets it for free by permuting the rows of
the qkv weight, which it recomputes every step anyway (``mp_conv2d(..., qkv_heads=...)``).

Forward: a first pass reads qkv once and computes, in fp32, ``inv = 1/(eps + ||x||/sqrt(D))``
for every q, k and v vector. The attention kernel then normalizes on the fly without touching
the tiles: the dots run on the raw vectors in their own dtype (tensor cores, fp32 accumulation)
and the normalization enters as fp32 scales, ``logits = (q . k) * inv_q * inv_k / sqrt(D)`` (in
base 2) and ``o = sum_k p * inv_v * v``; an online softmax runs over blocks of keys and the
L x L matrix never exists. This is also more exact than normalizing then rounding q, k and v.
Saved for backward: the fp32 log-sum-exp per query and the fp32 ``inv`` per vector, plus the
input and the output (which ``attn_proj`` keeps anyway).

Backward (flash-attention 2): a small kernel computes ``delta = rowsum(dO * O)``; one kernel
per key block accumulates ``dk``, ``dv`` over all queries, one per query block accumulates
``dq`` over all keys, both recomputing the logits exactly as the forward did. Each then maps
the gradient of the normalized vectors back through the normalization
(``dx = inv*dxn - x*inv^2*<dxn, x>/(D*rms)``) and writes it into ``dqkv`` in the qkv layout.
The MMAs that produce dq and dk take the normalized k and q (rounded to the input dtype) as
operands, not ``ds * inv`` with the raw vectors: inverse norms reach 1/eps = 1e4, and with a
loss-scaled fp16 gradient that product overflows where the normalized operand stays O(1).

Head dims up to 128 (zero-padded to 64 or 128), any sequence length (masked tails).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._library import kernel_op, with_backward
from . import _common as C

EPS = 1e-4  # normalize()'s default (spec §1)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LN2_CONST = tl.constexpr(LN2)


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:  # fp32 inputs: exact fp32 products (no TF32), as eager PyTorch computes by default
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _strides(L, C3, Cn, CL: tl.constexpr):
    """(channel stride, token stride) of qkv and (channel stride, token stride) of the output.

    ``Cn = C3 / 3`` comes as its own argument: the JIT then knows when it is a multiple of 16 (it
    cannot infer that from ``C3 // 3``), which the output's and dO's channels_last vector accesses need."""
    if CL:
        return 1, C3, 1, Cn
    else:
        return L, 1, L, 1


@triton.jit
def _channel(d, D, J: tl.constexpr, HC: tl.constexpr):
    """Channel of element ``d`` of vector ``J`` (0, 1, 2 = q, k, v) within its head's 3*D channels."""
    if HC:  # head-contiguous: q, k, v one after the other, each a contiguous run of D channels
        return J * D + d
    else:  # the release's interleaved order (spec §1)
        return 3 * d + J


@triton.jit
def _load_vectors(base, tok, d, L, D, s_c, s_l, J: tl.constexpr, HC: tl.constexpr):
    """Raw vectors j=J of the tokens ``tok`` as a [len(tok), BLOCK_D] tile in the input dtype (zeros outside)."""
    m = (tok < L)[:, None] & (d < D)[None, :]
    return tl.load(base + _channel(d, D, J, HC)[None, :] * s_c + tok[:, None] * s_l, mask=m, other=0.0)


@triton.jit
def _head_program(L, heads, D, C3, Cn, n_blocks, CL: tl.constexpr):
    """What program ``program_id(0)`` handles: block ``blk`` of the tokens of (batch, head) ``bh``.

    Returns ``(bh, blk, s_c, s_l, so_c, so_l, sample, o_off)``: the strides of :func:`_strides`,
    ``sample`` the element offset of the head's first q/k/v channel in qkv, ``o_off`` that of its
    first channel in the output (and in dO)."""
    pid = tl.program_id(0)
    bh = pid // n_blocks
    blk = pid % n_blocks
    n = bh // heads
    h = bh % heads
    s_c, s_l, so_c, so_l = _strides(L, C3, Cn, CL)
    sample = n.to(tl.int64) * C3 * L + (h * 3 * D) * s_c
    o_off = n.to(tl.int64) * Cn * L + (h * D) * so_c
    return bh, blk, s_c, s_l, so_c, so_l, sample, o_off


@triton.jit
def _attn_norms_kernel(qkv_ptr, inv_ptr, L, heads, D, C3, Cn, n_tblocks, eps, rsqrt_d,
                       CL: tl.constexpr, HC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """inv[n, head, j, token] = 1 / (eps + ||x|| / sqrt(D)) for every q, k, v vector (fp32), one read of qkv."""
    bh, tb, s_c, s_l, so_c, so_l, sample, o_off = _head_program(L, heads, D, C3, Cn, n_tblocks, CL)
    base = qkv_ptr + sample
    d = tl.arange(0, BLOCK_D)
    tok = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    for j in tl.static_range(3):
        x = _load_vectors(base, tok, d, L, D, s_c, s_l, j, HC).to(tl.float32)
        inv = 1.0 / (eps + tl.sqrt(tl.sum(x * x, axis=1)) * rsqrt_d)
        tl.store(inv_ptr + (bh.to(tl.int64) * 3 + j) * L + tok, inv, mask=tok < L)


@triton.jit
def _attn_fwd_kernel(qkv_ptr, inv_ptr, o_ptr, lse_ptr, L, heads, D, C3, Cn, n_mblocks, qk_scale,
                     CL: tl.constexpr, HC: tl.constexpr, FP32: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (batch, head, query block): online softmax over key blocks; logits = (q . k) * inv_q * inv_k / sqrt(D)."""
    bh, mb, s_c, s_l, so_c, so_l, sample, o_off = _head_program(L, heads, D, C3, Cn, n_mblocks, CL)
    base = qkv_ptr + sample
    inv_base = inv_ptr + bh.to(tl.int64) * 3 * L
    d = tl.arange(0, BLOCK_D)
    tok_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = tok_m < L
    q = _load_vectors(base, tok_m, d, L, D, s_c, s_l, 0, HC)
    q_scale = tl.load(inv_base + tok_m, mask=mmask, other=1.0) * qk_scale  # base-2 logits
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        tok_n = n0 + tl.arange(0, BLOCK_N)
        kmask = tok_n < L
        k = _load_vectors(base, tok_n, d, L, D, s_c, s_l, 1, HC)
        v = _load_vectors(base, tok_n, d, L, D, s_c, s_l, 2, HC)
        inv_k = tl.load(inv_base + L + tok_n, mask=kmask, other=1.0)
        inv_v = tl.load(inv_base + 2 * L + tok_n, mask=kmask, other=1.0)
        s = _dot(q, tl.trans(k), FP32) * q_scale[:, None] * inv_k[None, :]
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # p @ vn with vn = v * inv_v: the normalization of v folds into the columns of p.
        acc = acc * alpha[:, None] + _dot((p * inv_v[None, :]).to(v.dtype), v, FP32)
        m_i = m_new
    o = acc / l_i[:, None]
    o_base = o_ptr + o_off
    tl.store(o_base + d[None, :] * so_c + tok_m[:, None] * so_l, o.to(o_ptr.dtype.element_ty),
             mask=mmask[:, None] & (d < D)[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * L + tok_m, m_i + tl.math.log2(l_i), mask=mmask)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, L, heads, D, Cn, n_mblocks,
                           CL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[bh, l] = sum_d dO * O (fp32)."""
    pid = tl.program_id(0)
    bh = pid // n_mblocks
    mb = pid % n_mblocks
    n = bh // heads
    h = bh % heads
    if CL:
        so_c = 1
        so_l = Cn
    else:
        so_c = L
        so_l = 1
    d = tl.arange(0, BLOCK_D)
    tok = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m = (tok < L)[:, None] & (d < D)[None, :]
    off = n.to(tl.int64) * Cn * L + (h * D) * so_c + d[None, :] * so_c + tok[:, None] * so_l
    o = tl.load(o_ptr + off, mask=m, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * L + tok, tl.sum(o * do, axis=1), mask=tok < L)


@triton.jit
def _unnormalize_grad(gxn, x, inv, eps, inv_d):
    """Gradient w.r.t. raw vectors x [B, D] given the gradient w.r.t. xn = x * inv (fp32)."""
    rms = 1.0 / inv - eps
    coef = tl.where(rms > 0.0, inv * inv * inv_d / tl.where(rms > 0.0, rms, 1.0), 0.0)
    dot = tl.sum(gxn * x, axis=1)
    return gxn * inv[:, None] - x * (coef * dot)[:, None]


@triton.jit
def _attn_bwd_dkdv_kernel(qkv_ptr, inv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, L, heads, D, C3, Cn, n_nblocks,
                          eps, inv_d, qk_scale, rsqrt_d,
                          CL: tl.constexpr, HC: tl.constexpr, FP32: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (batch, head, key block): dk, dv accumulated over every query block."""
    bh, nb, s_c, s_l, so_c, so_l, sample, o_off = _head_program(L, heads, D, C3, Cn, n_nblocks, CL)
    base = qkv_ptr + sample
    o_base = do_ptr + o_off
    inv_base = inv_ptr + bh.to(tl.int64) * 3 * L
    row_base = bh.to(tl.int64) * L
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    tok_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = tok_n < L
    k = _load_vectors(base, tok_n, d, L, D, s_c, s_l, 1, HC)
    v = _load_vectors(base, tok_n, d, L, D, s_c, s_l, 2, HC)
    inv_k = tl.load(inv_base + L + tok_n, mask=kmask, other=1.0)
    inv_v = tl.load(inv_base + 2 * L + tok_n, mask=kmask, other=1.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # gradient w.r.t. the normalized k (times sqrt(D))
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # gradient w.r.t. the normalized v
    for m0 in range(0, L, BLOCK_M):
        tok_m = m0 + tl.arange(0, BLOCK_M)
        mmask = tok_m < L
        q = _load_vectors(base, tok_m, d, L, D, s_c, s_l, 0, HC)
        inv_q = tl.load(inv_base + tok_m, mask=mmask, other=1.0)
        # The normalized q as the MMA operand: O(1) entries, where dst * inv_q (inv up to 1/eps)
        # would overflow fp16 under loss scaling.
        qn = (q.to(tl.float32) * inv_q[:, None]).to(q.dtype)
        do = tl.load(o_base + d[None, :] * so_c + tok_m[:, None] * so_l, mask=mmask[:, None] & dmask[None, :],
                     other=0.0)
        lse = tl.load(lse_ptr + row_base + tok_m, mask=mmask, other=float("inf"))
        delta = tl.load(delta_ptr + row_base + tok_m, mask=mmask, other=0.0)
        # Transposed [BLOCK_N, BLOCK_M] logits, computed exactly as in the forward.
        st = _dot(k, tl.trans(q), FP32) * inv_k[:, None] * (inv_q * qk_scale)[None, :]
        pt = tl.math.exp2(st - lse[None, :])
        dv += _dot(pt.to(do.dtype), do, FP32)
        dpt = _dot(v, tl.trans(do), FP32) * inv_v[:, None]
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), qn, FP32)
    gk = _unnormalize_grad(dk * rsqrt_d, k.to(tl.float32), inv_k, eps, inv_d)
    gv = _unnormalize_grad(dv, v.to(tl.float32), inv_v, eps, inv_d)
    m2 = kmask[:, None] & dmask[None, :]
    dbase = dqkv_ptr + sample
    tl.store(dbase + _channel(d, D, 1, HC)[None, :] * s_c + tok_n[:, None] * s_l, gk.to(dqkv_ptr.dtype.element_ty),
             mask=m2)
    tl.store(dbase + _channel(d, D, 2, HC)[None, :] * s_c + tok_n[:, None] * s_l, gv.to(dqkv_ptr.dtype.element_ty),
             mask=m2)


@triton.jit
def _attn_bwd_dq_kernel(qkv_ptr, inv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, L, heads, D, C3, Cn, n_mblocks,
                        eps, inv_d, qk_scale, rsqrt_d,
                        CL: tl.constexpr, HC: tl.constexpr, FP32: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (batch, head, query block): dq accumulated over every key block."""
    bh, mb, s_c, s_l, so_c, so_l, sample, o_off = _head_program(L, heads, D, C3, Cn, n_mblocks, CL)
    base = qkv_ptr + sample
    o_base = do_ptr + o_off
    inv_base = inv_ptr + bh.to(tl.int64) * 3 * L
    row_base = bh.to(tl.int64) * L
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    tok_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = tok_m < L
    q = _load_vectors(base, tok_m, d, L, D, s_c, s_l, 0, HC)
    inv_q = tl.load(inv_base + tok_m, mask=mmask, other=1.0)
    q_scale = inv_q * qk_scale
    do = tl.load(o_base + d[None, :] * so_c + tok_m[:, None] * so_l, mask=mmask[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(lse_ptr + row_base + tok_m, mask=mmask, other=float("inf"))
    delta = tl.load(delta_ptr + row_base + tok_m, mask=mmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        tok_n = n0 + tl.arange(0, BLOCK_N)
        kmask = tok_n < L
        k = _load_vectors(base, tok_n, d, L, D, s_c, s_l, 1, HC)
        v = _load_vectors(base, tok_n, d, L, D, s_c, s_l, 2, HC)
        inv_k = tl.load(inv_base + L + tok_n, mask=kmask, other=1.0)
        inv_v = tl.load(inv_base + 2 * L + tok_n, mask=kmask, other=1.0)
        kn = (k.to(tl.float32) * inv_k[:, None]).to(k.dtype)  # normalized k as the operand (see dkdv)
        s = _dot(q, tl.trans(k), FP32) * q_scale[:, None] * inv_k[None, :]
        p = tl.where(kmask[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), FP32) * inv_v[None, :]
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), kn, FP32)
    gq = _unnormalize_grad(dq * rsqrt_d, q.to(tl.float32), inv_q, eps, inv_d)
    tl.store(dqkv_ptr + sample + _channel(d, D, 0, HC)[None, :] * s_c + tok_m[:, None] * s_l,
             gq.to(dqkv_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


# --- configurations --------------------------------------------------------------------------

BLOCK_DS = (64, 128)  # head dims up to 64 use 64 (zero-padded), up to 128 use 128
NORMS_BLOCK_T = 32
DELTA_BLOCK_M = 32


def _blocks(kernel: str, fp32: bool, bd: int, cl: bool, fast: bool, cl_any: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` ('fwd', 'dkdv', 'dq').

    ``fast``: the sequence length is a multiple of 16 and every tensor 16-byte aligned, so the
    JIT's aligned specialization (vector loads) is what runs; otherwise smaller tiles keep the
    scalar-load code within the register file. ``cl``: channels_last with interleaved q/k/v
    (scalar loads, more registers); head-contiguous channels_last tiles load like NCHW ones.
    ``cl_any``: channels_last in either layout.
    fp32 inputs use exact fp32 dots (no tensor cores) on small tiles. Every combination is
    compiled for sm_80 and sm_90 in the tests.
    """
    if fp32:
        return (16, 16, 8, 1)
    if not fast:  # dkdv also holds the normalized q tile (the fp16-safe MMA operand): fewer queries per step
        return (16, 32, 8, 2) if kernel == "dkdv" else (32, 32, 8, 2)
    if kernel == "fwd":  # bd 128 with 64 keys per step spills on sm_80 under Triton 3.6: 32 keys
        return (64, 32, 8, 2) if bd == 128 else (64, 64, 4, 2)
    if kernel == "dkdv":
        if cl:
            return (32, 32, 8, 2)
        return (32, 32, 4, 2) if bd == 128 else (32, 64, 4, 2)
    # dq
    if bd == 128:
        return (32, 32, 8, 2) if cl else (32, 32, 4, 2)
    # 64 queries per step spill on sm_80 under Triton 3.6 with channels_last (either layout): 32
    return (32, 32, 4, 2) if cl_any else (64, 32, 4, 2)


def _block_d(D: int, fast: bool) -> int:
    # Odd sizes (the scalar-load path) are rare and small: one head-dim block serves them all.
    return next(b for b in BLOCK_DS if b >= D) if fast else BLOCK_DS[-1]


def _variants(fast: bool):
    return ("aligned",) if fast else ("generic",)


def _attn_config(kernel, name, d, cl, hc, bd, fast, ptrs, floats):
    fp32 = d == torch.float32
    bm, bn, w, s = _blocks(name, fp32, bd, cl and not hc, fast, cl_any=cl)
    return C.make_config(kernel, ptrs=ptrs, floats=floats,
                         constexprs=dict(CL=cl, HC=hc, FP32=fp32, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn),
                         num_warps=w, num_stages=s, variants=_variants(fast))


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _norms_config(d, cl, hc, bd):
    return C.make_config(_attn_norms_kernel, ptrs=dict(qkv_ptr=d, inv_ptr="fp32"), floats=("eps", "rsqrt_d"),
                         constexprs=dict(CL=cl, HC=hc, BLOCK_D=bd, BLOCK_T=NORMS_BLOCK_T), num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _fwd_config(d, cl, hc, bd, fast):
    return _attn_config(_attn_fwd_kernel, "fwd", d, cl, hc, bd, fast,
                        dict(qkv_ptr=d, inv_ptr="fp32", o_ptr=d, lse_ptr="fp32"), ("qk_scale",))


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _delta_config(d, cl, bd):
    return C.make_config(_attn_bwd_delta_kernel, ptrs=dict(o_ptr=d, do_ptr=d, delta_ptr="fp32"),
                         constexprs=dict(CL=cl, BLOCK_D=bd, BLOCK_M=DELTA_BLOCK_M), num_warps=4, num_stages=1)


_BWD_FLOATS = ("eps", "inv_d", "qk_scale", "rsqrt_d")


def _bwd_ptrs(d):
    return dict(qkv_ptr=d, inv_ptr="fp32", do_ptr=d, lse_ptr="fp32", delta_ptr="fp32", dqkv_ptr=d)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _dkdv_config(d, cl, hc, bd, fast):
    return _attn_config(_attn_bwd_dkdv_kernel, "dkdv", d, cl, hc, bd, fast, _bwd_ptrs(d), _BWD_FLOATS)


@functools.lru_cache(maxsize=None)  # configs are immutable; build each once
def _dq_config(d, cl, hc, bd, fast):
    return _attn_config(_attn_bwd_dq_kernel, "dq", d, cl, hc, bd, fast, _bwd_ptrs(d), _BWD_FLOATS)


@C.declare_configs
def configs():
    for d in C.DTYPES:
        for cl in (False, True):
            for bd in BLOCK_DS:
                yield _delta_config(d, cl, bd)
                for hc in (False, True):
                    yield _norms_config(d, cl, hc, bd)
                    for fast in (False, True):
                        if fast or bd == _block_d(bd, False):
                            yield _fwd_config(d, cl, hc, bd, fast)
                            yield _dkdv_config(d, cl, hc, bd, fast)
                            yield _dq_config(d, cl, hc, bd, fast)


# --- launchers -----------------------------------------------------------------------------

LAYOUTS = ("interleaved", "head_contiguous")
# Offsets inside one sample are 32-bit (token * channels, channel * tokens): per-sample qkv sizes
# from 2^31 elements on fall back to the reference (see ``supports``).
MAX_SAMPLE_NUMEL = 2 ** 31 - 1


def _is_cl(qkv: torch.Tensor) -> bool:
    return not qkv.is_contiguous()


def _dims(qkv: torch.Tensor, heads: int):
    n, c3, h, w = qkv.shape
    return n, c3, h * w, c3 // (3 * heads)


def _fast(L: int, c3: int, *tensors: torch.Tensor) -> bool:
    """True when the JIT will specialize the launch for 16-element-divisible sizes and aligned pointers."""
    return L % 16 == 0 and (c3 // 3) % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


def attention_forward(qkv: torch.Tensor, heads: int, hc: bool):
    n, c3, L, D = _dims(qkv, heads)
    cl = _is_cl(qkv)
    fmt = torch.channels_last if cl else torch.contiguous_format
    o = torch.empty((n, c3 // 3) + tuple(qkv.shape[2:]), dtype=qkv.dtype, device=qkv.device, memory_format=fmt)
    lse = torch.empty((n, heads, L), dtype=torch.float32, device=qkv.device)
    inv = torch.empty((n, heads, 3, L), dtype=torch.float32, device=qkv.device)
    fast = _fast(L, c3, qkv, o)
    bd = _block_d(D, fast)
    ntb = C.cdiv(L, NORMS_BLOCK_T)
    C.launch(_norms_config(qkv.dtype, cl, hc, bd), (n * heads * ntb,), qkv, inv, L, heads, D, c3, c3 // 3, ntb, EPS,
             1.0 / math.sqrt(D))
    cfg = _fwd_config(qkv.dtype, cl, hc, bd, fast)
    nmb = C.cdiv(L, dict(cfg.constexprs)["BLOCK_M"])
    C.launch(cfg, (n * heads * nmb,), qkv, inv, o, lse, L, heads, D, c3, c3 // 3, nmb, LOG2E / math.sqrt(D))
    return o, lse, inv


def attention_backward(g: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, inv: torch.Tensor,
                       heads: int, hc: bool):
    n, c3, L, D = _dims(qkv, heads)
    cl = _is_cl(qkv)
    g = C.like(g, o)
    dqkv = C.empty_like_dense(qkv)
    fast = _fast(L, c3, qkv, g, dqkv)
    bd = _block_d(D, fast)
    delta = torch.empty_like(lse)
    nmb = C.cdiv(L, DELTA_BLOCK_M)
    C.launch(_delta_config(qkv.dtype, cl, bd), (n * heads * nmb,), o, g, delta, L, heads, D, c3 // 3, nmb)
    scalars = (EPS, 1.0 / D, LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))
    cfg = _dkdv_config(qkv.dtype, cl, hc, bd, fast)
    nnb = C.cdiv(L, dict(cfg.constexprs)["BLOCK_N"])
    C.launch(cfg, (n * heads * nnb,), qkv, inv, g, lse, delta, dqkv, L, heads, D, c3, c3 // 3, nnb, *scalars)
    cfg = _dq_config(qkv.dtype, cl, hc, bd, fast)
    nmb = C.cdiv(L, dict(cfg.constexprs)["BLOCK_M"])
    C.launch(cfg, (n * heads * nmb,), qkv, inv, g, lse, delta, dqkv, L, heads, D, c3, c3 // 3, nmb, *scalars)
    return dqkv


def _fake_fwd(qkv, heads, hc):
    n, c3, L, D = _dims(qkv, heads)
    fmt = torch.channels_last if _is_cl(qkv) else torch.contiguous_format
    o = torch.empty((n, c3 // 3) + tuple(qkv.shape[2:]), dtype=qkv.dtype, device=qkv.device, memory_format=fmt)
    return o, qkv.new_empty((n, heads, L), dtype=torch.float32), qkv.new_empty((n, heads, 3, L), dtype=torch.float32)


_fwd_op = kernel_op("triton_cosine_attention",
                    "(Tensor qkv, int num_heads, bool head_contiguous) -> (Tensor, Tensor, Tensor)",
                    impl=attention_forward, fake=_fake_fwd)
_bwd_op = kernel_op("triton_cosine_attention_backward",
                    "(Tensor g, Tensor qkv, Tensor o, Tensor lse, Tensor inv, int num_heads, bool head_contiguous) "
                    "-> Tensor",
                    impl=attention_backward, fake=lambda g, qkv, o, lse, inv, heads, hc: torch.empty_like(qkv))
with_backward(_fwd_op, _bwd_op, num_outputs=1, saved_inputs=(0,), saved_outputs=(0, 1, 2), nontensor_args=(1, 2),
              grads_for=(0,))


def cosine_attention(qkv: torch.Tensor, num_heads: int, layout: str = "interleaved") -> torch.Tensor:
    if not (qkv.is_contiguous() or qkv.is_contiguous(memory_format=torch.channels_last)):
        qkv = qkv.contiguous()
    return _fwd_op(qkv, num_heads, layout == "head_contiguous")[0]


def supports(qkv, num_heads, layout: str = "interleaved") -> bool:
    D = qkv.shape[1] // (3 * num_heads)
    sample = qkv.numel() // max(1, qkv.shape[0])
    return C.supported_dtype(qkv) and D <= BLOCK_DS[-1] and sample <= MAX_SAMPLE_NUMEL and layout in LAYOUTS
