"""The CUDA extension's ``ema_lerp_`` with the EMA weight as a 0-d fp32 tensor (issue 9).

A CUDA graph replays its launches with the arguments they were captured with, so a weight passed
by value would keep the first step's beta. The extension therefore takes ``weight_t``: the C++
twin reads a CPU tensor on the host, the CUDA kernel reads a CUDA tensor through its pointer (no
synchronization, no range check). On CPU: tensor and float weights give bit-identical results,
bad weight tensors are rejected naming ``weight``, and the compiled kernel loads the weight from
global memory. On a GPU also: a captured graph picks up a new weight at each replay.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

import mpkernels as mk
from mpkernels import reference as R
from mpkernels.cuda import _build, _ops

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="CUDA kernels: no GPU here"))]
WEIGHTS = [0.0, 0.0123, 0.3, 0.5, 0.77, 0.999, 1.0]


@pytest.fixture(scope="module")
def ext(cuda_backend):
    return cuda_backend._EXT


def _lists(dtypes, device, seed=0):
    """EMA and source lists over odd sizes (tails past the vector path), dtypes cycling apart."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (7, 20), (9000,), (1,), (3, 1200)]
    ts = [torch.randn(s, generator=g).to(dtypes[i % len(dtypes)]).to(device) for i, s in enumerate(shapes)]
    es = [torch.randn(s, generator=g).to(dtypes[(i + 1) % len(dtypes)]).to(device) for i, s in enumerate(shapes)]
    return es, ts


