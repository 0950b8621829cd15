#!/usr/bin/env bash
# GPU validation in one command, for a machine with a CUDA GPU, torch and Triton preinstalled and no
# network: installs the project without touching the installed torch/Triton, builds the CUDA extension,
# runs the GPU test suite, compute-sanitizer memcheck on a representative subset, and the full benchmark.
# Results go to benchmarks/results/<gpu>-<date>/ (commit them). Budget: about 9 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo unknown)
OUT=${OUT_DIR:-benchmarks/results/${GPU}-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
status=0

log "versions"
{ nvidia-smi || true; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } >> "$OUT/gpu_check.log" 2>&1

log "install (no deps, no build isolation, extension built if nvcc is present)"
"$PY" -m pip install --no-deps --no-build-isolation --no-index -e . >> "$OUT/install.log" 2>&1 || { log "install FAILED"; status=1; }
"$PY" -c "import mpkernels as mk; print('backends', mk.available_backends(), mk._backends.load_errors())" 2>&1 | tee -a "$OUT/gpu_check.log"

log "GPU test suite"
timeout 240 "$PY" -m pytest -q -x tests -m "gpu or not slow" -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  > "$OUT/tests.log" 2>&1 || { log "tests FAILED (see tests.log)"; status=1; }
tail -5 "$OUT/tests.log" | tee -a "$OUT/gpu_check.log"

if command -v compute-sanitizer >/dev/null 2>&1; then
  log "compute-sanitizer memcheck (subset)"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m benchmarks --quick --small \
    --no-model --no-compile --out "$OUT/memcheck" > "$OUT/memcheck.log" 2>&1 || { log "memcheck FAILED"; status=1; }
  grep -E "ERROR SUMMARY|========= " "$OUT/memcheck.log" | tail -3 | tee -a "$OUT/gpu_check.log"
else
  log "compute-sanitizer not found; memcheck skipped"
fi

log "full benchmark"
timeout 300 "$PY" -m benchmarks --out "$OUT/bench" > "$OUT/bench.log" 2>&1 || { log "benchmark FAILED or parity failed"; status=1; }
tail -40 "$OUT/bench.log" | tee -a "$OUT/gpu_check.log"
log "done, status $status; results in $OUT"
exit $status
