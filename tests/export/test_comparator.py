"""The one comparator: export validation and rmt-compare pair the reference and the
candidate through the same code (comparator.compare), and the gates read its typed
result. An engine that perturbs one output from segment k is named, with k, by both."""

from __future__ import annotations

import numpy as np
import pytest
from graph_faults import FaultyEngine
from test_gates import one_document

from rmt_deploy.errors import ValidationError
from rmt_deploy.export import comparator
from rmt_deploy.export.artifacts import Artifact
from rmt_deploy.export.comparator import compare
from rmt_deploy.export.compare import CompareOptions, Report, judge_candidate
from rmt_deploy.export.validate import Tolerance, enforce
from rmt_deploy.manifest import read_manifest
from rmt_deploy.model.checkpoint import load_checkpoint
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.runtime.backends.torch import TorchEngine

SEGMENT, SIZE = 5, 1e-2  # the fault: SIZE added to one output from segment SEGMENT on


@pytest.fixture(scope="module")
def sides(encoder_checkpoint, encoder_export):
    """The tiny encoder's PyTorch reference and its exported graph on ONNX Runtime."""
    return (TorchEngine(load_checkpoint(encoder_checkpoint).rmt, threads=1),
            OnnxRuntimeEngine(read_manifest(encoder_export)))


def faulty(graph, output):
    return FaultyEngine(graph, "offset", segment=SEGMENT, size=SIZE, output=output)


@pytest.mark.parametrize("output", ["logits", "memory_out"])
def test_export_validation_names_the_output_and_segment_where_a_fault_starts(sides, output):
    reference, graph = sides
    comparison = compare(reference, faulty(graph, output), reference.initial_state(),
                         batches=one_document(graph.config, 8))
    opened = comparison.open_loop
    series = opened.series.max_abs[output]
    assert len(series) == 8 and max(series[:SEGMENT]) < 1e-4  # sound before the fault
    assert min(series[SEGMENT:]) == pytest.approx(SIZE, rel=1e-3)  # one step's offset
    others = [name for name in opened.max_abs if name not in (output, "write_" + output)]
    assert others and all(opened.max_abs[name] < 1e-4 for name in others)
    with pytest.raises(ValidationError, match=rf"^validation: open loop error on {output} is "
                                              rf"0\.01, above the tolerance 0\.0001 \(first "
                                              rf"at segment {SEGMENT}\)"):
        enforce(comparison, Tolerance())


@pytest.mark.parametrize("output", ["logits", "memory_out"])
def test_rmt_compare_names_the_output_and_segment_where_a_fault_starts(
        sides, encoder_checkpoint, encoder_export, output):
    reference, graph = sides
    state = reference.initial_state()
    base = Artifact(encoder_checkpoint, reference, state)
    other = Artifact(encoder_export, faulty(graph, output), state)
    batches = one_document(graph.config, 8)
    judged = judge_candidate(base, other, batches, CompareOptions())
    first = judged.failures[0]  # Polygraphy's atol/rtol judgement of the open loop
    assert (first.gate, first.mode, first.output, first.segment) == ("max_abs", "open_loop",
                                                                     output, SEGMENT)
    assert first.value == pytest.approx(SIZE, rel=1e-3) and first.limit == 1e-4
    verdict = Report(base.label, CompareOptions(), [judged]).verdict()
    assert verdict.startswith(f"{other.label}: open loop error on {output} is 0.01, above the "
                              f"tolerance 0.0001 (first at segment {SEGMENT})"), verdict
    # the open loop export validation measures, from the same pairing
    validation = compare(reference, faulty(graph, output), state, batches=batches)
    assert judged.errors.open_loop.max_abs == validation.open_loop.max_abs
    assert judged.errors.open_loop.series.max_abs == validation.open_loop.series.max_abs


@pytest.mark.parametrize("where", [0, 9, 22])  # in the first, a middle and the last block
def test_errors_are_measured_over_every_block_of_a_large_output(monkeypatch, where):
    """Large outputs (a full vocabulary's logits) are compared a block at a time: an
    error, a largest value and a NaN in any block count as in the whole array."""
    monkeypatch.setattr(comparator, "BLOCK", 4)
    expected = np.linspace(-1.0, 1.0, 23, dtype=np.float32).reshape(1, 23)
    expected[0, (where + 3) % 23] = -7.0
    actual = expected.copy()
    actual[0, where] += 0.5
    actual[0, (where + 7) % 23] = np.nan
    errors = comparator.LoopErrors("open_loop")
    errors.record(0, {"out": expected}, {"out": actual}, set())
    assert errors.max_abs["out"] == pytest.approx(0.5)
    assert errors.scale["out"] == 7.0
    assert errors.non_finite["out"] == 1


def test_a_step_split_into_parts_records_as_one_segment(decoder_export):
    """A candidate that takes one row at a time (a TensorRT profile under the
    validation batch's 3 rows): the stepper splits each step into parts, which record
    as one segment, so the series stay one entry a segment and the open loop counts the
    same steps as unsplit."""
    from engines import CountingEngine

    manifest = read_manifest(decoder_export)
    reference = OnnxRuntimeEngine(manifest)
    whole = compare(reference, OnnxRuntimeEngine(manifest), manifest.load_initial_state(),
                    segments=6)
    split = CountingEngine(OnnxRuntimeEngine(manifest))
    split.max_batch = 1
    parts = compare(reference, split, manifest.load_initial_state(), segments=6)
    assert set(split.batches) == {1} and len(split.batches) > 2 * whole.open_loop.steps
    assert parts.open_loop.steps == whole.open_loop.steps
    for loop in (parts.open_loop, parts.closed_loop):
        assert {len(values) for values in loop.series.max_abs.values()} == {parts.segments}
    assert parts.closed_loop.max_abs["logits"] < 1e-4
