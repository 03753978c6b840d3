"""The authors' inference for the decoder RMT (BABILong's RecurrentWrapper and
MemoryCell), as their code runs it: every segment but the last through the Hugging Face
model as ``[memory ; tokens ; memory]`` (LM head included, memory from the last hidden
state), then ``generate`` with its KV cache from ``[memory ; last segment]``. The
baseline of the decoder benchmark."""

from __future__ import annotations

import torch


class AuthorsDecoder:
    def __init__(self, model, memory: torch.Tensor, segment_size: int) -> None:
        self.model = model.eval()
        self.memory = memory  # [M, H], the learned memory (memory_cell.memory)
        self.m = memory.shape[0]
        self.segment_size = segment_size

    def _segments(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(input_ids, self.segment_size, dim=1))

    @torch.no_grad()
    def read(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The memory after every segment but the last (a batch of equal lengths)."""
        embeddings = self.model.get_input_embeddings()
        memory = self.memory.unsqueeze(0).repeat(input_ids.shape[0], 1, 1)
        for segment in self._segments(input_ids)[:-1]:
            embeds = torch.cat([memory, embeddings(segment), memory], dim=1)
            out = self.model(inputs_embeds=embeds, output_hidden_states=True)
            memory = out.hidden_states[-1][:, -self.m:]
        return memory

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, memory: torch.Tensor,
                 max_new_tokens: int) -> torch.Tensor:
        """Greedy tokens after the last segment, read as ``[memory ; tokens]`` (a row
        that ends at EOS is padded with EOS after it)."""
        last = self._segments(input_ids)[-1]
        embeds = torch.cat([memory, self.model.get_input_embeddings()(last)], dim=1)
        out = self.model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=self.model.config.eos_token_id)
        return out[:, -max_new_tokens:]
