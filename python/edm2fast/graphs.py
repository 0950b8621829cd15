"""Whole training steps and sampler network evaluations as CUDA graphs or ``torch.compile`` regions.

Step modes (``--step-mode``, ``TrainConfig.step_mode``):

* ``'eager'``: the trainer's plain step (forced weight normalization, forward, loss, backward,
  gradients forced finite, Adam, EMA update), launched op by op.
* ``'graph'``: the same step captured once as a CUDA graph and replayed. The batch, learning rate
  and EMA blend weights reach the graph through static device tensors filled before each replay;
  the loss's generator and the global one (dropout) are registered with the graph, so a replay
  draws the numbers the eager step draws after the same seeding. The kernels are the eager
  step's (fused Adam reading its learning rate from a float32 tensor; the trainer rounds the eager
  learning rate to float32 on CUDA too), so the weights follow the eager run bit for bit
  (tests/test_step_capture.py checks it on a GPU). Warm-up: the first steps run eagerly on a side
  stream, then one is captured; a step that cannot be captured or replayed falls back to eager.
* ``'compile'``: one ``torch.compile(fullgraph=True)`` region holding the whole step: gradients
  through ``torch.autograd.grad`` (``torch._dynamo.config.trace_autograd_ops``; ``Tensor.backward``
  and ``torch.optim`` ``step`` graph-break on torch 2.11 and 2.14), Adam written out with the
  eager optimizer's operations on its own state tensors, and the noise drawn by the eager code
  outside the region with the loss's generator. Inductor reorders floating-point work, so the
  weights match the eager step within float32 rounding (1e-6 after two steps on the CPU, with
  Inductor and with ``aot_eager``, whose AOT-autograd decompositions round differently too).
  On CUDA it uses ``mode='reduce-overhead'`` (Inductor's CUDA graphs).
* ``'auto'``: ``'graph'`` on CUDA when it is safe (one process, one accumulation round, the network
  not compiled separately), else ``'eager'``; the reason for eager is logged once.

Sampler (:func:`graphed_denoiser`): one network evaluation ``net(x, sigma, labels)`` per input
shape captured as a CUDA graph (``'graph'``) or the network compiled (``'compile'``).
"""

from __future__ import annotations

import sys
import weakref

import torch

import mpkernels as mk

__all__ = ["STEP_MODES", "choose_step_mode", "GraphedStep", "CompiledStep", "edm2_loss_from_normals",
           "draw_loss_normals", "graphed_denoiser", "SAMPLER_MODES"]

STEP_MODES = ("auto", "eager", "graph", "compile")
SAMPLER_MODES = ("auto", "eager", "graph", "compile")


def _can_register_generators() -> bool:
    return hasattr(torch.cuda, "CUDAGraph") and hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def choose_step_mode(requested: str, *, device: torch.device, distributed: bool, rounds: int,
                     compiled_net: bool, dropout: float) -> tuple[str, str | None]:
    """``(mode, note)``: the step mode to use for ``requested``, and why it is ``'eager'`` when a
    faster mode was asked for (or chosen by ``'auto'``) but is not safe here (None otherwise)."""
    if requested not in STEP_MODES:
        raise ValueError(f"step_mode: expected one of {list(STEP_MODES)}, got {requested!r}")
    if requested == "eager":
        return "eager", None
    if requested == "compile":
        why = (("several processes (DDP's gradient hooks do not run under torch.autograd.grad)" if distributed else
                None) or (f"{rounds} accumulation rounds per step (batch_gpu below the per-process batch)"
                          if rounds != 1 else None)
               or ("dropout: its masks would come from the compiled random generator, not the eager one"
                   if dropout > 0 else None) or ("--compile already compiles the network" if compiled_net else None))
        return ("eager", f"step mode: eager, not compile: {why}") if why else ("compile", None)
    why = (("not a CUDA device (CUDA graphs need a GPU)" if device.type != "cuda" else None)
           or ("several processes (DDP is not captured)" if distributed else None)
           or (f"{rounds} accumulation rounds per step (batch_gpu below the per-process batch)"
               if rounds != 1 else None)
           or ("--compile compiles the network, which is then not captured as well" if compiled_net else None)
           or ("this torch cannot register generators with a CUDA graph" if not _can_register_generators() else None))
    if why:
        return "eager", f"step mode: eager, not {'graph' if requested == 'graph' else 'a CUDA graph'}: {why}"
    return "graph", None


