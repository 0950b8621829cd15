"""Drop-in acceleration of an existing EDM2-style network: ``edm2fast.accelerate(net)``.

Walks a network built from the authors' release (loaded from their pickles or built from
their source), a community port or a fork, and switches its magnitude-preserving layers to
the fused ``mk.*`` ops, in place::

    import edm2fast
    report = edm2fast.accelerate(net)        # net: the release's Precond / UNet / Block / MPConv
    print(report)                            # what was switched, what was left and why

Modules are recognised by structure, never by importing the network's own code: the
release's module and parameter names (spec §1-4). What happens to each kind:

* ``MPConv`` (a ``weight`` parameter of rank 2 or 4, ``forward(x, gain=1)``): forced weight
  normalization in training mode (in place, no grad), then :func:`mpkernels.mp_conv2d` /
  :func:`mpkernels.mp_linear` (spec §1 MPConv steps 1-5).
* ``MPFourier`` (buffers ``freqs`` and ``phases``): :func:`mpkernels.mp_fourier`.
* ``Block`` (``conv_res0``, ``emb_linear``, ``emb_gain``, ``conv_res1``, ``conv_skip``,
  ``attn_qkv``, ``attn_proj``, ``flavor``, ``resample_mode``, ``num_heads``, ``dropout``,
  ``res_balance``, ``attn_balance``, ``clip_act``; ``forward(x, emb)``): the Figure 21 forward
  written with the fused block ops (spec §2).
* ``UNet`` (``enc``, ``dec``, ``emb_fourier``, ``emb_noise``, ``emb_label``, ``out_conv``,
  ``out_gain``, ``label_balance``, ``concat_balance``; ``forward(x, noise_labels,
  class_labels)``): embedding and skip concatenation with the fused ops (spec §3).
* ``Precond`` (``unet``, ``sigma_data``, ``logvar_*``): recognised; its own forward is only
  preconditioning arithmetic and stays as it is.
* This project's own modules (:mod:`edm2fast.networks`, :mod:`mpkernels.nn`) already call the
  fused ops: they are reported as such, and an explicit ``backend`` pins them to it.

A module that looks like one of these but does not fit (a different forward signature, an
extra submodule or parameter, an unexpected setting) is left alone with everything under
it, and the report says why: a block is never half-patched. Unknown modules are left alone.

The switch is an instance attribute ``forward`` (a :func:`functools.partial` of a function of
this module, so deep copies and pickles of the network keep working while edm2fast is
importable). Parameters, buffers and state dicts are untouched; :func:`undo` (or
``accelerate(net, backend='reference')``) restores the modules' own forward methods.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers

import torch

import mpkernels as mk
from mpkernels import _dispatch

__all__ = ["accelerate", "undo", "AccelerateReport"]

_MARK = "_edm2fast_accelerated"  # instance attribute naming what accelerate() installed
_OWN_PACKAGES = ("mpkernels", "edm2fast")

_BLOCK_CHILDREN = ("conv_res0", "emb_linear", "conv_res1", "conv_skip", "attn_qkv", "attn_proj")
_UNET_CHILDREN = ("emb_fourier", "emb_noise", "emb_label", "enc", "dec", "out_conv")


@dataclasses.dataclass
class AccelerateReport:
    """What :func:`accelerate` did: ``switched`` and ``left`` are lists of ``(name, kind, why)``.

    ``name`` is the module's qualified name in the network (``''`` for the root), ``kind``
    one of ``'MPConv'``, ``'MPFourier'``, ``'Block'``, ``'UNet'``, ``'Precond'`` (or the class
    name of an unknown module).
    """

    backend: str
    switched: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)

    def names(self, kind: str | None = None, switched: bool = True) -> list[str]:
        """Qualified names of the switched (or left) modules, optionally of one kind."""
        rows = self.switched if switched else self.left
        return [n for n, k, _ in rows if kind is None or k == kind]

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for _, kind, _ in self.switched:
            counts[kind] = counts.get(kind, 0) + 1
        what = ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing"
        lines = [f"accelerate(backend={self.backend!r}): switched {len(self.switched)} modules ({what}); "
                 f"left {len(self.left)}"]
        for name, kind, why in self.left[:20]:
            lines.append(f"  left {name or '<root>'} ({kind}): {why}")
        if len(self.left) > 20:
            lines.append(f"  ... and {len(self.left) - 20} more")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Fused forwards (spec §1-3). Each takes the module first; accelerate() binds it with partial().

def _mpconv_forward(m, x, gain=1):
    """MPConv (spec §1): forced weight normalization in training, then the fused conv / linear."""
    w = m.weight
    if m.training and getattr(m, "forced_weight_norm", True):
        with torch.no_grad():
            mk.force_normalize_([w])  # paper Eq. 66: the stored weight is overwritten in place
    if w.ndim == 4:
        return mk.mp_conv2d(x, w, gain)
    return mk.mp_linear(x, w, gain)


def _mpfourier_forward(m, x):
    """MP Fourier features (spec §1)."""
    return mk.mp_fourier(x, m.freqs, m.phases)


def _residual_sum(x, y, t, clip):
    return mk.mp_sum(x, y, t) if clip is None else mk.mp_sum_clip(x, y, t, clip)


def _block_forward(m, x, emb):
    """Block (spec §2, paper Fig. 21) with the fused ops."""
    x = mk.resample(x, m.resample_mode)
    if m.flavor == "enc":
        if m.conv_skip is not None:
            x = m.conv_skip(x)
        x, y = mk.pixel_norm_mp_silu(x)
    else:
        y = mk.mp_silu(x)
    y = m.conv_res0(y)
    c = m.emb_linear(emb, gain=m.emb_gain) + 1
    y = mk.modulated_mp_silu(y, c)
    if m.training and m.dropout != 0:
        y = torch.nn.functional.dropout(y, p=m.dropout)
    y = m.conv_res1(y)
    if m.flavor == "dec" and m.conv_skip is not None:
        x = m.conv_skip(x)
    if m.num_heads == 0:
        return _residual_sum(x, y, m.res_balance, m.clip_act)  # the clip follows the last sum (step 7)
    x = mk.mp_sum(x, y, m.res_balance)
    y = m.attn_proj(mk.cosine_attention(m.attn_qkv(x), m.num_heads))
    return _residual_sum(x, y, m.attn_balance, m.clip_act)


def _unet_forward(m, x, noise_labels, class_labels):
    """UNet (spec §3): embedding, encoder, decoder with MP concatenation of the skips."""
    emb = m.emb_noise(m.emb_fourier(noise_labels))
    if m.emb_label is not None:
        emb = mk.mp_sum(emb, m.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=m.label_balance)
    emb = mk.mp_silu(emb)
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for name, block in m.enc.items():
        x = block(x) if "conv" in name else block(x, emb)
        skips.append(x)
    for name, block in m.dec.items():
        if "block" in name:
            x = mk.mp_cat(x, skips.pop(), t=m.concat_balance)
        x = block(x, emb)
    return m.out_conv(x, gain=m.out_gain)


_FORWARDS = {"MPConv": _mpconv_forward, "MPFourier": _mpfourier_forward, "Block": _block_forward,
             "UNet": _unet_forward}


def _call(impl, module, backend, *args, **kwargs):
    """The installed ``forward``: ``impl(module, ...)``, under ``backend`` when one is pinned."""
    if backend is None:
        return impl(module, *args, **kwargs)
    with mk.use_backend(backend):
        return impl(module, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Recognition by structure. Each check returns None when the module fits, else the reason.

def _signature(module, required: int, optional: tuple[str, ...] = ()) -> str | None:
    """The class's forward takes exactly ``required`` positional args plus the named optional ones."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return "its forward has no inspectable signature"
    req = [p for p in params if p.default is inspect.Parameter.empty]
    opt = [p.name for p in params if p.default is not inspect.Parameter.empty]
    kinds_ok = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    if not kinds_ok or len(req) != required or opt != list(optional):
        want = ", ".join([f"arg{i}" for i in range(required)] + [f"{o}=..." for o in optional])
        got = ", ".join(str(p) for p in params)
        return f"unexpected forward signature ({got}); expected ({want})"
    return None


