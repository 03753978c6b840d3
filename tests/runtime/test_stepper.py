"""The stepper owns the recurrence: rows keep their memory in one engine state between
steps, so every path (a run, a stream session, a pooled session, a served sequence)
makes O(1) engine states and moves memory to the host O(1) times however many segments
it runs; the bookkeeping (residency, reordering, removal, reuse) keeps results exact."""

from __future__ import annotations

import numpy as np
import pytest
from engines import CountingEngine

from rmt_deploy.errors import InputError
from rmt_deploy.runtime import RMTModel, SessionPool, open_model
from rmt_deploy.runtime.stepper import MAX_STATES, Stepper
from rmt_deploy.segmentation import step_inputs
from rmt_deploy.serving.sequences import SequenceStore, StepRequest

SEGMENTS = 1000


@pytest.fixture(scope="module")
def opened(encoder_export, decoder_export):
    return {"encoder": open_model(encoder_export, threads=1),
            "decoder": open_model(decoder_export, threads=1)}


def counted(model: RMTModel) -> tuple[RMTModel, CountingEngine]:
    engine = CountingEngine(model.engine)
    return RMTModel(engine, model.initial_state, model.tokenizer, model.description), engine


def document(model: RMTModel, segments: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(5, 45, segments * model.config.segment_size)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_a_long_run_makes_one_state_and_one_download(opened, kind):
    model, engine = counted(opened[kind])
    output = model.run_one(document(model, SEGMENTS))
    assert output.segments == SEGMENTS
    assert engine.counts["steps"] == SEGMENTS
    assert (engine.counts["states"], engine.counts["uploads"], engine.counts["downloads"]) \
        == (1, 1, 1)
    assert engine.open_states == 0


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_a_stream_session_keeps_its_memory_in_the_engine(opened, kind):
    model, engine = counted(opened[kind])
    ids = document(model, SEGMENTS)
    total = len(ids) if kind == "encoder" else None  # one track
    session = model.session(total_tokens=total)
    for start in range(0, len(ids), 37):  # pieces that straddle segments
        session.feed(ids[start:start + 37])
    final = session.close()
    assert final.segments == SEGMENTS
    # the session's own stepper: one state; the end reads the memory once
    assert engine.counts["states"] == 1 and engine.counts["downloads"] == 1
    assert engine.open_states == 0
    expected = opened[kind].run_one(ids)
    np.testing.assert_array_equal(final.memory, expected.memory)


def test_pooled_sessions_stepping_together_stay_resident(opened):
    model, engine = counted(opened["decoder"])
    docs = [document(model, SEGMENTS // 10, seed) for seed in range(3)]
    with SessionPool(model, batch=False) as direct, SessionPool(model) as pooled:
        for pool in (direct, pooled):
            before = dict(engine.counts)
            ids = [pool.open() for _ in docs]
            for start in range(0, len(docs[0]), model.config.segment_size):
                for session_id, doc in zip(ids, docs, strict=True):
                    pool.feed(session_id, doc[start:start + model.config.segment_size])
            finals = [pool.close(session_id) for session_id in ids]
            made = engine.counts["states"] - before.get("states", 0)
            assert made <= 3, made  # per session (direct) or per batch size (pooled)
            assert [f.segments for f in finals] == [SEGMENTS // 10] * 3
    assert engine.open_states == 0


def test_a_pooled_session_alone_makes_one_state(opened):
    model, engine = counted(opened["encoder"])
    ids = document(model, SEGMENTS)
    with SessionPool(model) as pool:
        session_id = pool.open(total_tokens=len(ids))
        for start in range(0, len(ids), 100):
            pool.feed(session_id, ids[start:start + 100])
        final = pool.close(session_id)
    assert final.segments == SEGMENTS
    assert engine.counts["states"] == 1 and engine.counts["downloads"] == 1


def test_a_served_sequence_moves_memory_only_when_asked(opened):
    model, engine = counted(opened["encoder"])
    store = SequenceStore(engine, model.initial_state, idle_seconds=60)
    ids = document(model, SEGMENTS)
    size = model.config.segment_size
    for index in range(SEGMENTS):
        input_ids, mask = step_inputs([ids[index * size:(index + 1) * size]], model.config)
        last = index == SEGMENTS - 1
        (result,) = store.execute([StepRequest(7, index == 0, last, input_ids, mask,
                                               wants_state=last)])
        assert (result.state is not None) == last
    store.close()
    assert (engine.counts["states"], engine.counts["downloads"]) == (1, 1)
    np.testing.assert_array_equal(result.state["memory_in"][0],
                                  opened["encoder"].run_one(ids).memory)


def test_rows_in_another_order_are_permuted_not_reloaded(opened):
    model, engine = counted(opened["encoder"])
    segments = [document(model, 1, seed) for seed in range(3)]
    with Stepper(engine) as stepper, Stepper(opened["encoder"].engine) as alone:
        for row in range(3):
            stepper.add(row, model.initial_state)
            alone.add(row, model.initial_state)
        stepper.step([0, 1, 2], segments)
        logits = stepper.step([2, 0, 1], [segments[2], segments[0], segments[1]])
        alone.step([0, 1, 2], segments)
        expected = alone.step([0, 1, 2], segments)
        np.testing.assert_array_equal(logits, expected[[2, 0, 1]])
        np.testing.assert_array_equal(stepper.states([0, 1, 2])["memory_in"],
                                      alone.states([0, 1, 2])["memory_in"])
    assert engine.counts["uploads"] == 1


def test_subsets_removal_and_readding_keep_each_row_exact(opened):
    base = opened["encoder"]
    model, engine = counted(base)
    segments = [document(model, 1, seed) for seed in range(4)]
    with Stepper(engine) as stepper:
        for row in range(3):
            stepper.add(row, model.initial_state)
        stepper.step([0, 1, 2], segments[:3])
        stepper.step([1], [segments[3]])  # a subset: row 1 alone
        stepper.remove(2)
        stepper.add(2, model.initial_state)  # removed while resident, then added again
        stepper.step([0, 2], [segments[0], segments[1]])
        memory = stepper.states([0, 1, 2])["memory_in"]
        with pytest.raises(InputError, match="not stepped here"):
            stepper.step([5], [segments[0]])
        with pytest.raises(InputError, match="already stepped here"):
            stepper.add(0, model.initial_state)
        with pytest.raises(InputError, match="at most once"):
            stepper.step([0, 0], segments[:2])
    expected = []
    for row_segments in ([segments[0], segments[0]], [segments[1], segments[3]],
                         [segments[1]]):
        with Stepper(base.engine) as alone:
            alone.add(0, model.initial_state)
            for segment in row_segments:
                alone.step([0], [segment])
            expected.append(alone.state(0)["memory_in"])
    np.testing.assert_array_equal(memory, np.stack(expected))
    assert engine.open_states == 0
    with pytest.raises(InputError, match="closed"):
        stepper.add(9, model.initial_state)


def test_states_are_reused_per_batch_size_and_bounded(opened):
    model, engine = counted(opened["encoder"])
    segment = document(model, 1)
    with Stepper(engine) as stepper:
        for row in range(MAX_STATES + 2):
            stepper.add(row, model.initial_state)
        for _ in range(2):
            for size in range(1, MAX_STATES + 3):
                stepper.step(list(range(size)), [segment] * size)
        assert engine.counts["states"] == 2 * (MAX_STATES + 2)  # least recently used out
        assert engine.open_states == MAX_STATES
        for _ in range(3):
            stepper.step([0, 1], [segment] * 2)
            stepper.step([3, 4], [segment] * 2)  # same size: the state is reused
    assert engine.open_states == 0


def test_zeroed_pairs_reach_the_next_step_of_only_those_rows(opened):
    """``Stepper.zero`` on a resident row: its pair is zeros at the next step, as if it
    had been added so; the other rows go on from their own state."""
    base = opened["decoder"]
    segments = [document(base, 1, seed) for seed in range(2)]
    with Stepper(base.engine) as stepper:
        for row in range(2):
            stepper.add(row, base.initial_state)
        stepper.step([0, 1], segments)
        before = stepper.state(1)["memory_in"]
        stepper.zero([0], ["memory_in"])
        assert not stepper.state(0)["memory_in"].any()
        np.testing.assert_array_equal(stepper.state(1)["memory_in"], before)
        stepper.step([0, 1], segments)
        got = stepper.states([0, 1])["memory_in"]
    expected = []
    for row, start in enumerate(({"memory_in": np.zeros_like(before)}, {"memory_in": before})):
        with Stepper(base.engine) as alone:
            alone.add(0, {**base.initial_state, **start})
            alone.step([0], [segments[row]])
            expected.append(alone.state(0)["memory_in"])
    np.testing.assert_array_equal(got, np.stack(expected))


def test_generation_split_into_parts_goes_on_with_one_random_stream(opened):
    """More rows than the engine takes at once generate in parts: greedy ids are those
    of one batch, and sampling goes on with one stream (parts that restarted it would
    give identical documents identical samples)."""
    from rmt_deploy.runtime.generation import GenerationOptions

    model = opened["decoder"]
    config = model.config
    segment = document(model, 1)[: config.segment_size]
    results = {}
    for limit in (None, 1):
        engine = CountingEngine(model.engine)
        engine.max_batch = limit
        with Stepper(engine) as stepper:
            for key in range(3):
                stepper.add(key, model.initial_state)
            results[limit] = [stepper.generate(range(3), [segment] * 3, options)
                              for options in (GenerationOptions(6),
                                              GenerationOptions(6, temperature=2.0, seed=5))]
    (greedy, sampled), (split_greedy, split_sampled) = results[None], results[1]
    assert split_greedy == greedy and greedy[0] == greedy[1] == greedy[2]
    assert len({tuple(ids) for ids in sampled}) > 1
    assert len({tuple(ids) for ids in split_sampled}) > 1
