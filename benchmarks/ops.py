"""Op level: parity against an fp64 oracle, then time, bandwidth and memory, per backend.

Backends are the mpkernels backends that implement the op natively (a backend that
would fall back to the reference for a case gets no row), plus ``compile``:
``torch.compile`` applied to the reference, the alternative a user would otherwise
pick. Parity comes first; a row that fails parity is never timed or reported as a
speed-up.
"""

from __future__ import annotations

import math

import torch

import mpkernels as mk
from mpkernels import _dispatch

from .cases import INPLACE_OPS, Case
from .measure import PeakMemory, timeit

# Absolute error floors, relative to the largest oracle magnitude: a few units in the last place.
FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FACTOR = 2.0  # a kernel may be at most this much worse than eager PyTorch at the same dtype (STYLE.md)


def _to64(a):
    if isinstance(a, torch.Tensor):
        return a.detach().double()
    if isinstance(a, list):
        return [t.detach().double() for t in a]
    return a


def _clone(a):
    if isinstance(a, torch.Tensor):
        return a.detach().clone()
    if isinstance(a, list):
        return [t.detach().clone() for t in a]
    return a


def _outputs(case: Case, args, result) -> list[torch.Tensor]:
    if case.op in INPLACE_OPS:
        return list(args[0])
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _cotangents(outs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device=o.device, dtype=o.dtype) for o in outs]


def native(case: Case, backend: str, args) -> bool:
    """True when ``backend`` runs this case itself (no fallback to the reference)."""
    if backend in ("reference", "compile"):
        return True
    dargs = case.dispatch_args(args) if case.dispatch_args is not None else tuple(args)
    name, _ = _dispatch.implementation(case.op, tuple(dargs), case.kwargs, backend=backend)
    return name == backend


def _callable(case: Case, backend: str):
    if backend == "compile":
        compiled = torch.compile(case.call, dynamic=False)

        def run(*a):
            with mk.use_backend("reference"):
                return compiled(*a)
        return run

    def run(*a):
        with mk.use_backend(backend, strict=backend != "reference"):
            return case.call(*a)
    return run


def evaluate(case: Case, backend: str, args, seed: int):
    """Outputs and input gradients of ``case`` on ``backend`` (inputs are cloned)."""
    args = [_clone(a) for a in args]
    diff = [args[i] for i in case.diff]
    for t in diff:
        t.requires_grad_(True)
    fn = _callable(case, backend)
    result = fn(*args)
    outs = _outputs(case, args, result)
    grads: list[torch.Tensor] = []
    if diff:
        grads = list(torch.autograd.grad(outs, diff, _cotangents(outs, seed)))
    return [o.detach() for o in outs], [g.detach() for g in grads]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def parity(case: Case, backends: list[str], dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    args = case.make(dtype, device, gen)
    args64 = [_to64(a) for a in args]
    o64, g64 = evaluate(case, "reference", args64, seed)
    oe, ge = evaluate(case, "reference", args, seed)
    rows = []
    for b in backends:
        row = {"op": case.op, "case": case.label, "backend": b, "dtype": str(dtype).replace("torch.", "")}
        if not native(case, b, args):
            continue
        try:
            ob, gb = evaluate(case, b, args, seed)
        except Exception as e:  # a crash is a parity failure, reported with its message
            rows.append({**row, "status": "FAIL", "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        worst = None
        ok = True
        for kind, cands, oracles, eagers in (("out", ob, o64, oe), ("grad", gb, g64, ge)):
            for i, (c, o, e) in enumerate(zip(cands, oracles, eagers)):
                if c.shape != o.shape or c.dtype != e.dtype:
                    ok = False
                    worst = {"tensor": f"{kind}{i}", "problem": f"shape/dtype {tuple(c.shape)} {c.dtype}"}
                    continue
                scale = max(1.0, float(o.abs().max())) if o.numel() else 1.0
                err, eerr = _err(c, o), _err(e, o)
                budget = FACTOR * eerr + FLOORS[c.dtype] * scale
                good = err <= budget and math.isfinite(err)
                ratio = err / budget if budget > 0 else 0.0
                if worst is None or "ratio" not in worst or ratio > worst["ratio"]:
                    worst = {"tensor": f"{kind}{i}", "max_abs_err": err, "eager_err": eerr, "budget": budget,
                             "rel_err": err / scale, "ratio": ratio}
                ok &= good
        rows.append({**row, "status": "ok" if ok else "FAIL", **(worst or {})})
    return rows


def timing(case: Case, backend: str, dtype: torch.dtype, device: torch.device, min_time: float) -> dict:
    """Forward, backward and forward+backward timings, GB/s and TFLOP/s, peak memory of fwd+bwd."""
    gen = torch.Generator().manual_seed(1)
    args = case.make(dtype, device, gen)
    fn = _callable(case, backend)
    res: dict = {}
    if case.op in INPLACE_OPS:
        res["fwd"] = timeit(lambda: fn(*args), device, min_time=min_time)
    else:
        res["fwd"] = timeit(lambda: fn(*args), device, min_time=min_time)
        if case.diff:
            diff = [args[i] for i in case.diff]
            for t in diff:
                t.requires_grad_(True)
            outs = _outputs(case, args, fn(*args))
            cots = _cotangents(outs, 0)
            res["bwd"] = timeit(lambda: torch.autograd.grad(outs, diff, cots, retain_graph=True), device,
                                min_time=min_time)

            def fwd_bwd():
                o = _outputs(case, args, fn(*args))
                torch.autograd.grad(o, diff, cots)
            res["fwd_bwd"] = timeit(fwd_bwd, device, min_time=min_time)
            del outs
            with PeakMemory(device) as pm:
                fwd_bwd()
            res["peak_mem_bytes"] = pm.peak
    for k, nbytes, fl in (("fwd", case.bytes_fwd(dtype), case.flops_fwd),
                          ("bwd", case.bytes_bwd(dtype), case.flops_bwd)):
        if k in res:
            s = res[k]["median_ms"] * 1e-3
            res[k]["bytes"] = nbytes
            res[k]["GB_per_s"] = nbytes / s / 1e9
            if fl:
                res[k]["TFLOP_per_s"] = fl / s / 1e12
    return res
