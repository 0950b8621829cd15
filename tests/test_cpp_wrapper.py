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


def test_network_compiles_with_the_cpp_wrapper_and_matches_eager():
    net = _net()
    twin = copy.deepcopy(net)
    with mk.use_backend("cuda"):
        D_eager, g_eager = _step(net, net)
        torch._dynamo.reset()
        try:
            with inductor_config.patch(cpp_wrapper=True):
                D, g = _step(twin, torch.compile(twin, fullgraph=True))
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(D, D_eager, rtol=1e-4, atol=1e-5)
    assert g.keys() == g_eager.keys()
    for name in g:
        scale = float(g_eager[name].abs().max()) + 1e-12
        torch.testing.assert_close(g[name] / scale, g_eager[name] / scale, rtol=0, atol=2e-5, msg=name)
