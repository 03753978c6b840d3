"""Failover for one sequence: the client keeps the last state the server returned and
the chunks sent but not yet answered, and when the replica holding the sequence is lost
(killed, restarted, unreachable, or the balancer moved the sequence), it sends those
chunks again on whatever replica answers, the first as START with that state, a bounded
number of times. The server keeps nothing the client cannot rebuild, so a lost replica
loses no work beyond the chunks in flight.

A restarted sequence takes a new correlation id: a replica that only seemed lost (a
timeout, a dropped connection) may still hold the old id at an older state, and the
balancer may route the id back to it; under a new id it can never step a stale state."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rmt_deploy.runtime.backends.base import State
from rmt_deploy.serving.errors import SequenceLostError, ServingError

if TYPE_CHECKING:
    from rmt_deploy.serving.client import Answer, Chunk, Generation

LOG = logging.getLogger(__name__)

# TritonClient.send: chunks of one sequence in, their answers out, in order
Send = Callable[[Iterable["Chunk"]], Iterator["Answer"]]
# TritonClient.generate's signature: (sequence_id, question, options, start, end, state_in,
# on_token) -> Generation
Generate = Callable[..., "Generation"]


@dataclass(frozen=True)
class RetryPolicy:
    """How long a lost sequence is retried: ``attempts`` tries per chunk (the first
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
    """Chunks sent again: the sequence restarted from the state after ``segment``
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
    """Sends one sequence's chunks through ``send`` (and its question through
    ``generate``) and keeps what a restart needs."""

    send: Send
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    new_id: Callable[[], int] = fresh_sequence_id
    generate: Generate | None = None
    retries: list[Retry] = field(default_factory=list, init=False)
    # the state the sequence started from, the state after the last answered chunk, and
    # the segments answered since the sequence started
    _origin: Mapping[str, np.ndarray] | None = field(default=None, init=False, repr=False)
    _state: State | None = field(default=None, init=False, repr=False)
    _answered: int = field(default=0, init=False)
    # the correlation id now in use: a START chunk's, then each restart's new one
    sequence_id: int = 0

    def stream(self, chunks: Iterable[Chunk]) -> Iterator[Answer]:
        """``TritonClient.send`` with failover: yields each chunk's answer once, in order,
        however many times the chunk was sent. The sequence goes on under the correlation
        id of its last restart."""
        source = iter(chunks)
        unanswered: deque[Chunk] = deque()  # sent (as the caller made them), not answered
        tries, since, restart = 1, time.monotonic(), False
        while True:
            try:
                for answer in self.send(self._feed(list(unanswered), source, unanswered,
                                                   restart)):
                    self._answered_with(answer.state, len(unanswered.popleft().input_ids))
                    tries, since, restart = 1, time.monotonic(), False
                    yield answer
                return
            except SequenceLostError as error:
                self._lost(error, tries, since)
                tries, restart = tries + 1, True

    def _feed(self, replay: list[Chunk], source: Iterator[Chunk], unanswered: deque[Chunk],
              restart: bool) -> Iterator[Chunk]:
        """``replay`` (chunks sent and not answered), then the rest of ``source`` (kept as
        unanswered), under the current id; after a loss the first is a START from the last
        state."""
        def fresh() -> Iterator[Chunk]:
            for chunk in source:
                if chunk.start:
                    self._origin, self._state, self._answered = chunk.state_in, None, 0
                    self.sequence_id = chunk.sequence_id
                unanswered.append(chunk)
                yield chunk

        for chunk in itertools.chain(replay, fresh()):
            start = chunk.start or restart
            yield dataclasses.replace(chunk, sequence_id=self.sequence_id, start=start,
                                      state_in=self._restore() if start else None)
            restart = False

    def question(self, question, options, start: bool = False, end: bool = False,
                 state_in: Mapping[str, np.ndarray] | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """``TritonClient.generate`` with failover, on the sequence :meth:`stream` read
        (or, with ``start``, a new one from ``state_in``): a lost sequence is asked again
        as a START from its last state."""
        if start:
            self._origin, self._state, self._answered = state_in, None, 0
        since = time.monotonic()
        for tries in itertools.count(1):
            restart = start or tries > 1
            try:
                return self.generate(self.sequence_id, question, options, start=restart,
                                     end=end, state_in=self._restore() if restart else None,
                                     on_token=on_token)
            except SequenceLostError as error:
                self._lost(error, tries, since)

    def _restore(self) -> Mapping[str, np.ndarray] | None:
        return self._state if self._answered else self._origin

    def _answered_with(self, state: State | None, segments: int) -> None:
        if state is None:
            raise ServingError("the server does not return the state (implicit state), "
                               "so a lost sequence cannot be restarted; serve the model "
                               "with rmt-triton --backend python")
        self._state, self._answered = state, self._answered + segments

    def _lost(self, error: SequenceLostError, attempt: int, since: float) -> None:
        """Give up after the last attempt, else wait and take a new correlation id."""
        if attempt == self.policy.attempts:
            raise ServingError(f"{error}; gave up after {attempt} tries in "
                               f"{time.monotonic() - since:.1f} s") from None
        waited = self.policy.wait(attempt)
        lost, self.sequence_id = self.sequence_id, self.new_id()
        LOG.warning("sequence %d lost at segment %d (%s); retrying in %.2f s from its last "
                    "state as sequence %d", lost, self._answered, error, waited,
                    self.sequence_id)
        self.sleep(waited)
        self.retries.append(Retry(lost, self.sequence_id, self._answered, attempt + 1,
                                  waited, str(error)))
