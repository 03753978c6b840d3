"""An engine seen through another: every call goes to the real engine and its states.
Subclasses watch what crosses the engine boundary (timing, recording, counting) by
overriding a state's methods, without changing what the engine computes."""

from __future__ import annotations

from typing import Any

import numpy as np

from rmt_deploy.runtime.backends.base import EngineState, StepEngine


class WrappedEngine(StepEngine):
    """``engine`` itself to every caller: its config, name, precision and graphs; its
    states wrapped by :meth:`wrap`."""

    def __init__(self, engine: StepEngine) -> None:
        self.engine, self.config, self.name = engine, engine.config, engine.name
        self.precision, self.graphs = engine.precision, engine.graphs

    def new_state(self, memory: np.ndarray) -> WrappedState:
        return self.wrap(self.engine.new_state(memory))

    def wrap(self, state: EngineState) -> WrappedState:
        return WrappedState(self, state)


class WrappedState(EngineState):
    """``state`` of ``owner``'s engine; every method hands over to it."""

    def __init__(self, owner: WrappedEngine, state: EngineState) -> None:
        super().__init__(state.batch)
        self.owner, self.state = owner, state

    def load(self, memory: np.ndarray) -> None:
        self.state.load(memory)

    def memory(self) -> np.ndarray:
        return self.state.memory()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        return self.state.step(input_ids, attention_mask, logits)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, Any]:
        return self.state.prefill(input_ids, attention_mask, capacity)

    def decode(self, cache: Any, input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, Any]:
        return self.state.decode(cache, input_ids, attention_mask)

    def close(self) -> None:
        self.state.close()
        super().close()
