"""Model level: a whole training step and the sampler, per backend, plus launch/traffic accounting.

Training step = forced weight normalization, forward, backward, force-finite
gradients, Adam (betas 0.9, 0.99), power-function EMA update. Variants:

* ``reference``: the reference ops written the way the authors' release runs them
  (forced weight normalization inside every MPConv forward, eager).
* ``reference+compile``: the reference network under ``torch.compile``, with one
  multi-tensor ``force_normalize_`` call per step (the compile-friendly way, spec §1).
* each fused backend, eager, forced weight normalization folded into the U-Net's one
  ``mp_weights`` call (``networks.fold_forced_norm``, as the trainer's eager step); under
  ``+compile`` with the multi-tensor ``force_normalize_`` call.
* ``<backend>+step``: the whole step (forced weight normalization, forward, backward, clean-up,
  Adam, EMA) as one ``torch.compile(fullgraph=True)`` region, the trainer's ``--step-mode compile``
  (:class:`edm2fast.graphs.CompiledStep`, run on the benchmark's fixed batch).

Accounting (needs no GPU): the step's forward and backward are traced on the meta
device under a ``TorchDispatchMode`` that counts every non-view op (about one kernel
launch each) and the bytes of its declared inputs and outputs. Fused backends are
traced with :func:`mpkernels._dispatch.simulate`, so their custom ops count as the
single launches they are on a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import mpkernels as mk
from mpkernels import _dispatch

from .measure import PeakMemory, timeit

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _build(net_kwargs: dict, dtype: torch.dtype, device, seed: int = 0):
    from edm2fast.networks import Precond
    torch.manual_seed(seed)
    with torch.device(device):
        net = Precond(**{**net_kwargs, "dtype": _DT[dtype]})
    return net


def _batch(net, batch: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=g).to(device)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim)[torch.randint(0, net.label_dim, (batch,), generator=g)].to(device)
    return x, labels


def forward_flops(net_kwargs: dict) -> float:
    """Forward FLOPs per image (2 per multiply-add), counted on the meta device."""
    net = _build(net_kwargs, torch.float32, "meta").eval()
    x = torch.empty(1, net.img_channels, net.img_resolution, net.img_resolution, device="meta")
    labels = torch.empty(1, net.label_dim, device="meta") if net.label_dim else None
    with FlopCounterMode(display=False) as fc, torch.no_grad(), mk.use_backend("reference"):
        net(x, torch.ones(1, device="meta"), labels)
    return float(fc.get_total_flops())


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.by_op: dict[str, int] = {}
        self.bytes_by_op: dict[str, int] = {}
        self.inplace_write_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False) or func.overloadpacket in _FREE or not _has_tensor(out):
            return out
        name = str(func.overloadpacket).replace("<OpOverloadPacket(op='", "").rstrip("')>")
        launches = _launches(name, args)
        self.ops += launches
        self.by_op[name] = self.by_op.get(name, 0) + launches
        moved = _nbytes(args) + _nbytes(kwargs or {}) + _nbytes(out)
        self.bytes_by_op[name] = self.bytes_by_op.get(name, 0) + moved
        self.bytes += moved
        # An argument the op writes in place is counted once above (as read); its write, too:
        self.inplace_write_bytes += sum(_nbytes(a) for a, spec in zip(args, func._schema.arguments)
                                        if spec.alias_info is not None and spec.alias_info.is_write)
        return out


def _launches(name: str, args) -> int:
    """Kernel launches of one op: 1, except the extension's ``mp_weights``, whose launches carry
    their weight table in the kernel parameters (4 KB) and so take a chunk of weights each."""
    if name in ("mpkernels.cuda_mp_weights", "mpkernels.cuda_mp_weights_backward"):
        from mpkernels import cuda as mkc
        chunk_of = getattr(mkc._EXT, "_mp_weights_chunk", None)
        if chunk_of is not None:
            weights = args[0] if name.endswith("weights") else args[1]
            chunk = chunk_of(not name.endswith("backward"))
            return max(1, -(-len(weights) // chunk))
    return 1


# Ops that move no data and launch nothing (allocation, metadata).
_FREE = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like, torch.ops.aten.detach,
         torch.ops.aten.lift_fresh}


def _has_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    return isinstance(obj, (list, tuple)) and any(_has_tensor(o) for o in obj) or obj is None


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


# The whole-step accounting the issue tracks: the EDM2-S training step, batch 32, bf16 (meta device,
# so it runs anywhere in a few seconds), and its targets (issue 10). The reference is for context.
ACCOUNTING_PRESET = "edm2-img512-s"
ACCOUNTING_BATCH = 32
ACCOUNTING_DTYPE = torch.bfloat16
ACCOUNTING_TARGETS = {"triton": {"ops": 650, "GiB": 38.0}, "cuda": {"ops": 800}}

# Library kernels (cuDNN / cuBLAS GEMMs, PyTorch's fused attention): a launch each by nature, not
# candidates for a fused elementwise kernel.
_LIBRARY = {"aten.convolution", "aten.convolution_backward", "aten.mm", "aten.addmm", "aten.bmm",
            *(f"aten._scaled_dot_product_{kind}_attention{bwd}" for kind in ("flash", "efficient", "cudnn")
              for bwd in ("", "_backward"))}


def account_step(net_kwargs: dict, batch: int, dtype: torch.dtype, backend: str) -> dict:
    """Ops (~launches) and bytes of one training step's forward+backward, weight norm and EMA, on meta
    (the issue's definition; the gradient clean-up, one ``force_finite_`` launch with a fused
    backend, one per parameter with the reference, is not counted).

    Returns totals, ``by_op`` (count per op, most first), ``GiB_by_op``, and ``unfused``: the ops
    that are neither an mpkernels kernel nor a library kernel (GEMM, fused attention), ``{op: [count,
    GiB]}`` by count (what to fuse next), with ``library`` the launch count of those library kernels.

    ``GiB`` counts every tensor an op takes or returns once: an argument updated in place
    (``force_normalize_``, ``ema_lerp_``, the weights ``mp_weights_forced`` normalizes) counts as
    read, not also as written; the issue's targets use this count. ``GiB_with_inplace_writes``
    adds those writes.
    """
    from edm2fast.loss import EDM2Loss
    from edm2fast.networks import fold_forced_norm, set_forced_weight_norm

    net = _build(net_kwargs, dtype, "meta").train()
    x, labels = (torch.empty(batch, net.img_channels, net.img_resolution, net.img_resolution, device="meta"),
                 torch.empty(batch, net.label_dim, device="meta") if net.label_dim else None)
    ema = [torch.empty_like(p) for p in net.parameters()]
    fused = backend != "reference"
    if fused:
        set_forced_weight_norm(net, False)
    loss_fn = EDM2Loss()
    counter = _Counter()
    ctx = _dispatch.simulate(backend) if fused else mk.use_backend("reference")
    with ctx, counter:
        if fused:  # as the trainer's eager step: folded into the U-Net's mp_weights call
            rest = fold_forced_norm(net)
            if rest:
                mk.force_normalize_(rest)
        loss = loss_fn(net, x, labels).sum() / batch
        loss.backward()
        mk.ema_lerp_(ema, [p.detach() for p in net.parameters()], 0.01)
    by_op = dict(sorted(counter.by_op.items(), key=lambda kv: (-kv[1], kv[0])))
    gib = {k: counter.bytes_by_op[k] / 2 ** 30 for k in by_op}
    unfused = {k: [n, gib[k]] for k, n in by_op.items() if k.startswith("aten.") and k not in _LIBRARY}
    return {"backend": backend, "ops": counter.ops, "GiB": counter.bytes / 2 ** 30,
            "GiB_with_inplace_writes": (counter.bytes + counter.inplace_write_bytes) / 2 ** 30,
            "top_ops": dict(list(by_op.items())[:12]), "by_op": by_op, "GiB_by_op": gib, "unfused": unfused,
            "library": sum(n for k, n in by_op.items() if k in _LIBRARY)}


def accounting_targets(row: dict) -> list[dict]:
    """The issue's targets for ``row``'s backend: ``[{'what', 'target', 'value', 'met'}]`` (empty: none)."""
    out = []
    for what, target in ACCOUNTING_TARGETS.get(row.get("backend"), {}).items():
        value = row.get(what)
        out.append({"what": what, "target": target, "value": value, "met": value is not None and value <= target})
    return out


def account_training_step(backends, preset: str = ACCOUNTING_PRESET, batch: int = ACCOUNTING_BATCH,
                          dtype: torch.dtype = ACCOUNTING_DTYPE) -> dict:
    """:func:`account_step` of the preset's training step for every backend (an error row where one
    cannot be traced), with the targets; what ``python -m benchmarks`` prints on any machine."""
    from edm2fast.presets import network_kwargs

    kwargs = network_kwargs(preset)
    rows = []
    for b in backends:
        try:
            row = account_step(kwargs, batch, dtype, b)
        except Exception as e:
            row = {"backend": b, "error": f"{type(e).__name__}: {e}"[:300]}
        row["targets"] = accounting_targets(row)
        rows.append(row)
    return {"network": f"preset {preset}", "batch": batch, "dtype": str(dtype), "rows": rows}


def variant_backend(variant: str) -> str:
    """The backend of a step variant ``<backend>[+cl][+compile|+step]``; ValueError naming ``variant`` otherwise.

    ``+cl``: the U-Net in channels_last (``Precond(channels_last=True)``); ``+compile``: the network
    under ``torch.compile`` (with the backend active); ``+step``: the whole training step as one
    compiled region (the trainer's ``--step-mode compile``; training steps only)."""
    if not isinstance(variant, str):
        raise TypeError(f"variant: expected a string, got {type(variant).__name__}")
    backend, *flags = variant.split("+")
    if any(f not in ("compile", "cl", "step") for f in flags) or len(set(flags)) != len(flags) or \
            {"compile", "step"} <= set(flags) or backend not in mk.registered_backends():
        raise ValueError(f"variant: expected '<backend>' with optional '+cl' (channels_last) and one of '+compile' "
                         f"or '+step', a backend in {mk.registered_backends()}, got {variant!r}")
    return backend


class _StepHost:
    """What :class:`edm2fast.graphs.CompiledStep` reads from a trainer, for the benchmark's network,
    optimizer, EMA and fixed batch (one process, ``loss_scale`` 1)."""

    def __init__(self, net, ema, optimizer, loss_fn, x, labels, batch: int):
        from edm2fast.networks import forced_norm_weights
        self.net = self._forward = net
        self.ema, self.optimizer, self.loss_fn = ema, optimizer, loss_fn
        self.device = x.device
        self.cfg = {"batch": batch, "loss_scale": 1.0}
        self.world_size = 1
        self.cur_nimg = 0
        self._mpconv_weights = forced_norm_weights(net)
        self._images = (x, labels)

    def _round_batch(self, cur_nimg: int, j: int, generator):
        return self._images


def make_train_step(net_kwargs: dict, batch: int, dtype: torch.dtype, device: torch.device, variant: str,
                    fused_adam: bool | None = None):
    """The training step of ``variant`` (see :func:`variant_backend`) as a closure, built, not yet run.

    ``reference`` normalizes the weights inside every MPConv forward (the authors' way); every
    other variant calls ``force_normalize_`` once per step. ``fused_adam``: Adam's ``fused`` flag
    (default True: torch's fused Adam on CPU and CUDA alike; the per-tensor loop takes ten times as
    long on the CPU). The same for every variant."""
    from edm2fast.loss import EDM2Loss
    from edm2fast.networks import fold_forced_norm, forced_norm_weights, set_forced_weight_norm
    from edm2fast.phema import PowerFunctionEMA

    backend, compiled = variant_backend(variant), "+compile" in variant
    if "+cl" in variant:
        net_kwargs = {**net_kwargs, "channels_last": True}
    net = _build(net_kwargs, dtype, device).train()
    forced_inside = variant == "reference"
    if not forced_inside:
        set_forced_weight_norm(net, False)
    model = torch.compile(net) if compiled else net
    ema = PowerFunctionEMA(net, stds=(0.05, 0.10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99),
                           fused=True if fused_adam is None else fused_adam)
    loss_fn = EDM2Loss()
    x, labels = _batch(net, batch, device)
    if "+step" in variant:
        from edm2fast.graphs import CompiledStep
        host = _StepHost(net, ema, opt, loss_fn, x, labels, batch)
        whole = CompiledStep(host)

        def step_compiled():
            with mk.use_backend(backend):
                whole.step(1e-4, seed=host.cur_nimg)

        return step_compiled
    weights = forced_norm_weights(net)
    state = {"nimg": 0}

    def step():
        with mk.use_backend(backend):
            if not forced_inside and not compiled:  # as the trainer's eager step (fold_forced_norm)
                rest = fold_forced_norm(net)
                if rest:
                    mk.force_normalize_(rest)
            elif not forced_inside:
                mk.force_normalize_(weights)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, labels).sum() / batch
            loss.backward()
            mk.force_finite_([p.grad for p in net.parameters() if p.grad is not None])  # as the trainer
            opt.step()
            state["nimg"] += batch
            ema.update(state["nimg"], batch)

    return step


