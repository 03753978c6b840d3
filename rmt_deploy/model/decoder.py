"""The decoder RMT (GPT-2) of BABILong: read and write memory slots around a segment."""

from __future__ import annotations

import torch
from torch import nn

from rmt_deploy.spec import RMTConfig


class DecoderRMT(nn.Module):
    """A causal LM whose ``forward`` is one pure segment step.

    ``forward(input_ids, attention_mask, memory) -> (logits, new_memory)``: the step runs
    ``[memory ; tokens ; memory]``; logits are those of the token positions and the new
    memory is the final-LayerNorm output at the write slots. Rows may be right-padded:
    each row's write slots take the positions right after its last real token, so a
    padded row computes exactly what it computes alone.
    """

    def __init__(self, model: nn.Module, config: RMTConfig, memory: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.rmt_config = config
        if memory is None:
            std = model.get_input_embeddings().weight.detach().std()
            memory = torch.randn(config.num_mem_tokens, config.hidden_size) * std
        self.memory = nn.Parameter(memory)

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """The learned initial memory, repeated over the batch."""
        return self.memory.unsqueeze(0).expand(batch_size, -1, -1)

    def _segment(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 memory: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base model's inputs for ``[memory ; tokens ; memory]``."""
        m = self.rmt_config.num_mem_tokens
        batch, length = input_ids.shape
        tokens = self.model.get_input_embeddings()(input_ids)
        memory = memory.to(tokens.dtype)
        slots = torch.arange(m, device=input_ids.device)
        lengths = attention_mask.sum(dim=1, keepdim=True)
        positions = torch.cat(
            [
                slots.expand(batch, m),
                (m + torch.arange(length, device=input_ids.device)).expand(batch, length),
                m + lengths + slots,
            ],
            dim=1,
        )
        ones = torch.ones(batch, m, dtype=attention_mask.dtype, device=attention_mask.device)
        return {"inputs_embeds": torch.cat([memory, tokens, memory], dim=1),
                "attention_mask": torch.cat([ones, attention_mask, ones], dim=1),
                "position_ids": positions, "use_cache": False}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m, length = self.rmt_config.num_mem_tokens, input_ids.shape[1]
        out = self.model(**self._segment(input_ids, attention_mask, memory),
                         output_hidden_states=True)
        return out.logits[:, m : m + length], out.hidden_states[-1][:, m + length :]

    def write(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> torch.Tensor:
        """The new memory alone: the step without the LM head."""
        m, length = self.rmt_config.num_mem_tokens, input_ids.shape[1]
        out = self.model.base_model(**self._segment(input_ids, attention_mask, memory))
        return out.last_hidden_state[:, m + length :]

    def read(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> torch.Tensor:
        """Logits of ``[memory ; tokens]`` with no write slots: the generating segment."""
        m = self.rmt_config.num_mem_tokens
        batch, length = input_ids.shape
        tokens = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat([memory.to(tokens.dtype), tokens], dim=1)
        ones = torch.ones(batch, m, dtype=attention_mask.dtype, device=attention_mask.device)
        positions = torch.arange(m + length, device=input_ids.device).expand(batch, -1)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=torch.cat([ones, attention_mask], dim=1),
            position_ids=positions,
            use_cache=False,
        )
        return out.logits[:, m:]
