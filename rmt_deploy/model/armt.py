"""The associative RMT (ARMT) over a Llama-style causal LM: every layer reads its
associative state (A, z) before it runs and writes it from the memory slots after it.

The state is ``state = (A_0, z_0, A_1, z_1, ..., started)``: per layer ``A`` [batch,
d_key, d_model] and ``z`` [batch, d_key], FP32 whatever the layers compute in, zeros for a
new document; then ``started`` [batch, 1], 0 on a document's first segment and 1 after
it. It marks the first segment explicitly, as the authors' ``first_seg`` does: there the
read is skipped and the write has no previous value and no correction.

The sliding-window variant (``RMTConfig.sliding_window``) carries two more:
``window`` [batch, layers, 2, kv_heads, segment_size, head_dim], the previous segment's
token keys (rotated at their own positions) and values of every layer, and
``window_mask`` [batch, segment_size], their mask, 0/1 in FP32 (zeros for a new
document), as :func:`rmt_deploy.contract.window_pairs` declares them. The segment attends
to them before itself and its positions start at the window's length, as the authors'
``past_key_values`` do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from rmt_deploy.errors import InputError
from rmt_deploy.model.decoder import cache_shape
from rmt_deploy.model.head import head_logits
from rmt_deploy.segmentation import segment_bounds
from rmt_deploy.spec import RMTConfig

#: The authors' epsilon in every associative denominator.
EPS = 1e-5

#: The names of one layer's maps, as the authors' checkpoints store them.
MAP_NAMES = ("W_mq.weight", "W_mk.weight", "W_mv.weight", "W_mb.weight", "W_mb.bias")


def dpfp(x: torch.Tensor) -> torch.Tensor:
    """The DPFP feature map, nu = 3: ``x' = [relu(x), relu(-x)]``, then the products of
    ``x'`` with its rolls by 1, 2 and 3, concatenated (6x as wide as ``x``)."""
    x = torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)
    return torch.cat([x * x.roll(shift, dims=-1) for shift in (1, 2, 3)], dim=-1)


class StateRead(nn.Module):
    """``(q A) / (q . z + eps)`` in FP32, where ``later`` holds (0 on a first segment)."""

    def forward(self, query: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
                later: torch.Tensor) -> torch.Tensor:
        q = dpfp(query.float())
        value = torch.matmul(q, A) / (torch.matmul(q, z.unsqueeze(-1)) + EPS)
        return torch.where(later, value, 0.0)


