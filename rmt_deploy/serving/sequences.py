"""Per-sequence memory kept by correlation id, for the python-backend model: each
request carries one segment of one sequence; requests of different sequences that
arrive together are stepped as one batch. No Triton here, so it is tested directly."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rmt_deploy.runtime.backends.base import StepEngine
from rmt_deploy.serving.errors import ServingError


@dataclass(frozen=True)
class StepRequest:
    """One segment of one sequence, as the sequence batcher hands it over."""

    sequence_id: int
    start: bool
    end: bool
    input_ids: np.ndarray  # [1, positions] int64
    attention_mask: np.ndarray  # [1, positions] int64
    memory_in: np.ndarray | None = None  # [1, M, H]: restore a saved sequence (START only)


@dataclass(frozen=True)
class StepResult:
    logits: np.ndarray  # [1, ...] the step's logits
    memory: np.ndarray  # [1, M, H] the sequence's memory after the step


class SequenceStore:
    """The open sequences of one model instance and their memory."""

    def __init__(self, engine: StepEngine, initial_memory: np.ndarray, idle_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.config = engine.config
        self.initial_memory = np.asarray(initial_memory, dtype=np.float32)
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._memory: dict[int, np.ndarray] = {}  # sequence id -> [M, H]
        self._used: dict[int, float] = {}  # sequence id -> last step time

    def __len__(self) -> int:
        return len(self._memory)

    def execute(self, requests: Sequence[StepRequest]) -> list[StepResult | ServingError]:
        """Step every valid request; a bad request gets its error and changes nothing."""
        self._forget_idle()
        results: list[StepResult | ServingError | None] = [None] * len(requests)
        memories: dict[int, np.ndarray] = {}
        groups: dict[int, list[int]] = {}  # width -> request positions
        for position, request in enumerate(requests):
            try:
                memories[position] = self._check(request, requests[:position])
                groups.setdefault(request.input_ids.shape[1], []).append(position)
            except ServingError as error:
                results[position] = error
        for positions in groups.values():
            for position, result in zip(positions, self._step(requests, positions, memories),
                                        strict=True):
                results[position] = result
        return results  # type: ignore[return-value]

    def _step(self, requests, positions, memories) -> list[StepResult | ServingError]:
        batch = [requests[p] for p in positions]
        memory = np.stack([memories[p] for p in positions])
        state = self.engine.new_state(memory)
        try:
            logits = self.engine.step(state, np.concatenate([r.input_ids for r in batch]),
                                      np.concatenate([r.attention_mask for r in batch]))
        except Exception as error:  # a backend failure: report it, keep every sequence as it was
            message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            failure = ServingError(f"the step failed ({type(error).__name__}: {message})")
            return [failure] * len(batch)
        new_memory = self.engine.memory(state)
        now = self._clock()
        for row, request in enumerate(batch):
            if request.end:
                self._memory.pop(request.sequence_id, None)
                self._used.pop(request.sequence_id, None)
            else:
                self._memory[request.sequence_id] = new_memory[row]
                self._used[request.sequence_id] = now
        return [StepResult(logits[row : row + 1], new_memory[row : row + 1])
                for row in range(len(batch))]

    def _check(self, request: StepRequest, earlier: Sequence[StepRequest]) -> np.ndarray:
        """The memory the request starts from, or a ServingError saying what is wrong."""
        sequence = request.sequence_id
        if any(other.sequence_id == sequence for other in earlier):
            raise ServingError(f"sequence {sequence}: two segments in one batch; send the "
                               "next segment after the previous one's response")
        self._check_tokens(request)
        if request.memory_in is not None:
            if not request.start:
                raise ServingError(f"sequence {sequence}: memory_in restores a sequence and "
                                   "is only allowed on its START request")
            return self._check_memory(sequence, request.memory_in)
        if request.start:
            return self.initial_memory
        if sequence not in self._memory:
            raise ServingError(
                f"sequence {sequence} is not open on this server (never started, ended, idle "
                f"over {self.idle_seconds:g} s, or the server restarted); send its segment with "
                "START, or resume from the client's saved state")
        return self._memory[sequence]

    def _check_tokens(self, request: StepRequest) -> None:
        config, ids, mask = self.config, request.input_ids, request.attention_mask
        width = config.input_size if config.is_encoder else None
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape != mask.shape:
            raise ServingError(f"sequence {request.sequence_id}: input_ids {ids.shape} and "
                               f"attention_mask {mask.shape} must both be [1, positions]")
        if width is not None and ids.shape[1] != width:
            raise ServingError(f"sequence {request.sequence_id}: {ids.shape[1]} positions, "
                               f"this model takes {width}; segment the input as rmt-run does")
        if width is None and not 1 <= ids.shape[1] <= config.segment_size:
            raise ServingError(f"sequence {request.sequence_id}: {ids.shape[1]} tokens, this "
                               f"model takes 1 to {config.segment_size} a segment")
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise ServingError(f"sequence {request.sequence_id}: token ids must lie in [0, "
                               f"{config.vocab_size}); wrong tokenizer?")
        if not np.isin(mask, (0, 1)).all():
            raise ServingError(f"sequence {request.sequence_id}: attention_mask must be 0 or 1")

    def _check_memory(self, sequence: int, memory: np.ndarray) -> np.ndarray:
        expected = (1, self.config.num_mem_tokens, self.config.hidden_size)
        if memory.shape != expected:
            raise ServingError(f"sequence {sequence}: memory_in has shape {memory.shape}, this "
                               f"model's memory is {expected}; the state is from another model")
        if not np.isfinite(memory).all():
            raise ServingError(f"sequence {sequence}: memory_in holds NaN or infinity; the "
                               "saved state is damaged")
        return memory[0].astype(np.float32)

    def _forget_idle(self) -> None:
        """Drop sequences idle past the timeout (Triton does not tell the model)."""
        limit = self._clock() - self.idle_seconds
        for sequence in [s for s, used in self._used.items() if used < limit]:
            del self._memory[sequence], self._used[sequence]
