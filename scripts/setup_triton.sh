#!/usr/bin/env bash
# Create .venv-triton: a real tritonserver (the binary the nvidia-pytriton wheel ships,
# python backend only) with what the python-backend model needs: numpy<2 (PyTriton's
# requirement), onnxruntime, tokenizers and rmt-deploy itself, without torch.
# Also Debian's nginx (the balancer of scripts/triton_replicas.sh), where it is missing.
# Idempotent: an existing environment is updated in place. ~45 s the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RMT_TRITON_VENV:-.venv-triton}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "nvidia-pytriton==0.7.0" "numpy<2" onnxruntime "tokenizers>=0.15" "click>=8.1"
"${PIP[@]}" --no-deps -e .
# The python backend runs the stub built for this interpreter's Python, from beside
# libtriton_python.so (PyTriton copies it there only when it starts a server itself).
"$VENV/bin/python" - <<'PY'
import importlib.util, shutil, sys
from pathlib import Path

server = Path(importlib.util.find_spec("pytriton").submodule_search_locations[0]) / "tritonserver"
version = f"{sys.version_info.major}.{sys.version_info.minor}"
stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
if not stub.is_file():
    sys.exit(f"setup_triton.sh: PyTriton ships no python backend stub for Python {version}")
shutil.copy2(stub, server / "backends" / "python" / stub.name)
PY
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    SUDO=()
    [ "$(id -u)" = 0 ] || SUDO=(sudo)
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light
fi
echo "setup_triton.sh: tritonserver ready in $VENV (start it with scripts/triton_serve.sh REPO)"
