"""Turning step logits into results: softmax scores and decoder perplexity (the one
perplexity meter, whose state saves and restores)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class MeterState:
    """What a :class:`PerplexityMeter` has read, to save and restore it: the summed
    negative log-likelihood, the predictions it sums, and the log-probabilities after the
    last segment (None before any). Checked: a bad value raises ValueError."""

    nll: float
    count: int
    last: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"a prediction count {self.count!r} is not a count")
        if not isinstance(self.nll, float) or not np.isfinite(self.nll):
            raise ValueError(f"a log-likelihood {self.nll!r} is not a finite float")
        if self.last is not None and (self.last.ndim != 1 or not np.isfinite(self.last).all()):
            raise ValueError(f"log-probabilities of shape {self.last.shape} are not one "
                             "finite row")

    @classmethod
    def after(cls, logits: np.ndarray, nll: float, count: int) -> MeterState:
        """The state whose last segment ended with a position of ``logits`` [vocab] (what
        a Triton progress file keeps)."""
        return cls(nll, count, log_softmax(np.asarray(logits)))


class PerplexityMeter:
    """Next-token negative log-likelihood of one document, fed segment by segment (the
    last prediction of a segment scores the first token of the next). ``state`` saves
    it; ``PerplexityMeter(state)`` goes on from there exactly as if never stopped."""

    def __init__(self, state: MeterState | None = None) -> None:
        state = state or MeterState(0.0, 0)
        self.nll, self.count, self._last = state.nll, state.count, state.last

    def add(self, tokens: np.ndarray, logits: np.ndarray) -> None:
        """``tokens`` [n] and their logits [n, vocab]."""
        n = len(tokens)
        if self._last is not None:
            self.nll -= float(self._last[tokens[0]])
            self.count += 1
        if n > 1:
            picked = np.take_along_axis(logits[: n - 1], tokens[1:, None], axis=1)[:, 0]
            norm = _logsumexp(logits[: n - 1])
            self.nll += float((norm - picked).sum())
            self.count += n - 1
        self._last = log_softmax(logits[n - 1])

    @property
    def state(self) -> MeterState:
        return MeterState(self.nll, self.count, self._last)

    @property
    def perplexity(self) -> float | None:
        """None where nothing was predicted (a document of one token)."""
        return float(np.exp(self.nll / self.count)) if self.count else None


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
