"""rmt-deploy: export, compile and run Recurrent Memory Transformers.

Importing the package is cheap: torch, onnxruntime and TensorRT load only when a
module that needs them is used. It sets two environment variables first (below).
"""

import atexit
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from rmt_deploy.errors import RmtError
from rmt_deploy.files import cache_folder, can_create


def _torch_cache() -> str:
    """torch's compiler cache folder (torch creates it when it is imported): inside
    rmt-deploy's cache folder where that can be written; else a folder of this process's
    own in TMPDIR, removed when it exits (a read-only or missing home still runs)."""
    cache = cache_folder()
    if cache is not None and can_create(cache / "torchinductor"):
        return str(cache / "torchinductor")
    scratch = Path(tempfile.gettempdir()) / f"rmt-deploy-torch-{os.getpid()}-{uuid.uuid4().hex}"
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # a name no one else had
    return str(scratch)


# rmt-deploy leaves nothing in TMPDIR. onnxruntime's telemetry writes a session file
# (.ses) there when it is imported, unless this is set first; torch (imported by the
# exporter and the reference backend) creates its compiler cache folder there unless it
# is told another.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _torch_cache()

__version__ = "0.1.0"
__all__ = ["RmtError", "__version__"]
