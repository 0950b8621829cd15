"""Snapshot and checkpoint files: safetensors, written atomically, read without unpickling.

Snapshots (:func:`save`, :func:`load`) hold one network (a :class:`~edm2fast.networks.Precond`):
its state dict (floating parameters in fp16 by default, buffers in fp32) and, as safetensors
metadata (JSON strings), the constructor kwargs that rebuild it plus whatever the caller
records. The trainer and ``edm2fast phema`` use these metadata keys:

    ``preset`` (str), ``nimg`` (images seen, int), ``sigma_rel`` (float), ``dataset`` (str)

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`, or :func:`save_state` /
:func:`load_state` for nested structures such as optimizer state dicts) hold a flat
``{name: tensor}`` dict plus a JSON metadata dict.

Every file is written through :func:`atomic_path`: a temporary file in the destination's
folder, flushed and fsynced, then ``os.replace``-d over the destination, so a crash or a
kill at any moment leaves either the old file or the new one, never a torn one.
Nothing here calls :mod:`pickle`: the authors' pickles and ``training-state-*.pt`` files are
read by :mod:`edm2fast.convert` (a restricted unpickler; no code from the file runs), which
returns plain kwargs and tensors that :func:`load` / :func:`load_official_pickle` build into
a network. ``convert`` never imports this module (no import cycle).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import secrets
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import convert as _foreign

__all__ = [
    "save", "load", "load_official_pickle", "read_metadata", "save_state_dict", "load_state_dict",
    "build_net", "init_kwargs",
    "save_checkpoint", "load_checkpoint", "save_state", "load_state", "flatten_state", "unflatten_state",
    "rng_state", "set_rng_state",
    "atomic_path", "atomic_write", "atomic_open", "remove_stale_temp_files",
    "SNAPSHOT_FORMAT", "CHECKPOINT_FORMAT",
]

SNAPSHOT_FORMAT = "edm2fast.snapshot"
CHECKPOINT_FORMAT = "edm2fast.checkpoint"
FORMAT_VERSION = "1"

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


# ----------------------------------------------------------------------------------------------
# Atomic writes

def _tmp_name(path: str) -> str:
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on normal exit it becomes ``path`` atomically.

    The body writes the whole file to the yielded path (by name: safetensors, zipfile,
    Pillow, ...). It is then fsynced and ``os.replace``-d over ``path`` and the folder is
    fsynced. If the body raises, the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: folder {directory} does not exist")
    tmp = _tmp_name(path)
    # Create it ourselves so the final file gets the usual umask permissions (mkstemp uses 0600).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync_path(tmp)
        # Writers that replace the file themselves (safetensors) leave 0600: restore the umask default.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_path(directory, directory=True)


def atomic_write(path, write_fn: Callable[[str], Any]) -> None:
    """``write_fn(tmp_path)`` writes the file; it then replaces ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write_fn(tmp)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **open_kwargs):
    """``open()`` for writing, atomically: ``with atomic_open('stats.json', 'w') as f: json.dump(x, f)``."""
    if not any(c in mode for c in "wx") or "+" in mode:
        raise ValueError(f"mode: atomic_open writes a whole new file, expected 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("x", "w"), **open_kwargs) as f:
            yield f
            f.flush()


def remove_stale_temp_files(directory) -> list[str]:
    """Remove temporary files that killed writers left in ``directory``; returns their paths.

    Only files named like :func:`atomic_path`'s temporaries whose writing process (on this
    machine) no longer runs are removed.
    """
    removed = []
    for name in os.listdir(directory):
        m = _TMP_RE.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # the writer still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a running process of another user
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
    return removed


# ----------------------------------------------------------------------------------------------
# Safetensors plumbing

def _as_torch_dtype(dtype, arg: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"{arg}: expected one of {sorted(_DTYPES)}, got {dtype!r}")


def _prepare_tensors(tensors: dict) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[name] = t
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], path: str, header: dict[str, str]) -> None:
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=header)


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, expected a .safetensors file")
    return path