def _assert_same(a_list, b_list, what):
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        assert a.dtype == b.dtype
        if not torch.equal(a, b):
            d = (a.double() - b.double()).abs()
            raise AssertionError(f"{what}, tensor {i}: max diff {d.max().item()} at {d.argmax().item()}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16,),
                                    (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["fp32", "fp16", "bf16", "mixed"])
def test_tensor_weight_matches_float_weight(ext, device, dtypes):
    """Through the extension itself and through mk.ema_lerp_ (which also casts fp64/bf16 weights)."""
    es, ts = _lists(dtypes, device)
    for w in WEIGHTS:
        for wdtype in (torch.float32, torch.float64, torch.bfloat16):
            wt = torch.tensor(w, dtype=wdtype, device=device)
            wf = float(wt)  # the value the tensor holds (bf16 rounds 0.0123)
            by_float = [e.clone() for e in es]
            by_tensor = [e.clone() for e in es]
            by_ext = [e.clone() for e in es]
            with mk.use_backend("cuda", strict=True):
                mk.ema_lerp_(by_float, ts, wf)
                mk.ema_lerp_(by_tensor, ts, wt)
            if wdtype == torch.float32:
                ext.ema_lerp_(by_ext, ts, 0.25, wt)  # weight_t wins over the number
                _assert_same(by_float, by_ext, f"{device} ext, weight {w}")
            _assert_same(by_float, by_tensor, f"{device}, weight {w} as {wdtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_new_weight_value_is_read_at_each_call(ext, device):
    """The same tensor, refilled between calls (what a trainer does between graph replays)."""
    e, t = torch.zeros(100, device=device), torch.ones(100, device=device)
    w = torch.tensor(0.25, device=device)
    ext.ema_lerp_([e], [t], 0.0, w)
    w.fill_(0.5)
    ext.ema_lerp_([e], [t], 0.0, w)
    torch.testing.assert_close(e, torch.full((100,), 0.625, device=device), rtol=0, atol=0)


def test_op_passes_the_weight_tensor_to_the_extension(ext, monkeypatch):
    """The custom op hands the extension an fp32 0-d tensor (the kernel reads it on a GPU), not
    a Python float (which a captured launch would keep) and not the reference formula."""
    calls = []

    class Recording:
        def __getattr__(self, name):
            return getattr(ext, name)

        def ema_lerp_(self, *args):
            calls.append(args)
            return ext.ema_lerp_(*args)

    monkeypatch.setattr(_ops, "_EXT", Recording())
    monkeypatch.setattr(R, "ema_lerp_", lambda *a: pytest.fail("reference formula used"))
    e, t = torch.zeros(10), torch.ones(10)
    with mk.use_backend("cuda", strict=True):
        mk.ema_lerp_([e], [t], torch.tensor(0.5, dtype=torch.float64))
        mk.ema_lerp_([e], [t], 0.5)
    assert len(calls) == 2
    weight_t = calls[0][3]
    assert isinstance(weight_t, torch.Tensor) and weight_t.dtype == torch.float32 and weight_t.dim() == 0
    assert len(calls[1]) == 3 and calls[1][2] == 0.5  # the float path is unchanged
    torch.testing.assert_close(e, torch.full((10,), 0.75), rtol=0, atol=0)


@pytest.mark.parametrize("weight, error, text", [
    (torch.tensor([0.5]), ValueError, "weight: a tensor weight must be 0-d"),
    (torch.tensor(0.5).reshape(1, 1), ValueError, "weight: a tensor weight must be 0-d"),
    (torch.tensor(1, dtype=torch.int64), TypeError, "weight: unsupported dtype"),
    (torch.tensor(0.5, dtype=torch.float16), TypeError, "weight: a tensor weight must be float32"),
    (torch.tensor(0.5, dtype=torch.float64), TypeError, "weight: unsupported dtype"),
    (torch.empty((), device="meta"), ValueError, "weight: tensors on meta are not supported"),
    (torch.tensor(1.5), ValueError, "weight: must be in [0, 1]"),
    (torch.tensor(float("nan")), ValueError, "weight: must be in [0, 1]"),
])
def test_bad_weight_tensor_names_weight(ext, weight, error, text):
    e = torch.zeros(3)
    with pytest.raises(error, match=re.escape(text)):
        ext.ema_lerp_([e], [torch.ones(3)], 0.5, weight)
    assert torch.equal(e, torch.zeros(3))
    with pytest.raises(error, match=re.escape(text)):  # checked even with nothing to update
        ext.ema_lerp_([], [], 0.5, weight)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU for a tensor on another device")
def test_weight_on_another_device_names_weight(ext):
    e = torch.zeros(3, device="cuda")
    with pytest.raises(ValueError, match=re.escape("weight: on cuda:0 but ema_tensors[0] is on cpu")):
        ext.ema_lerp_([e.cpu()], [torch.ones(3)], 0.5, torch.tensor(0.5, device="cuda"))
    with pytest.raises(ValueError, match=re.escape("weight: on cpu but ema_tensors[0] is on cuda:0")):
        ext.ema_lerp_([e], [torch.ones(3, device="cuda")], 0.5, torch.tensor(0.5))


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs: no GPU here")
def test_cuda_graph_replay_reads_the_current_weight(ext):
    """Capture once, then change the weight tensor between replays: each replay uses the new value
    (bit-identical to eager calls with the number)."""
    es, ts = _lists((torch.float32, torch.bfloat16, torch.float16), "cuda", seed=3)
    expected = [e.clone() for e in es]
    w = torch.tensor(0.1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), mk.use_backend("cuda", strict=True):
        mk.ema_lerp_(es, ts, w)  # warm-up outside the capture
        mk.ema_lerp_(expected, ts, 0.1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), mk.use_backend("cuda", strict=True):
        mk.ema_lerp_(es, ts, w)
    for beta in (0.3, 0.0123, 0.9):
        w.fill_(beta)
        graph.replay()
        with mk.use_backend("cuda", strict=True):
            mk.ema_lerp_(expected, ts, beta)
    torch.cuda.synchronize()
    _assert_same(expected, es, "graph replay")


@pytest.mark.slow
def test_ema_kernel_loads_weight_from_global_memory(tmp_path):
    """weights.cu compiled alone (nvcc -ptx, sm_90, the extension's flags): ema_lerp_kernel takes a
    third parameter, the weight pointer, and loads an f32 through it from global memory."""
    home = _build.find_cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if not nvcc or not os.path.isfile(nvcc):
        pytest.skip("nvcc (the CUDA toolkit) is not here: cannot compile csrc/weights.cu")
    ptx_path = tmp_path / "weights.ptx"
    cmd = [nvcc, *_build.NVCC_FLAGS, "-std=c++17", "-I", _build.CSRC, "-ptx", "-arch=sm_90", "-o", str(ptx_path),
           os.path.join(_build.CSRC, "weights.cu")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"nvcc -ptx weights.cu failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    ptx = ptx_path.read_text()
    m = re.search(r"\.entry\s+(\S*ema_lerp_kernel\S*)\s*\(", ptx)
    assert m, "no ema_lerp_kernel in the PTX"
    body = ptx[m.end():ptx.find("\n}", m.end())]
    names = re.findall(r"(\w+_param_\d+)", body[:body.index(")")])
    assert len(names) == 3, f"expected (batch, weight, weight_ptr), got {names}"
    ptr_param = names[2]
    loaded = re.search(rf"ld\.param\.u64\s+(%rd\d+),\s*\[{re.escape(ptr_param)}\]", body)
    assert loaded, f"{ptr_param} (the weight pointer) is never read"
    # the pointer is converted to a global address and an f32 is loaded through it
    assert re.search(r"ld\.global(?:\.nc)?\.f32\s+%f\d+,\s*\[%rd\d+\]", body), \
        "ema_lerp_kernel does not load an f32 weight from global memory"
