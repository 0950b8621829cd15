"""edm2fast: EDM2 model, training, post-hoc EMA and sampling on top of mpkernels.

``edm2fast.accelerate(net)`` switches an existing EDM2-style network (the authors' release,
a port or a fork) to the fused kernels in place; see :mod:`edm2fast.accelerate`.
"""

__version__ = "0.1.0"

from .accelerate import AccelerateReport, accelerate  # noqa: E402  (binds the function over the submodule name)
from .accelerate import undo as undo_accelerate  # noqa: E402

__all__ = ["accelerate", "undo_accelerate", "AccelerateReport"]