class StateWrite(nn.Module):
    """(A, z) after the M slots' keys, values and gates, in FP32: the outer products and
    the running sums, with the correction when asked."""

    def forward(self, key: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, A: torch.Tensor,
                z: torch.Tensor, later: torch.Tensor, correction: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v, b = dpfp(key.float()), v.float(), torch.sigmoid(gate.float())
        denom = torch.matmul(k, z.unsqueeze(-1)) + EPS
        v_prev = torch.where(later, torch.matmul(k, A) / denom, 0.0)
        A = A + torch.matmul((k * b).transpose(1, 2), v - v_prev)
        if correction:
            g = (1 - denom / (k.square().sum(-1, keepdim=True) + EPS)).clamp(0, 1)
            k = k * torch.where(later, g, 1.0)
        return A, z + k.sum(dim=1)


class AssociativeMaps(nn.Module):
    """One layer's learned maps and its read and write of (A, z). The arithmetic on the
    state sits in modules named after :data:`rmt_deploy.spec.FP32_SCOPE`, so that an FP16
    or INT8 graph keeps it in FP32 (the maps themselves run in the layers' precision)."""

    def __init__(self, d_model: int, d_mem: int) -> None:
        super().__init__()
        self.W_mq = nn.Linear(d_model, d_mem, bias=False)
        self.W_mk = nn.Linear(d_model, d_mem, bias=False)
        self.W_mv = nn.Linear(d_model, d_model, bias=False)
        self.W_mb = nn.Linear(d_model, 1)
        self.fp32_state_read = StateRead()  # named for spec.FP32_SCOPE
        self.fp32_state_write = StateWrite()

    def read(self, hidden: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
             later: torch.Tensor) -> torch.Tensor:
        """``hidden + (q A) / (q . z + eps)`` on every position of the rows where
        ``later`` [batch, 1, 1] holds; ``hidden`` unchanged on a first segment."""
        value = self.fp32_state_read(self.W_mq(hidden), A, z, later)
        return hidden + value.to(hidden.dtype)

    def write(self, slots: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
              later: torch.Tensor, correction: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, z) after the M memory slots' outputs ``slots`` [batch, M, d_model], in FP32."""
        return self.fp32_state_write(
            self.W_mk(slots), self.W_mv(slots), self.W_mb(slots), A, z, later, correction)


class ARMT(nn.Module):
    """A Llama-style causal LM wrapped as the ARMT; ``forward`` is one pure segment step.

    ``forward(input_ids, attention_mask, *state) -> (logits, *new_state)`` runs
    ``[tokens ; memory]`` at positions 0..L+M-1 (a right-padded row's memory slots follow
    its last real token, so it computes what it computes alone); logits are those of the
    token positions.
    """

    def __init__(self, model: nn.Module, config: RMTConfig, memory: torch.Tensor,
                 maps: Sequence[AssociativeMaps]) -> None:
        super().__init__()
        self.model = model
        self.rmt_config = replace(config, **cache_shape(model))
        self.memory = nn.Parameter(memory.detach().clone())  # not a view of a mapped file
        self.maps = nn.ModuleList(maps)

    @property
    def layers(self) -> int:
        return len(self.maps)

    @property
    def sliding_window(self) -> bool:
        """Whether a segment also attends to the previous one (the config's flag)."""
        return self.rmt_config.sliding_window

    def initial_state(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The learned initial state: none, every pair starts at zero."""
        return {}

    def zero_state(self, batch_size: int, window: bool | None = None
                   ) -> tuple[torch.Tensor, ...]:
        """Zeros: (A, z) of every layer and ``started`` for ``batch_size`` new documents,
        then ``window`` and ``window_mask`` with the window (``window`` defaults to the
        model's own)."""
        config = self.rmt_config
        A = torch.zeros(batch_size, config.d_key, config.hidden_size)
        z = torch.zeros(batch_size, config.d_key)
        pairs = [t.clone() for _ in range(self.layers) for t in (A, z)]
        state = (*pairs, torch.zeros(batch_size, 1))
        if not (self.sliding_window if window is None else window):
            return state
        kv = torch.zeros(batch_size, self.layers, 2, config.cache_heads, config.segment_size,
                         config.head_dim)
        return (*state, kv, torch.zeros(batch_size, config.segment_size))

    def _layers(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                state: Sequence[torch.Tensor], writes: bool,
                cache: DynamicCache | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base model's layers with a read before each and, with ``writes``, a write
        from the last M positions after each; the final norm's output and the new state
        (``started`` set)."""
        base = self.model.base_model
        causal = create_causal_mask(config=base.config, inputs_embeds=hidden,
                                    attention_mask=mask, cache=cache, position_ids=positions)
        rope = base.rotary_emb(hidden, position_ids=positions)
        *pairs, started = state
        later = (started > 0).view(-1, 1, 1)
        m = self.rmt_config.num_mem_tokens
        new_state: list[torch.Tensor] = []
        for layer, maps, A, z in zip(base.layers, self.maps, pairs[0::2], pairs[1::2],
                                     strict=True):
            hidden = maps.read(hidden, A, z, later)
            hidden = layer(hidden, attention_mask=causal, position_ids=positions,
                           position_embeddings=rope, cache=cache, use_cache=cache is not None)
            if writes:
                new_state.extend(maps.write(hidden[:, -m:], A, z, later,
                                            self.rmt_config.correction))
        if writes:
            new_state.append(torch.ones_like(started))
        return base.norm(hidden), new_state

    def _segment(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings, mask and positions of ``[tokens ; memory]``."""
        m = self.rmt_config.num_mem_tokens
        batch, length = input_ids.shape
        tokens = self.model.get_input_embeddings()(input_ids)
        memory = self.memory.to(tokens.dtype).unsqueeze(0).expand(batch, -1, -1)
        slots = torch.arange(m, device=input_ids.device)
        lengths = attention_mask.sum(dim=1, keepdim=True)
        positions = torch.cat([torch.arange(length, device=input_ids.device).expand(batch, -1),
                               lengths + slots], dim=1)
        ones = torch.ones(batch, m, dtype=attention_mask.dtype, device=attention_mask.device)
        return (torch.cat([tokens, memory], dim=1), torch.cat([attention_mask, ones], dim=1),
                positions)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (one Gemm reading the output embedding as stored: one copy of a
        tied head in an export)."""
        return head_logits(self.model.get_output_embeddings(), hidden)

    def _windowed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  state: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The segment after the carried window: its keys and values fill a cache that
        the segment extends, positions start at the window's length; the new window is
        the segment's own token keys and values (memory slots cut off; zeros at padding),
        padded to the segment size."""
        *state, window, window_mask = state
        hidden, mask, positions = self._segment(input_ids, attention_mask)
        carried = window_mask.to(mask.dtype)  # 0/1, as the attention mask (FP32 in the state)
        past = window.to(hidden.dtype)  # the layers' precision (FP32 state, FP16 layers)
        cache = DynamicCache(ddp_cache_data=[(past[:, layer, 0], past[:, layer, 1])
                                             for layer in range(self.layers)],
                             config=self.model.config)
        hidden, new_state = self._layers(
            hidden, torch.cat([carried, mask], dim=1),
            positions + carried.sum(dim=1, keepdim=True), state, writes=True, cache=cache)
        size, length = window.shape[-2], input_ids.shape[1]
        pad = (0, 0, 0, size - length)
        new_window = torch.stack([torch.stack([nn.functional.pad(t[:, :, size:size + length], pad)
                                               for t in (layer.keys, layer.values)], dim=1)
                                  for layer in cache.layers], dim=1).to(window.dtype)
        new_mask = nn.functional.pad(attention_mask, (0, size - length)).to(window_mask.dtype)
        real = new_mask.view(-1, 1, 1, 1, size, 1)
        return hidden, [*new_state, new_window * real, new_mask]

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             *state: torch.Tensor, window: bool | None = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final norm's output over ``[tokens ; memory]`` and the new state; with the
        window (``window`` defaults to the model's own) the state ends with it."""
        if self.sliding_window if window is None else window:
            return self._windowed(input_ids, attention_mask, state)
        return self._layers(*self._segment(input_ids, attention_mask), state, writes=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden, new_state = self.step(input_ids, attention_mask, *state)
        return (self._head(hidden[:, : input_ids.shape[1]]), *new_state)

    def write(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The new state alone: the step without the LM head."""
        return tuple(self.step(input_ids, attention_mask, *state)[1])

    def _context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The generating segment: its tokens alone, no memory slots."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (self.model.get_input_embeddings()(input_ids), attention_mask,
                positions.expand(input_ids.shape[0], -1))

    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             *state: torch.Tensor) -> torch.Tensor:
        """Logits of the generating segment read whole: reads, no memory slots, no writes
        (what generation with a KV cache reproduces)."""
        hidden, _ = self._layers(*self._context(input_ids, attention_mask), state,
                                 writes=False)
        return self._head(hidden)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Generation's first step: the logits after each row's last real token
        [batch, vocab] and every layer's keys and values (key, value, key, value, ...)."""
        cache = DynamicCache(config=self.model.config)
        hidden, _ = self._layers(*self._context(input_ids, attention_mask), state,
                                 writes=False, cache=cache)
        last = (attention_mask.sum(dim=1) - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return (self._head(hidden.gather(1, last)[:, 0]), *_flat(cache))

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               *state_and_past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One generated token per row, read with (A, z) of every layer and the cached
        keys and values: ``state_and_past`` is the state, then the cache as
        :meth:`prefill` returns it. Returns its logits and the cache grown by one."""
        split = 2 * self.layers + 1
        state, past = state_and_past[:split], state_and_past[split:]
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)),
                             config=self.model.config)
        hidden, _ = self._layers(self.model.get_input_embeddings()(input_ids), attention_mask,
                                 attention_mask.sum(dim=1, keepdim=True) - 1, state,
                                 writes=False, cache=cache)
        return (self._head(hidden[:, -1]), *_flat(cache))


def _flat(cache: DynamicCache) -> list[torch.Tensor]:
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


@torch.no_grad()
def run_armt(rmt: ARMT, ids: Sequence[int] | np.ndarray, window: bool | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One document's token logits [n_tokens, vocab], every segment's concatenated, and
    the state after its last segment (with the window: ``window`` defaults to the
    model's own)."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).view(1, -1)
    if ids.shape[1] == 0:
        raise InputError("cannot run an empty document")
    state, pieces = rmt.zero_state(1, window), []
    for start, end in segment_bounds(ids.shape[1], rmt.rmt_config):
        segment = ids[:, start:end]
        hidden, state = rmt.step(segment, torch.ones_like(segment), *state, window=window)
        pieces.append(rmt._head(hidden[0, : end - start]))
    return torch.cat(pieces), tuple(state)


@torch.no_grad()
def generate_armt(rmt: ARMT, ids: Sequence[int] | np.ndarray, max_new_tokens: int
                  ) -> list[int]:
    """Greedy generation after a document: every segment but the last writes; the last
    is prefilled without memory slots (reads, no writes) and decoded token by token, each
    token reading (A, z) in every layer. As in the authors' ``generate``, no segment
    attends to a window, also with the sliding-window variant."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise InputError("cannot generate after an empty document")
    start = segment_bounds(len(ids), rmt.rmt_config)[-1][0]
    state = run_armt(rmt, ids[:start], window=False)[1] if start else rmt.zero_state(1, False)
    tokens = torch.from_numpy(ids[start:]).view(1, -1)
    mask = torch.ones_like(tokens)
    logits, *past = rmt.prefill(tokens, mask, *state)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(logits[0].argmax())
        generated.append(next_id)
        if next_id == rmt.rmt_config.eos_token_id:
            break
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        logits, *past = rmt.decode(torch.tensor([[next_id]]), mask, *state, *past)
    return generated