def _read_header(path: str, expected_format: str) -> dict[str, str]:
    """The safetensors metadata of ``path``; clear errors for files that are not ``expected_format``."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # SafetensorError: bad or truncated header
        raise ValueError(f"{path}: not a valid safetensors file (corrupt or truncated?): {e}") from None
    fmt = header.get("format")
    if fmt != expected_format:
        what = {SNAPSHOT_FORMAT: "a snapshot (use io.load)", CHECKPOINT_FORMAT: "a checkpoint (use io.load_checkpoint)"}
        found = what.get(fmt, "a safetensors file without edm2fast metadata" if fmt is None else f"format {fmt!r}")
        raise ValueError(f"{path}: expected an edm2fast {expected_format.split('.')[-1]}, found {found}")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported {fmt} format_version {version!r} "
                         f"(this edm2fast reads {FORMAT_VERSION!r})")
    return header


def _read_tensors(path: str, device="cpu") -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    device = str(device)
    try:
        with safe_open(path, framework="pt", device=device) as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: could not read tensors (corrupt or truncated?): {e}") from None


def _json_field(header: dict, key: str, path: str):
    try:
        return json.loads(header[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata field {key!r} is missing or not JSON ({e})") from None


# ----------------------------------------------------------------------------------------------
# Network kwargs

def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The Precond inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        else:
            return net


def build_net(device=None, **kwargs) -> torch.nn.Module:
    """``Precond(**kwargs)`` that remembers its kwargs (``net._init_kwargs``) for :func:`save`."""
    from .networks import Precond
    _check_kwarg_names(kwargs)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        net = Precond(**kwargs)
    net._init_kwargs = _jsonable(kwargs, "kwargs")
    return net


def _check_kwarg_names(kwargs: dict) -> None:
    import inspect
    from .networks import Block, Precond, UNet
    known = set()
    for cls in (Precond, UNet, Block):
        known |= {n for n, p in inspect.signature(cls.__init__).parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
    known -= {"in_channels", "out_channels", "emb_channels", "flavor", "resample_mode", "attention"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"network kwargs: unknown argument(s) {unknown}; Precond/UNet/Block accept {sorted(known)}")
    for req in ("img_resolution", "img_channels"):
        if req not in kwargs:
            raise ValueError(f"network kwargs: missing {req!r}")


def init_kwargs(net: torch.nn.Module) -> dict:
    """The ``Precond`` constructor kwargs that rebuild ``net`` (same state-dict names and shapes).

    Uses the kwargs recorded at construction (``net._init_kwargs`` from :func:`build_net` or
    the converter, or ``net.init_kwargs``) when present; otherwise reads them off the module
    tree (the attributes Precond, UNet and Block keep and the layer shapes). Either way, the
    result is checked by building the network on the meta device and comparing shapes.
    """
    net = _unwrap(net)
    recorded = getattr(net, "_init_kwargs", None) or getattr(net, "init_kwargs", None)
    if isinstance(recorded, dict):
        kwargs = dict(recorded)
        for name in ("use_fp16", "dtype", "channels_last"):  # runtime options a user may have changed since
            if hasattr(net, name):
                kwargs[name] = getattr(net, name)
    else:
        kwargs = _infer_kwargs(net)
    _check_state_dict(build_net("meta", **kwargs), net.state_dict(), "network", check_dtypes=False)
    return _jsonable(kwargs, "kwargs")


def _infer_kwargs(net: torch.nn.Module) -> dict:
    from .networks import Block, Precond
    if not isinstance(net, Precond):
        raise TypeError(f"net: expected an edm2fast.networks.Precond, got {type(net).__name__}")
    unet = net.unet
    level_res = []  # encoder resolutions, in order
    for name in unet.enc:
        res = int(name.split("x", 1)[0])
        if res not in level_res:
            level_res.append(res)
    cblock = [unet.dec[f"{res}x{res}_block0"].out_channels for res in level_res]
    num_blocks = sum(1 for name in unet.enc if name.startswith(f"{level_res[0]}x{level_res[0]}_block"))
    cnoise = unet.emb_fourier.freqs.numel()
    cemb = unet.emb_noise.out_channels
    mc = 0
    for c in cblock + [cnoise, cemb]:
        mc = math.gcd(mc, c)
    blocks = [m for m in unet.modules() if isinstance(m, Block)]
    attn_res, channels_per_head = set(), None
    for part in (unet.enc, unet.dec):
        for name, block in part.items():
            if isinstance(block, Block) and block.num_heads:
                channels_per_head = block.out_channels // block.num_heads
                if "_block" in name:
                    attn_res.add(int(name.split("x", 1)[0]))
    b = blocks[0]
    kwargs = {
        "img_resolution": net.img_resolution, "img_channels": net.img_channels, "label_dim": net.label_dim,
        "use_fp16": net.use_fp16, "sigma_data": net.sigma_data,
        "logvar_channels": net.logvar_fourier.freqs.numel(),
        "model_channels": mc, "channel_mult": [c // mc for c in cblock],
        "channel_mult_noise": None if cnoise == cblock[0] else cnoise // mc,
        "channel_mult_emb": None if cemb == max(cblock) else cemb // mc,
        "num_blocks": num_blocks, "attn_resolutions": sorted(attn_res, reverse=True),
        "label_balance": unet.label_balance, "concat_balance": unet.concat_balance,
        "dropout": b.dropout, "res_balance": b.res_balance, "attn_balance": b.attn_balance, "clip_act": b.clip_act,
    }
    if channels_per_head is not None:
        kwargs["channels_per_head"] = channels_per_head
    if getattr(net, "dtype", None) is not None:
        kwargs["dtype"] = net.dtype
    if getattr(net, "channels_last", False):
        kwargs["channels_last"] = True
    return kwargs


def _check_state_dict(reference: torch.nn.Module, state: dict, what: str, check_dtypes: bool = False) -> None:
    """Same names and shapes as ``reference.state_dict()``; the error lists the differences."""
    ref = reference.state_dict()
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    shapes = [f"{k}: {tuple(state[k].shape)} vs expected {tuple(ref[k].shape)}"
              for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {few(shapes)}")
        raise ValueError(f"{what}: state dict does not match the network kwargs: " + "; ".join(parts))


def _jsonable(obj, where: str):
    """``obj`` as plain JSON types (tuples -> lists); TypeError naming the offending entry."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a str")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{where}: {type(obj).__name__} is not JSON-serializable")