def _own_tensors(module) -> tuple[set, set]:
    return ({n for n, _ in module.named_parameters(recurse=False)},
            {n for n, _ in module.named_buffers(recurse=False)})


def _is_number(v, lo=None, hi=None) -> bool:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        return False
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def _check_mpconv(m) -> str | None:
    params, buffers = _own_tensors(m)
    if params != {"weight"} or buffers or any(True for _ in m.children()):
        return f"expected exactly one parameter 'weight' and nothing else, found parameters {sorted(params)}, " \
               f"buffers {sorted(buffers)}, {len(list(m.children()))} submodules"
    w = m.weight
    if w.ndim not in (2, 4) or (w.ndim == 4 and (w.shape[2] != w.shape[3] or w.shape[2] % 2 != 1)):
        return f"weight of shape {tuple(w.shape)} is neither [out, in] nor [out, in, k, k] with odd k"
    if not w.is_floating_point():
        return f"weight has dtype {w.dtype}"
    return _signature(m, 1, ("gain",))


def _check_mpfourier(m) -> str | None:
    params, buffers = _own_tensors(m)
    if params or buffers != {"freqs", "phases"} or any(True for _ in m.children()):
        return f"expected exactly the buffers 'freqs' and 'phases', found parameters {sorted(params)}, " \
               f"buffers {sorted(buffers)}"
    if m.freqs.ndim != 1 or m.freqs.shape != m.phases.shape:
        return f"freqs {tuple(m.freqs.shape)} and phases {tuple(m.phases.shape)} are not matching vectors"
    return _signature(m, 1)


