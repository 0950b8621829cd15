"""``mp_weights``: the effective weights of many MPConv layers in one call (spec §1 MPConv steps 1, 3, 4).

``out[i] = mp_weight(weights[i], gains[i], eps, qkv_heads=qkv_heads[i]).to(dtypes[i])``: per output
row an fp32 norm, the scale ``gain / sqrt(fan_in)``, one rounding to the output dtype, the result
in ``weights[i]``'s memory layout. A fast backend computes all results of one output dtype with
one kernel launch, and all weight gradients of that dtype with one more (see the backends).

This module validates and normalizes the arguments and dispatches ``"mp_weights"`` with five
lists of equal length: ``weights`` (tensors), ``gains`` (float | one-element tensor),
``eps`` (float), ``qkv_heads`` (int | None), ``dtypes`` (torch dtypes).

``force_normalize=True`` first applies forced weight normalization to every weight in place
(spec §1 MPConv step 2), as :func:`mpkernels.force_normalize_` would: ``"mp_weights_forced"``
(same arguments) on a backend that fuses both (Triton: one launch per dtype for both), else
``"force_normalize_"`` then ``"mp_weights"``, each dispatched, on the backend that serves
``"mp_weights"``.
"""

from __future__ import annotations

import math

import torch

from . import _dispatch
from . import _validate as V
from ._dispatch import dispatch

__all__ = ["mp_weights"]

FORCE_EPS = 1e-4  # eps of the forced normalization: mpkernels.force_normalize_'s default (spec §1)

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _per_weight(arg, n: int, name: str, default) -> list:
    """``arg`` as a list of ``n`` entries: None gives ``n`` defaults, a list must have ``n`` entries."""
    if arg is None:
        return [default] * n
    if not isinstance(arg, (list, tuple)):
        raise TypeError(f"{name}: expected None or a list with one entry per weight, got {type(arg).__name__}")
    if len(arg) != n:
        raise ValueError(f"{name}: {len(arg)} entries but weights has {n}")
    return list(arg)


def _heads(h, w: torch.Tensor, name: str) -> int | None:
    if h is None:
        return None
    if isinstance(h, bool) or not isinstance(h, int) or h < 1:
        raise ValueError(f"{name}: expected a positive int or None, got {h!r}")
    if w.shape[0] % (3 * h) != 0:
        raise ValueError(f"{name}: {h} heads of q, k and v do not divide the {w.shape[0]} output rows of the weight")
    return h


def _dtype(d, name: str) -> torch.dtype:
    if not isinstance(d, torch.dtype):
        raise TypeError(f"{name}: expected a torch.dtype, got {type(d).__name__}")
    if d not in OUT_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {d}; expected float32, float16, bfloat16 or float64")
    return d


def mp_weights(weights, gains=None, eps: float = 1e-4, *, qkv_heads=None, dtypes=None,
               force_normalize: bool = False) -> list[torch.Tensor]:
    """Effective weights ``normalize(w) * gain / sqrt(fan_in)`` of many MPConv layers at once; spec §1.

    ``weights``: list of float tensors with >= 2 dims on one device (MPConv parameters).
    ``gains``: None (all 1.0) or one gain per weight: a real number or a one-element float
    tensor on the weights' device (a learned scalar, differentiable).
    ``qkv_heads``: None or one entry per weight, None or the head count of a qkv projection
    whose result rows come out head-contiguous (as :func:`mpkernels.mp_weight`).
    ``dtypes``: None (float32), one dtype for all, or one per weight.
    ``force_normalize``: first replace every weight in place by ``normalize(w)`` (forced weight
    normalization, paper Eq. 66, eps 1e-4), without autograd, bumping its version counter; the
    results and their gradients are then those of the updated weights. The same as
    ``mpkernels.force_normalize_(weights)`` followed by this call without the flag, in one launch
    per output dtype on Triton. The weights must not overlap in memory (``ValueError``).

    Returns a list: ``out[i] == mp_weight(weights[i], gains[i], eps, qkv_heads=qkv_heads[i]).to(dtypes[i])``
    (one rounding, ``weights[i]``'s memory layout), differentiable in every weight and tensor gain.
    """
    ws = V.tensor_list(weights, "weights")
    n = len(ws)
    for i, w in enumerate(ws):
        if w.ndim < 2 or w.numel() == 0:  # the name only on a failure
            V.tensor(w, f"weights[{i}]", min_ndim=2)
    if n:
        V.same_device_lists([("weights", ws)])
    device = ws[0].device if n else None
    gs = [g if type(g) is float and math.isfinite(g) else V.gain(g, f"gains[{i}]", device=device)  # floats: fast path
          for i, g in enumerate(_per_weight(gains, n, "gains", 1.0))]
    eps = V.eps(eps)
    hs = [_heads(h, w, f"qkv_heads[{i}]") for i, (h, w) in enumerate(zip(_per_weight(qkv_heads, n, "qkv_heads", None),
                                                                          ws))]
    if isinstance(dtypes, torch.dtype):
        dts = [_dtype(dtypes, "dtypes")] * n
    else:
        dts = [_dtype(d, f"dtypes[{i}]") for i, d in enumerate(_per_weight(dtypes, n, "dtypes", torch.float32))]
    if not isinstance(force_normalize, bool):
        raise TypeError(f"force_normalize: expected a bool, got {type(force_normalize).__name__}")
    if not n:
        return []
    if not force_normalize:
        return dispatch("mp_weights", ws, gs, eps, hs, dts)
    V.no_overlap([("weights", ws, True)])  # as force_normalize_: each weight is written in place
    return _forced(ws, gs, eps, hs, dts)


def _forced(ws, gs, eps, hs, dts) -> list[torch.Tensor]:
    """``force_normalize_`` + ``mp_weights`` on the backend that serves ``mp_weights`` for these arguments:
    its fused ``mp_weights_forced`` when it has one, else the two ops dispatched one after the other."""
    args = (ws, gs, eps, hs, dts)
    backend, plain = _dispatch.implementation("mp_weights", args)
    try:
        fused_backend, fused = _dispatch.implementation("mp_weights_forced", args, backend=backend)
    except _dispatch.BackendUnavailableError:  # strict mode, and the backend has no fused op
        fused_backend = None
    if fused_backend == backend:
        return fused(*args)
    with torch.no_grad():
        dispatch("force_normalize_", ws, FORCE_EPS)
    return plain(*args)
