"""Calibration data by rolling the recurrence: the FP32 model runs over the corpus and
every step's inputs are recorded with the memory that step really received (the
initial memory at the first segment, the model's own memory at every later one)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmt_deploy.contract import ATTENTION_MASK, INPUT_IDS, MEMORY_IN
from rmt_deploy.runtime.backends.base import EngineState, StepEngine
from rmt_deploy.runtime.backends.wrapped import WrappedEngine, WrappedState
from rmt_deploy.runtime.loop import never, run_segments
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import TokenSource


@dataclass(frozen=True)
class CalibrationSteps:
    """Recorded step inputs, one row per (document, segment)."""

    input_ids: np.ndarray  # [steps, L] int64
    attention_mask: np.ndarray  # [steps, L] int64
    memory_in: np.ndarray  # [steps, M, H] float32
    depth: np.ndarray  # [steps] index of the segment in its document

    def __len__(self) -> int:
        return len(self.depth)

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """Batch-1 feeds keyed by the step graph's input names."""
        for i in range(len(self)):
            yield {INPUT_IDS: self.input_ids[i : i + 1], ATTENTION_MASK:
                   self.attention_mask[i : i + 1], MEMORY_IN: self.memory_in[i : i + 1]}

    def describe(self) -> dict[str, Any]:
        return {"steps": len(self), "deepest_segment": int(self.depth.max()),
                "first_segments": int((self.depth == 0).sum())}


class _Recorder(WrappedEngine):
    """The FP32 engine, with states that keep each step's inputs for the sampler."""

    def __init__(self, engine: StepEngine) -> None:
        super().__init__(engine)
        self.last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def wrap(self, state: EngineState) -> _RecordingState:
        return _RecordingState(self, state)


class _RecordingState(WrappedState):
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        """Records the step's inputs, the memory it receives included (read from the
        engine before the step: calibration needs every step's memory)."""
        self.owner.last = (input_ids.copy(), attention_mask.copy(), self.state.memory())
        return self.state.step(input_ids, attention_mask, logits=False)


class _Reservoir:
    """A uniform sample of at most ``size`` of the records offered to it."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, np.random.default_rng(seed)
        self.kept: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        self.seen = 0

    def offer(self, record: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> None:
        self.seen += 1
        if len(self.kept) < self.size:
            self.kept.append(record)
        elif (slot := int(self.rng.integers(self.seen))) < self.size:
            self.kept[slot] = record


def _sampling_callback(recorder: _Recorder, reservoir: _Reservoir, n_rows: int):
    depth = [0] * n_rows

    def on_step(rows: list[int], _segments, _logits) -> None:
        input_ids, attention_mask, memory = recorder.last
        for position, row in enumerate(rows):
            reservoir.offer((input_ids[position], attention_mask[position], memory[position],
                             depth[row]))
            depth[row] += 1

    return on_step


def collect_steps(engine: StepEngine, initial_memory: np.ndarray,
                  documents: Sequence[TokenSource], max_steps: int = 256, seed: int = 0,
                  batch_size: int = 16) -> CalibrationSteps:
    """Roll ``engine`` over ``documents`` and keep a uniform sample of at most
    ``max_steps`` of their steps (reservoir sampling: every depth equally likely)."""
    recorder = _Recorder(engine)
    reservoir = _Reservoir(max_steps, seed)
    for start in range(0, len(documents), batch_size):
        group = documents[start : start + batch_size]
        with Stepper(recorder) as stepper:
            for row in range(len(group)):
                stepper.add(row, initial_memory)
            run_segments(stepper, group, _sampling_callback(recorder, reservoir, len(group)),
                         wants_logits=never)
    kept = sorted(reservoir.kept, key=lambda record: record[3])
    return CalibrationSteps(
        np.stack([r[0] for r in kept]).astype(np.int64),
        np.stack([r[1] for r in kept]).astype(np.int64),
        np.stack([r[2] for r in kept]).astype(np.float32),
        np.array([r[3] for r in kept], dtype=np.int64))
