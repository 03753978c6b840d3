"""Wrapping a Hugging Face base model into an RMT, as the authors' code does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from rmt_deploy.errors import CheckpointError
from rmt_deploy.model.armt import ARMT, MAP_NAMES, AssociativeMaps
from rmt_deploy.model.decoder import DecoderRMT
from rmt_deploy.model.encoder import EncoderRMT
from rmt_deploy.spec import RMTConfig


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of a tokenizer's special tokens (None where the tokenizer has none)."""

    pad: int | None = None
    cls: int | None = None
    sep: int | None = None
    eos: int | None = None
    bos: int | None = None

    @property
    def strip_ids(self) -> tuple[int, ...]:
        """The ids the authors remove from an input before segmenting it."""
        ids = [self.pad, self.cls, self.sep, self.eos, self.bos]
        return tuple(dict.fromkeys(i for i in ids if i is not None))


def encoder_from_base(
    base: PreTrainedModel,
    *,
    num_mem_tokens: int,
    input_size: int,
    labels: Sequence[str],
    special: SpecialTokens,
    max_n_segments: int | None = None,
    extend_vocab: bool = True,
) -> EncoderRMT:
    """An encoder RMT over a sequence classifier.

    With ``extend_vocab`` the word embeddings grow by ``num_mem_tokens`` rows (the memory
    token ids), as in the authors' code; without it they are assumed already grown.
    """
    vocab_size = base.config.vocab_size
    if extend_vocab:
        vocab_size += num_mem_tokens
        base.resize_token_embeddings(vocab_size, mean_resizing=False)
    config = RMTConfig.encoder(
        num_mem_tokens=num_mem_tokens,
        hidden_size=base.config.hidden_size,
        vocab_size=vocab_size,
        input_size=input_size,
        pad_token_id=special.pad,
        cls_token_id=special.cls,
        sep_token_id=special.sep,
        strip_token_ids=special.strip_ids,
        labels=tuple(labels),
        max_n_segments=max_n_segments,
        max_positions=_position_limit(base.config),
    )
    return EncoderRMT(base, config)


def decoder_from_base(
    base: PreTrainedModel,
    *,
    num_mem_tokens: int,
    segment_size: int,
    special: SpecialTokens,
    memory: torch.Tensor | None = None,
) -> DecoderRMT:
    """A decoder RMT over a causal LM; ``memory`` defaults to a random init as in training."""
    config = RMTConfig.decoder(num_mem_tokens=num_mem_tokens, segment_size=segment_size,
                               **_causal_lm_fields(base, special))
    return DecoderRMT(base, config, memory)


def armt_from_base(
    base: PreTrainedModel,
    *,
    num_mem_tokens: int,
    d_mem: int,
    segment_size: int,
    correction: bool,
    special: SpecialTokens,
    memory: torch.Tensor | None = None,
    maps: Sequence[Mapping[str, torch.Tensor]] | None = None,
    sliding_window: bool = False,
) -> ARMT:
    """An ARMT over a Llama-style causal LM. ``memory`` [M, d_model] and each layer's
    ``maps`` (keys :data:`MAP_NAMES`) default to a random init (a non-zero ``W_mv``, so
    the memory matters). ``sliding_window``: each segment also attends to the previous
    one's keys and values."""
    config = RMTConfig.armt(num_mem_tokens=num_mem_tokens, segment_size=segment_size,
                            d_mem=d_mem, correction=correction, sliding_window=sliding_window,
                            **_causal_lm_fields(base, special))
    layers = base.config.num_hidden_layers
    if maps is not None and len(maps) != layers:
        raise CheckpointError(f"{len(maps)} layers of memory maps for a base model of "
                              f"{layers} layers; the checkpoint and --base-model disagree")
    std = float(base.get_input_embeddings().weight.detach().std())
    if memory is None:
        memory = torch.randn(num_mem_tokens, base.config.hidden_size) * std
    modules = [AssociativeMaps(base.config.hidden_size, d_mem) for _ in range(layers)]
    for index, module in enumerate(modules):
        if maps is None:
            _random_maps(module, std)
        else:
            _load_maps(module, maps[index], index)
    return ARMT(base, config, memory, modules)


def _random_maps(module: AssociativeMaps, std: float) -> None:
    """Maps drawn so that keys, queries and values are of order one on hidden states of
    spread ``std``: the read adds a term as large as the hidden state, so memory matters
    (the authors start W_mq at zero, which a trained checkpoint replaces)."""
    width = module.W_mv.weight.shape[0]
    with torch.no_grad():
        for linear in (module.W_mq, module.W_mk):
            linear.weight.normal_(0.0, 1.0 / (width**0.5 * std))
        module.W_mv.weight.normal_(0.0, width**-0.5)
        module.W_mb.weight.normal_(0.0, 1.0 / (width**0.5 * std))
        module.W_mb.bias.zero_()


def _load_maps(module: AssociativeMaps, weights: Mapping[str, torch.Tensor], index: int) -> None:
    """One layer's maps from ``weights``, every key present with its shape."""
    own = module.state_dict()
    missing = [name for name in MAP_NAMES if name not in weights]
    if missing:
        raise CheckpointError(f"layer {index}'s memory maps lack {', '.join(missing)}; "
                              "the checkpoint is incomplete")
    for name in MAP_NAMES:
        if tuple(weights[name].shape) != tuple(own[name].shape):
            raise CheckpointError(f"layer {index}'s {name} is {tuple(weights[name].shape)}, "
                                  f"the model needs {tuple(own[name].shape)}; check d_mem "
                                  "and the base model")
    module.load_state_dict({name: weights[name] for name in MAP_NAMES})


def _causal_lm_fields(base: PreTrainedModel, special: SpecialTokens) -> dict[str, int | None]:
    """The config fields a causal LM's RMT takes from its base: widths, the pad id (the
    EOS where the tokenizer has no pad, else 0), the EOS id and the position limit."""
    pad = special.pad if special.pad is not None else special.eos
    return {"hidden_size": base.config.hidden_size, "vocab_size": base.config.vocab_size,
            "pad_token_id": pad if pad is not None else 0, "eos_token_id": special.eos,
            "max_positions": _position_limit(base.config)}


def _position_limit(config) -> int | None:
    """Positions a step may use: RoBERTa-style models start counting after the pad id."""
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= config.pad_token_id + 1
    return limit
