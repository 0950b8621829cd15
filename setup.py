"""Installs ``mpkernels`` (kernels) and ``edm2fast`` (model and trainer, from ``python/``).

The optional CUDA extension is described in ``csrc/`` and built by the CUDA backend's
build logic (see README, "CUDA extension").
"""

import sys

from setuptools import find_packages, setup

install_requires = ["torch>=2.4", "numpy", "safetensors", "Pillow"]  # io.load and generate need the last two
if sys.platform.startswith("linux"):
    install_requires.append("triton")

extras = {
    "test": ["pytest", "pytest-benchmark", "hypothesis"],
    "train": ["tqdm", "matplotlib", "scikit-learn"],
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
)
