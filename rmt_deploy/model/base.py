"""Building the Hugging Face base model of an RMT from a plain config dict."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from rmt_deploy.errors import CheckpointError

#: The attention kernel of the reference and of exported graphs. "eager" exports as
#: plain MatMul/Softmax (fast in ONNX Runtime) and matches "sdpa" to float rounding.
ATTENTION = "eager"


def hf_config(base_config: dict[str, Any]) -> transformers.PretrainedConfig:
    """A transformers config from its ``to_dict()`` form."""
    values = dict(base_config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise CheckpointError("base model config has no 'model_type'; pass a config.json "
                              "written by transformers")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"unsupported base model type {model_type!r}: {error}") from None


def build_encoder_base(config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    """A sequence-classification model (BERT family) with random weights."""
    return transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation=ATTENTION
    )


def build_decoder_base(config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    """A causal language model (GPT-2) with random weights."""
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION)


class StepVariant(torch.nn.Module):
    """One method of an RMT (``forward``, ``write``, ``prefill``, ``decode``) as a module
    of its own, for export: ``forward(*inputs)`` calls it with the variant's inputs."""

    def __init__(self, rmt: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.rmt, self.method = rmt, method

    def forward(self, *inputs: torch.Tensor):
        return getattr(self.rmt, self.method)(*inputs)
