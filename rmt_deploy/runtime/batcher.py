"""Running segment steps for sessions: directly in the caller's thread, or batched across
sessions by one scheduler thread (each track's memory is one row of the batch)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.backends.base import StepEngine
from rmt_deploy.segmentation import step_inputs

#: ``run(memory [rows, M, H], segments) -> (logits, new memory)``: one step of some rows.
Runner = Callable[[np.ndarray, list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def direct_runner(engine: StepEngine) -> Runner:
    """Run each step at once, in the calling thread."""

    def run(memory: np.ndarray, segments: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        input_ids, attention_mask = step_inputs(segments, engine.config)
        state = engine.new_state(memory)
        logits = engine.step(state, input_ids, attention_mask)
        return logits, engine.memory(state)

    return run


@dataclass
class _Request:
    memory: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    new_memory: np.ndarray | None = None
    error: BaseException | None = None


class StepBatcher:
    """A Runner shared by many sessions: callers block in :meth:`run` while a scheduler
    thread takes every request waiting, groups those of equal step width (up to
    ``max_rows`` rows, a larger request alone) and runs each group as one step. Requests
    gather while the previous step runs, so nothing waits on a timer."""

    def __init__(self, engine: StepEngine, max_rows: int = 64) -> None:
        if max_rows < 1:
            raise InputError(f"max_rows must be >= 1, got {max_rows}")
        self._engine = engine
        self._max_rows = max_rows
        self._queue: list[_Request] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.steps = 0  # batched steps run
        self.rows = 0  # rows they held

    def run(self, memory: np.ndarray, segments: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        input_ids, attention_mask = step_inputs(segments, self._engine.config)
        request = _Request(np.asarray(memory, dtype=np.float32), input_ids, attention_mask)
        with self._wake:
            if self._stopped:
                raise InputError("the session pool is shut down; open a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="rmt-step-batcher",
                                                daemon=True)
                self._thread.start()
            self._queue.append(request)
            self._wake.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.logits, request.new_memory

    def shutdown(self) -> None:
        """Finish the requests waiting, then stop the scheduler thread."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopped:
                    self._wake.wait()
                if not self._queue:
                    return
                waiting, self._queue = self._queue, []
            for group in self._groups(waiting):
                self._execute(group)

    def _groups(self, requests: list[_Request]) -> Iterator[list[_Request]]:
        by_width: dict[int, list[_Request]] = {}
        for request in requests:
            by_width.setdefault(request.input_ids.shape[1], []).append(request)
        for same in by_width.values():
            group: list[_Request] = []
            for request in same:
                if group and sum(len(r.memory) for r in group) + len(request.memory) > \
                        self._max_rows:
                    yield group
                    group = []
                group.append(request)
            yield group

    def _execute(self, group: list[_Request]) -> None:
        try:
            state = self._engine.new_state(np.concatenate([r.memory for r in group]))
            logits = self._engine.step(state, np.concatenate([r.input_ids for r in group]),
                                       np.concatenate([r.attention_mask for r in group]))
            memory = self._engine.memory(state)
            self.steps += 1
            self.rows += len(memory)
            start = 0
            for request in group:
                end = start + len(request.memory)
                request.logits, request.new_memory = logits[start:end], memory[start:end]
                start = end
        except Exception as error:  # the engine's own: raised again in each caller's thread
            for request in group:
                request.error = error
        finally:
            for request in group:
                request.done.set()
