"""Issue 9, part B: Triton cosine attention (head-contiguous qkv, fp16 backward, 64-bit offsets)
and the normalize tiling.

* ``layout='head_contiguous'`` gives the same attention as the spec's interleaved channels when
  the qkv weight's rows are permuted (``mp_conv2d(..., qkv_heads=...)``), on every backend, and
  the channels_last kernels then load vectors instead of scalars (counted in the sm_90 PTX).
* The fp16 backward of tiny q/k vectors under a loss-scaled gradient stays finite.
* Sizes whose in-sample offsets need more than 32 bits are refused or computed in 64 bits.
* Normalize block choices are sized in bytes (whole sectors, 16-byte vectors, few masked lanes).

Op tests run on ``conftest.kernel_device()`` (CUDA tensors on a GPU machine, the Triton interpreter
on CPU tensors otherwise); inputs are drawn on CPU and moved there. PTX checks compile for sm_90
and need no device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mpkernels as mk
from mpkernels import reference as R
from conftest import assert_close_to_oracle, kernel_device, require_backend

pytest.importorskip("mpkernels.triton")
import mpkernels.triton  # noqa: E402,F401

require_backend("triton")  # skips on CPU without it; an error on a GPU machine
DEV = kernel_device()

import triton  # noqa: E402

from mpkernels.triton import cosine_attention as CA  # noqa: E402
from mpkernels.triton import normalize as NZ  # noqa: E402
from test_triton_ops import check_op, launches, rand  # noqa: E402,F401  (launches: every launch is declared)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def to_head_contiguous(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The same q, k, v values in head-contiguous channel order (same memory format)."""
    rows = R.head_contiguous_rows(qkv.shape[1], heads).to(qkv.device)
    fmt = torch.channels_last if not qkv.is_contiguous() else torch.contiguous_format
    return qkv.detach().index_select(1, rows).contiguous(memory_format=fmt)


# --- the layout itself ----------------------------------------------------------------------

def test_head_contiguous_rows():
    rows = R.head_contiguous_rows(12, 2)  # D = 2: head 0 rows 0..5 = q0 k0 v0 q1 k1 v1 interleaved
    assert rows.tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layouts_agree(backend):
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 32, 4, 4, dtype=torch.float64 if backend == "reference" else torch.float32).to(DEV)
    with mk.use_backend(backend, strict=backend != "reference"):
        a = mk.cosine_attention(qkv, 2)
        b = mk.cosine_attention(to_head_contiguous(qkv, 2), 2, layout="head_contiguous")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# (N, C, heads, H, W, layout): aligned channels_last (vector path), odd channels_last, NCHW.
HC_CASES = [(1, 128, 2, 8, 8, "cl"), (1, 96, 2, 7, 7, "cl"), (2, 32, 2, 4, 4, "nchw")]


# fp32 runs 16x16 tiles, slow in the interpreter: its case is the small NCHW one.
HC_PARAMS = [pytest.param(c, d, id="-".join(map(str, c)) + f"-{d}") for c in HC_CASES
             for d in (torch.float16, torch.bfloat16, torch.float32) if d != torch.float32 or c[3] * c[4] <= 16]


@pytest.mark.parametrize("case,dtype", HC_PARAMS)
def test_head_contiguous_parity(case, dtype):
    n, c, heads, h, w, kind = case
    out, _ = check_op(lambda q: mk.cosine_attention(q, heads, layout="head_contiguous"),
                      lambda d: [rand((n, 3 * c, h, w), d, kind, 2.0)], dtype)
    if kind == "cl":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("gain", ["float", "tensor"])
@pytest.mark.parametrize("kind", ["nchw", "cl"])
def test_mp_weight_qkv_heads_triton(kind, gain):
    def make(d):
        g = 1.3 if gain == "float" else torch.tensor(0.7, device=DEV, requires_grad=True)
        return [rand((3 * 8, 5, 1, 1), torch.float32, kind), g]
    check_op(lambda w, g: mk.mp_weight(w, g, qkv_heads=2), make, torch.float32)