def train_step(net_kwargs: dict, batch: int, dtype: torch.dtype, device: torch.device, variant: str,
               min_time: float) -> dict:
    """Images/s and peak memory of a full training step for ``variant`` (see module docstring)."""
    step = make_train_step(net_kwargs, batch, dtype, device, variant)
    step()  # warm-up / compile
    with PeakMemory(device) as pm:
        step()
    t = timeit(step, device, min_time=min_time, max_reps=50, warmup=1)
    return {"variant": variant, "ms_per_step": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
            "images_per_s": batch / (t["median_ms"] * 1e-3), "peak_mem_bytes": pm.peak}


def sampling(net_kwargs: dict, batch: int, dtype: torch.dtype, device: torch.device, backend: str,
             num_steps: int = 32, min_time: float = 0.5) -> dict:
    """Images/s of the Heun sampler (2 * num_steps - 1 network evaluations per image)."""
    from edm2fast.sampler import edm_sampler

    net = _build(net_kwargs, dtype, device).eval()
    x, labels = _batch(net, batch, device)

    def run():
        with torch.no_grad(), mk.use_backend(backend):
            edm_sampler(net, x, labels, num_steps=num_steps)

    t = timeit(run, device, min_time=min_time, max_reps=10, warmup=1)
    return {"backend": backend, "ms_per_batch": t["median_ms"], "images_per_s": batch / (t["median_ms"] * 1e-3),
            "evaluations_per_image": 2 * num_steps - 1}


