"""Calibration steps come from the rolled FP32 recurrence: each recorded step carries
the memory that step really received."""

import numpy as np
import pytest

from rmt_deploy.calibration.collect import collect_steps
from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.runtime.tokens import ArraySource
from rmt_deploy.segmentation import count_segments, segment_range, step_inputs


@pytest.fixture(scope="module")
def engine(encoder_export):
    manifest = read_manifest(encoder_export)
    return OnnxRuntimeEngine(manifest), manifest.load_initial_state()


def rolled_alone(engine, initial_state, source):
    """(input_ids, attention_mask, memory_in) of every step, the document run alone."""
    config = engine.config
    state = engine.new_state({k: v[None] for k, v in initial_state.items()})
    steps = []
    for index in range(count_segments(len(source), config)):
        ids, mask = step_inputs([source.tokens(*segment_range(len(source), index, config))],
                                config)
        steps.append((ids[0], mask[0], state.state()["memory_in"][0].copy()))
        state.step(ids, mask)
    return steps


def test_every_step_records_the_memory_it_received(engine):
    engine, initial_state = engine
    config = engine.config
    rng = np.random.default_rng(0)
    sources = [ArraySource(rng.integers(5, 45, n), config)
               for n in (5 * config.segment_size, 3 * config.segment_size - 4)]
    steps = collect_steps(engine, initial_state, sources, max_steps=100)
    assert len(steps) == 8 and list(steps.depth) == [0, 0, 1, 1, 2, 2, 3, 4]
    expected = [step for source in sources for step in rolled_alone(engine, initial_state,
                                                                    source)]
    assert len(expected) == 8
    for ids, mask, memory in expected:
        match = [i for i in range(8) if np.array_equal(steps.input_ids[i], ids)]
        assert len(match) == 1
        np.testing.assert_array_equal(steps.attention_mask[match[0]], mask)
        np.testing.assert_allclose(steps.state["memory_in"][match[0]], memory, atol=1e-6)
    first = steps.state["memory_in"][steps.depth == 0]
    np.testing.assert_array_equal(first, np.stack([initial_state["memory_in"]] * 2))
    assert not np.allclose(steps.state["memory_in"][steps.depth == 4],
                           initial_state["memory_in"])


def test_a_bounded_uniform_sample_over_all_depths(engine):
    engine, initial_state = engine
    config = engine.config
    rng = np.random.default_rng(1)
    sources = [ArraySource(rng.integers(5, 45, 40 * config.segment_size), config)
               for _ in range(3)]
    steps = collect_steps(engine, initial_state, sources, max_steps=16, seed=3)
    assert len(steps) == 16 and steps.depth.max() >= 20 and steps.depth.min() < 20
    assert steps.describe() == {"steps": 16, "deepest_segment": int(steps.depth.max()),
                                "first_segments": int((steps.depth == 0).sum())}
    again = collect_steps(engine, initial_state, sources, max_steps=16, seed=3)
    np.testing.assert_array_equal(again.depth, steps.depth)
    np.testing.assert_array_equal(again.state["memory_in"], steps.state["memory_in"])
    feeds = list(steps.feeds())
    assert len(feeds) == 16
    assert {k: v.shape for k, v in feeds[0].items()} == {
        "input_ids": (1, config.input_size), "attention_mask": (1, config.input_size),
        "memory_in": (1, config.num_mem_tokens, config.hidden_size)}
