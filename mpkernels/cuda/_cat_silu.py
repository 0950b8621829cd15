"""``mp_cat_mp_silu`` on the extension: its ``mp_cat`` kernel, then its ``mp_silu`` kernel.

Two launches forward and three backward (the two uses of ``x`` are summed by autograd), against
one each on the Triton backend's fused kernel; still far fewer than the reference's. Registered
only once the extension serves ``mp_cat`` itself (else the reference composition is as good).
"""

from __future__ import annotations

from .. import _dispatch
from . import _ops


def mp_cat_mp_silu(a, b, dim, t):
    x = _dispatch.implementation("mp_cat", (a, b, dim, t), backend="cuda")[1](a, b, dim, t)
    return x, _ops.get().mp_silu(x)


def _supports(a, b, dim=1, t=0.5) -> bool:
    from . import _ok
    impl = _dispatch._IMPLS.get(("mp_cat", "cuda"))
    return impl is not None and _ok(a, b) and (impl.supports is None or bool(impl.supports(a, b, dim, t)))


_dispatch.register("mp_cat_mp_silu", "cuda", mp_cat_mp_silu, devices=("cuda", "cpu"), supports=_supports)
