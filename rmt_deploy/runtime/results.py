"""Typed results of a run."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rmt_deploy.runtime.scoring import softmax
from rmt_deploy.runtime.selection import BackendChoice
from rmt_deploy.segmentation import count_segments
from rmt_deploy.spec import RMTConfig


@dataclass(frozen=True)
class EncoderOutput:
    """A classified document."""

    label: str  # the predicted class
    scores: dict[str, float]  # softmax probability per label
    logits: np.ndarray  # [n_labels], from the last segment
    memory: np.ndarray  # [M, H], the final memory (usable as a document embedding)
    tokens: int  # tokens read (special tokens removed)
    segments: int


@dataclass(frozen=True)
class DecoderOutput:
    """A document scored by a language model, and what it generates after it."""

    perplexity: float | None  # over the next-token predictions (None when generating, or
    # when nothing was predicted: a document of one token)
    tokens: int
    segments: int
    memory: np.ndarray  # [M, H], the memory written by the last segment that wrote it
    generated_ids: list[int] = field(default_factory=list)
    generated: str | None = None  # decoded text, where the model has a tokenizer


@dataclass(frozen=True)
class Run:
    """The outputs of one call, in input order, with its throughput."""

    outputs: list[EncoderOutput] | list[DecoderOutput]
    backend: str
    precision: str
    seconds: float
    choice: BackendChoice | None = None  # why this backend and its settings
    resumed_tokens: int = 0  # tokens a resumed run took from its saved state, not run now

    @property
    def tokens(self) -> int:
        return sum(output.tokens for output in self.outputs)

    @property
    def segments(self) -> int:
        return sum(output.segments for output in self.outputs)

    @property
    def tokens_per_second(self) -> float:
        """Tokens this call ran (a resumed run's saved ones excluded) per second of it."""
        ran = self.tokens - self.resumed_tokens
        return ran / self.seconds if self.seconds > 0 else float("inf")


def encoder_output(config: RMTConfig, logits: np.ndarray, memory: np.ndarray,
                   tokens: int) -> EncoderOutput:
    """An encoder's result from its last segment's logits."""
    logits = np.asarray(logits, dtype=np.float32)
    scores = softmax(logits.astype(np.float64))
    return EncoderOutput(
        label=config.labels[int(logits.argmax())],
        scores={label: float(score) for label, score in zip(config.labels, scores, strict=True)},
        logits=logits, memory=memory, tokens=tokens, segments=count_segments(tokens, config),
    )


def decoder_output(config: RMTConfig, perplexity: float | None, memory: np.ndarray,
                   tokens: int, generated_ids: list[int] | None = None,
                   generated: str | None = None) -> DecoderOutput:
    """A language model's result on ``tokens`` tokens (a meter's perplexity, or None)."""
    return DecoderOutput(perplexity=perplexity, tokens=tokens,
                         segments=count_segments(tokens, config), memory=memory,
                         generated_ids=generated_ids or [], generated=generated)
