"""serving/failover.py without a server: a lost sequence is restarted with START and the
last state it answered with, a bounded number of times; other errors pass through."""

from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.serving.errors import SequenceLostError, ServingError
from rmt_deploy.serving.failover import Failover, RetryPolicy


class FakeReplica:
    """Answers a segment with state = previous state + 1; fails the calls listed."""

    def __init__(self, lost_calls=(), bad_calls=()) -> None:
        self.lost, self.bad, self.calls, self.state = set(lost_calls), set(bad_calls), [], None
        self.ids = []

    def __call__(self, sequence_id, input_ids, attention_mask, start, end, state_in=None,
                 want_state=True):
        self.calls.append((start, None if state_in is None else int(state_in["m"][0])))
        self.ids.append(sequence_id)
        if len(self.calls) in self.lost:
            self.state = None  # the replica holding the sequence is gone
            raise SequenceLostError("cannot reach Triton at x (Connection refused)")
        if len(self.calls) in self.bad:
            raise ServingError("token ids must lie in [0, 10)")
        if start:
            self.state = np.zeros(1) if state_in is None else state_in["m"].copy()
        elif self.state is None:
            raise SequenceLostError("sequence 7 must specify the START flag")
        self.state = self.state + 1
        return np.zeros((1, 2)), {"m": self.state.copy()} if want_state else None


def send_all(failover: Failover, segments: int) -> list:
    return [failover.step(7, None, None, start=i == 0, end=i == segments - 1,
                          want_state=False) for i in range(segments)]


def test_a_lost_sequence_restarts_from_its_last_state():
    replica, waits, ids = FakeReplica(lost_calls={4, 5}), [], iter([100, 200])
    failover = Failover(replica, RetryPolicy(attempts=3, backoff=0.5), sleep=waits.append,
                        new_id=lambda: next(ids))
    send_all(failover, 6)
    # segments 0-2 answered; the 4th call is lost, so is its first retry; the second
    # retry restarts with START and the state after 3 segments
    assert replica.calls[3:6] == [(False, None), (True, 3), (True, 3)]
    assert replica.calls[6:] == [(False, None), (False, None)]
    assert int(replica.state[0]) == 6  # every segment stepped once on the surviving state
    assert waits == [0.5, 1.0]
    assert [(r.segment, r.attempt) for r in failover.retries] == [(3, 2), (3, 3)]
    # each restart goes on under a new correlation id: no replica can step a stale state
    assert replica.ids == [7] * 4 + [100, 200, 200, 200]
    assert [(r.sequence_id, r.restarted_as) for r in failover.retries] == [(7, 100), (100, 200)]


def test_a_lost_first_segment_restarts_from_the_state_it_started_with():
    replica = FakeReplica(lost_calls={1})
    failover = Failover(replica, RetryPolicy(backoff=0), sleep=lambda _: None)
    failover.step(7, None, None, start=True, end=False, state_in={"m": np.full(1, 40.0)})
    assert replica.calls == [(True, 40), (True, 40)]


def test_retries_are_bounded_and_end_in_one_line():
    replica = FakeReplica(lost_calls=set(range(3, 20)))
    failover = Failover(replica, RetryPolicy(attempts=4, backoff=0.1), sleep=lambda _: None)
    with pytest.raises(ServingError, match=r"Connection refused\); gave up after 4 tries in"):
        send_all(failover, 6)
    assert len(replica.calls) == 2 + 4


def test_other_errors_are_not_retried():
    replica = FakeReplica(bad_calls={2})
    failover = Failover(replica, RetryPolicy(), sleep=lambda _: pytest.fail("retried"))
    with pytest.raises(ServingError, match="token ids") as error:
        send_all(failover, 4)
    assert not isinstance(error.value, SequenceLostError)
    assert len(replica.calls) == 2


def test_policy_bound():
    assert RetryPolicy(attempts=4, backoff=1, max_wait=3).bound() == 1 + 2 + 3
    with pytest.raises(ServingError, match="attempts >= 1"):
        RetryPolicy(attempts=0)