def test_mp_weight_qkv_heads_is_a_row_permutation():
    torch.manual_seed(0)
    w = torch.randn(3 * 12, 7, 1, 1).to(DEV)
    rows = R.head_contiguous_rows(36, 3).to(DEV)
    for backend in ("reference", "triton"):
        with mk.use_backend(backend, strict=backend != "reference"):
            torch.testing.assert_close(mk.mp_weight(w, 0.9, qkv_heads=3), mk.mp_weight(w, 0.9)[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mp_conv2d_qkv_heads(dtype):
    def make(d):
        return [rand((2, 6, 3, 3), d, "cl"), rand((3 * 6, 6, 1, 1), torch.float32),
                torch.tensor(0.8, device=DEV, requires_grad=True)]
    check_op(lambda x, w, g: mk.mp_conv2d(x, w, g, qkv_heads=3), make, dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_permuted_conv_then_head_contiguous_equals_release_path(backend):
    """What the Block now computes equals the spec's path (interleaved weight rows and attention)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 4).to(DEV).contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, 16, 1, 1).to(DEV)
    with mk.use_backend(backend, strict=backend != "reference"):
        old = mk.cosine_attention(mk.mp_conv2d(x, w), 2)
        new = mk.cosine_attention(mk.mp_conv2d(x, w, qkv_heads=2), 2, layout="head_contiguous")
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)


def test_block_state_dict_unchanged_and_output_matches_release_order():
    from edm2fast import networks
    torch.manual_seed(0)
    block = networks.Block(16, 16, 8, flavor="dec", attention=True, channels_per_head=8).eval()
    with torch.no_grad():
        block.emb_gain.fill_(0.5)
    assert block.attn_qkv.weight.shape == (48, 16, 1, 1)
    sd = {k: v.clone() for k, v in block.state_dict().items()}
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    with mk.use_backend("reference"):
        y = block(x, emb)
        # The release's computation, spelled out: interleaved weight rows and attention.
        xs = mk.mp_sum(x, block.conv_res1(mk.modulated_mp_silu(block.conv_res0(mk.mp_silu(x)),
                                                               block.emb_linear(emb, gain=block.emb_gain) + 1)), 0.3)
        ya = block.attn_proj(mk.cosine_attention(block.attn_qkv(xs), block.num_heads))
        expect = mk.mp_sum_clip(xs, ya, 0.3, 256)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in sd.items())


def test_cuda_backend_serves_qkv_heads(cuda_backend):
    """The extension backend takes the option too (a gather of its effective weight), strict mode;
    its CUDA kernels on a GPU machine, its CPU twins otherwise."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 7, 3, 3).to(DEV), torch.randn(36, 7, 1, 1).to(DEV)
    outs = []
    for backend in ("cuda", "reference"):
        wb = w.clone().requires_grad_()
        with mk.use_backend(backend, strict=backend == "cuda"):
            y = mk.mp_conv2d(x, wb, 0.9, qkv_heads=3)
        y.square().sum().backward()
        outs.append((y.detach(), wb.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_validation():
    qkv = torch.randn(1, 12, 2, 2)
    with pytest.raises(ValueError, match="layout"):
        mk.cosine_attention(qkv, 2, layout="planar")
    w = torch.randn(12, 3, 1, 1)
    with pytest.raises(ValueError, match="qkv_heads"):
        mk.mp_weight(w, qkv_heads=3)  # 3 heads x 3 do not divide 12 rows
    with pytest.raises(ValueError, match="qkv_heads"):
        mk.mp_conv2d(torch.randn(1, 3, 2, 2), w, qkv_heads=0)
    with pytest.raises(ValueError, match="qkv_heads"):
        mk.mp_weight(w, qkv_heads=True)


# --- fp16 backward under loss scaling ----------------------------------------------------------

def test_fp16_backward_tiny_vectors_loss_scaled():
    """Tiny keys (rms 1e-3: inverse norms ~900) and a loss-scaled upstream gradient (x 2^6):
    ``ds * inv_k`` passed the fp16 range before the MMA that makes dq (inf, then NaN), while every
    true gradient (max ~3.6e4) is representable. Eager fp16 PyTorch itself overflows on some
    gradients of the tiny keys (its normalize backward divides by the squared norm in fp16), so
    its error is taken where it is finite."""
    heads, D, L = 1, 64, 64
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 3 * D, 8, 8, generator=g, dtype=torch.float64)
    qkv.view(1, heads, D, 3, L)[:, :, :, 1] *= 1e-3
    qkv = qkv.to(torch.float16).to(DEV)
    grad = (torch.randn(1, D, 8, 8, generator=g, dtype=torch.float64) * 2.0 ** 6).to(torch.float16).to(DEV)

    def run(dtype, backend, strict=False):
        t = qkv.to(dtype).clone().requires_grad_()
        with mk.use_backend(backend, strict=strict):
            out = mk.cosine_attention(t, heads)
        out.backward(grad.to(dtype))
        return out.detach(), t.grad

    o64, g64 = run(torch.float64, "reference")
    oe, ge = run(torch.float16, "reference")
    ot, gt = run(torch.float16, "triton", strict=True)
    assert float(g64.abs().max()) < 6e4, "the true gradient must be representable in fp16"
    assert torch.isfinite(gt).all(), f"{int((~torch.isfinite(gt)).sum())} non-finite gradient entries"
    assert_close_to_oracle(ot, o64, oe, name="output")
    ge = torch.where(torch.isfinite(ge), ge, g64.to(ge.dtype))
    assert_close_to_oracle(gt, g64, ge, name="grad")


# --- 64-bit offsets ---------------------------------------------------------------------------

def test_attention_refuses_samples_past_int32():
    heads = 16
    ok = torch.empty((2, 3 * 1024, 512, 1024), device="meta")  # 2^31 - 2^30 x 1.5: 1.6e9 per sample
    big = torch.empty((2, 3 * 1024, 1024, 1024), device="meta")  # 3.2e9 elements per sample
    assert CA.supports(ok, heads) and CA.supports(ok, heads, "head_contiguous")
    assert not CA.supports(big, heads) and not CA.supports(big, heads, "head_contiguous")


def test_normalize_refuses_slices_past_int32():
    """Offsets within one [R, inner] slice are 32-bit: a slice of 2^31 elements or more (NCHW, 2^15
    channels of 2^16 pixels) falls back; the same tensor channels_last (slices of C) and many small
    slices are fine."""
    big_nchw = torch.empty((1, 1 << 15, 256, 256), device="meta", dtype=torch.bfloat16)
    big_cl = big_nchw.contiguous(memory_format=torch.channels_last)
    many = torch.empty((1 << 12, 1 << 10, 32, 32), device="meta", dtype=torch.bfloat16)  # 2^32 in all, 2^20 a slice
    assert not NZ.supports(big_nchw, 1e-4) and not NZ.supports(big_nchw, (1,), 1e-4)
    assert not NZ.supports(big_nchw, None, 1e-4)  # normalize over everything but the batch
    assert NZ.supports(big_cl, 1e-4) and NZ.supports(many, 1e-4) and NZ.supports(many, None, 1e-4)
    assert NZ.supports(torch.empty((2, 3, 4, 4)), 1e-4)


# --- PTX: vector loads for head-contiguous channels_last ------------------------------------------

_PTX_SCRIPT = r"""
import json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import triton
from triton.backends.compiler import GPUTarget
import triton_aot as A
A._skip_triton_ptxas()
import torch
from mpkernels.triton import cosine_attention as CA
out = {}
for name, make in (("norms", lambda hc: CA._norms_config(torch.bfloat16, True, hc, 64)),
                   ("fwd", lambda hc: CA._fwd_config(torch.bfloat16, True, hc, 64, True)),
                   ("dkdv", lambda hc: CA._dkdv_config(torch.bfloat16, True, hc, 64, True)),
                   ("dq", lambda hc: CA._dq_config(torch.bfloat16, True, hc, 64, True))):
    for hc in (False, True):
        cfg = make(hc)
        src = triton.compiler.ASTSource(fn=cfg.kernel, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs),
                                        attrs=A._attrs_for(cfg.signature))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg))
        lds = re.findall(r"ld\.global(?:\.\w+)*", k.asm["ptx"])
        vec = sum(1 for l in lds if ".v2" in l or ".v4" in l)
        out[f"{name}-{'hc' if hc else 'interleaved'}"] = dict(
            vector=vec, scalar=len(lds) - vec, scalar16=sum(1 for l in lds if l.endswith(".b16")),
            async16=len(re.findall(r"cp\.async\.cg\.shared\.global", k.asm["ptx"])))
print(json.dumps(out))
"""


def _ptxas_available() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.slow  # ~15 s: eight attention kernels compiled for sm_90
@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend is not installed")
def test_channels_last_head_contiguous_loads_vectors():
    """bf16, D = 64, aligned sizes, sm_90. Measured (Triton 3.8), ld.global vector/scalar, interleaved ->
    head-contiguous: norms 0/48 -> 6/0, fwd 0/98 -> 4/2, dkdv 0/34 -> 8/8, dq 4/72 -> 8/8 (the scalars
    left are fp32 per-token statistics; k/v tiles also move by 16-byte cp.async); 16-bit scalar loads
    go from 24-96 per kernel to 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, ROOT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    print(counts)
    for name in ("norms", "fwd", "dkdv", "dq"):
        old, new = counts[f"{name}-interleaved"], counts[f"{name}-hc"]
        assert old["scalar16"] >= 16, (name, counts)  # stride-3 channels: one 16-bit element per load
        assert new["scalar16"] == 0 and new["vector"] >= 2, (name, counts)
        assert new["scalar"] * 4 <= old["scalar"], (name, counts)


# --- normalize tiling ---------------------------------------------------------------------------

EDM2_CHANNELS = [64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 768, 896, 960, 1024]


@pytest.mark.parametrize("elsize", [4, 2], ids=["fp32", "16-bit"])
@pytest.mark.parametrize("r_contig", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "bwd"])
def test_normalize_blocks_in_bytes(elsize, r_contig, bwd):
    for C in EDM2_CHANNELS:
        one_pass, br, br2, bi, warps = NZ._blocks(C, r_contig, bwd, elsize)
        threads = 32 * warps
        if one_pass:
            assert C / (br + br2) >= 0.85, (C, br, br2)  # lanes doing work (576 = 512 + 64: all of them)
            tile = (br + br2) * bi
        else:
            tile = br * bi
        assert tile * elsize >= 16 * threads, (C, br, br2, bi, warps)  # a 16-byte vector per thread at least
        if not r_contig:  # each tile row: whole 32-byte sectors of contiguous pixels
            assert (bi * elsize) % 32 == 0, (C, bi)
    if r_contig:  # a few long rows (weights, per-sample normalize) still spread: one row per program
        assert NZ._blocks(5000, True, bwd, elsize)[3] == 1


def test_normalize_block_choices_are_declared():
    declared = set(mk.triton.all_configs())
    for d in (torch.float32, torch.bfloat16):
        for r_contig in (False, True):
            for length in list(range(1, 2100, 7)) + [4096, 100_000]:
                blk = NZ._blocks(length, r_contig, False, NZ.elsize(d))
                assert NZ._fwd_config(r_contig, False, False, False, *blk, d, d) in declared, (length, blk)
                blk = NZ._blocks(length, r_contig, True, NZ.elsize(d))
                assert NZ._bwd_config(r_contig, True, False, False, *blk, d, d) in declared, (length, blk)


@pytest.mark.parametrize("shape,kind,dtype", [((2, 576, 2, 2), "cl", torch.bfloat16),
                                              ((1, 320, 4, 4), "nchw", torch.float16),
                                              ((1, 2100, 1, 3), "nchw", torch.float32)],
                         ids=["576-cl-bf16", "320-nchw-fp16", "2100-two-pass"])
def test_pixel_norm_chunked_rows(shape, kind, dtype):
    check_op(mk.pixel_norm_mp_silu, lambda d: [rand(shape, d, kind, 2.0)], dtype)


@pytest.mark.slow  # torch.compile tracing: ~10-20 s
def test_compiled_head_contiguous_path():
    """``torch.compile(fullgraph=True)`` traces the permuted qkv conv and the head-contiguous attention."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(1, 16, 4, 4).to(DEV).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(48, 16, 1, 1).to(DEV).requires_grad_()

    def attn(x, w):
        return mk.cosine_attention(mk.mp_conv2d(x, w, qkv_heads=2), 2, layout="head_contiguous")

    with mk.use_backend("triton", strict=True):
        out = torch.compile(attn, fullgraph=True, backend="aot_eager")(x, w)
        out.square().sum().backward()
        gx, gw = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        ref = attn(x, w)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
