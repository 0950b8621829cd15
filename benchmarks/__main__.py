import os
import sys

# Without a GPU, Triton kernels can only run under the interpreter, which Triton reads when
# kernels are decorated: set it before mpkernels is imported.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_root, os.path.join(_root, "python")):
    if _p not in sys.path:
        sys.path.append(_p)

from benchmarks.run import main  # noqa: E402

sys.exit(main())
