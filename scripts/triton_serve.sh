#!/usr/bin/env bash
# Start Triton from .venv-triton (scripts/setup_triton.sh) on a model repository written
# by rmt-triton (python backend):
#   scripts/triton_serve.sh REPO [tritonserver options, e.g. --http-port 8000]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${RMT_TRITON_VENV:-$ROOT/.venv-triton}
if [ $# -lt 1 ]; then
    echo "usage: $0 REPO [tritonserver options]" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "$0: no Triton environment at $VENV; run bash scripts/setup_triton.sh" >&2
    exit 1
fi
REPO=$1
shift
read -r SERVER LIBS LIBDIR < <("$VENV/bin/python" -c '
import importlib.util, sysconfig
from pathlib import Path
package = Path(importlib.util.find_spec("pytriton").submodule_search_locations[0])
print(package / "tritonserver", package.parent / "nvidia_pytriton.libs",
      sysconfig.get_config_var("LIBDIR"))')
# The python stub links the system libpython (LIBDIR) and finds the venv through PATH.
export LD_LIBRARY_PATH="$LIBDIR:$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$VENV/bin:$PATH"
exec "$SERVER/bin/tritonserver" --model-repository "$REPO" \
    --backend-directory "$SERVER/backends" --cache-directory "$SERVER/caches" "$@"
