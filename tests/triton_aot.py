"""Ahead-of-time compilation of every Triton kernel configuration, no GPU needed.

Run as a script (``python tests/triton_aot.py --cc 80 90``) in a process where
``TRITON_INTERPRET`` is unset, so ``@triton.jit`` gives real JIT functions. For each
configuration listed by :func:`mpkernels.triton.all_configs` and each compute capability,
``triton.compile`` lowers the kernel to PTX for ``GPUTarget('cuda', cc, 32)`` and
``ptxas -v`` (shipped with Triton's NVIDIA backend) assembles it and reports register use and
spills. Prints one JSON line per compile and a summary line; exits non-zero on any compile
error or spill.

A configuration can run as up to two JIT specializations (``LaunchConfig.variants``): the
generic one, and the one the JIT builds for 16-byte-aligned pointers and integer arguments
divisible by 16 (the common case, with the widest vector loads). By default every
configuration is compiled for sm_80 with its first variant and for sm_90 with its last (so
both architectures and both variants are covered); ``--all`` compiles every variant for every
architecture.

``--specs FILE`` compiles instead the specialisations real EDM2 launches produce, as recorded
by ``tests/triton_aot_specs.py`` (integers equal to 1 as constants, divisibility facts only
where the value has them, unaligned pointers where a view is unaligned), each once, for sm_90
and sm_80 alternately (``--all``: both). ``--record`` runs that recorder first.

Every compile is also checked against the architecture's shared memory per block (sm_80:
163 KB = 166912 bytes of dynamic shared memory, sm_90: 227 KB = 232448 bytes): a kernel over it
compiles fine and fails only at launch.

Triton's own last stage (which also runs ptxas) is skipped: the PTX is all this needs, and it
is assembled once here with the flags Triton uses. Compiles go to a private cache directory,
so the user's Triton cache never sees these stub binaries.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def ptxas_path() -> str:
    import triton
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(base):
        return base
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: WPS433 (fallback for other layouts)
    p = get_ptxas()
    return p.path if hasattr(p, "path") else p[0]


def _attrs_for(signature):
    """Divisibility-by-16 attributes on every pointer and integer argument (tt.divisibility)."""
    attrs = {}
    for i, (_, ty) in enumerate(signature):
        if ty.startswith("*") or ty in ("i32", "i64"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _skip_triton_ptxas() -> None:
    try:
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:  # pragma: no cover
        return
    CUDABackend.make_cubin = lambda self, src, metadata, opt, capability: b""


def specialise(cfg, facts: dict) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attrs of ``cfg`` launched with arguments of these ``facts``
    (from ``triton_aot_specs.arg_facts``), the way Triton's JIT specialises them: ints equal
    to 1 become constants, ints divisible by 16 and 16-byte-aligned pointers get
    ``tt.divisibility`` 16, ints of 2^31 and more are i64; parameters marked
    ``do_not_specialize`` (``..._on_alignment``) get none of that."""
    params = {p.name: p for p in getattr(cfg.kernel, "params", [])}
    sig, consts, attrs = {}, dict(cfg.constexprs), {}
    for i, (name, ty) in enumerate(cfg.signature):
        fact = facts.get(name)
        p = params.get(name)
        no_spec = bool(p is not None and getattr(p, "do_not_specialize", False))
        no_align = no_spec or bool(p is not None and getattr(p, "do_not_specialize_on_alignment", False))
        if ty == "constexpr" or fact is None:
            sig[name] = ty
        elif fact[0] == "int":
            kind = fact[1]
            if kind == "one" and not no_spec:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i64" if kind.startswith("i64:") else ty
            if kind.endswith("16") and not no_align:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif fact[0] == "ptr":
            sig[name] = ty
            if fact[1] and not no_align:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = ty
    return sig, consts, attrs


def spec_label(facts: dict) -> str:
    """Short form of a specialisation: ``1`` for constant ints, ``D`` divisible/aligned, ``.`` neither."""
    out = []
    for name, f in facts.items():
        if f[0] == "int":
            out.append(f"{name}={'1' if f[1] == 'one' else ('D' if f[1].endswith('16') else '.')}"
                       f"{'/i64' if f[1].startswith('i64:') else ''}")
        elif f[0] == "ptr":
            out.append(f"{name}={'D' if f[1] else '.'}")
    return ",".join(out)


def compile_one(cfg, cc: int, aligned: bool, facts: dict | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    if facts is not None:
        sig, consts, attrs = specialise(cfg, facts)
    else:
        sig, consts = {name: ty for name, ty in cfg.signature}, dict(cfg.constexprs)
        attrs = _attrs_for(cfg.signature) if aligned else None
    src = triton.compiler.ASTSource(fn=cfg.kernel, signature=sig, constexprs=consts, attrs=attrs)
    t0 = time.time()
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                "maxnreg": cfg.maxnreg})
    ptx = k.asm["ptx"]
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path,
                              "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
    log = out.stdout + out.stderr
    spill_st = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", log))
    spill_ld = sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", log))
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    shared = int(getattr(k.metadata, "shared", 0) or 0)
    return dict(name=cfg.name, cc=cc, aligned=aligned, ptxas_rc=out.returncode, spill_stores=spill_st,
                spill_loads=spill_ld, registers=max(regs) if regs else None, shared=shared,
                shared_limit=SHARED_LIMIT.get(cc), seconds=round(time.time() - t0, 2),
                log=log if out.returncode != 0 else "")


