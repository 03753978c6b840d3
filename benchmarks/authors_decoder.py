"""The authors' inference for the decoder RMT (BABILong's RecurrentWrapper and
MemoryCell), two ways.

- ``AuthorsDecoder``: as their code runs it, every segment but the last through the
  Hugging Face model as ``[memory ; tokens ; memory]`` (LM head included, memory from
  the last hidden state), then ``generate`` with its KV cache from ``[memory ; last
  segment]``. The reference the other sides' ids are checked against.
- ``PlainDecoder``: the same memory and ids, written as fast as a user would write it.
  The baseline of the decoder benchmark's ratios.
"""

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


class PlainDecoder(AuthorsDecoder):
    """The authors' inference with what a user would change to run it fast (same memory,
    same greedy ids): ``inference_mode``; the segments read through the transformer
    alone (the memory comes from its last hidden state, so the LM head's 50,257 logits a
    position are never computed for them); generation as a plain greedy loop over the
    Hugging Face KV cache, the head on the last position only, instead of ``generate``."""

    @torch.inference_mode()
    def read(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.get_input_embeddings()
        transformer = self.model.base_model
        memory = self.memory.unsqueeze(0).repeat(input_ids.shape[0], 1, 1)
        for segment in self._segments(input_ids)[:-1]:
            embeds = torch.cat([memory, embeddings(segment), memory], dim=1)
            memory = transformer(inputs_embeds=embeds, use_cache=False).last_hidden_state[
                :, -self.m:]
        return memory

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, memory: torch.Tensor,
                 max_new_tokens: int) -> torch.Tensor:
        eos = self.model.config.eos_token_id
        last = self._segments(input_ids)[-1]
        embeds = torch.cat([memory, self.model.get_input_embeddings()(last)], dim=1)
        out = self.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        tokens = []
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1).masked_fill(done, eos)
            tokens.append(token)
            done |= token == eos
            if len(tokens) == max_new_tokens or bool(done.all()):
                break
            out = self.model(input_ids=token[:, None], cache=out.cache,
                             use_cache=True)
        return torch.stack(tokens, dim=1)