# ----------------------------------------------------------------------------------------------
# Snapshots

def save(net: torch.nn.Module, path, /, *, dtype="fp16", **metadata) -> None:
    """Write ``net`` (a Precond, possibly DDP/compile-wrapped) as a snapshot, atomically.

    ``dtype``: storage precision of the floating parameters, ``'fp16'`` (default), ``'bf16'``
    or ``'fp32'``; buffers (Fourier frequencies and phases) stay fp32. ``metadata``: any
    JSON-serializable values, e.g. ``preset=``, ``nimg=``, ``sigma_rel=``, ``dataset=``.
    """
    net = _unwrap(net)
    save_state_dict(net.state_dict(), path, init_kwargs(net), dtype=dtype, **metadata)


def save_state_dict(state_dict: dict, path, net_kwargs: dict, /, *, dtype="fp16", **metadata) -> None:
    """Write a Precond state dict as a snapshot without a module (e.g. a post-hoc EMA result).

    ``net_kwargs`` are the Precond constructor kwargs (:func:`init_kwargs`, or
    ``read_metadata(p)['net_kwargs']`` of an input snapshot); names and shapes are checked.
    """
    storage_dtype = _as_torch_dtype(dtype)
    if "net_kwargs" in metadata:
        raise ValueError("metadata: 'net_kwargs' is reserved (pass the kwargs as net_kwargs=)")
    net_kwargs = _jsonable(dict(net_kwargs), "net_kwargs")
    reference = build_net("meta", **net_kwargs)
    _check_state_dict(reference, state_dict, f"{os.fspath(path)}")
    buffers = {name for name, _ in reference.named_buffers()}
    tensors = {}
    for name, t in state_dict.items():
        if t.is_floating_point():
            t = t.detach().to(torch.float32 if name in buffers else storage_dtype)
        tensors[name] = t
    header = {
        "format": SNAPSHOT_FORMAT, "format_version": FORMAT_VERSION,
        "net_kwargs": json.dumps(net_kwargs),
        "metadata": json.dumps(_jsonable(metadata, "metadata")),
    }
    tensors = _prepare_tensors(tensors)
    atomic_write(path, lambda tmp: _write_safetensors(tensors, tmp, header))


