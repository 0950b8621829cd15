"""Installs ``mpkernels`` (kernels) and ``edm2fast`` (model and trainer, from ``python/``).

The optional CUDA extension is described in ``csrc/`` and built by the CUDA backend's
build logic (see README, "CUDA extension").
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup


def _extension_kwargs() -> dict:
    """The compiled extension (``csrc/``, module ``mpkernels.cuda._C``) when it can be built.

    Never fails the install by default: a missing or mismatched toolchain (nvcc whose CUDA major
    version differs from torch's, no ninja, a CPU-only torch) or a compile error skips the
    extension, with the reason on stderr (``pip install -v`` shows it). ``MPKERNELS_BUILD_EXT=1``
    or ``MPKERNELS_REQUIRE_EXT=1`` make that an error, ``MPKERNELS_BUILD_EXT=0`` skips it. Without
    it, ``mpkernels.cuda.build()`` compiles it just in time. The logic lives in
    ``mpkernels/cuda/_build.py`` (loaded by path here).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpkernels", "cuda", "_build.py")
    spec = importlib.util.spec_from_file_location("_mpkernels_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ext, reason = build.setup_extension()
    if ext is None:
        build.report_skip(reason)
        return {}
    return {"ext_modules": [ext], "cmdclass": {"build_ext": build.build_ext_class()}}


def _torchvision_requirement() -> str:
    """torchvision (needed by timm and torch-fidelity) pins one torch release: torch 2.M.x goes with
    torchvision 0.(M+15).x. Asking for that series keeps pip from replacing an installed torch."""
    try:
        from importlib.metadata import version

        major, minor = (int(p) for p in version("torch").split(".")[:2])
    except Exception:  # torch not installed yet, or an unusual version string
        return "torchvision"
    return f"torchvision>=0.{minor + 15},<0.{minor + 16}" if major == 2 else "torchvision"


install_requires = ["torch>=2.4", "numpy", "safetensors", "Pillow"]  # io.load and generate need the last two
if sys.platform.startswith("linux"):
    install_requires.append("triton")

extras = {
    # cuobjdump: tests/test_cuda_codegen.py reads the SASS of the CUDA kernels
    # (cuobjdump -sass runs nvdisasm, a separate wheel)
    "test": ["pytest", "pytest-benchmark", "hypothesis", "nvidia-cuda-cuobjdump>=13,<14; sys_platform == 'linux'",
             "nvidia-cuda-nvdisasm>=13,<14; sys_platform == 'linux'"],
    "train": ["tqdm", "matplotlib", "scikit-learn"],
    "latent": ["diffusers>=0.20", "huggingface_hub"],  # sd-vae-ft-mse for the img512 models (edm2fast.vae)
    # FID (torch-fidelity's TF-compatible Inception) and FD_DINOv2 (timm) for edm2fast.metrics
    "metrics": ["scipy", "torch-fidelity>=0.3", "timm>=1.0", _torchvision_requirement()],
}
extras["all"] = sorted({r for rs in extras.values() for r in rs} | {"ninja"})

setup(
    name="mpkernels",
    version="0.1.0",
    description="Fused kernels and a fast, faithful implementation of EDM2 (Karras et al. 2024)",
    packages=find_packages(include=["mpkernels", "mpkernels.*"]) + find_packages("python"),
    package_dir={"edm2fast": "python/edm2fast"},
    python_requires=">=3.9",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["edm2fast=edm2fast.cli:main"]},
    **_extension_kwargs(),
)