def is_bad(r: dict) -> bool:
    """A compile error, a ptxas failure, a spill, or more shared memory than one block may have."""
    over = r.get("shared_limit") is not None and (r.get("shared") or 0) > r["shared_limit"]
    return bool(r.get("error") or r.get("ptxas_rc") or r.get("spill_stores") or r.get("spill_loads") or over)


_SPECS: list = []  # recorded specialisations (set before the pool forks)


def _worker(args):
    idx, cc, aligned, spec_idx = args
    _skip_triton_ptxas()
    from mpkernels.triton import all_configs
    cfg = all_configs()[idx]
    facts = _SPECS[spec_idx]["args"] if spec_idx is not None else None
    extra = dict(spec=spec_label(facts), origin=_SPECS[spec_idx].get("origin")) if facts is not None else {}
    try:
        return {**compile_one(cfg, cc, aligned, facts), **extra}
    except Exception as e:  # report, do not stop the sweep
        return dict(name=cfg.name, cc=cc, aligned=aligned, error=f"{type(e).__name__}: {e}", **extra)


def record_specs() -> list[dict]:
    """Run ``triton_aot_specs.py`` (in the interpreter, on CPU tensors) and return its records."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_aot_specs.py")], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"recording the specialisations failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--all", action="store_true", help="every variant of every configuration for every cc")
    ap.add_argument("--skip-fp16-twins", action="store_true",
                    help="skip configurations identical to a compiled one but for fp16 in place of bf16")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--filter", default="", help="only configurations whose name contains this")
    ap.add_argument("--specs", help="JSON of recorded launch specialisations (tests/triton_aot_specs.py) to compile")
    ap.add_argument("--record", action="store_true", help="record the specialisations first (--specs: where to save)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    own_cache = "TRITON_CACHE_DIR" not in os.environ
    if own_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mpkernels-aot-")
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    from mpkernels.triton import all_configs
    cfgs = all_configs()

    def variants(cfg, k):
        if args.all:
            return cfg.variants
        return (cfg.variants[0] if k % 2 == 0 else cfg.variants[-1],)

    # Slowest kernels first, so the pool is not left waiting on one at the end.
    order = sorted(range(len(cfgs)), key=lambda i: "attn" not in cfgs[i].name)
    if args.skip_fp16_twins:
        names = {c.name for c in cfgs}
        order = [i for i in order if not ("*fp16" in cfgs[i].name and
                                          cfgs[i].name.replace("*fp16", "*bf16") in names)]
    if args.record or args.specs:
        if args.record:
            _SPECS[:] = record_specs()
            if args.specs:
                with open(args.specs, "w") as f:
                    json.dump(_SPECS, f)
        else:
            with open(args.specs) as f:
                _SPECS[:] = json.load(f)
        index = {}
        for i, cfg in enumerate(cfgs):
            index.setdefault(cfg.name, i)
        unknown = sorted({s["config"] for s in _SPECS} - set(index))
        if unknown:
            print(f"recorded launches of undeclared configurations: {unknown[:5]}", file=sys.stderr)
            return 1
        ccs = sorted(args.cc, reverse=True)  # the newest first: sm_90 is the machine this is for
        jobs = [(index[s["config"]], cc, None, j) for j, s in enumerate(_SPECS) if args.filter in s["config"]
                for k, cc in enumerate(ccs) if args.all or k == j % len(ccs)]
        jobs.sort(key=lambda j: "attn" not in cfgs[j[0]].name)
    else:
        jobs = [(i, cc, v == "aligned", None) for i in order if args.filter in cfgs[i].name
                for k, cc in enumerate(args.cc) for v in variants(cfgs[i], k)]
    t0 = time.time()
    bad = 0
    ctx = None
    try:
        import multiprocessing as mp
        ctx = mp.get_context("fork")
    except ValueError:
        pass
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as ex:
        for r in ex.map(_worker, jobs, chunksize=1):
            if is_bad(r):
                bad += 1
            print(json.dumps(r), flush=True)
    if own_cache:
        import shutil
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    print(json.dumps(dict(summary=True, declared=len(cfgs), configs=len({j[0] for j in jobs}),
                          skipped_twins=len(cfgs) - len(order), compiles=len(jobs), failures=bad,
                          specialisations=len(_SPECS),
                          seconds=round(time.time() - t0, 1))), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
