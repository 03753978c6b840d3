#!/usr/bin/env bash
# Create .venv (if missing) and install rmt-deploy with its export, OpenVINO, plot, dev and
# serving extras.
# torch is pinned to the CPU build first so no multi-GB CUDA build gets pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RMT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[export,openvino,plot,dev,serving]"
