"""Shared helpers of the Triton backend: layouts, launch configurations, dtype names.

Every launcher picks its kernel configuration (block sizes, flags, ``num_warps``) from a
finite table declared next to its kernel and registered here with :func:`declare_configs`,
so :func:`all_configs` lists exactly what can ever be launched; the AOT test compiles
each entry for sm_80 and sm_90, plus the JIT specialisations real EDM2 launches give them
(recorded through :func:`launch`), and checks ``ptxas`` for register spills and the shared
memory against each architecture's per-block limit.

Nothing here touches a GPU at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterable

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --- layouts ---------------------------------------------------------------------------------

from .._library import is_dense  # noqa: E402  (non-overlapping and dense: fills [data_ptr, data_ptr + numel))


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dim of size > 1 (size-1 strides do not matter)."""
    if a.shape != b.shape:
        return False
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when dense (any order of dims), else a contiguous copy."""
    return t if is_dense(t) else t.contiguous()


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in the memory layout of the dense tensor ``ref`` (a copy only when layouts differ)."""
    if same_layout(t, ref):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def empty_like_dense(ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor with ``ref``'s shape and (dense) strides."""
    return torch.empty_strided(ref.shape, ref.stride(), dtype=dtype or ref.dtype, device=ref.device)


def memory_order(t: torch.Tensor) -> list[int]:
    """Dims of a dense ``t`` from outermost to innermost in memory: ``t.permute(order)`` is contiguous."""
    order = sorted(range(t.ndim), key=lambda d: (-t.stride(d), d))
    if not t.permute(order).is_contiguous():  # size-1 dims with odd strides: fall back to a logical order
        order = list(range(t.ndim))
    return order


# --- launch configurations -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One compiled variant a launcher may use: a kernel, its constexprs, warps and stages,
    plus the Triton signature (argument types) it is launched with."""
    kernel: object  # the @triton.jit function
    signature: tuple[tuple[str, str], ...]  # (arg name, type) for every argument, 'constexpr' for constexprs
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int = 4
    num_stages: int = 3
    # JIT specializations this configuration can run as: 'generic' (no divisibility facts) and/or
    # 'aligned' (16-byte aligned pointers, integers divisible by 16). Launchers that pick tiles
    # by alignment declare only the one their condition guarantees.
    variants: tuple[str, ...] = ("generic", "aligned")

    @property
    def maxnreg(self) -> int:
        """Register cap passed to ptxas: all a thread may have at this block size (no tighter).

        Without it ptxas may choose fewer registers to fit more blocks per SM and spill to
        local memory to get there; with it the kernel still launches at any occupancy."""
        return min(255, 65536 // (32 * self.num_warps))

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        ptrs = ",".join(t for _, t in self.signature if t.startswith("*"))
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{getattr(fn, '__name__', '?')}[{ptrs}][{consts}]w{self.num_warps}s{self.num_stages}"


def kernel_arg_names(kernel) -> list[str]:
    names = getattr(kernel, "arg_names", None)
    if names is None:  # interpreted function
        import inspect
        names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    return list(names)


def make_config(kernel, *, ptrs: dict[str, torch.dtype | str], constexprs: dict, floats: Iterable[str] = (),
                ints64: Iterable[str] = (), num_warps: int = 4, num_stages: int = 3,
                variants: tuple[str, ...] = ("generic", "aligned")) -> LaunchConfig:
    """Build a :class:`LaunchConfig`; arguments not named are 32-bit integers."""
    floats, ints64 = set(floats), set(ints64)
    sig = []
    for a in kernel_arg_names(kernel):
        if a in constexprs:
            sig.append((a, "constexpr"))
        elif a in ptrs:
            d = ptrs[a]
            sig.append((a, "*" + (d if isinstance(d, str) else TRITON_DTYPE_NAMES[d])))
        elif a in floats:
            sig.append((a, "fp32"))
        elif a in ints64:
            sig.append((a, "i64"))
        else:
            sig.append((a, "i32"))
    return LaunchConfig(kernel, tuple(sig), tuple(constexprs.items()), num_warps, num_stages, tuple(variants))


_CONFIG_SOURCES: list[Callable[[], Iterable[LaunchConfig]]] = []


def declare_configs(fn: Callable[[], Iterable[LaunchConfig]]):
    """Register a function listing every configuration an op's launchers can pick."""
    _CONFIG_SOURCES.append(fn)
    return fn


def all_configs() -> list[LaunchConfig]:
    """Every kernel configuration the Triton backend can launch (deduplicated)."""
    seen, out = set(), []
    for src in _CONFIG_SOURCES:
        for cfg in src():
            key = (id(cfg.kernel), cfg.signature, cfg.constexprs, cfg.num_warps, cfg.num_stages, cfg.variants)
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out


def launch(cfg: LaunchConfig, grid, *args, **kwargs) -> None:
    """Launch ``cfg.kernel`` on ``grid`` with its constexprs, warps and stages."""
    with device_of(args):
        cfg.kernel[grid](*args, **dict(cfg.constexprs), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                         maxnreg=cfg.maxnreg, **kwargs)


@contextlib.contextmanager
def _nothing():
    yield


def device_of(args):
    """Make the tensors' CUDA device current for the launch (no-op on CPU / in the interpreter)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.device.type == "cuda" and a.device.index is not None and a.device.index != torch.cuda.current_device():
                return torch.cuda.device(a.device)
            break
    return _nothing()


def supported_dtype(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in DTYPES for t in tensors)
