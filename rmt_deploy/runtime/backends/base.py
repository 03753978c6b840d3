"""What a backend is: an engine that runs one step of the contract, and the states that
hold a stream's recurrent state (every pair the contract declares) in the engine's own
buffers between steps."""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rmt_deploy.contract import DECODE, PREFILL, STEP, Tensor, variant_names
from rmt_deploy.errors import BackendError
from rmt_deploy.manifest import Manifest, graph_key
from rmt_deploy.spec import RMTConfig

NO_GENERATION = ("this model cannot generate: it needs a decoder exported with its prefill "
                 "and decode graphs (re-export it with rmt-export)")


def precision_graphs(manifest: Manifest, precision: str) -> dict[str, str]:
    """Manifest keys of the graphs of one precision that the export has, by variant; a
    variant with no graph of that precision (INT8 exports: prefill and decode) runs its
    FP32 graph."""
    if graph_key(STEP, precision) not in manifest.graphs:
        available = sorted({spec.precision for spec in manifest.graphs.values()})
        raise BackendError(f"this export has no {precision} graph (it has "
                           f"{', '.join(available)}); re-export with --precision {precision}")
    keys = {}
    for graph in variant_names(manifest.config):
        key = next((k for k in (graph_key(graph, precision), graph) if k in manifest.graphs),
                   None)
        if key is not None:
            keys[graph] = key
    return keys


def check_io(where: str, declared: tuple[Tensor, ...], actual: dict[str, tuple[str, tuple]],
             kind: str) -> None:
    """Refuse a graph whose ``actual`` inputs or outputs (name -> (dtype, shape), dims the
    graph leaves open as str or None) differ from what the manifest declares: another
    name, dtype or rank, or a fixed size other than the declared one."""
    names = [t.name for t in declared]
    if sorted(actual) != sorted(names):
        raise BackendError(f"{where}: the graph's {kind}s are {', '.join(sorted(actual))}, the "
                           f"manifest declares {', '.join(names)}; re-export the model")
    for tensor in declared:
        dtype, shape = actual[tensor.name]
        if dtype != tensor.dtype or len(shape) != len(tensor.shape) or any(
                isinstance(found, int) and found != expected
                for found, expected in zip(shape, tensor.shape, strict=True)):
            raise BackendError(f"{where}: {kind} {tensor.name} is {dtype} {shape} in the graph, "
                               f"the manifest declares {tensor.dtype} {list(tensor.shape)}; "
                               "re-export the model")


#: A recurrent state: an array per state pair of the contract, by its input name.
State = dict[str, np.ndarray]


class EngineState(ABC):
    """The recurrent state of ``batch`` rows in an engine's buffers (two of them per state
    pair, swapped each step, or bound in place), with what its steps reuse (bindings,
    requests, contexts). A state is used by one thread at a time; ``close()`` frees it (a
    finalizer does too, as a backstop)."""

    def __init__(self, batch: int, free: Callable[[], None] | None = None) -> None:
        self.batch = batch
        self._finalizer = weakref.finalize(self, free) if free is not None else None
        self.closed = False

    @abstractmethod
    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Make ``state`` (every pair, ``[batch, ...]`` in its declared dtype) the
        state's (a copy)."""

    @abstractmethod
    def state(self) -> State:
        """A host copy of the current state, every pair ``[batch, ...]``."""

    @abstractmethod
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        """Run one segment: the state goes in, the new state replaces it. Returns the
        logits on the host, or None with ``logits=False``: then the write graph runs
        where the export has one (no head, nothing copied to the host)."""

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, Any]:
        """Decoders: generation's first step, ``[memory ; tokens]`` read without write
        slots (the state is left unchanged). Returns the logits after each row's last
        real token [batch, vocab] and the keys and values it cached, in the backend's own
        buffers; ``capacity``: the most positions the cache will hold (a backend may
        allocate it once)."""
        raise BackendError(NO_GENERATION)

    def decode(self, cache: Any, input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, Any]:
        """Decoders: one generated token a row (``input_ids`` [batch, 1]) with ``cache``
        (from :meth:`prefill` or the last decode); ``attention_mask`` covers the cached
        positions and the new one. Returns its logits [batch, vocab] and the grown cache."""
        raise BackendError(NO_GENERATION)

    def close(self) -> None:
        """Free the backend's buffers; the state cannot be used after."""
        self.closed = True
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> EngineState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepEngine(ABC):
    """Runs the segment step of one model; shared between threads. Each stream keeps its
    recurrent state in an engine state the engine creates (:meth:`new_state`)."""

    name: str
    config: RMTConfig
    precision: str = "fp32"
    graphs: frozenset[str] = frozenset({STEP})  # the contract's variants it runs
    max_batch: int | None = None  # the most rows a step takes (None: no limit)

    @property
    def generates(self) -> bool:
        """Whether it has the prefill and decode graphs that generation runs."""
        return PREFILL in self.graphs and DECODE in self.graphs

    @abstractmethod
    def new_state(self, state: Mapping[str, np.ndarray]) -> EngineState:
        """An engine state of ``batch`` rows holding ``state`` (a copy)."""


def rows_of(state: Mapping[str, np.ndarray]) -> int:
    """The number of rows a state holds (its arrays' first axis)."""
    return len(next(iter(state.values())))
