"""Wrapping a Hugging Face base model into an RMT, as the authors' code does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

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
    pad = special.pad if special.pad is not None else special.eos
    config = RMTConfig.decoder(
        num_mem_tokens=num_mem_tokens,
        hidden_size=base.config.hidden_size,
        vocab_size=base.config.vocab_size,
        segment_size=segment_size,
        pad_token_id=pad if pad is not None else 0,
        eos_token_id=special.eos,
        max_positions=_position_limit(base.config),
    )
    return DecoderRMT(base, config, memory)


def _position_limit(config) -> int | None:
    """Positions a step may use: RoBERTa-style models start counting after the pad id."""
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= config.pad_token_id + 1
    return limit