def read_metadata(path) -> dict:
    """The metadata of a snapshot (what :func:`save` was given) plus ``'net_kwargs'``; reads the header only."""
    path = _check_file(path)
    header = _read_header(path, SNAPSHOT_FORMAT)
    meta = _json_field(header, "metadata", path)
    meta["net_kwargs"] = _json_field(header, "net_kwargs", path)
    return meta


def load_state_dict(path, device="cpu", dtype=None) -> dict[str, torch.Tensor]:
    """The state dict of a snapshot; floating tensors cast to ``dtype`` (None: as stored)."""
    path = _check_file(path)
    _read_header(path, SNAPSHOT_FORMAT)
    tensors = _read_tensors(path, device)
    if dtype is not None:
        dt = _as_torch_dtype(dtype)
        tensors = {k: v.to(dt) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


def _looks_like_pickle(path: str) -> bool:
    """A pickle or torch.save zip file, as opposed to safetensors (8-byte length, then '{')."""
    return _foreign.is_foreign_file(path)


def _read_foreign(path: str, key: str | None = None) -> tuple[dict, dict, dict]:
    """``(kwargs, state, meta)`` of an authors' pickle or training state, read without running code."""
    kwargs, state, extras = _foreign.read_official_pickle(path, key)
    meta = {**_foreign.metadata_from_filename(path), "converted_from": os.path.basename(path), **extras}
    return kwargs, state, meta


def load(path, device="cpu", dtype=None, *, compute_dtype=None, key: str | None = None,
         **overrides) -> torch.nn.Module:
    """Rebuild the Precond of a snapshot from the file alone, in eval mode, without gradients.

    ``dtype``: parameter precision in memory (``'fp32'`` when None, whatever the file stores).
    ``compute_dtype``: the Precond's compute precision (``'fp16'|'bf16'|'fp32'``, None keeps
    the recorded one). ``overrides``: other constructor kwargs that do not change the
    parameters, e.g. ``channels_last=True`` or ``dropout=0.1``. The snapshot's metadata is
    attached as ``net.snapshot_metadata``. An authors' pickle (``.pkl``) or release training
    state (``training-state-<kimg>.pt``) is converted on the fly (:func:`load_official_pickle`;
    ``key`` picks its entry, e.g. ``'ema'``, ``'net'`` or ``'ema:0.100'``).
    """
    path = _check_file(path)
    param_dtype = _as_torch_dtype(dtype if dtype is not None else "fp32")
    if _looks_like_pickle(path):
        kwargs, state, meta = _read_foreign(path, key)
    else:
        meta = read_metadata(path)
        kwargs = meta.pop("net_kwargs")
        state = None
    kwargs = {**kwargs, **overrides}
    if compute_dtype is not None:
        kwargs["dtype"] = compute_dtype
    if state is None:
        state = _read_tensors(path, device)
    return _assemble(kwargs, state, meta, path, device, param_dtype)


def _assemble(kwargs: dict, state: dict, meta: dict, path: str, device, param_dtype: torch.dtype):
    """Precond(**kwargs) holding ``state`` (checked), on ``device``, eval mode, no gradients."""
    try:
        net = build_net("meta", **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the recorded network kwargs do not build a Precond: {e}") from None
    _check_state_dict(net, state, path)
    buffers = {name for name, _ in net.named_buffers()}
    # Buffers (Fourier frequencies and phases) stay fp32 whatever the parameter precision.
    state = {k: v.to(device=device, dtype=torch.float32 if k in buffers else param_dtype)
             if v.is_floating_point() else v.to(device) for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    if getattr(net, "channels_last", False):
        net.unet.to(memory_format=torch.channels_last)
    net.eval().requires_grad_(False)
    net.snapshot_metadata = meta
    return net


def load_official_pickle(path, key: str | None = None) -> torch.nn.Module:
    """The network of an authors' EDM2 pickle (or ``training-state-*.pt``) as our Precond.

    fp32, eval mode, no gradients; no code from the file runs (see
    :class:`edm2fast.convert.RestrictedUnpickler`). The network remembers its kwargs
    (``net._init_kwargs``) and the other entries of the file (``net.snapshot_metadata``), so
    :func:`save` can write it as a snapshot.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    kwargs, state, meta = _read_foreign(path, key)
    return _assemble(kwargs, state, meta, path, "cpu", torch.float32)


# ----------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write a flat ``{name: tensor}`` dict and a JSON-serializable ``meta`` dict, atomically."""
    header = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION,
              "meta": json.dumps(_jsonable(meta or {}, "meta"))}
    tensors = _prepare_tensors(tensors)
    atomic_write(path, lambda tmp: _write_safetensors(tensors, tmp, header))


def load_checkpoint(path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a checkpoint written by :func:`save_checkpoint`; ValueError if invalid."""
    path = _check_file(path)
    header = _read_header(path, CHECKPOINT_FORMAT)
    meta = _json_field(header, "meta", path)
    return _read_tensors(path, device), meta


_TAG = "__edm2fast__"


def flatten_state(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into ``(tensors, skeleton)``: a flat tensor dict and JSON data.

    Accepts dicts (any int/str/... keys), lists, tuples, tensors, numpy arrays, numbers,
    strings, None and torch dtypes, e.g. ``{'net': net.state_dict(), 'optimizer':
    opt.state_dict(), 'nimg': 1024}``. Tensor names are the paths (``optimizer.state.0.exp_avg``).
    :func:`unflatten_state` inverts it exactly (tuples stay tuples, int keys stay ints).
    """
    tensors: dict[str, torch.Tensor] = {}

    def join(path, k):
        return f"{path}.{k}" if path else str(k)

    def enc(x, path):
        if isinstance(x, torch.Tensor):
            name = path or "_"
            if name in tensors:
                raise ValueError(f"state: two entries map to the tensor name {name!r}")
            tensors[name] = x
            return {_TAG: "tensor", "name": name}
        if isinstance(x, np.ndarray):
            name = path or "_"
            if name in tensors:
                raise ValueError(f"state: two entries map to the tensor name {name!r}")
            tensors[name] = torch.from_numpy(np.ascontiguousarray(x))
            return {_TAG: "ndarray", "name": name}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        if isinstance(x, torch.dtype):
            return {_TAG: "dtype", "name": str(x).removeprefix("torch.")}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and _TAG not in x:
                return {k: enc(v, join(path, k)) for k, v in x.items()}
            return {_TAG: "dict", "items": [[enc(k, join(path, f"key{i}")), enc(v, join(path, k))]
                                            for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, tuple):
            return {_TAG: "tuple", "items": [enc(v, join(path, i)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, join(path, i)) for i, v in enumerate(x)]
        raise TypeError(f"state[{path or '.'}]: cannot store a {type(x).__name__} in a checkpoint "
                        "(tensors, arrays, numbers, strings, None, lists, tuples and dicts only)")

    skeleton = enc(obj, prefix)
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton) -> Any:
    """Inverse of :func:`flatten_state`."""
    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        tag = x.get(_TAG)
        if tag is None:
            return {k: dec(v) for k, v in x.items()}
        if tag in ("tensor", "ndarray"):
            if x["name"] not in tensors:
                raise ValueError(f"checkpoint: tensor {x['name']!r} is missing")
            t = tensors[x["name"]]
            return t.cpu().numpy() if tag == "ndarray" else t
        if tag == "dtype":
            return getattr(torch, x["name"])
        if tag == "tuple":
            return tuple(dec(v) for v in x["items"])
        if tag == "dict":
            return {dec(k): dec(v) for k, v in x["items"]}
        raise ValueError(f"checkpoint: unknown entry tag {tag!r}")
    return dec(skeleton)


def save_state(path, state, meta: dict | None = None) -> None:
    """:func:`flatten_state` then :func:`save_checkpoint` (``meta`` is stored alongside)."""
    tensors, skeleton = flatten_state(state)
    save_checkpoint(path, tensors, {**(meta or {}), "__state__": skeleton})


def load_state(path, device="cpu") -> tuple[Any, dict]:
    """``(state, meta)`` of a file written by :func:`save_state`."""
    tensors, meta = load_checkpoint(path, device)
    if "__state__" not in meta:
        raise ValueError(f"{os.fspath(path)}: checkpoint was not written by save_state (no '__state__')")
    skeleton = meta.pop("__state__")
    return unflatten_state(tensors, skeleton), meta


def rng_state() -> dict:
    """Every random generator's state (torch CPU and CUDA, numpy, Python) as tensors and ints.

    Store it with :func:`save_state`; restore with :func:`set_rng_state`.
    """
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu().to(torch.uint8) for t in state["cuda"]])
