#!/usr/bin/env bash
# Set up the environment and run the linter and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The Triton server tests need .venv-triton (tritonserver, python backend); ~45 s to create.
bash scripts/setup_triton.sh
export RMT_REQUIRE_TRITON=1
VENV=${RMT_VENV:-.venv}
"$VENV/bin/ruff" check rmt_deploy tests benchmarks
"$VENV/bin/python" -m pytest -q
