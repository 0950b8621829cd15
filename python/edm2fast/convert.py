"""Read the authors' released EDM2 pickles into our :class:`~edm2fast.networks.Precond`, running no code.

The released files are Python pickles (``pickle.dump`` of a dict such as ``{'ema': net,
'encoder': ..., 'dataset_kwargs': ..., 'loss_fn': ...}``; ``torch.save`` zip files are read too).
Their network objects pickle as calls to
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, ``meta`` being a dict with
``type``, ``version``, ``module_src`` (Python source), ``class_name`` and ``state`` (the
object's ``__dict__``: ``_init_kwargs`` and the torch-module ``_parameters``, ``_buffers``
and ``_modules``).

:class:`RestrictedUnpickler` resolves only an allowlist of globals: tensor and storage
rebuilding (storages inside a plain pickle are ``torch.save`` blobs, read with
``torch.load(weights_only=True)``), plain containers, a few numpy array constructors, and
stand-ins for ``_reconstruct_persistent_obj``, ``torch.nn`` container modules and
``dnnlib.util.EasyDict`` that only *record* what the file says (``module_src`` is kept as a
string and never executed). Any other global (``os.system``, ``builtins.eval``, the
authors' own classes, ...) is refused with :class:`UnsafePickleError` naming it.

The record tree is then mapped onto our Precond: ``_init_kwargs`` become the constructor
kwargs and the ``_parameters``/``_buffers`` found by walking ``_modules`` form a flat state
dict whose names match ours key for key (``unet.enc.64x64_conv.weight``, ...).

The release's training checkpoints ``training-state-<kimg>.pt`` (``torch.save`` of plain
state dicts: ``net``, ``ema`` = ``{'stds', 'emas'}``, ``optimizer``, ...) are read the same way;
they record no constructor kwargs, so those are read off the tensor names and shapes
(:func:`kwargs_from_state_dict`).

This module reads foreign formats only and returns plain data (kwargs, tensors, metadata);
:mod:`edm2fast.io` builds networks from it (``io.load``, ``io.load_official_pickle``) and
reads and writes our own formats. It never imports :mod:`edm2fast.io`.
"""

from __future__ import annotations

import collections
import functools
import io as _pyio
import math
import os
import pickle
import re
import warnings
import zipfile
from typing import Any

import numpy as np
import torch

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "PersistentRecord", "ObjectRecord", "read_pickle",
           "read_official_pickle", "describe_pickle", "metadata_from_filename", "parse_release_name",
           "kwargs_from_state_dict", "is_foreign_file", "RELEASE_NAME_PATTERNS"]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle asks for something outside the allowlist (it would run code); nothing was run."""


# ----------------------------------------------------------------------------------------------
# Records: what the file describes, as data

class PersistentRecord:
    """Stands for ``torch_utils.persistence._reconstruct_persistent_obj(meta)``: keeps ``meta``, runs nothing."""

    def __init__(self, meta):
        if not isinstance(meta, dict):
            raise UnsafePickleError(f"_reconstruct_persistent_obj: expected a meta dict, got {type(meta).__name__}")
        self.type = meta.get("type")
        self.version = meta.get("version")
        self.module_src = meta.get("module_src")
        self.class_name = meta.get("class_name")
        self.state = meta.get("state")

    def __repr__(self):
        return f"<persistent {self.class_name}>"


def _reconstruct_persistent_record(meta):
    return PersistentRecord(meta)


class ObjectRecord:
    """Stands for an instance of an allowed-but-not-imported class (``torch.nn.ModuleDict``, ...)."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{self.qualified_name}>"


_RECORD_CLASSES: dict[str, type] = {}


def _record_class(qualified_name: str) -> type:
    if qualified_name not in _RECORD_CLASSES:
        _RECORD_CLASSES[qualified_name] = type(qualified_name.rsplit(".", 1)[-1], (ObjectRecord,),
                                               {"qualified_name": qualified_name})
    return _RECORD_CLASSES[qualified_name]


