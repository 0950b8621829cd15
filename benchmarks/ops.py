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


# --- host overhead per call (issue 10) ------------------------------------------------------------
#
# Small tensors, so the kernels themselves cost little and the time of a call is mostly host work:
# argument checks, dispatch, autograd bookkeeping, allocation, the launch. On CUDA the calls are
# timed without synchronizing (a launch is asynchronous), which is the host time as long as the GPU
# keeps up with such small kernels; on the CPU the kernels run inside the call, so the raw kernel's
# time is reported next to it and ``overhead_us`` is the difference.

def _host_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    return dict(x=r(2, 64, 8, 8), b=r(2, 64, 8, 8), c=r(2, 64), w=r(64, 64, 3, 3), qkv=r(2, 192, 8, 8))


# op -> (public call, inputs that get a gradient, forward kernel op's name suffix and its arguments
# for the raw kernel time, or None when the op is more than one kernel)
HOST_OPS = {
    "mp_silu": (lambda d: mk.mp_silu(d["x"]), ("x",), ("mp_silu", lambda d: (d["x"],))),
    "pixel_norm_mp_silu": (lambda d: mk.pixel_norm_mp_silu(d["x"])[1], ("x",),
                           ("pixel_norm_mp_silu", lambda d: (d["x"], 1e-4))),
    "mp_sum_clip": (lambda d: mk.mp_sum_clip(d["x"], d["b"], 0.3, 256.0), ("x", "b"),
                    ("mp_sum_clip", lambda d: (d["x"], d["b"], 0.3, 256.0))),
    "modulated_mp_silu": (lambda d: mk.modulated_mp_silu(d["x"], d["c"]), ("x", "c"),
                          ("modulated_mp_silu", lambda d: (d["x"], d["c"]))),
    "mp_conv2d": (lambda d: mk.mp_conv2d(d["x"], d["w"], 1.0), ("x", "w"), None),
    "cosine_attention": (lambda d: mk.cosine_attention(d["qkv"], 2), ("qkv",), None),
}


