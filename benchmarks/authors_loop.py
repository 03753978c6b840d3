"""The authors' inference loop for the encoder RMT, two ways.

- ``AuthorsEncoderLoop``: as their code runs it, the Hugging Face classifier called per
  segment with ``output_hidden_states=True`` (head included), memory written into
  ``inputs_embeds`` rows in place. The reference every contender's logits are checked
  against.
- ``PlainEncoderLoop``: the same model and the same outputs, written as fast as a user
  would write it in PyTorch: SDPA attention, ``inference_mode``, the encoder alone for
  every segment but the last (memory from its last hidden state) and the head only where
  its logits are read, the memory put in by concatenation. The baseline of the
  benchmark's ratios.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AuthorsEncoderLoop:
    def __init__(self, model, num_mem_tokens: int, input_size: int, cls_id: int, sep_id: int,
                 pad_id: int) -> None:
        self.model = model.eval()
        self.m = num_mem_tokens
        self.input_size = input_size
        self.cls, self.sep, self.pad = (torch.tensor([i]) for i in (cls_id, sep_id, pad_id))
        vocab = model.get_input_embeddings().weight.shape[0]
        self.mem_token_ids = torch.arange(vocab - num_mem_tokens, vocab)
        self.segment_size = input_size - num_mem_tokens - 3
        self.special = [pad_id, cls_id, sep_id]

    def _pad_add_special_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = torch.cat([self.cls, self.mem_token_ids, self.sep, tensor, self.sep])
        return F.pad(tensor, (0, self.input_size - tensor.shape[0]), value=int(self.pad))

    def _pad_and_segment(self, input_ids: torch.Tensor, max_n_segments: int):
        batch = []
        for seq in input_ids:
            drop = sum(seq == t for t in self.special)
            seq = seq[(1 - drop).bool()][: self.segment_size * max_n_segments]
            splits = (list(range(len(seq), 0, -self.segment_size)) + [0])[::-1]
            bounds = zip(splits, splits[1:], strict=False)
            segments = [self._pad_add_special_tokens(seq[a:b]) for a, b in bounds]
            batch.append([None] * (max_n_segments - len(segments)) + segments)
        return [[row[i] for row in batch] for i in range(max_n_segments)]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, max_n_segments: int) -> torch.Tensor:
        embeddings = self.model.get_input_embeddings()
        memory = embeddings(self.mem_token_ids).repeat(input_ids.shape[0], 1, 1)
        for segment in self._pad_and_segment(input_ids, max_n_segments):
            rows = [s is not None for s in segment]
            if not any(rows):
                continue
            ids = torch.stack([s for s in segment if s is not None])
            embeds = embeddings(ids)
            embeds[:, 1 : 1 + self.m] = memory[rows]
            out = self.model(inputs_embeds=embeds, attention_mask=(ids != self.pad).long(),
                             token_type_ids=torch.zeros_like(ids), output_hidden_states=True)
            memory[rows] = out.hidden_states[-1][:, 1 : 1 + self.m]
        return out.logits


class PlainEncoderLoop(AuthorsEncoderLoop):
    """The authors' loop with what a user would change to run it fast (same segments,
    same memory, same last logits). ``model`` should run SDPA attention."""

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, max_n_segments: int) -> torch.Tensor:
        embeddings = self.model.get_input_embeddings()
        encoder = self.model.base_model
        memory = embeddings(self.mem_token_ids).repeat(input_ids.shape[0], 1, 1)
        segments = [s for s in self._pad_and_segment(input_ids, max_n_segments)
                    if any(r is not None for r in s)]
        for index, segment in enumerate(segments):
            rows = [s is not None for s in segment]
            ids = torch.stack([s for s in segment if s is not None])
            embeds = embeddings(ids)
            embeds = torch.cat([embeds[:, :1], memory[rows] if not all(rows) else memory,
                                embeds[:, 1 + self.m:]], dim=1)
            inputs = {"inputs_embeds": embeds, "attention_mask": (ids != self.pad).long(),
                      "token_type_ids": torch.zeros_like(ids)}
            if index == len(segments) - 1:
                return self.model(**inputs).logits
            hidden = encoder(**inputs).last_hidden_state[:, 1 : 1 + self.m]
            if all(rows):
                memory = hidden
            else:
                memory = memory.clone()
                memory[rows] = hidden
        raise ValueError("no segments: the documents hold no content tokens")