# ------------------------------------------------------------------------------------------------
# "Your network, accelerated": what edm2fast.accelerate buys an existing EDM2-style network.

def load_user_net(spec: str):
    """``'package.module:callable'`` -> the callable; each call must return a fresh EDM2-style network.

    The network is called like the release's ``Precond`` (``net(x, sigma, labels, return_logvar=True)``)
    and has ``img_channels``, ``img_resolution`` and ``label_dim`` attributes.
    """
    import importlib
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"--user-net: expected 'package.module:callable', got {spec!r}")
    mod_name, attr = spec.split(":")
    obj = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"--user-net: {spec!r} is not callable")
    return obj


def accelerated_train_step(make_net, batch: int, device: torch.device, min_time: float, backend: str = "auto",
                           label: str = "your network") -> list[dict]:
    """Training-step time of ``make_net()`` as written, then after ``edm2fast.accelerate(net, backend)``.

    Step = forward (with the network's own forced weight normalization), EDM2 loss, backward, Adam.
    The baseline is ``accelerate(net, 'reference')``: the release's modules keep their own code and
    this project's network is pinned to the reference ops.
    """
    import edm2fast
    from edm2fast.loss import EDM2Loss

    rows = []
    for accelerated in (False, True):
        torch.manual_seed(0)
        net = make_net().to(device).train()
        for attr in ("img_channels", "img_resolution", "label_dim"):
            if not hasattr(net, attr):
                raise ValueError(f"--user-net: the network has no attribute {attr!r} (expected an EDM2 Precond)")
        report = edm2fast.accelerate(net, backend if accelerated else "reference")
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99))
        loss_fn = EDM2Loss()
        x, labels = _batch(net, batch, device)

        def step():
            opt.zero_grad(set_to_none=True)
            (loss_fn(net, x, labels).sum() / batch).backward()
            opt.step()

        step()  # warm-up
        with PeakMemory(device) as pm:
            step()
        t = timeit(step, device, min_time=min_time, max_reps=50, warmup=1)
        rows.append({"variant": label + (", accelerated" if accelerated else ""), "backend": report.backend,
                     "switched": len(report.switched), "left": [f"{n or '<root>'}: {why}" for n, _, why in report.left],
                     "ms_per_step": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                     "images_per_s": batch / (t["median_ms"] * 1e-3), "peak_mem_bytes": pm.peak})
    rows[1]["speedup"] = rows[0]["ms_per_step"] / rows[1]["ms_per_step"]
    return rows


def default_user_net(net_kwargs: dict, dtype: torch.dtype, device):
    """This project's network, for the "your network, accelerated" row when no --user-net is given."""
    return lambda: _build(net_kwargs, dtype, device)
