#!/usr/bin/env bash
# GPU validation in one command, sized for the validation machine: one GPU, torch and Triton
# preinstalled, no network, one command of at most 10 minutes, and only the files directly in
# the output folder come back (at most 8).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--dry-run] [--only STAGE,...]
#
# Stages (each time-boxed with `timeout`, so a hang in one still leaves the others' results):
#   env       versions, GPU, cores                                            (GPU_CHECK_T_ENV, 30 s)
#   install   pip install --no-deps --no-build-isolation --no-index -e ., the CUDA extension
#             built for this GPU only (TORCH_CUDA_ARCH_LIST) with all cores    (GPU_CHECK_T_INSTALL, 180 s)
#   tests     the suite on CUDA tensors, as parallel pytest groups (triton, cuda, gpu, rest1/2),
#             never -x: a failure never stops another group; junit xml   (GPU_CHECK_T_TESTS, 170 s)
#   memcheck  compute-sanitizer memcheck of the quick benchmark, beside the tests (GPU_CHECK_T_MEMCHECK, 170 s)
#   bench     the full benchmark (parity, speed, model level), alone on the GPU (GPU_CHECK_T_BENCH, 240 s,
#             cut to what is left of GPU_CHECK_T_TOTAL, 540 s)
# About 8 minutes in all. Triton's tests start during the install (they do not need the extension).
#
# OUT_DIR then holds at most 8 files: summary.md (per-stage result, test counts, key speed-ups,
# environment), tests.log, tests.xml (all groups merged), report.json, report.md, speedup.png
# (the benchmark's) and logs.tar.gz (install, memcheck, benchmark and per-group logs). The summary
# is also printed at the end. Exit status: 0 when every stage that ran passed.
#
# --dry-run   CPU mode for a machine without a GPU: every stage it can (no pip install, a small
#             test selection, the benchmark with --quick --small on two ops, memcheck only if
#             compute-sanitizer exists), same packing. Checks the script before the GPU call.
# --only LIST run only these stages (e.g. tests,bench: a shorter second call on a machine still
#             warm from the first, with the extension already built).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
OUT="" DRY=0 ONLY="env,install,tests,memcheck,bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) shift; ONLY=${1:?--only needs a comma-separated list of stages} ;;
    --only=*) ONLY=${1#--only=} ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check: OUT_DIR given twice ($OUT, $1)" >&2; exit 2; }; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "gpu_check: OUT_DIR (the output folder) is required" >&2; usage >&2; exit 2; }
for s in ${ONLY//,/ }; do
  case "$s" in env|install|tests|memcheck|bench) ;; *) echo "gpu_check: --only: unknown stage '$s'" >&2; exit 2 ;; esac
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -n "$(ls -A "$OUT")" ]; then echo "gpu_check: $OUT is not empty" >&2; exit 2; fi
want() { [[ ",$ONLY," == *",$1,"* ]]; }

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
NPROC=$(nproc 2>/dev/null || echo 4)
T_ENV=${GPU_CHECK_T_ENV:-30} T_INSTALL=${GPU_CHECK_T_INSTALL:-180} T_TESTS=${GPU_CHECK_T_TESTS:-170}
T_MEMCHECK=${GPU_CHECK_T_MEMCHECK:-170} T_BENCH=${GPU_CHECK_T_BENCH:-240}
T_TOTAL=${GPU_CHECK_T_TOTAL:-540}  # the bench gets what is left of this, at most T_BENCH
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # everything raw; only the packed files go to OUT
T0=$(date +%s)
declare -A RESULT SECONDS_OF

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
# finish STAGE RC START: record PASS/FAIL/TIMEOUT (timeout's 124, or 137 after its KILL).
finish() {
  local s=$1 rc=$2 st=$3
  SECONDS_OF[$s]=$(( $(date +%s) - st ))
  case "$rc" in 0) RESULT[$s]=PASS ;; 124|137) RESULT[$s]=TIMEOUT ;; *) RESULT[$s]="FAIL (exit $rc)" ;; esac
  log "$s: ${RESULT[$s]} in ${SECONDS_OF[$s]} s"
}
skip() { RESULT[$1]="SKIPPED ($2)"; SECONDS_OF[$1]=0; log "$1: skipped ($2)"; }
box() { local t=$1; shift; timeout -k 10 "$t" "$@"; }  # a stage's time box (KILL 10 s after TERM)
# pytest's time box: SIGINT first, so an interrupted run still prints its summary and writes junit xml
box_pytest() { local t=$1; shift; timeout -s INT -k 15 "$t" "$@"; }

