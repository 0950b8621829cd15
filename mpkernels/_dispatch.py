"""One registry that maps (op, backend) to an implementation.

Every public op in :mod:`mpkernels` validates its arguments and then calls
:func:`dispatch`, which picks the implementation for the active backend:

* ``'reference'``: the pure-PyTorch oracle (:mod:`mpkernels.reference`).
* ``'triton'`` / ``'cuda'`` / ...: registered by later modules with
  :func:`register`; a backend may implement any subset of the ops.
* ``'auto'`` (default): for the device of the op's tensors, the registered
  backend with the highest priority that implements the op and accepts the
  arguments.

An explicitly chosen backend that does not implement an op, or that cannot
handle particular arguments (a device it does not run on, float64, ...),
falls back to the reference for that call. ``strict=True`` in
:func:`set_backend` / :func:`use_backend` turns that fallback into an error,
which the parity tests use to make sure a fast path really ran.

The active backend is read from plain module state so that ``torch.compile``
traces through the choice (it is resolved at trace time).

Eager calls look up their candidate implementations in a cache keyed by (op, backend
setting, device type); only the candidates' ``supports`` predicates run per call. Any change
to the registry (``register``, ``register_backend``, ``refresh_availability``, or editing
the registry dicts directly) empties the cache; the backend setting is part of the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterator

import torch

__all__ = [
    "register_backend",
    "register",
    "available_backends",
    "registered_backends",
    "set_backend",
    "get_backend",
    "use_backend",
    "implementation",
    "dispatch",
    "BackendUnavailableError",
]


class BackendUnavailableError(RuntimeError):
    """Raised in strict mode when the chosen backend cannot run an op."""


@dataclasses.dataclass
class _Backend:
    name: str
    priority: int  # higher wins under 'auto'
    is_available: Callable[[], bool]
    description: str = ""
    auto_devices: tuple[str, ...] | None = None  # device types 'auto' may pick it for (None = any)
    prepare: Callable[[], None] | None = None  # explicit set_backend() calls it when not yet available


@dataclasses.dataclass
class _Impl:
    fn: Callable
    devices: tuple[str, ...] | None  # device types it runs on, e.g. ('cuda',); None = any
    supports: Callable[..., bool] | None  # optional finer predicate on the call's args


class _Registry(dict):
    """A dict that empties the candidate cache whenever it changes (tests edit it directly)."""

    def _changed(self):
        _CANDIDATES.clear()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def pop(self, *args):
        out = super().pop(*args)
        self._changed()
        return out

    def popitem(self):
        out = super().popitem()
        self._changed()
        return out

    def setdefault(self, key, default=None):
        out = super().setdefault(key, default)
        self._changed()
        return out

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def clear(self):
        super().clear()
        self._changed()


_BACKENDS: dict[str, _Backend] = _Registry()
_IMPLS: dict[tuple[str, str], _Impl] = _Registry()
# (op, backend setting, device type) -> ((backend, impl), ...) to try in order; see implementation()
_CANDIDATES: dict[tuple[str, str, str], tuple[tuple[str, _Impl], ...]] = {}


class _State:
    backend: str = "auto"
    strict: bool = False
    simulate: str | None = None  # device type that meta tensors stand in for (see simulate())


_STATE = _State()
_AVAILABLE: list[str] | None = None  # cache: availability never changes within a process


def register_backend(name: str, *, priority: int, is_available: Callable[[], bool] = lambda: True,
                     description: str = "", auto_devices=None, prepare: Callable[[], None] | None = None) -> None:
    """Declare a backend. ``is_available`` must be cheap and must not initialise a GPU.

    ``auto_devices``: device types for which ``'auto'`` may choose this backend (None: any
    device it has implementations for). The Triton backend, for example, runs on CPU
    tensors under ``TRITON_INTERPRET=1`` for testing, but 'auto' never picks it there.
    """
    if name == "auto":
        raise ValueError("backend name 'auto' is reserved")
    global _AVAILABLE
    _BACKENDS[name] = _Backend(name, priority, is_available, description,
                               None if auto_devices is None else tuple(auto_devices), prepare)
    _AVAILABLE = None
    _CANDIDATES.clear()


def register(op: str, backend: str, fn: Callable | None = None, *, devices=("cuda",),
             supports: Callable[..., bool] | None = None):
    """Register ``fn`` as the implementation of ``op`` on ``backend``.

    ``fn`` receives exactly the arguments of the public op (already validated).
    Usable as a decorator: ``@register('mp_silu', 'triton')``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not declared; call register_backend first")

    def deco(f: Callable) -> Callable:
        _IMPLS[(op, backend)] = _Impl(f, None if devices is None else tuple(devices), supports)
        return f

    return deco(fn) if fn is not None else deco


def registered_backends() -> list[str]:
    """All declared backends, available or not, highest priority first."""
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def _available() -> list[str]:
    global _AVAILABLE
    if _AVAILABLE is None:
        out = []
        for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
            try:
                ok = b.is_available()
            except Exception:  # an optional dependency that fails to load is simply unavailable
                ok = False
            if ok:
                out.append(b.name)
        _AVAILABLE = out
    return _AVAILABLE


