#!/usr/bin/env bash
# The Triton tests under the GPU machine's versions: torch 2.11.0 + Triton 3.6.0, in .venv-compat/
# (created on first use, next to the main .venv). Extra pytest arguments are passed on.
#
# The torch 2.11 wheel is a CUDA build whose import needs the CUDA libraries (cuDNN, cuBLAS,
# NCCL, ...: about 3 GB as pip packages). When the main .venv's torch is a CUDA 13 build, those
# libraries are already there: torch and Triton are installed without dependencies (~530 MB
# download) and the main .venv's nvidia/ folder is linked in (same sonames; nothing runs on a
# GPU here). Otherwise, or when torch still fails to import, the full install is done.
#
# Selection: the Triton test files (tests/test_triton_*.py, the AOT compile check included, and the
# multi-tensor mp_weights / fused mp_cat_mp_silu / block-boundary / cpu_conv / force_finite_ /
# multi-tensor safety tests, with their 'cuda' backend cases),
# without slow tests, the torch.compile model test (minutes in the interpreter) and the trainer
# test of force_finite_ (the digits dataset needs scikit-learn, which this venv does not install);
# about 8 minutes on 2 cores (most of it the AOT compiles), plus 41 s to create the venv the first time.
# Then the torch.compile tests of the network and the training step (about 4 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${COMPAT_TORCH:-2.11.0}
TRITON=${COMPAT_TRITON:-3.6.0}
V=.venv-compat
PY=${PYTHON:-python3}
t0=$(date +%s)

installed() {
  "$V/bin/python" - "$TORCH" "$TRITON" <<'EOF' 2>/dev/null
import sys, torch, triton, numpy, pytest
sys.exit(0 if (torch.__version__.split("+")[0], triton.__version__) == tuple(sys.argv[1:3]) else 1)
EOF
}

if ! installed; then
  [ -x "$V/bin/python" ] || "$PY" -m venv "$V"
  pip() { "$V/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
  # torch's own pure-Python dependencies, and what the tests import.
  pip typing_extensions filelock sympy networkx jinja2 fsspec numpy safetensors Pillow pytest
  site=$("$V/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  main_nvidia=$(.venv/bin/python -c "import sysconfig, os; p = os.path.join(sysconfig.get_paths()['purelib'], 'nvidia'); print(p if os.path.isdir(os.path.join(p, 'cudnn')) else '')" 2>/dev/null || true)
  if [ -n "$main_nvidia" ]; then
    pip --no-deps "torch==$TORCH" "triton==$TRITON"
    [ -e "$site/nvidia" ] || ln -s "$main_nvidia" "$site/nvidia"
  fi
  if ! installed; then
    echo "test_compat: linking the main .venv's CUDA libraries did not work; full install of torch $TORCH" >&2
    [ -L "$site/nvidia" ] && rm "$site/nvidia"
    pip "torch==$TORCH" "triton==$TRITON"
  fi
  installed || { echo "test_compat: torch $TORCH / Triton $TRITON do not import in $V" >&2; exit 1; }
fi
"$V/bin/python" -c "import torch, triton, numpy; print('compat: torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
echo "compat: environment ready in $(( $(date +%s) - t0 )) s"
# The extension's C++ CPU twins under torch 2.11: built (just in time, cached per source hash) before
# the tests are collected, so the 'cuda' backend's parametrizations are always in the selection; a
# test's fixture would otherwise build it midway, after collection had left them out. A failed build
# is reported, and those tests skip.
"$V/bin/python" -c "import mpkernels.cuda as mc; mc.is_available() or mc.build()" \
  && echo "compat: extension ready in $(( $(date +%s) - t0 )) s" \
  || echo "compat: the mpkernels extension did not build under torch $TORCH; its tests skip" >&2
"$V/bin/python" -m pytest -q -p no:cacheprovider -m "not slow and not gpu" \
  -k "not test_precond_compiled and not test_trainer_step_zeroes_nonfinite" \
  tests/test_triton_*.py tests/test_mp_weights.py tests/test_mp_weights_forced.py tests/test_mp_cat_silu.py \
  tests/test_sum_norm_silu.py tests/test_sum_cat_silu.py tests/test_up_silu.py tests/test_cpu_conv.py \
  tests/test_force_finite.py tests/test_multi_tensor_safety.py "$@"
# torch.compile of the EDM2 network and of the whole training step under torch 2.11's Dynamo and
# Inductor, with the extension's CPU twins (no interpreter: about 4 minutes). Without extra arguments only.
if [ $# -eq 0 ]; then
  "$V/bin/python" -m pytest -q -p no:cacheprovider -m "not gpu" -k "compile or cpp_wrapper" \
    tests/test_step_capture.py tests/test_networks.py tests/test_cpp_wrapper.py tests/test_accelerate.py \
    tests/test_nn_modules.py
fi
echo "compat: done in $(( $(date +%s) - t0 )) s"