def _check_block(m) -> str | None:
    children = {n for n, _ in m.named_children()}
    extra = children - set(_BLOCK_CHILDREN)
    if extra:
        return f"unexpected submodules {sorted(extra)}"
    params, buffers = _own_tensors(m)
    if params != {"emb_gain"} or buffers - {"resample_filter"}:
        return f"expected the single parameter 'emb_gain', found parameters {sorted(params)}, buffers {sorted(buffers)}"
    if m.emb_gain.numel() != 1:
        return f"emb_gain has shape {tuple(m.emb_gain.shape)}, expected a scalar"
    for name in ("conv_res0", "emb_linear", "conv_res1"):
        if not isinstance(getattr(m, name, None), torch.nn.Module):
            return f"missing submodule {name!r}"
    checks = {
        "flavor": getattr(m, "flavor", None) in ("enc", "dec"),
        "resample_mode": getattr(m, "resample_mode", None) in ("keep", "up", "down"),
        "num_heads": isinstance(getattr(m, "num_heads", None), int) and m.num_heads >= 0,
        "dropout": _is_number(getattr(m, "dropout", None), 0, 1),
        "res_balance": _is_number(getattr(m, "res_balance", None), 0, 1),
        "attn_balance": _is_number(getattr(m, "attn_balance", None), 0, 1),
        "clip_act": getattr(m, "clip_act", 0) is None or (_is_number(getattr(m, "clip_act", None)) and m.clip_act > 0),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        return "missing or unexpected " + ", ".join(f"{k}={getattr(m, k, '<missing>')!r}" for k in bad)
    f = getattr(m, "resample_filter", [1, 1])
    if [float(v) for v in (f.tolist() if isinstance(f, torch.Tensor) else f)] != [1.0, 1.0]:
        return f"resample_filter {f!r} is not [1, 1]"
    for name in ("conv_skip", "attn_qkv", "attn_proj"):
        if not hasattr(m, name) or not (getattr(m, name) is None or isinstance(getattr(m, name), torch.nn.Module)):
            return f"{name} is neither a module nor None"
    if (m.num_heads > 0) != (m.attn_qkv is not None) or (m.attn_qkv is None) != (m.attn_proj is None):
        return f"num_heads={m.num_heads} does not match attn_qkv/attn_proj"
    return _signature(m, 2)


def _check_unet(m) -> str | None:
    children = {n for n, _ in m.named_children()}
    extra = children - set(_UNET_CHILDREN)
    if extra:
        return f"unexpected submodules {sorted(extra)}"
    missing = [n for n in _UNET_CHILDREN if n != "emb_label" and not isinstance(getattr(m, n, None), torch.nn.Module)]
    if missing or not hasattr(m, "emb_label"):
        return f"missing submodules {missing or ['emb_label']}"
    if not all(isinstance(getattr(m, n), torch.nn.ModuleDict) for n in ("enc", "dec")):
        return "enc/dec are not ModuleDicts"
    params, buffers = _own_tensors(m)
    if params != {"out_gain"} or buffers:
        return f"expected the single parameter 'out_gain', found parameters {sorted(params)}, buffers {sorted(buffers)}"
    bad = [k for k in ("label_balance", "concat_balance") if not _is_number(getattr(m, k, None), 0, 1)]
    if bad:
        return "missing or unexpected " + ", ".join(f"{k}={getattr(m, k, '<missing>')!r}" for k in bad)
    return _signature(m, 3)


_CHECKS = {"MPConv": _check_mpconv, "MPFourier": _check_mpfourier, "Block": _check_block, "UNet": _check_unet}


def _kind(m) -> str | None:
    """Which EDM2 module ``m`` looks like (loosely); the checks above decide whether it fits."""
    names = set(vars(m)) | set(m._modules) | set(m._parameters) | set(m._buffers)
    if {"unet", "sigma_data"} <= names:
        return "Precond"
    if {"enc", "dec"} <= names and ("out_conv" in names or "emb_noise" in names):
        return "UNet"
    if len({"conv_res0", "conv_res1", "emb_linear", "emb_gain"} & names) >= 2:
        return "Block"
    if {"freqs", "phases"} <= set(m._buffers):
        return "MPFourier"
    if "weight" in m._parameters and (type(m).__name__ == "MPConv" or not type(m).__module__.startswith("torch.")):
        return "MPConv"
    return None


def _is_own(m) -> bool:
    return type(m).__module__.split(".")[0] in _OWN_PACKAGES


# ------------------------------------------------------------------------------------------------

def undo(net: torch.nn.Module) -> int:
    """Restore the modules' own forward methods everywhere :func:`accelerate` switched them.

    Returns the number of modules restored. State dicts were never changed.
    """
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"net: expected a torch.nn.Module, got {type(net).__name__}")
    count = 0
    for m in net.modules():
        if _MARK in vars(m):
            del m.__dict__[_MARK]
            m.__dict__.pop("forward", None)
            count += 1
    return count


