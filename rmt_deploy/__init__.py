"""rmt-deploy: export, compile and run Recurrent Memory Transformers.

Importing the package is cheap: torch, onnxruntime and TensorRT load only when a
module that needs them is used. It sets two environment variables first (below).
"""

import os

from rmt_deploy.errors import RmtError
from rmt_deploy.files import cache_folder

# rmt-deploy leaves nothing in TMPDIR. onnxruntime's telemetry writes a session file
# (.ses) there when it is imported, unless this is set first; torch (imported by the
# exporter and the reference backend) creates its compiler cache folder there unless it
# is told another: rmt-deploy's own cache folder.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
if (_cache := cache_folder()) is not None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_cache / "torchinductor"))
del _cache

__version__ = "0.1.0"
__all__ = ["RmtError", "__version__"]
