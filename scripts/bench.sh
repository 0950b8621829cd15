#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh) and runs the main job: the parity and benchmark suite.
# Extra arguments go to `python -m benchmarks` (see `python -m benchmarks --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m benchmarks "$@"
