"""The authors' ARMT inference (``modeling_amt/language_modeling.py``, the FP32 paper
version), restated as they structure it: a wrapper module around every decoder layer of
the Hugging Face model holding that layer's (A, z) as mutable attributes, a memory cell
that appends the memory embeddings to a segment, and a recurrent wrapper that loops over
the segments in Python and generates with the base model's ``generate`` on the last
one. The oracle of the reference ARMT's tests and the baseline of its benchmark.

Written from ``shared/reference/armt.md``; the one change for transformers 5 is that a
decoder layer returns its hidden states as a tensor, not a tuple. The sliding window is
``AssociativeRecurrentWrapper.forward(sliding_window=True)`` of the authors'
``modeling_amt/language_modeling.py`` (RodkinIvan/associative-recurrent-memory-transformer,
aa145de): each segment runs with ``use_cache`` and, as ``past_key_values``, the previous
segment's token keys and values of every layer (its memory slots cut off), its mask before
the segment's own; the base model numbers the positions on from the past's length. The
carried cache goes in as a ``DynamicCache`` (transformers 5 takes no legacy lists).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch.nn.functional import relu
from transformers import DynamicCache


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    x = torch.cat([relu(x), relu(-x)], dim=-1)
    x_rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    x_repeat = torch.cat([x] * nu, dim=-1)
    return x_repeat * x_rolled


class AssociativeLayerWrapper(torch.nn.Module):
    """One decoder layer with its associative memory: reads before, writes after."""

    def __init__(self, layer, d_model: int, num_mem_tokens: int, d_mem: int,
                 correction: bool = True) -> None:
        super().__init__()
        self.d_model, self.num_mem_tokens, self.d_mem = d_model, num_mem_tokens, d_mem
        self.nu = 3
        self.d_key = 2 * self.nu * d_mem
        self.W_mq = torch.nn.Linear(d_model, d_mem, bias=False)
        self.W_mk = torch.nn.Linear(d_model, d_mem, bias=False)
        self.W_mv = torch.nn.Linear(d_model, d_model, bias=False)
        self.W_mb = torch.nn.Linear(d_model, 1)
        self.layer = layer
        self.correction = correction
        self.generate_mode = False
        self.zero_mem()

    def zero_mem(self) -> None:
        self.W_mem = torch.zeros(1, self.d_key, self.d_model)
        self.z = torch.zeros(1, self.d_key)
        self.first_seg = True

    def associate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mq = dpfp(self.W_mq(hidden_states), self.nu)
        num = torch.einsum("ijk,ikt->ijt", mq, self.W_mem)
        denom = torch.einsum("ik,ijk->ij", self.z, mq)[..., None] + 1e-5
        return num / denom

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.first_seg:
            hidden_states = self.associate(hidden_states) + hidden_states
        out = self.layer(hidden_states, *args, **kwargs)
        if not self.generate_mode:
            self.update_mem(out[:, -self.num_mem_tokens:])
        return out

    def update_mem(self, mem_tokens: torch.Tensor) -> None:
        mk = dpfp(self.W_mk(mem_tokens), self.nu)
        new_mv = self.W_mv(mem_tokens)
        if not self.first_seg:
            num = torch.einsum("ijk,ikt->ijt", mk, self.W_mem)
            denom = torch.einsum("ik,ijk->ij", self.z, mk)[..., None] + 1e-5
            prev_mv = num / denom
            if self.correction:
                norm = torch.norm(mk, dim=-1)[..., None] ** 2 + 1e-5
                new_info_coef = torch.clip(1 - denom / norm, 0, 1)
            else:
                new_info_coef = 1
        else:
            prev_mv = torch.zeros_like(new_mv)
            new_info_coef = 1
        mv = new_mv - prev_mv
        mb = torch.sigmoid(self.W_mb(mem_tokens))
        associations = torch.einsum("...mk,...mt,...mi->...kt", mk, mv, mb)
        self.W_mem = self.W_mem + associations
        self.z = self.z + (new_info_coef * mk).sum(dim=1)
        self.first_seg = False


class AssociativeMemoryCell(torch.nn.Module):
    """The base model with wrapped layers and the learned memory embeddings."""

    def __init__(self, base_model, num_mem_tokens: int, d_mem: int,
                 correction: bool = True) -> None:
        super().__init__()
        self.model = base_model
        self.num_mem_tokens = num_mem_tokens
        d_model = base_model.get_input_embeddings().embedding_dim
        self.layers = base_model.model.layers
        for i in range(len(self.layers)):
            self.layers[i] = AssociativeLayerWrapper(self.layers[i], d_model, num_mem_tokens,
                                                     d_mem, correction)
        std = base_model.get_input_embeddings().weight.data.std()
        self.memory = torch.nn.Parameter(torch.randn(num_mem_tokens, d_model) * std)

    def zero_mem(self) -> None:
        for layer in self.layers:
            layer.zero_mem()

    def set_generate_mode(self, is_on: bool) -> None:
        for layer in self.layers:
            layer.generate_mode = is_on

    def process_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        memory_state = self.memory.repeat(input_ids.shape[0], 1, 1)
        inputs_embeds = self.model.get_input_embeddings()(input_ids)
        ones = torch.ones(input_ids.shape[0], self.num_mem_tokens, dtype=attention_mask.dtype)
        return {"inputs_embeds": torch.cat([inputs_embeds, memory_state], dim=1),
                "attention_mask": torch.cat([attention_mask, ones], dim=1)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: DynamicCache | None = None,
                prev_attn_mask: torch.Tensor | None = None, use_cache: bool = False):
        """The segment's token logits; with ``use_cache`` also the model's cache."""
        seg = self.process_input(input_ids, attention_mask)
        if prev_attn_mask is not None:
            seg["attention_mask"] = torch.cat([prev_attn_mask, seg["attention_mask"]], dim=-1)
        out = self.model(**seg, cache=past_key_values, use_cache=use_cache)
        logits = out.logits[:, : -self.num_mem_tokens]
        return (logits, out.cache) if use_cache else logits

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 **generate_kwargs) -> torch.Tensor:
        self.set_generate_mode(True)
        seg = self.process_input(input_ids, attention_mask)
        try:
            return self.model.generate(
                inputs_embeds=seg["inputs_embeds"][:, : -self.num_mem_tokens],
                attention_mask=seg["attention_mask"][:, : -self.num_mem_tokens],
                **generate_kwargs)
        finally:
            self.set_generate_mode(False)


class AssociativeRecurrentWrapper(torch.nn.Module):
    """Left-aligned segments of ``segment_size`` tokens, run one after the other."""

    def __init__(self, memory_cell: AssociativeMemoryCell, segment_size: int) -> None:
        super().__init__()
        self.memory_cell, self.segment_size = memory_cell, segment_size

    def segment(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(input_ids, self.segment_size, dim=1))

    def forward(self, input_ids: torch.Tensor, sliding_window: bool = False) -> torch.Tensor:
        """Every segment's token logits, concatenated; the state is left in the layers
        (and, with ``sliding_window``, the last segment's carried keys and values in
        ``self.past_key_values``, its mask in ``self.prev_attn_mask``)."""
        self.memory_cell.zero_mem()
        if not sliding_window:
            return torch.cat([self.memory_cell(s, torch.ones_like(s))
                              for s in self.segment(input_ids)], dim=1)
        m, past, prev_mask, logits = self.memory_cell.num_mem_tokens, None, None, []
        for s in self.segment(input_ids):
            mask = torch.ones_like(s)
            out, cache = self.memory_cell(s, mask, past_key_values=past,
                                          prev_attn_mask=prev_mask, use_cache=True)
            logits.append(out)
            prev_mask, seg_len = mask, s.shape[-1]
            past = DynamicCache(ddp_cache_data=[
                tuple(kv[..., -(m + seg_len):kv.size(-2) - m, :]
                      for kv in (layer.keys, layer.values)) for layer in cache.layers])
        self.past_key_values, self.prev_attn_mask = past, prev_mask
        return torch.cat(logits, dim=1)

    def generate(self, input_ids: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        self.memory_cell.zero_mem()
        segments = self.segment(input_ids)
        for s in segments[:-1]:
            self.memory_cell(s, torch.ones_like(s))
        last = segments[-1]
        out = self.memory_cell.generate(last, torch.ones_like(last), **generate_kwargs)
        self.memory_cell.zero_mem()
        return out


def authors_armt(base_model, *, num_mem_tokens: int, d_mem: int, segment_size: int,
                 correction: bool, memory: torch.Tensor,
                 maps: Sequence[Mapping[str, torch.Tensor]]) -> AssociativeRecurrentWrapper:
    """The authors' ARMT over a copy of ``base_model`` (left untouched), with the given
    memory embeddings and per-layer maps (keys ``W_mq.weight`` ... ``W_mb.bias``)."""
    cell = AssociativeMemoryCell(copy.deepcopy(base_model), num_mem_tokens, d_mem, correction)
    with torch.no_grad():
        cell.memory.copy_(memory)
        for layer, weights in zip(cell.layers, maps, strict=True):
            layer.load_state_dict({**layer.state_dict(), **weights})
    return AssociativeRecurrentWrapper(cell, segment_size).eval()