# --- env -------------------------------------------------------------------------------------
if want env; then
  st=$(date +%s)
  { echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "host: $(hostname)  cores: $NPROC  mode: $([ $DRY = 1 ] && echo dry-run || echo gpu)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
    box "$T_ENV" "$PY" - <<'EOF'
import platform, sys
import numpy, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| numpy", numpy.__version__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("gpu: none")
EOF
    command -v nvidia-smi >/dev/null && box 20 nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
    command -v nvcc >/dev/null && nvcc --version | tail -2 | head -1
  } > "$WORK/env.txt" 2>&1
  finish env $? "$st"
  cat "$WORK/env.txt"
fi

GPU_ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "")

# --- tests: groups start in the background; Triton's during the install ------------------------
declare -A GROUP_PID GROUP_START
if [ "$DRY" = 1 ]; then  # a small selection, shaped like the real groups
  declare -A GROUPS_=(
    [triton]="tests/test_triton_ops.py -k mp_silu and 1x3x1x1"
    [gpu]="tests/test_gpu.py tests/test_kernel_device_plumbing.py -k not cuda_device_never"
  )
  MARK="not slow"
else
  # Not here: the ahead-of-time compiles (CI's, CPU only, minutes) and the interpreter's own tests.
  CPU_ONLY="tests/test_triton_aot.py tests/test_triton_interpreter_compat.py"
  TRITON_FILES=$(ls tests/test_triton_*.py | grep -v -e test_triton_aot.py -e test_triton_interpreter_compat.py | tr '\n' ' ')
  CUDA_FILES=$(ls tests/test_cuda_*.py | tr '\n' ' ')
  GPU_FILES="tests/test_gpu.py tests/test_benchmarks.py tests/test_kernel_device_plumbing.py"
  # Everything else (CPU tests mostly, a few use the GPU when present), in two halves on spare cores.
  REST_A="" REST_B="" i=0
  for f in tests/test_*.py; do
    [[ " $CPU_ONLY $TRITON_FILES $CUDA_FILES $GPU_FILES " == *" $f "* ]] && continue
    if (( i++ % 2 )); then REST_B+="$f "; else REST_A+="$f "; fi
  done
  declare -A GROUPS_=([triton]="$TRITON_FILES" [cuda]="$CUDA_FILES" [gpu]="$GPU_FILES" [rest1]="$REST_A"
                      [rest2]="$REST_B")
  MARK="gpu or not slow"
