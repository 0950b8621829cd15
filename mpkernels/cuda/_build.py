"""Finding, loading and building the native extension (``csrc/``).

Standalone on purpose: ``setup.py`` imports this file by path (before the package is
installed), so it uses only the standard library at import time and imports torch lazily.

Where the compiled module comes from, in this order:

1. **Prebuilt** ``mpkernels/cuda/_C*.so``, compiled by ``pip install`` (``setup.py``). It is used
   when it was built from the current ``csrc/`` (a source hash is compiled into it; an installed
   copy without ``csrc/`` is trusted as is).
2. **Just-in-time cache**: a module compiled earlier by :func:`build` with
   ``torch.utils.cpp_extension.load`` + ninja into :func:`build_directory`, recorded in a stamp
   file together with the source hash and the torch / CUDA / Python versions it was built for.
3. Otherwise nothing: the backend is unavailable until :func:`build` runs (explicitly, or through
   ``mk.set_backend('cuda')``). Nothing is compiled at import.

Environment variables:

* ``MPKERNELS_BUILD_EXT``: ``1`` forces ``setup.py`` to build the extension (and fail loudly
  when it cannot), ``0`` skips it. Unset: build when the toolchain is complete (nvcc of the same
  CUDA major version as torch's, ninja, a C++ compiler, a CUDA build of torch); anything missing,
  and any compile error, skips the extension without failing the install.
* ``MPKERNELS_REQUIRE_EXT=1`` (CI): like ``MPKERNELS_BUILD_EXT=1``, the install fails when the
  extension cannot be built (and the extension tests fail instead of skipping).
* ``MPKERNELS_BUILD_DIR``: where just-in-time builds go (default
  ``~/.cache/mpkernels/<python-torch-cuda tag>``).
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures to compile for (PyTorch's syntax, e.g. ``9.0``).
  Unset: the architectures of the visible GPUs (plus PTX of the newest), or without a visible GPU
  sm_80, sm_86, sm_89, sm_90 and PTX for compute_90 (newer GPUs JIT-compile it at load time).
* ``MAX_JOBS``: parallel compile jobs (ninja), as in PyTorch.

A skipped extension never fails ``pip install``; the reason goes to stderr, which pip shows with
``pip install -v`` (a successful install hides the build's output otherwise). Afterwards
:func:`mpkernels.cuda.status` says the extension is not loaded, and :func:`mpkernels.cuda.build`
raises :class:`ExtensionBuildError` naming what is missing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(PACKAGE_DIR))
CSRC = os.path.join(ROOT, "csrc")

CPP_SOURCES = ("bindings.cpp", "mp_cpu.cpp", "attention_cat_bindings.cpp", "attention_cpu.cpp", "cat_cpu.cpp",
               "multi_weight_bindings.cpp", "multi_weight_cpu.cpp")
CUDA_SOURCES = ("elementwise.cu", "norms.cu", "weights.cu", "attention.cu", "cat.cu", "multi_weight.cu")
HEADERS = ("mp_kernels.h", "mp_math.h", "mp_cpu_impl.h", "cuda_common.cuh", "launch_shapes.h", "attention_cat.h",
           "cpu_common.h", "bindings_common.h", "row_sums_cpu_impl.h",
           "multi_weight.h", "multi_weight_cpu_impl.h", "cat_silu_cpu_impl.h", "weight_rows.cuh")

# (compute capability, PTX too): sm_80 (A100), sm_86 (RTX 30xx, A40), sm_89 (L40, RTX 40xx),
# sm_90 (H100/H200) and compute_90 PTX for anything newer.
DEFAULT_ARCHES = (("80", False), ("86", False), ("89", False), ("90", True))

CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DMPK_WITH_CUDA"]
NVCC_FLAGS = ["-O3", "-DMPK_WITH_CUDA"]
LD_FLAGS = ["-fopenmp"]

JIT_NAME = "mpkernels_ext"
STAMP = "mpkernels_build.json"


class ExtensionBuildError(RuntimeError):
    """The extension cannot be built here (the message says what is missing)."""


def have_sources() -> bool:
    return all(os.path.isfile(os.path.join(CSRC, f)) for f in CPP_SOURCES + CUDA_SOURCES + HEADERS)


def source_hash() -> str:
    """sha256 over the extension's sources and headers (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(CPP_SOURCES + CUDA_SOURCES + HEADERS):
        h.update(f.encode())
        with open(os.path.join(CSRC, f), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:32]


