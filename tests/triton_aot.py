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


def compile_one(cfg, cc: int, aligned: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    sig = {name: ty for name, ty in cfg.signature}
    src = triton.compiler.ASTSource(fn=cfg.kernel, signature=sig, constexprs=dict(cfg.constexprs),
                                    attrs=_attrs_for(cfg.signature) if aligned else None)
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
    return dict(name=cfg.name, cc=cc, aligned=aligned, ptxas_rc=out.returncode, spill_stores=spill_st,
                spill_loads=spill_ld, registers=max(regs) if regs else None, seconds=round(time.time() - t0, 2),
                log=log if out.returncode != 0 else "")


def _worker(args):
    idx, cc, aligned = args
    _skip_triton_ptxas()
    from mpkernels.triton import all_configs
    cfg = all_configs()[idx]
    try:
        return compile_one(cfg, cc, aligned)
    except Exception as e:  # report, do not stop the sweep
        return dict(name=cfg.name, cc=cc, aligned=aligned, error=f"{type(e).__name__}: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--all", action="store_true", help="every variant of every configuration for every cc")
    ap.add_argument("--skip-fp16-twins", action="store_true",
                    help="skip configurations identical to a compiled one but for fp16 in place of bf16")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--filter", default="", help="only configurations whose name contains this")
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
    jobs = [(i, cc, v == "aligned") for i in order if args.filter in cfgs[i].name
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
            if r.get("error") or r.get("ptxas_rc") or r.get("spill_stores") or r.get("spill_loads"):
                bad += 1
            print(json.dumps(r), flush=True)
    if own_cache:
        import shutil
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    print(json.dumps(dict(summary=True, declared=len(cfgs), configs=len({j[0] for j in jobs}),
                          skipped_twins=len(cfgs) - len(order), compiles=len(jobs), failures=bad,
                          seconds=round(time.time() - t0, 1))), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
