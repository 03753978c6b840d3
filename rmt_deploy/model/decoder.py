"""The decoder RMT (GPT-2, Llama-style) of BABILong: read and write memory slots around a
segment, and generation after the last one, with a KV cache."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import DynamicCache

from rmt_deploy.spec import RMTConfig


def cache_shape(model: nn.Module) -> dict[str, int]:
    """Layers, key/value heads and head width of a causal LM's KV cache."""
    config = model.config
    heads = config.num_attention_heads
    return {"cache_layers": config.num_hidden_layers,
            "cache_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


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
        self.rmt_config = replace(config, **cache_shape(model))
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

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on ``hidden`` [..., H]: the output embedding on the left of the
        product, so an export keeps one copy of a head tied to the input embedding."""
        head = self.model.get_output_embeddings()
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = torch.matmul(head.weight, flat.transpose(0, 1)).transpose(0, 1)
        if head.bias is not None:
            logits = logits + head.bias
        return logits.reshape(*hidden.shape[:-1], head.weight.shape[0])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m, length = self.rmt_config.num_mem_tokens, input_ids.shape[1]
        hidden = self.model.base_model(**self._segment(input_ids, attention_mask,
                                                       memory)).last_hidden_state
        return self._head(hidden[:, m : m + length]), hidden[:, m + length :]

    def write(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> torch.Tensor:
        """The new memory alone: the step without the LM head."""
        m, length = self.rmt_config.num_mem_tokens, input_ids.shape[1]
        out = self.model.base_model(**self._segment(input_ids, attention_mask, memory))
        return out.last_hidden_state[:, m + length :]

    def _context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 memory: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base model's inputs for ``[memory ; tokens]``, the generating segment."""
        m = self.rmt_config.num_mem_tokens
        batch, length = input_ids.shape
        tokens = self.model.get_input_embeddings()(input_ids)
        ones = torch.ones(batch, m, dtype=attention_mask.dtype, device=attention_mask.device)
        return {"inputs_embeds": torch.cat([memory.to(tokens.dtype), tokens], dim=1),
                "attention_mask": torch.cat([ones, attention_mask], dim=1),
                "position_ids": torch.arange(m + length, device=input_ids.device).expand(
                    batch, -1)}

    def read(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> torch.Tensor:
        """Logits of ``[memory ; tokens]`` with no write slots: the generating segment,
        read whole (the reference that generation with a KV cache reproduces)."""
        m = self.rmt_config.num_mem_tokens
        out = self.model.base_model(**self._context(input_ids, attention_mask, memory),
                                    use_cache=False)
        return self._head(out.last_hidden_state[:, m:])

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Generation's first step: ``[memory ; tokens]`` read once. Returns the logits
        after each row's last real token [batch, vocab] and the keys and values of every
        position, layer by layer (``present``: key, value, key, value, ...)."""
        m = self.rmt_config.num_mem_tokens
        cache = DynamicCache(config=self.model.config)
        out = self.model.base_model(**self._context(input_ids, attention_mask, memory),
                                    cache=cache, use_cache=True)
        last = (m + attention_mask.sum(dim=1) - 1).view(-1, 1, 1).expand(
            -1, 1, out.last_hidden_state.shape[-1])
        logits = self._head(out.last_hidden_state.gather(1, last)[:, 0])
        return (logits, *_flat(out.past_key_values))

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """One generated token per row: ``input_ids`` [batch, 1] read with the keys and
        values of every earlier position (``past``, as :meth:`prefill` returns them);
        ``attention_mask`` [batch, past + 1] covers them and the new token. Returns its
        logits [batch, vocab] and the keys and values grown by one position."""
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)),
                             config=self.model.config)
        out = self.model.base_model(
            inputs_embeds=self.model.get_input_embeddings()(input_ids),
            attention_mask=attention_mask,
            position_ids=attention_mask.sum(dim=1, keepdim=True) - 1,
            cache=cache, use_cache=True)
        return (self._head(out.last_hidden_state[:, -1]), *_flat(out.past_key_values))


def _flat(cache) -> list[torch.Tensor]:
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