def source_hash_define() -> str:
    """Compiler flag that records the source hash in the module (see bindings.cpp)."""
    return f"-DMPK_SOURCE_HASH=h{source_hash()}"


def visible_gpu_arches() -> list[tuple[int, int]]:
    """Compute capabilities of the visible GPUs (empty without one, or without a CUDA torch)."""
    try:
        import torch

        if torch.version.cuda is None or not torch.cuda.is_available():
            return []
        return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # noqa: BLE001 - no driver, broken install: build the default list
        return []


def gencode_flags(detect_gpu: bool = False) -> list[str]:
    """nvcc -gencode flags, unless TORCH_CUDA_ARCH_LIST is set (then PyTorch derives them).

    With ``detect_gpu`` (an explicit build) and a visible GPU: that GPU's architecture only, plus
    PTX of the newest one. Otherwise :data:`DEFAULT_ARCHES`.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    arches = [(f"{ma}{mi}", False) for ma, mi in (visible_gpu_arches() if detect_gpu else [])]
    if arches:
        arches[-1] = (arches[-1][0], True)
    flags = []
    for cc, ptx in arches or DEFAULT_ARCHES:
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and any(
        os.path.isfile(os.path.join(path, "bin", n)) for n in ("nvcc", "nvcc.exe"))


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with: ``CUDA_HOME`` / ``CUDA_PATH`` when set, else the toolkit
    around the ``nvcc`` on PATH, else ``/usr/local/cuda[-*]``. PyTorch's own guess takes the parent
    of nvcc's directory, which is wrong when ``nvcc`` on PATH is a wrapper script (as on this
    project's machines: ``/usr/local/bin/nvcc`` -> ``/usr/local/cuda-13.0``)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: find the toolkit path it executes
            with open(nvcc, "rb") as fh:
                head = fh.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode(errors="ignore").split():
                    if tok.endswith("/bin/nvcc"):
                        cands.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    cands.append("/usr/local/cuda")
    if os.path.isdir("/usr/local"):
        cands += sorted((os.path.join("/usr/local", d) for d in os.listdir("/usr/local") if d.startswith("cuda-")),
                        reverse=True)
    return next((c for c in cands if _is_toolkit(c)), None)


def _configure_cuda_home() -> None:
    """Point PyTorch's extension builder at :func:`find_cuda_home` (before or after its import)."""
    home = find_cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    mod = sys.modules.get("torch.utils.cpp_extension")
    if home and mod is not None and not _is_toolkit(getattr(mod, "CUDA_HOME", None)):
        mod.CUDA_HOME = home