def available_backends() -> list[str]:
    """Backends usable in this process, highest priority first (always includes 'reference')."""
    return list(_available())


def refresh_availability() -> None:
    """Forget the cached availability (call after building an extension at run time)."""
    global _AVAILABLE
    _AVAILABLE = None
    _CANDIDATES.clear()


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    name = name.strip().lower()
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; choose 'auto' or one of {registered_backends()}")
    if name != "auto" and name not in _available() and _BACKENDS[name].prepare is not None:
        _BACKENDS[name].prepare()
        refresh_availability()
    if name != "auto" and name not in _available():
        raise ValueError(f"backend: {name!r} is not available in this process; available: {available_backends()}")
    return name


def set_backend(name: str, *, strict: bool = False) -> None:
    """Choose the backend for all subsequent calls (``'auto'``, ``'reference'``, ``'triton'``, ``'cuda'``)."""
    _STATE.backend = _check_name(name)
    _STATE.strict = bool(strict)


def get_backend() -> str:
    return _STATE.backend


@contextlib.contextmanager
def use_backend(name: str, *, strict: bool = False) -> Iterator[None]:
    """Scoped :func:`set_backend`; restores the previous choice on exit."""
    prev = (_STATE.backend, _STATE.strict)
    set_backend(name, strict=strict)
    try:
        yield
    finally:
        _STATE.backend, _STATE.strict = prev


def _device_type(args, kwargs) -> str:
    if args and isinstance(args[0], torch.Tensor):  # the common case: the op's first argument
        a = args[0]
        if a.is_cuda:  # cheaper than building a torch.device
            return "cuda"
        if a.is_cpu:
            return "cpu"
        t = a.device.type
        return _STATE.simulate if t == "meta" and _STATE.simulate else t
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            a = a[0]
        if isinstance(a, torch.Tensor):
            t = a.device.type
            return _STATE.simulate if t == "meta" and _STATE.simulate else t
    return "cpu"


@contextlib.contextmanager
def simulate(backend: str, device_type: str = "cuda") -> Iterator[None]:
    """Route ops on *meta* tensors to ``backend`` as if they lived on ``device_type``.

    For launch and traffic accounting without the hardware: a backend's custom ops run
    their fake (meta) functions, so a whole training step can be traced on the meta
    device with the ops the backend would launch on a GPU. The backend only has to be
    registered, not available. Never use this for real computation.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; registered: {registered_backends()}")
    prev = (_STATE.backend, _STATE.strict, _STATE.simulate)
    _STATE.backend, _STATE.strict, _STATE.simulate = backend, False, device_type
    try:
        yield
    finally:
        _STATE.backend, _STATE.strict, _STATE.simulate = prev


def _candidates(op: str, name: str, device: str) -> tuple[tuple[str, _Impl], ...]:
    """The (backend, impl) pairs that may serve ``op`` on ``device`` under backend setting ``name``,
    in the order they are tried; their ``supports`` predicates decide per call."""
    def runs_here(impl):
        return impl is not None and (impl.devices is None or device in impl.devices)

    if name != "auto":
        impl = _IMPLS.get((op, name))
        return ((name, impl),) if runs_here(impl) else ()
    out = []
    for b in _available():
        auto_devices = _BACKENDS[b].auto_devices
        impl = _IMPLS.get((op, b))
        if (auto_devices is None or device in auto_devices) and runs_here(impl):
            out.append((b, impl))
    return tuple(out)


def implementation(op: str, args=(), kwargs=None, backend: str | None = None) -> tuple[str, Callable]:
    """Return ``(backend_name, fn)`` that :func:`dispatch` would call."""
    kwargs = kwargs or {}
    name = _STATE.backend if backend is None else backend
    device = _device_type(args, kwargs)
    if torch.compiler.is_compiling():  # resolved at trace time; no cache mutation inside a trace
        cands = _candidates(op, name, device)
    else:
        key = (op, name, device)
        cands = _CANDIDATES.get(key)
        if cands is None:
            cands = _CANDIDATES[key] = _candidates(op, name, device)
    for b, impl in cands:
        if impl.supports is None or impl.supports(*args, **kwargs):
            return b, impl.fn
    if name == "auto":
        raise LookupError(f"no implementation of {op!r} for device {device!r}")  # reference covers all
    if _STATE.strict and name != "reference":
        raise BackendUnavailableError(
            f"backend {name!r} cannot run {op!r} for these arguments (device {device!r}); strict mode forbids "
            "falling back to the reference")
    return "reference", _IMPLS[(op, "reference")].fn


def dispatch(op: str, *args, **kwargs):
    return implementation(op, args, kwargs)[1](*args, **kwargs)


def _initial_backend() -> None:
    env = os.environ.get("MPKERNELS_BACKEND", "").strip()
    if env:
        try:
            set_backend(env)
        except ValueError as e:
            raise ValueError(f"MPKERNELS_BACKEND={env!r}: {e}") from None
