"""A batch of documents through a :class:`Stepper`, with the authors' per-row semantics:
a row runs only at the steps where it has a segment, and only those rows' memory
changes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import TokenSource
from rmt_deploy.segmentation import batch_schedule, count_segments, segment_range
from rmt_deploy.spec import RMTConfig

#: ``on_step(rows, segments, logits)`` after every step (``logits`` None where not read).
StepCallback = Callable[[list[int], list[np.ndarray], np.ndarray | None], None]
#: ``wants_logits(active)``: whether a step's logits are read; ``active`` holds its
#: ``(row, segment index, segment count)`` triples.
LogitsWanted = Callable[[list[tuple[int, int, int]]], bool]


def every_step(_active: list[tuple[int, int, int]]) -> bool:
    return True


def never(_active: list[tuple[int, int, int]]) -> bool:
    """No step's logits are read (only the memory: write graphs run where there are)."""
    return False


def last_segments(active: list[tuple[int, int, int]]) -> bool:
    """Only steps where some row reads its last segment (encoders: the classifier)."""
    return any(index == count - 1 for _, index, count in active)


def last_tokens(source: TokenSource, config: RMTConfig) -> np.ndarray:
    """The tokens of ``source``'s last segment: what generation reads after every other
    segment has written the memory."""
    last = count_segments(len(source), config) - 1
    return source.tokens(*segment_range(len(source), last, config))


def run_segments(stepper: Stepper, sources: Sequence[TokenSource], on_step: StepCallback,
                 skip_last: bool = False, wants_logits: LogitsWanted = every_step,
                 before_step: Callable[[list[int]], None] | None = None) -> None:
    """Run the recurrence over every source; row ``i`` of ``stepper`` is ``sources[i]``.

    With ``skip_last`` each row's last segment is not run (a decoder generates from it
    instead). ``before_step(rows)`` is called before every step with the rows it runs.
    """
    config = stepper.config
    for index, source in enumerate(sources):
        if len(source) == 0:
            raise InputError(f"document {index} has no tokens after removing special tokens")
    counts = [count_segments(len(source), config) - int(skip_last) for source in sources]
    for active in batch_schedule(counts, config):
        rows = [row for row, _ in active]
        segments = [sources[row].tokens(*segment_range(len(sources[row]), index, config))
                    for row, index in active]
        wanted = wants_logits([(row, index, counts[row]) for row, index in active])
        if before_step is not None:
            before_step(rows)
        on_step(rows, segments, stepper.step(rows, segments, logits=wanted))
