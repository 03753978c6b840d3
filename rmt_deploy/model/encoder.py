"""The encoder RMT (BERT family) of "Scaling Transformer to 1M tokens and beyond"."""

from __future__ import annotations

import torch
from torch import nn

from rmt_deploy.spec import RMTConfig


class EncoderRMT(nn.Module):
    """A sequence classifier whose ``forward`` is one pure segment step.

    ``forward(input_ids, attention_mask, memory) -> (logits, new_memory)`` where
    ``input_ids`` is the full layout ``[CLS] mem.. [SEP] tokens [SEP] [PAD]..``. The memory
    replaces the word embeddings of the placeholder positions 1..M and goes through the
    rest of the embedding layer (positions, token type, LayerNorm), as the authors do.
    The new memory is the last layer's output at positions 1..M.
    """

    def __init__(self, model: nn.Module, config: RMTConfig) -> None:
        super().__init__()
        self.model = model
        self.rmt_config = config

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """The learned initial memory: word embeddings of the memory token ids."""
        ids = torch.tensor(self.rmt_config.mem_token_ids, dtype=torch.long)
        memory = self.model.get_input_embeddings().weight[ids]
        return memory.unsqueeze(0).expand(batch_size, -1, -1)

    def _embeds(self, input_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        m = self.rmt_config.num_mem_tokens
        embeds = self.model.get_input_embeddings()(input_ids)
        return torch.cat([embeds[:, :1], memory.to(embeds.dtype), embeds[:, 1 + m :]], dim=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.rmt_config.num_mem_tokens
        out = self.model(
            inputs_embeds=self._embeds(input_ids, memory),
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            output_hidden_states=True,
        )
        return out.logits, out.hidden_states[-1][:, 1 : 1 + m]

    def write(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> torch.Tensor:
        """The new memory alone: the step without the classifier."""
        m = self.rmt_config.num_mem_tokens
        out = self.model.base_model(
            inputs_embeds=self._embeds(input_ids, memory),
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        )
        return out.last_hidden_state[:, 1 : 1 + m]