def accelerate(net: torch.nn.Module, backend: str = "auto") -> AccelerateReport:
    """Switch the magnitude-preserving layers of an EDM2-style network to the fused ops, in place.

    ``backend``: ``'auto'`` (the switched modules follow mpkernels' active backend, 'auto' by
    default: the fastest one for the tensors' device), an explicit backend (``'cuda'``,
    ``'triton'``: the switched modules and this project's own modules are pinned to it; calls it
    cannot run fall back to the reference op by op), or ``'reference'``: the release's modules
    get their own forward back (as :func:`undo`) and this project's modules are pinned to the
    reference ops. See the module docstring for what is recognised. Returns an
    :class:`AccelerateReport`; ``print`` it for a summary.
    """
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"net: expected a torch.nn.Module, got {type(net).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    backend = _dispatch._check_name(backend)  # ValueError naming 'backend' for unknown / unavailable
    undo(net)
    pin = None if backend == "auto" else backend
    report = AccelerateReport(backend=backend)
    seen: set[int] = set()

    def install(m, name, impl, kind, why):
        m.__dict__["forward"] = functools.partial(_call, impl, m, pin)
        m.__dict__[_MARK] = kind
        report.switched.append((name, kind, why))

    def visit(m, name):
        if id(m) in seen:
            return
        seen.add(id(m))
        kind = _kind(m)
        if "forward" in vars(m) and _MARK not in vars(m):
            report.left.append((name, kind or type(m).__name__, "its forward is overridden on the instance; left "
                                "as is with its submodules"))
            return
        if kind is not None and _is_own(m):
            if pin is not None:
                install(m, name, type(m).forward, kind, f"already fused (mk ops); pinned to backend {pin!r}")
            else:
                report.switched.append((name, kind, "already fused (mk ops); follows mpkernels' active backend"))
        elif kind == "Precond":
            report.left.append((name, kind, "recognised; its own forward is preconditioning arithmetic only and "
                                            "stays (its submodules are switched)"))
        elif kind is not None:
            problem = _CHECKS[kind](m)
            if problem is not None:
                report.left.append((name, kind, f"{type(m).__name__} looks like a {kind} but {problem}; left as is "
                                                "with its submodules"))
                return
            if backend == "reference":
                report.left.append((name, kind, "backend 'reference': the module's own forward runs"))
            else:
                via = "mpkernels' active backend" if pin is None else f"backend {pin!r}"
                install(m, name, _FORWARDS[kind], kind, f"fused forward ({via})")
        elif not any(True for _ in m.children()) and (m._parameters or m._buffers):
            report.left.append((name, type(m).__name__, "unknown module; left as is"))
        for child_name, child in m.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(net, "")
    return report
