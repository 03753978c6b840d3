"""Where stream sessions keep and step their rows: a stepper of their own (steps run in
the caller's thread), or a :class:`StepBatcher` shared by many sessions, whose scheduler
thread runs the steps of all of them batched together on one stepper."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.segmentation import step_inputs


class Rows(Protocol):
    """What a session needs of the rows its tracks live in (a :class:`Stepper` is one)."""

    def add(self, key: Hashable, state: Mapping[str, np.ndarray]) -> None: ...

    def remove(self, key: Hashable) -> None: ...

    def state(self, key: Hashable) -> State: ...

    def states(self, keys: Sequence[Hashable]) -> State: ...

    def step(self, keys: Sequence[Hashable], segments: Sequence[np.ndarray],
             logits: bool = True) -> np.ndarray | None: ...

    def close(self) -> None: ...


@dataclass
class _Request:
    keys: list[Hashable]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    logits: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class StepBatcher:
    """Rows shared by many sessions: callers block in :meth:`step` while a scheduler
    thread takes every request waiting, groups those of equal step width (up to
    ``max_rows`` rows, and never more than the engine's ``max_batch``; a larger request
    alone) and runs each group as one step of one
    stepper. Requests gather while the previous step runs, so nothing waits on a timer;
    sessions that step together each round keep their state resident."""

    def __init__(self, engine: StepEngine, max_rows: int = 64) -> None:
        if max_rows < 1:
            raise InputError(f"max_rows must be >= 1, got {max_rows}")
        self.stepper = Stepper(engine)
        self._max_rows = min(max_rows, engine.max_batch or max_rows)
        self._queue: list[_Request] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.steps = 0  # batched steps run
        self.rows = 0  # rows they held

    def add(self, key: Hashable, state: Mapping[str, np.ndarray]) -> None:
        if self._stopped:
            raise InputError("the session pool is shut down; open a new one")
        self.stepper.add(key, state)

    def remove(self, key: Hashable) -> None:
        self.stepper.remove(key)

    def state(self, key: Hashable) -> State:
        return self.stepper.state(key)

    def states(self, keys: Sequence[Hashable]) -> State:
        return self.stepper.states(keys)

    def step(self, keys: Sequence[Hashable], segments: Sequence[np.ndarray],
             logits: bool = True) -> np.ndarray | None:
        input_ids, attention_mask = step_inputs(segments, self.stepper.config)
        request = _Request(list(keys), input_ids, attention_mask, logits)
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
        return request.result

    def close(self) -> None:
        """Finish the requests waiting, stop the scheduler thread, free the stepper."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.stepper.close()

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
                if group and sum(len(r.keys) for r in group) + len(request.keys) > \
                        self._max_rows:
                    yield group
                    group = []
                group.append(request)
            yield group

    def _execute(self, group: list[_Request]) -> None:
        try:
            result = self.stepper.run(
                [key for r in group for key in r.keys],
                np.concatenate([r.input_ids for r in group]),
                np.concatenate([r.attention_mask for r in group]),
                logits=any(r.logits for r in group))
            self.steps += 1
            self.rows += sum(len(r.keys) for r in group)
            start = 0
            for request in group:
                end = start + len(request.keys)
                request.result = result[start:end] if request.logits else None
                start = end
        except Exception as error:  # the engine's own: raised again in each caller's thread
            for request in group:
                request.error = error
        finally:
            for request in group:
                request.done.set()
