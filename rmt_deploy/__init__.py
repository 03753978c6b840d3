"""rmt-deploy: export, compile and run Recurrent Memory Transformers.

Importing the package is free: torch, onnxruntime and TensorRT load only when a
module that needs them is used.
"""

import os

from rmt_deploy.errors import RmtError

# onnxruntime's telemetry writes a session file (.ses) into TMPDIR when it is imported,
# unless this is set first; rmt-deploy leaves nothing in TMPDIR.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
__all__ = ["RmtError", "__version__"]
