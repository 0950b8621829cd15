"""The JIT specialisations real EDM2 launches produce, recorded without a GPU.

Triton compiles one binary per *specialisation* of a launch: every integer argument equal to 1
becomes a constant, integers divisible by 16 and 16-byte-aligned pointers get a divisibility
fact (wider vector loads), and integers of 2^31 and more become 64-bit. Which of these a launch
gets depends on the shapes, so the ahead-of-time check (``triton_aot.py --specs``) compiles the
ones real networks produce instead of assuming every integer divisible by 16.

How they are found: every distinct ``mk.*`` call an EDM2 network makes is recorded on the meta
device (``benchmarks.cases.network_specs``: real shapes, no memory), then each call is run
forward and backward on the Triton backend with CPU tensors of those shapes (``torch.empty``:
pages never touched) while ``_common.launch`` is replaced by a recorder that notes, per
argument, the facts Triton specialises on and launches nothing. Convolutions and matmuls, the
only other heavy work, are replaced by shape-only stand-ins. Pointer alignment on CPU is what
it is on the GPU: both allocators align blocks to at least 64 bytes, so only views (a slice of
qkv, a half of a concatenation) are unaligned, at the same byte offsets.

The multi-tensor ``mp_weights`` kernels are recorded from one call over all of a network's
MPConv weights (their learned-gain and qkv ones included), forward and backward.

Networks: EDM2-S at 64x64 latents (9 and 12 heads), XS (6 and 8 heads) and XXL (21 and 28
heads), batch 32 and 1, plus a small network reaching 1x1 resolution with attention there.
Run with ``TRITON_INTERPRET=1`` (the backend must accept CPU tensors); prints JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NETWORKS = {  # name -> (preset or None, Precond overrides)
    "edm2-img512-s": ("edm2-img512-s", {}),
    "edm2-img512-xs": ("edm2-img512-xs", {}),
    "edm2-img512-xxl": ("edm2-img512-xxl", {}),
    "tiny-1x1": (None, dict(img_resolution=8, img_channels=4, label_dim=10, model_channels=64,
                             channel_mult=[1, 2, 2, 2], num_blocks=1, attn_resolutions=[2, 1], channels_per_head=64)),
}
BATCHES = (32, 1)
# fp16 launches specialise exactly as bf16 ones (same element size, same launchers).
DTYPES = ("bfloat16", "float32")


def arg_facts(value) -> list:
    """What Triton specialises on for one launch argument (as its JIT does):

    ``["ptr", aligned16]``; ``["int", kind]`` with kind ``"one"`` (becomes a constant),
    ``"16"`` (divisible by 16), ``""`` (neither), prefixed ``"i64:"`` at 2^31 and beyond;
    ``["other"]`` for floats and flags."""
    import torch
    if isinstance(value, torch.Tensor):
        return ["ptr", value.data_ptr() % 16 == 0]
    if isinstance(value, bool) or not isinstance(value, int):
        return ["other"]
    if value == 1:
        return ["int", "one"]
    wide = "i64:" if not -2**31 <= value < 2**31 else ""
    return ["int", wide + ("16" if value % 16 == 0 else "")]


@contextlib.contextmanager
def _shape_only_matmuls():
    """``F.conv2d`` / ``F.linear`` that only produce outputs (and gradients) of the right shape."""
    import torch
    import torch.nn.functional as F

    class Conv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b=None, stride=1, padding=0, *rest):
            ctx.shapes = (x, w)
            n, _, h, wd = x.shape
            pad = padding if isinstance(padding, int) else padding[0]
            k = w.shape[-1]
            cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            shape = (n, w.shape[0], h + 2 * pad - k + 1, wd + 2 * pad - k + 1)  # stride 1: all EDM2 has
            return torch.empty(shape, dtype=x.dtype, device=x.device,
                               memory_format=torch.channels_last if cl else torch.contiguous_format)

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.shapes
            return (torch.empty_like(x), torch.empty_like(w)) + (None,) * 5

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b=None):
            ctx.shapes = (x, w)
            return x.new_empty((*x.shape[:-1], w.shape[0]))

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.shapes
            return torch.empty_like(x), torch.empty_like(w), None

    real = F.conv2d, F.linear
    F.conv2d = lambda x, w, b=None, stride=1, padding=0, *rest: Conv.apply(x, w, b, stride, padding)
    F.linear = lambda x, w, b=None: Linear.apply(x, w, b)
    try:
        yield
    finally:
        F.conv2d, F.linear = real


def _tensor(spec_arg, dtype, channels_last):
    import torch
    shape, role = spec_arg[1], spec_arg[2]
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype if role == "act" else torch.float32, memory_format=fmt)


def record(networks=NETWORKS, batches=BATCHES, dtypes=DTYPES) -> list[dict]:
    """Distinct (configuration, argument facts) pairs of every launch, with the first launch that
    produced each (``origin``) and every network that did (``networks``)."""
    import torch

    import mpkernels as mk
    from benchmarks import cases as C
    from edm2fast import presets
    from mpkernels.triton import _common

    seen: dict = {}
    current = {}

    def recorder(cfg, grid, *args, **kwargs):
        names = _common.kernel_arg_names(cfg.kernel)
        facts = {n: arg_facts(a) for n, a in zip(names, args)}
        facts.update({n: arg_facts(a) for n, a in kwargs.items()})
        key = (cfg.name, json.dumps(facts, sort_keys=True))
        if key not in seen:  # the first launch with these facts is kept as the example
            example = {n: a for n, a in zip(names, args) if isinstance(a, int) and not isinstance(a, bool)}
            seen[key] = dict(config=cfg.name, args=facts, origin=dict(current, ints=example), networks=[])
        if current["network"] not in seen[key]["networks"]:
            seen[key]["networks"].append(current["network"])

    calls = {}  # recorded on the meta device first, with the real F.conv2d
    weight_args = {}
    for net_name, (preset, overrides) in networks.items():
        kw = presets.network_kwargs(preset, **overrides) if preset else overrides
        weight_args[net_name] = _mp_weights_args(kw)
        for batch in batches:
            calls[net_name, batch] = C.network_specs(kw, batch)
    real_launch = _common.launch
    _common.launch = recorder
    try:
        with _shape_only_matmuls(), mk.use_backend("triton", strict=False):
            for (net_name, batch), specs in calls.items():
                for dtype_name in dtypes:
                    for spec in specs:
                        if spec.op == "mp_weights":  # list arguments: recorded by _run_mp_weights below
                            continue
                        for cl in (False, True):
                            current.update(network=net_name, batch=batch, dtype=dtype_name, op=spec.op,
                                           channels_last=cl)
                            _run(spec, getattr(torch, dtype_name), cl)
                    if batch == batches[0]:  # the weights do not depend on the batch
                        current.update(network=net_name, batch=batch, dtype=dtype_name, op="mp_weights",
                                       channels_last=False)
                        _run_mp_weights(weight_args[net_name], getattr(torch, dtype_name))
    finally:
        _common.launch = real_launch
    return list(seen.values())


def _run(spec, dtype, channels_last) -> None:
    import torch

    import mpkernels as mk
    args = []
    for a in spec.args:
        if isinstance(a, tuple) and a and a[0] == "T":
            grad = spec.op not in ("force_normalize_", "ema_lerp_")
            args.append(_tensor(a, dtype, channels_last).requires_grad_(grad))
        elif isinstance(a, tuple) and a and a[0] == "L":
            args.append([torch.empty(s, dtype=torch.float32) for s in a[1]])
        else:
            args.append(a)
    out = getattr(mk, spec.op)(*args, **dict(getattr(spec, "kwargs", ())))  # e.g. the attention's qkv layout
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(o, torch.Tensor) and o.requires_grad]
    if outs:
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def _mp_weights_args(net_kwargs: dict):
    """(weight shapes, tensor-gain flags, qkv heads) of every MPConv weight of the network."""
    import torch

    from edm2fast.networks import Precond
    with torch.device("meta"):
        net = Precond(**{**net_kwargs, "dtype": "fp16"})
    shapes, tensor_gain, heads = [], [], []
    for name, p in net.named_parameters():
        if p.ndim < 2:
            continue
        shapes.append(tuple(p.shape))
        tensor_gain.append(name.endswith("emb_linear.weight"))  # scaled by the learned emb_gain
        heads.append(net.get_submodule(name.rsplit(".", 2)[0]).num_heads if name.endswith("attn_qkv.weight") else None)
    return shapes, tensor_gain, heads


def _run_mp_weights(args, dtype) -> None:
    """Every effective weight of the network in one ``mk.mp_weights`` call (the multi-tensor
    kernels), forward and backward, output dtype ``dtype``."""
    import torch

    import mpkernels as mk
    shapes, tensor_gain, heads = args
    ws = [torch.empty(s, dtype=torch.float32).requires_grad_(True) for s in shapes]
    gains = [torch.empty((), dtype=torch.float32).requires_grad_(True) if t else 1.0 for t in tensor_gain]
    outs = mk.mp_weights(ws, gains, qkv_heads=heads, dtypes=dtype)
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("set TRITON_INTERPRET=1 to record (CPU tensors)", file=sys.stderr)
        return 2
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    import torch
    torch.set_num_threads(1)
    rows = record()
    json.dump(rows, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
