"""GPU validation: parity of every op and backend at the real EDM2-S shapes, and a fused training step.

Skipped (with the reason) on machines without a CUDA GPU. ``benchmarks/gpu_check.sh`` runs these.
"""

from __future__ import annotations

import os

import pytest
import torch

import mpkernels as mk
from benchmarks import cases as C
from benchmarks import ops as O

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _real_cases():
    from edm2fast import presets
    specs = C.network_specs(presets.network_kwargs("edm2-img512-s"), 32)
    return [C.case_from_spec(s) for s in C.select(specs, None, 0)]


@pytest.fixture(scope="module")
def real_cases():
    return _real_cases()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_parity_at_edm2_s_shapes(real_cases, dtype):
    backends = mk.available_backends()
    failures = []
    for case in real_cases:
        for row in O.parity(case, backends, dtype, torch.device("cuda")):
            if row["status"] != "ok":
                failures.append(row)
    assert not failures, "\n".join(str(r) for r in failures[:20])


@pytest.mark.parametrize("backend", [b for b in mk.registered_backends() if b != "reference"])
def test_fused_training_step_matches_reference(backend):
    if backend not in mk.available_backends():
        why = f"backend {backend!r} not available: {mk._backends.load_errors()}"
        if backend == "cuda" and os.environ.get("MPKERNELS_REQUIRE_EXT", "0") in ("", "0"):
            pytest.skip(why + " (set MPKERNELS_REQUIRE_EXT=1 to make this a failure)")
        pytest.fail(why)  # a GPU machine always has Triton; gpu_check.sh requires the extension
    from edm2fast.networks import Precond
    torch.manual_seed(0)
    kw = dict(img_resolution=32, img_channels=4, label_dim=10, model_channels=64, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[16], dtype="fp32")
    net = Precond(**kw).cuda()
    for p in net.parameters():
        if p.ndim == 0:
            p.data.fill_(0.5)
    x = torch.randn(4, 4, 32, 32, device="cuda")
    sigma = torch.rand(4, device="cuda") + 0.2
    labels = torch.eye(10, device="cuda")[:4]
    grads = {}
    for b in ("reference", backend):
        net.zero_grad()
        with mk.use_backend(b, strict=False):
            D, lv = net(x, sigma, labels, return_logvar=True)
            (D.square().mean() + lv.mean()).backward()
        grads[b] = (D.detach(), [p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(grads[backend][0], grads["reference"][0], rtol=1e-3, atol=1e-4)
    for a, r in zip(grads[backend][1], grads["reference"][1]):
        torch.testing.assert_close(a, r, rtol=2e-3, atol=1e-4)
