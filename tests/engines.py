"""Engine wrappers for tests: they pass every call to a real engine and count what
crosses the engine boundary."""

from __future__ import annotations

from collections import Counter

from rmt_deploy.runtime.backends.base import StepEngine
from rmt_deploy.runtime.backends.wrapped import WrappedEngine, WrappedState


class CountingEngine(WrappedEngine):
    """Counts states made and closed, state moved to the engine (new_state, load) and to
    the host (state), and steps (with each step's batch size in ``batches``)."""

    def __init__(self, engine: StepEngine) -> None:
        super().__init__(engine)
        self.counts: Counter[str] = Counter()
        self.batches: list[int] = []

    def wrap(self, state):
        self.counts["states"] += 1
        self.counts["uploads"] += 1
        return _CountingState(self, state)

    @property
    def open_states(self) -> int:
        return self.counts["states"] - self.counts["closed"]


class _CountingState(WrappedState):
    def load(self, state):
        self.owner.counts["uploads"] += 1
        super().load(state)

    def state(self):
        self.owner.counts["downloads"] += 1
        return super().state()

    def step(self, input_ids, attention_mask, logits=True):
        self.owner.counts["steps"] += 1
        self.owner.batches.append(len(input_ids))
        return super().step(input_ids, attention_mask, logits)

    def close(self):
        if not self.closed:
            self.owner.counts["closed"] += 1
        super().close()
