"""The runtime: one segment loop over pluggable backends, and the Python API.

Needs numpy and tokenizers, plus the engine of the chosen backend; never torch, except
for the torch backend that runs checkpoints.
"""

from rmt_deploy.runtime.model import RMTModel
from rmt_deploy.runtime.opener import open_model
from rmt_deploy.runtime.results import DecoderOutput, EncoderOutput, Run

__all__ = ["DecoderOutput", "EncoderOutput", "RMTModel", "Run", "open_model"]
