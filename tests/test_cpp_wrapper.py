"""``torch.compile`` with Inductor's C++ wrapper (``torch._inductor.config.cpp_wrapper``).

That wrapper cannot call a Python custom op whose result is a list of tensors, which is what the
fused backends' ``mp_weights`` op returns. While it is on, ``mp_weights`` reports itself
unsupported at trace time (:func:`mpkernels._library.list_results_unsupported`) and the network's
effective weights come from the reference's aten ops, which Inductor compiles itself; every other
fused op stays fused. The EDM2 network then compiles with ``fullgraph=True`` and matches eager.
Runs on the CPU with the extension's C++ twins (the ``cuda`` backend).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.config as inductor_config

import mpkernels as mk
from conftest import require_backend
from mpkernels import _library

require_backend("cuda")

from edm2fast import networks  # noqa: E402


def test_list_results_unsupported_only_while_tracing_with_the_cpp_wrapper():
    seen = []

    def f(x):
        seen.append(_library.list_results_unsupported())
        return x + 1

    assert not _library.list_results_unsupported()
    torch._dynamo.reset()
    torch.compile(f, backend="eager", fullgraph=True)(torch.ones(2))
    with inductor_config.patch(cpp_wrapper=True):
        assert not _library.list_results_unsupported()  # eager: nothing to refuse
        torch._dynamo.reset()
        torch.compile(f, backend="eager", fullgraph=True)(torch.ones(2))
    torch._dynamo.reset()
    assert seen == [False, True]


def _net():
    torch.manual_seed(0)
    net = networks.Precond(img_resolution=8, img_channels=3, label_dim=4, use_fp16=False, model_channels=16,
                           channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)  # non-zero learned gains: every branch contributes
    net.train()
    networks.set_forced_weight_norm(net, False)
    return net


def _step(net, model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.3, 2.5])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 3]), 4).float()
    gd = torch.randn(2, 3, 8, 8, generator=g)
    net.zero_grad(set_to_none=True)
    D, logvar = model(x, sigma, labels, return_logvar=True)
    ((D * gd).sum() + logvar.sum()).backward()
    return D.detach(), {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def _step_fp64(net):
    """The oracle: the reference backend with the U-Net in float64 (inputs, sigma and the noise
    embedding stay float32 as ``Precond`` makes them: rounding near 1e-7, far below the bounds)."""
    ref = copy.deepcopy(net).double()
    orig = networks.Precond.compute_dtype
    networks.Precond.compute_dtype = lambda self, device, force_fp32=False: torch.float64
    try:
        with mk.use_backend("reference"):
            return _step(ref, ref)
    finally:
        networks.Precond.compute_dtype = orig


def test_network_compiles_with_the_cpp_wrapper_and_matches_eager():
    net = _net()
    twin, ref32, ref32c = (copy.deepcopy(net) for _ in range(3))
    with mk.use_backend("cuda"):
        D_eager, g_eager = _step(net, net)
        torch._dynamo.reset()
        try:
            with inductor_config.patch(cpp_wrapper=True):
                D, g = _step(twin, torch.compile(twin, fullgraph=True))
        finally:
            torch._dynamo.reset()
    # PyTorch's own float32 error on the same step, eager and under torch.compile (default wrapper).
    with mk.use_backend("reference"):
        _, g_ref = _step(ref32, ref32)
        try:
            _, g_refc = _step(ref32c, torch.compile(ref32c, fullgraph=True))
        finally:
            torch._dynamo.reset()
    _, g64 = _step_fp64(net)
    torch.testing.assert_close(D, D_eager, rtol=1e-4, atol=1e-5)
    assert g.keys() == g_eager.keys() == g64.keys()
    # Each gradient within twice the largest float32 error of eager (fused and reference) and of the
    # compiled reference, against the float64 oracle. A 0-d gain's gradient is one reduction over its
    # weight with heavy cancellation, and Inductor's reduction order differs by host (vector width):
    # on an AVX2 host the compiled *reference* network's error there was 1.5e-05 of the gradient
    # against 1.1e-06 eagerly, so a fixed bound against eager fails for reasons outside this package.
    for name in g:
        want = g64[name]
        scale = float(want.abs().max()) + 1e-30

        def err(got):
            return float((got.double() - want).abs().max()) / scale

        bound = 2 * max(err(g_eager[name]), err(g_ref[name]), err(g_refc[name])) + 2e-6
        assert err(g[name]) <= bound, (name, err(g[name]), bound)
