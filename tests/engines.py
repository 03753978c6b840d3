"""Engine wrappers for tests: they pass every call to a real engine and count or hook
what crosses the engine boundary."""

from __future__ import annotations

from collections import Counter

import numpy as np

from rmt_deploy.runtime.backends.base import EngineState, StepEngine


class WrappedEngine(StepEngine):
    """The real engine; subclasses hook :meth:`before_step`."""

    def __init__(self, engine: StepEngine) -> None:
        self.engine, self.config, self.name = engine, engine.config, engine.name
        self.precision = engine.precision

    def new_state(self, memory: np.ndarray) -> WrappedState:
        return WrappedState(self, self.engine.new_state(memory))

    def before_step(self, input_ids: np.ndarray) -> None:
        pass


class WrappedState(EngineState):
    def __init__(self, owner: WrappedEngine, state: EngineState) -> None:
        super().__init__(state.batch)
        self.owner, self.state = owner, state

    def load(self, memory):
        self.state.load(memory)

    def memory(self):
        return self.state.memory()

    def step(self, input_ids, attention_mask, logits=True):
        self.owner.before_step(input_ids)
        return self.state.step(input_ids, attention_mask, logits)

    def prefill(self, input_ids, attention_mask, capacity=None):
        return self.state.prefill(input_ids, attention_mask, capacity)

    def decode(self, cache, input_ids, attention_mask):
        return self.state.decode(cache, input_ids, attention_mask)

    def close(self):
        self.state.close()
        super().close()


class CountingEngine(WrappedEngine):
    """Counts states made and closed, memory moved to the engine (new_state, load) and to
    the host (memory), and steps (with each step's batch size in ``batches``)."""

    def __init__(self, engine: StepEngine) -> None:
        super().__init__(engine)
        self.counts: Counter[str] = Counter()
        self.batches: list[int] = []

    def new_state(self, memory):
        self.counts["states"] += 1
        self.counts["uploads"] += 1
        return _CountingState(self, self.engine.new_state(memory))

    @property
    def open_states(self) -> int:
        return self.counts["states"] - self.counts["closed"]


class _CountingState(WrappedState):
    def load(self, memory):
        self.owner.counts["uploads"] += 1
        super().load(memory)

    def memory(self):
        self.owner.counts["downloads"] += 1
        return super().memory()

    def step(self, input_ids, attention_mask, logits=True):
        self.owner.counts["steps"] += 1
        self.owner.batches.append(len(input_ids))
        return super().step(input_ids, attention_mask, logits)

    def close(self):
        if not self.closed:
            self.owner.counts["closed"] += 1
        super().close()
