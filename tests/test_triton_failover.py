"""serving/failover.py without a server: a lost sequence is restarted with the chunks
not yet answered, the first as START with the last state it answered with, a bounded
number of times; other errors pass through; a question is asked again likewise."""

from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.serving.client import Answer, Chunk, Generation
from rmt_deploy.serving.errors import SequenceLostError, ServingError
from rmt_deploy.serving.failover import Failover, RetryPolicy


class FakeReplica:
    """Steps a chunk of n segments as state + n; fails the chunks sent as listed (1: the
    first chunk sent). Answers the chunks as they come, like a pipelined stream."""

    def __init__(self, lost_calls=(), bad_calls=()) -> None:
        self.lost, self.bad, self.calls, self.state = set(lost_calls), set(bad_calls), [], None
        self.ids = []

    def send(self, chunks):
        for chunk in chunks:
            yield Answer(np.zeros((1, 2)), {"m": self._step(chunk)})

    def _step(self, chunk: Chunk) -> np.ndarray:
        self.calls.append((chunk.start, None if chunk.state_in is None
                           else int(chunk.state_in["m"][0]), len(chunk.input_ids)))
        self.ids.append(chunk.sequence_id)
        if len(self.calls) in self.lost:
            self.state = None  # the replica holding the sequence is gone
            raise SequenceLostError("cannot reach Triton at x (Connection refused)")
        if len(self.calls) in self.bad:
            raise ServingError("token ids must lie in [0, 10)")
        if chunk.start:
            self.state = np.zeros(1) if chunk.state_in is None else chunk.state_in["m"].copy()
        elif self.state is None:
            raise SequenceLostError("sequence 7 must specify the START flag")
        self.state = self.state + len(chunk.input_ids)
        return self.state.copy()

    def generate(self, sequence_id, question, options, start=False, end=False, state_in=None,
                 on_token=None) -> Generation:
        state = self._step(Chunk(sequence_id, np.zeros((1, 2)), np.zeros((1, 2)), start, end,
                                 state_in))
        return Generation([int(state[0])], None, {"m": state})


def chunks(count: int, segments: int = 2, state_in=None) -> list[Chunk]:
    ids = np.zeros((segments, 3), np.int64)
    return [Chunk(7, ids, ids, i == 0, i == count - 1, state_in if i == 0 else None)
            for i in range(count)]


def test_a_lost_sequence_restarts_from_its_last_state():
    replica, waits, ids = FakeReplica(lost_calls={4, 5}), [], iter([100, 200])
    failover = Failover(replica.send, RetryPolicy(attempts=3, backoff=0.5),
                        sleep=waits.append, new_id=lambda: next(ids))
    answers = list(failover.stream(chunks(6)))
    assert len(answers) == 6  # each chunk answered once
    # chunks 0-2 answered (6 segments); the 4th send is lost, so is its first retry; the
    # second retry restarts with START and the state after 6 segments
    assert replica.calls[3:6] == [(False, None, 2), (True, 6, 2), (True, 6, 2)]
    assert replica.calls[6:] == [(False, None, 2), (False, None, 2)]
    assert int(replica.state[0]) == 12  # every segment stepped once on the surviving state
    assert waits == [0.5, 1.0]
    assert [(r.segment, r.attempt) for r in failover.retries] == [(6, 2), (6, 3)]
    # each restart goes on under a new correlation id: no replica can step a stale state
    assert replica.ids == [7] * 4 + [100, 200, 200, 200]
    assert [(r.sequence_id, r.restarted_as) for r in failover.retries] == [(7, 100), (100, 200)]


def test_chunks_in_flight_are_sent_again_in_order():
    """A stream that fails with two chunks sent and unanswered replays both."""
    replica = FakeReplica()

    def pipelined(sent):  # sends two ahead, then loses the stream once
        sent = iter(sent)
        window = [next(sent), next(sent)]
        if not replica.calls:
            replica.calls.append("lost")
            raise SequenceLostError("cannot reach Triton at x (Connection reset)")
        yield from replica.send(window + list(sent))

    failover = Failover(pipelined, RetryPolicy(backoff=0), sleep=lambda _: None)
    assert len(list(failover.stream(chunks(3)))) == 3
    assert replica.calls[1:] == [(True, None, 2), (False, None, 2), (False, None, 2)]
    assert int(replica.state[0]) == 6


def test_a_lost_first_chunk_restarts_from_the_state_it_started_with():
    replica = FakeReplica(lost_calls={1})
    failover = Failover(replica.send, RetryPolicy(backoff=0), sleep=lambda _: None)
    list(failover.stream(chunks(1, state_in={"m": np.full(1, 40.0)})))
    assert replica.calls == [(True, 40, 2), (True, 40, 2)]


def test_a_question_after_a_lost_replica_restarts_from_the_kept_state():
    replica = FakeReplica(lost_calls={3})
    failover = Failover(replica.send, RetryPolicy(backoff=0), sleep=lambda _: None,
                        generate=replica.generate)
    list(failover.stream(chunks(2)))  # the context, left open
    answer = failover.question([1, 2], None, end=True)
    assert replica.calls[2:] == [(False, None, 1), (True, 4, 1)]
    assert answer.ids == [5]


def test_retries_are_bounded_and_end_in_one_line():
    replica = FakeReplica(lost_calls=set(range(3, 20)))
    failover = Failover(replica.send, RetryPolicy(attempts=4, backoff=0.1),
                        sleep=lambda _: None)
    with pytest.raises(ServingError, match=r"Connection refused\); gave up after 4 tries in"):
        list(failover.stream(chunks(6)))
    assert len(replica.calls) == 2 + 4


def test_other_errors_are_not_retried():
    replica = FakeReplica(bad_calls={2})
    failover = Failover(replica.send, RetryPolicy(), sleep=lambda _: pytest.fail("retried"))
    with pytest.raises(ServingError, match="token ids") as error:
        list(failover.stream(chunks(4)))
    assert not isinstance(error.value, SequenceLostError)
    assert len(replica.calls) == 2


def test_policy_bound():
    assert RetryPolicy(attempts=4, backoff=1, max_wait=3).bound() == 1 + 2 + 3
    with pytest.raises(ServingError, match="attempts >= 1"):
        RetryPolicy(attempts=0)


def test_a_question_without_context_goes_under_the_sequences_id():
    """A document of one segment is only a question: it starts the sequence itself."""
    replica = FakeReplica()
    failover = Failover(replica.send, RetryPolicy(), generate=replica.generate,
                        sequence_id=7)
    failover.question([1], None, start=True, end=True, state_in={"m": np.full(1, 3.0)})
    assert replica.ids == [7] and replica.calls == [(True, 3, 1)]