@functools.lru_cache(maxsize=8)
def toolkit_version(cuda_home: str) -> str | None:
    """``major.minor`` of the CUDA toolkit at ``cuda_home`` (from ``nvcc --version``), or None."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def missing_toolchain() -> list[str]:
    """What is missing to build the CUDA extension here (empty when everything is present).

    A toolkit whose CUDA major version differs from torch's counts as missing: PyTorch refuses to
    build with it, and code from it may not run with torch's CUDA runtime.
    """
    _configure_cuda_home()
    import torch
    from torch.utils import cpp_extension

    missing = []
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of PyTorch (this torch {torch.__version__} is CPU-only)")
    if not _is_toolkit(cpp_extension.CUDA_HOME):
        missing.append("the CUDA toolkit: nvcc and its headers (install it, and set CUDA_HOME or put nvcc on "
                       f"PATH; looked in {cpp_extension.CUDA_HOME or 'no CUDA_HOME'})")
    elif torch.version.cuda is not None:
        have = toolkit_version(cpp_extension.CUDA_HOME)
        if have is None:
            missing.append(f"a working nvcc ({cpp_extension.CUDA_HOME}/bin/nvcc --version failed)")
        elif have.split(".")[0] != torch.version.cuda.split(".")[0]:
            missing.append(f"a CUDA toolkit of torch's major version: torch {torch.__version__} is built with "
                           f"CUDA {torch.version.cuda}, the nvcc in {cpp_extension.CUDA_HOME} is CUDA {have} "
                           "(set CUDA_HOME to a matching toolkit)")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja (pip install ninja)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} not found)")
    return missing


def _tag() -> str:
    import torch

    cuda = (torch.version.cuda or "cpu").replace(".", "")
    torch_v = torch.__version__.split("+")[0]
    return f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_v}-cu{cuda}"


def build_directory() -> str:
    """Directory of just-in-time builds (``MPKERNELS_BUILD_DIR`` or a per-version cache dir)."""
    env = os.environ.get("MPKERNELS_BUILD_DIR")
    if env:
        return os.path.abspath(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.access(os.path.dirname(base) if not os.path.isdir(base) else base, os.W_OK):
        base = tempfile.gettempdir()
    return os.path.join(base, "mpkernels", _tag())


def _build_key() -> dict:
    import torch

    # The architectures are in the key as asked for (TORCH_CUDA_ARCH_LIST), not as detected: a key
    # must be computable at import, which never touches the GPU.
    return {"sources": source_hash(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
            "flags": [CXX_FLAGS, NVCC_FLAGS, LD_FLAGS]}


def _import_from(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_prebuilt():
    """``(module, None)`` for a usable prebuilt extension, else ``(None, reason)``. Compiles nothing."""
    try:
        found = importlib.util.find_spec("mpkernels.cuda._C") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return None, "no prebuilt extension (pip install builds one where nvcc and a CUDA build of torch are present)"
    try:
        from mpkernels.cuda import _C  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"the prebuilt extension does not load ({e})"
    built_from = getattr(_C, "source_hash", "")
    if have_sources() and built_from.lstrip("h") != source_hash():
        return None, ("the prebuilt extension is stale (csrc/ changed since it was built): reinstall "
                      "(pip install -e .) or call mpkernels.cuda.build()")
    return _C, None


def load_cached():
    """``(module, None)`` for an up-to-date just-in-time build, else ``(None, reason)``. Compiles nothing."""
    if not have_sources():
        return None, "no csrc/ sources to build from"
    stamp = os.path.join(build_directory(), STAMP)
    try:
        with open(stamp) as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return None, "no just-in-time build yet (call mpkernels.cuda.build() or mk.set_backend('cuda'))"
    if info.get("key") != _build_key() or not os.path.isfile(info.get("module", "")):
        return None, "the just-in-time build is out of date (call mpkernels.cuda.build())"
    try:
        return _import_from(info["module"], info["name"]), None
    except ImportError as e:
        return None, f"the just-in-time build does not load ({e})"


def build(verbose: bool = False):
    """Compile the extension just in time (ninja, cached in :func:`build_directory`) and import it.

    Raises :class:`ExtensionBuildError` naming what is missing (nvcc, ninja, a CUDA build of
    torch, a C++ compiler) or, when compilation fails, where the compiler's output is.
    """
    if not have_sources():
        raise ExtensionBuildError(f"cannot build the mpkernels extension: its sources are not in {CSRC}")
    missing = missing_toolchain()
    if missing:
        raise ExtensionBuildError("cannot build the mpkernels CUDA extension; missing: " + "; ".join(missing))
    from torch.utils.cpp_extension import load

    build_dir = build_directory()
    os.makedirs(build_dir, exist_ok=True)
    key = _build_key()
    try:
        mod = load(
            name=JIT_NAME,
            sources=[os.path.join(CSRC, f) for f in CPP_SOURCES + CUDA_SOURCES],
            extra_cflags=CXX_FLAGS + [source_hash_define()],
            extra_cuda_cflags=NVCC_FLAGS + gencode_flags(detect_gpu=True),
            extra_ldflags=list(LD_FLAGS),  # load() appends to the list it gets
            extra_include_paths=[CSRC],
            build_directory=build_dir,
            with_cuda=True,
            verbose=verbose,
        )
    except Exception as e:  # compiler errors arrive as RuntimeError / CalledProcessError
        raise ExtensionBuildError(
            f"building the mpkernels extension in {build_dir} failed: {e}\n"
            "(rerun mpkernels.cuda.build(verbose=True) to see the compiler's output)") from e
    info = {"key": key, "module": os.path.abspath(mod.__file__), "name": mod.__name__}
    tmp = os.path.join(build_dir, STAMP + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(info, fh)
    os.replace(tmp, os.path.join(build_dir, STAMP))
    return mod


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def build_mode(env=None) -> str:
    """``'require'`` (MPKERNELS_BUILD_EXT=1 or MPKERNELS_REQUIRE_EXT=1: fail when the extension
    cannot be built), ``'skip'`` (MPKERNELS_BUILD_EXT=0) or ``'auto'`` (build when possible)."""
    env = os.environ if env is None else env
    build = env.get("MPKERNELS_BUILD_EXT", "").strip().lower()
    require = env.get("MPKERNELS_REQUIRE_EXT", "").strip().lower() in _TRUE
    if build in _FALSE:
        if require:
            raise ExtensionBuildError("MPKERNELS_BUILD_EXT=0 skips the extension but MPKERNELS_REQUIRE_EXT=1 "
                                      "requires it: unset one of them")
        return "skip"
    return "require" if build in _TRUE or require else "auto"


def report_skip(reason: str) -> None:
    """Say on stderr (shown by ``pip install -v``) that the install goes on without the extension."""
    print("\n".join([
        "",
        "*" * 78,
        "mpkernels: installing WITHOUT the compiled extension (backend 'cuda'); the reference and",
        f"Triton backends work as usual. Reason: {reason}",
        "Set MPKERNELS_BUILD_EXT=1 to make this an error; mpkernels.cuda.build() builds it later.",
        "*" * 78,
        "",
    ]), file=sys.stderr, flush=True)


def setup_extension():
    """The ``CUDAExtension`` for ``setup.py``, or ``(None, reason)`` when it should be skipped.

    In mode ``'require'`` (see :func:`build_mode`) a missing toolchain raises
    :class:`ExtensionBuildError`; in mode ``'auto'`` the extension is ``optional``: a compile error
    skips it too (see :func:`build_ext_class`).
    """
    mode = build_mode()
    if mode == "skip":
        return None, "MPKERNELS_BUILD_EXT=0"
    try:
        import torch  # noqa: F401
        missing = missing_toolchain()
    except ImportError:
        missing = ["torch (install torch first, then build without build isolation)"]
    except Exception as e:  # noqa: BLE001 - a broken probe must not break the install either
        missing = [f"a working toolchain probe ({type(e).__name__}: {e})"]
    if not have_sources():
        missing.append(f"the csrc/ sources in {CSRC}")
    if missing:
        if mode == "require":
            raise ExtensionBuildError("MPKERNELS_BUILD_EXT=1 or MPKERNELS_REQUIRE_EXT=1, but the extension "
                                      "cannot be built; missing: " + "; ".join(missing))
        return None, "missing " + "; ".join(missing)
    from torch.utils.cpp_extension import CUDAExtension

    rel = os.path.relpath(CSRC, ROOT)
    ext = CUDAExtension(
        name="mpkernels.cuda._C",
        sources=[os.path.join(rel, f) for f in CPP_SOURCES + CUDA_SOURCES],
        include_dirs=[CSRC],
        extra_compile_args={"cxx": CXX_FLAGS + [source_hash_define()],
                            "nvcc": NVCC_FLAGS + gencode_flags(detect_gpu=True)},
        extra_link_args=list(LD_FLAGS),
    )
    ext.optional = mode != "require"
    return ext, None


def build_ext_class():
    """PyTorch's ``BuildExtension`` (ninja) that skips an ``optional`` extension whose build fails,
    whatever the error (PyTorch raises RuntimeError, which setuptools' own ``optional`` handling
    lets through), with the reason on stderr; a required one fails the install as usual."""
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class MpkBuildExtension(base):
        def build_extensions(self):
            try:  # PyTorch's checks before the per-extension builds (compiler ABI, CUDA version) too
                super().build_extensions()
            except Exception as e:  # noqa: BLE001
                if not all(getattr(ext, "optional", False) for ext in self.extensions):
                    raise
                report_skip(f"building it failed: {type(e).__name__}: {str(e)[-2000:]}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any failure: compiler, linker, ninja, version check
                if not getattr(ext, "optional", False):
                    raise
                report_skip(f"building it failed: {type(e).__name__}: {str(e)[-2000:]}")

    return MpkBuildExtension
