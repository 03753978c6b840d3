"""Per-sequence state kept by correlation id, for the python-backend model: each
request carries one segment of one sequence; requests of different sequences that
arrive together are stepped as one batch of one stepper, whose rows are the open
sequences (their state stays in the engine's buffers while the same sequences step
together). No Triton here, so it is tested directly."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rmt_deploy.contract import ATTENTION_MASK, INPUT_IDS, STEP, check_feed, check_state
from rmt_deploy.errors import InputError
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.serving.errors import ServingError


@dataclass(frozen=True)
class StepRequest:
    """One segment of one sequence, as the sequence batcher hands it over."""

    sequence_id: int
    start: bool
    end: bool
    input_ids: np.ndarray  # [1, positions] int64
    attention_mask: np.ndarray  # [1, positions] int64
    state_in: Mapping[str, np.ndarray] | None = None  # every pair [1, ...]: restore a saved
    # sequence (START only)
    wants_state: bool = True  # whether the response carries the state after the step


@dataclass(frozen=True)
class StepResult:
    logits: np.ndarray  # [1, ...] the step's logits
    state: State | None  # every pair [1, ...]: the sequence's state after the step, if asked


class SequenceStore:
    """The open sequences of one model instance and their state."""

    def __init__(self, engine: StepEngine, initial_state: Mapping[str, np.ndarray],
                 idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stepper = Stepper(engine)
        self.config = engine.config
        self.initial_state = check_state(self.config, initial_state, None, "the initial state")
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._used: dict[int, float] = {}  # open sequence id -> last step time

    def __len__(self) -> int:
        return len(self._used)

    def close(self) -> None:
        self.stepper.close()
        self._used.clear()

    def execute(self, requests: Sequence[StepRequest]) -> list[StepResult | ServingError]:
        """Step every valid request; a bad request gets its error and changes nothing."""
        self._forget_idle()
        results: list[StepResult | ServingError | None] = [None] * len(requests)
        starts: dict[int, State] = {}  # position -> state a START request begins with
        groups: dict[int, list[int]] = {}  # width -> request positions
        for position, request in enumerate(requests):
            try:
                state = self._check(request, requests[:position])
                if state is not None:
                    starts[position] = state
                groups.setdefault(request.input_ids.shape[1], []).append(position)
            except ServingError as error:
                results[position] = error
        for positions in groups.values():
            for position, result in zip(positions, self._step(requests, positions, starts),
                                        strict=True):
                results[position] = result
        return results  # type: ignore[return-value]

    def _step(self, requests, positions, starts) -> list[StepResult | ServingError]:
        batch = [requests[p] for p in positions]
        keys = [r.sequence_id for r in batch]
        for position in positions:
            if position in starts:  # START: the sequence begins (again) here
                sequence = requests[position].sequence_id
                self.stepper.remove(sequence)
                self.stepper.add(sequence, starts[position])
                self._used[sequence] = self._clock()
        try:
            logits = self.stepper.run(keys, np.concatenate([r.input_ids for r in batch]),
                                      np.concatenate([r.attention_mask for r in batch]))
        except Exception as error:  # a backend failure: report it, keep every sequence as it was
            message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            failure = ServingError(f"the step failed ({type(error).__name__}: {message})")
            return [failure] * len(batch)
        state = self.stepper.states(keys) if any(r.wants_state for r in batch) else None
        now = self._clock()
        for request in batch:
            if request.end:
                self._forget(request.sequence_id)
            else:
                self._used[request.sequence_id] = now
        return [StepResult(logits[row : row + 1], {
            name: array[row : row + 1] for name, array in state.items()}
            if state is not None and request.wants_state else None)
            for row, request in enumerate(batch)]

    def _check(self, request: StepRequest, earlier: Sequence[StepRequest]) -> State | None:
        """The state a START request begins with (None for a sequence that continues),
        or a ServingError saying what is wrong."""
        sequence = request.sequence_id
        if any(other.sequence_id == sequence for other in earlier):
            raise ServingError(f"sequence {sequence}: two segments in one batch; send the "
                               "next segment after the previous one's response")
        self._check_tokens(request)
        if request.state_in is not None:
            if not request.start:
                raise ServingError(f"sequence {sequence}: {', '.join(request.state_in)} "
                                   "restores a sequence and is only allowed on its START "
                                   "request")
            return self._check_state(sequence, request.state_in)
        if request.start:
            return self.initial_state
        if sequence not in self.stepper:
            raise ServingError(
                f"sequence {sequence} is not open on this server (never started, ended, idle "
                f"over {self.idle_seconds:g} s, or the server restarted); send its segment with "
                "START, or resume from the client's saved state")
        return None

    def _check_tokens(self, request: StepRequest) -> None:
        ids, mask = request.input_ids, request.attention_mask
        if getattr(ids, "ndim", 0) != 2 or ids.shape[0] != 1:
            raise ServingError(f"sequence {request.sequence_id}: input_ids must be [1, "
                               "positions], one segment of one sequence")
        try:
            check_feed(self.config, STEP, {INPUT_IDS: ids, ATTENTION_MASK: mask, **{
                name: value[None] for name, value in self.initial_state.items()}},
                       f"sequence {request.sequence_id}")
        except InputError as error:
            raise ServingError(f"{error}; segment the input as rmt-run does") from None

    def _check_state(self, sequence: int, state: Mapping[str, np.ndarray]) -> State:
        try:
            checked = check_state(self.config, state, 1, f"sequence {sequence}")
        except InputError as error:
            raise ServingError(str(error)) from None
        return {name: array[0] for name, array in checked.items()}

    def _forget(self, sequence: int) -> None:
        self.stepper.remove(sequence)
        self._used.pop(sequence, None)

    def _forget_idle(self) -> None:
        """Drop sequences idle past the timeout (Triton does not tell the model)."""
        limit = self._clock() - self.idle_seconds
        for sequence in [s for s, used in self._used.items() if used < limit]:
            self._forget(sequence)
