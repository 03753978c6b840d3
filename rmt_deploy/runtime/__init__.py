"""The runtime: one segment loop over pluggable backends, and the Python API.

Needs numpy and tokenizers, plus the engine of the chosen backend; never torch, except
for the torch backend that runs checkpoints.
"""

from rmt_deploy.runtime.batcher import StepBatcher
from rmt_deploy.runtime.model import RMTModel
from rmt_deploy.runtime.opener import open_model
from rmt_deploy.runtime.pool import SessionPool
from rmt_deploy.runtime.results import DecoderOutput, EncoderOutput, Run
from rmt_deploy.runtime.session import StreamSession

__all__ = ["DecoderOutput", "EncoderOutput", "RMTModel", "Run", "SessionPool", "StepBatcher",
           "StreamSession", "open_model"]
