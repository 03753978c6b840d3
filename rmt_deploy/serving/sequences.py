"""Per-sequence state kept by correlation id, for the python-backend model: each request
carries a chunk of one or more segments of one sequence, stepped in order (a chunk
marked as a question's context is read as rmt-run --generate reads one: a sliding-window
armt's window cleared before each segment), or (decoders) a question to generate an
answer to from the sequence's state, which generation leaves as it was. Requests of
different sequences that arrive together are stepped as one batch of one stepper,
segment by segment, whose rows are the open sequences (their state stays in the engine's
buffers while the same sequences step together). No Triton here, so it is tested
directly."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rmt_deploy.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    STEP,
    check_feed,
    check_state,
    window_pairs,
)
from rmt_deploy.errors import InputError
from rmt_deploy.runtime.backends.base import NO_GENERATION, State, StepEngine
from rmt_deploy.runtime.generation import GenerationOptions, check_room
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.serving.errors import ServingError


@dataclass(frozen=True)
class StepRequest:
    """A chunk of one sequence's segments, as the sequence batcher hands it over; with
    ``generate``, the one segment is a question to answer instead (decoders)."""

    sequence_id: int
    start: bool
    end: bool
    input_ids: np.ndarray  # [segments, positions] int64, each row laid out as rmt-run does
    attention_mask: np.ndarray  # [segments, positions] int64
    state_in: Mapping[str, np.ndarray] | None = None  # every pair [1, ...]: restore a saved
    # sequence (START only)
    wants_state: bool = True  # whether the response carries the state after the chunk
    wants_logits: bool = True  # whether it carries logits (else none are computed)
    generate: GenerationOptions | None = None
    on_token: Callable[[int], None] | None = None  # generation: sees each token as made
    question_context: bool = False  # the chunk is a question's context: read as the
    # authors' generate reads it (a sliding-window armt's window cleared before each step)


@dataclass(frozen=True)
class StepResult:
    logits: np.ndarray | None  # decoder: [segments, ...] each segment's logits; encoder:
    # [1, ...] the last segment's; None after a question
    state: State | None  # every pair [1, ...]: the sequence's state after the chunk, if asked
    generated: list[int] | None = None  # the ids generated after the question


class SequenceStore:
    """The open sequences of one model instance and their state."""

    def __init__(self, engine: StepEngine, initial_state: Mapping[str, np.ndarray],
                 idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stepper = Stepper(engine)
        self.config = engine.config
        self._window = [pair.name_in for pair in window_pairs(self.config)]
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
        """Run every valid request; a bad request gets its error and changes nothing."""
        self._forget_idle()
        results: list[StepResult | ServingError | None] = [None] * len(requests)
        valid: list[int] = []
        for position, request in enumerate(requests):
            try:
                state = self._check(request, requests[:position])
            except ServingError as error:
                results[position] = error
                continue
            if state is not None:  # START: the sequence begins (again) here
                self.stepper.remove(request.sequence_id)
                self.stepper.add(request.sequence_id, state)
            self._used[request.sequence_id] = self._clock()
            valid.append(position)
        chunks = [p for p in valid if requests[p].generate is None]
        logits = self._step_chunks(requests, chunks, results)
        for position in valid:
            request = requests[position]
            if results[position] is not None:  # its chunk failed: the sequence is dropped
                self._forget(request.sequence_id)
                continue
            generated = None
            if request.generate is not None:
                try:
                    generated = self._generate(request)
                except ServingError as error:
                    results[position] = error
                    continue
            state = self.stepper.states([request.sequence_id]) if request.wants_state else None
            results[position] = StepResult(logits.get(position), state, generated)
            if request.end:
                self._forget(request.sequence_id)
            else:
                self._used[request.sequence_id] = self._clock()
        return results  # type: ignore[return-value]

    def _step_chunks(self, requests, positions, results) -> dict[int, np.ndarray]:
        """Step the chunks of ``requests[positions]`` segment by segment, each round's
        segments of equal width as one batch; returns each chunk's logits: a decoder's
        of every segment [segments, ...], an encoder's of its last segment [1, ...] (the
        others run without logits, as rmt-run runs them). A failed step puts its error
        in ``results`` for those requests. A chunk that asked for no logits computes none."""
        logits: dict[int, list[np.ndarray]] = {p: [] for p in positions}
        rounds = max((len(requests[p].input_ids) for p in positions), default=0)
        for index in range(rounds):
            groups: dict[tuple[int, bool], list[int]] = {}  # width, logits -> positions
            for p in positions:
                count = len(requests[p].input_ids)
                if results[p] is None and index < count:
                    wanted = requests[p].wants_logits and (
                        not self.config.is_encoder or index == count - 1)
                    groups.setdefault((requests[p].input_ids.shape[1], wanted), []).append(p)
            for (_, wanted), group in groups.items():
                batch = [requests[p] for p in group]
                unwindowed = [r.sequence_id for r in batch if r.question_context]
                try:
                    if self._window and unwindowed:
                        self.stepper.zero(unwindowed, self._window)
                    out = self.stepper.run([r.sequence_id for r in batch],
                                           np.stack([r.input_ids[index] for r in batch]),
                                           np.stack([r.attention_mask[index] for r in batch]),
                                           logits=wanted)
                except Exception as error:  # a backend failure: report it
                    text = str(error).strip()
                    message = text.splitlines()[0][:200] if text else ""
                    failure = ServingError(
                        f"the step failed ({type(error).__name__}: {message}); the sequence "
                        "is closed: start it again from the client's last state")
                    for p in group:
                        results[p] = failure
                    continue
                if wanted:
                    for row, p in enumerate(group):
                        logits[p].append(out[row])
        return {p: np.stack(rows) for p, rows in logits.items() if rows}

    def _generate(self, request: StepRequest) -> list[int]:
        question = request.input_ids[0][request.attention_mask[0] == 1]
        try:
            made = None if request.on_token is None else (
                lambda tokens: request.on_token(int(tokens[0])))
            (generated,) = self.stepper.generate([request.sequence_id], [question],
                                                 request.generate, on_tokens=made)
        except Exception as error:  # a backend failure: report it
            text = str(error).strip()
            raise ServingError(f"generation failed ({type(error).__name__}: "
                               f"{text.splitlines()[0][:200] if text else ''})") from None
        return generated

    def _check(self, request: StepRequest, earlier: Sequence[StepRequest]) -> State | None:
        """The state a START request begins with (None for a sequence that continues),
        or a ServingError saying what is wrong."""
        sequence = request.sequence_id
        if any(other.sequence_id == sequence for other in earlier):
            raise ServingError(f"sequence {sequence}: two requests in one batch; send the "
                               "next chunk after the previous one's response")
        self._check_tokens(request)
        if request.generate is not None:
            self._check_generation(request)
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
        if getattr(ids, "ndim", 0) != 2 or ids.shape[0] < 1 or getattr(mask, "shape", ()) \
                != ids.shape:
            raise ServingError(f"sequence {request.sequence_id}: input_ids and attention_mask "
                               "must be [segments, positions], segments of one sequence")
        try:
            check_feed(self.config, STEP, {INPUT_IDS: ids, ATTENTION_MASK: mask, **{
                name: np.broadcast_to(value, (len(ids), *value.shape))
                for name, value in self.initial_state.items()}},
                       f"sequence {request.sequence_id}")
        except InputError as error:
            raise ServingError(f"{error}; segment the input as rmt-run does") from None

    def _check_generation(self, request: StepRequest) -> None:
        where = f"sequence {request.sequence_id}"
        if not self.stepper.engine.generates:
            raise ServingError(f"{where}: {NO_GENERATION}")
        if len(request.input_ids) != 1:
            raise ServingError(f"{where}: a question is one segment; send the context before "
                               "it as chunks of the sequence")
        try:
            check_room(self.config, request.input_ids.shape[1], request.generate)
        except InputError as error:
            raise ServingError(f"{where}: {error}") from None

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
