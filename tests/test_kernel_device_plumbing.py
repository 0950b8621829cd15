"""The kernel tests' device choice (``conftest.kernel_device``), simulated without a GPU.

``MPKERNELS_TEST_DEVICE=cuda`` is what a GPU machine gets by default: the Triton tests must then
build CUDA tensors and must not quietly skip when the backend cannot run. On this machine that
means a loud failure at collection; on a GPU machine the same run collects normally.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import KERNEL_DEVICE, kernel_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pytest(*args: str, device: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPKERNELS_TEST_DEVICE=device)
    env.pop("TRITON_INTERPRET", None)  # conftest decides, as in a fresh run
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_default_device_follows_the_machine():
    if "MPKERNELS_TEST_DEVICE" not in os.environ:
        assert KERNEL_DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    assert kernel_device() == torch.device(KERNEL_DEVICE)


def test_cuda_device_never_skips_the_triton_tests():
    proc = _pytest("--collect-only", "tests/test_triton_validation.py", device="cuda")
    out = proc.stdout + proc.stderr
    if torch.cuda.is_available():
        assert proc.returncode == 0, out[-3000:]
    else:
        assert proc.returncode != 0 and "skipped" not in out.splitlines()[-1], out[-3000:]
        assert "backend 'triton' not available" in out, out[-3000:]


def test_bad_device_name_is_refused():
    proc = _pytest("--collect-only", "tests/test_triton_interpreter_compat.py", device="tpu")
    assert proc.returncode != 0
    assert "MPKERNELS_TEST_DEVICE must be 'cpu' or 'cuda'" in proc.stdout + proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="forcing cpu only differs from the default on a GPU")
def test_cpu_device_runs_the_interpreter_on_a_gpu_machine():
    proc = _pytest("tests/test_triton_ops.py", "-k", "test_mp_silu and 1x3x1x1 and float32", device="cpu")
    assert proc.returncode == 0 and "1 passed" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
