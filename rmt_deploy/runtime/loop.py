"""The one segment loop every backend shares, with the authors' per-row semantics: in a
batch, a row runs only at the steps where it has a segment, and only those rows' memory
changes. Memory stays in the backend's buffers while the set of active rows is steady."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.backends.base import StepEngine
from rmt_deploy.runtime.tokens import TokenSource
from rmt_deploy.segmentation import (
    batch_schedule,
    count_segments,
    segment_range,
    step_inputs,
)

#: ``on_step(rows, segments, attention_mask, logits)`` after every step.
StepCallback = Callable[[list[int], list[np.ndarray], np.ndarray, np.ndarray], None]


def run_segments(
    engine: StepEngine,
    sources: Sequence[TokenSource],
    initial_memory: np.ndarray,
    on_step: StepCallback,
    skip_last: bool = False,
) -> np.ndarray:
    """Run the recurrence over every source; returns the final memory [batch, M, H].

    With ``skip_last`` each row's last segment is not run (a decoder generates from it
    with the read graph instead).
    """
    config = engine.config
    for index, source in enumerate(sources):
        if len(source) == 0:
            raise InputError(f"document {index} has no tokens after removing special tokens")
    counts = [count_segments(len(source), config) - int(skip_last) for source in sources]
    memory = np.repeat(initial_memory[None].astype(np.float32), len(sources), axis=0)
    state, state_rows = None, None
    for active in batch_schedule(counts, config):
        rows = [row for row, _ in active]
        if rows != state_rows:
            if state is not None:
                memory[state_rows] = engine.memory(state)
            state, state_rows = engine.new_state(memory[rows]), rows
        segments = [
            sources[row].tokens(*segment_range(len(sources[row]), index, config))
            for row, index in active
        ]
        input_ids, attention_mask = step_inputs(segments, config)
        logits = engine.step(state, input_ids, attention_mask)
        on_step(rows, segments, attention_mask, logits)
    if state is not None:
        memory[state_rows] = engine.memory(state)
    return memory