class EasyDictRecord(dict):
    """Stands for ``dnnlib.util.EasyDict``: a plain dict."""


class _TensorType:
    """Stands for ``torch.Tensor`` as a ``new_type`` argument of ``_rebuild_from_type_v2``."""


class _ParameterType:
    """Stands for ``torch.nn.Parameter`` as a ``new_type`` argument."""


class _StorageType:
    """Stands for ``torch.FloatStorage`` & co. in ``torch.save`` zip files: only a dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


# ----------------------------------------------------------------------------------------------
# Safe replacements for the tensor-rebuilding functions

def _storage_parts(storage) -> tuple[torch.UntypedStorage, torch.dtype]:
    if isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[0], torch.UntypedStorage):
        return storage
    if isinstance(storage, torch.UntypedStorage):
        return storage, torch.uint8
    if isinstance(storage, torch.storage.TypedStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return storage.untyped(), storage.dtype
    raise UnsafePickleError(f"tensor rebuild: expected a storage, got {type(storage).__name__}")


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """``torch._utils._rebuild_tensor_v2`` & co.: a view of ``storage``; hooks and metadata ignored."""
    untyped, dtype = _storage_parts(storage)
    try:
        size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        return torch.empty((0,), dtype=dtype).set_(untyped, int(storage_offset), size, stride)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UnsafePickleError(f"tensor rebuild: inconsistent size/stride/offset ({e})") from None


def _rebuild_parameter(data, requires_grad=False, *_ignored):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"parameter rebuild: expected a tensor, got {type(data).__name__}")
    return data


def _rebuild_from_type_v2(func, new_type, args, state=None):
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise UnsafePickleError(f"_rebuild_from_type_v2: refusing rebuild function {func!r}")
    return func(*args)


def _load_storage_bytes(data):
    """``torch.storage._load_from_bytes``: a storage saved by ``torch.save``, read with weights_only=True."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"_load_from_bytes: expected bytes, got {type(data).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.load(_pyio.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise UnsafePickleError(f"embedded torch.save blob refused by torch.load(weights_only=True): "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"_load_from_bytes: expected a storage, got {type(storage).__name__}")
    return storage


def _safe_reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocols 0-1), for record classes only."""
    if not (isinstance(cls, type) and issubclass(cls, (ObjectRecord, EasyDictRecord))):
        raise UnsafePickleError(f"copyreg._reconstructor: refusing class {cls!r}")
    obj = cls.__new__(cls)
    if isinstance(obj, dict) and isinstance(state, dict):
        obj.update(state)
    return obj


def _safe_newobj(cls, *args):
    if not (isinstance(cls, type) and issubclass(cls, (ObjectRecord, EasyDictRecord, collections.OrderedDict))):
        raise UnsafePickleError(f"copyreg.__newobj__: refusing class {cls!r}")
    return cls.__new__(cls, *args)


_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("torch", "Tensor"): _TensorType,
    ("torch._tensor", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _ParameterType,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("copyreg", "__newobj__"): _safe_newobj,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_record,
    ("dnnlib.util", "EasyDict"): EasyDictRecord,
    ("dnnlib", "EasyDict"): EasyDictRecord,
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,  # bytes in protocol <= 2 pickles
}
_ALLOWED.update({("builtins", t.__name__): t for t in (
    set, frozenset, list, dict, tuple, bytearray, bytes, complex, slice, int, float, str, bool, object)})
_ALLOWED.update({("__builtin__", t.__name__): t for t in (set, frozenset, list, dict, tuple, object)})


def _resolve_global(module: str, name: str):
    """The allowed object for ``module.name``, or None."""
    key = (module, name)
    if key in _ALLOWED:
        return _ALLOWED[key]
    if module == "torch":
        if name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        attr = getattr(torch, name, None) if name.isidentifier() else None
        if isinstance(attr, torch.dtype):
            return attr
    if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
        return _StorageType(torch.uint8)
    if module.startswith("torch.nn.modules.") and name.isidentifier():
        return _record_class(f"{module}.{name}")  # recorded, never imported
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only the allowlisted globals (see module docstring).

    ``zip_file``/``zip_prefix`` serve the storages of a ``torch.save`` zip file (persistent ids).
    """

    def __init__(self, file, source: str = "<pickle>", zip_file: zipfile.ZipFile | None = None,
                 zip_prefix: str = ""):
        super().__init__(file)
        self.source = source
        self._zip = zip_file
        self._zip_prefix = zip_prefix
        self._storages: dict[str, tuple] = {}

    def find_class(self, module, name):
        obj = _resolve_global(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"{self.source}: refusing global '{module}.{name}': not allowed in an EDM2 pickle "
                "(only tensors, containers and persistence records are read; no code from the file runs)")
        return obj

    def persistent_load(self, pid):
        if self._zip is None:
            raise UnsafePickleError(f"{self.source}: unexpected persistent id in a plain pickle")
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise UnsafePickleError(f"{self.source}: unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        if key not in self._storages:
            try:
                data = self._zip.read(f"{self._zip_prefix}data/{key}")
            except KeyError:
                raise ValueError(f"{self.source}: storage {key!r} missing from the zip file") from None
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            if len(data) < int(numel) * itemsize:
                raise ValueError(f"{self.source}: storage {key!r} is truncated")
            untyped = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone().untyped_storage() \
                if data else torch.UntypedStorage(0)
            self._storages[key] = (untyped, storage_type.dtype)
        return self._storages[key]


def read_pickle(path) -> Any:
    """Unpickle ``path`` (plain pickle or ``torch.save`` zip) with :class:`RestrictedUnpickler`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, expected a pickle file")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # not zipfile.is_zipfile: a pickle may end with an embedded zip
        if is_zip:
            with zipfile.ZipFile(path) as zf:
                pkls = sorted((n for n in zf.namelist() if n.endswith("data.pkl")), key=lambda n: n.count("/"))
                if not pkls:
                    raise ValueError(f"{path}: a zip file without data.pkl is not a torch.save file")
                prefix = pkls[0][: -len("data.pkl")]
                with zf.open(pkls[0]) as f:
                    return RestrictedUnpickler(_pyio.BytesIO(f.read()), path, zf, prefix).load()
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path).load()
    except (UnsafePickleError, ValueError):
        raise
    except Exception as e:  # truncated or garbage: EOFError, UnpicklingError, ...
        raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# Records -> our Precond

_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")


def _record_state(obj, where: str) -> dict:
    state = obj.state if isinstance(obj, (PersistentRecord, ObjectRecord)) else None
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    if not isinstance(state, dict):
        raise ValueError(f"{where}: expected a torch module record, found {obj!r:.80}")
    return state


def _plain(x):
    """Records and numpy values as plain Python data (for kwargs and JSON metadata)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, (np.ndarray, torch.Tensor)):
        small = (x.size if isinstance(x, np.ndarray) else x.numel()) <= 64
        return _plain(x.tolist()) if small else f"<{type(x).__name__} {tuple(x.shape)}>"
    if isinstance(x, PersistentRecord):
        return _summary(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)[:200]


def _summary(obj) -> Any:
    """A JSON-able description of a non-network entry (encoder, loss, dataset kwargs)."""
    if isinstance(obj, PersistentRecord):
        state = obj.state if isinstance(obj.state, dict) else {}
        out = {"class_name": obj.class_name}
        if isinstance(state.get("_init_kwargs"), dict):
            out["init_kwargs"] = _plain(state["_init_kwargs"])
        for k, v in state.items():
            if k.startswith("_") or isinstance(v, (PersistentRecord, ObjectRecord)):
                continue
            out[k] = _plain(v)
        return out
    return _plain(obj)


def _collect_tensors(obj, prefix: str, out: dict, where: str) -> None:
    state = _record_state(obj, where)
    for name, t in (state.get("_parameters") or {}).items():
        if t is not None:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{where}: parameter {prefix}{name} is not a tensor")
            out[prefix + name] = t
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, t in (state.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{where}: buffer {prefix}{name} is not a tensor")
            out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out, where)


def _find_network(root, key: str | None, path: str):
    if isinstance(root, PersistentRecord) and key is None:
        return root, None
    if not isinstance(root, dict):
        raise ValueError(f"{path}: expected an EDM2 snapshot dict or network, found {root!r:.80}")
    if key is None:
        for k in ("ema", "net"):
            if k in root:
                key = k
                break
        else:
            nets = [k for k, v in root.items() if isinstance(v, PersistentRecord) and v.class_name == "Precond"]
            if len(nets) != 1:
                raise ValueError(f"{path}: cannot tell which entry is the network; pick one with --ema KEY "
                                 f"(keys: {sorted(map(str, root))})")
            key = nets[0]
    if key not in root:
        raise ValueError(f"--ema: {path} has no key {key!r} (keys: {sorted(map(str, root))})")
    return root[key], key


def read_official_pickle(path, key: str | None = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """``(net_kwargs, state_dict, extras)`` of an authors' pickle, without building a network.

    ``key``: the entry holding the network (default ``'ema'``, else ``'net'``, else the only
    Precond). ``extras``: JSON-able summaries of the other entries (encoder, loss_fn,
    dataset_kwargs) and ``key``. A release ``training-state-<kimg>.pt`` is read too (see
    :func:`_training_state_network` for ``key``).
    """
    path = os.fspath(path)
    root = read_pickle(path)
    if isinstance(root, dict) and _is_state_dict(root.get("net")):  # a release training-state-*.pt
        state, key, extras = _training_state_network(root, key, path)
        return kwargs_from_state_dict(state, f"{path}[{key!r}]"), state, extras
    rec, key = _find_network(root, key, path)
    where = f"{path}[{key!r}]" if key is not None else path
    if not isinstance(rec, PersistentRecord):
        raise ValueError(f"{where}: expected an EDM2 network (persistent Precond), found {rec!r:.80}")
    if rec.class_name != "Precond":
        raise ValueError(f"{where}: expected class 'Precond' (EDM2), found {rec.class_name!r}; "
                         "only EDM2 networks can be converted")
    state = _record_state(rec, where)
    kwargs = _plain(state.get("_init_kwargs") or {})
    args = _plain(state.get("_init_args") or [])
    if not isinstance(kwargs, dict) or not isinstance(args, list):
        raise ValueError(f"{where}: malformed _init_kwargs/_init_args")
    if len(args) > len(_PRECOND_POSITIONAL):
        raise ValueError(f"{where}: {len(args)} positional constructor args, Precond takes at most "
                         f"{len(_PRECOND_POSITIONAL)}")
    for name, value in zip(_PRECOND_POSITIONAL, args):
        if name in kwargs:
            raise ValueError(f"{where}: constructor arg {name!r} given twice")
        kwargs[name] = value
    kwargs.pop("class_name", None)
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(rec, "", tensors, where)
    extras = {"source_key": key}
    if isinstance(root, dict):
        for k, v in root.items():
            if k != key and isinstance(k, str):
                reserved = k in ("dtype", "net_kwargs", "converted_from", "preset", "nimg", "sigma_rel")
                extras[f"pickle_{k}" if reserved else k] = _summary(v)
    return kwargs, tensors, extras


# The file names the release produces or publishes (kimg = images seen // 1000).
RELEASE_NAME_PATTERNS = {
    # training/training_loop.py snapshots and reconstruct_phema.py outputs: <prefix>-<kimg>-<std>.pkl
    "snapshot": re.compile(r"^(?P<prefix>.+?)-(?P<kimg>\d+)-(?P<std>\d+\.\d+)\.pkl$"),
    # training checkpoints
    "training-state": re.compile(r"^training-state-(?P<kimg>\d+)\.pt$"),
}
_PRESET_RE = re.compile(r"^(?P<preset>edm2-img\d+-[a-z]+)(?P<uncond>-uncond)?$")


def parse_release_name(path) -> dict | None:
    """What a release file name says, or None for other names.

    ``network-snapshot-0134217-0.100.pkl`` -> ``{'kind': 'snapshot', 'prefix': 'network-snapshot',
    'kimg': 134217, 'nimg': 134217000, 'sigma_rel': 0.1}``; ``edm2-img512-xs-uncond-2147483-0.045.pkl``
    adds ``'preset': 'edm2-img512-xs', 'uncond': True``; ``training-state-0134217.pt`` gives
    ``{'kind': 'training-state', 'kimg', 'nimg'}``.
    """
    name = os.path.basename(os.fspath(path))
    for kind, pattern in RELEASE_NAME_PATTERNS.items():
        m = pattern.match(name)
        if not m:
            continue
        out = {"kind": kind, "kimg": int(m.group("kimg")), "nimg": int(m.group("kimg")) * 1000}
        if kind == "snapshot":
            out["prefix"] = m.group("prefix")
            out["sigma_rel"] = float(m.group("std"))
            p = _PRESET_RE.match(m.group("prefix"))
            if p:
                out["preset"] = p.group("preset")
                out["uncond"] = bool(p.group("uncond"))
        return out
    return None


def metadata_from_filename(path) -> dict:
    """``preset``, ``nimg`` and ``sigma_rel`` from an authors' file name (see :func:`parse_release_name`)."""
    info = parse_release_name(path)
    if info is None:
        return {}
    return {k: info[k] for k in ("preset", "nimg", "sigma_rel", "uncond") if k in info}


def is_foreign_file(path) -> bool:
    """A pickle or ``torch.save`` zip file, as opposed to safetensors (8-byte length, then '{')."""
    with open(os.fspath(path), "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return True
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[8:9] != b"{"


# ----------------------------------------------------------------------------------------------
# Training checkpoints: plain state dicts, kwargs read off the tensors

def _is_state_dict(x) -> bool:
    return isinstance(x, dict) and bool(x) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in x.items())


def kwargs_from_state_dict(state: dict, where: str = "state dict") -> dict:
    """Precond constructor kwargs that give ``state``'s names and shapes (ValueError if not an EDM2 net).

    Not recorded in weights: ``channels_per_head`` (the release's 64 where it fits),
    ``dropout`` and the balances (left at their defaults, the release's).
    """
    def shape(name):
        if name not in state:
            raise ValueError(f"{where}: no tensor {name!r}; not an EDM2 Precond state dict")
        return tuple(state[name].shape)

    level_res: list[int] = []
    blocks = collections.defaultdict(set)
    for name in state:
        m = re.match(r"^unet\.enc\.(\d+)x\d+_(conv|down|block(\d+))\.", name)
        if m:
            res = int(m.group(1))
            if res not in level_res:
                level_res.append(res)
            if m.group(3) is not None:
                blocks[res].add(int(m.group(3)))
    if not level_res:
        raise ValueError(f"{where}: no 'unet.enc.*' tensors; not an EDM2 Precond state dict")
    level_res.sort(reverse=True)
    cblock = [shape(f"unet.dec.{r}x{r}_block0.conv_res1.weight")[0] for r in level_res]
    cnoise = shape("unet.emb_fourier.freqs")[0]
    cemb = shape("unet.emb_noise.weight")[0]
    mc = 0
    for c in cblock + [cnoise, cemb]:
        mc = math.gcd(mc, c)
    attn = sorted({int(m.group(1)) for name in state
                   for m in [re.match(r"^unet\.(?:enc|dec)\.(\d+)x\d+_block\d+\.attn_qkv\.", name)] if m},
                  reverse=True)
    # Heads are not in the weights: the release's 64 channels per head when it divides every
    # attention block's width (always, for the published models), else the largest that does.
    attn_widths = [shape(name)[0] // 3 for name in state if name.endswith("attn_qkv.weight")]
    channels_per_head = 64
    if any(w % 64 for w in attn_widths):
        channels_per_head = functools.reduce(math.gcd, attn_widths)
    return {
        "channels_per_head": channels_per_head,
        "img_resolution": level_res[0], "img_channels": shape("unet.out_conv.weight")[0],
        "label_dim": shape("unet.emb_label.weight")[1] if "unet.emb_label.weight" in state else 0,
        "logvar_channels": shape("logvar_fourier.freqs")[0],
        "model_channels": mc, "channel_mult": [c // mc for c in cblock],
        "channel_mult_noise": None if cnoise == cblock[0] else cnoise // mc,
        "channel_mult_emb": None if cemb == max(cblock) else cemb // mc,
        "num_blocks": len(blocks[level_res[0]]), "attn_resolutions": attn,
    }


def _training_state_network(root: dict, key: str | None, path: str) -> tuple[dict, str, dict]:
    """``(state_dict, key, extras)`` of the network chosen by ``key`` in a release training state.

    ``key``: ``'ema'`` (default: the first tracked EMA), ``'ema<i>'`` or ``'ema:<std>'`` (one of
    them), or ``'net'`` (the raw trained weights).
    """
    key = key or "ema"
    ema = root.get("ema")
    emas, stds = [], []
    if isinstance(ema, dict) and isinstance(ema.get("emas"), (list, tuple)):
        emas = [e for e in ema["emas"] if _is_state_dict(e)]
        stds = [float(s) for s in (ema.get("stds") or [])]
    elif _is_state_dict(ema):
        emas = [ema]
    extras: dict = {"source_key": key}
    if key == "net":
        state = root.get("net")
    else:
        m = re.fullmatch(r"ema(?::(?P<std>[0-9.]+)|(?P<idx>\d+))?", key)
        if not m:
            raise ValueError(f"--ema: {path}: use 'net', 'ema', 'ema<i>' or 'ema:<std>', got {key!r}")
        if not emas:
            raise ValueError(f"--ema: {path} holds no EMA state dicts (keys: {sorted(map(str, root))})")
        idx = 0
        if m.group("idx") is not None:
            idx = int(m.group("idx"))
        elif m.group("std") is not None:
            want = float(m.group("std"))
            close = [i for i, s in enumerate(stds) if abs(s - want) < 5e-4]
            if not close:
                raise ValueError(f"--ema: {path} tracks sigma_rel {stds}, not {want}")
            idx = close[0]
        if idx >= len(emas):
            raise ValueError(f"--ema: {path} holds {len(emas)} EMAs, no index {idx}")
        state = emas[idx]
        if idx < len(stds):
            extras["sigma_rel"] = stds[idx]
    if not _is_state_dict(state):
        raise ValueError(f"{path}[{key!r}]: expected a state dict of tensors")
    progress = root.get("state")
    if isinstance(progress, dict) and isinstance(progress.get("cur_nimg"), (int, np.integer)):
        extras["nimg"] = int(progress["cur_nimg"])
    return dict(state), key, extras


def describe_pickle(path) -> str:
    """One line per top-level entry of a pickle (read safely): key and what it holds."""
    root = read_pickle(path)
    items = root.items() if isinstance(root, dict) else [("<root>", root)]
    lines = []
    for k, v in items:
        if isinstance(v, PersistentRecord):
            desc = f"persistent {v.class_name}"
            if isinstance(v.state, dict) and isinstance(v.state.get("_init_kwargs"), dict):
                desc += f" {_plain(v.state['_init_kwargs'])}"
        else:
            desc = f"{type(v).__name__} {_plain(v)!s:.200}"
        lines.append(f"{k}: {desc}")
    return "\n".join(lines)
