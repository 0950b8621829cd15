"""Loading of the optional fast backends.

Each backend module registers itself with :mod:`mpkernels._dispatch` when
imported. A backend whose dependencies are missing (no Triton, no compiled
extension) is skipped silently here; ``available_backends()`` tells what loaded,
and ``load_errors()`` says why the others did not.
"""

from __future__ import annotations

import importlib

# Module paths of optional backends, in no particular order (priorities decide).
BACKEND_MODULES: tuple[str, ...] = ("mpkernels.triton", "mpkernels.cuda")

_ERRORS: dict[str, str] = {}


def load_all() -> None:
    for mod in BACKEND_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as e:  # ImportError, or a broken optional dependency
            _ERRORS[mod] = f"{type(e).__name__}: {e}"


def load_errors() -> dict[str, str]:
    return dict(_ERRORS)
