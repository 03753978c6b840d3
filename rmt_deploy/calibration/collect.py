"""Calibration data by rolling the recurrence: the FP32 model runs over the corpus and
every step's inputs are recorded with the state that step really received (the
initial state at the first segment, the model's own state at every later one)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmt_deploy.contract import ATTENTION_MASK, INPUT_IDS
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.backends.wrapped import StepRecorder
from rmt_deploy.runtime.loop import never, run_segments
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import TokenSource


@dataclass(frozen=True)
class CalibrationSteps:
    """Recorded step inputs, one row per (document, segment)."""

    input_ids: np.ndarray  # [steps, L] int64
    attention_mask: np.ndarray  # [steps, L] int64
    state: State  # [steps, ...] every state pair, by its input name
    depth: np.ndarray  # [steps] index of the segment in its document

    def __len__(self) -> int:
        return len(self.depth)

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """Batch-1 feeds keyed by the step graph's input names."""
        for i in range(len(self)):
            yield {INPUT_IDS: self.input_ids[i : i + 1], ATTENTION_MASK:
                   self.attention_mask[i : i + 1],
                   **{name: array[i : i + 1] for name, array in self.state.items()}}

    def describe(self) -> dict[str, Any]:
        return {"steps": len(self), "deepest_segment": int(self.depth.max()),
                "first_segments": int((self.depth == 0).sum())}


class _Reservoir:
    """A uniform sample of at most ``size`` of the records offered to it."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, np.random.default_rng(seed)
        self.kept: list[tuple[np.ndarray, np.ndarray, State, int]] = []
        self.seen = 0

    def offer(self, record: tuple[np.ndarray, np.ndarray, State, int]) -> None:
        self.seen += 1
        if len(self.kept) < self.size:
            self.kept.append(record)
        elif (slot := int(self.rng.integers(self.seen))) < self.size:
            self.kept[slot] = record


def _sampling_callback(last: list, reservoir: _Reservoir, n_rows: int):
    """Offers each row of the step ``last[0]`` holds (ids, mask, state) to ``reservoir``."""
    depth = [0] * n_rows

    def on_step(rows: list[int], _segments, _logits) -> None:
        input_ids, attention_mask, state = last[0]
        for position, row in enumerate(rows):
            reservoir.offer((input_ids[position], attention_mask[position],
                             {name: array[position] for name, array in state.items()},
                             depth[row]))
            depth[row] += 1

    return on_step


def collect_steps(engine: StepEngine, initial_state: State,
                  documents: Sequence[TokenSource], max_steps: int = 256, seed: int = 0,
                  batch_size: int = 16) -> CalibrationSteps:
    """Roll ``engine`` over ``documents`` and keep a uniform sample of at most
    ``max_steps`` of their steps (reservoir sampling: every depth equally likely)."""
    last: list = [None]  # the step being run: its inputs and the state it starts from
    recorder = StepRecorder(engine, lambda *step: last.__setitem__(0, step))
    reservoir = _Reservoir(max_steps, seed)
    for start in range(0, len(documents), batch_size):
        group = documents[start : start + batch_size]
        with Stepper(recorder) as stepper:
            for row in range(len(group)):
                stepper.add(row, initial_state)
            run_segments(stepper, group, _sampling_callback(last, reservoir, len(group)),
                         wants_logits=never)
    kept = sorted(reservoir.kept, key=lambda record: record[3])
    return CalibrationSteps(
        np.stack([r[0] for r in kept]).astype(np.int64),
        np.stack([r[1] for r in kept]).astype(np.int64),
        {name: np.stack([r[2][name] for r in kept]) for name in kept[0][2]},
        np.array([r[3] for r in kept], dtype=np.int64))