def _per_call_us(variants: dict, reps: int, rounds: int = 5) -> dict:
    """Median µs per call of each ``variants`` entry ``(context, fn)``, timed one call at a time,
    interleaved in rounds (a busy machine slows every variant alike). ``context()`` (backend
    choice and such) is entered around each batch of calls, outside the timed region."""
    import time
    times: dict = {k: [] for k in variants}
    for context, fn in variants.values():  # warm-up: first-call costs (compiles, caches) untimed
        with context():
            for _ in range(20):
                fn()
    for _ in range(rounds):
        for k, (context, fn) in variants.items():
            ts = times[k]
            with context():
                for _ in range(max(1, reps // rounds)):
                    t0 = time.perf_counter_ns()
                    fn()
                    ts.append(time.perf_counter_ns() - t0)
    return {k: sorted(v)[len(v) // 2] / 1e3 for k, v in times.items()}


def host_overhead(device: torch.device, backends: list[str] | None = None, *, reps: int = 2000,
                  dtype: torch.dtype = torch.float32) -> list[dict]:
    """Host µs per call of each :data:`HOST_OPS` op and backend, forward and forward+backward.

    Row fields: ``host_us_fwd`` / ``host_us_fwd_bwd`` (median per call), ``ref_us_fwd`` /
    ``ref_us_fwd_bwd`` (the reference's, same run), ``custom_op_us_fwd`` / ``custom_op_us_fwd_bwd``
    (the same backend with the lean eager path off, i.e. every kernel through the ``torch.library``
    custom op), ``raw_us_fwd`` (the forward kernel called directly, no checks, no autograd; None
    for ops made of several kernels) and ``overhead_us`` = ``host_us_fwd - raw_us_fwd``. A backend
    gets a row only where it runs the op itself; Triton only on a GPU (the CPU runs its interpreter).
    """
    import contextlib

    from mpkernels import _library
    if backends is None:
        backends = mk.available_backends()
    backends = [b for b in backends if b not in ("reference", "compile") and (device.type == "cuda" or b != "triton")]
    d = _host_inputs(device, dtype)

    def on(backend, lean=True):
        @contextlib.contextmanager
        def context():
            with mk.use_backend(backend), _library.lean_path(lean):
                yield
        return context

    rows = []
    for op, (call, diff, raw) in HOST_OPS.items():
        leaves = {k: d[k].detach().clone().requires_grad_(True) for k in diff}
        dg = {**d, **leaves}
        with mk.use_backend("reference"):
            cot = torch.ones_like(call(dg))

        def fwd(call=call):
            call(d)

        def fwd_bwd(call=call, dg=dg, leaves=leaves, cot=cot):
            torch.autograd.grad(call(dg), list(leaves.values()), cot)

        variants = {("reference", "fwd"): (on("reference"), fwd), ("reference", "fwd_bwd"): (on("reference"), fwd_bwd)}
        served = []
        for b in backends:
            name, _ = _dispatch.implementation(op, _dispatch_args(op, d), backend=b)
            if name != b:
                continue
            try:
                with on(b)():
                    fwd_bwd()
            except Exception as e:  # a backend that fails here is reported, not timed
                rows.append({"op": op, "backend": b, "device": device.type, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            served.append(b)
            for lean in (True, False):
                variants[(b, "fwd", lean)] = (on(b, lean), fwd)
                variants[(b, "fwd_bwd", lean)] = (on(b, lean), fwd_bwd)
            kop = raw and _library._DEFINED.get(f"{b}_{raw[0]}")
            if kop is not None:
                variants[(b, "raw")] = (contextlib.nullcontext, lambda kop=kop, args=raw[1](d): kop._lean_impl(*args))
        us = _per_call_us(variants, reps)
        ref = {"ref_us_fwd": us[("reference", "fwd")], "ref_us_fwd_bwd": us[("reference", "fwd_bwd")]}
        rows.append({"op": op, "backend": "reference", "device": device.type, "host_us_fwd": ref["ref_us_fwd"],
                     "host_us_fwd_bwd": ref["ref_us_fwd_bwd"], **ref})
        for b in served:
            raw_us = us.get((b, "raw"))
            rows.append({"op": op, "backend": b, "device": device.type,
                         "host_us_fwd": us[(b, "fwd", True)], "host_us_fwd_bwd": us[(b, "fwd_bwd", True)], **ref,
                         "custom_op_us_fwd": us[(b, "fwd", False)], "custom_op_us_fwd_bwd": us[(b, "fwd_bwd", False)],
                         "raw_us_fwd": raw_us,
                         "overhead_us": None if raw_us is None else us[(b, "fwd", True)] - raw_us})
    return rows


def _dispatch_args(op: str, d: dict) -> tuple:
    """The arguments :func:`mpkernels._dispatch.implementation` sees for ``op`` (after validation)."""
    return {"mp_silu": (d["x"],), "pixel_norm_mp_silu": (d["x"], 1e-4), "mp_sum_clip": (d["x"], d["b"], 0.3, 256.0),
            "modulated_mp_silu": (d["x"], d["c"]), "mp_conv2d": (d["x"], d["w"], 1.0),
            "cosine_attention": (d["qkv"], 2)}[op]


def print_host_overhead(rows: list[dict]) -> None:
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    print("\nHost time per call (µs, median; small tensors [2, 64, 8, 8]; 'custom op' = lean eager path off):")
    print(f"{'op':<20}{'backend':<11}{'fwd':>8}{'fwd+bwd':>9}{'ref fwd':>9}{'ref f+b':>9}"
          f"{'c.op fwd':>10}{'c.op f+b':>10}{'raw fwd':>9}{'overhead':>10}")
    for r in rows:
        if r["backend"] == "reference":
            continue
        if "error" in r:
            print(f"{r['op']:<20}{r['backend']:<11}error: {r['error'][:80]}")
            continue
        print(f"{r['op']:<20}{r['backend']:<11}{f(r['host_us_fwd']):>8}{f(r['host_us_fwd_bwd']):>9}"
              f"{f(r['ref_us_fwd']):>9}{f(r['ref_us_fwd_bwd']):>9}{f(r.get('custom_op_us_fwd')):>10}"
              f"{f(r.get('custom_op_us_fwd_bwd')):>10}{f(r.get('raw_us_fwd')):>9}{f(r.get('overhead_us')):>10}")


if __name__ == "__main__":  # python -m benchmarks.ops: the host-overhead table alone
    print_host_overhead(host_overhead(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
