#!/usr/bin/env bash
# Set up the environment and run the linter and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${RMT_VENV:-.venv}
"$VENV/bin/ruff" check rmt_deploy tests benchmarks
"$VENV/bin/python" -m pytest -q
