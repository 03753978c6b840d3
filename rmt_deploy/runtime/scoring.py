"""Turning step logits into results: softmax scores and decoder perplexity."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class PerplexityMeter:
    """Next-token negative log-likelihood of one document, fed segment by segment (the
    last prediction of a segment scores the first token of the next)."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.count = 0
        self._last: np.ndarray | None = None  # log-probs after the previous segment

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
    def perplexity(self) -> float | None:
        """None where nothing was predicted (a document of one token)."""
        return float(np.exp(self.nll / self.count)) if self.count else None


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
