"""Every validation gate against the fault it exists for: each test injects one fault
(an error that compounds, a 1% weight change, memory not fed back, memory slots that
turn, predictions that flip, NaN outputs) and expects the gate's error, and a sound
candidate passes the same gate. scripts/mutate.py breaks the gates themselves and shows
that these tests then fail."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from graph_faults import FaultyEngine, damaged_graph

from rmt_deploy.errors import ValidationError
from rmt_deploy.export.comparator import compare
from rmt_deploy.export.validate import (
    DriftGates,
    Tolerance,
    enforce,
    enforce_agreement,
    enforce_drift,
    enforce_finite,
)
from rmt_deploy.manifest import read_manifest
from rmt_deploy.model.checkpoint import load_checkpoint
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.runtime.backends.torch import TorchEngine
from rmt_deploy.runtime.tokens import ArraySource
from rmt_deploy.segmentation import content_id_range


def one_document(config, segments):
    """One batch of one document of ``segments`` full segments: its state is never
    regathered, so a compounding fault compounds over every segment."""
    ids = np.random.default_rng(0).integers(*content_id_range(config),
                                            segments * config.segment_size)
    return [[ArraySource(ids, config)]]


@pytest.fixture(scope="module")
def sides(encoder_checkpoint, encoder_export):
    """The tiny encoder's PyTorch reference, its exported graph on ONNX Runtime, and its
    initial memory."""
    reference = TorchEngine(load_checkpoint(encoder_checkpoint).rmt, threads=1)
    return reference, OnnxRuntimeEngine(read_manifest(encoder_export)), \
        reference.initial_state()


def test_a_sound_export_passes_every_gate(encoder_checkpoint, tmp_path):
    from rmt_deploy.export.pipeline import export_checkpoint

    manifest = export_checkpoint(encoder_checkpoint, tmp_path / "sound")  # its gates pass
    results = manifest.validation["fp32"]
    for mode in ("open_loop", "closed_loop"):
        assert results[mode]["min_memory_cosine"] > 0.9999
        assert results[mode]["agreement"] == 1.0
        assert sum(results[mode]["non_finite"].values()) == 0
    assert results["closed_loop"]["max_abs"]["memory_out"] > 0  # measured, not assumed


def test_open_loop_starts_every_step_from_the_reference_memory(sides):
    reference, graph, memory = sides
    step = 2e-5  # added to the candidate's memory each step: an error that compounds
    results = compare(reference, FaultyEngine(graph, "drift", size=step), memory,
                      batches=one_document(graph.config, 16))
    one_step = results.open_loop.max_abs["memory_out"]
    assert step * 0.9 < one_step < step * 1.5  # one step's error, never more
    assert results.closed_loop.max_abs["memory_out"] > 10 * step


def test_the_open_loop_gate_refuses_an_error_in_one_step(sides):
    reference, graph, memory = sides
    results = compare(reference, FaultyEngine(graph, "drift", size=2e-4), memory, 8)
    with pytest.raises(ValidationError, match=r"^validation: open loop error on memory_out is "
                                              r"0.000[0-9]+, above the tolerance 0.0001 "
                                              r"\(first at segment 0\)"):
        enforce(results, Tolerance())


def test_the_closed_loop_gate_refuses_an_error_that_compounds(sides):
    reference, graph, memory = sides
    results = compare(reference, FaultyEngine(graph, "drift", size=5e-5), memory,
                      batches=one_document(graph.config, 32))
    with pytest.raises(ValidationError, match=r"closed loop error on memory_out is .*, above "
                                              r"the tolerance 0.001 \(first at segment "
                                              r"(19|20|21)\)"):
        enforce(results, Tolerance())  # open loop passes: 5e-5 a step


def test_memory_that_is_not_fed_back_passes_open_loop_and_fails_closed_loop(sides):
    reference, graph, memory = sides
    results = compare(reference, FaultyEngine(graph, "no_feedback"), memory, 8)
    assert results.open_loop.max_abs["memory_out"] < 1e-4
    with pytest.raises(ValidationError, match="closed loop error on memory_out"):
        enforce(results, Tolerance())


def test_one_weight_changed_by_one_percent_is_refused(sides, encoder_export, tmp_path):
    reference, _, memory = sides
    folder = shutil.copytree(encoder_export, tmp_path / "exp")
    damaged_graph(encoder_export / "model.onnx", folder / "model.onnx")
    damaged = OnnxRuntimeEngine(read_manifest(folder, verify=False))
    results = compare(reference, damaged, memory, 4)
    with pytest.raises(ValidationError, match=r"open loop error on \w+ is"):
        enforce(results, Tolerance())


def test_the_memory_cosine_gate_refuses_memory_slots_that_turn(sides):
    reference, graph, memory = sides
    gates = DriftGates(min_agreement=0, min_memory_cosine=0.9999, max_abs=None)
    sound = compare(reference, graph, memory, 8, modes=("closed_loop",))
    enforce_drift(sound, gates, "sound")
    results = compare(reference, FaultyEngine(graph, "rotate", segment=3), memory, 8,
                      modes=("closed_loop",))
    assert results.closed_loop.min_memory_cosine < 0.99
    with pytest.raises(ValidationError, match=r"^turned: closed loop memory cosine of "
                                              r"memory_out falls to -?[0-9.]+, below 0.9999 "
                                              r"\(first at segment 3\)"):
        enforce_drift(results, gates, "turned")


def test_the_agreement_gate_refuses_predictions_that_change(sides):
    reference, graph, memory = sides
    sound = compare(reference, graph, memory, 8, modes=("closed_loop",))
    enforce_agreement(sound, 0.99, "the sound graph")
    results = compare(reference, FaultyEngine(graph, "flip"), memory, 8,
                      modes=("closed_loop",))
    with pytest.raises(ValidationError, match=r"^the flipped graph agrees with FP32 on "
                                              r"[0-9.]+% of closed loop predictions, below 99% "
                                              r"\(first at segment 0\)"):
        enforce_agreement(results, 0.99, "the flipped graph")


def test_the_non_finite_gate_refuses_nan_outputs(sides):
    reference, graph, memory = sides
    sound = compare(reference, graph, memory, 8)
    enforce_finite(sound, "sound")
    results = compare(reference, FaultyEngine(graph, "nan", segment=4), memory, 8)
    assert results.open_loop.non_finite["logits"] > 0
    with pytest.raises(ValidationError, match=r"^validation: \d+ value\(s\) of logits are NaN "
                                              r"or infinite in the open loop run \(first at "
                                              r"segment 4\)"):
        enforce(results, Tolerance())
    # the other figures stay finite numbers
    assert results.closed_loop.max_abs["logits"] < 1e-3


def test_the_drift_gates_name_the_first_failure_in_order(sides):
    reference, graph, memory = sides
    results = compare(reference, FaultyEngine(graph, "drift", size=1e-3), memory, 8,
                      modes=("closed_loop",))
    with pytest.raises(ValidationError, match=r"^plan: closed loop error on \w+ is .*, above "
                                              r"the tolerance 0.001 \(first at segment"):
        enforce_drift(results, DriftGates(max_abs=1e-3), "plan")
    enforce_drift(results, DriftGates(min_agreement=0, min_memory_cosine=-1), "plan")


@pytest.mark.parametrize("output", ["A_out.1", "z_out.0"])
def test_the_closed_loop_gates_refuse_a_drifting_armt_state_pair(armt_export, output):
    """An ARMT's state is every layer's A and z: an error in one pair after a few
    segments (an A or z that the step writes wrong) fails the error gates, which name
    that pair's output, and the closed-loop drift gates (the cosine of the pair, or of
    an A that it feeds), which name the pair that drifts; the sound graph passes."""
    engine = OnnxRuntimeEngine(read_manifest(armt_export))
    initial = read_manifest(armt_export).load_initial_state()
    batches = one_document(engine.config, 8)
    sound = compare(engine, engine, initial, batches=batches)
    enforce(sound, Tolerance())
    enforce_drift(sound, DriftGates(), "the candidate")
    size = 0.05 * float(np.abs(sound.closed_loop.scale.get(output, 1.0)))
    faulty = compare(engine, FaultyEngine(engine, "offset", segment=3, size=max(size, 0.05),
                                          output=output), initial, batches=batches)
    with pytest.raises(ValidationError, match=rf"error on {output.replace('.', '[.]')} "):
        enforce(faulty, Tolerance())
    with pytest.raises(ValidationError, match=r"^the candidate: closed loop memory cosine "
                                              r"of [Az]_out[.][01] falls"):
        enforce_drift(faulty, DriftGates(), "the candidate")
