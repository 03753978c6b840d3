"""The reference RMT in PyTorch: step modules, the recurrent loop, checkpoint formats.

Importing this package imports torch and transformers.
"""

from rmt_deploy.model.decoder import DecoderRMT
from rmt_deploy.model.encoder import EncoderRMT
from rmt_deploy.model.loop import DecoderResult, EncoderResult, run_decoder, run_encoder

__all__ = [
    "DecoderRMT",
    "DecoderResult",
    "EncoderRMT",
    "EncoderResult",
    "run_decoder",
    "run_encoder",
]
