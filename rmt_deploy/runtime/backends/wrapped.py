"""An engine seen through another: every call goes to the real engine and its states.
Subclasses watch what crosses the engine boundary (timing, recording, counting) by
overriding a state's methods, without changing what the engine computes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rmt_deploy.runtime.backends.base import EngineState, State, StepEngine


class WrappedEngine(StepEngine):
    """``engine`` itself to every caller: its config, name, precision, graphs and batch
    limit; its
    states wrapped by :meth:`wrap`."""

    def __init__(self, engine: StepEngine) -> None:
        self.engine, self.config, self.name = engine, engine.config, engine.name
        self.precision, self.graphs = engine.precision, engine.graphs
        self.max_batch = engine.max_batch

    def new_state(self, state: Mapping[str, np.ndarray]) -> WrappedState:
        return self.wrap(self.engine.new_state(state))

    def wrap(self, state: EngineState) -> WrappedState:
        return WrappedState(self, state)


class WrappedState(EngineState):
    """``inner``, a state of ``owner``'s engine; every method hands over to it."""

    def __init__(self, owner: WrappedEngine, state: EngineState) -> None:
        super().__init__(state.batch)
        self.owner, self.inner = owner, state

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load(state)

    def state(self) -> State:
        return self.inner.state()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        return self.inner.step(input_ids, attention_mask, logits)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, Any]:
        return self.inner.prefill(input_ids, attention_mask, capacity)

    def decode(self, cache: Any, input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, Any]:
        return self.inner.decode(cache, input_ids, attention_mask)

    def close(self) -> None:
        self.inner.close()
        super().close()


#: ``record(input_ids, attention_mask, state)``: a step's inputs and the state it starts from.
Record = Callable[[np.ndarray, np.ndarray, State], None]


class StepRecorder(WrappedEngine):
    """``engine``, handing every step's inputs and the state it starts from (read from
    the engine before the step) to ``record``: what INT8 calibration samples."""

    def __init__(self, engine: StepEngine, record: Record) -> None:
        super().__init__(engine)
        self.record = record

    def wrap(self, state: EngineState) -> WrappedState:
        return _RecordingState(self, state)


class _RecordingState(WrappedState):
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        self.owner.record(np.array(input_ids), np.array(attention_mask), self.inner.state())
        return self.inner.step(input_ids, attention_mask, logits)
