#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh) and runs the test suite, then the quick benchmark
# (parity of every op on every backend; fails on any parity failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m pytest -q "$@"
