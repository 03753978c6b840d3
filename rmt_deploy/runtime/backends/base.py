"""What a backend is: an engine that runs one step, with memory in its own buffers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from rmt_deploy.errors import BackendError
from rmt_deploy.manifest import READ_GRAPH, STEP_GRAPH, Manifest, graph_key
from rmt_deploy.spec import RMTConfig

NO_READ_GRAPH = ("this export has no read graph (generation needs a decoder exported by "
                 "rmt-export)")


def precision_graphs(manifest: Manifest, precision: str) -> dict[str, str]:
    """Manifest keys of the step (and read) graphs of one precision."""
    keys = {graph: graph_key(graph, precision) for graph in (STEP_GRAPH, READ_GRAPH)}
    if keys[STEP_GRAPH] not in manifest.graphs:
        available = sorted({spec.precision for spec in manifest.graphs.values()})
        raise BackendError(f"this export has no {precision} graph (it has "
                           f"{', '.join(available)}); re-export with --precision {precision}")
    return keys


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
