"""The compiled extension: it builds and imports, the backend reflects it, and a machine that
cannot build it gets one clear error.

``MPKERNELS_REQUIRE_EXT=1`` turns "cannot build here" into a failure instead of a skip (for CI
machines that are meant to have nvcc).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import mpkernels as mk
import mpkernels.cuda as mc
from mpkernels.cuda import _build

REQUIRE = os.environ.get("MPKERNELS_REQUIRE_EXT", "") == "1"


def _missing():
    try:
        return _build.missing_toolchain()
    except Exception as e:  # noqa: BLE001 - report whatever broke the probe
        return [f"{type(e).__name__}: {e}"]


def test_extension_builds_and_imports():
    """With nvcc, ninja and a CUDA torch present, the extension is (or becomes) importable."""
    missing = _missing()
    if missing and not mc.is_available():
        msg = "the mpkernels extension cannot be built here; missing: " + "; ".join(missing)
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)
    mod = mc.build()  # reuses a prebuilt or cached build; compiles only when there is none
    assert mc.is_available(), mc.status()
    assert mc.status().startswith("loaded"), mc.status()
    assert "cuda" in mk.available_backends()
    assert "mpkernels.cuda" not in mk._backends.load_errors()
    assert mod.with_cuda, "built without the CUDA kernels"
    assert mod.cpu_isa() in ("default", "avx2", "avx512")
    if _build.have_sources():
        assert mod.source_hash.lstrip("h") == _build.source_hash(), "the loaded module is not built from csrc/"


def test_import_is_cheap_and_never_builds(tmp_path):
    """Importing mpkernels with no build anywhere compiles nothing and reports why 'cuda' is missing."""
    code = textwrap.dedent("""
        import time, sys
        t = time.time()
        import mpkernels as mk, mpkernels.cuda as mc
        dt = time.time() - t
        assert not mc.is_available() or mc._SOURCE == 'prebuilt', mc.status()
        print(dt, mc.status(), mk.available_backends())
    """)
    env = dict(os.environ, MPKERNELS_BUILD_DIR=str(tmp_path / "empty"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir()), "import compiled something"
    if "not loaded" in out.stdout:
        assert "mpkernels.cuda.build()" in out.stdout or "set_backend('cuda')" in out.stdout


def test_availability_follows_a_later_build():
    """available_backends() is cached per process; loading the extension later refreshes it."""
    if not mc.is_available():
        pytest.skip("extension unavailable: " + mc.status())
    saved = (mc._EXT, mc._SOURCE)
    try:
        mc._EXT = None
        mk._dispatch.refresh_availability()
        assert "cuda" not in mk.available_backends()
        mc._activate(*saved)  # what build() does once it has a module
        assert "cuda" in mk.available_backends()
        mk.set_backend("cuda")
    finally:
        mc._EXT, mc._SOURCE = saved
        mk._dispatch.refresh_availability()


def test_missing_toolchain_gives_one_clear_error(monkeypatch):
    monkeypatch.setattr(_build, "missing_toolchain", lambda: ["nvcc, the CUDA compiler", "ninja (pip install ninja)"])
    with pytest.raises(_build.ExtensionBuildError, match=r"missing: nvcc, the CUDA compiler; ninja"):
        _build.build()


def test_setup_extension_switch(monkeypatch):
    monkeypatch.setattr(_build, "missing_toolchain", lambda: ["nvcc"])
    monkeypatch.delenv("MPKERNELS_REQUIRE_EXT", raising=False)  # CI sets it
    monkeypatch.setenv("MPKERNELS_BUILD_EXT", "0")
    assert _build.setup_extension() == (None, "MPKERNELS_BUILD_EXT=0")
    monkeypatch.delenv("MPKERNELS_BUILD_EXT")
    ext, reason = _build.setup_extension()
    assert ext is None and "nvcc" in reason
    monkeypatch.setenv("MPKERNELS_BUILD_EXT", "1")
    with pytest.raises(_build.ExtensionBuildError, match="MPKERNELS_BUILD_EXT=1"):
        _build.setup_extension()


def test_setup_extension_describes_the_build(monkeypatch):
    if _build.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit here to describe a CUDAExtension with")
    _build._configure_cuda_home()
    monkeypatch.setattr(_build, "missing_toolchain", lambda: [])
    monkeypatch.delenv("MPKERNELS_BUILD_EXT", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    ext, reason = _build.setup_extension()
    assert reason is None and ext.name == "mpkernels.cuda._C"
    assert sorted(os.path.basename(s) for s in ext.sources) == sorted(_build.CPP_SOURCES + _build.CUDA_SOURCES)
    nvcc = " ".join(ext.extra_compile_args["nvcc"])
    for cc in ("80", "86", "89", "90"):
        assert f"code=sm_{cc}" in nvcc
    assert "code=compute_90" in nvcc  # PTX for newer GPUs


def test_every_csrc_file_is_in_the_build_lists():
    """A source or header missing from _build's lists would be left out of the source hash (a stale
    extension would pass for current) and, for a source, out of the build."""
    listed = _build.CPP_SOURCES + _build.CUDA_SOURCES + _build.HEADERS
    assert len(set(listed)) == len(listed), "a file is listed twice"
    on_disk = {f for f in os.listdir(_build.CSRC) if f.endswith((".cpp", ".cu", ".h", ".cuh"))}
    assert on_disk == set(listed), (f"not listed: {sorted(on_disk - set(listed))}; "
                                    f"listed, not on disk: {sorted(set(listed) - on_disk)}")
    assert _build.have_sources()


def test_cuda_home_behind_a_wrapper_script(tmp_path, monkeypatch):
    """nvcc on PATH may be a wrapper script (as on this project's machines): find the real toolkit."""
    kit = tmp_path / "cuda-99.0"
    (kit / "bin").mkdir(parents=True)
    (kit / "include").mkdir()
    (kit / "include" / "cuda_runtime.h").write_text("")
    (kit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (kit / "bin" / "nvcc").chmod(0o755)
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    (wrapper_dir / "nvcc").write_text(f'#!/bin/sh\nexec {kit}/bin/nvcc "$@"\n')
    (wrapper_dir / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert _build.find_cuda_home() == str(kit)


@pytest.mark.slow
def test_clean_build_from_a_copy_of_the_sources(tmp_path):
    """A from-scratch just-in-time build of a copy of the sources (one GPU arch, to bound the time)."""
    missing = _missing()
    if missing:
        msg = "cannot build here; missing: " + "; ".join(missing)
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    clone = tmp_path / "clone"
    shutil.copytree(os.path.join(root, "csrc"), clone / "csrc")
    shutil.copytree(os.path.join(root, "mpkernels"), clone / "mpkernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, MPKERNELS_BUILD_DIR=str(tmp_path / "build"), TORCH_CUDA_ARCH_LIST="8.0",
               MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    code = ("import mpkernels.cuda as mc, torch; mc.build(); assert mc.is_available(), mc.status(); "
            "x = torch.randn(2, 3, 4, 4); import mpkernels as mk; "
            "mk.set_backend('cuda', strict=True); print(mk.pixel_norm(x).shape, mc.status())")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(clone), capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded (jit" in out.stdout
    assert str(torch.Size([2, 3, 4, 4])) in out.stdout


# ------------------------------------------------------------------------------------------------
# The install never fails because of the extension (unless asked to): decisions with faked inputs


def _fake_toolchain(monkeypatch, tmp_path, torch_cuda="13.0", toolkit="13.0", nvcc=True):
    """A fake CUDA toolkit (nvcc reporting `toolkit`) and a torch built with `torch_cuda`."""
    from torch.utils import cpp_extension

    kit = tmp_path / "cuda"
    (kit / "include").mkdir(parents=True)
    (kit / "include" / "cuda_runtime.h").write_text("")
    (kit / "bin").mkdir()
    if nvcc:
        (kit / "bin" / "nvcc").write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {toolkit}, V{toolkit}.1'\n")
        (kit / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(kit))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(kit))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.delenv("MPKERNELS_BUILD_EXT", raising=False)
    monkeypatch.delenv("MPKERNELS_REQUIRE_EXT", raising=False)
    _build.toolkit_version.cache_clear()
    return kit


def test_toolkit_major_version_mismatch_skips_the_extension(monkeypatch, tmp_path):
    """torch built with CUDA 12.x and nvcc 13.0: skip (PyTorch would refuse to build), naming both."""
    _fake_toolchain(monkeypatch, tmp_path, torch_cuda="12.8", toolkit="13.0")
    missing = _build.missing_toolchain()
    assert len(missing) == 1 and "CUDA 12.8" in missing[0] and "CUDA 13.0" in missing[0], missing
    ext, reason = _build.setup_extension()
    assert ext is None and "CUDA 12.8" in reason
    for var in ("MPKERNELS_BUILD_EXT", "MPKERNELS_REQUIRE_EXT"):
        monkeypatch.setenv(var, "1")
        with pytest.raises(_build.ExtensionBuildError, match="cannot be built; missing: .*CUDA 12.8"):
            _build.setup_extension()
        monkeypatch.delenv(var)
    _build.toolkit_version.cache_clear()


def test_same_major_version_builds(monkeypatch, tmp_path):
    """A minor-version difference is fine (PyTorch only warns); the extension is optional by default."""
    _fake_toolchain(monkeypatch, tmp_path, torch_cuda="13.1", toolkit="13.0")
    assert _build.missing_toolchain() == []
    monkeypatch.setattr(_build, "visible_gpu_arches", lambda: [])
    ext, reason = _build.setup_extension()
    assert reason is None and ext.optional
    monkeypatch.setenv("MPKERNELS_REQUIRE_EXT", "1")
    ext, _ = _build.setup_extension()
    assert not ext.optional  # CI: a compile error must fail the install
    _build.toolkit_version.cache_clear()


def test_missing_nvcc_skips_the_extension(monkeypatch, tmp_path):
    _fake_toolchain(monkeypatch, tmp_path, nvcc=False)
    monkeypatch.setattr(_build, "find_cuda_home", lambda: None)
    ext, reason = _build.setup_extension()
    assert ext is None and "nvcc" in reason
    monkeypatch.setenv("MPKERNELS_BUILD_EXT", "1")
    with pytest.raises(_build.ExtensionBuildError, match="nvcc"):
        _build.setup_extension()
    _build.toolkit_version.cache_clear()


def test_build_modes(monkeypatch):
    assert _build.build_mode({}) == "auto"
    assert _build.build_mode({"MPKERNELS_BUILD_EXT": "0"}) == "skip"
    assert _build.build_mode({"MPKERNELS_BUILD_EXT": "1"}) == "require"
    assert _build.build_mode({"MPKERNELS_REQUIRE_EXT": "1"}) == "require"
    with pytest.raises(_build.ExtensionBuildError, match="unset one of them"):
        _build.build_mode({"MPKERNELS_BUILD_EXT": "0", "MPKERNELS_REQUIRE_EXT": "1"})


def test_a_compile_error_skips_an_optional_extension(monkeypatch, capsys):
    """Any build failure of the optional extension (PyTorch raises RuntimeError, which setuptools'
    own `optional` handling does not catch) ends the build step normally, with the reason on
    stderr; a required extension fails the install."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    def broken(self, ext):
        raise RuntimeError("Error compiling objects for extension")

    monkeypatch.setattr(BuildExtension, "build_extension", broken)
    ext = CppExtension("mpkernels.cuda._C", ["csrc/bindings.cpp"])
    cmd = _build.build_ext_class()(Distribution({"name": "mpkernels", "ext_modules": [ext]}))
    ext.optional = True
    cmd.build_extension(ext)  # no exception
    err = capsys.readouterr().err
    assert "WITHOUT the compiled extension" in err and "Error compiling objects" in err
    ext.optional = False
    with pytest.raises(RuntimeError, match="Error compiling objects"):
        cmd.build_extension(ext)


def test_a_failing_toolchain_check_skips_an_optional_extension(monkeypatch, capsys):
    """PyTorch's checks before the builds (e.g. its CUDA version check) skip it as well."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    def refuse(self):
        raise RuntimeError("The detected CUDA version (12.4) mismatches the version that was used to compile PyTorch")

    monkeypatch.setattr(BuildExtension, "build_extensions", refuse)
    ext = CppExtension("mpkernels.cuda._C", ["csrc/bindings.cpp"])
    cmd = _build.build_ext_class()(Distribution({"name": "mpkernels", "ext_modules": [ext]}))
    cmd.extensions = [ext]
    ext.optional = True
    cmd.build_extensions()
    assert "detected CUDA version" in capsys.readouterr().err
    ext.optional = False
    with pytest.raises(RuntimeError, match="detected CUDA version"):
        cmd.build_extensions()


def test_builds_for_the_visible_gpu_only(monkeypatch):
    """An explicit build targets the GPU that is there (and PTX of it); TORCH_CUDA_ARCH_LIST wins."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_build, "visible_gpu_arches", lambda: [(9, 0)])
    assert _build.gencode_flags(detect_gpu=True) == ["-gencode=arch=compute_90,code=sm_90",
                                                     "-gencode=arch=compute_90,code=compute_90"]
    assert len(_build.gencode_flags()) == 5  # import-time key: never asks the GPU
    monkeypatch.setattr(_build, "visible_gpu_arches", lambda: [])
    assert "-gencode=arch=compute_80,code=sm_80" in _build.gencode_flags(detect_gpu=True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert _build.gencode_flags(detect_gpu=True) == []  # PyTorch derives the flags from the variable
