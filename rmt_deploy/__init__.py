"""rmt-deploy: export, compile and run Recurrent Memory Transformers.

Importing the package is free: torch, onnxruntime and TensorRT load only when a
module that needs them is used.
"""

from rmt_deploy.errors import RmtError

__version__ = "0.1.0"
__all__ = ["RmtError", "__version__"]