fi
start_group() {
  local g=$1 spec=${GROUPS_[$1]} files kexpr=""
  files=${spec%% -k *}; [[ "$spec" == *" -k "* ]] && kexpr=${spec#* -k }
  GROUP_START[$g]=$(date +%s)
  # shellcheck disable=SC2086  # the file list is meant to split
  ( if [ -n "$kexpr" ]; then set -- -k "$kexpr"; else set --; fi
    box_pytest "$T_TESTS" "$PY" -m pytest -q -rfEs -p no:cacheprovider -m "$MARK" --junitxml="$WORK/tests-$g.xml" \
      -o junit_suite_name="$g" $files "$@" > "$WORK/tests-$g.log" 2>&1 ) &
  GROUP_PID[$g]=$!
  log "tests[$g] started (pid ${GROUP_PID[$g]})"
}
export MPKERNELS_REQUIRE_EXT=$([ "$DRY" = 1 ] && echo 0 || echo 1)  # on the GPU a missing extension fails its tests
want tests && start_group triton

# --- install ------------------------------------------------------------------------------------
if want install; then
  st=$(date +%s)
  if [ "$DRY" = 1 ]; then
    { echo "dry run: would run (TORCH_CUDA_ARCH_LIST from the GPU, MAX_JOBS=$NPROC):"
      echo "  MPKERNELS_BUILD_EXT=1 $PY -m pip install --no-deps --no-build-isolation --no-index -e ."
      box "$T_INSTALL" "$PY" -c "import mpkernels as mk; print('backends', mk.available_backends(), mk._backends.load_errors())"
    } > "$WORK/install.log" 2>&1
  else
    { echo "TORCH_CUDA_ARCH_LIST=$GPU_ARCH MAX_JOBS=$NPROC"
      TORCH_CUDA_ARCH_LIST=$GPU_ARCH MAX_JOBS=$NPROC MPKERNELS_BUILD_EXT=1 box "$T_INSTALL" \
        "$PY" -m pip install -v --no-deps --no-build-isolation --no-index -e . &&
      "$PY" -c "import mpkernels as mk; print('backends', mk.available_backends(), mk._backends.load_errors()); assert 'cuda' in mk.available_backends()"
    } > "$WORK/install.log" 2>&1
  fi
  finish install $? "$st"
  tail -2 "$WORK/install.log"
fi

if want tests; then
  for g in "${!GROUPS_[@]}"; do [ "$g" = triton ] || start_group "$g"; done
fi

# --- memcheck, beside the tests (correctness only; timings are the bench's) ------------------------
if want memcheck; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    st=$(date +%s)
    box "$T_MEMCHECK" compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 50 "$PY" -m benchmarks \
      --quick --small --no-model --no-compile --out "$WORK/memcheck-bench" > "$WORK/memcheck.log" 2>&1
    finish memcheck $? "$st"
  else
    skip memcheck "compute-sanitizer not found"
  fi
fi

if want tests; then
  for g in "${!GROUP_PID[@]}"; do
    wait "${GROUP_PID[$g]}"
    finish "tests[$g]" $? "${GROUP_START[$g]}"  # pytest's 5 (nothing ran) counts as a failure too
    tail -1 "$WORK/tests-$g.log"
  done
fi

# --- bench: alone on the GPU ----------------------------------------------------------------------
if want bench; then
  st=$(date +%s)
  left=$(( T_TOTAL - (st - T0) - 15 ))  # 15 s for packing
  [ "$left" -lt "$T_BENCH" ] && T_BENCH=$(( left > 60 ? left : 60 ))
  log "bench: time box $T_BENCH s"
  if [ "$DRY" = 1 ]; then
    box "$T_BENCH" "$PY" -m benchmarks --quick --small --no-model --no-compile --ops mp_silu,mp_sum \
      --out "$WORK/bench" > "$WORK/bench.log" 2>&1
  else
    box "$T_BENCH" "$PY" -m benchmarks --out "$WORK/bench" > "$WORK/bench.log" 2>&1
  fi
  finish bench $? "$st"
fi

# --- pack: at most 8 files directly in OUT -----------------------------------------------------------
PACK_ARGS=(--work "$WORK" --out "$OUT" --elapsed $(( $(date +%s) - T0 )) --mode "$([ $DRY = 1 ] && echo dry-run || echo gpu)")
for s in "${!RESULT[@]}"; do PACK_ARGS+=(--stage "$s=${RESULT[$s]}=${SECONDS_OF[$s]}"); done
"$PY" "$ROOT/benchmarks/gpu_check_pack.py" "${PACK_ARGS[@]}"
status=$?
rm -rf "$WORK"
exit $status
