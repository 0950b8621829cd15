#!/usr/bin/env bash
# The README demo: a class-conditional EDM2 model of the built-in handwritten digits (scikit-learn,
# 16x16, no download), trained on the CPU; then the post-hoc EMA sweep (the paper's EMA-length
# experiment in miniature), a grid of samples and their scores.
#
#   scripts/demo_digits.sh [OUTDIR]          (default: runs/digits-demo)
#
# Outputs: OUTDIR/sweep/sweep.png (FD and class accuracy vs sigma_rel), OUTDIR/samples/grid.png
# (one column per digit), OUTDIR/best/phema-profiles.png, OUTDIR/metrics.json.
# Re-running resumes an interrupted training (or skips a finished one) and redoes the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/digits-demo}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Busy-waiting OpenMP threads slow everything down when the cores are shared with other work.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
edm() { "$PY" -m edm2fast "$@"; }
start=$(date +%s)

# 1. Train (preset 'digits': 1.2M parameters, batch 128, 64Ki images; EMA snapshots every 4Ki images).
edm train --outdir "$OUT" --data digits16 --preset digits --no-progress
trained=$(date +%s)

# 2. Post-hoc EMA sweep: reconstruct each sigma_rel from the snapshots, sample 300 digits, score them.
edm sweep --indir "$OUT" --std 0.02,0.04,0.07,0.10,0.15,0.20 --num 300 --steps 16 --outdir "$OUT/sweep"
best=$("$PY" -c "import json, sys; r = json.load(open(sys.argv[1]))['results']; \
print(min(r, key=lambda m: m['fd'])['sigma_rel'])" "$OUT/sweep/sweep.json")

# 3. The best EMA length as a snapshot file, with a plot of how it was assembled.
edm phema --indir "$OUT" --std "$best" --outdir "$OUT/best" --plot
net=$(ls "$OUT"/best/*.safetensors | head -n 1)

# 4. A grid of samples (column = requested digit) and the scores of 500 samples.
edm generate --net "$net" --seeds 0-99 --class cycle --grid-cols 10 --no-images --outdir "$OUT/samples"
edm eval --net "$net" --num 500 --json "$OUT/metrics.json"

end=$(date +%s)
echo "demo done in $((end - start)) s (training $((trained - start)) s)"
echo "  sweep plot:   $OUT/sweep/sweep.png"
echo "  samples:      $OUT/samples/grid.png"
echo "  metrics:      $OUT/metrics.json"