# ----------------------------------------------------------------------------------------------
# The loss with its normals drawn outside (for the compiled step).

def draw_loss_normals(images: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The two draws of :class:`edm2fast.loss.EDM2Loss`, in its order: the per-sample normal of the
    noise level ``[N, 1, ..., 1]``, then the unit noise shaped like ``images`` (float32)."""
    kwargs = dict(device=images.device, dtype=torch.float32, generator=generator)
    rnd_normal = torch.randn([images.shape[0]] + [1] * (images.ndim - 1), **kwargs)
    return rnd_normal, torch.randn(images.shape, **kwargs)


def edm2_loss_from_normals(loss_fn, net, images, labels, rnd_normal, unit_noise) -> torch.Tensor:
    """``loss_fn(net, images, labels, generator=g)`` with the draws of ``g`` given (paper Eqs. 14-15, 21);
    the same operations in the same order, so the same numbers (tests/test_step_capture.py)."""
    images = images.to(torch.float32)
    sd = loss_fn.sigma_data
    sigma = (rnd_normal * loss_fn.P_std + loss_fn.P_mean).exp()             # Eq. 14
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2                    # Eq. 15
    noise = unit_noise * sigma
    denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
    logvar = logvar.to(torch.float32)
    return (weight / logvar.exp()) * (denoised.to(torch.float32) - images) ** 2 + logvar  # Eq. 21


# ----------------------------------------------------------------------------------------------
# Training steps.

def _ema_weights(trainer, cur_nimg: int) -> list[float]:
    """``1 - beta`` of every EMA for the step that ends at ``cur_nimg`` (phema.PowerFunctionEMA.update)."""
    from . import phema
    batch = trainer.cfg["batch"]
    return [1 - phema.power_function_beta(std, cur_nimg, batch) for std in trainer.ema.stds]


def _ema_update_(trainer, weights) -> None:
    """Every EMA updated with blend weights ``weights`` (0-d tensors), as ``PowerFunctionEMA.update``."""
    net_p = [p.detach() for p in trainer.net.parameters()]
    net_b = list(trainer.net.buffers())
    for ema, w in zip(trainer.ema.emas, weights):
        ema_p = [p.detach() for p in ema.parameters()]
        if ema_p:
            mk.ema_lerp_(ema_p, net_p, w)
        for e, b in zip(ema.buffers(), net_b):
            e.copy_(b)


def _prepare_triton_tables(trainer) -> list:
    """Hold the Triton backend's multi-tensor work tables for the step's lists (needed under capture)."""
    try:
        from mpkernels.triton import multi_tensor
    except Exception:  # Triton missing or unusable: the step does not use it
        return []
    handles = [multi_tensor.prepare_force_normalize_(trainer._mpconv_weights)]
    net_p = [p.detach() for p in trainer.net.parameters()]
    for ema in trainer.ema.emas:
        handles.append(multi_tensor.prepare_ema_lerp_([p.detach() for p in ema.parameters()], net_p))
    return handles


class GraphedStep:
    """The trainer's whole step as one CUDA graph (step mode ``'graph'``).

    The first ``warmup`` steps run eagerly on a side stream (they are ordinary training steps, and
    let cuDNN, cuBLAS, Triton and the optimizer initialize); the next step is captured and every
    step from then on is one replay. The batch, labels, learning rate and EMA weights are copied
    into static tensors before each replay; nothing in the step reads a device value on the host.
    """

    def __init__(self, trainer, warmup: int = 3):
        self.trainer = trainer
        self.warmup = int(warmup)
        self.device = trainer.device
        self.graph = None
        self.warm_steps = 0
        self.generator = torch.Generator(self.device)
        self.lr = torch.zeros([], dtype=torch.float32, device=self.device)
        self.ema_weights = [torch.zeros([], dtype=torch.float32, device=self.device) for _ in trainer.ema.stds]
        self.images = self.labels = None
        self.loss_sum = self.loss_sq = None
        self.count = 0
        self._tables = []

    def _inputs(self, seed: int):
        """Seed both generators as the eager step does and fetch the step's batch."""
        t = self.trainer
        torch.manual_seed(seed)  # dropout draws from the global generator
        self.generator.manual_seed(seed)
        return t._round_batch(t.cur_nimg, 0, self.generator)

    def _capture(self, images, labels):
        t = self.trainer
        cfg = t.cfg
        self.images = torch.empty_like(images)
        self.labels = None if labels is None else torch.empty_like(labels)
        self._tables = _prepare_triton_tables(t)
        t.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates (and owns) the gradients
        groups = t.optimizer.param_groups
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        for g in groups:
            g["lr"], g["capturable"] = self.lr, True
        scale = cfg["loss_scale"] / (cfg["batch"] // t.world_size)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        torch.cuda.synchronize(self.device)
        try:
            # thread_local: a DataLoader's pin-memory thread may keep using CUDA during the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                mk.force_normalize_(t._mpconv_weights)  # paper Eq. 66
                loss = t.loss_fn(t._forward, self.images, self.labels, generator=self.generator)
                (loss.sum() * scale).backward()
                self.loss_sum = loss.detach().sum().double()
                self.loss_sq = loss.detach().double().square().sum()
                mk.force_finite_([p.grad for p in t.net.parameters() if p.grad is not None])
                t.optimizer.step()
                _ema_update_(t, self.ema_weights)
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, capturable
        self.count = loss.numel()
        self.graph = graph

    def step(self, lr: float, seed: int):
        """One training step at ``trainer.cur_nimg``; returns ``(loss_sum, count, loss_sq)`` or None when
        this step cannot be replayed (the caller runs the eager step, and should drop this object)."""
        t = self.trainer
        if self.graph is None and self.warm_steps < self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss_sum, count = t._eager_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warm_steps += 1
            return loss_sum, count, t._last_loss_sq
        images, labels = self._inputs(seed)
        if self.graph is None:
            # Capturing launches nothing; put both generators back where the eager step would have them.
            states = self.generator.get_state(), torch.cuda.get_rng_state(self.device)
            try:
                self._capture(images, labels)
            except Exception as e:  # an op that cannot be captured: train on eagerly
                t.log(f"step mode: eager from {t.cur_nimg} images on: the step could not be captured "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                return None
            finally:
                self.generator.set_state(states[0])
                torch.cuda.set_rng_state(states[1], self.device)
        if (images.shape != self.images.shape or images.dtype != self.images.dtype
                or (labels is None) != (self.labels is None)
                or (labels is not None and (labels.shape != self.labels.shape or labels.dtype != self.labels.dtype))):
            t.log(f"step mode: eager from {t.cur_nimg} images on: the batch changed shape "
                  f"({tuple(self.images.shape)} captured, {tuple(images.shape)} now)")
            return None
        self.images.copy_(images)
        if labels is not None:
            self.labels.copy_(labels)
        self.lr.fill_(lr)
        for w, value in zip(self.ema_weights, _ema_weights(t, t.cur_nimg + t.cfg["batch"])):
            w.fill_(value)
        self.graph.replay()
        t.cur_nimg += t.cfg["batch"]
        return self.loss_sum.clone(), self.count, self.loss_sq.clone()

    def release(self) -> None:
        """Give the gradients back to eager autograd (after a fallback) and free the graph."""
        if self.graph is not None:
            torch.cuda.synchronize(self.device)
            self.trainer.optimizer.zero_grad(set_to_none=True)
            self.graph = None


class CompiledStep:
    """The trainer's whole step as one ``torch.compile(fullgraph=True)`` region (step mode ``'compile'``).

    The noise is drawn eagerly with the eager step's generator and seeding, then the region runs
    forced weight normalization, the loss (:func:`edm2_loss_from_normals`), its gradients
    (``torch.autograd.grad``), the finite clean-up, Adam on ``torch.optim.Adam``'s own state (so
    checkpoints are unchanged) and the EMA updates. Host-side scalars (Adam's step size and bias
    correction, EMA weights) are computed in float64 as the eager code computes them and passed as
    0-d float32 tensors, so changing them never recompiles.
    """

    def __init__(self, trainer, backend: str | None = None, mode: str | None = None):
        self.trainer = trainer
        t = trainer
        self.device = t.device
        if backend is None:
            backend = "inductor"
        if mode is None and self.device.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"
        group = t.optimizer.param_groups
        if len(group) != 1:
            raise ValueError("optimizer: the compiled step expects one parameter group")
        g = group[0]
        if g.get("amsgrad") or g.get("weight_decay") or g.get("maximize"):
            raise ValueError("optimizer: the compiled step implements plain Adam (no amsgrad, weight decay, maximize)")
        self.beta1, self.beta2 = (float(b) for b in g["betas"])
        self.eps = float(g["eps"])
        self.params = list(g["params"])
        dev = self.device
        # Adam's state as torch.optim.Adam keeps it (created here if the optimizer has not stepped yet).
        fused_or_capturable = bool(g.get("fused") or g.get("capturable"))
        for p in self.params:
            st = t.optimizer.state[p]
            if not st:
                st["step"] = (torch.zeros([], dtype=torch.float32, device=p.device) if fused_or_capturable
                              else torch.tensor(0.0, dtype=torch.float32))
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = {float(t.optimizer.state[p]["step"]) for p in self.params}
        if len(steps) != 1:
            raise ValueError("optimizer: parameters are at different Adam steps; the compiled step cannot continue")
        self.adam_step = int(steps.pop())
        self.step_size = torch.zeros([], dtype=torch.float32, device=dev)
        self.bc2_sqrt = torch.zeros([], dtype=torch.float32, device=dev)
        self.ema_weights = [torch.zeros([], dtype=torch.float32, device=dev) for _ in t.ema.stds]
        self.scale = t.cfg["loss_scale"] / (t.cfg["batch"] // t.world_size)
        self._body_compiled = torch.compile(self._body, fullgraph=True, backend=backend, mode=mode)

    def _body(self, images, labels, rnd_normal, unit_noise, step_size, bc2_sqrt, ema_weights):
        t = self.trainer
        with torch.no_grad():
            mk.force_normalize_([w.detach() for w in t._mpconv_weights])  # paper Eq. 66
        loss = edm2_loss_from_normals(t.loss_fn, t._forward, images, labels, rnd_normal, unit_noise)
        grads = torch.autograd.grad(loss.sum() * self.scale, self.params)
        with torch.no_grad():
            loss_sum = loss.detach().sum().double()
            loss_sq = loss.detach().double().square().sum()
            b1, b2 = self.beta1, self.beta2
            for p, grad in zip(self.params, grads):
                grad = torch.nan_to_num(grad, nan=0, posinf=0, neginf=0)  # force finite
                st = t.optimizer.state[p]
                # torch.optim.Adam (single tensor, not capturable), operation for operation.
                st["step"].add_(1)
                st["exp_avg"].lerp_(grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / bc2_sqrt).add_(self.eps)
                p.detach().add_(-step_size * st["exp_avg"] / denom)
            _ema_update_(t, ema_weights)
        return loss_sum, loss_sq

    def step(self, lr: float, seed: int):
        """One training step at ``trainer.cur_nimg``: ``(loss_sum, count, loss_sq)``."""
        t = self.trainer
        torch.manual_seed(seed)
        gen = torch.Generator(self.device).manual_seed(seed)
        images, labels = t._round_batch(t.cur_nimg, 0, gen)
        rnd_normal, unit_noise = draw_loss_normals(images.to(torch.float32), gen)
        self.adam_step += 1
        # Adam's host scalars, as torch.optim.Adam computes them (float64, then float32 in the kernels).
        self.step_size.fill_(lr / (1 - self.beta1 ** self.adam_step))
        self.bc2_sqrt.fill_((1 - self.beta2 ** self.adam_step) ** 0.5)
        for w, value in zip(self.ema_weights, _ema_weights(t, t.cur_nimg + t.cfg["batch"])):
            w.fill_(value)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            loss_sum, loss_sq = self._body_compiled(images, labels, rnd_normal, unit_noise, self.step_size,
                                                    self.bc2_sqrt, self.ema_weights)
        t.cur_nimg += t.cfg["batch"]
        return loss_sum, images.numel(), loss_sq

    def release(self) -> None:
        """Nothing to give back: the compiled step keeps its state in the optimizer and the network."""


# ----------------------------------------------------------------------------------------------
# Sampler.

_NOTED: set[str] = set()


def _note_once(msg: str, log=None) -> None:
    if msg in _NOTED:
        return
    _NOTED.add(msg)
    (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)


class _GraphedEvaluation:
    """``net(x, sigma, labels)`` for one set of input shapes, captured as a CUDA graph."""

    def __init__(self, net, x, sigma, labels):
        self.x, self.sigma = x.clone(), sigma.clone()
        self.labels = None if labels is None else labels.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            net(self.x, self.sigma, self.labels)  # warm-up: cuDNN autotuning, Triton compilation, tables
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = net(self.x, self.sigma, self.labels)

    def __call__(self, x, sigma, labels):
        self.x.copy_(x)
        self.sigma.copy_(sigma)
        if labels is not None:
            self.labels.copy_(labels)
        self.graph.replay()
        return self.out.clone()


class _GraphedDenoiser:
    """Replays one captured evaluation per input signature; at most ``max_graphs`` of them."""

    def __init__(self, net, max_graphs: int = 8):
        self.net = net
        self.max_graphs = max_graphs
        self.graphs: dict = {}
        self.params = self._param_ptrs()

    def _param_ptrs(self):
        return tuple(t.data_ptr() for t in list(self.net.parameters()) + list(self.net.buffers()))

    def __call__(self, x, sigma, labels=None):
        if self._param_ptrs() != self.params:  # new parameter tensors: the graphs read the old ones
            self.graphs.clear()
            self.params = self._param_ptrs()
        key = tuple((tuple(v.shape), v.dtype, v.stride()) if v is not None else None for v in (x, sigma, labels))
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= self.max_graphs:
                return self.net(x, sigma, labels)
            g = self.graphs[key] = _GraphedEvaluation(self.net, x, sigma, labels)
        return g(x, sigma, labels)


_DENOISERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graphed_denoiser(net, device: torch.device, eval_mode: str = "auto", log=None):
    """``net`` for :func:`edm2fast.sampler.edm_sampler`'s evaluations in mode ``eval_mode``.

    ``'graph'`` (``'auto'`` on CUDA, for an ``nn.Module`` in eval mode): one CUDA graph per input
    shape, cached with the module, so evaluations give the eager kernels' results. ``'compile'``:
    ``torch.compile(net)`` (``mode='reduce-overhead'`` on CUDA). Otherwise ``net`` itself, with one
    note saying why when a faster mode was asked for or would be chosen by ``'auto'``.
    """
    if eval_mode not in SAMPLER_MODES:
        raise ValueError(f"eval_mode: expected one of {list(SAMPLER_MODES)}, got {eval_mode!r}")
    if eval_mode == "eager":
        return net
    if eval_mode == "compile":
        cmode = "reduce-overhead" if device.type == "cuda" else None
        return torch.compile(net, mode=cmode)
    why = (("not a CUDA device (CUDA graphs need a GPU)" if device.type != "cuda" else None)
           or ("the network is not a torch.nn.Module" if not isinstance(net, torch.nn.Module) else None)
           or ("the network is in training mode" if isinstance(net, torch.nn.Module) and net.training else None))
    if why:
        wanted = "graph" if eval_mode == "graph" else "CUDA graphs"
        _note_once(f"sampler: eager network evaluations, not {wanted}: {why}", log)
        return net
    g = _DENOISERS.get(net)
    if g is None:
        g = _DENOISERS[net] = _GraphedDenoiser(net)
    return g

