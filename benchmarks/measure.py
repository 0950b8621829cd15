"""Timers, device bandwidth and peak-memory helpers, and the machine description.

GPU timings use ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs)
when Triton is importable, else CUDA events directly; CPU timings use
``time.perf_counter`` over repeated runs after warm-up. Both report the median and
the 20th/80th percentiles in milliseconds.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def timeit(fn, device: torch.device, *, min_time: float = 0.2, max_reps: int = 200, warmup: int = 2) -> dict:
    """Median and spread (ms) of ``fn()``; ``fn`` must synchronize nothing itself."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            q = do_bench(fn, warmup=25, rep=max(25, int(min_time * 1000)), quantiles=[0.5, 0.2, 0.8])
            return {"median_ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2])}
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Measured device copy bandwidth: ``dst.copy_(src)`` moves 2 x nbytes (read + write)."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, min_time=0.5)
    gbs = 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9
    return {"bytes": nbytes, "median_ms": t["median_ms"], "GB_per_s": gbs}


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured dense matmul throughput, the peak used for model FLOPs utilization."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timeit(lambda: a @ b, device, min_time=0.5)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_ms": t["median_ms"],
            "TFLOP_per_s": 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e12}


class PeakMemory:
    """Peak device memory (bytes) allocated inside the ``with`` block, above what was allocated before."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        return False


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks"] + sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # not installed
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2 ** 30, 1),
                    compute_capability=f"{p.major}.{p.minor}", driver=_driver_version(),
                    cudnn=torch.backends.cudnn.version())
    else:
        info["gpu"] = None
    info["triton_interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    return info


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None
