"""Failover for one sequence: the client keeps the last state the server returned, and
when the replica holding the sequence is lost (killed, restarted, unreachable, or the
balancer moved the sequence), it restarts the sequence with START and that state on
whatever replica answers, a bounded number of times. The server keeps nothing the client
cannot rebuild, so a lost replica loses no work beyond the segment in flight.

A restarted sequence takes a new correlation id: a replica that only seemed lost (a
timeout, a dropped connection) may still hold the old id at an older state, and the
balancer may route the id back to it; under a new id it can never step a stale state."""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from rmt_deploy.runtime.backends.base import State
from rmt_deploy.serving.errors import SequenceLostError, ServingError

LOG = logging.getLogger(__name__)

# TritonClient.step's signature: (sequence_id, input_ids, attention_mask, start, end,
# state_in, want_state) -> (logits, state)
Send = Callable[..., tuple[np.ndarray, State | None]]


@dataclass(frozen=True)
class RetryPolicy:
    """How long a lost sequence is retried: ``attempts`` tries per segment (the first
    included), waiting ``backoff`` seconds before the first retry, doubled each retry up to
    ``max_wait``. The total wait is at most ``bound()`` seconds."""

    attempts: int = 6
    backoff: float = 0.25
    max_wait: float = 4.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.max_wait < 0:
            raise ServingError(f"retry policy needs attempts >= 1 and waits >= 0, got {self}")

    def wait(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        return min(self.backoff * 2 ** (retry - 1), self.max_wait)

    def bound(self) -> float:
        return sum(self.wait(retry) for retry in range(1, self.attempts))


DEFAULT_RETRY = RetryPolicy()  # about 8 s of waits: a replica restarted in place comes back


@dataclass(frozen=True)
class Retry:
    """One segment sent again: the sequence restarted from the state after ``segment``
    segments of this call (0: from the state it started with)."""

    sequence_id: int  # the id that was lost
    restarted_as: int  # the new correlation id the sequence goes on under
    segment: int
    attempt: int  # 2 for the first retry
    waited: float  # seconds slept before this try
    reason: str


def fresh_sequence_id() -> int:
    return secrets.randbits(63) or 1


@dataclass
class Failover:
    """Sends one sequence's segments through ``send`` and keeps what a restart needs."""

    send: Send
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    new_id: Callable[[], int] = fresh_sequence_id
    retries: list[Retry] = field(default_factory=list, init=False)
    # the state the sequence started from, the state after the last answered segment, and
    # the segments answered since the sequence started
    _origin: Mapping[str, np.ndarray] | None = field(default=None, init=False, repr=False)
    _state: State | None = field(default=None, init=False, repr=False)
    _answered: int = field(default=0, init=False)
    _current: int = field(default=0, init=False)  # the correlation id now in use

    def step(self, sequence_id: int, input_ids: np.ndarray, attention_mask: np.ndarray,
             start: bool, end: bool, state_in: Mapping[str, np.ndarray] | None = None,
             want_state: bool = True) -> tuple[np.ndarray, State | None]:
        """``TritonClient.step`` with failover: the state is asked for every segment, and
        the sequence goes on under the correlation id of its last restart."""
        if start:
            self._origin, self._state, self._answered = state_in, None, 0
            self._current = sequence_id
        first_try = time.monotonic()
        for attempt in itertools.count(1):
            restart = start or attempt > 1
            restore = self._state if self._answered else self._origin
            try:
                logits, state = self.send(self._current, input_ids, attention_mask,
                                          start=restart, end=end,
                                          state_in=restore if restart else None,
                                          want_state=True)
            except SequenceLostError as error:
                if attempt == self.policy.attempts:
                    raise ServingError(
                        f"{error}; gave up after {attempt} tries in "
                        f"{time.monotonic() - first_try:.1f} s") from None
                waited = self.policy.wait(attempt)
                lost, self._current = self._current, self.new_id()
                LOG.warning("sequence %d lost at segment %d (%s); retrying in %.2f s from "
                            "its last state as sequence %d", lost, self._answered, error,
                            waited, self._current)
                self.sleep(waited)
                self.retries.append(Retry(lost, self._current, self._answered, attempt + 1,
                                          waited, str(error)))
                continue
            if state is None:
                raise ServingError("the server does not return the state (implicit state), "
                                   "so a lost sequence cannot be restarted; serve the model "
                                   "with rmt-triton --backend python")
            self._state, self._answered = state, self._answered + 1
            return logits, state if want_state else None
