"""What a backend is: an engine that runs one step, with memory in its own buffers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from rmt_deploy.spec import RMTConfig


class StepEngine(ABC):
    """Runs the segment step of one model.

    An engine is shared (thread-safe); the memory of a run lives in a state object the
    engine creates, holding the backend's own buffers (two of them, swapped each step,
    where the backend allows it).
    """

    name: str
    config: RMTConfig

    @abstractmethod
    def new_state(self, memory: np.ndarray) -> Any:
        """Backend buffers holding ``memory`` [batch, M, H] float32."""

    @abstractmethod
    def memory(self, state: Any) -> np.ndarray:
        """A host copy of the state's current memory."""

    @abstractmethod
    def step(self, state: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run one segment: the state's memory goes in, the new memory replaces it.
        Returns the logits on the host."""

    def read(self, state: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Decoder only: logits of ``[memory ; tokens]`` with no write slots; the memory is
        left unchanged."""
        raise NotImplementedError(f"the {self.name} backend has no read graph")
