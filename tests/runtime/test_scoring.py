"""The one perplexity meter: its saved state, restored, goes on exactly as a meter that
never stopped (the sessions' and the Triton client's resume rely on it)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rmt_deploy.runtime.scoring import MeterState, PerplexityMeter, log_softmax

VOCAB = 11


def segments(seed: int, lengths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, n), (3 * rng.standard_normal((n, VOCAB))).astype(np.float32))
            for n in lengths]


def fed(parts, meter: PerplexityMeter | None = None) -> PerplexityMeter:
    meter = meter or PerplexityMeter()
    for tokens, logits in parts:
        meter.add(tokens, logits)
    return meter


def same(got: PerplexityMeter, expected: PerplexityMeter) -> None:
    """Bit for bit."""
    assert (got.nll, got.count, got.perplexity) == (expected.nll, expected.count,
                                                    expected.perplexity)


@pytest.mark.parametrize("seed", range(3))
def test_a_restored_meter_equals_an_uninterrupted_one(seed):
    parts = segments(seed, [3, 1, 5, 2, 1, 4])
    whole = fed(parts)
    tokens = np.concatenate([t for t, _ in parts])
    logits = np.concatenate([x for _, x in parts]).astype(np.float64)
    nll = -log_softmax(logits[:-1])[np.arange(len(tokens) - 1), tokens[1:]]
    assert whole.count == len(tokens) - 1
    assert whole.perplexity == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    for cut in range(len(parts) + 1):
        head = fed(parts[:cut])
        state = head.state
        same(fed(parts[cut:], PerplexityMeter(state)), whole)
        # the session's file keeps the log-probabilities as float64
        saved = MeterState(state.nll, state.count,
                           None if state.last is None else state.last.astype(np.float64))
        same(fed(parts[cut:], PerplexityMeter(saved)), whole)
        if cut:  # the Triton progress file keeps the last position's logits
            after = MeterState.after(parts[cut - 1][1][-1], state.nll, state.count)
            same(fed(parts[cut:], PerplexityMeter(after)), whole)
        same(head, fed(parts[:cut]))  # taking the state changed nothing


def test_a_state_is_a_snapshot():
    parts = segments(5, [2, 3])
    meter = fed(parts[:1])
    state = meter.state
    meter.add(*parts[1])
    same(PerplexityMeter(state), fed(parts[:1]))


@pytest.mark.parametrize("values", [
    (math.nan, 1, None), (math.inf, 1, None), (1, 1, None), (0.5, -1, None), (0.5, True, None),
    (0.5, 1.0, None), (0.5, 1, np.zeros((2, VOCAB))), (0.5, 1, np.full(VOCAB, np.nan)),
])
def test_a_bad_state_is_refused(values):
    with pytest.raises(ValueError):
        MeterState(*values)
