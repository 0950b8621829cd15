#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with test, benchmark and training extras.
# Idempotent: a second run only re-installs the project itself. Nothing is downloaded beyond
# the package registries (torch comes from pip's index or the machine's local copy).
set -euo pipefail
export MAX_JOBS=${MAX_JOBS:-2}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
fi
# torch first: the project's build step looks at it to decide about the CUDA extension.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch>=2.4"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[all]"
.venv/bin/python -c "import mpkernels, edm2fast; print('mpkernels', mpkernels.__version__, 'backends:', mpkernels.available_backends())"
